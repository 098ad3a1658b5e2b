"""Per-process memory of the student's parameters, gradients and AdamW state: FSDP2 against DDP.

A Llama-shaped student of about 55M parameters on 2 CPU processes (gloo). After one
forward, backward and AdamW step, every process adds up the storage its own tensors hold
(the distinct ``untyped_storage()`` sizes behind its local tensors: a DTensor's local shard
under FSDP, the whole tensor under DDP; a buffer shared by several tensors counts once), separately for parameters, gradients and optimizer state. Both
strategies run in one invocation, one after the other, with the same model and batch.

A second measurement answers how the chunked loss gets the student's ``lm_head`` weight under
FSDP. With a sharded teacher of the same shape, each loss path runs 4 steps the way the
objective runs them: full logits (student and teacher forwards, then the logits loss) and
chunked (forwards with ``logits_to_keep=1``, then the fused loss over the hidden states and both
``lm_head`` weights). Every FSDP all-gather is counted with its bytes; the last 3 steps'
median step time is kept.

    python benchmarks/bench_fsdp_memory.py --out benchmarks/results/fsdp_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

SHAPE = {
    "vocab_size": 4096,
    "hidden_size": 640,
    "intermediate_size": 1728,
    "num_hidden_layers": 10,
    "num_attention_heads": 10,
    "num_key_value_heads": 10,
    "max_position_embeddings": 256,
}


def local_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (local shards of DTensors): a storage
    shared by several views (a flat buffer) is counted once."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def worker(strategy: str, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmdistill.core.parallel import shard

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    params = sum(p.numel() for p in model.parameters())
    if strategy == "fsdp":
        model = shard(model, "no", torch.device("cpu"))
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(dist.get_rank()))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    sizes = {
        "parameters": local_bytes(model.parameters()),
        "gradients": local_bytes(p.grad for p in model.parameters()),
        "optimizer_state": local_bytes(state),
    }
    sizes["total"] = sum(sizes.values())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sizes)
    record = {"strategy": strategy, "parameters": params, "per_rank": gathered}
    if strategy == "fsdp":
        record["gathers_per_step"] = {impl: gathers_per_step(model, optimizer, impl) for impl in ("full", "chunked")}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(record))
    dist.barrier()
    # DDP's reducer can hang gloo's teardown on this torch build; the numbers are out, leave now
    os._exit(0)


def gathers_per_step(student, optimizer, impl: str, steps: int = 4) -> dict:
    """FSDP all-gathers (count, MB) and the median time of one distillation step on path ``impl``."""
    import statistics

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmdistill.core.parallel import shard
    from lmdistill.loss.chunked import fused_linear_distillation_loss, fused_logits_distillation_loss

    torch.manual_seed(1)
    teacher = shard(LlamaForCausalLM(LlamaConfig(**SHAPE)).eval(), "no", torch.device("cpu"))
    counted = {"gathers": 0, "bytes": 0}
    original = _fsdp_param_group.foreach_all_gather

    def counting(fsdp_params, group, *args, **kwargs):  # instrumentation only: counts, then gathers
        result = original(fsdp_params, group, *args, **kwargs)
        if result is not None:
            counted["gathers"] += 1
            counted["bytes"] += result.all_gather_output.numel() * result.all_gather_output.element_size()
        return result

    _fsdp_param_group.foreach_all_gather = counting
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(dist.get_rank()))
    targets = ids[:, 1:].reshape(-1)
    per_step, times = [], []
    try:
        for _ in range(steps):
            counted.update(gathers=0, bytes=0)
            start = time.perf_counter()
            kwargs = {"temperature": 2.0, "kd_weight": 0.5, "num_tokens": targets.numel() * dist.get_world_size()}
            if impl == "full":
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
                logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
                loss = fused_logits_distillation_loss(
                    logits.reshape(-1, logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1]), targets, **kwargs
                )
            else:
                with torch.no_grad():
                    t_hidden = teacher(
                        input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False
                    ).hidden_states[-1][:, :-1]
                hidden = student(
                    input_ids=ids, output_hidden_states=True, logits_to_keep=1, use_cache=False
                ).hidden_states[-1][:, :-1]
                loss = fused_linear_distillation_loss(
                    hidden.reshape(-1, hidden.shape[-1]),
                    student.lm_head.weight,
                    t_hidden.reshape(-1, t_hidden.shape[-1]),
                    teacher.lm_head.weight,
                    targets,
                    **kwargs,
                )
            loss.total.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
            per_step.append(dict(counted))
    finally:
        _fsdp_param_group.foreach_all_gather = original
    last = per_step[-1]
    assert all(p == last for p in per_step[1:]), per_step  # every step after the first gathers alike
    return {
        "gathers": last["gathers"],
        "gathered_mb": round(last["bytes"] / 1e6, 1),
        "first_step_gathers": per_step[0]["gathers"],
        "median_step_s": round(statistics.median(times[1:]), 3),
    }


def launch(strategy: str, out: Path) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
        strategy,
        "--result",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{strategy} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.result)
        return
    import torch

    tmp = Path(f"/tmp/lmdistill-bench-fsdp-{os.getpid()}.json")
    runs = {s: launch(s, tmp) for s in ("ddp", "fsdp")}
    tmp.unlink(missing_ok=True)
    ddp, fsdp = (max(r["total"] for r in runs[s]["per_rank"]) for s in ("ddp", "fsdp"))
    result = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "processes": 2,
        "shape": SHAPE,
        "parameters": runs["ddp"]["parameters"],
        "runs": runs,
        "fsdp_vs_ddp_per_rank": fsdp / ddp,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
