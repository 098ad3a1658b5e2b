"""Time to the first optimizer step with a GGUF teacher: the first start (which converts the
file) against the second (which loads the converted directory).

Both starts run the same command in the same fresh ``LMDISTILL_HOME``, so the data store
is built by the first start and found by the second as well, as for any user:

    lmdistill train --teacher SmolLM2-135M-Instruct.Q4_1.gguf --max-steps 1 ...

The time to the first step is measured from the process start to the first training line
in metrics.jsonl (polled every 0.1 s). It includes what both starts do alike (the evaluation
before the first step, the pruning's calibration pass), so the model's own start is measured
apart too: a fresh process that resolves the GGUF teacher (converting it or finding the
conversion) and loads its tokenizer and weights, in another fresh ``LMDISTILL_HOME``.

    python benchmarks/real_teacher.py --fetch-only
    python benchmarks/bench_gguf_start.py --out benchmarks/results/gguf_start.json

It also prices the original command (``python train.py --batch-size 2 --epochs 1``) with this
teacher as the embedded default, from the measured parts: the second start's time to its first
step, the median time of a step (2 x 128 tokens, the 15-layer cut student), and the time of one
evaluation (``lmdistill eval RUN --teacher FILE``, the held-out split, whole command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_teacher import fetch

STEPS = 6  # the second start runs a few steps more, for the time of one step


def time_to_first_step(gguf: Path, home: Path, run: Path, steps: int = 1) -> tuple[float, float]:
    """(seconds to the first logged step, seconds of the whole command)."""
    env = {**os.environ, "LMDISTILL_HOME": str(home)}
    cmd = [
        sys.executable,
        "-m",
        "lmdistill",
        "train",
        "--teacher",
        str(gguf),
        "--max-steps",
        str(steps),
        "--eval-every",
        "100",
        "--batch-size",
        "2",
        "--no-progress",
        "--output-dir",
        str(run),
        "--overwrite",
        "--set",
        "model.student_config={num_hidden_layers: 15}",
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    metrics = run / "metrics.jsonl"
    while proc.poll() is None:
        if first is None and metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            first = time.perf_counter() - started
        time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"the run failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    total = time.perf_counter() - started
    return (first if first is not None else total), total


LOAD = """
import sys, time
started = time.perf_counter()
import torch
from lmdistill.models.loading import load_causal_lm, load_tokenizer, resolve_source
source = resolve_source(sys.argv[1], "teacher")
load_tokenizer(source)
load_causal_lm(source, "teacher", torch.float32)
print(time.perf_counter() - started)
"""


def time_to_model(gguf: Path, home: Path) -> float:
    """Seconds for a fresh process to have the teacher's tokenizer and weights (imports excluded)."""
    env = {**os.environ, "LMDISTILL_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", LOAD, str(gguf)], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    gguf = fetch()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        first = time_to_first_step(gguf, home, Path(tmp) / "run1")
        second = time_to_first_step(gguf, home, Path(tmp) / "run2", steps=STEPS)
        lines = [json.loads(x) for x in (Path(tmp) / "run2" / "metrics.jsonl").read_text().splitlines()]
        step_s = statistics.median(256 / r["tokens_per_s"] for r in lines if r.get("tokens_per_s"))
        started = time.perf_counter()  # one evaluation of the held-out split, teacher included
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lmdistill",
                "eval",
                str(Path(tmp) / "run2"),
                "--teacher",
                str(gguf),
                "--no-progress",
            ],
            env={**os.environ, "LMDISTILL_HOME": str(home)},
            check=True,
            capture_output=True,
        )
        eval_s = time.perf_counter() - started
        model_first = time_to_model(gguf, Path(tmp) / "home-load")
        model_second = time_to_model(gguf, Path(tmp) / "home-load")
    # The original command with this teacher: one epoch of the embedded corpus (839 training blocks
    # of 128 tokens, batch 2: 420 steps) and about 11 evaluations (at the start, every 42 steps, at the end).
    epoch_steps, evals = 420, 11
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}",
        "first_start": {"to_first_step_s": round(first[0], 1), "command_s": round(first[1], 1)},
        "second_start": {"to_first_step_s": round(second[0], 1), "command_s": round(second[1], 1)},
        "ratio_to_first_step": round(first[0] / second[0], 2),
        "teacher_ready": {
            "first_s": round(model_first, 1),
            "second_s": round(model_second, 1),
            "ratio": round(model_first / model_second, 2),
        },
        "step_s": round(step_s, 2),
        "eval_command_s": round(eval_s, 1),
        "original_command_estimate_s": round(second[0] + epoch_steps * step_s + (evals - 1) * eval_s),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
