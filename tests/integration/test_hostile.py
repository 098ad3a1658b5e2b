"""What a careless or unlucky user does, through the real command line.

Each case: one line on stderr naming the problem and the fix, a non-zero exit, no traceback
(``cli`` runs ``cli.main`` in this process: an exception escaping it fails the test), and
nothing lost or mixed on disk. Runs that must be real processes (a second writer holding the
lock, a signal) are forked from a warm server (forked.py).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import cli, read_jsonl, tiny_llama
from forked import start_cli

SMALL_STUDENT = ("model.student_config={num_hidden_layers: 1, hidden_size: 16, intermediate_size: 32, "
                 "num_attention_heads: 2, num_key_value_heads: 2}")


def _args(teacher_dir, data, out, *extra, steps=4):
    return ("train", "--teacher", str(teacher_dir), "--data", str(data), "--output-dir", str(out), "--batch-size",
            "2", "--max-steps", str(steps), "--set", "data.block_size=32", "--set", SMALL_STUDENT,
            "--set", "data.max_eval_blocks=4", "--no-progress", *extra)


def _one_error_line(proc, *needles: str, code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("lmdistill: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tmp_path, teacher_dir, text_file) -> Path:
    out = tmp_path / "run"
    assert cli(*_args(teacher_dir, text_file, out)).returncode == 0
    return out


# --------------------------------------------------------------------------- --overwrite
def test_overwrite_of_a_directory_lmdistill_did_not_write_is_refused(tmp_path, teacher_dir, text_file):
    project = tmp_path / "myproject"
    project.mkdir()
    (project / "config.yaml").write_text("my: own config\n")
    (project / "notes.txt").write_text("keep me")
    before = _tree(project)
    line = _one_error_line(cli(*_args(teacher_dir, text_file, project, "--overwrite")), "not an lmdistill run")
    assert "--overwrite" not in line  # never suggested for a directory that is not a run
    assert _tree(project) == before


@pytest.mark.parametrize("where", ["cwd", "parent", "home"])
def test_overwrite_never_empties_the_current_a_parent_or_the_home_directory(finished_run, teacher_dir, text_file,
                                                                          monkeypatch, where):
    """Even when the directory is an lmdistill run."""
    before = _tree(finished_run)
    if where == "cwd":
        monkeypatch.chdir(finished_run)
        target = Path(".")
    elif where == "parent":
        (finished_run / "checkpoints" / "sub").mkdir()
        monkeypatch.chdir(finished_run / "checkpoints" / "sub")
        target = finished_run
    else:
        monkeypatch.setenv("HOME", str(finished_run))
        target = finished_run
    what = {"cwd": "the current directory", "parent": "a parent of the current directory",
            "home": "your home directory"}[where]
    _one_error_line(cli(*_args(teacher_dir, text_file, target, "--overwrite")), "refusing --overwrite", what)
    (finished_run / "checkpoints" / "sub").rmdir() if where == "parent" else None
    assert _tree(finished_run) == before


def test_overwrite_of_a_run_with_foreign_files_is_refused_and_of_a_clean_run_works(finished_run, teacher_dir,
                                                                                  text_file):
    (finished_run / "notes.txt").write_text("mine")
    before = _tree(finished_run)
    _one_error_line(cli(*_args(teacher_dir, text_file, finished_run, "--overwrite")), "notes.txt",
                    "files lmdistill did not write")
    assert _tree(finished_run) == before
    (finished_run / "notes.txt").unlink()
    old_metrics = (finished_run / "metrics.jsonl").read_text()
    proc = cli(*_args(teacher_dir, text_file, finished_run, "--overwrite", steps=2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (finished_run / ".lmdistill-run").is_file()
    lines = read_jsonl(finished_run / "metrics.jsonl")
    assert max(r["step"] for r in lines if "loss" in r) == 1 and old_metrics != (finished_run / "metrics.jsonl").read_text()


# --------------------------------------------------------------------------- one writer per run
@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    first = start_cli(*_args(teacher_dir, text_file, out, steps=100_000), log=str(tmp_path / "first.log"))
    lock = out / ".lmdistill.lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().strip()) and time.time() < deadline and first.is_alive():
        time.sleep(0.05)
    try:
        holder = f"pid {first.pid} on "
        for extra in (("--resume",), ("--overwrite",), ()):
            _one_error_line(cli(*_args(teacher_dir, text_file, out, *extra)), "in use by another lmdistill process",
                            holder)
    finally:
        first.kill()  # SIGKILL: no clean-up runs; the OS releases the lock
        first.join(60)
    resumed = cli(*_args(teacher_dir, text_file, out, "--resume", steps=3))
    assert resumed.returncode == 0, resumed.stderr[-2000:]


# --------------------------------------------------------------------------- checked before step 0
def test_an_impossible_student_shape_is_refused_before_training(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    proc = cli("train", "--teacher", str(teacher_dir), "--data", str(text_file), "--output-dir", str(out),
               "--max-steps", "3", "--set", "model.student_config={hidden_size: 7}")
    _one_error_line(proc, "model.student_config", "hidden size (7) is not a multiple")
    assert not out.exists()


def test_bidirectional_models_are_refused(tmp_path, teacher_dir, text_file, tiny_tokenizer):
    from transformers import BertConfig, BertLMHeadModel

    bert = tmp_path / "bert"
    BertLMHeadModel(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    tiny_tokenizer.save_pretrained(bert)
    out = tmp_path / "run"
    _one_error_line(cli("train", "--teacher", str(bert), "--data", str(text_file), "--output-dir", str(out)),
                    "teacher", "BertLMHeadModel", "not a causal language model")
    _one_error_line(cli("train", "--teacher", str(teacher_dir), "--student", str(bert), "--data", str(text_file),
                        "--output-dir", str(out)), "student", "not a causal language model")
    assert not out.exists()


# --------------------------------------------------------------------------- file system failures
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, teacher_dir, text_file,
                                                                                 monkeypatch):
    import lmdistill.checkpoint as ckpt

    real_write = ckpt._write_file

    def full_disk(path, write):
        if "step-4" in str(path.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, write)

    monkeypatch.setattr(ckpt, "_write_file", full_disk)
    out = tmp_path / "run"
    proc = cli(*_args(teacher_dir, text_file, out, "--set", "checkpoint.every=2", steps=6))
    _one_error_line(proc, "step-4", "No space left on device", "free disk space")
    assert ckpt.find_latest_valid(out / "checkpoints") == (out / "checkpoints" / "step-2", [])
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_write_failures_of_eval_and_export_are_one_line(finished_run, tmp_path, monkeypatch):
    import lmdistill.paths as paths

    _one_error_line(cli("eval", str(finished_run), "--json", str(tmp_path), "--no-progress"), "is a directory")
    _one_error_line(cli("eval", str(finished_run), "--json", str(tmp_path / "no" / "e.json"), "--no-progress"),
                    "does not exist")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _one_error_line(cli("export", str(finished_run), str(a_file)), "is a file")
    assert a_file.read_text() == "x"

    def read_only(path, data, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(paths, "atomic_write", read_only)
    _one_error_line(cli("eval", str(finished_run), "--json", str(tmp_path / "e.json"), "--no-progress"),
                    "Read-only file system", "e.json", "write somewhere else")


def test_a_config_file_that_is_not_utf8_or_is_a_directory(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    _one_error_line(cli("train", "--config", str(latin)), "not UTF-8", "save it as UTF-8")
    _one_error_line(cli("train", "--config", str(tmp_path)), "is a directory")


# --------------------------------------------------------------------------- options and messages
def test_eval_temperature_must_be_positive(finished_run):
    for value in ("0", "-3", "nan"):
        _one_error_line(cli("eval", str(finished_run), "--temperature", value), "--temperature", "> 0")


def test_resume_of_nothing_starts_a_new_run_and_damaged_checkpoints_are_refused(tmp_path, teacher_dir, text_file):
    out = tmp_path / "never-ran"
    proc = cli(*_args(teacher_dir, text_file, out, "--resume", steps=2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "starting the run from step 0" in proc.stdout
    damaged = tmp_path / "damaged"
    assert cli(*_args(teacher_dir, text_file, damaged, "--set", "checkpoint.every=1", "--set",
                      "debug.exit_after_step=null", steps=3)).returncode == 0
    (damaged / "student").rename(tmp_path / "student-aside")  # an unfinished run again
    info = json.loads((damaged / "run.json").read_text())
    (damaged / "run.json").write_text(json.dumps({**info, "status": "running"}))
    for step_dir in (damaged / "checkpoints").iterdir():
        (step_dir / "model.safetensors").write_bytes(b"corrupt")
    metrics = (damaged / "metrics.jsonl").read_text()
    _one_error_line(cli(*_args(teacher_dir, text_file, damaged, "--resume", steps=3)),
                    "no valid checkpoint to resume", "model.safetensors", "--overwrite")
    assert (damaged / "metrics.jsonl").read_text() == metrics  # nothing restarted from step 0


def test_misleading_inputs_get_messages_that_say_what_is_wrong(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    _one_error_line(cli("train", "--teacher", str(teacher_dir), "--student", str(teacher_dir / "config.json"),
                        "--data", str(text_file), "--output-dir", str(out)), "is a file", "directory")
    _one_error_line(cli("train", "--set", "data.block_size=0", "--output-dir", str(out)), "data.block_size", ">= 2")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    _one_error_line(cli(*_args(teacher_dir, latin, out)), "not UTF-8 text", "convert it to UTF-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut\n')
    proc = cli(*_args(teacher_dir, broken, out))
    _one_error_line(proc, "could not read data.path")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_guard_stop_without_a_checkpoint_says_so(tmp_path, teacher_dir, text_file):
    faults = ", ".join(f"{{step: {s}, where: loss, value: nan}}" for s in range(0, 6))
    out = tmp_path / "run"
    proc = cli(*_args(teacher_dir, text_file, out, "--set", f"debug.inject=[{faults}]", steps=10))
    line = _one_error_line(proc, "5 consecutive skipped steps", code=3)
    assert "No checkpoint was written before the stop" in line and "last good checkpoint is kept" not in line


# --------------------------------------------------------------------------- data and records
def test_dropped_records_and_ignored_files_are_counted(tmp_path, teacher_dir, corpus_texts):
    data = tmp_path / "data"
    data.mkdir()
    records = [{"text": t} for t in corpus_texts[:12]] + [{"text": None}] * 3 + [{"text": ""}]
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data / "table.csv").write_text("a,b\n1,2\n")
    (data / "readme.log").write_text("not data")
    proc = cli(*_args(teacher_dir, data, tmp_path / "run", steps=2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert any("2 file(s)" in n and ".csv" in n and ".log" in n for n in notes), notes
    assert any("4 of 16 record(s) have no text" in n for n in notes), notes


def test_metrics_are_strict_json_with_the_nonfinite_terms_named(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    proc = cli(*_args(teacher_dir, text_file, out, "--set", "debug.inject=[{step: 1, where: loss, value: nan}]"))
    assert proc.returncode == 0, proc.stderr[-2000:]

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    lines = [json.loads(text, parse_constant=refuse) for text in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = next(r for r in lines if r.get("skipped"))
    assert skipped["loss"] is None and "loss" in skipped["nonfinite"] and math.isfinite(skipped["ce_loss"])


def test_resume_records_its_config_and_writes_no_line_twice(tmp_path, teacher_dir, text_file, monkeypatch):
    """Killed while the final student is saved: the final evaluation was already logged."""
    from lmdistill.rundir import RunDirectory

    out = tmp_path / "run"

    def killed(self, model, tokenizer):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunDirectory, "save_student", killed)
        assert cli(*_args(teacher_dir, text_file, out, "--set", "checkpoint.every=2", steps=4)).returncode == 130
    trash = out / "checkpoints" / ".trash-step-2-123"
    trash.mkdir()
    proc = cli(*_args(teacher_dir, text_file, out, "--resume", "--lr", "2e-3", steps=4))
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "eval_ce_loss" in r]
    assert evals == sorted(set(evals)) and evals[-1] == 4
    assert "lr: 0.002" in (out / "config.yaml").read_text()
    resumes = json.loads((out / "run.json").read_text())["resumes"]
    assert resumes[-1]["from_step"] == 4 and "train.lr" in resumes[-1]["changed_config"]
    assert not trash.exists()


# --------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_143(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    log = tmp_path / "term.log"
    proc = start_cli(*_args(teacher_dir, text_file, out, steps=100_000), log=str(log))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while proc.is_alive() and time.time() < deadline and not (
            metrics.is_file() and sum(1 for r in read_jsonl(metrics) if "loss" in r) >= 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(120)
    assert proc.exitcode == 143, log.read_text()[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and "SIGTERM" in info["exit_reason"]
    done = max(r["step"] for r in read_jsonl(metrics) if "loss" in r) + 1
    assert (out / "checkpoints" / f"step-{done}").is_dir()
    assert "checkpoint step-" in log.read_text() and "Traceback" not in log.read_text()
    resumed = cli(*_args(teacher_dir, text_file, out, "--resume", steps=done + 2))
    assert resumed.returncode == 0 and f"from step-{done}" in resumed.stdout


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_records_it(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    log = tmp_path / "int.log"
    proc = start_cli(*_args(teacher_dir, text_file, out, "--set", "checkpoint.every=100000", steps=100_000),
                     log=str(log))
    while proc.is_alive() and "received" not in log.read_text() if log.exists() else True:
        if (out / "metrics.jsonl").is_file() and any("loss" in r for r in read_jsonl(out / "metrics.jsonl")):
            os.kill(proc.pid, signal.SIGINT)
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    proc.join(120)
    assert proc.exitcode == 130, log.read_text()[-2000:]
    assert "again: stopping now" in log.read_text() and "Traceback" not in log.read_text()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


# --------------------------------------------------------------------------- health checks and progress
@pytest.mark.slow
@pytest.mark.parametrize("kd_weight,temperature", [(0.5, 1.0), (0.5, 2.0), (1.0, 1.0), (1.0, 2.0)])
def test_healthy_runs_on_the_embedded_corpus_fire_no_check(tmp_path, teacher_dir, kd_weight, temperature):
    out = tmp_path / "run"
    proc = cli("train", "--teacher", str(teacher_dir), "--output-dir", str(out), "--batch-size", "8",
               "--max-steps", "100", "--kd-weight", str(kd_weight), "--temperature", str(temperature),
               "--min-temperature", str(min(temperature, 1.5)), "--lr", "3e-3", "--set", SMALL_STUDENT,
               "--set", "data.block_size=64", "--set", "data.max_eval_blocks=16", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    health = json.loads((out / "health.json").read_text())
    assert health["fired"] == [], health
    assert {c["name"]: c["status"] for c in health["checks"]}["teacher_ppl"] == "passed"


def test_a_real_spike_and_a_broken_teacher_still_fire(tmp_path, teacher_dir, text_file):
    out = tmp_path / "spike"
    proc = cli(*_args(teacher_dir, text_file, out, "--set", "debug.loss_multiplier={25: 20.0}",
                      "--set", "guard.spike_warmup=10", steps=30))
    assert proc.returncode == 0
    assert "loss_spike" in json.loads((out / "health.json").read_text())["fired"]

    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken-teacher"
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # sharp and wrong: far worse than a uniform guess
    model.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((teacher_dir / name).read_bytes())
    out = tmp_path / "broken"
    proc = cli(*_args(broken, text_file, out, steps=2))
    assert proc.returncode == 0
    health = json.loads((out / "health.json").read_text())
    assert "teacher_ppl" in health["fired"]
    assert "[health:teacher_ppl]" in proc.stdout


def test_progress_in_a_log_is_plain_lines(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    args = [a for a in _args(teacher_dir, text_file, out, steps=40) if a != "--no-progress"]
    proc = cli(*args)  # stderr is a StringIO here, as it is a file under a scheduler
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr
    progress = [line for line in proc.stderr.splitlines() if "step " in line and "/40" in line]
    assert 4 <= len(progress) <= 12 and progress[-1].startswith("distill") and "40/40 (100%)" in progress[-1]
