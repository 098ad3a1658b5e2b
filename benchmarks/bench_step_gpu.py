"""GPU step-level benchmark: one full KD training step, full logits vs our chunked loss vs Liger.

    python benchmarks/bench_step_gpu.py --out step_gpu.json                        # H100/H200, the real pairs' shapes
    python benchmarks/bench_step_gpu.py --device cpu --small --steps 3 --warmup 1  # smoke test anywhere

The step is that of a real model pair: a
Qwen2.5-0.5B-shaped student (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864,
vocab 151936, tied embeddings) distilled from a Qwen2.5-1.5B-shaped teacher (hidden 1536,
28 layers, 12 heads, 2 KV heads, MLP 8960, vocab 151936, tied), both random-initialised
from their configs (no download), SDPA attention, B=8, L=1024, forward KL at T=2 with
T^2, kd_weight 0.5 against hard-label CE, every position a valid target. One step =
teacher forward (no grad) + student forward + loss + backward (+ optional clipping) +
AdamW step (``fused=True`` on CUDA; the parameter groups of ``schedules.make_optimizer``)
+ ``zero_grad(set_to_none=True)``.

Precision (the same for every variant): ``--precision autocast`` (default) is lmdistill's
own training set-up: the student keeps fp32 master weights and runs under
``torch.autocast(bfloat16)``, the teacher holds bf16 weights. ``--precision bf16`` puts
the student's weights in bf16 too (no autocast): that is what the reference measurement
(a reference measurement of Liger on an H200) used.

Variants, run one after another in one process on the same input ids, each starting from
the same initial student weights and a fresh optimizer:
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

Reported per variant: median step time over ``--steps`` timed steps after ``--warmup``
steps (CUDA events around each step with a synchronize after it; ``time.perf_counter``
on a CPU), tokens/s = B * (L - 1) / median time (target tokens, as the reference measurement
counts them), MFU = tokens/s * (6 * Ns + 2 * Nt) / peak (989e12 dense bf16 FLOP/s for an
H100/H200 SXM; ``--peak-tflops``), with Ns and Nt each model's unique parameters
(``sum(p.numel() for p in model.parameters())``: embeddings included and a tied
embedding counted once, standing for the lm_head matmul; attention-score FLOPs not
counted), as the reference measurement does; and the peak memory above the models + optimizer baseline:
``torch.cuda.max_memory_allocated()`` over the timed steps minus ``memory_allocated()``
right before them (after the warm-up steps created the AdamW state, gradients freed).
On a CPU, MFU and memory are not measured (a note says so). An out-of-memory error in one
variant is recorded as "OOM" and the run goes on with the next variant.
Ratios: chunked tokens/s over liger's and over full's, and peak memory likewise.
Goals: chunked >= 1.10x Liger's tokens/s and >= 1.4x the full-logits step's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import time

import torch

from lmdistill.config import Config
from lmdistill.core.batch import Batch
from lmdistill.loss.objective import KDSpec, Objective
from lmdistill.teacher.signals import make_signal
from lmdistill.training.schedules import make_optimizer

VARIANTS = ("full", "chunked", "liger")
GOALS = {"chunked_over_liger_tokens_per_s": 1.10, "chunked_over_full_tokens_per_s": 1.4}
T, KD_WEIGHT = 2.0, 0.5

# name -> Qwen2Config kwargs (anchor: the Qwen2.5-0.5B / 1.5B shapes; small: a CPU smoke test)
ANCHOR = {
    "student": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "teacher": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "batch_size": 8,
    "seq_len": 1024,
}
SMALL = {
    "student": dict(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "teacher": dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "batch_size": 2,
    "seq_len": 64,
}


def emit(records: list, **kw) -> dict:
    records.append(kw)
    print(json.dumps(kw), flush=True)
    return kw


def build_model(kwargs: dict, seq_len: int, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**kwargs, max_position_embeddings=max(4096, seq_len), use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds, not minutes, at 1.5B
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype)


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny shapes (hidden 64/128, 2 layers, V 2048, B 2, L 64)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile, AdamW state); at least 1")
    p.add_argument("--batch-size", type=int, help="default 8 (2 with --small)")
    p.add_argument("--seq-len", type=int, help="default 1024 (64 with --small)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of full,chunked,liger")
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
        help="torch.compile of Liger's chunk step (ours follows its own default: CUDA only); auto = on for CUDA",
    )
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="clip the gradient norm (0 = no clipping)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for the MFU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write all records as JSON here")
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is available; use --device cpu --small")
    shapes = SMALL if args.small else ANCHOR
    B = args.batch_size or shapes["batch_size"]
    L = args.seq_len or shapes["seq_len"]
    warmup = max(1, args.warmup)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {','.join(VARIANTS)}")
    autocast = args.precision == "autocast"
    liger_compiled = cuda if args.compile == "auto" else args.compile == "on"

    records: list[dict] = []
    env = emit(
        records,
        env=True,
        command=" ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
        date=dt.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or 'unknown'})",
        torch=torch.__version__,
        python=platform.python_version(),
        transformers=__import__("transformers").__version__,
        precision=(
            "student fp32 master weights under bf16 autocast, teacher bf16"
            if autocast
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
        shapes="small" if args.small else "anchor (Qwen2.5-0.5B <- 1.5B)",
    )

    # ----------------------------------------------------------------- Liger, if importable
    liger_loss = None
    if "liger" in wanted:
        try:
            import liger_kernel
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            liger_loss = LigerFusedLinearJSDLoss(
                weight_hard_loss=1.0 - KD_WEIGHT,
                weight_soft_loss=KD_WEIGHT * T * T,
                beta=0.0,
                temperature=T,
                compiled=liger_compiled,
                chunk_size=args.liger_chunk_size,
            )
            env["liger_kernel"] = getattr(liger_kernel, "__version__", None) or _dist_version("liger-kernel")
            env["liger_compiled"] = liger_compiled
        except Exception as exc:  # not installed, or no usable triton here
            emit(records, variant="liger", status="skipped", reason=f"liger-kernel not importable: {exc!r:.200}")
            print("liger-kernel is not installed or not importable here: the liger column is skipped", flush=True)
            wanted.remove("liger")

    # ----------------------------------------------------------------- models, inputs, config
    t0 = time.perf_counter()
    student_dtype = torch.float32 if autocast else torch.bfloat16
    teacher = build_model(shapes["teacher"], L, device, torch.bfloat16, args.seed + 1)
    teacher.eval().requires_grad_(False)
    student = build_model(shapes["student"], L, device, student_dtype, args.seed)
    student.train()
    vocab = shapes["student"]["vocab_size"]
    n_s = sum(p.numel() for p in student.parameters())  # unique tensors: a tied embedding counts once
    n_t = sum(p.numel() for p in teacher.parameters())
    flops_per_token = 6 * n_s + 2 * n_t
    initial_state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (B, L), generator=g).to(device)
    targets = ids[:, 1:].reshape(-1)
    tokens = B * (L - 1)  # target tokens per step: the loss's num_tokens, and the tokens/s numerator
    cfg = Config()
    cfg.distill.temperature = T
    cfg.distill.kd_weight = KD_WEIGHT
    cfg.distill.scale_by_t2 = True
    cfg.distill.divergence = "forward_kl"
    cfg.loss.chunk_size = args.chunk_size
    batch = Batch.from_blocks(ids)
    spec = KDSpec(kd_weight=KD_WEIGHT, divergence="forward_kl", scale_by_t2=True)
    models_bytes = torch.cuda.memory_allocated(device) if cuda else None
    emit(
        records,
        models=True,
        n_student=n_s,
        n_teacher=n_t,
        flops_per_token=flops_per_token,
        models_gib=gib(models_bytes) if cuda else None,
        build_s=round(time.perf_counter() - t0, 1),
    )

    amp = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    )
    s_body = getattr(student, student.base_model_prefix)  # Qwen2ForCausalLM.model
    t_body = getattr(teacher, teacher.base_model_prefix)

    def make_step(variant: str, opt: torch.optim.Optimizer):
        def finish(loss: torch.Tensor) -> torch.Tensor:
            loss.backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        if variant in ("full", "chunked"):
            # The trainer's own pieces: the live teacher signal and the objective of loss.impl=variant.
            signal = make_signal(variant, teacher, vocab)
            objective = Objective(spec, vocab, signal.student_output, student, args.chunk_size)

            def step() -> torch.Tensor:
                with amp():
                    parts = objective(student, batch, signal(batch, T), T, tokens)
                return finish(parts.total)
        else:

            def step() -> torch.Tensor:
                with amp():
                    with torch.no_grad():
                        th = t_body(input_ids=ids).last_hidden_state[:, :-1]
                    sh = s_body(input_ids=ids).last_hidden_state[:, :-1]
                    loss = liger_loss(
                        sh.reshape(-1, sh.shape[-1]),
                        student.get_output_embeddings().weight,
                        th.reshape(-1, th.shape[-1]),
                        teacher.get_output_embeddings().weight,
                        targets,
                    )
                return finish(loss)

        return step

    def run_variant(variant: str) -> dict:
        student.load_state_dict(initial_state)  # every variant starts from the same weights
        base_opt = make_optimizer(student, cfg)
        opt = torch.optim.AdamW(
            [{"params": grp["params"], "weight_decay": grp["weight_decay"]} for grp in base_opt.param_groups],
            lr=1e-5,
            betas=tuple(cfg.train.betas),
            fused=cuda,
        )
        del base_opt
        step = make_step(variant, opt)
        losses = []
        t_warm = time.perf_counter()
        for _ in range(warmup):  # compiles, and creates the AdamW state (part of the baseline)
            losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t_warm
        free_memory(cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(args.steps):
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
            "variant": variant,
            "status": "ok",
            "warmup_s": round(warm_s, 2),
            "step_ms": [round(t, 2) for t in times],
            "loss_first": round(float(losses[0]), 5),
            "loss_last": round(float(losses[-1]), 5),
        }
        if times:
            ms = statistics.median(times)
            tps = tokens / ms * 1e3
            rec.update(
                median_ms=round(ms, 2),
                tokens_per_s=round(tps, 1),
                mfu=round(tps * flops_per_token / (args.peak_tflops * 1e12), 4) if cuda else None,
            )
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            rec.update(baseline_gib=gib(base), peak_gib=gib(peak), peak_extra_gib=gib(peak - base))
        else:
            rec.update(peak_extra_gib=None, memory_note="not measured on a CPU (see bench_loss.py for RSS)")
        del opt, step
        return rec

    results: dict[str, dict] = {}
    for variant in [v for v in VARIANTS if v in wanted]:
        failure = None
        try:
            rec = run_variant(variant)
        except torch.cuda.OutOfMemoryError as exc:
            failure = {"variant": variant, "status": "OOM", "error": f"{exc!s:.300}"}
        except Exception as exc:  # a compiler or library failure: record it, go on
            failure = {"variant": variant, "status": "error", "error": f"{exc!r:.300}"}
        if failure is not None:  # outside the except block: the traceback no longer pins tensors
            rec = failure
            student.zero_grad(set_to_none=True)
        free_memory(cuda)
        results[variant] = emit(records, **rec)

    # ----------------------------------------------------------------- ratios and the table
    ratios: dict[str, float | None] = {}
    ch = results.get("chunked", {})
    for other in ("liger", "full"):
        o = results.get(other, {})
        ok = ch.get("status") == "ok" and o.get("status") == "ok"
        ratios[f"chunked_over_{other}_tokens_per_s"] = (
            round(ch["tokens_per_s"] / o["tokens_per_s"], 3)
            if ok and "tokens_per_s" in o and "tokens_per_s" in ch
            else None
        )
        ratios[f"chunked_over_{other}_peak_extra"] = (
            round(ch["peak_extra_gib"] / o["peak_extra_gib"], 3)
            if ok and ch.get("peak_extra_gib") and o.get("peak_extra_gib")
            else None
        )
    goals = {
        k: {"goal": v, "value": ratios.get(k), "met": None if ratios.get(k) is None or not cuda else ratios[k] >= v}
        for k, v in GOALS.items()
    }
    emit(
        records,
        ratios=ratios,
        goals=goals,
        note=None if cuda else "CPU run: timings are not the GPU figures; MFU, memory and the goals need CUDA",
    )

    print(
        f"\none KD step, {'small' if args.small else 'anchor'} shapes, B={B}, L={L}, {env['precision']}, "
        f"{env['device']}"
    )
    print(f"{'variant':8} {'median ms':>10} {'tokens/s':>10} {'MFU':>7} {'peak extra GiB':>15} {'loss (1st step)':>16}")
    for variant in VARIANTS:
        r = results.get(variant) or next((x for x in records if x.get("variant") == variant), None)
        if r is None:
            continue
        if r.get("status") != "ok":
            print(f"{variant:8} {r['status']}: {(r.get('reason') or r.get('error') or '')[:90]}")
            continue
        mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        mem = "n/a" if r.get("peak_extra_gib") is None else f"{r['peak_extra_gib']:.2f}"
        print(
            f"{variant:8} {r.get('median_ms', float('nan')):10.2f} {r.get('tokens_per_s', float('nan')):10.0f} "
            f"{mfu:>7} {mem:>15} {r['loss_first']:16.5f}"
        )
    for key in ("liger", "full"):
        tps, mem = ratios[f"chunked_over_{key}_tokens_per_s"], ratios[f"chunked_over_{key}_peak_extra"]
        goal = GOALS[f"chunked_over_{key}_tokens_per_s"]
        verdict = "" if tps is None or not cuda else ("  goal met" if tps >= goal else "  goal NOT met")
        print(
            f"chunked / {key:6} tokens/s: {'n/a' if tps is None else f'{tps:.3f}x'} (goal >= {goal}x){verdict}; "
            f"peak extra memory: {'n/a' if mem is None else f'{mem:.3f}x'}"
        )
    if not cuda:
        print("(CPU: perf_counter timing; MFU, memory and the goals are only meaningful on a GPU)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.out}")


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
