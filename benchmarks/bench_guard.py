"""Overhead of the step guard: the default config with guard.enabled on and off, side by side.

    python benchmarks/bench_guard.py --steps 150 --rounds 3 [--out results.json]

Runs the embedded default (the cached default teacher, a fresh half-size student, batch 2)
for ``--steps`` steps per run, alternating guard on / guard off ``--rounds`` times so that
machine noise hits both alike, and compares the median step time (from tokens_per_s in
metrics.jsonl, which times each whole optimizer step). The guard's cost is the finiteness
checks and the one all-reduce + host sync of the loss terms and gradient norm per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from lmdistill.config import Config
from lmdistill.report.metrics import read_metrics
from lmdistill.training.trainer import train


def step_times(run_dir: Path) -> list[float]:
    lines = [r for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r and not r.get("skipped")]
    return [2 * 128 / r["tokens_per_s"] for r in lines[5:]]  # batch 2 x 128 tokens; drop warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in ("on", "off"):
                cfg = Config.load(
                    Path(__file__).parents[1] / "configs" / "default.yaml",
                    [
                        f"train.max_steps={args.steps}",
                        f"run.output_dir={tmp}/{mode}-{r}",
                        f"guard.enabled={'true' if mode == 'on' else 'false'}",
                        "run.device=cpu",
                        f"train.eval_every={args.steps}",
                    ],
                )
                train(cfg, progress=False, print_summary=False)
                times[mode] += step_times(Path(tmp) / f"{mode}-{r}")
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    result = {
        "median_step_s_guard_on": on,
        "median_step_s_guard_off": off,
        "overhead": on / off - 1,
        "steps_each": len(times["on"]),
        "rounds": args.rounds,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
