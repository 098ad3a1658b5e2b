"""Peak memory of one no-grad teacher forward on the chunked path: every layer's output kept
(``output_hidden_states=True``, how ``views.final_hidden`` ran the teacher before) against the
final hidden state alone (``final_hidden`` as it is, no layers named).

Two teachers: the embedded default (``lmdistill.default``, 4 layers, hidden 192) and
SmolLM2-135M-Instruct converted from its GGUF file (``benchmarks/real_teacher.py``; 30 layers,
hidden 576), fp32 on the CPU, one thread, a batch of 8 packed blocks of 512 tokens.

Each measurement is its own process. It loads the teacher and the batch, reads every weight
(they are mapped from the file and become resident only when read) and runs one small forward,
then resets the kernel's high-water mark of its resident memory (``/proc/self/clear_refs``) and
runs the one forward; the figure is the high-water mark (``VmHWM``) minus the resident memory just before
the forward. glibc is told to give every allocation of 64 KiB or more its own mapping
(``MALLOC_MMAP_THRESHOLD_``), so that a freed tensor leaves the resident set at once and the
mark follows the live tensors (``mmap``); ``default`` measures with glibc's own heuristics,
which keep freed memory for reuse. One more process per teacher runs both forms on the same batch and checks that they
give the same final hidden states, bit for bit.

    python benchmarks/bench_teacher_memory.py --out benchmarks/results/teacher_memory_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH, BLOCK, SEED = 8, 512, 0
VARIANTS = ("before", "after")


def teacher_dir(name: str) -> Path:
    """Where the teacher ``name`` is on this machine (nothing is fetched: the default teacher is
    built from the embedded corpus if it is not cached yet; SmolLM2 must have been fetched)."""
    if name == "default":
        from lmdistill.default import ensure_default_teacher

        return ensure_default_teacher(progress=False)
    from real_teacher import gguf_path

    from lmdistill.models.gguf import converted_dir

    if not gguf_path().is_file():
        sys.exit(f"{gguf_path()} is not here: run benchmarks/real_teacher.py first (it downloads the file)")
    return converted_dir(gguf_path(), "teacher", say=lambda line: None)


def _load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    from lmdistill.core.batch import Batch

    torch.set_num_threads(1)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (BATCH, BLOCK), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        # The weights are mapped from the safetensors file and become resident when first read:
        # read them all now, and run one small forward for what a first forward sets up once,
        # so that neither counts as the measured forward's memory.
        for tensor in (*teacher.parameters(), *teacher.buffers()):
            tensor.sum()
        teacher(input_ids=ids[:1, :16], logits_to_keep=1, use_cache=False)
    return teacher, Batch.from_blocks(ids)


def _before(teacher, batch):
    """The teacher's forward as ``LiveHidden`` ran it before: every layer's output asked for and
    held (with the final hidden state, a view of the last) until the view was made."""
    out = teacher(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    return out.hidden_states[-1][:, :-1], out.hidden_states


def _after(teacher, batch):
    from lmdistill.loss.views import final_hidden

    return final_hidden(teacher, batch)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_measure(path: str, variant: str) -> None:
    """In a fresh process: the forward's peak resident memory above what the process held before it."""
    import torch

    teacher, batch = _load(path)
    run = _before if variant == "before" else _after
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    started = time.perf_counter()
    with torch.no_grad():
        held = run(teacher, batch)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    print(json.dumps({"loaded_mib": before / 1024, "peak_mib": (peak - before) / 1024, "seconds": seconds}))
    del held


def child_check(path: str) -> None:
    """In a fresh process: both forms on the same batch give the same final hidden states."""
    import torch

    teacher, batch = _load(path)
    with torch.no_grad():
        old, _ = _before(teacher, batch)
        new, layers = _after(teacher, batch)
    print(json.dumps({"identical": bool(torch.equal(old, new)) and layers == [], "shape": list(new.shape)}))


def _child(args: list[str], malloc: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False, timeout=1800
    )
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_teacher(name: str, path: Path, rounds: int, malloc: str) -> dict:
    """Both variants, ``rounds`` processes each (alternating), and the bit-for-bit check."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    layers, hidden = config.num_hidden_layers, config.hidden_size
    runs = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            runs[variant].append(_child(["--child-measure", str(path), variant], malloc))
    peaks = {v: statistics.median(r["peak_mib"] for r in runs[v]) for v in VARIANTS}
    return {
        "teacher": name,
        "malloc": malloc,
        "layers": layers,
        "hidden": hidden,
        "vocab": config.vocab_size,
        "loaded_mib": round(runs["after"][0]["loaded_mib"], 1),
        # What "before" holds beyond "after" while the last layer runs, the forward's peak: the
        # outputs of layers 0 .. L - 3 (fp32). Both hold the embeddings' output (a local of the
        # decoder's forward) and layer L - 2's (the last layer's input).
        "expected_mib": round((layers - 2) * BATCH * BLOCK * hidden * 4 / 2**20, 1),
        "before_mib": round(peaks["before"], 1),
        "after_mib": round(peaks["after"], 1),
        "saved_mib": round(peaks["before"] - peaks["after"], 1),
        "runs": runs,
        **_child(["--child-check", str(path)], malloc),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-measure":
        return child_measure(sys.argv[2], sys.argv[3])
    if len(sys.argv) > 1 and sys.argv[1] == "--child-check":
        return child_check(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", default="default,smollm2")
    parser.add_argument("--rounds", type=int, default=3, help="processes per variant (their median)")
    parser.add_argument("--malloc", default="mmap,default", help="glibc settings: mmap, default or both")
    parser.add_argument("--out")
    args = parser.parse_args()
    import torch
    import transformers

    results = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU, 1 torch thread",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch": [BATCH, BLOCK],
        "dtype": "float32",
        "teachers": [],
    }
    print(f"batch {BATCH} x {BLOCK}, fp32, one thread; peak resident memory of the forward above the loaded teacher")
    print("| teacher | layers x hidden | malloc | before | after | saved | L - 2 layer outputs | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.teachers.split(","):
        path = teacher_dir(name)
        for malloc in args.malloc.split(","):
            row = measure_teacher(name, path, args.rounds, malloc)
            results["teachers"].append(row)
            print(
                f"| {name} | {row['layers']} x {row['hidden']} | {malloc} | {row['before_mib']:.0f} MiB "
                f"| {row['after_mib']:.0f} MiB | {row['saved_mib']:.0f} MiB | {row['expected_mib']:.0f} MiB "
                f"| {row['identical']} |",
                flush=True,
            )
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
