"""GPU step-level benchmark: one full KD training step, full logits vs our chunked loss vs Liger's loss,
each with the models as they are and with their own speed-ups (torch.compile of the layers, Liger's kernels).

    python benchmarks/bench_step_gpu.py --out step_gpu.json                        # H100/H200, the Qwen pair
    python benchmarks/bench_step_gpu.py --pair llama --out step_gpu_llama.json     # the Llama 1B <- 8B pair
    python benchmarks/bench_step_gpu.py --speedups off --out step_gpu.json         # the loss paths alone
    python benchmarks/bench_step_gpu.py --device cpu --small --steps 3 --warmup 1  # smoke test anywhere
    bash benchmarks/bench_gpu_all.sh OUT_DIR    # this for both pairs, and bench_loss_gpu.py, in one go

The step is that of a real model pair (``--pair``), both models random-initialised from their
configs on the device (no download), SDPA attention, B=8, L=1024, forward KL at T=2 with T^2,
kd_weight 0.5 against hard-label CE, every position a valid target:
  qwen   (default, ``ANCHOR``) a Qwen2.5-0.5B-shaped student (hidden 896, 24 layers, 14 heads,
         2 KV heads, MLP 4864, vocab 151936, tied embeddings) distilled from a Qwen2.5-1.5B-shaped
         teacher (hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocab 151936, tied);
  llama  (``LLAMA_ANCHOR``, transformers' LlamaConfig) a Llama-3.2-1B-shaped student (hidden 2048,
         16 layers, 32 heads, 8 KV heads, MLP 8192, vocab 128256, tied, rope_theta 500000) from a
         Llama-3.1-8B-shaped teacher (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336,
         vocab 128256, untied, rope_theta 500000). Llama 3's RoPE frequency scaling is left out: at
         L=1024 it changes the rotary frequencies, not the work. Memory, on paper, at 8 x 1024
         under autocast: teacher 16.1 GB (bf16), student 4.9 GB fp32 weights + 9.9 GB AdamW state
         (the baseline, about 31 GB), then per step 4.9 GB of gradients, 2.5 GB of autocast's
         bf16 weight copies, about 14 GB of the student's saved activations and, for ``full``,
         about 8 GB of logits and loss buffers (scaled from the Qwen pair's measured 22.4 GiB):
         about 60 GB at the peak, inside an 80 GB H100. The teacher is built in fp32 (32 GB) and
         cast to bf16 parameter by parameter, before the student exists. An OOM is recorded, as for any variant.
``--small``: tiny shapes of the same architecture (hidden 64 / 128, 2 layers, V 2048, B 2, L 64;
for llama also GQA 8/2 heads and an untied teacher), a smoke test that runs on a CPU.
One step = teacher forward (no grad) + student forward + loss + backward (+ optional clipping) +
AdamW step (``fused=True`` on CUDA; the parameter groups of ``schedules.make_optimizer``)
+ ``zero_grad(set_to_none=True)``.

Precision (the same for every variant): ``--precision autocast`` (default) is lmdistill's
own training set-up: the student keeps fp32 master weights and runs under
``torch.autocast(bfloat16)``, the teacher holds bf16 weights. ``--precision bf16`` puts
the student's weights in bf16 too (no autocast): that is what the reference measurement
(a reference measurement of Liger on an H200) used.

Loss variants (``--variants``), run one after another in one process on the same input ids, each
starting from the same initial student weights and a fresh optimizer:
  full     the trainer's ``signals.LiveLogits`` + ``objective.Objective``: full logits of both models,
           ``losses.distillation_loss`` (fp32 inside), autograd;
  chunked  ``signals.LiveHidden`` + ``objective.Objective``: final hidden states through
           ``fused.fused_linear_distillation_loss`` (torch.compile'd chunk math on CUDA);
  liger    final hidden states (``model.model(...).last_hidden_state``) through
           ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` with beta=0 (forward KL,
           KL(teacher || student), at T on both models), ``weight_hard_loss = 1 - kd_weight``,
           ``weight_soft_loss = kd_weight * T^2``: Liger never multiplies its soft loss by
           T^2, so the T^2 is folded into its weight and the loss is the same function as
           ours (the reference measurement used weight_soft_loss 0.5 instead; a scalar, the work is
           identical). Liger normalises both terms by the number of valid targets in the
           call, which here equals lmdistill's ``num_tokens``. Compiled on CUDA only.
           Skipped, with the reason printed, when liger-kernel cannot be imported.

The models' own speed-ups (``--speedups``; each is run with every loss variant), as the trainer
applies them (``lmdistill.models.speedups``, ``model.compile`` and ``model.liger``):
  off      the models as transformers builds them: the step the tables of docs/performance.md measured;
  compile  every decoder layer of both models torch.compile'd in place (``compile_layers``: static
           shapes, one compiled program per layer class);
  liger    Liger's kernels patched into both models (``apply_liger``: RMSNorm, RoPE, SwiGLU through
           ``_apply_liger_kernel_to_instance``, its cross-entropy and fused-linear-CE patches off);
           skipped, with the reason, where liger-kernel does not import or the device is a CPU;
  both     Liger's kernels, then the compiled layers.
Each speed-up builds its models afresh (both patches change the instances for good) and loads the
same initial student weights. They run in this order because Liger also replaces transformers'
rotary-embedding function for the whole process: ``off`` and ``compile`` run before that.
``torch._dynamo.reset()`` comes before each speed-up, so that each pays its own compilation in
its warm-up steps (``warmup_s``; raise ``--warmup`` if the first timed steps still compile).

Reported per speed-up and loss variant: median step time over ``--steps`` timed steps after ``--warmup``
steps (CUDA events around each step with a synchronize after it; ``time.perf_counter``
on a CPU), tokens/s = B * (L - 1) / median time (target tokens, as the reference measurement
counts them), MFU = tokens/s * (6 * Ns + 2 * Nt) / peak (989e12 dense bf16 FLOP/s for an
H100/H200 SXM; ``--peak-tflops``), with Ns and Nt each model's unique parameters
(``sum(p.numel() for p in model.parameters())``: embeddings included and a tied
embedding counted once, standing for the lm_head matmul; an untied one counted twice, as the
Llama teacher's 0.53B input embedding of its 8.03B is; attention-score FLOPs not
counted), as the reference measurement does; and the peak memory above the models + optimizer baseline:
``torch.cuda.max_memory_allocated()`` over the timed steps minus ``memory_allocated()``
right before them (after the warm-up steps created the AdamW state, gradients freed).
On a CPU, MFU and memory are not measured (a note says so). An out-of-memory error in one
variant is recorded as "OOM" and the run goes on with the next variant.
Ratios, with the models off: chunked tokens/s over liger's and over full's, and peak memory likewise
(goals: chunked >= 1.10x Liger's tokens/s and >= 1.4x the full-logits step's). Per speed-up and loss
variant: tokens/s and peak memory over the same loss variant with the models off, and the relative
difference of the first step's loss from it (the speed-ups should leave it within bf16 rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import Records, cpu_name, emit

from lmdistill.config import Config
from lmdistill.core.batch import Batch
from lmdistill.loss.objective import KDSpec, Objective
from lmdistill.models.speedups import apply_liger, compile_layers, liger_version
from lmdistill.teacher.signals import make_signal
from lmdistill.training.schedules import make_optimizer

VARIANTS = ("full", "chunked", "liger")
SPEEDUPS = ("off", "compile", "liger", "both")  # in this order: Liger's RoPE patch is process-wide
GOALS = {"chunked_over_liger_tokens_per_s": 1.10, "chunked_over_full_tokens_per_s": 1.4}
T, KD_WEIGHT = 2.0, 0.5


def pair(label: str, config: str, student: dict, teacher: dict, batch_size: int, seq_len: int, **both) -> dict:
    """A model pair's shapes: ``config`` (a transformers config class), each model's kwargs for it
    (``both`` shared by the two), and the step's B and L."""
    return {
        "label": label,
        "config": config,
        "student": {**both, **student},
        "teacher": {**both, **teacher},
        "batch_size": batch_size,
        "seq_len": seq_len,
    }


def layers(hidden: int, mlp: int, n: int, heads: int, kv_heads: int, tied: bool) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
    )


# --pair qwen: the Qwen2.5-0.5B / 1.5B shapes (ANCHOR), and a tiny Qwen2 pair for a CPU smoke test (SMALL)
ANCHOR = pair(
    "Qwen2.5-0.5B <- 1.5B",
    "Qwen2Config",
    layers(896, 4864, 24, 14, 2, True),
    layers(1536, 8960, 28, 12, 2, True),
    8,
    1024,
    vocab_size=151936,
)
SMALL = pair(
    "Qwen2", "Qwen2Config", layers(64, 128, 2, 4, 2, True), layers(128, 256, 2, 4, 2, True), 2, 64, vocab_size=2048
)
# --pair llama: the Llama-3.2-1B / Llama-3.1-8B shapes (RoPE scaling left out: same work), and a tiny Llama pair
LLAMA = dict(rope_theta=500000.0, rms_norm_eps=1e-5)
LLAMA_ANCHOR = pair(
    "Llama-3.2-1B <- Llama-3.1-8B",
    "LlamaConfig",
    layers(2048, 8192, 16, 32, 8, True),
    layers(4096, 14336, 32, 32, 8, False),
    8,
    1024,
    vocab_size=128256,
    **LLAMA,
)
LLAMA_SMALL = pair(
    "Llama",
    "LlamaConfig",
    layers(64, 128, 2, 8, 2, True),
    layers(128, 256, 2, 8, 2, False),
    2,
    64,
    vocab_size=2048,
    **LLAMA,
)
PAIRS = {"qwen": (ANCHOR, SMALL), "llama": (LLAMA_ANCHOR, LLAMA_SMALL)}


def build_model(shapes: dict, which: str, seq_len: int, device: torch.device, dtype: torch.dtype, seed: int):
    """``which`` (student or teacher) of ``shapes``, random-initialised on ``device`` from its config."""
    import transformers

    config_class = getattr(transformers, shapes["config"])
    config = config_class(**shapes[which], max_position_embeddings=max(4096, seq_len), use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds, not minutes, at 1.5B
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype)


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument(
        "--pair",
        default="qwen",
        choices=sorted(PAIRS),
        help="qwen: Qwen2.5-0.5B <- 1.5B shapes (default); llama: Llama-3.2-1B <- Llama-3.1-8B shapes",
    )
    p.add_argument(
        "--small", action="store_true", help="tiny shapes of the pair (hidden 64/128, 2 layers, V 2048, B 2, L 64)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile, AdamW state); at least 1")
    p.add_argument("--batch-size", type=int, help="default 8 (2 with --small)")
    p.add_argument("--seq-len", type=int, help="default 1024 (64 with --small)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="loss variants: a subset of full,chunked,liger")
    p.add_argument(
        "--speedups",
        default=",".join(SPEEDUPS),
        help="the models' speed-ups, each run with every loss variant: a subset of off,compile,liger,both",
    )
    p.add_argument(
        "--precision",
        default="autocast",
        choices=["autocast", "bf16"],
        help="autocast: fp32 student master weights under bf16 autocast (lmdistill's set-up); "
        "bf16: bf16 student weights, no autocast (the reference measurement). Teacher: bf16 either way",
    )
    p.add_argument("--chunk-size", type=int, default=1024, help="loss.chunk_size for chunked")
    p.add_argument("--liger-chunk-size", type=int, default=1024, help="Liger's chunk_size")
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile of Liger's loss chunk step (ours follows its own default: CUDA only); auto = on for "
        "CUDA. The models' layers: --speedups",
    )
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="clip the gradient norm (0 = no clipping)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for the MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write all records as JSON here")
    return p.parse_args()


def _subset(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    wanted = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(allowed))
    if unknown:
        sys.exit(f"unknown {what} {unknown}; choose from {','.join(allowed)}")
    return [v for v in allowed if v in wanted]  # (in the order that keeps Liger's global patch last)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is available; use --device cpu --small")
    shapes = PAIRS[args.pair][1 if args.small else 0]
    B = args.batch_size or shapes["batch_size"]
    L = args.seq_len or shapes["seq_len"]
    warmup = max(1, args.warmup)
    wanted = _subset(args.variants, VARIANTS, "variants")
    speedups = _subset(args.speedups, SPEEDUPS, "speed-ups")
    autocast = args.precision == "autocast"

    records = Records(args.out)  # rewritten after each record: a run cut short keeps what it measured
    env = emit(records, **env_record(args, device, shapes, B, L, warmup, speedups))
    liger_loss = make_liger_loss(args, cuda, wanted, env, records)
    speedups = usable_speedups(speedups, cuda, env, records)
    bench = Bench(args, shapes, device, B, L, warmup, autocast, liger_loss, records)

    results: dict[tuple[str, str], dict] = {}
    for speedup in speedups:
        bench.build(speedup)
        for variant in wanted:
            results[speedup, variant] = emit(records, **bench.run(speedup, variant))
        bench.drop()

    ratios = loss_ratios(results, cuda)
    by_speedup = speedup_ratios(results)
    goals = {
        k: {"goal": v, "value": ratios.get(k), "met": None if ratios.get(k) is None or not cuda else ratios[k] >= v}
        for k, v in GOALS.items()
    }
    emit(
        records,
        ratios=ratios,
        goals=goals,
        speedup_ratios=by_speedup,
        note=None if cuda else "CPU run: timings are not the GPU figures; MFU, memory and the goals need CUDA",
    )
    print_table(records, results, ratios, by_speedup, env, cuda)
    if args.out:
        print(f"wrote {args.out}")


def env_record(args, device: torch.device, shapes: dict, B: int, L: int, warmup: int, speedups: list[str]) -> dict:
    """The run's first record: the command, the machine, the versions, the pair and the settings."""
    cuda = device.type == "cuda"
    return dict(
        env=True,
        command=" ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if cuda else f"cpu ({cpu_name()})",
        device_memory_gib=gib(torch.cuda.get_device_properties(device).total_memory) if cuda else None,
        torch=torch.__version__,
        cuda=torch.version.cuda if cuda else None,
        python=platform.python_version(),
        transformers=__import__("transformers").__version__,
        precision=(
            "student fp32 master weights under bf16 autocast, teacher bf16"
            if args.precision == "autocast"
            else "student and teacher bf16 weights, no autocast"
        ),
        batch_size=B,
        seq_len=L,
        steps=args.steps,
        warmup=warmup,
        chunk_size=args.chunk_size,
        liger_chunk_size=args.liger_chunk_size,
        max_grad_norm=args.max_grad_norm or None,
        optimizer=f"AdamW(fused={cuda}) with schedules.make_optimizer's parameter groups",
        pair=args.pair,
        shapes=f"small ({shapes['label']}-shaped)" if args.small else f"anchor ({shapes['label']})",
        model_config=shapes["config"],
        student=shapes["student"],
        teacher=shapes["teacher"],
        speedups=speedups,
    )


def make_liger_loss(args, cuda: bool, wanted: list[str], env: dict, records: list):
    """Liger's fused linear JSD loss for the ``liger`` loss variant, or None (and the variant dropped)."""
    if "liger" not in wanted:
        return None
    liger_compiled = cuda if args.compile == "auto" else args.compile == "on"
    try:
        import liger_kernel
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(
            weight_hard_loss=1.0 - KD_WEIGHT,
            weight_soft_loss=KD_WEIGHT * T * T,
            beta=0.0,
            temperature=T,
            compiled=liger_compiled,
            chunk_size=args.liger_chunk_size,
        )
        env["liger_kernel"] = getattr(liger_kernel, "__version__", None) or _dist_version("liger-kernel")
        env["liger_compiled"] = liger_compiled
        return loss
    except Exception as exc:  # not installed, or no usable triton here
        emit(records, variant="liger", status="skipped", reason=f"liger-kernel not importable: {exc!r:.200}")
        print("liger-kernel is not installed or not importable here: the liger column is skipped", flush=True)
        wanted.remove("liger")
        return None


def usable_speedups(speedups: list[str], cuda: bool, env: dict, records: list) -> list[str]:
    """``speedups`` without those that need Liger's kernels where they cannot run (each skip recorded)."""
    if not any(s in ("liger", "both") for s in speedups):
        return speedups
    version = liger_version() if cuda else None
    if version is not None:
        env["liger_kernel"] = version
        return speedups
    why = "liger-kernel does not import here" if cuda else "Liger's kernels are Triton kernels: CUDA only"
    for speedup in ("liger", "both"):
        if speedup in speedups:
            emit(records, speedups=speedup, status="skipped", reason=why)
    print(f"the liger and both speed-ups are skipped: {why}", flush=True)
    return [s for s in speedups if s not in ("liger", "both")]


class Bench:
    """The models of one speed-up at a time, and one loss variant's timed steps on them."""

    def __init__(self, args, shapes, device, B, L, warmup, autocast, liger_loss, records):
        self.args, self.shapes, self.device, self.warmup, self.liger_loss = args, shapes, device, warmup, liger_loss
        self.cuda = device.type == "cuda"
        self.L, self.records = L, records
        self.student_dtype = torch.float32 if autocast else torch.bfloat16
        self.amp = (
            (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
            if autocast
            else contextlib.nullcontext
        )
        self.vocab = shapes["student"]["vocab_size"]
        g = torch.Generator().manual_seed(args.seed)
        self.ids = torch.randint(0, self.vocab, (B, L), generator=g).to(device)
        self.targets = self.ids[:, 1:].reshape(-1)
        self.tokens = B * (L - 1)  # target tokens per step: the loss's num_tokens, and the tokens/s numerator
        self.batch = Batch.from_blocks(self.ids)
        self.spec = KDSpec(kd_weight=KD_WEIGHT, divergence="forward_kl", scale_by_t2=True)
        self.cfg = Config()
        self.cfg.distill.temperature, self.cfg.distill.kd_weight = T, KD_WEIGHT
        self.cfg.distill.scale_by_t2, self.cfg.distill.divergence = True, "forward_kl"
        self.cfg.loss.chunk_size = args.chunk_size
        self.initial_state = self.teacher_state = None
        self.teacher = self.student = None

    def build(self, speedup: str) -> None:
        """Fresh models for ``speedup``, the student at the first speed-up's initial weights."""
        t0 = time.perf_counter()
        torch._dynamo.reset()  # each speed-up pays its own compilation in its warm-up
        args, shapes = self.args, self.shapes
        self.teacher = build_model(shapes, "teacher", self.L, self.device, torch.bfloat16, args.seed + 1)
        self.teacher.eval().requires_grad_(False)
        self.student = build_model(shapes, "student", self.L, self.device, self.student_dtype, args.seed)
        self.student.train()
        if self.initial_state is None:  # the first speed-up's weights, for every later one too
            self.initial_state = {k: v.detach().to("cpu", copy=True) for k, v in self.student.state_dict().items()}
            self.teacher_state = {k: v.detach().to("cpu", copy=True) for k, v in self.teacher.state_dict().items()}
        self.teacher.load_state_dict(self.teacher_state)
        for model in (self.teacher, self.student):
            if speedup in ("liger", "both"):
                apply_liger(model)
            if speedup in ("compile", "both"):
                compile_layers(model)
        n_s = sum(p.numel() for p in self.student.parameters())  # unique tensors: a tied embedding counts once
        n_t = sum(p.numel() for p in self.teacher.parameters())
        self.flops_per_token = 6 * n_s + 2 * n_t
        emit(
            self.records,
            models=True,
            speedups=speedup,
            n_student=n_s,
            n_teacher=n_t,
            flops_per_token=self.flops_per_token,
            models_gib=gib(torch.cuda.memory_allocated(self.device)) if self.cuda else None,
            build_s=round(time.perf_counter() - t0, 1),
        )

    def drop(self) -> None:
        self.teacher = self.student = None
        free_memory(self.cuda)

    def make_step(self, variant: str, opt: torch.optim.Optimizer):
        student, teacher, args, batch, tokens = self.student, self.teacher, self.args, self.batch, self.tokens

        def finish(loss: torch.Tensor) -> torch.Tensor:
            loss.backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        if variant in ("full", "chunked"):
            # The trainer's own pieces: the live teacher signal and the objective of loss.impl=variant.
            signal = make_signal(variant, teacher, self.vocab)
            objective = Objective(self.spec, self.vocab, signal.student_output, student, args.chunk_size)

            def step() -> torch.Tensor:
                with self.amp():
                    parts = objective(student, batch, signal(batch, T), T, tokens)
                return finish(parts.total)

            return step
        s_body = getattr(student, student.base_model_prefix)  # Qwen2ForCausalLM.model
        t_body = getattr(teacher, teacher.base_model_prefix)

        def liger_step() -> torch.Tensor:
            with self.amp():
                with torch.no_grad():
                    th = t_body(input_ids=self.ids).last_hidden_state[:, :-1]
                sh = s_body(input_ids=self.ids).last_hidden_state[:, :-1]
                loss = self.liger_loss(
                    sh.reshape(-1, sh.shape[-1]),
                    student.get_output_embeddings().weight,
                    th.reshape(-1, th.shape[-1]),
                    teacher.get_output_embeddings().weight,
                    self.targets,
                )
            return finish(loss)

        return liger_step

    def run(self, speedup: str, variant: str) -> dict:
        """One loss variant's record on the models of ``speedup`` (an OOM or a failure recorded, not raised)."""
        failure = None
        try:
            rec = self._timed(variant)
        except torch.cuda.OutOfMemoryError as exc:
            failure = {"status": "OOM", "error": f"{exc!s:.300}"}
        except Exception as exc:  # a compiler or library failure: record it, go on
            failure = {"status": "error", "error": f"{exc!r:.300}"}
        if failure is not None:  # outside the except block: the traceback no longer pins tensors
            rec = failure
            self.student.zero_grad(set_to_none=True)
        free_memory(self.cuda)
        return {"speedups": speedup, "variant": variant, **rec}

    def _timed(self, variant: str) -> dict:
        student, cfg, cuda, device = self.student, self.cfg, self.cuda, self.device
        student.load_state_dict(self.initial_state)  # every variant starts from the same weights
        base_opt = make_optimizer(student, cfg)
        opt = torch.optim.AdamW(
            [{"params": grp["params"], "weight_decay": grp["weight_decay"]} for grp in base_opt.param_groups],
            lr=1e-5,
            betas=tuple(cfg.train.betas),
            fused=cuda,
        )
        del base_opt
        step = self.make_step(variant, opt)
        losses = []
        t_warm = time.perf_counter()
        for _ in range(self.warmup):  # compiles, and creates the AdamW state (part of the baseline)
            losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t_warm
        free_memory(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(self.args.steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                losses.append(step())
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t1 = time.perf_counter()
                losses.append(step())
                times.append((time.perf_counter() - t1) * 1e3)
        rec = {
            "status": "ok",
            "warmup_s": round(warm_s, 2),
            "step_ms": [round(t, 2) for t in times],
            "loss_first": round(float(losses[0]), 5),
            "loss_last": round(float(losses[-1]), 5),
        }
        if times:
            ms = statistics.median(times)
            tps = self.tokens / ms * 1e3
            rec.update(
                median_ms=round(ms, 2),
                tokens_per_s=round(tps, 1),
                mfu=round(tps * self.flops_per_token / (self.args.peak_tflops * 1e12), 4) if cuda else None,
            )
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            rec.update(baseline_gib=gib(base), peak_gib=gib(peak), peak_extra_gib=gib(peak - base))
        else:
            rec.update(peak_extra_gib=None, memory_note="not measured on a CPU (see bench_loss.py for RSS)")
        del opt, step
        return rec


def _ratio(a: dict, b: dict, key: str, digits: int = 3) -> float | None:
    ok = a.get("status") == "ok" and b.get("status") == "ok" and a.get(key) and b.get(key)
    return round(a[key] / b[key], digits) if ok else None


def loss_ratios(results: dict, cuda: bool) -> dict[str, float | None]:
    """chunked over liger and over full, tokens/s and peak memory, with the models off (the goals')."""
    ratios: dict[str, float | None] = {}
    ch = results.get(("off", "chunked"), {})
    for other in ("liger", "full"):
        o = results.get(("off", other), {})
        ratios[f"chunked_over_{other}_tokens_per_s"] = _ratio(ch, o, "tokens_per_s")
        ratios[f"chunked_over_{other}_peak_extra"] = _ratio(ch, o, "peak_extra_gib")
    return ratios


def speedup_ratios(results: dict) -> dict[str, dict[str, dict]]:
    """Per speed-up and loss variant: tokens/s and peak memory over the same variant with the models
    off, and the first step's loss relative to it."""
    out: dict[str, dict[str, dict]] = {}
    for (speedup, variant), rec in results.items():
        off = results.get(("off", variant), {})
        if speedup == "off" or off.get("status") != "ok" or rec.get("status") != "ok":
            continue
        out.setdefault(speedup, {})[variant] = {
            "tokens_per_s_over_off": _ratio(rec, off, "tokens_per_s"),
            "peak_extra_over_off": _ratio(rec, off, "peak_extra_gib"),
            "loss_first_rel_diff": round(abs(rec["loss_first"] - off["loss_first"]) / abs(off["loss_first"]), 7),
        }
    return out


def print_table(records, results, ratios, by_speedup, env, cuda: bool) -> None:
    print(
        f"\none KD step, {env['shapes']} shapes, B={env['batch_size']}, L={env['seq_len']}, "
        f"{env['precision']}, {env['device']}"
    )
    print(
        f"{'models':8} {'loss':8} {'median ms':>10} {'tokens/s':>10} {'MFU':>7} {'peak extra GiB':>15} "
        f"{'loss (1st step)':>16} {'vs off':>8}"
    )
    for r in records:
        if r.get("status") != "ok" and "status" in r:
            name = f"{r.get('speedups', ''):8} {r.get('variant', ''):8}"
            print(f"{name} {r['status']}: {(r.get('reason') or r.get('error') or '')[:90]}")
        elif r.get("status") == "ok":
            mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
            mem = "n/a" if r.get("peak_extra_gib") is None else f"{r['peak_extra_gib']:.2f}"
            gain = (by_speedup.get(r["speedups"], {}).get(r["variant"]) or {}).get("tokens_per_s_over_off")
            print(
                f"{r['speedups']:8} {r['variant']:8} {r.get('median_ms', float('nan')):10.2f} "
                f"{r.get('tokens_per_s', float('nan')):10.0f} {mfu:>7} {mem:>15} {r['loss_first']:16.5f} "
                f"{'' if gain is None else f'{gain:.3f}x':>8}"
            )
    for key in ("liger", "full"):
        tps, mem = ratios[f"chunked_over_{key}_tokens_per_s"], ratios[f"chunked_over_{key}_peak_extra"]
        goal = GOALS[f"chunked_over_{key}_tokens_per_s"]
        verdict = "" if tps is None or not cuda else ("  goal met" if tps >= goal else "  goal NOT met")
        print(
            f"models off, chunked / {key:6} tokens/s: {'n/a' if tps is None else f'{tps:.3f}x'} (goal >= {goal}x)"
            f"{verdict}; peak extra memory: {'n/a' if mem is None else f'{mem:.3f}x'}"
        )
    if not cuda:
        print("(CPU: perf_counter timing; MFU, memory and the goals are only meaningful on a GPU)")


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
