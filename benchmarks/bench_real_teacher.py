"""Distillation recipes on a real pretrained teacher (SmolLM2-135M-Instruct), at equal steps.

The teacher is the GGUF file ``benchmarks/real_teacher.py`` fetches. Every row trains the same
student, cut from the teacher (``--student-layers``, default its 15 most influential layers at
full width), on the same blocks in the same order for the same number of optimizer steps, then
reports held-out perplexity and the share of the CE-only -> teacher gap it closed, in nats:
(CE_ce-only - CE_row) / (CE_ce-only - CE_teacher).

  ce        CE only (kd_weight 0)
  recipe    the original report's recipe: kd 0.5, T annealed 2.0 -> 1.5
  kd_t1     pure KD at T = 1 (kd 1)
  cache_kd1 pure KD at T = 1 from a sampled cache (S = 12 draws per position, captured at T = 1);
            the cached run cuts the same student from the teacher's weights on disk
  kd05_t1   the recipe's kd weight (0.5) at the cache's temperature (T = 1), live teacher
  cache_kd05  the same from the sampled cache
  recipe_hidden  the original recipe plus the hidden-state term (cosine, weight 1, each student
            layer against the teacher layer it was cut from)
  gkd       the original recipe with half the steps on-policy (GKD: distill.on_policy.fraction 0.5,
            32-token prompts, 64 new tokens, reverse KL over the vocabulary)
  gkd_t1    the same at T = 1 (kd 0.5): its off-policy twin is kd05_t1, and T = 1 is the
            temperature the generations are sampled and judged at

``--cut 40m`` trains a depth-and-width cut instead (14 layers, hidden 384, MLP 1024, 6 query / 2
key-value heads: 40.9M parameters); its runs go to their own directory.

``--judge`` also scores each row's generations with ``lmdistill eval RUN --teacher T --generate``:
the student continues the first 32 tokens of every held-out block (64 new tokens, sampling
temperature 1, seed 0) and the teacher's and the student's NLL of those tokens, their difference
(the reverse KL on the student's own samples), repetition and length are added to the row.

A CPU affords few steps on a 135M teacher, so the corpus is cut to its first ``--max-tokens``
tokens (data.max_tokens; the same blocks for every row) and evaluated only at the start and the
end. The results go to ``--out`` as JSON and a markdown table on stdout.

    python benchmarks/real_teacher.py --fetch-only
    OMP_NUM_THREADS=1 python benchmarks/bench_real_teacher.py --corpus embedded --out benchmarks/results/real_embedded.json
    OMP_NUM_THREADS=1 python benchmarks/bench_real_teacher.py --corpus stdlib --out benchmarks/results/real_stdlib.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_student_init import lmdistill, stdlib_corpus
from real_teacher import fetch

VARIANTS = {
    "ce": ["--kd-weight", "0"],
    "recipe": ["--kd-weight", "0.5", "--temperature", "2.0", "--min-temperature", "1.5"],
    "kd_t1": ["--kd-weight", "1", "--temperature", "1", "--min-temperature", "1"],
    "cache_kd1": ["--kd-weight", "1", "--temperature", "1", "--min-temperature", "1"],
    "kd05_t1": ["--kd-weight", "0.5", "--temperature", "1", "--min-temperature", "1"],
    "cache_kd05": ["--kd-weight", "0.5", "--temperature", "1", "--min-temperature", "1"],
    "recipe_hidden": [
        "--kd-weight",
        "0.5",
        "--temperature",
        "2.0",
        "--min-temperature",
        "1.5",
        "--set",
        "distill.hidden.weight=1.0",
    ],
    "gkd": [
        "--kd-weight",
        "0.5",
        "--temperature",
        "2.0",
        "--min-temperature",
        "1.5",
        "--set",
        "distill.on_policy.fraction=0.5",
        "--set",
        "distill.on_policy.prompt_tokens=32",
        "--set",
        "distill.on_policy.max_new_tokens=64",
    ],
    "gkd_t1": [
        "--kd-weight",
        "0.5",
        "--temperature",
        "1",
        "--min-temperature",
        "1",
        "--set",
        "distill.on_policy.fraction=0.5",
        "--set",
        "distill.on_policy.prompt_tokens=32",
        "--set",
        "distill.on_policy.max_new_tokens=64",
    ],
}
# The students: the 15-layer depth cut at full width (81.4M parameters), and a depth-and-width cut
# (40.9M, of which 18.9M is the tied embedding).
CUTS = {
    "15": "{num_hidden_layers: 15}",
    "40m": "{num_hidden_layers: 14, hidden_size: 384, intermediate_size: 1024, num_attention_heads: 6, "
    "num_key_value_heads: 2}",
}
JUDGE = [
    "--generate",
    "--gen-prompts",
    "64",
    "--prompt-tokens",
    "32",
    "--max-new-tokens",
    "64",
    "--sample-temperature",
    "1",
    "--seed",
    "0",
    "--no-progress",
]


def summary(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval_ppl" in r]
    rates = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r]
    info = json.loads((run / "run.json").read_text())
    final = info.get("final") or {}
    return {
        "eval_ppl": evals[-1]["eval_ppl"],
        "eval_ce": evals[-1]["eval_ce_loss"],
        "eval_kl": final.get("eval_kl"),
        "top1_agreement": final.get("top1_agreement"),
        "start_ppl": evals[0]["eval_ppl"],
        "teacher_ce": evals[-1].get("teacher_ce_loss"),
        "teacher_ppl": evals[-1].get("teacher_ppl"),
        "tokens_per_s": statistics.median(rates) if rates else None,
        "steps": info.get("steps_done"),
        "student": info["student"]["name"],
        "student_params": info["student"]["params"],
        "wall_s": info.get("wall_time_s"),
    }


def finished(run: Path) -> bool:
    return (run / "run.json").is_file() and json.loads((run / "run.json").read_text())["status"] == "finished"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=["embedded", "stdlib"], default="embedded")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=130)
    parser.add_argument("--max-tokens", type=int, default=40_000)
    parser.add_argument(
        "--cut",
        choices=sorted(CUTS),
        default="15",
        help="the student: 15 = the 15-layer depth cut at full width, 40m = a depth-and-width cut of 40.9M parameters",
    )
    parser.add_argument(
        "--judge",
        action="store_true",
        help="also judge each row's generations with the "
        "teacher (lmdistill eval --generate); rows already trained are judged, not retrained",
    )
    parser.add_argument("--lr", default="3e-4")
    parser.add_argument("--work", default="/tmp/lmdistill-bench-real")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild --out and the table from the runs in --work; train nothing"
    )
    args = parser.parse_args()
    work = Path(args.work) / (args.corpus if args.cut == "15" else f"{args.corpus}-{args.cut}")
    work.mkdir(parents=True, exist_ok=True)
    teacher = str(fetch(say=lambda _: None))
    data = [] if args.corpus == "embedded" else ["--data", str(stdlib_corpus(Path(args.work)))]
    common = [
        "--teacher",
        teacher,
        *data,
        "--batch-size",
        "2",
        "--max-steps",
        str(args.steps),
        "--eval-every",
        str(args.steps),
        "--lr",
        args.lr,
        "--no-progress",
        "--set",
        f"data.max_tokens={args.max_tokens}",
        "--set",
        "data.eval_fraction=0.1",
        "--set",
        "model.student_init=teacher",
        "--set",
        f"model.student_config={CUTS[args.cut]}",
    ]
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}",
        "corpus": args.corpus,
        "cut": CUTS[args.cut],
        "steps": args.steps,
        "max_tokens": args.max_tokens,
        "lr": args.lr,
        "batch": "2 x 128 tokens",
        "rows": {},
    }
    out = Path(args.out)
    if out.is_file():  # rows of an earlier call with the same settings are kept (run a few variants at a time)
        earlier = json.loads(out.read_text())
        earlier.setdefault("cut", CUTS["15"])  # results written before --cut existed
        if all(earlier.get(k) == results[k] for k in ("corpus", "cut", "steps", "max_tokens", "lr")):
            results["rows"] = earlier["rows"]
            results.update({k: earlier[k] for k in ("cache_build_s", "cache_mib") if k in earlier})
    if args.report_only:  # the cache build's figures, from its own record
        cache = Path(args.work) / args.corpus / "cache-s12-t1"  # the teacher's, for every cut
        log = Path(args.work) / args.corpus / "cache.log"
        if (cache / "manifest.json").is_file():
            results["cache_mib"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20
        found = re.search(r"MiB, ([0-9.]+) s\)", log.read_text()) if log.is_file() else None
        if found:
            results["cache_build_s"] = float(found.group(1))
    for name in args.variants.split(","):
        run = work / name
        if args.report_only:
            if finished(run):
                results["rows"][name] = summary(run)
            continue
        extra = list(VARIANTS[name])
        if name.startswith("cache"):
            cache = Path(args.work) / args.corpus / "cache-s12-t1"  # the teacher's, for every cut
            built_before = (cache / "manifest.json").is_file()
            started = time.perf_counter()
            lmdistill(
                "cache-teacher",
                "--teacher",
                teacher,
                *data,
                "--out",
                str(cache),
                "--mode",
                "sampled",
                "--samples",
                "12",
                "--temperature",
                "1",
                "--no-progress",
                "--set",
                f"data.max_tokens={args.max_tokens}",
                "--set",
                "data.eval_fraction=0.1",
                log=Path(args.work) / args.corpus / "cache.log",
            )
            if not built_before:
                results["cache_build_s"] = round(time.perf_counter() - started, 1)
            results["cache_mib"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**20
            extra += ["--teacher-cache", str(cache)]
        if not (args.judge and finished(run)):
            print(f"{args.corpus}: {name}", flush=True)
            lmdistill("train", *common, *extra, "--output-dir", str(run), "--overwrite", log=work / f"{name}.log")
            results["rows"][name] = summary(run)
        if args.judge:
            print(f"{args.corpus}: {name}: judging generations", flush=True)
            lmdistill(
                "eval",
                str(run),
                "--teacher",
                teacher,
                *JUDGE,
                "--json",
                str(run / "judged.json"),
                log=work / f"{name}.judge.log",
            )
            judged = json.loads((run / "judged.json").read_text())
            results["rows"].setdefault(name, summary(run))["generation"] = {
                k: v for k, v in judged.items() if k.startswith("gen_") and k != "gen_samples"
            }
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    rows = results["rows"]
    t_ce = next((r["teacher_ce"] for r in rows.values() if r.get("teacher_ce") is not None), None)
    base = rows.get("ce", {}).get("eval_ce")
    print(f"\n{args.corpus}: {args.steps} steps of 2 x 128 tokens, lr {args.lr}\n")
    print(
        "| row | held-out ppl | CE nats | gap closed | KL(teacher\\|\\|student) | top-1 agreement | tokens/s |\n"
        "|---|---|---|---|---|---|---|"
    )
    if t_ce is not None:
        print(f"| teacher | {rows[next(iter(rows))]['teacher_ppl']:.2f} | {t_ce:.4f} | | 0 | 100% | |")
    for name, r in rows.items():
        # The share of the CE-only -> teacher gap closed, in nats; undefined when the CE-only student
        # is already at or past the teacher on this held-out text.
        gap = (base - r["eval_ce"]) / (base - t_ce) if base is not None and t_ce is not None and base > t_ce else None
        r["gap_closed"] = gap
        kl = "" if r.get("eval_kl") is None else f"{r['eval_kl']:.4f}"
        top1 = "" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.1%}"
        print(
            f"| {name} | {r['eval_ppl']:.2f} | {r['eval_ce']:.4f} | "
            f"{'n/a' if gap is None else f'{gap:.1%}'} | {kl} | {top1} | {r['tokens_per_s'] or 0:.0f} |"
        )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
