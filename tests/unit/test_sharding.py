"""FSDP2 pieces that need no second process: torch shards over a process group of one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_llama
from lmdistill.core.batch import Batch
from lmdistill.core.parallel import is_sharded, shard
from lmdistill.teacher.signals import LiveLogits


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


@pytest.mark.parametrize("impl, output", [("full", "logits"), ("chunked", "hidden")])
def test_a_distillation_step_of_a_sharded_student_is_the_ordinary_one(group_of_one, impl, output):
    """The objective and the teacher signal of both loss paths, on sharded models (gathered and
    reduce-scattered by FSDP, even in a group of one) against the same models unsharded: the
    loss, and every weight after an AdamW step. The chunked path multiplies by the student's
    lm_head outside its forward; the 2-process test runs it against one process and DDP."""
    from lmdistill.config import Config
    from lmdistill.loss.objective import Objective
    from lmdistill.teacher.signals import make_signal

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = ids[:, 1:].clone()
    targets[0, :3] = -100
    batch = Batch(ids, None, targets, int((targets != -100).sum()))
    results = []
    for sharded in (False, True):
        student, teacher = tiny_llama(64, hidden=16, layers=2, seed=3), tiny_llama(64, hidden=24, layers=2, seed=4)
        if sharded:
            student, teacher = (shard(m, "no", torch.device("cpu")) for m in (student, teacher))
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
        objective = Objective.for_run(Config(), 64, output, student)
        view = make_signal(impl, teacher.eval(), 64)(batch, 2.0)
        parts = objective(student, batch, view, 2.0, batch.num_targets)
        parts.total.backward()
        optimizer.step()
        weights = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in student.state_dict().items()
        }
        results.append((parts.total.detach(), weights))
    (loss, want), (sharded_loss, got) = results
    torch.testing.assert_close(sharded_loss, loss, rtol=1e-6, atol=1e-7)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_a_sharded_student_generates_in_step_with_the_other_processes(group_of_one):
    """On-policy rollouts from a sharded student: ``generate`` keeps every process stepping until
    all have finished (``synced_gpus``; otherwise a process done early would leave the others
    waiting in their next gather), and the tokens are those of the unsharded student."""
    from lmdistill.teacher.generation import HFGenerator, Sampling

    plain = tiny_llama(64, hidden=16, layers=2, seed=3)
    sharded = shard(tiny_llama(64, hidden=16, layers=2, seed=3), "no", torch.device("cpu"))
    prompts = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    asked = []
    generate = sharded.generate

    def recorded(*args, **kwargs):
        asked.append(kwargs.get("synced_gpus"))
        return generate(*args, **kwargs)

    sharded.generate = recorded
    got = HFGenerator(sharded, 63, 0)(prompts, Sampling(6), seed=11)
    want = HFGenerator(plain, 63, 0)(prompts, Sampling(6), seed=11)
    assert asked == [True] and torch.equal(got, want)


def test_bf16_on_a_gpu_computes_in_bf16_and_reduces_in_fp32():
    from lmdistill.core.parallel import precision_policy

    gpu = precision_policy("bf16", torch.device("cuda", 0))
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    for mixed, device in (("bf16", "cpu"), ("no", "cuda"), ("fp16", "cpu")):
        policy = precision_policy(mixed, torch.device(device))
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None), (mixed, device)  # fp32 as stored


def test_what_fsdp_does_not_support_is_refused_in_one_line():
    """(Rollback snapshots and on-policy steps are supported: see the tests of each.)"""
    from lmdistill.config import Config
    from lmdistill.core.errors import LmdistillError
    from lmdistill.core.parallel import check_fsdp

    cfg = Config()
    cfg.apply_override("guard.spike=rollback")
    cfg.apply_override("distill.on_policy.fraction=0.5")
    check_fsdp(cfg, world=2)
    cfg.apply_override("distill.hidden.weight=1.0")
    with pytest.raises(LmdistillError) as refused:
        check_fsdp(cfg, world=2)
    message = str(refused.value)
    assert "hidden-state term" in message and "parallel.strategy=ddp" in message and "\n" not in message


def test_a_rollback_restores_each_process_its_own_shards(group_of_one):
    """The rollback snapshot of a sharded student and its AdamW: local shards kept on the CPU,
    copied back in place after two more updates: every weight and optimizer tensor as it was."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from lmdistill.training.guards import RollbackStore

    model, optimizer = _sharded()
    _step(model, optimizer, 0)
    store = RollbackStore(keep=2, interval=1)
    store.maybe_save(1, model, optimizer)
    full = StateDictOptions(full_state_dict=True)
    want_model, want_optim = get_state_dict(model, optimizer, options=full)
    optimizer.param_groups[0]["lr"] = 0.5  # (the guard lowers the LR scale after a rollback; restored too)
    for seed in (1, 2):
        _step(model, optimizer, seed)
    assert store.restore_latest(model, optimizer) == 1
    got_model, got_optim = get_state_dict(model, optimizer, options=full)
    assert all(torch.equal(got_model[k], want_model[k]) for k in want_model)
    for name, state in want_optim["state"].items():
        assert all(torch.equal(got_optim["state"][name][k], v) for k, v in state.items()), name
    assert optimizer.param_groups[0]["lr"] == 1e-2
    assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())  # still sharded


# ------------------------------------------------------------------ sharded checkpoints


def _sharded(seed: int = 3, layers: int = 2, hidden: int = 16):
    model = shard(tiny_llama(64, hidden=hidden, layers=layers, seed=seed), "no", torch.device("cpu"))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, optimizer, seed: int = 0):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _save(model, optimizer, checkpoints, step: int):
    from lmdistill.training.checkpoint import make_staging_dir, save_checkpoint
    from lmdistill.training.sharded import save_shards

    staged = make_staging_dir(checkpoints, step)
    records = save_shards(staged, model, optimizer, step)
    assert list(records) == ["__0_0.distcp"]  # each process hashes the file it wrote
    return save_checkpoint(
        checkpoints,
        step,
        model_state=None,
        optimizer_state=None,
        trainer_state={"step": step},
        sharded_in=staged,
        shard_records=records,
    )


def test_a_sharded_checkpoint_loads_into_an_ordinary_model_and_optimizer(group_of_one, tmp_path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from lmdistill.training.checkpoint import load_checkpoint, verify_checkpoint
    from lmdistill.training.sharded import load_shards

    model, optimizer = _sharded()
    for seed in range(2):
        _step(model, optimizer, seed)
    path = _save(model, optimizer, tmp_path / "checkpoints", 2)
    # (the hashes the process measured of its own shard are those of the file: verified afresh)
    assert verify_checkpoint(path) == [] and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["layout"] == "sharded" and manifest["shard_files"] == [".metadata", "__0_0.distcp"]
    assert load_checkpoint(path).sharded
    # The reference: the sharded model's own state, gathered whole by torch.
    want_model, want_optim = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    plain = tiny_llama(64, hidden=16, layers=2, seed=99)
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    load_shards(path, plain, plain_optimizer)
    got_model, got_optim = get_state_dict(plain, plain_optimizer)
    assert all(torch.equal(got_model[k], want_model[k]) for k in want_model)
    assert got_optim["state"].keys() == want_optim["state"].keys()
    for name, state in want_optim["state"].items():
        assert all(torch.equal(got_optim["state"][name][k], v) for k, v in state.items()), name


def test_a_checkpoint_before_the_first_update_changes_nothing(group_of_one, tmp_path):
    """torch creates a missing optimizer state with a zero step that counts as AdamW's first:
    a checkpoint written before any update must not do that, nor store it."""
    from lmdistill.training.sharded import load_shards, read_shard_metadata

    saved, saved_optimizer = _sharded()
    twin, twin_optimizer = _sharded()
    path = _save(saved, saved_optimizer, tmp_path / "checkpoints", 0)
    assert not saved_optimizer.state
    assert not any(key.startswith("optimizer.") for key in read_shard_metadata(path).state_dict_metadata)
    _step(saved, saved_optimizer)
    _step(twin, twin_optimizer)
    assert all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(saved.parameters(), twin.parameters()))
    fresh = tiny_llama(64, hidden=16, layers=2, seed=99)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_shards(path, fresh, fresh_optimizer)
    assert not fresh_optimizer.state  # as it was at the save: the first update makes it


@pytest.mark.parametrize(
    "layers, hidden, says",
    [(1, 16, "weight(s) it does not have"), (3, 16, "weight(s) missing"), (2, 24, "in the checkpoint and")],
)
def test_a_checkpoint_of_another_model_is_refused_not_loaded_in_part(group_of_one, tmp_path, layers, hidden, says):
    from lmdistill.core.errors import CheckpointError
    from lmdistill.training.sharded import load_shards

    model, optimizer = _sharded()
    _step(model, optimizer)
    path = _save(model, optimizer, tmp_path / "checkpoints", 1)
    other = tiny_llama(64, hidden=hidden, layers=layers, seed=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as refused:
        load_shards(path, other, torch.optim.AdamW(other.parameters()))
    assert says in str(refused.value) and "\n" not in str(refused.value)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_a_shard_the_main_process_cannot_see_refuses_the_save(group_of_one, tmp_path):
    """(An output directory that is not shared between machines.) Without the check the
    checkpoint would verify, be picked by --resume, and fail to load."""
    from lmdistill.core.errors import CheckpointError
    from lmdistill.training.checkpoint import make_staging_dir, save_checkpoint, verify_checkpoint
    from lmdistill.training.sharded import save_shards

    model, optimizer = _sharded()
    _step(model, optimizer)
    checkpoints = tmp_path / "checkpoints"
    staged = make_staging_dir(checkpoints, 1)
    save_shards(staged, model, optimizer, 1)
    (staged / "__0_0.distcp").rename(tmp_path / "elsewhere.distcp")
    with pytest.raises(CheckpointError, match="__0_0.distcp is not there.*file system all machines share"):
        save_checkpoint(checkpoints, 1, model_state=None, optimizer_state=None, trainer_state={}, sharded_in=staged)
    assert not (checkpoints / "step-1").exists() and not staged.exists()
    # A manifest that does not list the shard files is not a checkpoint either.
    path = _save(model, optimizer, checkpoints, 2)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["shard_files"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert "without its list of shard files" in verify_checkpoint(path)[0]


def test_a_full_disk_while_writing_shards_is_one_line(group_of_one, tmp_path, monkeypatch):
    import errno
    import os

    from lmdistill.core.errors import CheckpointError
    from lmdistill.training.checkpoint import make_staging_dir
    from lmdistill.training.sharded import save_shards

    model, optimizer = _sharded()
    _step(model, optimizer)
    staged = make_staging_dir(tmp_path / "checkpoints", 1)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError) as refused:
        save_shards(staged, model, optimizer, 1)
    message = str(refused.value)
    assert "No space left on device" in message and "free disk space" in message and "\n" not in message
    assert "--resume" in message and not staged.exists()  # the half-written shards are removed


def test_a_shard_map_that_would_run_code_is_refused(tmp_path):
    import pickle

    from lmdistill.core.errors import CheckpointError
    from lmdistill.training.sharded import read_shard_metadata

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="has no place in a checkpoint's shard map"):
        read_shard_metadata(tmp_path)
    assert not marker.exists()


def test_what_a_resume_can_change_is_checked_before_anything_loads(tmp_path):
    from lmdistill.core.errors import CheckpointError
    from lmdistill.training.checkpoint import check_resumable

    path = tmp_path / "step-4"
    path.mkdir()

    def written(state, layout=None):
        run = {"step": 4, **state}  # (the run's part of the trainer state)
        parts = {"run": run, "data_cursor": {"micro_batches": 8}, "guard": {}, "health": {}}
        (path / "trainer_state.json").write_text(json.dumps(parts))
        manifest = {
            "format": "lmdistill-checkpoint",
            "format_version": 2 if layout else 1,
            "files": {},
            **({"layout": layout} if layout else {}),
        }
        (path / "manifest.json").write_text(json.dumps(manifest))

    written({"processes": 2, "global_batch": 4}, "sharded")
    check_resumable(path, processes=1, batch_size=4, strategy="ddp")  # 2 x 2 continues as 1 x 4
    check_resumable(path, processes=4, batch_size=1, strategy="fsdp")  # or as 4 x 1
    with pytest.raises(CheckpointError, match="global batch of 4 .* resume with --batch-size 4"):
        check_resumable(path, processes=1, batch_size=2, strategy="ddp")
    with pytest.raises(CheckpointError, match="a number of processes that divides 4"):
        check_resumable(path, processes=3, batch_size=1, strategy="ddp")
    written({"processes": 2, "global_batch": 4})
    with pytest.raises(CheckpointError, match="whole weights, not FSDP shards; resume it with parallel.strategy=ddp"):
        check_resumable(path, processes=2, batch_size=2, strategy="fsdp")
    written({"processes": 2})  # an older checkpoint: no global batch recorded, the count must stay
    with pytest.raises(CheckpointError, match="with the same number of processes"):
        check_resumable(path, processes=1, batch_size=4, strategy="ddp")


def test_a_crafted_value_in_the_shards_is_refused_without_suggesting_an_unsafe_load():
    import argparse
    import io
    from types import SimpleNamespace

    from lmdistill.training.sharded import _safe_planner

    crafted = io.BytesIO()
    torch.save({"lr": argparse.Namespace(evil=True)}, crafted)
    crafted.seek(0)
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="optimizer.param_groups"))
    with pytest.raises(
        ValueError, match="optimizer.param_groups holds Python objects.*not a checkpoint lmdistill wrote"
    ) as caught:
        _safe_planner().load_bytes(item, crafted)
    assert "weights_only" not in str(caught.value) and "can still be loaded" not in str(caught.value)
