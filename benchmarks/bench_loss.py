"""CPU loss-level benchmark: chunked fused-linear KD loss vs full logits, time and peak memory.

    python benchmarks/bench_loss.py --out bench_loss_cpu.json

Both variants compute the same thing from hidden states, forward and backward:
  full     logits = h @ W.T (and the teacher's, without grad), then
           ``lmdistill.loss.dense.distillation_loss`` and autograd backward (the reference);
  chunked  ``lmdistill.loss.chunked.fused_linear_distillation_loss`` (one chunk of logits at a time).

Each variant runs in a fresh subprocess, so its peak memory is its own: we read the resident
set size just before the first forward+backward and ``ru_maxrss`` (the process's peak RSS)
right after it, and report the difference. That sees every allocation torch makes, unlike
tracemalloc. ``baseline_slack_mib`` is how far the process's earlier peak (imports, input
creation) already stood above the pre-run RSS: a growth smaller than that could hide under
it, so the number is only a lower bound when the slack is not small next to it.
Times are wall-clock medians over ``--repeats`` runs after that first one, from ``--rounds``
subprocesses per variant launched alternately, so a noisy neighbour hurts both variants alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> dict:
    import torch

    from lmdistill.loss.chunked import fused_linear_distillation_loss
    from lmdistill.loss.dense import distillation_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, hs, ht_dim, v = args.n, args.hs, args.ht, args.vocab
    h = torch.randn(n, hs, generator=g).requires_grad_()
    w = (torch.randn(v, hs, generator=g) * (2.0 / math.sqrt(hs))).requires_grad_()
    ht = torch.randn(n, ht_dim, generator=g)
    wt = torch.randn(v, ht_dim, generator=g) * (2.0 / math.sqrt(ht_dim))
    y = torch.randint(0, v, (n,), generator=g)
    y[: n // 10] = -100  # 10% of positions without a target, as padding would leave
    kw = dict(temperature=args.temperature, kd_weight=args.kd_weight, divergence=args.divergence)

    if args.worker == "full":

        def step():
            s = h @ w.T
            with torch.no_grad():
                t = ht @ wt.T
            parts = distillation_loss(s, t, y, **kw)
            parts.total.backward()
            return parts
    else:
        chunk = int(args.worker.split("=")[1])

        def step():
            parts = fused_linear_distillation_loss(h, w, ht, wt, y, chunk_size=chunk, **kw)
            parts.total.backward()
            return parts

    def run():
        h.grad = None
        w.grad = None
        return step()

    rss_before = _rss_bytes()
    slack = max(_maxrss_bytes() - rss_before, 0)
    t0 = time.perf_counter()
    parts = run()
    first_s = time.perf_counter() - t0
    peak_growth = _maxrss_bytes() - rss_before
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return dict(
        variant=args.worker,
        times_s=[round(t, 4) for t in times],
        first_s=round(first_s, 4),
        peak_growth_mib=round(peak_growth / 2**20, 1),
        baseline_slack_mib=round(slack / 2**20, 1),
        total=float(parts.total.detach()),
        kd=float(parts.kd),
        ce=float(parts.ce),
        grad_w_norm=float(w.grad.norm()),
        torch_threads=torch.get_num_threads(),
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096, help="tokens (rows of hidden states)")
    p.add_argument("--hs", type=int, default=256, help="student hidden size")
    p.add_argument("--ht", type=int, default=512, help="teacher hidden size")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk-sizes", default="1024", help="comma-separated chunk sizes to measure")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per subprocess (after the first)")
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per variant, launched alternately")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return

    variants = ["full"] + [f"chunked={int(c)}" for c in args.chunk_sizes.split(",")]
    base_cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--n",
        str(args.n),
        "--hs",
        str(args.hs),
        "--ht",
        str(args.ht),
        "--vocab",
        str(args.vocab),
        "--repeats",
        str(args.repeats),
        "--temperature",
        str(args.temperature),
        "--kd-weight",
        str(args.kd_weight),
        "--divergence",
        args.divergence,
        "--threads",
        str(args.threads),
    ]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for variant in order:
            out = subprocess.run(base_cmd + ["--worker", variant], capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"worker {variant} failed:\n{out.stderr[-3000:]}")
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            runs[variant].append(rec)
            print(
                f"round {r} {variant:>14}: median {statistics.median(rec['times_s']):.3f} s, "
                f"peak +{rec['peak_growth_mib']:.0f} MiB (slack {rec['baseline_slack_mib']:.0f})",
                flush=True,
            )
    load_after = os.getloadavg()

    summary = {}
    for variant, recs in runs.items():
        times = [t for rec in recs for t in rec["times_s"]]
        summary[variant] = dict(
            median_s=round(statistics.median(times), 4),
            min_s=round(min(times), 4),
            n_times=len(times),
            peak_growth_mib=max(rec["peak_growth_mib"] for rec in recs),
            baseline_slack_mib=max(rec["baseline_slack_mib"] for rec in recs),
            total=recs[0]["total"],
            kd=recs[0]["kd"],
            ce=recs[0]["ce"],
        )
    full = summary["full"]
    for variant in variants[1:]:
        s = summary[variant]
        s["time_ratio_vs_full"] = round(s["median_s"] / full["median_s"], 3)
        s["mem_ratio_vs_full"] = round(s["peak_growth_mib"] / full["peak_growth_mib"], 3)
        s["loss_rel_diff_vs_full"] = abs(s["total"] - full["total"]) / abs(full["total"])
        s["meets_goals"] = s["time_ratio_vs_full"] <= 1.3 and s["mem_ratio_vs_full"] <= 0.25

    import torch

    result = dict(
        benchmark="loss_cpu",
        date=dt.datetime.now().isoformat(timespec="seconds"),
        command="python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        machine=dict(
            cpu=_cpu_model(),
            cpu_count=os.cpu_count(),
            torch=torch.__version__,
            python=platform.python_version(),
            loadavg_before=load_before,
            loadavg_after=load_after,
        ),
        shape=dict(n=args.n, hs=args.hs, ht=args.ht, vocab=args.vocab),
        loss=dict(temperature=args.temperature, kd_weight=args.kd_weight, divergence=args.divergence),
        goals="chunked peak memory <= 1/4 of full, time <= 1.3x full",
        summary=summary,
        runs=runs,
    )
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
