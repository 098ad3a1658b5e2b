"""CPU, one KD training step: lmdistill's trainer against a plain PyTorch loop and TRL's GKDTrainer.

    python benchmarks/bench_step_cpu.py --out step_cpu.json                 # about 10 minutes on 2 cores
    python benchmarks/bench_step_cpu.py --precisions bf16 --rounds 5

Shapes: a Llama-shaped teacher (hidden 384, 6 layers) and student (hidden 192, 3 layers), a
4096-token byte-level BPE vocabulary trained on the embedded corpus, B = 8 sequences of
L = 256 tokens, one process. Every variant starts from the same saved weights and sees
blocks of the same corpus.

Variants, each in a fresh process:
  plain              a bare loop written here: teacher forward without gradients, student
                     forward, forward KL at T = 1 (``F.kl_div`` on fp32 log-softmaxes, mean over
                     positions), backward, AdamW step. No CE term, no clipping, no checks.
  trl                TRL's GKDTrainer with lmbda = 0 and beta = 0 (off-policy forward KL at
                     T = 1); skipped with a message when ``trl`` is not importable. Install it in
                     a separate environment: it is not an lmdistill dependency.
  lmdistill-full     ``lmdistill train`` with its defaults (KD x T^2 + CE, T annealed 2.0 -> 1.5,
                     gradient clipping, the non-finite guard, metrics and TensorBoard every
                     step), ``loss.impl=full``;
  lmdistill-chunked  the same with ``loss.impl=chunked``.
So lmdistill does more work per step than the plain loop (a CE term, a temperature, clipping,
a guard); a ratio of 1.0 means its extra work is paid for by a leaner step.

The figure per run is the median step time over the steps after ``--warmup``: for lmdistill
from its metrics.jsonl (``tokens_per_s`` = B * L / step time), for the others timed around
each step. tokens/s below = B * (L - 1) / median step time. The machine is noisy: variants
run in alternating order for ``--rounds`` rounds, and the reported figure of a variant is the
median over its rounds; ratios are taken between those medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

B, L, V = 8, 256, 4096
SHAPES = {"teacher": (384, 6, 0), "student": (192, 3, 1)}  # hidden, layers, init seed


def build_models(out: Path) -> None:
    """The corpus as one text file, a 4096-token tokenizer and the two models, saved once."""
    if (out / "student" / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmdistill.data.sources import embedded_corpus_texts
    from lmdistill.default import train_tokenizer

    texts = embedded_corpus_texts()
    (out / "corpus.txt").write_text("\n\n".join(texts))
    tokenizer = train_tokenizer(texts, V)
    for name, (hidden, layers, seed) in SHAPES.items():
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            max_position_embeddings=1024,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)


# --------------------------------------------------------------------------- one variant, in a child
def _batches(out: Path, steps: int):
    """``steps`` batches of B x L token ids, consecutive blocks of the tokenized corpus."""
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out / "student")((out / "corpus.txt").read_text()).input_ids
    blocks = torch.tensor(ids[: (len(ids) // L) * L]).view(-1, L)
    return [blocks[(i * B) % (len(blocks) - B) :][:B] for i in range(steps)]


def run_plain(out: Path, bf16: bool, steps: int) -> list[float]:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    times = []
    for ids in _batches(out, steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t_logits = teacher(ids).logits[:, :-1]
            s_logits = student(ids).logits[:, :-1]
        log_p = F.log_softmax(s_logits.float(), dim=-1)
        log_q = F.log_softmax(t_logits.float(), dim=-1)
        loss = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def run_trl(out: Path, bf16: bool, steps: int) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    rows = [{"input_ids": row.tolist()} for ids in _batches(out, steps) for row in ids]

    def collate(items):
        ids = torch.tensor([item["input_ids"] for item in items])
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids.clone(),
            "prompts": ids[:, :1],
            "prompt_attention_mask": torch.ones_like(ids[:, :1]),
        }

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)

    args = GKDConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=B,
        max_steps=steps,
        lmbda=0.0,
        beta=0.0,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        max_length=L,
        seq_kd=False,
        remove_unused_columns=False,
        bf16=bf16,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(out / "student"),
        data_collator=collate,
        callbacks=[StepTimer()],
    )
    trainer.train()
    return times


def run_lmdistill(out: Path, bf16: bool, steps: int, impl: str) -> list[float]:
    from lmdistill.cli import main

    run_dir = out / f"run-{impl}-{'bf16' if bf16 else 'fp32'}"
    code = main(
        [
            "train",
            "--teacher",
            str(out / "teacher"),
            "--student",
            str(out / "student"),
            "--data",
            str(out / "corpus.txt"),
            "--batch-size",
            str(B),
            "--set",
            f"data.block_size={L}",
            "--max-steps",
            str(steps),
            "--eval-every",
            "100000",
            "--set",
            "data.max_eval_blocks=2",
            "--mixed-precision",
            "bf16" if bf16 else "no",
            "--set",
            f"loss.impl={impl}",
            "--device",
            "cpu",
            "--no-progress",
            "--overwrite",
            "--output-dir",
            str(run_dir),
        ]
    )
    if code != 0:
        raise SystemExit(code)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [B * L / r["tokens_per_s"] for r in lines if "tokens_per_s" in r and not r.get("skipped")]


def child(variant: str, out: Path, precision: str, steps: int, warmup: int) -> None:
    bf16 = precision == "bf16"
    if variant == "trl":
        try:
            import trl  # noqa: F401
        except ImportError as exc:
            print(json.dumps({"skipped": f"trl not importable ({exc})"}))
            return
    runner = {
        "plain": run_plain,
        "trl": run_trl,
        "lmdistill-full": lambda o, b, s: run_lmdistill(o, b, s, "full"),
        "lmdistill-chunked": lambda o, b, s: run_lmdistill(o, b, s, "chunked"),
    }[variant]
    times = runner(out, bf16, steps)[warmup:]
    print(json.dumps({"median_step_s": statistics.median(times), "steps_timed": len(times)}))


# --------------------------------------------------------------------------- the parent
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="plain,trl,lmdistill-full,lmdistill-chunked")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default=None, help="where models and runs go (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.workdir or tempfile.mkdtemp(prefix="bench-step-cpu-"))
    if args.child:
        child(args.child[0], out, args.child[1], args.steps, args.warmup)
        return
    out.mkdir(parents=True, exist_ok=True)
    build_models(out)
    variants, results = args.variants.split(","), {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    for precision in args.precisions.split(","):
        per_variant: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for variant in order:
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--workdir",
                        str(out),
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--child",
                        variant,
                        precision,
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("{")), None)
                record = json.loads(line) if line else {"error": proc.stderr[-600:]}
                if "median_step_s" in record:
                    per_variant[variant].append(record["median_step_s"])
                else:
                    print(f"{precision} {variant}: {record}")
                print(f"{precision} round {r + 1} {variant}: {record}", flush=True)
        results[precision] = {
            v: {
                "rounds_s": s,
                "median_step_s": statistics.median(s),
                "tokens_per_s": B * (L - 1) / statistics.median(s),
            }
            for v, s in per_variant.items()
            if s
        }
    report(results, args)


def report(results: dict, args) -> None:
    print(
        f"\nCPU step benchmark, B={B} L={L} V={V}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    )
    print(f"{'precision':<10}{'variant':<20}{'tokens/s':>10}{'vs plain':>10}{'vs trl':>10}")
    for precision, variants in results.items():
        for name, r in variants.items():
            ratios = [
                f"{r['tokens_per_s'] / variants[base]['tokens_per_s']:.3f}x" if base in variants else "n/a"
                for base in ("plain", "trl")
            ]
            print(f"{precision:<10}{name:<20}{r['tokens_per_s']:>10.0f}{ratios[0]:>10}{ratios[1]:>10}")
    if args.out:
        import torch

        Path(args.out).write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "date": dt.datetime.now().isoformat(timespec="seconds"),
                    "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch": torch.__version__},
                    "shape": {"B": B, "L": L, "V": V, **SHAPES},
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
