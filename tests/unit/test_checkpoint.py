"""Checkpoint storage: round trip, integrity checks, retention and failure handling.

Failures are simulated by monkeypatching the module's write/remove functions, not with
chmod, because these tests often run as root, whom permission bits do not stop.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmdistill.core.errors import CheckpointError, LmdistillError
from lmdistill.core.files import directory_hash
from lmdistill.training import checkpoint as ckpt
from lmdistill.training.checkpoint import (
    capture_rng_state,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from lmdistill.training.layout import MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE


class SimulatedCrash(BaseException):
    """Stands for the process dying: not an Exception, so nothing may swallow it."""


def tiny_llama(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 64, (2, 8), generator=generator)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def small_state(value: float = 0.0) -> dict:
    """A cheap stand-in model/optimizer state for tests that only care about files."""
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    with torch.no_grad():  # after the step, so the weights tell checkpoints apart exactly
        layer.weight.fill_(value)
        layer.bias.fill_(value)
    return {"model_state": layer.state_dict(), "optimizer_state": optimizer.state_dict()}


def save_small(checkpoints_dir: Path, step: int, value: float = 0.0, **kwargs) -> Path:
    return save_checkpoint(
        checkpoints_dir,
        step,
        trainer_state={"step": step, "epoch": 0},
        **small_state(value),
        **kwargs,
    )


@pytest.fixture
def ckdir(tmp_path: Path) -> Path:
    return tmp_path / "run" / "checkpoints"


# --------------------------------------------------------------------------- round trip


def test_round_trip_restores_weights_optimizer_trainer_state_and_rng(ckdir: Path) -> None:
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_step(model, optimizer, seed=1)
    trainer_state = {
        "step": 1,
        "epoch": 0,
        "data_position": {"block": 17, "shuffle_seed": 3},
        "monitor": {"losses": [4.1, 4.0], "last_nan_step": None},
    }
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    path = save_checkpoint(
        ckdir,
        1,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        trainer_state=trainer_state,
        rng_state=capture_rng_state(),
        extra_files={"config.yaml": b"kd_temperature: 2.0\n"},
    )
    expected_draws = (random.random(), np.random.rand(3).tolist(), torch.rand(3))
    assert path == ckdir / "step-1"
    assert verify_checkpoint(path) == []

    # A fresh model and optimizer, loaded from disk, must continue exactly like the original.
    loaded = load_checkpoint(path)
    resumed = tiny_llama(seed=99)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(loaded.model_state)
    resumed_optimizer.load_state_dict(loaded.optimizer_state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    for param_id, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            assert torch.equal(value, resumed_optimizer.state_dict()["state"][param_id][key]), key
    assert loaded.step == 1
    assert loaded.trainer_state == trainer_state
    assert loaded.extra_files == {"config.yaml": b"kd_temperature: 2.0\n"}

    train_step(model, optimizer, seed=2)
    train_step(resumed, resumed_optimizer, seed=2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(loaded.rng_state)
    assert random.random() == expected_draws[0]
    assert np.random.rand(3).tolist() == expected_draws[1]
    assert torch.equal(torch.rand(3), expected_draws[2])


def fd_name(fd: int) -> str:
    """The name of the file an open descriptor refers to (Linux: through /proc)."""
    return Path(os.readlink(f"/proc/self/fd/{fd}")).name


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to name descriptors")


@needs_proc
def test_save_syncs_every_file_then_the_manifest_then_renames_the_synced_directory(ckdir: Path, monkeypatch) -> None:
    """What reaches the disk in which order, seen at the os level: every file is fsync'd before the
    manifest, the manifest before its directory, the directory before it is renamed in."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", fd_name(fd)))

    def replace(src, dst) -> None:
        real_replace(src, dst)
        events.append(("rename", f"{Path(src).name}->{Path(dst).name}"))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_small(ckdir, 7, rng_state=capture_rng_state(), extra_files={"config.yaml": b"a: 1\n"})

    tmp_name = f".tmp-step-7-{os.getpid()}"
    manifest_at = events.index(("fsync", MANIFEST_FILE))
    assert {name for _, name in events[:manifest_at]} == {
        MODEL_FILE,
        OPTIMIZER_FILE,
        "rng_state.pt",
        "trainer_state.json",
        "config.yaml",
    }
    assert events[manifest_at + 1 :] == [
        ("fsync", tmp_name),
        ("rename", f"{tmp_name}->step-7"),
        ("fsync", "checkpoints"),
    ]
    manifest = json.loads((ckdir / "step-7" / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1 and manifest["step"] == 7  # one file: what version-1 readers load
    assert sorted(manifest["files"]) == sorted(
        ["config.yaml", MODEL_FILE, OPTIMIZER_FILE, "rng_state.pt", "trainer_state.json"]
    )
    for name, record in manifest["files"].items():
        assert record["size"] == (ckdir / "step-7" / name).stat().st_size


def test_tied_weights_are_stored_once_and_relinked_on_load(ckdir: Path) -> None:
    model = tiny_llama(tie=True)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer, seed=1)
    path = save_checkpoint(
        ckdir,
        1,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        trainer_state={},
    )

    loaded = load_checkpoint(path)
    assert loaded.tied_weights == {"lm_head.weight": "model.embed_tokens.weight"}
    assert loaded.model_state["lm_head.weight"] is loaded.model_state["model.embed_tokens.weight"]
    assert set(loaded.model_state) == set(model.state_dict())
    resumed = tiny_llama(tie=True, seed=5)
    resumed.load_state_dict(loaded.model_state)
    assert resumed.lm_head.weight is resumed.model.embed_tokens.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_tensors_sharing_one_buffer_without_being_tied_are_stored_separately(ckdir: Path) -> None:
    fused = torch.arange(12, dtype=torch.float32)
    state = {"a": fused[:6].view(2, 3), "b": fused[6:], "c": fused[:6].view(3, 2).t()}
    save_checkpoint(ckdir, 0, model_state=state, optimizer_state=None, trainer_state={})
    loaded = load_checkpoint(ckdir / "step-0")
    assert loaded.tied_weights == {}
    assert loaded.optimizer_state is None and loaded.rng_state is None
    for name, tensor in state.items():
        assert torch.equal(loaded.model_state[name], tensor), name


# --------------------------------------------------------------------------- retention


def test_retention_keeps_newest_k_and_removes_oldest_first(ckdir: Path, monkeypatch) -> None:
    for step in (10, 20, 30):
        save_small(ckdir, step, keep=None)
    removed: list[str] = []
    real_remove = ckpt._remove_dir_crash_safe

    def recording_remove(path: Path) -> None:
        removed.append(path.name)
        real_remove(path)

    monkeypatch.setattr(ckpt, "_remove_dir_crash_safe", recording_remove)
    save_small(ckdir, 40, keep=2)
    assert removed == ["step-10", "step-20"]
    assert [p.name for p in list_checkpoints(ckdir)] == ["step-30", "step-40"]
    save_small(ckdir, 50, keep=2)
    assert [p.name for p in list_checkpoints(ckdir)] == ["step-40", "step-50"]
    assert sorted(os.listdir(ckdir)) == ["step-40", "step-50"]  # no temp or trash left


def test_retention_does_not_count_invalid_checkpoints(ckdir: Path) -> None:
    for step in (1, 2, 3):
        save_small(ckdir, step, keep=None)
    (ckdir / "step-3" / MODEL_FILE).write_bytes(b"")  # step-3 is corrupt
    save_small(ckdir, 4, keep=2)
    # step-4 and step-2 are the two newest valid ones; the corrupt step-3 between them stays
    # (it may be evidence), step-1 goes.
    assert [p.name for p in list_checkpoints(ckdir)] == ["step-2", "step-3", "step-4"]


def test_crash_during_cleanup_leaves_newest_valid_checkpoint(ckdir: Path, monkeypatch) -> None:
    for step in (1, 2, 3):
        save_small(ckdir, step, keep=None)
    real_rmtree = shutil.rmtree

    def crash_midway(path, *args, **kwargs):
        # Delete one file of the victim, then "die": a half-removed directory.
        victim = Path(path)
        if victim.name.startswith(".trash-"):
            (victim / MODEL_FILE).unlink()
            raise SimulatedCrash
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash_midway)
    with pytest.raises(SimulatedCrash):
        save_small(ckdir, 4, keep=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)

    latest, warnings = find_latest_valid(ckdir)
    assert latest == ckdir / "step-4" and warnings == []
    # The half-removed victim was renamed first, so it is not mistaken for a checkpoint.
    assert [p.name for p in list_checkpoints(ckdir)] == ["step-2", "step-3", "step-4"]
    assert all(verify_checkpoint(p) == [] for p in list_checkpoints(ckdir))
    assert any(name.startswith(".trash-") for name in os.listdir(ckdir))

    save_small(ckdir, 5, keep=1)  # the next save finishes the job
    assert sorted(os.listdir(ckdir)) == ["step-5"]


def test_failed_cleanup_does_not_fail_the_save(ckdir: Path, monkeypatch, caplog) -> None:
    save_small(ckdir, 1, keep=None)

    def failing_remove(path: Path) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy", str(path))

    monkeypatch.setattr(ckpt, "_remove_dir_crash_safe", failing_remove)
    with caplog.at_level("WARNING", logger="lmdistill.training.checkpoint"):
        path = save_small(ckdir, 2, keep=1)
    assert path == ckdir / "step-2" and verify_checkpoint(path) == []
    assert "step-1" in caplog.text


# --------------------------------------------------------------------------- integrity


def test_truncated_file_is_detected_and_previous_checkpoint_used(ckdir: Path) -> None:
    save_small(ckdir, 1, value=1.0)
    save_small(ckdir, 2, value=2.0)
    model_file = ckdir / "step-2" / MODEL_FILE
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])

    latest, warnings = find_latest_valid(ckdir)
    assert latest == ckdir / "step-1"
    assert len(warnings) == 1
    assert "step-2" in warnings[0] and MODEL_FILE in warnings[0] and "size mismatch" in warnings[0]
    with pytest.raises(CheckpointError, match="step-2.*model.safetensors.*size mismatch"):
        load_checkpoint(ckdir / "step-2")
    assert torch.all(load_checkpoint(latest).model_state["weight"] == 1.0)


def test_flipped_byte_is_detected_by_hash(ckdir: Path) -> None:
    save_small(ckdir, 1)
    save_small(ckdir, 2)
    optimizer_file = ckdir / "step-2" / OPTIMIZER_FILE
    data = bytearray(optimizer_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    optimizer_file.write_bytes(bytes(data))

    problems = verify_checkpoint(ckdir / "step-2")
    assert len(problems) == 1 and OPTIMIZER_FILE in problems[0] and "hash mismatch" in problems[0]
    assert verify_checkpoint(ckdir / "step-2", check_hashes=False) == []
    latest, warnings = find_latest_valid(ckdir)
    assert latest == ckdir / "step-1"
    assert "step-2" in warnings[0] and OPTIMIZER_FILE in warnings[0]
    with pytest.raises(CheckpointError, match="optimizer.pt.*hash mismatch"):
        load_checkpoint(ckdir / "step-2")


def test_missing_manifest_means_incomplete(ckdir: Path) -> None:
    save_small(ckdir, 1)
    save_small(ckdir, 2)
    (ckdir / "step-2" / MANIFEST_FILE).unlink()
    latest, warnings = find_latest_valid(ckdir)
    assert latest == ckdir / "step-1"
    assert "step-2" in warnings[0] and MANIFEST_FILE in warnings[0] and "incomplete" in warnings[0]


def test_newer_format_version_is_refused(ckdir: Path) -> None:
    path = save_small(ckdir, 1)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["format_version"] = ckpt.FORMAT_VERSION + 1
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="upgrade lmdistill"):
        load_checkpoint(path)


def test_leftover_temp_dir_is_ignored_then_cleaned_up(ckdir: Path) -> None:
    save_small(ckdir, 1)
    leftover = ckdir / ".tmp-step-2-12345"  # a save of step 2 that died before its manifest
    leftover.mkdir()
    (leftover / MODEL_FILE).write_bytes(b"partial")
    (ckdir / "notes").mkdir()  # not ours: ignored and never touched

    latest, warnings = find_latest_valid(ckdir)
    assert latest == ckdir / "step-1" and warnings == []
    assert [p.name for p in list_checkpoints(ckdir)] == ["step-1"]
    save_small(ckdir, 3)
    assert not leftover.exists() and (ckdir / "notes").is_dir()


def test_files_lmdistill_did_not_write_are_never_deleted(ckdir: Path, caplog) -> None:
    for step in (1, 2):
        save_small(ckdir, step, keep=None)
    (ckdir / "step-1" / "mine.txt").write_text("notes")  # not in step-1's manifest (#3)
    for name in (".trash-keep", ".tmp-backup"):  # the user's, not a leftover of lmdistill's (#4)
        (ckdir / name).mkdir()
        (ckdir / name / "x").write_text("x")
    save_small(ckdir, 3, keep=1)
    assert (ckdir / "step-1" / "mine.txt").read_text() == "notes"
    assert "step-1/mine.txt" in caplog.text
    assert not (ckdir / "step-2").exists()  # lmdistill's own old checkpoint still goes
    ckpt.remove_leftovers(ckdir)
    assert (ckdir / ".trash-keep" / "x").exists() and (ckdir / ".tmp-backup" / "x").exists()


def test_find_latest_valid_on_missing_or_empty_dir(tmp_path: Path) -> None:
    assert find_latest_valid(tmp_path / "nope") == (None, [])
    assert find_latest_valid(tmp_path) == (None, [])


# --------------------------------------------------------------------------- failures


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@needs_proc
@pytest.mark.parametrize("failing_file", [MODEL_FILE, OPTIMIZER_FILE, "rng_state.pt", MANIFEST_FILE])
def test_failing_write_raises_and_keeps_previous_checkpoint(ckdir: Path, monkeypatch, failing_file: str) -> None:
    """A full disk met while one file is written, the manifest (the last) included: nothing of the
    new checkpoint is published, no staging directory is left, and the previous one is intact."""
    previous = save_small(ckdir, 1, value=1.0)
    before = _snapshot(previous)
    real_fsync = os.fsync

    def disk_full_at(fd: int) -> None:
        if fd_name(fd) == failing_file:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_at)
    with pytest.raises(CheckpointError) as info:
        save_small(ckdir, 2, value=2.0, rng_state=capture_rng_state())
    message = str(info.value)
    assert "\n" not in message
    assert str(ckdir / "step-2") in message
    assert "No space left" in message and "free disk space" in message
    assert isinstance(info.value, LmdistillError) and info.value.exit_code == 2

    assert sorted(os.listdir(ckdir)) == ["step-1"]  # nothing renamed in, temp dir removed
    assert _snapshot(previous) == before
    assert find_latest_valid(ckdir) == (previous, [])
    assert torch.all(load_checkpoint(previous).model_state["weight"] == 1.0)


@pytest.mark.parametrize("full", [True, False])
def test_torch_save_failing_mid_write_is_one_line_and_keeps_previous_checkpoint(
    ckdir: Path, monkeypatch, full: bool
) -> None:
    # On a full disk torch.save does not raise the OSError: its zip writer notices the short
    # write and raises "[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662".
    previous = save_small(ckdir, 1, value=1.0)
    before = _snapshot(previous)
    real_save, real_statvfs = torch.save, os.statvfs

    def short_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    def statvfs(path):
        stats = real_statvfs(path)
        return os.statvfs_result((*stats[:4], 0 if full else stats.f_bavail, *stats[5:]))

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(os, "statvfs", statvfs)
    with pytest.raises(CheckpointError) as info:
        save_small(ckdir, 2, value=2.0)
    message = str(info.value)
    assert "\n" not in message and str(ckdir / "step-2") in message and "--resume" in message
    if full:
        assert "No space left on device" in message and "free disk space" in message
    else:
        assert "Input/output error" in message and "unexpected pos" in message
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(ckdir)) == ["step-1"]  # no half-written step-2, no staging directory
    assert _snapshot(previous) == before
    assert find_latest_valid(ckdir) == (previous, [])
    assert torch.all(load_checkpoint(previous).model_state["weight"] == 1.0)


def test_a_runtime_error_that_is_not_a_write_is_not_called_one(ckdir: Path, monkeypatch) -> None:
    def broken(obj, f, *args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="something else"):
        save_small(ckdir, 1)
    assert not ckdir.exists() or os.listdir(ckdir) == []


def test_failing_model_write_raises_checkpoint_error(ckdir: Path, monkeypatch) -> None:
    previous = save_small(ckdir, 1)

    def failing_save_file(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt.safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(CheckpointError, match="step-2.*Input/output error"):
        save_small(ckdir, 2)
    assert find_latest_valid(ckdir) == (previous, [])
    assert sorted(os.listdir(ckdir)) == ["step-1"]


def test_failing_final_rename_keeps_previous_checkpoint(ckdir: Path, monkeypatch) -> None:
    previous = save_small(ckdir, 1)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(errno.EACCES, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="make .* writable"):
        save_small(ckdir, 2)
    assert sorted(os.listdir(ckdir)) == ["step-1"]
    assert find_latest_valid(ckdir) == (previous, [])


def _blocks_writes(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        probe.mkdir()
    except OSError:
        return True
    probe.rmdir()
    return False


def test_read_only_directory_raises_checkpoint_error(ckdir: Path) -> None:
    """chmod blocks writes for a normal user; root ignores modes, so there the directory is made
    read-only for real with a read-only bind mount of itself."""
    import subprocess

    previous = save_small(ckdir, 1)
    ckdir.chmod(0o555)
    mounted = False
    try:
        if not _blocks_writes(ckdir):
            mounted = (
                subprocess.run(["mount", "-o", "bind,ro", str(ckdir), str(ckdir)], capture_output=True).returncode == 0
            )
            if not mounted:
                pytest.skip("root without the right to mount: neither chmod nor a read-only mount can block writes")
        assert _blocks_writes(ckdir)
        with pytest.raises(CheckpointError, match="could not write checkpoint .*step-2"):
            save_small(ckdir, 2)
    finally:
        if mounted:
            subprocess.run(["umount", str(ckdir)], check=True)
        ckdir.chmod(0o755)
    assert find_latest_valid(ckdir) == (previous, [])


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_tensor_is_refused_and_nothing_renamed_in(ckdir: Path, where: str) -> None:
    previous = save_small(ckdir, 1)
    before = _snapshot(previous)
    state = small_state()
    if where == "model":
        state["model_state"]["bias"][1] = float("nan")
        expected = r"model_state\['bias'\]"
    else:
        next(iter(state["optimizer_state"]["state"].values()))["exp_avg"].view(-1)[0] = float("inf")
        expected = r"optimizer_state\['state'\]\[0\]\['exp_avg'\]"

    with pytest.raises(CheckpointError, match=expected):
        save_checkpoint(ckdir, 2, trainer_state={}, **state)
    assert sorted(os.listdir(ckdir)) == ["step-1"]
    assert _snapshot(previous) == before


# --------------------------------------------------------------------------- re-save


def test_resaving_existing_step_replaces_it(ckdir: Path) -> None:
    save_small(ckdir, 1, value=1.0)
    save_small(ckdir, 2, value=2.0)
    path = save_small(ckdir, 2, value=5.0)
    assert path == ckdir / "step-2"
    assert sorted(os.listdir(ckdir)) == ["step-1", "step-2"]
    assert torch.all(load_checkpoint(path).model_state["weight"] == 5.0)


def test_failed_resave_keeps_the_old_copy_of_that_step(ckdir: Path, monkeypatch) -> None:
    old = save_small(ckdir, 2, value=2.0)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(CheckpointError):
        save_small(ckdir, 2, value=5.0)
    assert sorted(os.listdir(ckdir)) == ["step-2"]
    assert torch.all(load_checkpoint(old).model_state["weight"] == 2.0)


# --------------------------------------------------------------------------- misc


def test_bad_arguments_are_rejected_before_writing(ckdir: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        save_small(ckdir, 1, keep=0)
    with pytest.raises(ValueError, match="step"):
        save_small(ckdir, -1)
    with pytest.raises(ValueError, match="extra file name"):
        save_small(ckdir, 1, extra_files={MANIFEST_FILE: b"{}"})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(ckdir, 1, trainer_state={"path": Path("x")}, **small_state())
    assert not ckdir.exists() or os.listdir(ckdir) == []


def test_directory_hash_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    model_dir = tmp_path / "teacher"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "config.json").write_text('{"a": 1}')
    (model_dir / "sub" / "model.safetensors").write_bytes(b"\x00" * 100)
    first = directory_hash(model_dir)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    os.utime(copy / "config.json", (0, 0))
    (copy / ".cache").mkdir()  # download metadata is not model content
    (copy / ".cache" / "x.lock").write_text("lock")
    assert directory_hash(copy) == first

    (copy / "config.json").write_text('{"a": 2}')
    assert directory_hash(copy) != first
    (copy / "config.json").write_text('{"a": 1}')
    (copy / "config.json").rename(copy / "config2.json")
    assert directory_hash(copy) != first
    with pytest.raises(CheckpointError, match="not a directory"):
        directory_hash(tmp_path / "missing")


def test_overwrite_counts_a_user_directory_named_like_a_leftover_as_foreign(ckdir: Path) -> None:
    from lmdistill.training.rundir import RunDirectory

    save_small(ckdir, 1)
    (ckdir / ".trash-keep").mkdir()
    (ckdir / ".tmp-step-2-123").mkdir()  # a leftover of lmdistill's own
    assert RunDirectory(ckdir.parent).foreign_entries() == ["checkpoints/.trash-keep"]
