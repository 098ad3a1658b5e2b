"""On-policy distillation end to end: fraction 0 changes nothing, on-policy steps follow the
per-step draw and log what they generated, a killed on-policy run resumes to the same
samples and weights, two processes agree on every draw, and what cannot work is refused."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli, one_error_line, read_jsonl, run_cli, train_args
from lmdistill.teacher.onpolicy import is_on_policy

ON = (
    "--set",
    "distill.on_policy.fraction=0.5",
    "--set",
    "distill.on_policy.prompt_tokens=8",
    "--set",
    "distill.on_policy.max_new_tokens=12",
)


def _args(teacher_dir, text_file, out, *extra, steps: int = 6, batch_size: int = 2):
    return train_args(
        teacher_dir,
        text_file,
        out,
        "--set",
        "model.student_init=random",
        *extra,
        batch_size=batch_size,
        steps=steps,
        eval_every=None,
    )


def _steps(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_fraction_zero_is_the_off_policy_run(tmp_path, teacher_dir, text_file):
    plain = cli(*_args(teacher_dir, text_file, tmp_path / "plain"))
    zero = cli(
        *_args(
            teacher_dir,
            text_file,
            tmp_path / "zero",
            "--set",
            "distill.on_policy.fraction=0",
            "--set",
            "distill.on_policy.loss=sampled_token",
            "--set",
            "distill.on_policy.max_new_tokens=3",
        )
    )
    assert plain.returncode == 0 and zero.returncode == 0, zero.stderr[-2000:]
    a, b = _steps(tmp_path / "plain"), _steps(tmp_path / "zero")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and not any("on_policy" in r for r in b)
    wa, wb = (load_file(p / "student" / "model.safetensors") for p in (tmp_path / "plain", tmp_path / "zero"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("loss", ["full", "sampled_token"])
def test_on_policy_steps_follow_the_draw_and_log_their_generations(tmp_path, teacher_dir, text_file, loss):
    proc = cli(
        *_args(teacher_dir, text_file, tmp_path / "run", *ON, "--set", f"distill.on_policy.loss={loss}", "--seed", "3")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _steps(tmp_path / "run")
    assert [r["on_policy"] for r in lines] == [is_on_policy(3, s, 0.5) for s in range(6)]
    on = [r for r in lines if r["on_policy"]]
    assert on and all(0 < r["generated_tokens"] <= 2 * 12 and r["generation_tokens_per_s"] > 0 for r in on)
    assert all(0 < r["generation_share"] < 1 for r in on)
    assert all(r["mean_generated_length"] == pytest.approx(r["generated_tokens"] / 2) for r in on)
    # on-policy steps train the divergence alone (kd_weight 1 there): the loss is the KD term
    assert all(r["loss"] == pytest.approx(r["kd_loss"], rel=1e-6) for r in on)
    off = [r for r in lines if not r["on_policy"]]
    assert all(r["loss"] == pytest.approx(0.5 * r["kd_loss"] + 0.5 * r["ce_loss"], rel=1e-5) for r in off)
    # every evaluation judges the student's continuations of the same held-out prompts
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval_ppl" in r]
    assert len(evals) >= 2 and all(r["gen_teacher_nll"] > 0 and 0 < r["gen_length"] <= 12 for r in evals)
    assert evals[0]["gen_samples"][0]["prompt"] == evals[-1]["gen_samples"][0]["prompt"]
    # throughput: a median per kind of step, in run.json and in the report (generation makes
    # on-policy steps another population)
    final = json.loads((tmp_path / "run" / "run.json").read_text())["final"]
    assert final["tokens_per_s"] == statistics.median_high(r["tokens_per_s"] for r in off)
    assert final["on_policy_tokens_per_s"] == statistics.median_high(r["tokens_per_s"] for r in on)
    assert "throughput of on-policy steps" in (tmp_path / "run" / "report.md").read_text()
    report = (tmp_path / "run" / "report.md").read_text()
    assert (
        "## The student's own text" in report
        and "On-policy steps: **" in report
        and (tmp_path / "run" / "plots" / "generations.png").is_file()
    )


def test_a_killed_on_policy_run_resumes_to_the_same_samples_and_weights(tmp_path, teacher_dir, text_file):
    args = (
        *ON,
        "--set",
        "checkpoint.every=2",
        "--set",
        "distill.on_policy.fraction=0.7",
        "--set",
        "distill.on_policy.max_new_tokens=6",
    )
    whole = cli(*_args(teacher_dir, text_file, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr[-2000:]
    first = run_cli(*_args(teacher_dir, text_file, tmp_path / "cut", *args, "--set", "debug.exit_after_step=3"))
    assert first.returncode != 0
    resumed = cli(
        *_args(teacher_dir, text_file, tmp_path / "cut", *args, "--set", "debug.exit_after_step=null"), "--resume"
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _steps(tmp_path / "whole"), _steps(tmp_path / "cut")
    assert any(r["on_policy"] for r in a[2:])
    keys = ("loss", "on_policy", "generated_tokens")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    wa, wb = (load_file(p / "student" / "model.safetensors") for p in (tmp_path / "whole", tmp_path / "cut"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_what_cannot_work_is_refused_before_anything_is_written(tmp_path, teacher_dir, text_file):
    one_error_line(cli(*_args(teacher_dir, text_file, tmp_path / "a", *ON, "--kd-weight", "0")), "kd_weight")
    one_error_line(
        cli(*_args(teacher_dir, text_file, tmp_path / "b", *ON, "--set", "distill.on_policy.prompt_tokens=32")),
        "prompt_tokens",
        "block",
    )
    one_error_line(
        cli(*_args(teacher_dir, text_file, tmp_path / "c", *ON, "--teacher-cache", str(tmp_path))), "live teacher"
    )
    one_error_line(
        cli(*_args(teacher_dir, text_file, tmp_path / "d", "--set", "distill.on_policy.fraction=1.5")), "fraction"
    )
    one_error_line(
        cli(
            *_args(
                teacher_dir,
                text_file,
                tmp_path / "e",
                *ON,
                "--set",
                "distill.on_policy.loss=sampled_token",
                "--set",
                "distill.on_policy.top_p=0.9",
            )
        ),
        "sampled_token",
        "top_p=1",
    )
    one_error_line(
        cli(*_args(teacher_dir, text_file, tmp_path / "f", *ON, "--set", "distill.on_policy.max_new_tokens=100000")),
        "max_new_tokens",
        "positions",
    )
    assert not any((tmp_path / n).exists() for n in "abcdef")


def test_a_prompt_completion_jsonl_gives_its_prompts_to_on_policy_steps(tmp_path, teacher_dir, corpus_texts):
    """Records {prompt, completion}: off-policy steps train on the completions, on-policy steps
    continue the prompts, which are exactly the records' prompt strings."""
    import json

    records = []
    for i, text in enumerate(corpus_texts[:40]):
        words = text.split()
        records.append({"prompt": f"Q{i}: " + " ".join(words[:4]), "completion": " " + " ".join(words[4:8])})
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "run"
    # blocks of 96 tokens hold whole records (a record longer than a block is split, and its
    # later pieces start with targets: no prompt to continue)
    proc = cli(
        *_args(
            teacher_dir,
            data,
            out,
            *ON,
            "--set",
            "distill.on_policy.fraction=1",
            "--seed",
            "2",
            "--set",
            "data.block_size=96",
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _steps(out)
    assert all(r["on_policy"] for r in lines) and all(r["generated_tokens"] > 0 for r in lines)
    samples = [s for r in read_jsonl(out / "metrics.jsonl") if "gen_samples" in r for s in r["gen_samples"]]
    prompts = {r["prompt"] for r in records}
    assert samples and all(s["prompt"] in prompts for s in samples), samples[:2]


def test_nan_logits_while_the_student_writes_do_not_crash_the_step(tmp_path, teacher_dir, text_file):
    """NaN in the student's logits during an on-policy step, generation included (torch's sampler
    refuses NaN probabilities): the tokens are still written and the step's loss decides. Here
    the poisoned entry is at a prompt position, which is no target: the step trains normally."""
    proc = cli(
        *_args(
            teacher_dir,
            text_file,
            tmp_path / "run",
            *ON,
            "--set",
            "distill.on_policy.fraction=1",
            "--set",
            "debug.inject=[{step: 2, where: student_logits, value: nan}]",
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = _steps(tmp_path / "run")
    assert [r["step"] for r in lines] == list(range(6)) and not any(r.get("skipped") for r in lines)
    assert lines[2]["on_policy"] and lines[2]["generated_tokens"] > 0 and math.isfinite(lines[2]["loss"])
