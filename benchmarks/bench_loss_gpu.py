"""GPU loss-level benchmark: our chunked fused KD loss vs full logits vs Liger, same run.

    python benchmarks/bench_loss_gpu.py --out bench_loss_gpu.json          # on a GPU, the real pairs' shapes
    python benchmarks/bench_loss_gpu.py --device cpu --small               # smoke test anywhere

Shapes are those of two real model pairs' output layers (BT = 8192 tokens, bf16):
  qwen2.5-0.5b<-1.5b heads  Hs 896,  Ht 1536, V 151936
  llama3-1b<-8b heads       Hs 2048, Ht 4096, V 128256
(``--small``: BT 256, Hs 64, Ht 96, V 1000.) The loss is the reference measurement's: forward KL at
T = 2 with kd_weight 0.5 against hard-label CE, 10% of positions ignored, forward + backward.
Methods:
  full   bf16 logits of both models, ``losses.distillation_loss`` (fp32 inside), autograd;
  ours   ``fused.fused_linear_distillation_loss`` (torch.compile'd elementwise part on CUDA), once
         per ``--chunk-sizes`` entry (``ours@1024``: 1024 rows per chunk, Liger's default);
  liger  ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (beta=0: forward KL, compiled),
         when liger-kernel is installed; otherwise the column is skipped and the reason printed.
         Liger does not multiply the KD term by T^2; ours does. The work is the same.
Reported per method: median time (CUDA events; wall clock on a CPU), peak extra memory
(``torch.cuda.max_memory_allocated`` during the timed calls minus the allocation before them,
the previous call's gradients dropped first, so the new ones count; ``peak_extra_gib_warmup``
is the same over the warm-up calls, torch.compile's first call included; not measured on a
CPU, see bench_loss_memory.py for that), and the bf16 gradient error: the relative
norm error of d loss/d hidden and d loss/d weight against an fp32 evaluation of the same
loss definition on the same (bf16-representable) values, on the first ``--err-tokens``
tokens. For ours and full that reference is ``distillation_loss`` on fp32 logits; for
Liger it is Liger itself run on fp32 inputs (its loss definition differs by T^2 and
normalisation, so it is compared with its own fp32 self).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from lmdistill.loss.chunked import fused_linear_distillation_loss
from lmdistill.loss.dense import distillation_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import Records, cpu_name, emit

ANCHORS = [
    dict(name="qwen2.5-0.5b<-1.5b", bt=8192, hs=896, ht=1536, vocab=151936),
    dict(name="llama3-1b<-8b", bt=8192, hs=2048, ht=4096, vocab=128256),
]
SMALL = [dict(name="tiny", bt=256, hs=64, ht=96, vocab=1000)]
T, KD_WEIGHT = 2.0, 0.5


def make_inputs(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    bt, hs, ht, v = shape["bt"], shape["hs"], shape["ht"], shape["vocab"]
    # Generated on the CPU in fp32 so every device and dtype starts from the same values.
    h = (torch.randn(bt, hs, generator=g) * 0.5).to(device, dtype)
    w = (torch.randn(v, hs, generator=g) / math.sqrt(hs)).to(device, dtype)
    th = (torch.randn(bt, ht, generator=g) * 0.5).to(device, dtype)
    tw = (torch.randn(v, ht, generator=g) / math.sqrt(ht)).to(device, dtype)
    y = torch.randint(0, v, (bt,), generator=g)
    y[: bt // 10] = -100
    return h, w, th, tw, y.to(device)


def build_methods(device: str, records: list, shape_name: str, chunk_sizes: list[int]) -> dict:
    """name -> fn(h, w, th, tw, y) returning a scalar loss to call backward on."""

    def full(h, w, th, tw, y):
        with torch.no_grad():
            t = th @ tw.T
        return distillation_loss(h @ w.T, t, y, temperature=T, kd_weight=KD_WEIGHT).total

    def ours(h, w, th, tw, y, chunk_size):
        return fused_linear_distillation_loss(
            h, w, th, tw, y, temperature=T, kd_weight=KD_WEIGHT, chunk_size=chunk_size
        ).total

    methods = {"full": full}
    for chunk in chunk_sizes:
        methods[f"ours@{chunk}"] = functools.partial(ours, chunk_size=chunk)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as exc:  # not installed, or no usable triton on this machine
        emit(records, shape=shape_name, method="liger", skipped=f"liger-kernel not importable: {exc!r:.200}")
        print("liger-kernel is not installed here: the Liger column is skipped", flush=True)
    else:
        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=1 - KD_WEIGHT, weight_soft_loss=KD_WEIGHT, beta=0.0, temperature=T, compiled=True
        )
        methods["liger"] = lambda h, w, th, tw, y: liger(h, w, th, tw, y)
    return methods


def _peak_start(cuda: bool) -> int:
    """The allocation now (the peak is measured from here), the peak statistics reset."""
    if not cuda:
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def time_and_memory(fn, inputs, device: str, warmup: int, repeats: int) -> tuple[float, float | None, float | None]:
    """(median ms, peak extra GiB over the timed calls, the same over the warm-up calls)."""
    h, w, th, tw, y = inputs
    h.requires_grad_(True)
    w.requires_grad_(True)

    def step():
        fn(h, w, th, tw, y).backward()

    cuda = device.startswith("cuda")
    h.grad = w.grad = None
    base = _peak_start(cuda)
    for _ in range(warmup):  # includes torch.compile's first call
        h.grad = w.grad = None
        step()
    peak_warmup = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    h.grad = w.grad = None
    base = _peak_start(cuda)
    times = []
    for _ in range(repeats):
        h.grad = w.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    h.grad = None
    w.grad = None
    return statistics.median(times), peak, peak_warmup


def grads_of(fn, inputs, dtype: torch.dtype):
    h, w, th, tw, y = (x.to(dtype) if x.is_floating_point() else x for x in inputs)
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    fn(h, w, th, tw, y).backward()
    return h.grad.float(), w.grad.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke test that runs on a CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--chunk-sizes", default="512,1024,2048", help="rows per chunk for ours, comma-separated: one method each"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--err-tokens", type=int, default=2048, help="tokens used for the gradient error")
    p.add_argument("--methods", default="full,ours,liger", help="comma-separated subset to run")
    p.add_argument("--out", help="write all records as JSON here (rewritten after each one)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    records = Records(args.out)
    emit(
        records,
        env=True,
        command=" ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
        device=torch.cuda.get_device_name(args.device) if cuda else f"cpu ({cpu_name()})",
        torch=torch.__version__,
        dtype=args.dtype,
        date=dt.datetime.now().isoformat(timespec="seconds"),
        chunk_sizes=args.chunk_sizes,
    )
    wanted = set(args.methods.split(","))
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
    for shape in SMALL if args.small else ANCHORS:
        methods = {
            k: v
            for k, v in build_methods(args.device, records, shape["name"], chunk_sizes).items()
            if k.split("@")[0] in wanted
        }
        inputs = make_inputs(shape, args.device, dtype)
        time_methods(methods, inputs, shape, args, records)
        grad_errors(methods, inputs, shape, args, dtype, records)
        del inputs
        if cuda:
            torch.cuda.empty_cache()
    print_summary(records)
    if args.out:
        print(f"wrote {args.out}")


def time_methods(methods: dict, inputs, shape: dict, args, records: list) -> None:
    """One record per method: median time, peak extra memory, tokens/s (or the error it raised)."""
    for name, fn in methods.items():
        if name.startswith("ours@"):
            # Each chunk size compiles afresh, as in a run that uses only it (a graph
            # compiled for another size would be reused with dynamic shapes).
            torch._dynamo.reset()
        try:
            ms, peak, peak_warmup = time_and_memory(fn, inputs, args.device, args.warmup, args.repeats)
            emit(
                records,
                shape=shape["name"],
                method=name,
                ms_fwd_bwd=round(ms, 2),
                peak_extra_gib=None if peak is None else round(peak, 3),
                peak_extra_gib_warmup=None if peak_warmup is None else round(peak_warmup, 3),
                tokens_per_s=round(shape["bt"] / ms * 1e3),
            )
        except Exception as exc:  # e.g. out of memory: record it and go on
            emit(records, shape=shape["name"], method=name, error=repr(exc)[:300])
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def grad_errors(methods: dict, inputs, shape: dict, args, dtype: torch.dtype, records: list) -> None:
    """The bf16 gradient error of each method against an fp32 evaluation of its own loss.

    On a slice of the tokens: an fp32 reference over all 8192 tokens and 151936 entries would
    itself need tens of GiB."""
    sub = [x[: args.err_tokens] if i in (0, 2, 4) else x for i, x in enumerate(inputs)]
    reference = {}
    try:
        reference["full"] = grads_of(methods["full"], sub, torch.float32) if "full" in methods else None
    except Exception as exc:
        emit(records, shape=shape["name"], method="fp32_reference", error=repr(exc)[:300])
    for name, fn in methods.items():
        try:
            same_loss = name == "full" or name.startswith("ours")
            ref = reference.get("full") if same_loss else grads_of(fn, sub, torch.float32)
            if ref is None:
                continue
            gh, gw = grads_of(fn, sub, dtype)
            emit(
                records,
                shape=shape["name"],
                method=name,
                grad_err_tokens=sub[0].shape[0],
                grad_rel_err_hidden=round(rel_err(gh, ref[0]), 5),
                grad_rel_err_weight=round(rel_err(gw, ref[1]), 5),
            )
        except Exception as exc:
            emit(records, shape=shape["name"], method=name, grad_error=repr(exc)[:300])


def print_summary(records: list) -> None:
    print("\nshape                method      ms      peak GiB  grad err (h / W)")
    by_key: dict = {}
    for r in records:
        if "method" in r and "shape" in r:
            by_key.setdefault((r["shape"], r["method"]), {}).update(r)
    for (shape, method), r in by_key.items():
        if "skipped" in r:
            print(f"{shape:20} {method:10}  skipped: {r['skipped'][:60]}")
            continue
        peak = r.get("peak_extra_gib")
        print(
            f"{shape:20} {method:10}  {r.get('ms_fwd_bwd', float('nan')):7.2f} "
            f"{'n/a' if peak is None else f'{peak:7.3f}':>8}  "
            f"{r.get('grad_rel_err_hidden', float('nan')):.2e} / {r.get('grad_rel_err_weight', float('nan')):.2e}"
            + (f"  ERROR {r['error'][:80]}" if "error" in r else "")
        )


if __name__ == "__main__":
    main()
