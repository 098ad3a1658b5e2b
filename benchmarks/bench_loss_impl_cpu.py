"""Which loss path is faster on this CPU: the trainer's ``full`` or ``chunked`` KD loss, by shape.

    OMP_NUM_THREADS=2 python benchmarks/bench_loss_impl_cpu.py --out benchmarks/results/loss_impl_cpu.json

``loss.impl: auto`` must pick the path that fits in memory and, where both fit, the faster one.
This measures the part of a training step the two paths differ in, from the final hidden states
of both models to the gradients of the student's hidden states and output layer, forward and
backward, exactly as the objective calls them:

  full     the student's logits h @ W.T (autograd through the output layer, as a model's
           forward makes them), the teacher's without grad, then
           ``chunked.fused_logits_distillation_loss`` (closed-form gradient);
  chunked  ``chunked.fused_linear_distillation_loss`` from the hidden states (never all logits).

KD x T^2 + CE at kd 0.5, T = 2, forward KL, every position a target (packed text). Shapes: the
tokens of a micro-batch (batch x (block - 1)) against the vocabulary, with hidden sizes of the
default teacher's shape (student 192, teacher 384); fp32 and bf16 autocast. The variants run
alternately in one process, ``--repeats`` times each after a warm-up, one after the other per
repeat, so that a noisy neighbour hurts both alike; the figure is the median, and the ratio is
full's time over chunked's (above 1: chunked is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time

import torch

from lmdistill.loss.chunked import fused_linear_distillation_loss, fused_logits_distillation_loss

SHAPES = [  # (tokens per micro-batch, vocabulary)
    (510, 4096),
    (1020, 4096),
    (2040, 4096),
    (4080, 4096),
    (2040, 8192),
    (2040, 16384),
    (2040, 32768),
    (510, 49152),
    (2040, 49152),
    (510, 151936),
]
KD = {"temperature": 2.0, "kd_weight": 0.5}


def inputs(tokens: int, vocab: int, hs: int = 192, ht: int = 384) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "h": torch.randn(tokens, hs, generator=g).requires_grad_(),
        "w": (torch.randn(vocab, hs, generator=g) * hs**-0.5).requires_grad_(),
        "ht": torch.randn(tokens, ht, generator=g),
        "wt": torch.randn(vocab, ht, generator=g) * ht**-0.5,
        "y": torch.randint(0, vocab, (tokens,), generator=g),
    }


def full(x: dict) -> torch.Tensor:
    logits = x["h"] @ x["w"].t()
    with torch.no_grad():
        teacher = x["ht"] @ x["wt"].t()
    return fused_logits_distillation_loss(logits, teacher, x["y"], all_valid=True, **KD).total


def chunked(x: dict) -> torch.Tensor:
    return fused_linear_distillation_loss(x["h"], x["w"], x["ht"], x["wt"], x["y"], all_valid=True, **KD).total


def timed(step, x: dict, precision: str) -> float:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    x["h"].grad = x["w"].grad = None
    start = time.perf_counter()
    with autocast:
        loss = step(x)
    loss.backward()
    return time.perf_counter() - start


def measure(tokens: int, vocab: int, precision: str, repeats: int) -> dict:
    x = inputs(tokens, vocab)
    variants = {"full": full, "chunked": chunked}
    for step in variants.values():  # warm-up: allocator pools, first-call set-up
        timed(step, x, precision)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, step in variants.items():
            times[name].append(timed(step, x, precision))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "tokens": tokens,
        "vocab": vocab,
        "precision": precision,
        "logits_mib": tokens * vocab * 4 * 2 / 2**20,  # both models' fp32 logits: what auto's threshold reads
        **{f"{name}_s": round(t, 5) for name, t in medians.items()},
        "full_over_chunked": round(medians["full"] / medians["chunked"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--shapes", help="TOKENSxVOCAB,... (default: the list in this file)")
    args = parser.parse_args()
    shapes = SHAPES if not args.shapes else [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for precision in args.precisions.split(","):
        for tokens, vocab in shapes:
            row = measure(tokens, vocab, precision, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print("\n| precision | tokens x vocab | fp32 logits (both) | full | chunked | full / chunked |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['precision']} | {r['tokens']:,} x {r['vocab']:,} | {r['logits_mib']:,.0f} MiB | "
            f"{r['full_s'] * 1e3:,.0f} ms | {r['chunked_s'] * 1e3:,.0f} ms | {r['full_over_chunked']:.2f} |"
        )


if __name__ == "__main__":
    main()
