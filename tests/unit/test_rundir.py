"""RunDirectory: what a surviving process of a multi-process run records when another one died."""

from __future__ import annotations

import json
import os

from lmdistill.core.paths import claim_lock
from lmdistill.training.devices import lost_peer
from lmdistill.training.layout import LOCK
from lmdistill.training.rundir import RunDirectory


def _run_json(tmp_path, status):
    (tmp_path / "run.json").write_text(json.dumps({"status": status, "command": "train", "plan": {"processes": 2}}))
    return RunDirectory(tmp_path)


def test_a_survivor_marks_a_running_run_failed_when_its_main_process_is_gone(tmp_path):
    run = _run_json(tmp_path, "running")
    assert run.record_abandoned("the process of rank 0 of this run died")
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "failed" and info["exit_reason"] == "the process of rank 0 of this run died"
    assert info["plan"] == {"processes": 2} and "finished_at" in info  # the rest is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LOCK, "run.json"])  # no temporary file left


def test_a_survivor_leaves_the_record_to_a_live_main_process_or_a_recorded_end(tmp_path):
    run = _run_json(tmp_path, "running")
    fd = claim_lock(tmp_path / LOCK, "run lock")  # the main process, alive, holds the lock
    try:
        before = (tmp_path / "run.json").read_bytes()
        assert not run.record_abandoned("gone")
        assert (tmp_path / "run.json").read_bytes() == before
    finally:
        os.close(fd)
    _run_json(tmp_path, "interrupted")
    assert not run.record_abandoned("gone")
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
    assert not RunDirectory(tmp_path / "elsewhere").record_abandoned("gone")  # no run.json here: nothing written
    assert not (tmp_path / "elsewhere").exists()


def test_lost_peer_knows_gloo_connection_errors_only():
    assert lost_peer(
        RuntimeError(
            "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:3443: Connection reset "
            "by peer. This is typically caused by a remote worker hanging"
        )
    )
    assert lost_peer(RuntimeError("[pair.cc:590] Connection closed by peer [10.0.0.2]:29500"))
    assert not lost_peer(RuntimeError("CUDA out of memory"))
    assert not lost_peer(OSError("Connection reset by peer"))  # not a collective's error
