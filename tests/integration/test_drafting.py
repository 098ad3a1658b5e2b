"""The student as a draft model for the teacher: assisted generation measured (teacher/speculative.py),
through ``lmdistill eval --draft-for`` and a run's ``eval.draft``; ``eval.generate`` in any run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import cli, one_error_line, read_jsonl, tiny_llama, train_args
from lmdistill.teacher.speculative import DraftSettings, measure_drafting

K = 4  # draft tokens per teacher forward


def _prompts(tokenizer, text_file, count=3, length=8):
    ids = tokenizer(text_file.read_text()[:4000]).input_ids
    return [torch.tensor(ids[i * 50 : i * 50 + length]) for i in range(count)]


@pytest.fixture(scope="module")
def models(teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    return teacher, AutoTokenizer.from_pretrained(teacher_dir)


def test_a_copy_of_the_teacher_drafts_every_token_and_greedy_text_is_the_teachers(models, text_file):
    teacher, tok = models
    prompts = _prompts(tok, text_file)
    settings = DraftSettings(prompts=3, max_new_tokens=24, repeats=1, draft_tokens=K, confidence_threshold=0.0)
    eos, pad = tok.eos_token_id, tok.pad_token_id or tok.eos_token_id
    got = measure_drafting(copy.deepcopy(teacher), teacher, prompts, settings, eos, pad)
    # The reference: the teacher alone writes each prompt's text; a draft that always agrees has
    # every one of its K tokens kept, so each teacher forward adds K + 1 tokens (the last fewer).
    lengths = []
    with torch.no_grad():
        for p in prompts:
            out = teacher.generate(
                p.view(1, -1), max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=pad
            )
            lengths.append(out.shape[1] - len(p))
    forwards = sum(math.ceil(n / (K + 1)) for n in lengths)
    assert got["draft_greedy_new_tokens"] == sum(lengths)
    assert got["draft_greedy_teacher_forwards"] == forwards
    assert got["draft_greedy_accepted_per_forward"] == pytest.approx((sum(lengths) - forwards) / forwards)
    assert got["draft_greedy_identical"] == 1.0
    # sampled: a draft equal to the target is always accepted (min(1, p/q) = 1)
    sampled = got["draft_sampled_accepted_per_forward"]
    assert sampled == pytest.approx(got["draft_sampled_new_tokens"] / got["draft_sampled_teacher_forwards"] - 1)
    assert sampled > 2.0
    for key in ("draft_greedy_speedup", "draft_sampled_speedup", "draft_cost"):
        assert got[key] > 0 and math.isfinite(got[key])


def test_a_draft_that_disagrees_is_accepted_less_and_changes_no_greedy_token(models, text_file):
    teacher, tok = models
    prompts = _prompts(tok, text_file)
    stranger = tiny_llama(len(tok), hidden=32, layers=1, seed=7)  # untrained: a poor draft
    settings = DraftSettings(prompts=3, max_new_tokens=24, repeats=1, draft_tokens=K, confidence_threshold=0.0)
    eos, pad = tok.eos_token_id, tok.pad_token_id or tok.eos_token_id
    assert stranger.training and not teacher.training
    got = measure_drafting(stranger, teacher, prompts, settings, eos, pad)
    assert got["draft_greedy_identical"] == 1.0  # assisted greedy decoding is lossless
    assert got["draft_greedy_accepted_per_forward"] < 1.0
    # the models' modes and the draft's own generation settings are put back
    assert stranger.training and not teacher.training
    assert stranger.generation_config.num_assistant_tokens is None


def test_eval_draft_for(student_dir, teacher_dir, text_file, tmp_path):
    args = ("eval", str(student_dir), "--data", str(text_file), "--block-size", "32", "--max-blocks", "4")
    flags = ("--gen-prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "8", "--repeats", "1")
    proc = cli(*args, "--draft-for", str(teacher_dir), *flags, "--json", str(tmp_path / "d.json"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "d.json").read_text())
    accepted = result["draft_greedy_accepted_per_forward"]
    assert f"greedy: {accepted:.2f} draft tokens accepted per teacher forward" in proc.stdout
    assert "teacher perplexity" in proc.stdout  # --draft-for is the teacher of every other number too
    assert result["draft_settings"]["prompts"] == 2 and 0 <= result["draft_acceptance"] <= 1
    one_error_line(cli(*args, "--teacher", str(student_dir), "--draft-for", str(teacher_dir)), "two teachers")
    one_error_line(cli(*args, "--draft-for", str(teacher_dir), "--prompt-tokens", "40"), "--prompt-tokens 40")
    one_error_line(cli(*args, "--draft-for", str(teacher_dir), "--repeats", "0"), "--repeats 0")
    # the same tokenizer, but a vocabulary padded past it: transformers cannot pair the two
    padded = tmp_path / "padded"
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    tiny_llama(len(tok) + 16, hidden=32, layers=1).save_pretrained(padded)
    tok.save_pretrained(padded)
    one_error_line(cli(*args, "--draft-for", str(padded)), "config.vocab_size", "assisted generation")


def _short_run(teacher_dir, text_file, out, *extra):
    student = "model.student_config={num_hidden_layers: 1}"
    return cli(*train_args(teacher_dir, text_file, out, *extra, batch_size=2, max_eval_blocks=None, student=student))


def test_a_run_measures_generation_and_drafting(teacher_dir, text_file, tmp_path):
    out = tmp_path / "run"
    measured = "eval={generate: true, draft: true, prompts: 2, prompt_tokens: 8, max_new_tokens: 8, repeats: 1}"
    lora = "model.lora={r: 2, dropout: 0.3}"  # a LoRA student drafts too; its dropout draws random numbers
    proc = _short_run(teacher_dir, text_file, out, "--set", measured, "--set", lora)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = _short_run(teacher_dir, text_file, tmp_path / "plain", "--set", lora)
    assert plain.returncode == 0, plain.stderr[-3000:]
    # measuring changes nothing in the training: its seeds are its own
    lines = [[r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for d in (out, tmp_path / "plain")]
    assert lines[0] == lines[1]
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_ppl" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all("gen_teacher_nll" in r for r in evals)  # at every evaluation
    assert ["draft_greedy_speedup" in r for r in evals] == [True, False, True]  # at the first and the last
    final = json.loads((out / "run.json").read_text())["final"]
    assert final["draft_greedy_accepted_per_forward"] == evals[-1]["draft_greedy_accepted_per_forward"]
    assert final["gen_teacher_nll"] == evals[-1]["gen_teacher_nll"]
    report = (out / "report.md").read_text()
    assert "draft tokens accepted per teacher forward" in report and "## The student's own text" in report
    assert "On-policy steps" not in report
    # the run's scores are lmdistill eval --generate's, on the same prompts with the same seed
    judge = ("--generate", "--gen-prompts", "2", "--prompt-tokens", "8", "--max-new-tokens", "8", "--seed", "0")
    again = cli("eval", str(out), "--teacher", str(teacher_dir), *judge, "--json", str(tmp_path / "g.json"))
    assert again.returncode == 0, again.stderr[-2000:]
    judged = json.loads((tmp_path / "g.json").read_text())
    for key in ("gen_teacher_nll", "gen_student_nll", "gen_length"):
        assert judged[key] == pytest.approx(evals[-1][key], rel=1e-5), key


def test_eval_generation_needs_a_teacher_model(teacher_dir, text_file, tmp_path):
    proc = cli(
        "train",
        "--teacher-cache",
        str(tmp_path / "cache"),
        "--data",
        str(text_file),
        "--output-dir",
        str(tmp_path / "run"),
        "--set",
        "eval.draft=true",
    )
    one_error_line(proc, "eval.draft", "model.teacher_cache", "--draft-for")
