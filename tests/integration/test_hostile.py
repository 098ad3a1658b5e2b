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

from conftest import TINY_STUDENT, cli, one_error_line, read_jsonl, train_args
from forked import start_cli


def _args(teacher_dir, data, out, *extra, steps=4):
    return train_args(teacher_dir, data, out, *extra, batch_size=2, steps=steps, eval_every=None, max_eval_blocks=4)


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
    line = one_error_line(cli(*_args(teacher_dir, text_file, project, "--overwrite")), "not an lmdistill run")
    assert "--overwrite" not in line  # never suggested for a directory that is not a run
    assert _tree(project) == before


@pytest.mark.parametrize("where", ["cwd", "parent", "home"])
def test_overwrite_never_empties_the_current_a_parent_or_the_home_directory(
    finished_run, teacher_dir, text_file, monkeypatch, where
):
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
    what = {
        "cwd": "the current directory",
        "parent": "a parent of the current directory",
        "home": "your home directory",
    }[where]
    one_error_line(cli(*_args(teacher_dir, text_file, target, "--overwrite")), "refusing --overwrite", what)
    (finished_run / "checkpoints" / "sub").rmdir() if where == "parent" else None
    assert _tree(finished_run) == before


def test_overwrite_of_a_run_with_foreign_files_is_refused_and_of_a_clean_run_works(
    finished_run, teacher_dir, text_file
):
    (finished_run / "notes.txt").write_text("mine")
    before = _tree(finished_run)
    one_error_line(
        cli(*_args(teacher_dir, text_file, finished_run, "--overwrite")), "notes.txt", "files lmdistill did not write"
    )
    assert _tree(finished_run) == before
    (finished_run / "notes.txt").unlink()
    old_metrics = (finished_run / "metrics.jsonl").read_text()
    proc = cli(*_args(teacher_dir, text_file, finished_run, "--overwrite", steps=2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (finished_run / ".lmdistill-run").is_file()
    lines = read_jsonl(finished_run / "metrics.jsonl")
    assert (
        max(r["step"] for r in lines if "loss" in r) == 1
        and old_metrics != (finished_run / "metrics.jsonl").read_text()
    )


def test_overwrite_refuses_user_files_inside_the_runs_own_subdirectories(finished_run, teacher_dir, text_file):
    """--overwrite checks the whole tree, not only the top level: a file of the user's in
    checkpoints/step-N, student/, tokenizer/, tensorboard/ or plots/ is named and nothing goes;
    everything lmdistill wrote there (the report's plots included) is replaced."""
    assert cli("report", str(finished_run)).returncode == 0  # plots/ and report.md too
    step = next((finished_run / "checkpoints").glob("step-*")).name
    cases = [
        (f"checkpoints/{step}/notes.txt", f"checkpoints/{step}/notes.txt"),
        ("checkpoints/mine/a.txt", "checkpoints/mine"),
        ("student/my_notes.txt", "student/my_notes.txt"),
        ("tokenizer/extra.txt", "tokenizer/extra.txt"),
        ("tensorboard/analysis.ipynb", "tensorboard/analysis.ipynb"),
        ("plots/mine.png", "plots/mine.png"),
    ]
    for written, named in cases:
        path = finished_run / written
        created = path.parent if not path.parent.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
        before = _tree(finished_run)
        one_error_line(
            cli(*_args(teacher_dir, text_file, finished_run, "--overwrite")), named, "files lmdistill did not write"
        )
        assert _tree(finished_run) == before
        path.unlink()
        created.rmdir() if created else None
    proc = cli(*_args(teacher_dir, text_file, finished_run, "--overwrite", steps=2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert max(r["step"] for r in read_jsonl(finished_run / "metrics.jsonl") if "loss" in r) == 1


def test_the_run_lock_and_marker_are_never_followed_through_a_link(tmp_path, finished_run, teacher_dir, text_file):
    """A link planted as the lock (a new, a finished run) is refused in one line naming it, and its
    target keeps its bytes; a link planted as the marker does not make a directory a run."""
    victim = tmp_path / "precious.txt"
    victim.write_text("precious\n")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".lmdistill.lock").symlink_to(victim)
    (finished_run / ".lmdistill.lock").unlink()
    (finished_run / ".lmdistill.lock").symlink_to(victim)
    for run, starts in (
        (fresh, ((), ("--resume",), ("--overwrite",))),
        (finished_run, (("--resume",), ("--overwrite",))),
    ):
        for extra in starts:
            one_error_line(
                cli(*_args(teacher_dir, text_file, run, *extra)),
                str(run / ".lmdistill.lock"),
                "symbolic link",
                "remove the link",
            )
    assert victim.read_text() == "precious\n" and not (fresh / "run.json").exists()
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my: own config\n")
    (project / ".lmdistill-run").symlink_to(victim)
    one_error_line(cli(*_args(teacher_dir, text_file, project, "--overwrite")), "not an lmdistill run")
    assert (project / "config.yaml").read_text() == "my: own config\n" and victim.read_text() == "precious\n"


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
            one_error_line(
                cli(*_args(teacher_dir, text_file, out, *extra)), "in use by another lmdistill process", holder
            )
    finally:
        first.kill()  # SIGKILL: no clean-up runs; the OS releases the lock
        first.join(60)
    resumed = cli(*_args(teacher_dir, text_file, out, "--resume", steps=3))
    assert resumed.returncode == 0, resumed.stderr[-2000:]


# --------------------------------------------------------------------------- checked before step 0
def test_an_impossible_student_shape_is_refused_before_training(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    proc = cli(
        "train",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(text_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "3",
        "--set",
        "model.student_config={hidden_size: 7}",
    )
    one_error_line(proc, "model.student_config", "hidden size (7) is not a multiple")
    assert not out.exists()


def test_bidirectional_models_are_refused(tmp_path, teacher_dir, text_file, tiny_tokenizer):
    from transformers import BertConfig, BertLMHeadModel

    bert = tmp_path / "bert"
    BertLMHeadModel(
        BertConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(bert)
    tiny_tokenizer.save_pretrained(bert)
    out = tmp_path / "run"
    one_error_line(
        cli("train", "--teacher", str(bert), "--data", str(text_file), "--output-dir", str(out)),
        "teacher",
        "BertLMHeadModel",
        "not a causal language model",
    )
    one_error_line(
        cli(
            "train",
            "--teacher",
            str(teacher_dir),
            "--student",
            str(bert),
            "--data",
            str(text_file),
            "--output-dir",
            str(out),
        ),
        "student",
        "not a causal language model",
    )
    assert not out.exists()


# --------------------------------------------------------------------------- file system failures
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(
    tmp_path, teacher_dir, text_file, monkeypatch
):
    import lmdistill.core.files as files
    import lmdistill.training.checkpoint as ckpt

    real_write = files.write_file

    def full_disk(path, write):
        if "step-4" in str(path.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, write)

    monkeypatch.setattr(files, "write_file", full_disk)  # what a checkpoint's files are written with
    out = tmp_path / "run"
    proc = cli(*_args(teacher_dir, text_file, out, "--set", "checkpoint.every=2", steps=6))
    one_error_line(proc, "step-4", "No space left on device", "free disk space")
    assert ckpt.find_latest_valid(out / "checkpoints") == (out / "checkpoints" / "step-2", [])
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_write_failures_of_eval_and_export_are_one_line(finished_run, tmp_path, monkeypatch):
    import lmdistill.core.paths as paths

    one_error_line(cli("eval", str(finished_run), "--json", str(tmp_path), "--no-progress"), "is a directory")
    one_error_line(
        cli("eval", str(finished_run), "--json", str(tmp_path / "no" / "e.json"), "--no-progress"), "does not exist"
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    one_error_line(cli("export", str(finished_run), str(a_file)), "is a file")
    assert a_file.read_text() == "x"

    def read_only(path, data, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(paths, "atomic_write", read_only)
    one_error_line(
        cli("eval", str(finished_run), "--json", str(tmp_path / "e.json"), "--no-progress"),
        "Read-only file system",
        "e.json",
        "write somewhere else",
    )


def test_a_config_file_that_is_not_utf8_or_is_a_directory(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    one_error_line(cli("train", "--config", str(latin)), "not UTF-8", "save it as UTF-8")
    one_error_line(cli("train", "--config", str(tmp_path)), "is a directory")


# --------------------------------------------------------------------------- options and messages
def test_eval_temperature_must_be_positive(finished_run):
    for value in ("0", "-3", "nan"):
        one_error_line(cli("eval", str(finished_run), "--temperature", value), "--temperature", "> 0")


def test_resume_of_nothing_starts_a_new_run_and_damaged_checkpoints_are_refused(tmp_path, teacher_dir, text_file):
    out = tmp_path / "never-ran"
    proc = cli(*_args(teacher_dir, text_file, out, "--resume", steps=2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "starting the run from step 0" in proc.stdout
    damaged = tmp_path / "damaged"
    assert (
        cli(
            *_args(
                teacher_dir,
                text_file,
                damaged,
                "--set",
                "checkpoint.every=1",
                "--set",
                "debug.exit_after_step=null",
                steps=3,
            )
        ).returncode
        == 0
    )
    (damaged / "student").rename(tmp_path / "student-aside")  # an unfinished run again
    info = json.loads((damaged / "run.json").read_text())
    (damaged / "run.json").write_text(json.dumps({**info, "status": "running"}))
    for step_dir in (damaged / "checkpoints").iterdir():
        (step_dir / "model.safetensors").write_bytes(b"corrupt")
    metrics = (damaged / "metrics.jsonl").read_text()
    one_error_line(
        cli(*_args(teacher_dir, text_file, damaged, "--resume", steps=3)),
        "no valid checkpoint to resume",
        "model.safetensors",
        "--overwrite",
    )
    assert (damaged / "metrics.jsonl").read_text() == metrics  # nothing restarted from step 0


def test_misleading_inputs_get_messages_that_say_what_is_wrong(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    one_error_line(
        cli(
            "train",
            "--teacher",
            str(teacher_dir),
            "--student",
            str(teacher_dir / "config.json"),
            "--data",
            str(text_file),
            "--output-dir",
            str(out),
        ),
        "is a file",
        "directory",
    )
    one_error_line(cli("train", "--set", "data.block_size=0", "--output-dir", str(out)), "data.block_size", ">= 2")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    one_error_line(cli(*_args(teacher_dir, latin, out)), "not UTF-8 text", "convert it to UTF-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut\n')
    proc = cli(*_args(teacher_dir, broken, out))
    one_error_line(proc, "could not read data.path")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_a_guard_stop_without_a_checkpoint_says_so(tmp_path, teacher_dir, text_file):
    faults = ", ".join(f"{{step: {s}, where: loss, value: nan}}" for s in range(0, 6))
    out = tmp_path / "run"
    proc = cli(*_args(teacher_dir, text_file, out, "--set", f"debug.inject=[{faults}]", steps=10))
    line = one_error_line(proc, "5 consecutive skipped steps", code=3)
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
    from lmdistill.training.rundir import RunDirectory

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
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_finishes_the_step_checkpoints_and_exits_143(tmp_path, teacher_dir, text_file, signum, code):
    out = tmp_path / "run"
    log = tmp_path / "term.log"
    proc = start_cli(*_args(teacher_dir, text_file, out, steps=100_000), log=str(log))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while (
        proc.is_alive()
        and time.time() < deadline
        and not (metrics.is_file() and sum(1 for r in read_jsonl(metrics) if "loss" in r) >= 3)
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signum)
    proc.join(120)
    assert proc.exitcode == code, log.read_text()[-2000:]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and signal.Signals(signum).name in info["exit_reason"]
    done = max(r["step"] for r in read_jsonl(metrics) if "loss" in r) + 1
    assert (out / "checkpoints" / f"step-{done}").is_dir()
    assert "checkpoint step-" in log.read_text() and "Traceback" not in log.read_text()
    resumed = cli(*_args(teacher_dir, text_file, out, "--resume", steps=done + 2))
    assert resumed.returncode == 0 and f"from step-{done}" in resumed.stdout


@pytest.mark.slow
def test_a_second_signal_stops_at_once_and_records_it(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    log = tmp_path / "int.log"
    proc = start_cli(
        *_args(teacher_dir, text_file, out, "--set", "checkpoint.every=100000", steps=100_000), log=str(log)
    )
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
    proc = cli(
        "train",
        "--teacher",
        str(teacher_dir),
        "--output-dir",
        str(out),
        "--batch-size",
        "8",
        "--max-steps",
        "100",
        "--kd-weight",
        str(kd_weight),
        "--temperature",
        str(temperature),
        "--min-temperature",
        str(min(temperature, 1.5)),
        "--lr",
        "3e-3",
        "--set",
        TINY_STUDENT,
        "--set",
        "data.block_size=64",
        "--set",
        "data.max_eval_blocks=16",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    health = json.loads((out / "health.json").read_text())
    assert health["fired"] == [], health
    assert {c["name"]: c["status"] for c in health["checks"]}["teacher_ppl"] == "passed"


def test_a_real_spike_and_a_broken_teacher_still_fire(tmp_path, teacher_dir, text_file):
    out = tmp_path / "spike"
    proc = cli(
        *_args(
            teacher_dir,
            text_file,
            out,
            "--set",
            "debug.loss_multiplier={25: 20.0}",
            "--set",
            "guard.spike_warmup=10",
            steps=30,
        )
    )
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


# --------------------------------------------------------------------------- hostile probe: models and data
def _unfinished(run: Path) -> Path:
    """``run`` made an unfinished run again: no final student, status running."""
    import shutil

    shutil.rmtree(run / "student")
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    return run


def _teacher_copy(teacher_dir: Path, dest: Path, drop: tuple[str, ...] = ()) -> Path:
    import shutil

    shutil.copytree(teacher_dir, dest, ignore=shutil.ignore_patterns(*drop))
    return dest


@pytest.mark.parametrize(
    "student_config, needle",
    [
        (
            "{num_attention_heads: 0}",
            "model.student_config.num_attention_heads = 0 is not allowed: it must be a whole number >= 1",
        ),
        ("{num_hidden_layers: -1}", "model.student_config.num_hidden_layers = -1"),
        ("{num_hidden_layers: 1.5}", "model.student_config.num_hidden_layers = 1.5"),
        ("{hidden_size: abc}", "model.student_config.hidden_size = 'abc'"),
        ("{hidden_size: 0}", "model.student_config.hidden_size = 0"),
        ("{hidden_act: foo}", "model.student_config.hidden_act = 'foo' is not an activation"),
        ("{rms_norm_eps: abc}", "model.student_config.rms_norm_eps = 'abc' is not allowed"),
    ],
    ids=["heads-0", "layers-negative", "layers-fraction", "hidden-text", "hidden-0", "activation", "eps-text"],
)
@pytest.mark.parametrize("init", ["teacher", "random"])
def test_impossible_student_config_values_are_one_line_naming_the_key(
    tmp_path, teacher_dir, text_file, student_config, needle, init
):
    out = tmp_path / "run"
    proc = cli(
        "train",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(text_file),
        "--output-dir",
        str(out),
        "--max-steps",
        "2",
        "--set",
        f"model.student_config={student_config}",
        "--set",
        f"model.student_init={init}",
        "--no-progress",
    )
    one_error_line(proc, needle)
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_broken_teacher_directories_name_what_is_missing(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    no_tokenizer = _teacher_copy(teacher_dir, tmp_path / "no-tokenizer", drop=("tokenizer*", "special_tokens*"))
    one_error_line(
        cli("train", "--teacher", str(no_tokenizer), "--data", str(text_file), "--output-dir", str(out)),
        "has no tokenizer files",
        "save_pretrained",
    )
    one_error_line(cli("eval", str(no_tokenizer), "--no-progress"), "model", "has no tokenizer files")
    listed = _teacher_copy(teacher_dir, tmp_path / "config-list")
    (listed / "config.json").write_text("[]")
    line = one_error_line(
        cli("train", "--teacher", str(listed), "--data", str(text_file), "--output-dir", str(out)),
        "config.json",
        "holds a JSON list",
    )
    assert "tokenizer" not in line
    (listed / "config.json").write_text('{"model_type": "llama", ')
    one_error_line(
        cli("train", "--teacher", str(listed), "--data", str(text_file), "--output-dir", str(out)),
        "config.json is not valid JSON",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty_array.json", "[]"),
        ("blank_lines.jsonl", "\n\n\n\n"),
        ("empty_records.jsonl", "{}\n" * 20),
    ],
    ids=["json-array", "blank-lines", "no-text-field"],
)
def test_data_without_records_says_so(tmp_path, teacher_dir, name, content):
    data = tmp_path / name
    data.write_text(content)
    out = tmp_path / "run"
    line = one_error_line(
        cli(*_args(teacher_dir, data, out)), name, "has no records", "none with a non-empty 'text' field"
    )
    assert "Instruction" not in line and not out.exists()


def test_a_jsonl_file_that_is_not_utf8_is_one_line_naming_it_in_train_and_eval(tmp_path, teacher_dir, corpus_texts):
    good = "".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:6]).encode()
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(good + '{"text": "caf\xe9"}\n'.encode("latin-1") + good)
    out = tmp_path / "run"
    for args in (_args(teacher_dir, latin, out), ("eval", str(teacher_dir), "--data", str(latin), "--no-progress")):
        one_error_line(
            cli(*args), str(latin), "not UTF-8 text", f"line 7, at byte offset {len(good) + 13}", "convert it to UTF-8"
        )
    assert not out.exists()


def test_a_store_with_ids_past_the_vocabulary_is_refused_naming_the_store_not_the_student(
    tmp_path, teacher_dir, corpus_texts
):
    import numpy as np

    text = tmp_path / "fresh.txt"
    text.write_text("\n".join(corpus_texts[:12]))
    stores = tmp_path / "stores"
    run = _args(teacher_dir, text, tmp_path / "run", "--set", f"data.store_dir={stores}", steps=1)
    assert cli(*run).returncode == 0
    store = next(p.parent for p in stores.glob("*/manifest.json"))
    tokens = np.memmap(store / "tokens.bin", dtype=np.uint16, mode="r+")
    tokens[100] = 65535  # bytes overwritten in place: every size still matches the manifest
    tokens.flush()
    del tokens
    line = one_error_line(
        cli(*run, "--overwrite"),
        f"data store '{store}' is damaged",
        "token id 65,535",
        "delete the directory and run again to rebuild it",
    )
    assert "student_config" not in line


def test_an_unwritable_datasets_cache_is_reported_as_such(tmp_path, teacher_dir, corpus_texts, monkeypatch):
    import datasets

    records = tmp_path / "records.jsonl"  # .jsonl goes through datasets (plain text is read directly)
    records.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:12]))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", a_file / "cache")  # cannot be created: ENOTDIR
    out = tmp_path / "run"
    line = one_error_line(
        cli(*_args(teacher_dir, records, out)),
        str(a_file / "cache"),
        "datasets could not write its cache",
        "HF_DATASETS_CACHE",
    )
    assert "format" not in line and not out.exists()


def test_an_unwritable_store_dir_is_reported_with_the_fix(tmp_path, teacher_dir, corpus_texts):
    text = tmp_path / "fresh.txt"  # text no store holds yet: the store must be written
    text.write_text("\n".join(corpus_texts[:12]))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = tmp_path / "run"
    one_error_line(
        cli(*_args(teacher_dir, text, out, "--set", f"data.store_dir={a_file / 'stores'}")),
        str(a_file / "stores"),
        "data.store_dir",
    )
    assert not out.exists()


# --------------------------------------------------------------------------- hostile probe: commands
def test_eval_of_a_checkpoint_or_an_unfinished_run_says_to_export(finished_run):
    checkpoint = next((finished_run / "checkpoints").glob("step-*"))
    one_error_line(
        cli("eval", str(checkpoint), "--no-progress"), "training checkpoint", f"lmdistill export {checkpoint}"
    )
    run = _unfinished(finished_run)
    one_error_line(
        cli("eval", str(run), "--no-progress"), "has no final student yet", f"lmdistill export {run} OUT", "--resume"
    )


@pytest.mark.parametrize("value", ["0", "-1"])
def test_eval_max_blocks_must_be_positive(finished_run, value):
    one_error_line(
        cli("eval", str(finished_run), "--max-blocks", value, "--no-progress"), f"--max-blocks {value}", "1 or more"
    )


def test_export_of_a_run_without_a_checkpoint_or_into_the_current_directory(finished_run, tmp_path, monkeypatch):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for out in (".", str(tmp_path)):
        one_error_line(cli("export", str(finished_run), out), "give the name of a new directory")
    assert not any(empty.iterdir())
    shutil.rmtree(finished_run / "checkpoints")
    one_error_line(
        cli("export", str(_unfinished(finished_run)), str(tmp_path / "model")),
        f"run '{finished_run}' has no checkpoint yet",
    )
    assert not (tmp_path / "model").exists()


def test_a_full_disk_names_the_file_being_written(finished_run, tmp_path, monkeypatch):
    import io

    import lmdistill.core.paths as paths

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")  # as a real full disk: no file named

    out = tmp_path / "out"
    out.mkdir()
    target = out / "e.json"

    def fill(f):
        FullDisk().write(b"x")

    with pytest.raises(OSError) as info:
        paths.atomic_write(target, fill)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target) and not list(out.iterdir())
    real_open = open  # reads (the data store's check of its source files) still work: only writes fail
    monkeypatch.setattr(
        paths,
        "open",
        lambda file, mode="r", *a, **k: FullDisk() if "w" in mode else real_open(file, mode, *a, **k),
        raising=False,
    )
    one_error_line(
        cli("eval", str(finished_run), "--json", str(target), "--no-progress", "--max-blocks", "1"),
        "No space left on device",
        str(target),
        "free space on the disk that holds",
    )
    assert not target.exists()


def test_a_reader_that_goes_away_ends_quietly_with_141():
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmdistill", "config-reference"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    proc.stdout.close()  # `| head -c1` that has already gone
    stderr = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and stderr == "", stderr


def test_a_failing_standard_output_is_named(monkeypatch):
    import contextlib
    import io

    from lmdistill.cli import main

    class Closed(io.StringIO):
        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        def write(self, text):
            raise self.exc

    err = io.StringIO()
    with (
        contextlib.redirect_stdout(Closed(BrokenPipeError(errno.EPIPE, "Broken pipe"))),
        contextlib.redirect_stderr(err),
    ):
        assert main(["config-reference"]) == 141
    assert err.getvalue() == ""
    with (
        contextlib.redirect_stdout(Closed(OSError(errno.ENOSPC, "No space left on device"))),
        contextlib.redirect_stderr(err),
    ):
        assert main(["config-reference"]) == 2
    assert err.getvalue().count("\n") == 1 and "No space left on device: standard output or a file" in err.getvalue()


# --------------------------------------------------------------------------- hostile probe: resume and report
def test_resume_without_the_run_config_or_with_checkpoints_a_file_is_refused(finished_run, teacher_dir, text_file):
    import shutil

    run = _unfinished(finished_run)
    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").unlink()
    before = _tree(run)
    one_error_line(
        cli("train", "--resume", str(run), "--no-progress"), f"run '{run}' has no config.yaml", "--config FILE"
    )
    assert _tree(run) == before
    (run / "config.yaml").write_text(saved)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a directory")
    before = _tree(run)
    one_error_line(cli(*_args(teacher_dir, text_file, run, "--resume")), str(run / "checkpoints"), "is a file")
    assert _tree(run) == before


def test_resume_with_a_teacher_of_another_tokenizer_is_refused(finished_run, teacher_dir, text_file, tmp_path):
    run = _unfinished(finished_run)
    other = _teacher_copy(teacher_dir, tmp_path / "swapped")
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = [k for k in vocab if not k.startswith("<")][10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    before = _tree(run)
    one_error_line(
        cli(*_args(other, text_file, run, "--resume")),
        "cannot resume",
        "its student was trained with the tokenizer in",
        str(run / "tokenizer"),
    )
    assert _tree(run) == before


@pytest.mark.parametrize("config", ["run: 5\n", "- a\n- b\n"], ids=["section-scalar", "list"])
def test_report_of_a_run_whose_config_is_not_a_mapping(finished_run, config):
    (finished_run / "config.yaml").write_text(config)
    proc = cli("report", str(finished_run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "treated as missing" in (finished_run / "report.md").read_text()


def test_fp16_on_the_cpu_and_a_path_as_run_name_are_refused(tmp_path, teacher_dir, text_file, monkeypatch):
    out = tmp_path / "run"
    one_error_line(
        cli(*_args(teacher_dir, text_file, out, "--device", "cpu", "--mixed-precision", "fp16")),
        "run.mixed_precision = fp16 needs a CUDA GPU (run.device = 'cpu')",
        "bf16 or no",
    )
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        one_error_line(
            cli(*_args(teacher_dir, text_file, out, "--mixed-precision", "fp16")),
            "fp16 needs a CUDA GPU (no CUDA device is available)",
            "bf16 or no",
        )
    one_error_line(
        cli(*_args(teacher_dir, text_file, out, "--set", f"run.name={tmp_path / 'x'}")), "run.name", "run.output_dir"
    )
    assert not out.exists() and not (tmp_path / "x").exists()


def test_the_python_api_takes_a_config_path(tmp_path):
    import lmdistill

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  output_dir: {taken}\n")
    with pytest.raises(lmdistill.LmdistillError, match="is not an lmdistill run"):  # the file's output_dir was used
        lmdistill.train(str(path))
    with pytest.raises(lmdistill.LmdistillError, match="is not an lmdistill run"):
        lmdistill.train(path)
    with pytest.raises(TypeError, match="expects a Config or the path of a YAML config file"):
        lmdistill.train({"run": {}})


def test_export_of_a_path_that_does_not_exist_says_so(tmp_path):
    proc = cli("export", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and not (tmp_path / "out").exists()


def test_a_closed_standard_output_ends_without_a_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; os.close(1); "
            "from lmdistill.cli import main; sys.stdout = None; sys.exit(main(['config-reference']))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
