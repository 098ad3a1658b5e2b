"""On-policy distillation against off-policy KD on the embedded default, at equal steps.

Every variant is the default command (``lmdistill train --batch-size 2 --epochs 1``: the
student cut out of the default teacher, the temperature annealed from 2.0 to 1.5) with:

  off         off-policy forward KL (today's default run)
  on          every step on-policy, reverse KL over the vocabulary (distill.on_policy.fraction 1)
  gkd         half the steps on-policy (fraction 0.5), the others off-policy forward KL
  on-token    every step on-policy, the sampled-token estimator (loss sampled_token)

Each final student then continues the same held-out prompts (the first 32 tokens of up to 64
held-out blocks: all 44 of the embedded default; 64 new tokens, sampling temperature 1, the
same seed); the teacher's NLL per written token is the teacher-judged score. Also: held-out perplexity, the share of step time spent generating
on on-policy steps, and the generation throughput of one student with and without the KV
cache (``generate(use_cache=...)``), side by side, for 64 and 256 new tokens.

    python benchmarks/bench_on_policy.py --out benchmarks/results/on_policy_embedded.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

COMMON = ["train", "--batch-size", "2", "--epochs", "1", "--no-progress", "--overwrite"]
ON = ["--set", "distill.on_policy.prompt_tokens=32", "--set", "distill.on_policy.max_new_tokens=64"]
VARIANTS = {
    "off": [],
    "on": [*ON, "--set", "distill.on_policy.fraction=1"],
    "gkd": [*ON, "--set", "distill.on_policy.fraction=0.5"],
    "on-token": [*ON, "--set", "distill.on_policy.fraction=1", "--set", "distill.on_policy.loss=sampled_token"],
}


def lmdistill(*args: str, log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "lmdistill", *args], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"lmdistill {' '.join(args)} failed with exit code {proc.returncode}; see {log}")


def judged(run: Path, prompts: int, seed: int) -> dict:
    """The final student's continuations of the first ``prompts`` held-out blocks, judged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmdistill.config import Config, load_yaml
    from lmdistill.data.sources import build_block_data
    from lmdistill.teacher.generation import Sampling
    from lmdistill.teacher.judge import generation_quality

    cfg = Config.from_dict(load_yaml(run / "config.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    data = build_block_data(cfg.data, tokenizer, progress=False)
    student = AutoModelForCausalLM.from_pretrained(run / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(cfg.model.teacher).eval()
    heads = data.eval.batch(range(min(prompts, len(data.eval)))).input_ids[:, :32]
    scores, _ = generation_quality(
        student,
        teacher,
        heads,
        Sampling(max_new_tokens=64),
        seed,
        tokenizer.eos_token_id,
        tokenizer.eos_token_id,
        len(tokenizer),
    )
    return {**scores, "judged_prompts": len(heads)}


def cache_speedup(run: Path, rows: int = 8, new_tokens: int = 128, repeats: int = 3) -> dict:
    """Generation tokens/s of one student with and without the KV cache, alternated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmdistill.teacher.generation import HFGenerator, Sampling

    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    student = AutoModelForCausalLM.from_pretrained(run / "student").eval()
    # no EOS: every row writes all new_tokens, so both arms do the same work
    generator = HFGenerator(student, eos_token_id=-1, pad_token_id=tokenizer.eos_token_id)
    prompts = torch.randint(0, len(tokenizer), (rows, 32), generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {"cache": [], "no_cache": []}
    for r in range(repeats):
        for arm in ("cache", "no_cache"):
            start = time.perf_counter()
            out = generator(prompts, Sampling(max_new_tokens=new_tokens), seed=r, use_cache=arm == "cache")
            rates[arm].append((out.shape[1] - 32) * rows / (time.perf_counter() - start))
    cached, plain = statistics.median(rates["cache"]), statistics.median(rates["no_cache"])
    return {
        "rows": rows,
        "prompt_tokens": 32,
        "new_tokens": new_tokens,
        "cache_tokens_per_s": cached,
        "no_cache_tokens_per_s": plain,
        "ratio": cached / plain,
    }


def summary(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r and not r.get("skipped")]
    on = [r for r in train if r.get("on_policy")]
    final = [r for r in lines if "eval_ppl" in r][-1]
    out = {
        "steps": len(train),
        "on_policy_steps": len(on),
        "eval_ppl": final["eval_ppl"],
        "teacher_ppl": final.get("teacher_ppl"),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
    }
    if on:
        out.update(
            generation_share=statistics.median(r["generation_share"] for r in on),
            generation_tokens_per_s=statistics.median(r["generation_tokens_per_s"] for r in on),
            mean_generated_length=statistics.mean(r["mean_generated_length"] for r in on),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmdistill-bench-on-policy"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=None, help="shorter runs (a smoke test)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    result = {
        "corpus": "embedded default (pydoc_data), the default teacher and student",
        "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "variants": {},
    }
    for name, extra in VARIANTS.items():
        run = args.work / f"run-{name}"
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        lmdistill(*COMMON, *steps, *extra, "--output-dir", str(run), log=args.work / f"{name}.log")
        result["variants"][name] = {
            **summary(run),
            "wall_seconds": time.perf_counter() - start,
            **judged(run, args.prompts, seed=1234),
        }
    v = result["variants"]
    result["ratios"] = {
        "on_teacher_nll_vs_off": v["on"]["gen_teacher_nll"] / v["off"]["gen_teacher_nll"],
        "on_token_teacher_nll_vs_off": v["on-token"]["gen_teacher_nll"] / v["off"]["gen_teacher_nll"],
        "gkd_ppl_vs_off": v["gkd"]["eval_ppl"] / v["off"]["eval_ppl"],
    }
    result["kv_cache"] = [cache_speedup(args.work / "run-off", new_tokens=n) for n in (64, 256)]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
