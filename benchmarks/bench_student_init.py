"""Student initialisation: a random student against one cut out of the teacher, with and
without the hidden-state term, and the recipe knobs (kd_weight, temperature), at equal steps.

Every variant is the default command (``lmdistill train --batch-size 2 --epochs 1``) with a few
config keys set, so every student has the default shape (half the teacher), sees the same
blocks in the same order and takes the same number of optimizer steps. The figure is the
held-out cross-entropy of the final student, and the share of the gap between the random-start
KD student and the teacher that a variant closes:
``(CE_kd_random - CE_variant) / (CE_kd_random - CE_teacher)``.

Corpora:
  embedded  the embedded default (CPython's reference documentation) and its default teacher;
  stdlib    the standard library's own top-level modules (Python source, ~465 KB like the
            embedded corpus), with a teacher made by training the default teacher on it
            (plain LM training, kd_weight 0) first; a different domain from the first.

    python benchmarks/bench_student_init.py --corpus embedded --out student_init_embedded.json
    python benchmarks/bench_student_init.py --corpus stdlib --out student_init_stdlib.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

PRUNED = ["model.student_init=teacher"]
RANDOM = ["model.student_init=random"]
T1 = ["distill.temperature=1.0", "distill.min_temperature=1.0"]
HIDDEN = ["distill.hidden.weight=1.0"]

# name -> (description, config overrides)
VARIANTS = {
    "ce_random": ("CE only, random start", RANDOM + ["distill.kd_weight=0"]),
    "ce_pruned": ("CE only, cut from the teacher (importance)", PRUNED + ["distill.kd_weight=0"]),
    "kd_random": ("KD, random start (the original default)", RANDOM),
    "kd_uniform": ("KD, cut from the teacher: uniform layers", PRUNED + ["model.prune.layers=uniform"]),
    "kd_importance": ("KD, cut from the teacher: importance layers", PRUNED),
    "kd_importance_first": ("KD, importance layers, first channels", PRUNED + ["model.prune.width=first"]),
    "kd_uniform_hidden": ("KD + hidden (cosine), uniform layers", PRUNED + ["model.prune.layers=uniform"] + HIDDEN),
    "kd_importance_hidden": ("KD + hidden (cosine), importance layers", PRUNED + HIDDEN),
    "kd_importance_hidden_mse": ("KD + hidden (mse), importance layers", PRUNED + HIDDEN + ["distill.hidden.loss=mse"]),
    "kd1_importance": ("pure KD (kd_weight 1), importance", PRUNED + ["distill.kd_weight=1.0"]),
    "kd_t1_importance": ("KD at T = 1, importance", PRUNED + T1),
    "kd1_t1_importance": ("pure KD at T = 1, importance", PRUNED + T1 + ["distill.kd_weight=1.0"]),
    "kd1_t1_random": ("pure KD at T = 1, random start", RANDOM + T1 + ["distill.kd_weight=1.0"]),
}


def lmdistill(*args: str, log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "lmdistill", *args], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"lmdistill {' '.join(args)} failed with exit code {proc.returncode}; see {log}")


def stdlib_corpus(work: Path) -> Path:
    """The standard library's top-level modules in name order, up to ~465 KB, one .txt each."""
    out = work / "stdlib-corpus"
    if out.is_dir():
        return out
    tmp = work / "stdlib-corpus.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        (tmp / f"{path.stem}.txt").write_text(text, encoding="utf-8")
        total += len(text)
        if total >= 465_000:
            break
    tmp.rename(out)
    return out


def corpus_setup(corpus: str, work: Path) -> tuple[list[str], dict]:
    """The training flags of a corpus (its data and teacher) and a description."""
    if corpus == "embedded":
        return [], {"data": "embedded default (pydoc_data)", "teacher": "the embedded default teacher"}
    data = stdlib_corpus(work)
    teacher_run = work / "stdlib-teacher"
    if not (teacher_run / "student" / "config.json").is_file():
        from lmdistill.default import ensure_default_teacher

        base = ensure_default_teacher()
        print(f"training the stdlib teacher from the default teacher ({teacher_run})", flush=True)
        lmdistill(
            "train",
            "--student",
            str(base),
            "--teacher",
            str(base),
            "--data",
            str(data),
            "--kd-weight",
            "0",
            "--batch-size",
            "16",
            "--epochs",
            "3",
            "--lr",
            "1e-3",
            "--output-dir",
            str(teacher_run),
            "--overwrite",
            "--no-progress",
            "--set",
            "train.warmup_steps=20",
            log=work / "stdlib-teacher.log",
        )
    return (
        ["--data", str(data), "--teacher", str(teacher_run / "student")],
        {
            "data": f"CPython {platform.python_version()} stdlib top-level modules ({data})",
            "teacher": "the default teacher trained 3 epochs on this corpus (kd_weight 0)",
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=["embedded", "stdlib"], default="embedded")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS)
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="run.seed of every run (data order; pruning does not depend on it)"
    )
    parser.add_argument("--work", default="bench-student-init", help="directory for the runs")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    flags, about = corpus_setup(args.corpus, work)
    rows = []
    for name in names:
        description, overrides = VARIANTS[name]
        tag = f"{args.corpus}-{name}" + (f"-seed{args.seed}" if args.seed else "")
        run = work / tag
        sets = [x for o in overrides for x in ("--set", o)]
        started = time.perf_counter()
        lmdistill(
            "train",
            "--batch-size",
            "2",
            "--epochs",
            "1",
            "--seed",
            str(args.seed),
            "--output-dir",
            str(run),
            "--overwrite",
            "--no-progress",
            *flags,
            *sets,
            log=work / f"{tag}.log",
        )
        info = json.loads((run / "run.json").read_text())
        final = info["final"]
        rows.append(
            {
                "variant": name,
                "description": description,
                "overrides": overrides,
                "student": info["student"].get("name"),
                "steps": final["steps"],
                "eval_ce": final["eval_ce_loss"],
                "eval_ppl": final["eval_ppl"],
                "teacher_ce": final["teacher_ce_loss"],
                "teacher_ppl": final["teacher_ppl"],
                "top1": final["top1_agreement"],
                "kl": final["eval_kl"],
                "initial_ppl": info["initial"]["eval_ppl"],
                "health": info["health_verdict"],
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
        print(
            f"{name:26s} ppl {final['eval_ppl']:8.1f}  CE {final['eval_ce_loss']:.4f}  ({info['health_verdict']})",
            flush=True,
        )
    base = next((r for r in rows if r["variant"] == "kd_random"), None)
    for r in rows:
        if base is not None:
            gap = base["eval_ce"] - r["teacher_ce"]
            r["gap_closed"] = (base["eval_ce"] - r["eval_ce"]) / gap if gap > 0 else None
    print("\n| variant | held-out ppl | CE | gap closed vs KD random | top-1 | health |\n|---|---|---|---|---|---|")
    print(f"| teacher | {rows[0]['teacher_ppl']:.1f} | {rows[0]['teacher_ce']:.4f} | | | |")
    for r in rows:
        gap = f"{r['gap_closed']:.0%}" if r.get("gap_closed") is not None else ""
        print(
            f"| {r['description']} | {r['eval_ppl']:.1f} | {r['eval_ce']:.4f} | {gap} | {r['top1']:.1%} | "
            f"{r['health']} |"
        )
    if args.out:
        meta = {
            "corpus": args.corpus,
            "seed": args.seed,
            **about,
            "command": "lmdistill train --batch-size 2 --epochs 1 + overrides",
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
