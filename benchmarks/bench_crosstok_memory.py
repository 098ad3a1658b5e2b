"""Peak memory of one cross-tokenizer training step, full path against chunked, as the batch grows.

A teacher with SmolLM2's vocabulary (49,152) and a student with the embedded default's (4,096),
both small Llama models (2 layers, hidden 64) so that the logits are what the memory is made
of: the full path holds the teacher's (tokens x 49,152) logits and the carried distribution; the
chunked path holds ``loss.chunk_size`` rows of them at a time. Each point is its own process
(one forward and backward of the objective, peak RSS from ``os.wait4``), the baseline a process
that builds the same models and batch and computes nothing.

    OMP_NUM_THREADS=1 python benchmarks/bench_crosstok_memory.py --out benchmarks/results/crosstok_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

TEACHER_VOCAB, STUDENT_VOCAB, BLOCK = 49_152, 4_096, 512


def step(impl: str, rows: int) -> None:
    """One objective forward and backward (``impl`` full | chunked | none) on ``rows`` blocks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmdistill.core.batch import Batch, TeacherTokens
    from lmdistill.loss.objective import KDSpec, Objective
    from lmdistill.loss.views import TeacherAligned, TeacherAlignedHidden

    def model(vocab: int, seed: int):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=BLOCK,
        )
        return LlamaForCausalLM(config)

    teacher, student = model(TEACHER_VOCAB, 0).eval(), model(STUDENT_VOCAB, 1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, STUDENT_VOCAB, (rows, BLOCK), generator=g)
    t_ids = torch.randint(0, TEACHER_VOCAB, (rows, BLOCK), generator=g)
    every = torch.arange(rows * (BLOCK - 1))
    batch = Batch.from_blocks(ids)
    batch.teacher_tokens = TeacherTokens(Batch.from_blocks(t_ids), every, every, 0)
    mapping = torch.randint(0, STUDENT_VOCAB, (TEACHER_VOCAB,), generator=g)
    if impl == "none":
        return
    with torch.no_grad():
        out = teacher(input_ids=t_ids, output_hidden_states=True, logits_to_keep=1 if impl == "chunked" else 0)
    if impl == "full":
        logits = out.logits[:, :-1].reshape(-1, TEACHER_VOCAB)
        view = TeacherAligned(logits, every, mapping, torch.zeros(()), out.logits, batch.targets)
    else:
        hidden = out.hidden_states[-1][:, :-1].reshape(-1, 64)
        head = teacher.get_output_embeddings()
        view = TeacherAlignedHidden(hidden, head.weight, None, TEACHER_VOCAB, every, mapping, torch.zeros(()))
    del out
    objective = Objective(KDSpec(0.5), STUDENT_VOCAB, "hidden" if impl == "chunked" else "logits", student)
    objective(student, batch, view, 2.0, batch.num_targets).total.backward()


def measure(impl: str, rows: int) -> float:
    """Peak RSS (MiB) of a child process running ``step(impl, rows)``."""
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench_crosstok_memory as b; b.step({impl!r}, {rows})"
    child = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{impl} at {rows} blocks failed")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {os.environ.get('OMP_NUM_THREADS')}",
        "teacher_vocab": TEACHER_VOCAB,
        "student_vocab": STUDENT_VOCAB,
        "block": BLOCK,
        "points": [],
    }
    print("| blocks of 512 | tokens | baseline | full | chunked | full - baseline | chunked - baseline |")
    print("|---|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        t0 = time.perf_counter()
        point = {"blocks": rows, "tokens": rows * BLOCK}
        point.update({impl: round(measure(impl, rows), 1) for impl in ("none", "full", "chunked")})
        point["seconds"] = round(time.perf_counter() - t0, 1)
        results["points"].append(point)
        print(
            f"| {rows} | {rows * BLOCK:,} | {point['none']:.0f} MiB | {point['full']:.0f} MiB | "
            f"{point['chunked']:.0f} MiB | {point['full'] - point['none']:+.0f} MiB | "
            f"{point['chunked'] - point['none']:+.0f} MiB |",
            flush=True,
        )
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
