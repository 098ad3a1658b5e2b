"""Run by torchrun from test_distributed.py: a sharded student writes on 2 processes whose rows
end at different times (rank 0's end-of-text token is the first one it samples, rank 1's one it
never samples). Each process records what it wrote and whether that equals the unsharded
student's tokens; a process left waiting in a gather fails after the group's 60 s timeout."""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest.tiny_llama
from conftest import tiny_llama
from lmdistill.core.parallel import shard
from lmdistill.teacher.generation import HFGenerator, Sampling

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
plain = tiny_llama(63, hidden=16, layers=2, seed=3)  # 63 embedding rows: shards of unequal size
sharded = shard(tiny_llama(63, hidden=16, layers=2, seed=3), "no", torch.device("cpu"))
prompts = torch.randint(0, 63, (1, 5), generator=torch.Generator().manual_seed(rank))
sampling = Sampling(max_new_tokens=8)
first = HFGenerator(plain, -1, 0)(prompts, sampling, seed=7)[0, 5:].tolist()
eos = first[0] if rank == 0 else next(t for t in range(63) if t not in first)
want = HFGenerator(plain, eos, 0)(prompts, sampling, seed=7)
got = HFGenerator(sharded, eos, 0)(prompts, sampling, seed=7)
dist.barrier()
Path(sys.argv[1], f"rank{rank}.json").write_text(
    json.dumps({"written": got.shape[1] - 5, "same_as_unsharded": torch.equal(got, want)})
)
dist.destroy_process_group()
