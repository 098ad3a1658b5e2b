"""Runs on the data store: chat data trained on assistant tokens only, a weighted mixture with
its shares logged and reported, and the chat-template check between teacher and student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat_fixtures import chat_tokenizer
from conftest import cli, read_jsonl, tiny_llama

SMALL_STUDENT = (
    "model.student_config={num_hidden_layers: 1, hidden_size: 16, intermediate_size: 32, "
    "num_attention_heads: 2, num_key_value_heads: 2}"
)


def conversation(i: int) -> list[dict]:
    return [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"Which number follows {i}?"},
        {"role": "assistant", "content": f"The number {i + 1}."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."},
    ]


def assistant_tokens(tokenizer, messages) -> int:
    """By hand: each assistant turn trains on its content, the end-of-turn token and the newline."""
    newline = len(tokenizer.encode("\n", add_special_tokens=False))
    return sum(
        len(tokenizer.encode(m["content"], add_special_tokens=False)) + 1 + newline
        for m in messages
        if m["role"] == "assistant"
    )


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory, tiny_tokenizer) -> tuple[Path, object]:
    tokenizer = chat_tokenizer(tiny_tokenizer)
    path = tmp_path_factory.mktemp("chat-teacher") / "model"
    tiny_llama(len(tokenizer), hidden=32, layers=2, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def _train(teacher, data, out, *extra, steps=3):
    return cli(
        "train",
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        str(steps),
        "--set",
        "data.block_size=128",
        "--set",
        SMALL_STUDENT,
        "--set",
        "model.student_init=random",
        "--set",
        "data.max_eval_blocks=null",
        "--no-progress",
        *extra,
    )


def test_chat_run_trains_and_evaluates_on_assistant_tokens_only(tmp_path, chat_teacher):
    teacher, tokenizer = chat_teacher
    convs = [conversation(i) for i in range(20)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    out = tmp_path / "run"
    proc = _train(teacher, data, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((out / "run.json").read_text())["data"]
    lengths = [
        len(tokenizer.encode(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)) for c in convs
    ]
    assert max(lengths) <= 128  # every conversation fits a block: none is split
    expected = sum(assistant_tokens(tokenizer, c) for c in convs)
    assert info["train_targets"] + info["eval_targets"] == expected
    assert info["sources"][0]["format"] == "messages" and info["sources"][0]["loss_on"] == "assistant"
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_tokens" in r]
    assert evals and all(r["eval_tokens"] == info["eval_targets"] for r in evals)  # only assistant tokens scored
    report = (out / "report.md").read_text()
    assert f"{info['train_targets']:,}" in report or str(info["train_targets"]) in report


def test_chat_templates_of_teacher_and_student_must_agree(tmp_path, chat_teacher, tiny_tokenizer):
    teacher, _ = chat_teacher
    other = chat_tokenizer(
        tiny_tokenizer, template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    student = tmp_path / "student"
    tiny_llama(len(other), hidden=16, layers=1).save_pretrained(student)
    other.save_pretrained(student)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(8)))
    proc = cli(
        "train",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
        "--set",
        "data.block_size=64",
        "--no-progress",
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lmdistill: error:")]
    assert len(lines) == 1 and "different chat templates" in lines[0] and "Traceback" not in proc.stderr


def test_mixture_logs_and_reports_each_sources_share(tmp_path, teacher_dir, corpus_texts):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("\n\n".join(corpus_texts[:8]))
    b.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[8:16]))
    out = tmp_path / "run"
    sources = f"data.sources=[{{path: {a}, weight: 3, name: docs}}, {{path: {b}, weight: 1, name: records}}]"
    proc = cli(
        "train",
        "--teacher",
        str(teacher_dir),
        "--output-dir",
        str(out),
        "--batch-size",
        "4",
        "--max-steps",
        "10",
        "--set",
        "data.block_size=32",
        "--set",
        SMALL_STUDENT,
        "--set",
        sources,
        "--set",
        "train.log_every=1",
        "--set",
        "data.max_eval_blocks=8",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [r for r in read_jsonl(out / "metrics.jsonl") if "source_share" in r]
    assert len(lines) == 10
    # The share after step k counts the blocks of k + 1 steps of 4; a period of 1000 slots is 3:1.
    last = lines[-1]["source_share"]
    assert set(last) == {"docs", "records"} and last["docs"] + last["records"] == pytest.approx(1.0)
    assert 0.5 < last["docs"] < 0.95
    info = json.loads((out / "run.json").read_text())["data"]
    assert [s["name"] for s in info["sources"]] == ["docs", "records"]
    report = (out / "report.md").read_text()
    assert "share of blocks seen" in report and f"{last['docs']:.1%}" in report
