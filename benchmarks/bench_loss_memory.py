"""CPU, loss level: peak extra memory and time of the chunked loss before and after its buffers
were accounted for and cut (docs/performance.md, "The chunked loss's buffers").

    python benchmarks/bench_loss_memory.py --out benchmarks/results/loss_memory_cpu.json
    python benchmarks/bench_loss_memory.py --small          # a smoke test (seconds)

``before`` is ``lmdistill.loss.chunked`` with ``lmdistill.loss.divergences`` as they were at
commit ``--before`` (read with ``git show``: run it from a git checkout of lmdistill),
``after`` the package as installed. Same inputs, same arguments: 10% of the targets ignored,
T = 2, kd_weight 0.5, the student's hidden states and lm_head weight requiring gradients, one
forward + backward. For each shape, dtype and divergence:

- ``peak_extra``: the bytes torch's CPU allocator holds at the peak of one forward + backward
  (after a warm-up call) above what it held when the call started, the gradients handed to
  ``.grad`` included: the running total of allocations that torch.profiler
  (``profile_memory=True``) reports with each allocation and free. One thread.
- ``rss_peak`` (``--rss``): the same call in a process of its own, glibc told to give every
  allocation of 64 KiB or more its own mapping (``MALLOC_MMAP_THRESHOLD_``, as in
  ``bench_teacher_memory.py``) so that a freed tensor leaves the resident set at once: the
  kernel's high-water mark (``VmHWM``, reset first) minus the resident memory before the call.
  It also sees what oneDNN or MKL allocate outside torch's allocator.
- time: the two variants interleaved (before, after, after, before, ...) in one process, one
  thread, ``--repeats`` calls each after a warm-up call; medians and their ratio.
- the values: the loss and the gradients of ``after`` against ``before``.
- ``liger_derived``: what ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` holds at the
  same shape, derived from its source, not measured (see ``liger_bytes``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BEFORE = "688f525"  # the last commit with the chunked loss as it was before this accounting
SHAPES = {
    # The Qwen2.5 0.5B <- 1.5B output layers at their real vocabulary, few tokens: the (V, H)
    # weight gradient weighs as much as the chunk buffers.
    "qwen-heads": dict(n=512, hs=896, ht=1536, vocab=151936, chunk=256),
    # The same hidden sizes at a 32768 vocabulary and the default chunk of 1024 rows.
    "v32k": dict(n=2048, hs=896, ht=1536, vocab=32768, chunk=1024),
}
SMALL = {"tiny": dict(n=96, hs=64, ht=96, vocab=1000, chunk=32)}
T, KD_WEIGHT = 2.0, 0.5


def load_before(ref: str):
    """``fused_linear_distillation_loss`` as it was at commit ``ref``, with that commit's
    divergences (the registry entries are looked up in the old module, not the new one)."""

    def source(path: str) -> str:
        done = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"cannot read {path} at {ref} (run this from a git checkout): {done.stderr.strip()}")
        return done.stdout

    div = types.ModuleType("_before_divergences")
    sys.modules[div.__name__] = div
    exec(compile(source("src/lmdistill/loss/divergences.py"), f"{ref}:divergences.py", "exec"), div.__dict__)
    mod = types.ModuleType("_before_chunked")
    sys.modules[mod.__name__] = mod
    code = source("src/lmdistill/loss/chunked.py").replace(
        "from lmdistill.loss.divergences import", "from _before_divergences import"
    )
    exec(compile(code, f"{ref}:chunked.py", "exec"), mod.__dict__)
    checked = mod.check_loss_args
    mod.check_loss_args = lambda t, k, d: (checked(t, k, d), div.get(d))[1]
    return mod.fused_linear_distillation_loss


def variants(ref: str) -> dict:
    from lmdistill.loss.chunked import fused_linear_distillation_loss

    return {"before": load_before(ref), "after": fused_linear_distillation_loss}


def make_inputs(shape: dict, dtype: torch.dtype, seed: int = 0):
    """Student hidden states and weight (requiring gradients), the teacher's, targets."""
    g = torch.Generator().manual_seed(seed)
    n, hs, ht, v = shape["n"], shape["hs"], shape["ht"], shape["vocab"]
    h = (torch.randn(n, hs, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(v, hs, generator=g) * (2.0 / math.sqrt(hs))).to(dtype).requires_grad_()
    th = (torch.randn(n, ht, generator=g) * 0.5).to(dtype)
    tw = (torch.randn(v, ht, generator=g) * (2.0 / math.sqrt(ht))).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[: n // 10] = -100
    return h, w, th, tw, y


def fresh(inputs) -> None:
    """Drop the gradients of the last call (outside the measured region: the peak counts the
    new gradients, not the room the old ones leave)."""
    inputs[0].grad = inputs[1].grad = None


def step(fn, inputs, shape: dict, divergence: str):
    """One forward + backward; the loss parts."""
    h, w, th, tw, y = inputs
    parts = fn(h, w, th, tw, y, temperature=T, kd_weight=KD_WEIGHT, divergence=divergence, chunk_size=shape["chunk"])
    parts.total.backward()
    return parts


def allocator_peak(run) -> int:
    """Peak bytes torch's CPU allocator held above its level at the start, while ``run()`` ran:
    the largest running sum of the sizes the profiler reports with each allocation (+) and
    free (-), in time order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    peak = held = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak


def liger_bytes(shape: dict, itemsize: int) -> dict:
    """What LigerFusedLinearJSDLoss holds at ``shape``, derived from its source (liger-kernel's
    chunked_loss/fused_linear_distillation.py and jsd_loss.py), not measured.

    Whole call: ``grad_weight = zeros_like(student_weight)`` (V x Hs in the model's dtype) and
    the per-chunk input gradients, kept in a list and concatenated (2 x N x Hs). Per chunk of
    N / max(1, N // chunk_size) rows (every row, ignored or not; chunk_size 1024) inside its
    compiled ``grad_and_value``: the student's logits and the teacher's in the model's dtype,
    the student's upcast to fp32 for the CE log-softmax, and the gradient with respect to the
    logits in the model's dtype: 3 x itemsize + 4 bytes per (rows x vocab) entry (the rest is
    left to inductor's fusion). For bf16 this gives 1.73 and 1.77 GiB at the two H200 shapes
    of docs/performance.md, where 1.76 and 1.77 GiB were measured.
    """
    n, hs, v = shape["n"], shape["hs"], shape["vocab"]
    rows = math.ceil(n / max(1, n // 1024))
    whole = v * hs * itemsize + 2 * n * hs * itemsize
    chunk = rows * v * (3 * itemsize + 4)
    return dict(bytes=whole + chunk, whole_call=whole, per_chunk=chunk, chunk_rows=rows)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def compare(fns: dict, shape: dict, dtype: torch.dtype, divergence: str, repeats: int) -> dict:
    """Peak allocator bytes, interleaved times and the values of both variants on one input."""
    inputs = make_inputs(shape, dtype)
    peaks, times, results = {}, {name: [] for name in fns}, {}
    for name, fn in fns.items():
        step(fn, inputs, shape, divergence)  # warm-up: one-time allocations of the first call
        fresh(inputs)
        peaks[name] = allocator_peak(lambda fn=fn: step(fn, inputs, shape, divergence))
        fresh(inputs)
        parts = step(fn, inputs, shape, divergence)
        results[name] = (parts, inputs[0].grad.clone(), inputs[1].grad.clone())
    order = list(fns)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            fresh(inputs)
            t0 = time.perf_counter()
            step(fns[name], inputs, shape, divergence)
            times[name].append(time.perf_counter() - t0)
    (pb, hb, wb), (pa, ha, wa) = results["before"], results["after"]
    medians = {name: statistics.median(t) for name, t in times.items()}
    return dict(
        peak_extra_bytes=peaks,
        peak_ratio=round(peaks["after"] / peaks["before"], 4),
        times_s={name: [round(t, 4) for t in ts] for name, ts in times.items()},
        median_s={name: round(m, 4) for name, m in medians.items()},
        time_ratio=round(medians["after"] / medians["before"], 4),
        values={
            "total": [float(pb.total.detach()), float(pa.total.detach())],
            "rel_diff_total": rel_diff(pa.total, pb.total),
            "rel_diff_grad_hidden": rel_diff(ha, hb),
            "rel_diff_grad_weight": rel_diff(wa, wb),
            "bitwise_equal": bool(torch.equal(ha, hb) and torch.equal(wa, wb) and torch.equal(pa.total, pb.total)),
        },
    )


def compiled_peaks(fns: dict, shape: dict, dtype: torch.dtype, divergence: str) -> dict:
    """Peak allocator bytes of each variant with its chunk step compiled (``use_compile=True``,
    the default on CUDA), here by inductor's CPU backend: the buffers the compiled step keeps
    (which inductor decides) are those a GPU run keeps, unless its CUDA lowering decides
    otherwise; the GPU run tells. Three calls first: the compilations (the first chunk's shape,
    then the last one's) are not what is measured."""
    import functools

    from lmdistill.loss import chunked

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    inputs = make_inputs(shape, dtype)
    peaks = {}
    for name, fn in fns.items():
        torch._dynamo.reset()
        compiled = functools.partial(fn, use_compile=True)
        for _ in range(3):
            fresh(inputs)
            step(compiled, inputs, shape, divergence)
        fresh(inputs)
        peaks[name] = allocator_peak(lambda compiled=compiled: step(compiled, inputs, shape, divergence))
    broken = chunked._compile_broken or sys.modules["_before_chunked"]._compile_broken
    return dict(compiled_peak_extra_bytes=peaks, compiled_fell_back_to_eager=bool(broken))


def child_rss(args: argparse.Namespace) -> None:
    """In a fresh process: one variant's forward + backward, its peak resident growth."""
    torch.set_num_threads(1)
    shape = {**SHAPES, **SMALL}[args.shape]
    fn = variants(args.before)[args.variant]
    inputs = make_inputs(shape, getattr(torch, args.dtype))
    step(fn, inputs, shape, args.divergence)
    fresh(inputs)
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    step(fn, inputs, shape, args.divergence)
    print(json.dumps({"rss_peak_bytes": (_status_kib("VmHWM") - before) * 1024}))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_peaks(args: argparse.Namespace, shape: str, dtype: str, divergence: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = {}
    for variant in ("before", "after"):
        cmd = [sys.executable, __file__, "--child-rss", "--shape", shape, "--dtype", dtype]
        cmd += ["--divergences", divergence, "--variant", variant, "--before", args.before]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])["rss_peak_bytes"]
    return out


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mib(x: float) -> str:
    return f"{x / 2**20:.0f} MiB"


def _pair(both: dict | None) -> str:
    return "-" if both is None else f"{_mib(both['before'])} / {_mib(both['after'])}"


HEADER = (
    "| shape | dtype | divergence | peak before | peak after | after/before | compiled before / after "
    "| RSS before / after | Liger (derived) | time before / after | time ratio | grad W rel. diff |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def report(row: dict) -> None:
    p = row["peak_extra_bytes"]
    print(
        f"| {row['shape']} | {row['dtype']} | {row['divergence']} | {_mib(p['before'])} | {_mib(p['after'])} "
        f"| {row['peak_ratio']:.2f} | {_pair(row.get('compiled_peak_extra_bytes'))} "
        f"| {_pair(row.get('rss_peak_bytes'))} | {_mib(row['liger_derived']['bytes'])} "
        f"| {row['median_s']['before']:.2f} s / {row['median_s']['after']:.2f} s | {row['time_ratio']:.3f} "
        f"| {row['values']['rel_diff_grad_weight']:.1e} |",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--small", action="store_true", help="the tiny shape only (a smoke test)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--divergences", default="forward_kl,jsd")
    p.add_argument("--repeats", type=int, default=4, help="timed calls per variant, interleaved")
    p.add_argument("--rss", action="store_true", help="also measure peak resident memory, a process per variant")
    p.add_argument(
        "--compiled", action="store_true", help="also the peak memory with the chunk step compiled (CPU inductor)"
    )
    p.add_argument("--before", default=BEFORE, help="git commit of the 'before' chunked loss")
    p.add_argument("--out")
    p.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_rss:
        args.divergence = args.divergences
        return child_rss(args)
    torch.set_num_threads(1)
    fns = variants(args.before)
    shapes = SMALL if args.small else {k: SHAPES[k] for k in args.shapes.split(",")}
    result = dict(
        benchmark="loss_memory_cpu",
        date=dt.datetime.now().isoformat(timespec="seconds"),
        command="python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        machine=dict(
            cpu=_cpu_model(),
            cpu_count=os.cpu_count(),
            torch=torch.__version__,
            python=platform.python_version(),
            threads=1,
            loadavg_before=os.getloadavg(),
        ),
        before=args.before,
        loss=dict(temperature=T, kd_weight=KD_WEIGHT, ignored="10%"),
        rows=[],
    )
    print(HEADER)
    for name, shape in shapes.items():
        for dtype in args.dtypes.split(","):
            for divergence in args.divergences.split(","):
                row = dict(shape=name, **shape, dtype=dtype, divergence=divergence)
                row.update(compare(fns, shape, getattr(torch, dtype), divergence, args.repeats))
                row["liger_derived"] = liger_bytes(shape, getattr(torch, dtype).itemsize)
                if args.rss:
                    row["rss_peak_bytes"] = rss_peaks(args, name, dtype, divergence)
                if args.compiled:
                    row.update(compiled_peaks(fns, shape, getattr(torch, dtype), divergence))
                result["rows"].append(row)
                report(row)
                if args.out:
                    result["machine"]["loadavg_after"] = os.getloadavg()
                    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
