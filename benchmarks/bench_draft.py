"""Students of the real teacher as its draft models: speculative decoding measured on this CPU.

For students already trained by ``bench_real_teacher.py`` (CE only, the original recipe, pure KD
and GKD, each a cut of SmolLM2-135M-Instruct), ``lmdistill eval RUN --draft-for TEACHER`` on the
run's held-out blocks: the expected acceptance of speculative sampling, then transformers'
assisted generation on 8 held-out prompts of 32 tokens (64 new tokens, greedy and sampled at
T = 1, the median of 3 timed passes, the teacher alone timed in the same process): draft tokens
accepted per teacher forward, draft forwards per teacher forward, the draft's cost per token
relative to the teacher's, and the wall-clock speedup.

The speedup is explained from those measurements: a teacher forward that keeps a tokens writes
a + 1 tokens and costs one verification forward plus d draft forwards of relative cost c, so
with a verification forward as cheap as one decoding step the speedup would be
(a + 1) / (1 + d c); the gap to the measured speedup is what verifying several tokens at once
costs more than one on this CPU.

    python benchmarks/bench_draft.py --out benchmarks/results/real_drafting.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_teacher import fetch

ROWS = ("ce", "recipe", "kd_t1", "gkd")
FLAGS = ["--gen-prompts", "8", "--prompt-tokens", "32", "--max-new-tokens", "64", "--repeats", "3", "--no-progress"]


def measure(run: Path, teacher: str, log: Path) -> dict:
    out = run / "drafting.json"
    with open(log, "w") as f:
        cmd = [sys.executable, "-m", "lmdistill", "eval", str(run), "--draft-for", teacher, *FLAGS, "--json", str(out)]
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"lmdistill eval {run} failed; see {log}")
    result = json.loads(out.read_text())
    for mode in ("greedy", "sampled"):
        a, d = result[f"draft_{mode}_accepted_per_forward"], result[f"draft_{mode}_draft_forwards_per_teacher_forward"]
        result[f"draft_{mode}_speedup_if_verifying_were_free"] = (a + 1) / (1 + d * result["draft_cost"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/lmdistill-bench-real")
    parser.add_argument("--cuts", default="embedded,embedded-40m", help="bench_real_teacher.py's work directories")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    teacher = str(fetch(say=lambda _: None))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"cuts": {}}
    results["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, torch threads {os.environ.get('OMP_NUM_THREADS')}"
    )
    results["settings"] = " ".join(FLAGS)
    for cut in args.cuts.split(","):
        for name in args.rows.split(","):
            run = Path(args.work) / cut / name
            if not (run / "student" / "config.json").is_file():
                print(f"{cut}/{name}: no trained student at {run}; run bench_real_teacher.py first", flush=True)
                continue
            print(f"{cut}: {name}", flush=True)
            row = measure(run, teacher, Path(args.work) / cut / f"{name}.drafting.log")
            results["cuts"].setdefault(cut, {})[name] = {k: v for k, v in row.items() if k.startswith("draft")}
            out.write_text(json.dumps(results, indent=2) + "\n")
    table(results)


def table(results: dict) -> None:
    print(
        "| cut | row | expected acceptance | greedy: accepted / forward | speedup | sampled: accepted / forward "
        "| speedup | draft cost | free-verification speedup, greedy / sampled |\n|---|---|---|---|---|---|---|---|---|"
    )
    for cut, rows in results["cuts"].items():
        for name, r in rows.items():
            print(
                f"| {cut} | {name} | {r['draft_acceptance']:.1%} | {r['draft_greedy_accepted_per_forward']:.2f} | "
                f"{r['draft_greedy_speedup']:.2f}x | {r['draft_sampled_accepted_per_forward']:.2f} | "
                f"{r['draft_sampled_speedup']:.2f}x | {r['draft_cost']:.2f} | "
                f"{r['draft_greedy_speedup_if_verifying_were_free']:.2f}x / "
                f"{r['draft_sampled_speedup_if_verifying_were_free']:.2f}x |"
            )


if __name__ == "__main__":
    main()
