"""Every bad input ends with one line naming the problem and the fix, exit code 2, no traceback,
and no run directory left behind.

The cases run in this process through ``cli.main`` (an exception escaping it would fail the
test, as a traceback would fail a user); one runs the real entry point in a fresh process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import cli, run_cli, tiny_llama


def _assert_user_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("lmdistill: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (
            ["--set", "distill.temprature=3"],
            ["unknown config key 'distill.temprature'", "did you mean 'distill.temperature'"],
        ),
        (["--set", "train.temperature=3"], ["did you mean 'distill.temperature'"]),
        (["--batch-size", "abc"], ["train.batch_size", "wrong type", "whole number"]),
        (["--temperature", "0"], ["distill.temperature", "> 0"]),
        (["--temperature", "-1"], ["distill.temperature"]),
        (["--min-temperature", "3"], ["min_temperature = 3.0 is above distill.temperature = 2.0"]),
        (["--kd-weight", "1.5"], ["distill.kd_weight", "[0, 1]"]),
        (["--set", "distill.divergence=kl"], ["distill.divergence", "forward_kl"]),
        (["--set", "novalue"], ["--set expects key=value"]),
        (["--set", "run.trackers=[wandb]"], ["wandb", "not installed", "pip install wandb"]),
    ],
    ids=[
        "typo",
        "wrong-section",
        "type",
        "temp-zero",
        "temp-negative",
        "min-above",
        "kd-weight",
        "choice",
        "set-syntax",
        "tracker",
    ],
)
def test_config_errors(tmp_path, args, needles):
    out = tmp_path / "run"
    proc = cli("train", "--output-dir", str(out), *args)
    _assert_user_error(proc, *needles)
    assert not out.exists()
    # Refused before anything slow: the embedded default teacher was not built for it.
    assert not (Path(os.environ["LMDISTILL_HOME"]) / "teachers").exists()


def test_the_entry_point_exits_2_with_one_line_and_no_traceback(tmp_path):
    """The same contract through ``python -m lmdistill`` in a fresh process: the exit code is real."""
    proc = run_cli("train", "--output-dir", str(tmp_path / "run"), "--set", "distill.temprature=3")
    _assert_user_error(proc, "did you mean 'distill.temperature'")


def test_config_file_errors(tmp_path):
    missing = cli("train", "--config", str(tmp_path / "nope.yaml"))
    _assert_user_error(missing, "nope.yaml", "does not exist")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("distill:\n  temperature: [1, 2\n")
    _assert_user_error(cli("train", "--config", str(bad_yaml)), "not valid YAML", "line")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("# a preset\ndistill:\n  kd_wieght: 0.3\n")
    _assert_user_error(cli("train", "--config", str(unknown)), "did you mean 'distill.kd_weight'")


def test_missing_paths(tmp_path, teacher_dir, text_file):
    out = tmp_path / "run"
    _assert_user_error(
        cli("train", "--teacher", "./no/such/teacher", "--output-dir", str(out)),
        "model.teacher './no/such/teacher' does not exist",
    )
    _assert_user_error(
        cli(
            "train",
            "--teacher",
            str(teacher_dir),
            "--student",
            str(tmp_path / "nostudent"),
            "--data",
            str(text_file),
            "--output-dir",
            str(out),
        ),
        "model.student",
        "does not exist",
    )
    _assert_user_error(
        cli("train", "--teacher", str(teacher_dir), "--data", str(tmp_path / "missing.txt"), "--output-dir", str(out)),
        "data.path",
        "missing.txt",
        "does not exist",
    )
    assert not out.exists()


def test_different_tokenizers_stop_before_training_when_told_to(tmp_path, teacher_dir, text_file, corpus_texts):
    """distill.cross_tokenizer: never refuses two tokenizers (auto distils across them: its tests
    are in test_cross_tokenizer.py)."""
    from lmdistill.default import train_tokenizer

    other_tok = train_tokenizer(corpus_texts[5:], vocab_size=300)
    student = tmp_path / "other-student"
    tiny_llama(len(other_tok)).save_pretrained(student)
    other_tok.save_pretrained(student)
    out = tmp_path / "run"
    proc = cli(
        "train",
        "--teacher",
        str(teacher_dir),
        "--student",
        str(student),
        "--data",
        str(text_file),
        "--output-dir",
        str(out),
        "--set",
        "distill.cross_tokenizer=never",
    )
    line = _assert_user_error(proc, "different tokenizers", str(teacher_dir), str(student))
    assert "vocabularies differ" in line and "distill.cross_tokenizer: auto" in line
    assert not out.exists()


def test_empty_and_too_short_data(tmp_path, teacher_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "run"
    _assert_user_error(
        cli("train", "--teacher", str(teacher_dir), "--data", str(empty), "--output-dir", str(out)), "empty.txt"
    )
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    _assert_user_error(
        cli("train", "--teacher", str(teacher_dir), "--data", str(short), "--output-dir", str(out)),
        "short.txt",
        "block",
        "data.block_size",
    )
    assert not out.exists()


def test_non_run_directory_is_not_touched(tmp_path, teacher_dir, text_file):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = cli("train", "--teacher", str(teacher_dir), "--data", str(text_file), "--output-dir", str(out))
    _assert_user_error(proc, "not an lmdistill run")
    # --overwrite deletes only what lmdistill wrote, never another directory.
    proc = cli(
        "train", "--teacher", str(teacher_dir), "--data", str(text_file), "--output-dir", str(out), "--overwrite"
    )
    _assert_user_error(proc, "not an lmdistill run")
    assert (out / "notes.txt").read_text() == "keep me"
