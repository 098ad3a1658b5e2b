"""LoRA students against full training from the same start, at equal optimizer steps.

Two settings, each with a CE-only row, the full student trained with the original report's
recipe (kd 0.5, T 2.0 -> 1.5), and LoRA students (model.lora.r = 16, alpha 32, every linear
layer but the output one) with the same recipe, at the full run's learning rate and at ten and
thirty times it (adapters are usually trained at a higher rate than whole weights), and at rank
64 at ten times it:

  embedded  the embedded default: its teacher, its cut student, its corpus, the original
            command's settings (batch 2, one epoch; lr 1e-3 for the full student)
  smollm2   SmolLM2-135M-Instruct (``benchmarks/real_teacher.py``) and its 15-layer cut on the
            embedded corpus: the real-teacher table's settings (130 steps of 2 x 128 tokens,
            lr 3e-4, the corpus cut to 40,000 tokens), docs/real-teacher.md

Every row is its own process, so each one's peak resident memory (``ru_maxrss`` from
``os.wait4``) is its own. Per row: held-out perplexity, trained parameters (run.json), the
optimizer's state in bytes (the tensors of the final checkpoint's ``optimizer.pt``), peak RSS and
wall time. The JSON goes to ``--out``; a markdown table to stdout.

    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py --setting embedded --out benchmarks/results/lora_embedded.json
    OMP_NUM_THREADS=1 python benchmarks/bench_lora.py --setting smollm2 --out benchmarks/results/lora_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_teacher import fetch

RECIPE = ["--kd-weight", "0.5", "--temperature", "2.0", "--min-temperature", "1.5"]
LORA = ["--set", "model.lora={r: 16, alpha: 32}"]
SETTINGS = {
    "embedded": {"lr": 1e-3, "common": ["--batch-size", "2", "--epochs", "1", "--no-progress"]},
    "smollm2": {
        "lr": 3e-4,
        "common": [
            "--batch-size",
            "2",
            "--max-steps",
            "130",
            "--eval-every",
            "130",
            "--no-progress",
            "--set",
            "data.max_tokens=40000",
            "--set",
            "data.eval_fraction=0.1",
            "--set",
            "model.student_init=teacher",
            "--set",
            "model.student_config={num_hidden_layers: 15}",
        ],
    },
}


def rows(lr: float) -> dict[str, list[str]]:
    return {
        "ce": ["--kd-weight", "0", "--lr", str(lr)],
        "full": [*RECIPE, "--lr", str(lr)],
        "lora": [*RECIPE, *LORA, "--lr", str(lr)],
        "lora_lr10": [*RECIPE, *LORA, "--lr", str(10 * lr)],
        "lora_lr30": [*RECIPE, *LORA, "--lr", str(30 * lr)],
        # four times the rank, at the better of the rates above: is the rank what holds LoRA back?
        "lora_r64_lr10": [*RECIPE, "--set", "model.lora={r: 64, alpha: 128}", "--lr", str(10 * lr)],
    }


def run_measured(args: list[str], log: Path) -> dict:
    """``lmdistill ARGS`` in a child process: its wall time and peak resident memory."""
    started = time.perf_counter()
    with open(log, "w") as f:
        child = subprocess.Popen([sys.executable, "-m", "lmdistill", *args], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"lmdistill {' '.join(args)} failed; see {log}")
    # ru_maxrss is in KiB on Linux
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def optimizer_bytes(run: Path) -> int:
    newest = max((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    state = torch.load(newest / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
    return sum(t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t))


def summary(run: Path) -> dict:
    info = json.loads((run / "run.json").read_text())
    final, student = info["final"], info["student"]
    return {
        "eval_ppl": final["eval_ppl"],
        "teacher_ppl": final.get("teacher_ppl"),
        "draft_acceptance": final.get("draft_acceptance"),
        "params": student["params"],
        "trained_params": student["trained_params"],
        "trained_share": student["trained_params"] / student["params"],
        "optimizer_bytes": optimizer_bytes(run),
        "steps": info["steps_done"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="embedded")
    parser.add_argument("--rows", default="ce,full,lora,lora_lr10,lora_lr30,lora_r64_lr10")
    parser.add_argument("--work", default="/tmp/lmdistill-bench-lora")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    work = Path(args.work) / args.setting
    work.mkdir(parents=True, exist_ok=True)
    teacher = ["--teacher", str(fetch(say=lambda _: None))] if args.setting == "smollm2" else []
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update(
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch threads {os.environ.get('OMP_NUM_THREADS')}",
        setting=args.setting,
        lr=setting["lr"],
        lora="r 16, alpha 32, every linear layer but the output layer",
    )
    results.setdefault("rows", {})
    variants = rows(setting["lr"])
    for name in args.rows.split(","):
        run = work / name
        print(f"{args.setting}: {name}", flush=True)
        cmd = ["train", *teacher, *setting["common"], *variants[name], "--output-dir", str(run), "--overwrite"]
        measured = run_measured([*cmd, "--set", "checkpoint.keep=1"], work / f"{name}.log")
        results["rows"][name] = {**summary(run), **measured, "lr": float(variants[name][-1])}
        out.write_text(json.dumps(results, indent=2) + "\n")
    table(results)


def table(results: dict) -> None:
    rows = results["rows"]
    teacher = next(r["teacher_ppl"] for r in rows.values() if r.get("teacher_ppl"))
    full = rows.get("full", {}).get("eval_ppl")
    print(f"\n{results['setting']}: teacher held-out perplexity {teacher:.2f}\n")
    print(
        "| row | lr | held-out ppl | vs full | trained params | share | optimizer state | peak RSS | wall |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for name, r in rows.items():
        versus = f"{r['eval_ppl'] / full - 1:+.1%}" if full else ""
        print(
            f"| {name} | {r['lr']:g} | {r['eval_ppl']:.2f} | {versus} | {r['trained_params']:,} | "
            f"{r['trained_share']:.2%} | {r['optimizer_bytes'] / 2**20:.1f} MiB | {r['peak_rss_mib']:.0f} MiB | "
            f"{r['wall_s']:.0f} s |"
        )


if __name__ == "__main__":
    main()
