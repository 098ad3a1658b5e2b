"""FSDP2 pieces that need no second process: torch shards over a process group of one."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lmdistill.batch import Batch
from lmdistill.sharding import is_sharded, shard
from lmdistill.signals import LiveLogits

from conftest import tiny_llama


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_sharded_teacher_serves_training_steps_and_then_evaluation(group_of_one):
    """A teacher's forward in a training step, then one in an evaluation (no_grad): FSDP reuses
    its gather buffers across them, which inference mode in the first would break."""
    plain = tiny_llama(64, hidden=16, layers=2, seed=3).eval()
    teacher = shard(tiny_llama(64, hidden=16, layers=2, seed=3).eval(), "no", torch.device("cpu"))
    assert is_sharded(teacher) and not is_sharded(plain)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids, None, ids, 16)
    stepped = LiveLogits(teacher, 64)(batch, 1.0).logits
    with torch.no_grad():
        evaluated = teacher(input_ids=ids).logits[:, :-1]
        want = plain(input_ids=ids).logits[:, :-1]
    torch.testing.assert_close(stepped, want)
    torch.testing.assert_close(evaluated, want)


def test_bf16_on_a_gpu_computes_in_bf16_and_reduces_in_fp32():
    from lmdistill.sharding import precision_policy

    gpu = precision_policy("bf16", torch.device("cuda", 0))
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    for mixed, device in (("bf16", "cpu"), ("no", "cuda"), ("fp16", "cpu")):
        policy = precision_policy(mixed, torch.device(device))
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None), (mixed, device)  # fp32 as stored


@pytest.mark.parametrize("setting, named", [("guard.spike=rollback", "guard.spike = rollback"),
                                            ("distill.hidden.weight=1.0", "hidden-state term"),
                                            ("distill.on_policy.fraction=0.5", "on-policy steps")])
def test_what_fsdp_does_not_support_is_refused_in_one_line(setting, named):
    from lmdistill.config import Config
    from lmdistill.errors import LmdistillError
    from lmdistill.sharding import check_fsdp

    cfg = Config()
    check_fsdp(cfg, world=2)  # the defaults are supported
    cfg.apply_override(setting)
    with pytest.raises(LmdistillError) as refused:
        check_fsdp(cfg, world=2)
    message = str(refused.value)
    assert named in message and "parallel.strategy=ddp" in message and "\n" not in message
