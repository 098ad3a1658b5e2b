"""Distillation across two tokenizers, end to end: two data stores of one text kept in step by
their byte offsets, the aligned loss (which is the ordinary KD loss for one tokenizer), bits per
byte in the evaluation and the report, resume, two processes, and the refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import cli, launch, one_error_line, read_jsonl, save_student, tiny_llama, unigram_tokenizer
from lmdistill.config import Config
from lmdistill.data.sources import build_block_data
from lmdistill.training.checkpoint import load_checkpoint

STEPS = 6
STUDENT_VOCAB = 300


@pytest.fixture(scope="module")
def other_tokenizer(corpus_texts):
    """A smaller byte-level BPE than the teacher's, trained on the same text."""
    from lmdistill.default import train_tokenizer

    return train_tokenizer(corpus_texts, vocab_size=STUDENT_VOCAB)


@pytest.fixture(scope="module")
def other_student(tmp_path_factory, other_tokenizer):
    """An untrained student with its own tokenizer."""
    return save_student(tmp_path_factory.mktemp("cross-student") / "model", other_tokenizer, seed=3)


@pytest.fixture(scope="module")
def unicode_text(tmp_path_factory, corpus_texts):
    """The corpus with characters of two, three and four UTF-8 bytes spread through it."""
    words = ["naïve", "café", "—", "✓", "日本語", "𝔘𝔫𝔦", "ünïcödé"]
    pieces = [f"{text[:400]} {words[i % len(words)]} {text[400:900]}" for i, text in enumerate(corpus_texts)]
    path = tmp_path_factory.mktemp("cross-data") / "unicode.txt"
    path.write_text("\n\n".join(pieces), encoding="utf-8")
    return path


def _data(path, tokenizer, teacher_tokenizer, block_size=64):
    cfg = Config()
    cfg.data.path, cfg.data.block_size = str(path), block_size
    return build_block_data(cfg.data, tokenizer, progress=False, teacher_tokenizer=teacher_tokenizer)


def test_byte_offsets_are_where_each_token_ends_in_the_text(unicode_text, tiny_tokenizer):
    store = _data(unicode_text, tiny_tokenizer, tiny_tokenizer).train.store
    raw = unicode_text.read_bytes()
    # The reference: a byte-level token's string has one character per byte; the EOS is one byte.
    eos = tiny_tokenizer.eos_token_id
    widths = [1 if t == eos else len(tiny_tokenizer.convert_ids_to_tokens(t)) for t in store.tokens.tolist()]
    reference = np.cumsum(widths)
    ours = np.asarray(store.text_bytes)
    assert reference[-1] == len(raw) + 1 == ours[-1]  # the whole file, and its EOS
    # Where a token ends at a character's end the offsets agree; a token ending inside a character
    # (a byte-level piece of it) is counted to that character's end.
    starts_char = np.asarray([(b & 0xC0) != 0x80 for b in raw] + [True, True])
    at_char_end = starts_char[reference]
    assert at_char_end.mean() > 0.9
    assert np.array_equal(ours[at_char_end], reference[at_char_end])
    assert (ours[~at_char_end] > reference[~at_char_end]).all()


def test_each_block_and_its_teacher_window_cover_the_same_text(unicode_text, tiny_tokenizer, other_tokenizer):
    data = _data(unicode_text, other_tokenizer, tiny_tokenizer)
    raw = unicode_text.read_bytes()
    student, teacher = data.train, data.train.teacher
    s_ends, t_ends = np.asarray(student.store.text_bytes), np.asarray(teacher.store.text_bytes)
    checked, covered = 0, []
    for row in range(len(student)):
        s0, t0, m = int(student.starts[row]), int(teacher.starts[row]), int(teacher.lengths[row])
        lo, hi = (int(s_ends[s0 - 1]) if s0 else 0), int(s_ends[s0 + student.block_size - 1])
        w_lo, w_hi = (int(t_ends[t0 - 1]) if t0 else 0), int(t_ends[t0 + m - 1])
        # the window is the teacher's tokens inside the block's bytes, all of them: its neighbours cross the edges
        assert lo <= w_lo < w_hi <= hi
        assert t0 < 2 or int(t_ends[t0 - 2]) <= lo
        assert t0 + m == len(t_ends) or int(t_ends[t0 + m]) > hi
        covered.append((w_hi - w_lo) / (hi - lo))
        block_text = other_tokenizer.decode(student.store.tokens[s0 : s0 + student.block_size].tolist())
        window_text = tiny_tokenizer.decode(teacher.store.tokens[t0 : t0 + m].tolist())
        if "\ufffd" not in block_text + window_text:  # neither cuts a character at an edge
            assert block_text == raw[lo:hi].decode() and window_text == raw[w_lo:w_hi].decode()
            checked += 1
    assert checked > 0.8 * len(student) and np.mean(covered) > 0.9


def test_one_tokenizer_pairs_every_position_with_itself(unicode_text, tiny_tokenizer):
    blocks = _data(unicode_text, tiny_tokenizer, tiny_tokenizer).train
    batch = blocks.batch(np.arange(len(blocks)))
    tokens = batch.teacher_tokens
    assert torch.equal(tokens.batch.input_ids, batch.input_ids)
    every = torch.arange(batch.targets.numel())
    assert torch.equal(tokens.teacher_positions, every) and torch.equal(tokens.student_positions, every)


def test_pairs_predict_the_same_text(unicode_text, tiny_tokenizer, other_tokenizer):
    blocks = _data(unicode_text, other_tokenizer, tiny_tokenizer).train
    batch = blocks.batch(np.arange(8))
    tokens = batch.teacher_tokens
    assert 0.5 < len(tokens.student_positions) / batch.targets.numel() < 1.0
    s_width, t_width = batch.input_ids.shape[1] - 1, tokens.batch.input_ids.shape[1] - 1
    for t, s in zip(tokens.teacher_positions.tolist(), tokens.student_positions.tolist()):
        row = s // s_width
        assert t // t_width == row
        before_s = other_tokenizer.decode(batch.input_ids[row, : s % s_width + 1].tolist())
        before_t = tiny_tokenizer.decode(tokens.batch.input_ids[row, : t % t_width + 1].tolist())
        # both have read up to the same point of the text (the teacher's window may start later)
        assert before_s.endswith(before_t) or "\ufffd" in before_s + before_t


def test_cross_tokenizer_loss_is_the_ordinary_loss_for_one_tokenizer(teacher_dir, text_file, tiny_tokenizer):
    """Same value and same gradient as the ordinary full path, on real blocks."""
    from transformers import AutoModelForCausalLM

    from lmdistill.loss.objective import KDSpec, Objective
    from lmdistill.teacher.signals import LiveAligned, LiveLogits

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = tiny_llama(len(tiny_tokenizer), hidden=32, layers=1, seed=5)
    batch = _data(text_file, tiny_tokenizer, tiny_tokenizer).train.batch(np.arange(4))
    vocab = len(tiny_tokenizer)
    objective = Objective(KDSpec(0.7), vocab, "logits", student)
    results = []
    for signal in (LiveLogits(teacher, vocab), LiveAligned(teacher, tiny_tokenizer, tiny_tokenizer)):
        student.zero_grad()
        parts = objective(student, batch, signal(batch, 2.0), 2.0, batch.num_targets)
        parts.total.backward()
        results.append((parts, [p.grad.clone() for p in student.parameters()]))
    (ordinary, g_ordinary), (aligned, g_aligned) = results
    for name in ("total", "kd", "ce"):
        torch.testing.assert_close(getattr(aligned, name), getattr(ordinary, name), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_aligned, g_ordinary):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_chunked_path_equals_the_full_path_across_tokenizers(
    teacher_dir, unicode_text, tiny_tokenizer, other_tokenizer
):
    """The chunked cross-tokenizer loss (hidden states, logits a few rows at a time) against the
    full one: same value, same gradient, with chunks smaller than the pairs of one batch."""
    from transformers import AutoModelForCausalLM

    from lmdistill.loss.objective import KDSpec, Objective
    from lmdistill.teacher.signals import LiveAligned, LiveAlignedHidden

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = tiny_llama(len(other_tokenizer), hidden=32, layers=1, seed=6)
    batch = _data(unicode_text, other_tokenizer, tiny_tokenizer).train.batch(np.arange(4))
    vocab = len(other_tokenizer)
    results = []
    for output, signal in (
        ("logits", LiveAligned(teacher, tiny_tokenizer, other_tokenizer)),
        ("hidden", LiveAlignedHidden(teacher, tiny_tokenizer, other_tokenizer)),
    ):
        objective = Objective(KDSpec(0.6), vocab, output, student, chunk_size=37)
        student.zero_grad()
        parts = objective(student, batch, signal(batch, 2.5), 2.5, batch.num_targets)
        parts.total.backward()
        results.append((parts, [p.grad.clone() for p in student.parameters()]))
    (full, g_full), (chunked, g_chunked) = results
    assert len(batch.teacher_tokens.student_positions) > 3 * 37
    for name in ("total", "kd", "ce"):
        torch.testing.assert_close(getattr(chunked, name), getattr(full, name), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _args(teacher_dir, student_dir, data, out, *extra):
    return (
        "train",
        "--teacher",
        str(teacher_dir),
        "--student",
        str(student_dir),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        str(STEPS),
        "--eval-every",
        "3",
        "--lr",
        "3e-3",
        "--set",
        "data.block_size=48",
        "--set",
        "data.max_eval_blocks=6",
        "--set",
        "checkpoint.every=1",
        "--set",
        "checkpoint.keep=100",
        "--no-progress",
        *extra,
    )


def _losses(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory, teacher_dir, other_student, unicode_text):
    out = tmp_path_factory.mktemp("cross") / "run"
    proc = cli(*_args(teacher_dir, other_student, unicode_text, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_a_run_across_tokenizers_reports_bits_per_byte(cross_run):
    out, stdout = cross_run
    assert "different tokenizers" in stdout and "distilling across tokenizers" in stdout
    assert "bits/byte" in stdout and "teacher (own tokens)" in stdout
    losses = _losses(out)
    assert len(losses) == STEPS and all(math.isfinite(loss) for _, loss, _ in losses)
    kd = [r["kd_loss"] for r in read_jsonl(out / "metrics.jsonl") if "kd_loss" in r]
    assert all(k > 0 for k in kd)
    final = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_bpb" in r][-1]
    assert 0 < final["aligned_fraction"] < 1 and final["teacher_bpb"] > 0
    report = (out / "report.md").read_text()
    assert "bits per byte of the held-out text" in report and "(its own tokens)" in report


def test_a_chunked_run_across_tokenizers_evaluates_as_the_full_one(
    cross_run, teacher_dir, other_student, unicode_text, tmp_path
):
    """loss.impl = chunked (what auto picks for a large vocabulary) trains on the teacher's hidden
    states; its evaluations still form the teacher's logits: the figures before the first step are
    the full-path run's, and the last ones within the two paths' training tolerance."""
    out = tmp_path / "chunked"
    proc = cli(*_args(teacher_dir, other_student, unicode_text, out, "--set", "loss.impl=chunked"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["plan"]["loss_impl"] == "chunked"
    full, chunked = ([r for r in read_jsonl(run / "metrics.jsonl") if "eval_bpb" in r] for run in (cross_run[0], out))
    assert len(full) == len(chunked) >= 2
    for key in ("eval_bpb", "teacher_bpb", "aligned_fraction"):
        assert chunked[0][key] == pytest.approx(full[0][key], rel=1e-6), key
        assert chunked[-1][key] == pytest.approx(full[-1][key], rel=1e-3), key


@pytest.mark.slow
def test_the_cpu_speed_threshold_leaves_the_cross_tokenizer_loss_on_its_memory_rule(
    teacher_dir, other_student, unicode_text, tmp_path
):
    """loss.auto_cpu_threshold_mib was measured for the dense KD loss only: across tokenizers auto
    keeps full below the memory threshold, however low the CPU threshold is set."""
    out = tmp_path / "run"
    proc = cli(*_args(teacher_dir, other_student, unicode_text, out, "--set", "loss.auto_cpu_threshold_mib=0.0001"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["plan"]["loss_impl"] == "full"


def test_bits_per_byte_recomputed_independently(cross_run, teacher_dir, other_tokenizer, tiny_tokenizer, unicode_text):
    """The student's and the teacher's bits per byte of the eval blocks, from the saved models, the
    blocks' decoded text and a plain cross-entropy: no byte offsets, no lmdistill loss."""
    from transformers import AutoModelForCausalLM

    out, _ = cross_run
    final = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_bpb" in r][-1]
    eval_blocks = _data(unicode_text, other_tokenizer, tiny_tokenizer, block_size=48).eval.subset(slice(0, 6))
    student = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    nats = {"student": 0.0, "teacher": 0.0}
    size = {"student": 0, "teacher": 0}
    with torch.no_grad():
        for row in range(len(eval_blocks)):
            ids = eval_blocks.ids([row])
            text = other_tokenizer.decode(ids[0].tolist())
            t_ids = torch.tensor([tiny_tokenizer(text, add_special_tokens=False)["input_ids"]])
            for role, model, tok, x in (
                ("student", student, other_tokenizer, ids),
                ("teacher", teacher, tiny_tokenizer, t_ids),
            ):
                logits = model(x).logits[0, :-1]
                nats[role] += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
                size[role] += len(tok.decode(x[0, 1:].tolist()).encode())
    for role, key in (("student", "eval_bpb"), ("teacher", "teacher_bpb")):
        # (the teacher's tokens of a block's text, tokenized here alone, differ from its window's at the edges)
        assert final[key] == pytest.approx(
            nats[role] / size[role] / math.log(2), rel=0.03 if role == "teacher" else 1e-3
        )


def test_eval_and_model_card_across_tokenizers(cross_run, teacher_dir):
    out, _ = cross_run
    final = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_bpb" in r][-1]
    card = (out / "student" / "README.md").read_text()
    assert "bits per byte of the held-out text" in card and f"{final['teacher_bpb']:.4f}" in card
    result = cli("eval", str(out), "--teacher", str(teacher_dir), "--json", str(out.parent / "eval.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "different tokenizers" in result.stdout and "bits per byte of the text: model" in result.stdout
    scored = json.loads((out.parent / "eval.json").read_text())
    # the run's own held-out blocks, scored again: the run's last evaluation
    assert scored["eval_bpb"] == pytest.approx(final["eval_bpb"], rel=1e-5)
    assert scored["teacher_bpb"] == pytest.approx(final["teacher_bpb"], rel=1e-5)
    refused = cli("eval", str(out), "--teacher", str(teacher_dir), "--generate")
    one_error_line(refused, "different tokenizers", "drop --generate")


@pytest.mark.slow
def test_killed_cross_tokenizer_run_resumes_bit_exact(cross_run, teacher_dir, other_student, unicode_text, tmp_path):
    from forked import run_cli_forked

    uninterrupted, _ = cross_run
    out = tmp_path / "resumed"
    assert (
        run_cli_forked(*_args(teacher_dir, other_student, unicode_text, out, "--set", "debug.exit_after_step=3")) == 137
    )
    resumed = cli(*_args(teacher_dir, other_student, unicode_text, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(out) == _losses(uninterrupted)
    want = load_checkpoint(uninterrupted / "checkpoints" / f"step-{STEPS}").model_state
    got = load_checkpoint(out / "checkpoints" / f"step-{STEPS}").model_state
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
def test_two_processes_match_one_across_tokenizers(cross_run, teacher_dir, other_student, unicode_text, tmp_path):
    single, _ = cross_run
    args = list(_args(teacher_dir, other_student, unicode_text, tmp_path / "ddp"))
    args[args.index("--batch-size") + 1] = "1"
    ddp = launch(2, *args)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _losses(single), _losses(tmp_path / "ddp")
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(a, b):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-4)


@pytest.fixture(scope="module")
def sentencepiece_student(tmp_path_factory, corpus_texts):
    """A student with a Unigram tokenizer and SentencePiece's space marker: a vocabulary that
    shares few tokens with the byte-level teacher's, and another way of cutting text."""
    tokenizer = unigram_tokenizer(corpus_texts, 500)
    return save_student(tmp_path_factory.mktemp("sp-student") / "model", tokenizer, seed=4), tokenizer


def test_a_student_whose_vocabulary_shares_few_tokens(
    teacher_dir, sentencepiece_student, tiny_tokenizer, unicode_text, tmp_path
):
    from lmdistill.data.alignment import shared_vocabulary

    path, tokenizer = sentencepiece_student
    assert len(shared_vocabulary(tiny_tokenizer, tokenizer)[0]) < 0.5 * len(tiny_tokenizer)
    out = tmp_path / "run"
    proc = cli(*_args(teacher_dir, path, unicode_text, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_jsonl(out / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) and r["kd_loss"] > 0 for r in lines if "loss" in r)
    final = [r for r in lines if "eval_bpb" in r][-1]
    assert final["aligned_fraction"] > 0.3 and final["eval_bpb"] > 0 and final["teacher_bpb"] > 0


def test_text_a_tokenizer_writes_as_unknown_is_measured_and_noted(
    tmp_path, corpus_texts, sentencepiece_student, tiny_tokenizer, capsys
):
    """A student whose tokenizer never saw Japanese writes it as <unk>: the share of the text's
    bytes under its unknown token, recomputed here from the tokenizer's own offsets document by
    document (an EOS is one byte of the store's text), and the one-line note a run prints."""
    from types import SimpleNamespace

    from lmdistill.training.setup import note_unknown_text

    docs = [f"{text[:300]} 日本語の文章です {text[300:600]}" for text in corpus_texts[:8]]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    _, student = sentencepiece_student
    built = _data(data, student, tiny_tokenizer)
    unknown = total = 0
    for doc in docs:
        encoded = student(doc, return_offsets_mapping=True, add_special_tokens=False)
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            unknown += len(doc[start:end].encode()) if token == student.unk_token_id else 0
        total += len(doc.encode()) + 1
    share = built.sources[0].store.unknown_byte_share(student.unk_token_id)
    assert share == pytest.approx(unknown / total, rel=1e-9) and share > 0.01
    assert built.train.teacher.store.unknown_byte_share(tiny_tokenizer.unk_token_id) == 0  # byte-level: none
    # A tokenizer whose unknown token is its EOS (GPT-2's family): the EOS that ends each document is not unknown text.
    assert built.train.teacher.store.unknown_byte_share(tiny_tokenizer.eos_token_id) == 0
    capsys.readouterr()  # (the stores' build lines)
    note_unknown_text(built, SimpleNamespace(tokenizer=student, teacher_tokenizer=tiny_tokenizer))
    printed = capsys.readouterr().out.strip().splitlines()
    assert (
        len(printed) == 1
        and printed[0].startswith("note: the student's tokenizer writes")
        and f"{share:.1%} of the text's bytes as its unknown token '<unk>'" in printed[0]
    )


def test_a_teacher_cache_refuses_a_student_with_another_tokenizer(teacher_dir, other_student, unicode_text, tmp_path):
    cache = tmp_path / "cache"
    small = tmp_path / "small.txt"
    small.write_text(unicode_text.read_text()[:4000])
    built = cli("cache-teacher", "--teacher", str(teacher_dir), "--data", str(small), "--out", str(cache),
                "--no-progress", "--set", "data.block_size=48")  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    refused = cli("train", "--teacher-cache", str(cache), "--student", str(other_student), "--data", str(small),
                  "--output-dir", str(tmp_path / "run"), "--set", "data.block_size=48", "--no-progress")  # fmt: skip
    one_error_line(refused, "another tokenizer", "model.teacher")
    assert not (tmp_path / "run").exists()


def test_refusals(teacher_dir, other_student, student_dir, unicode_text, tmp_path):
    base = _args(teacher_dir, other_student, unicode_text, tmp_path / "run")
    one_error_line(
        cli(*base, "--set", "distill.cross_tokenizer=never"), "different tokenizers", "distill.cross_tokenizer: auto"
    )
    one_error_line(cli(*base, "--set", "distill.divergence=reverse_kl"), "different tokenizers", "forward_kl")
    one_error_line(cli(*base, "--set", "distill.on_policy.fraction=0.5"), "different tokenizers", "on_policy")
    same = _args(teacher_dir, student_dir, unicode_text, tmp_path / "run")
    one_error_line(cli(*same, "--set", "distill.cross_tokenizer=always", "--set", "distill.hidden.weight=1"), "hidden")
    assert not (tmp_path / "run").exists()
