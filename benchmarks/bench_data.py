"""Data at scale: the tokenized block store on a corpus of hundreds of millions of tokens.

Measures, in one run, on this machine:

1. Tokenization throughput of a store build with ``data.num_proc`` 1 and 2 (the small
   corpus, each into its own store directory): tokens/s, and the ratio.
2. First start against second start on the large corpus: seconds from launching
   ``lmdistill train`` to its first training step, with the store built (first) and reused
   (second).
3. Peak RSS of 20-step training runs of the default recipe (default teacher, default
   student, batch 2, blocks of 128) on one copy of the embedded corpus (the baseline:
   models, optimizer, activations and a tiny store, read through the same code path), on
   the small corpus and on the large one; each store already built. The
   data's cost is the difference to the baseline; flat means the large corpus costs what
   the small one does.
4. Two ranks (torchrun, gloo) on a fresh store directory for the small corpus: the store is
   written once (one build, one directory) and each rank's peak RSS.

The corpora are directories of plain-text files, each file the embedded corpus's documents
in a shuffled order (a different order per file), enough files to reach the token count.

    python benchmarks/bench_data.py                          # 200M and 20M tokens (~25 min, ~2 GB of disk)
    python benchmarks/bench_data.py --tokens 2e6 --small-tokens 5e5 --work /tmp/bd   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

RSS_TAG = "BENCH_PEAK_RSS_KB"


def peak_rss_kb() -> int:
    """This process's peak resident set (VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_worker(args: list[str]) -> int:
    """In a child process: ``lmdistill ARGS``, then this process's peak RSS on stdout."""
    from lmdistill.cli import main

    code = main(args)
    print(f"{RSS_TAG} rank={os.environ.get('RANK', '0')} {peak_rss_kb()}", flush=True)
    return code


def make_corpus(folder: Path, tokens: int) -> dict:
    """Plain-text files of the embedded corpus's documents, shuffled per file, >= ``tokens`` tokens."""
    from transformers import AutoTokenizer

    from lmdistill.data.sources import embedded_corpus_texts
    from lmdistill.default import ensure_default_teacher

    docs = embedded_corpus_texts()
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_teacher())
    per_copy = sum(len(tokenizer.encode(d, add_special_tokens=False)) for d in docs)
    copies = -(-tokens // per_copy)
    marker = folder / ".complete"
    if marker.exists() and json.loads(marker.read_text())["copies"] == copies:
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(copies):
        order = docs[:]
        rng.shuffle(order)
        (folder / f"part-{i:05d}.txt").write_text("\n\n".join(order))
    info = {
        "copies": copies,
        "tokens_per_copy_estimate": per_copy,
        "bytes": sum(p.stat().st_size for p in folder.glob("*.txt")),
    }
    marker.write_text(json.dumps(info))
    return info


def lmdistill_env() -> dict:
    src = Path(__file__).resolve().parents[1] / "src"
    return {
        **os.environ,
        "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def train_args(data: Path | None, stores: Path, out: Path, steps: int, *extra: str) -> list[str]:
    args = [
        "train",
        "--batch-size",
        "2",
        "--max-steps",
        str(steps),
        "--output-dir",
        str(out),
        "--no-progress",
        "--set",
        f"data.store_dir={stores}",
        "--set",
        "train.eval_every=1000000",
        *extra,
    ]
    return args + (["--data", str(data)] if data is not None else [])


def timed_run(args: list[str], log: Path) -> dict:
    """Run ``lmdistill ARGS`` in a child; seconds to its first training step and its peak RSS."""
    out = Path(args[args.index("--output-dir") + 1])
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", *args], stdout=f, stderr=subprocess.STDOUT, env=lmdistill_env()
        )
        first_step = None
        while proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if first_step is None and metrics.exists() and '"loss"' in metrics.read_text():
                first_step = time.perf_counter() - start
            time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"lmdistill {' '.join(args)} failed; see {log}")
    text = log.read_text()
    rss = [int(line.split()[-1]) for line in text.splitlines() if line.startswith(RSS_TAG)]
    return {
        "seconds_to_first_step": first_step,
        "seconds_total": time.perf_counter() - start,
        "peak_rss_mib": max(rss) / 1024,
        "log": str(log),
    }


def build_throughput(corpus: Path, stores: Path, num_proc: int) -> dict:
    """Build the store for ``corpus`` with ``num_proc`` workers, in-process; tokens/s."""
    from transformers import AutoTokenizer

    from lmdistill.config import DataConfig
    from lmdistill.data.sources import open_store
    from lmdistill.default import ensure_default_teacher

    shutil.rmtree(stores, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_teacher())
    cfg = DataConfig(path=str(corpus), store_dir=str(stores), num_proc=num_proc)
    start = time.perf_counter()
    store, built = open_store(str(corpus), cfg, tokenizer, progress=False)
    seconds = time.perf_counter() - start
    assert built
    return {
        "num_proc": num_proc,
        "tokens": store.num_tokens,
        "seconds": seconds,
        "tokens_per_s": store.num_tokens / seconds,
        "store_mib": store.tokens.nbytes / 2**20,
        "fingerprint": store.fingerprint,
    }


def ddp_run(corpus: Path, stores: Path, out: Path, log: Path, steps: int) -> dict:
    shutil.rmtree(stores, ignore_errors=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        __file__,
        "--worker",
        *train_args(corpus, stores, out, steps, "--overwrite"),
    ]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**lmdistill_env(), "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"torchrun failed; see {log}")
    text = log.read_text()
    ranks = {line.split()[1]: int(line.split()[2]) / 1024 for line in text.splitlines() if line.startswith(RSS_TAG)}
    built = [p.name for p in stores.iterdir() if (p / "manifest.json").exists()]
    leftovers = [p.name for p in stores.iterdir() if p.name.endswith((".build",)) or ".tmp-" in p.name]
    return {
        "stores_written": len(built),
        "leftovers": leftovers,
        "tokenizing_lines": text.count("tokenizing "),
        "peak_rss_mib_per_rank": ranks,
        "log": str(log),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        raise SystemExit(run_worker(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=200e6, help="tokens of the large corpus")
    p.add_argument("--small-tokens", type=float, default=20e6, help="tokens of the small corpus")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--work", type=Path, default=Path("/tmp/lmdistill-bench-data"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_cpu.json")
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    large, small, tiny = work / "corpus-large", work / "corpus-small", work / "corpus-tiny"
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
    }
    print("making the corpora ...", flush=True)
    result["corpus_large"] = make_corpus(large, int(args.tokens))
    result["corpus_small"] = make_corpus(small, int(args.small_tokens))
    result["corpus_tiny"] = make_corpus(tiny, 1)  # one copy: the baseline, through the same code path

    print("tokenization throughput (small corpus) ...", flush=True)
    one = build_throughput(small, work / "stores-np1", 1)
    two = build_throughput(small, work / "stores-np2", 2)
    assert one["fingerprint"] == two["fingerprint"], "num_proc changed the stored ids"
    result["throughput"] = {"num_proc_1": one, "num_proc_2": two, "ratio": two["tokens_per_s"] / one["tokens_per_s"]}
    print(json.dumps(result["throughput"], indent=1), flush=True)

    print("first and second start (large corpus) ...", flush=True)
    stores = work / "stores"
    shutil.rmtree(stores, ignore_errors=True)
    first = timed_run(train_args(large, stores, work / "run-first", args.steps, "--overwrite"), work / "first.log")
    second = timed_run(train_args(large, stores, work / "run-large", args.steps, "--overwrite"), work / "second.log")
    result["start"] = {
        "first": first,
        "second": second,
        "ratio_first_to_second": first["seconds_to_first_step"] / second["seconds_to_first_step"],
    }
    print(json.dumps(result["start"], indent=1), flush=True)

    print("peak RSS: one copy of the embedded corpus (baseline), small, large ...", flush=True)
    timed_run(train_args(tiny, stores, work / "run-base-build", 1, "--overwrite"), work / "base-build.log")
    base = timed_run(train_args(tiny, stores, work / "run-base", args.steps, "--overwrite"), work / "base.log")
    timed_run(train_args(small, stores, work / "run-small-build", 1, "--overwrite"), work / "small-build.log")
    small_run = timed_run(train_args(small, stores, work / "run-small", args.steps, "--overwrite"), work / "small.log")
    large_run = second
    result["rss"] = {
        "baseline_one_copy_mib": base["peak_rss_mib"],
        "small_mib": small_run["peak_rss_mib"],
        "large_mib": large_run["peak_rss_mib"],
        "data_small_mib": small_run["peak_rss_mib"] - base["peak_rss_mib"],
        "data_large_mib": large_run["peak_rss_mib"] - base["peak_rss_mib"],
        "large_over_small": large_run["peak_rss_mib"] / small_run["peak_rss_mib"],
    }
    print(json.dumps(result["rss"], indent=1), flush=True)

    print("two ranks, one store (small corpus, fresh store directory) ...", flush=True)
    result["ddp"] = ddp_run(small, work / "stores-ddp", work / "run-ddp", work / "ddp.log", args.steps)
    print(json.dumps(result["ddp"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
