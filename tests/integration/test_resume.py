"""Checkpoints that survive a kill, and resume that is bit-exact on the CPU.

Runs that must die (a SIGKILL, or the kill drill's ``os._exit``) are real processes forked from
a warm server (forked.py); the runs that finish go through ``cli.main`` in this process.
"""

from __future__ import annotations

import json
import random
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, read_jsonl
from forked import run_cli_forked, start_cli

pytestmark = pytest.mark.slow

STEPS = 14


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, corpus_texts):
    """A few dozen blocks: 8 or so steps per epoch at batch 2 x grad_accum 2, so 14 steps cross an epoch."""
    path = tmp_path_factory.mktemp("resume-data") / "small.txt"
    path.write_text("\n\n".join(corpus_texts)[:3000])
    return path


def _train_args(teacher_dir, data, out, *extra, steps=STEPS):
    return (
        "train",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--max-steps",
        str(steps),
        "--eval-every",
        "5",
        "--set",
        "data.block_size=32",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep=2",
        "--set",
        "model.student_config={num_hidden_layers: 1, hidden_size: 16, intermediate_size: 32, "
        "num_attention_heads: 2, num_key_value_heads: 2}",
        "--no-progress",
        *extra,
    )


def _losses(run_dir):
    return {
        r["step"]: (r["loss"], r["kd_loss"], r["ce_loss"], r["grad_norm"])
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if "loss" in r and "skipped" not in r
    }


def _weights(run_dir):
    return load_file(run_dir / "student" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher_dir, small_text):
    out = tmp_path_factory.mktemp("resume") / "full"
    proc = cli(*_train_args(teacher_dir, small_text, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_run_crosses_an_epoch(uninterrupted):
    epochs = {r["epoch"] for r in read_jsonl(uninterrupted / "metrics.jsonl") if "epoch" in r}
    assert epochs == {0, 1}


@pytest.mark.parametrize("stop_at", [4, 10], ids=["mid-epoch", "after-epoch-boundary"])
def test_resumed_run_is_bit_exact(tmp_path, teacher_dir, small_text, uninterrupted, stop_at):
    out = tmp_path / "resumed"
    log = tmp_path / "first.log"
    first = run_cli_forked(
        *_train_args(teacher_dir, small_text, out, "--set", f"debug.exit_after_step={stop_at}"), log=str(log)
    )
    assert first == 137, log.read_text()[-2000:]
    assert not (out / "student").exists()
    # A run killed mid-way still gets a report from what is on disk.
    report = cli("report", str(out))
    assert report.returncode == 0, report.stderr[-2000:]
    assert "killed" in (out / "report.md").read_text()
    # A plain re-run refuses and says how to continue.
    refused = cli(*_train_args(teacher_dir, small_text, out))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = cli(*_train_args(teacher_dir, small_text, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step-{stop_at}" in resumed.stdout
    assert _losses(out) == _losses(uninterrupted)  # every per-step value, exactly
    want, got = _weights(uninterrupted), _weights(out)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_kill_at_random_moments(tmp_path, teacher_dir, small_text):
    """SIGKILL at 14 random moments of training (many inside a checkpoint save), resume each time."""
    steps = 200  # long enough that 14 short-lived attempts cannot finish it (each trains < 0.5 s)
    reference = tmp_path / "reference"
    # (the reference writes no checkpoint on the way: saving one never changes the run)
    done = cli(*_train_args(teacher_dir, small_text, reference, "--set", f"checkpoint.every={steps}", steps=steps))
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "killed"
    metrics, log = out / "metrics.jsonl", tmp_path / "attempts.log"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(40):
        args = _train_args(teacher_dir, small_text, out, *(("--resume",) if attempt else ()), steps=steps)
        started = time.time()
        proc = start_cli(*args, log=str(log))
        if kills < 14:
            # Wait until this attempt is training (it rewrites metrics.jsonl on resume), then kill at a
            # random moment of the next 0.5 s: every step writes a checkpoint, so many kills hit a save.
            while proc.is_alive() and not (metrics.exists() and metrics.stat().st_mtime > started):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))
            if proc.is_alive():
                proc.kill()  # SIGKILL
                kills += 1
        proc.join(600)
        if proc.exitcode == 0:
            break
    assert kills >= 14
    assert proc.exitcode == 0, log.read_text()[-2000:]
    want, got = _weights(reference), _weights(out)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert _losses(out) == _losses(reference)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, teacher_dir, small_text, uninterrupted):
    out = tmp_path / "corrupt"
    first = run_cli_forked(*_train_args(teacher_dir, small_text, out, "--set", "debug.exit_after_step=6"))
    assert first == 137
    newest = out / "checkpoints" / "step-6" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    newest.write_bytes(bytes(data))
    # --resume takes the run's saved config, drill included; a flag on top switches the drill off.
    resumed = cli(*_train_args(teacher_dir, small_text, out, "--resume", "--set", "debug.exit_after_step=null"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step-6" in resumed.stdout and "model.safetensors" in resumed.stdout  # the warning names the bad file
    assert "from step-5" in resumed.stdout
    want, got = _weights(uninterrupted), _weights(out)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_failing_disk_write_stops_cleanly_and_keeps_the_previous_checkpoint(
    tmp_path, teacher_dir, small_text, monkeypatch
):
    import errno

    import lmdistill.core.files as files
    from lmdistill.config import Config
    from lmdistill.core.errors import CheckpointError
    from lmdistill.training.checkpoint import find_latest_valid, load_checkpoint
    from lmdistill.training.trainer import train

    real_write = files.write_file
    calls = {"n": 0}

    def flaky_write(path, write):
        if "step-3" in str(path.parent):
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        return real_write(path, write)

    monkeypatch.setattr(files, "write_file", flaky_write)  # what a checkpoint's files are written with
    out = tmp_path / "run"
    cfg = Config.load(
        None,
        [
            f"model.teacher={teacher_dir}",
            f"data.path={small_text}",
            f"run.output_dir={out}",
            "run.device=cpu",
            "data.block_size=32",
            "train.batch_size=2",
            "train.max_steps=6",
            "checkpoint.every=1",
            "model.student_config={num_hidden_layers: 1, hidden_size: 16, "
            "intermediate_size: 32, num_attention_heads: 2, num_key_value_heads: 2}",
        ],
    )
    with pytest.raises(CheckpointError) as info:
        train(cfg, progress=False, print_summary=False)
    message = str(info.value)
    assert "\n" not in message and "step-3" in message
    newest, warnings = find_latest_valid(out / "checkpoints")
    assert newest.name == "step-2" and not warnings
    assert load_checkpoint(newest).step == 2
    assert not list((out / "checkpoints").glob("step-3*"))
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
