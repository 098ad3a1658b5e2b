"""Distilling from a teacher cache against the live teacher, at equal steps and temperature.

Every variant is the default command (``lmdistill train --batch-size 2 --epochs 1``) with a
random-start student of the default shape (a cached run cannot cut its student out of the
teacher without loading it), the same blocks in the same order, the same number of optimizer
steps and, for each of T = 1 and T = 2, a constant KD temperature equal to the caches'
capture temperature:

  ce          CE only (kd_weight 0; no temperature)
  live@T      KD from the live teacher (forward KL, dense)
  sampled@T   KD from a sampled cache, S = 12 draws per position (random-sampled KD)
  topk@T      KD from a top-k cache, k = 12 with its tail bucket

Reported per variant: held-out perplexity, the expected calibration error (ECE: 15 equal-width
bins of the student's top probability, against whether its top token is the held-out token),
and training tokens/s (median over the logged steps); the cache builds' time and size; the
ratios sampled/ce and sampled/live of tokens/s and of perplexity, side by side in this one run.

    python benchmarks/bench_cache.py --corpus embedded --out benchmarks/results/cache_embedded.json
    python benchmarks/bench_cache.py --corpus stdlib --out benchmarks/results/cache_stdlib.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_student_init import corpus_setup, lmdistill

TEMPERATURES = (1.0, 2.0)
COMMON = [
    "train",
    "--batch-size",
    "2",
    "--epochs",
    "1",
    "--no-progress",
    "--overwrite",
    "--set",
    "model.student_init=random",
]


def constant_temperature(t: float) -> list[str]:
    return ["--set", f"distill.temperature={t}", "--set", f"distill.min_temperature={t}"]


def expected_calibration_error(run: Path, bins: int = 15) -> float:
    """ECE of the run's final student on the run's own held-out blocks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmdistill.config import Config, load_yaml
    from lmdistill.data.sources import build_block_data

    cfg = Config.from_dict(load_yaml(run / "config.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    data = build_block_data(cfg.data, tokenizer, progress=False)
    model = AutoModelForCausalLM.from_pretrained(run / "student").eval()
    conf, right = [], []
    with torch.no_grad():
        for start in range(0, len(data.eval), 8):
            batch = data.eval.batch(range(start, min(start + 8, len(data.eval))))
            probs = model(input_ids=batch.input_ids).logits[:, :-1, : len(tokenizer)].float().softmax(-1)
            top, arg = probs.max(-1)
            keep = batch.targets != -100
            conf.append(top[keep])
            right.append((arg == batch.targets)[keep].float())
    conf, right = torch.cat(conf), torch.cat(right)
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean().item() * abs(conf[inside].mean().item() - right[inside].mean().item())
    return ece


def summary(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in lines if "eval_ppl" in r][-1]
    rates = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r]
    return {
        "eval_ppl": final["eval_ppl"],
        "eval_ce": final["eval_ce_loss"],
        "teacher_ppl": final.get("teacher_ppl"),
        "steps": max(r["step"] for r in lines if "loss" in r) + 1,
        "tokens_per_s": statistics.median(rates),
        "ece": expected_calibration_error(run),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=["embedded", "stdlib"], default="embedded")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmdistill-bench-cache"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = args.work / args.corpus
    work.mkdir(parents=True, exist_ok=True)
    flags, described = corpus_setup(args.corpus, args.work)

    def flag(name: str) -> list[str]:  # ["--name", value] from the corpus's training flags, or []
        return flags[flags.index(name) : flags.index(name) + 2] if name in flags else []

    data, teacher_flag = flag("--data"), flag("--teacher")
    result = {
        "corpus": described,
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "caches": {},
        "variants": {},
    }
    variants = {"ce": [*flags, "--kd-weight", "0"]}
    for t in TEMPERATURES:
        for mode, extra in (("sampled", ["--samples", "12"]), ("topk", ["--k", "12"])):
            out = work / f"cache-{mode}@{t:g}"
            start = time.perf_counter()
            lmdistill(
                "cache-teacher",
                *teacher_flag,
                *data,
                "--out",
                str(out),
                "--mode",
                mode,
                *extra,
                "--temperature",
                str(t),
                "--no-progress",
                "--overwrite",
                log=work / f"cache-{mode}@{t:g}.log",
            )
            manifest = json.loads((out / "manifest.json").read_text())
            result["caches"][f"{mode}@{t:g}"] = {
                "seconds": time.perf_counter() - start,
                "bytes": sum(s["bytes"] for s in manifest["shards"].values()),
                "bytes_per_token": manifest["bytes_per_token"],
                "dense_fp16_per_token": 2 * manifest["vocab_size"],
            }
            variants[f"{mode}@{t:g}"] = [*data, *teacher_flag, "--teacher-cache", str(out), *constant_temperature(t)]
        variants[f"live@{t:g}"] = [*flags, *constant_temperature(t)]
    for name, extra in variants.items():
        run = work / f"run-{name}"
        print(f"{name} ...", flush=True)
        lmdistill(*COMMON, *extra, "--output-dir", str(run), log=work / f"{name}.log")
        result["variants"][name] = summary(run)
    v = result["variants"]
    result["ratios"] = {
        f"T={t:g}": {
            "sampled_vs_ce_tokens_per_s": v[f"sampled@{t:g}"]["tokens_per_s"] / v["ce"]["tokens_per_s"],
            "sampled_vs_live_tokens_per_s": v[f"sampled@{t:g}"]["tokens_per_s"] / v[f"live@{t:g}"]["tokens_per_s"],
            "sampled_ppl_vs_live": v[f"sampled@{t:g}"]["eval_ppl"] / v[f"live@{t:g}"]["eval_ppl"],
            "topk_ppl_vs_live": v[f"topk@{t:g}"]["eval_ppl"] / v[f"live@{t:g}"]["eval_ppl"],
        }
        for t in TEMPERATURES
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
