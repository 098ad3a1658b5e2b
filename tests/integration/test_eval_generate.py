"""``lmdistill eval MODEL --teacher T --generate``: any student's own continuations of held-out
prompts, judged by the teacher; seeded (two calls, the same numbers); bad flags are one line."""

from __future__ import annotations

import json
import math

import pytest

from conftest import cli, one_error_line

GENERATE = ("--generate", "--gen-prompts", "3", "--prompt-tokens", "8", "--max-new-tokens", "6")
KEYS = (
    "gen_teacher_nll",
    "gen_student_nll",
    "gen_reverse_kl",
    "gen_repetition",
    "gen_length",
    "gen_prompts",
    "gen_samples",
)


def _eval(student_dir, text_file, *extra: str):
    return cli(
        "eval",
        str(student_dir),
        "--data",
        str(text_file),
        "--block-size",
        "32",
        "--max-blocks",
        "4",
        "--no-progress",
        *extra,
    )


def test_eval_generate_is_seeded_and_reports_the_reverse_kl(tmp_path, student_dir, teacher_dir, text_file):
    runs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        proc = _eval(
            student_dir,
            text_file,
            "--teacher",
            str(teacher_dir),
            *GENERATE,
            "--seed",
            seed,
            "--json",
            str(tmp_path / f"{name}.json"),
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append((proc.stdout, json.loads((tmp_path / f"{name}.json").read_text())))
    (out, a), (again, b), (_, c) = runs
    assert all(key in a for key in KEYS) and a["gen_prompts"] == 3 and 0 < a["gen_length"] <= 6
    assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}
    assert out[out.index("generations:") :] == again[again.index("generations:") :]
    assert a["gen_teacher_nll"] != c["gen_teacher_nll"]  # another seed, other samples
    assert a["gen_reverse_kl"] == pytest.approx(a["gen_teacher_nll"] - a["gen_student_nll"], abs=1e-9)
    assert math.isfinite(a["gen_reverse_kl"]) and "eval_ppl" in a
    assert "reverse KL(model || teacher) on its own samples" in out and "repeated 4-grams" in out


def test_generate_without_a_teacher_is_one_line(student_dir, text_file):
    one_error_line(_eval(student_dir, text_file, *GENERATE), "--generate", "--teacher")


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--gen-prompts", "0", "must be 1 or more"),
        ("--prompt-tokens", "-1", "must be 1 or more"),
        ("--max-new-tokens", "0", "must be 1 or more"),
        ("--sample-temperature", "0", "finite number > 0"),
        ("--sample-temperature", "nan", "finite number > 0"),
        ("--sample-temperature", "inf", "finite number > 0"),
    ],
)
def test_bad_generation_numbers_are_one_line_each(student_dir, text_file, flag, value, needle):
    one_error_line(_eval(student_dir, text_file, *GENERATE, flag, value), f"{flag} {value}", needle)


def test_generation_that_does_not_fit_the_models_is_one_line(student_dir, teacher_dir, text_file):
    teacher = ("--teacher", str(teacher_dir))
    # the tiny models have 256 positions
    one_error_line(
        _eval(student_dir, text_file, *teacher, *GENERATE, "--max-new-tokens", "250"),
        "258 tokens",
        "256 positions",
        "--max-new-tokens",
    )
    one_error_line(
        _eval(student_dir, text_file, *teacher, *GENERATE, "--prompt-tokens", "32"),
        "--prompt-tokens 32",
        "shorter than a block",
        "--block-size",
    )


def test_eval_without_data_scores_the_embedded_held_out_split_only(student_dir, tiny_tokenizer):
    from lmdistill.config import DataConfig
    from lmdistill.data.sources import build_block_data

    held_out = build_block_data(DataConfig(), tiny_tokenizer, progress=False)
    proc = cli("eval", str(student_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"({len(held_out.eval)} blocks of 128 tokens)" in proc.stdout
    assert "the embedded corpus' held-out blocks" in proc.stdout and len(held_out.eval) < len(held_out.train)
