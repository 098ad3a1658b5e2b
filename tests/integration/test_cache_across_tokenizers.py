"""The teacher cache across tokenizers: ``cache-teacher --student S`` keeps the teacher's targets
carried to S's tokens on S's blocks, and S trains from it with no teacher model: the targets are
the live cross-tokenizer signal's, the loss is the live loss, the held-out figures are in bits per
byte, and what does not fit is refused in one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import cli, one_error_line, read_jsonl, save_student, unigram_tokenizer
from lmdistill.config import Config
from lmdistill.data.sources import build_block_data

STUDENT_VOCAB = 400
BLOCK = ("--set", "data.block_size=48", "--set", "data.max_eval_blocks=6")


@pytest.fixture(scope="module")
def other_tokenizer(corpus_texts):
    """Some of its tokens cover several of the teacher's (the pairs' moved mass) and some of the
    teacher's cover several of its own (the continuations)."""
    return unigram_tokenizer(corpus_texts, STUDENT_VOCAB)


@pytest.fixture(scope="module")
def other_student(tmp_path_factory, other_tokenizer):
    return save_student(tmp_path_factory.mktemp("across-student") / "model", other_tokenizer, seed=3)


@pytest.fixture(scope="module")
def text(tmp_path_factory, corpus_texts):
    path = tmp_path_factory.mktemp("across-data") / "text.txt"
    path.write_text("\n\n".join(corpus_texts[:12]), encoding="utf-8")
    return path


def _build(teacher_dir, student, text, out, *extra):
    return cli("cache-teacher", "--teacher", str(teacher_dir), "--student", str(student), "--data", str(text),
               "--out", str(out), "--no-progress", *BLOCK, *extra)  # fmt: skip


def _train(cache, student, text, out, *extra):
    return cli("train", "--teacher-cache", str(cache), "--student", str(student), "--data", str(text),
               "--output-dir", str(out), "--batch-size", "2", "--max-steps", "4", "--eval-every", "2",
               "--lr", "3e-3", "--no-progress", *BLOCK, *extra)  # fmt: skip


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, teacher_dir, other_student, text):
    """Top-k with k one below the student's vocabulary, at T = 1: all but the least likely token."""
    out = tmp_path_factory.mktemp("across-cache") / "topk"
    built = _build(teacher_dir, other_student, text, out, "--mode", "topk", "--k", str(STUDENT_VOCAB - 1),
                   "--temperature", "1")  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    assert "across tokenizers" in built.stdout and "bits per byte" in built.stdout
    return out


def test_the_cache_holds_the_teacher_carried_to_the_student_tokens(
    topk_cache, teacher_dir, tiny_tokenizer, other_tokenizer, text
):
    """At every pair, the cached distribution is the teacher's next-token distribution carried to
    the student token each teacher token's text begins with, computed here from the teacher's
    logits on its own tokens; where the student's next token covers several of the teacher's, the
    teacher's probability of that text (the product over them) moved onto it. The positions with a
    target are the pairs and the continuations."""
    from transformers import AutoModelForCausalLM

    from lmdistill.data.alignment import vocabulary_map
    from lmdistill.teacher.cache import TeacherCache

    cache = TeacherCache.open(topk_cache)
    assert cache.across["teacher_vocab_size"] == len(tiny_tokenizer) and cache.manifest["vocab_size"] == STUDENT_VOCAB
    cfg = Config()
    cfg.data.path, cfg.data.block_size = str(text), 48
    blocks = build_block_data(cfg.data, other_tokenizer, progress=False, teacher_tokenizer=tiny_tokenizer).train
    rows = np.arange(16)
    batch = blocks.batch(rows)
    cached = cache.targets("train", torch.from_numpy(rows), 1.0)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        t_logits = teacher(batch.teacher_tokens.batch.input_ids).logits[:, :-1].reshape(-1, len(tiny_tokenizer))
    p = torch.softmax(t_logits[batch.teacher_tokens.teacher_positions].double(), -1)
    mapping = torch.from_numpy(vocabulary_map(tiny_tokenizer, other_tokenizer))
    want = torch.zeros(len(p), STUDENT_VOCAB, dtype=torch.float64)
    for t in range(len(tiny_tokenizer)):
        if mapping[t] >= 0:
            want[:, mapping[t]] += p[:, t]
    at, tp = batch.teacher_tokens.student_positions, batch.teacher_tokens.teacher_positions
    own = batch.teacher_tokens.batch.targets.reshape(-1)
    longer = batch.teacher_tokens.longer.tolist()
    assert longer  # (the case is there to check)
    for k, n in longer:
        text = sum(torch.log_softmax(t_logits[int(tp[k]) + i].double(), -1)[own[int(tp[k]) + i]] for i in range(n))
        first = mapping[own[tp[k]]]
        if first >= 0:
            want[k, batch.targets.reshape(-1)[at[k]]] += text.exp()
            want[k, first] -= text.exp()
    want /= want.sum(-1, keepdim=True)
    got = torch.zeros(len(at), STUDENT_VOCAB, dtype=torch.float64)
    got.scatter_add_(1, cached.ids[at], cached.weights[at].double())
    assert cached.tail[at].max() < 1e-3  # (k = V - 1 leaves out one token)
    torch.testing.assert_close(got, want, atol=1e-4 + float(cached.tail[at].max()), rtol=1e-3)
    assert torch.equal(cached.paired.nonzero().squeeze(1), at)
    inside = set(cached.present.nonzero().squeeze(1).tolist()) - set(at.tolist())
    assert inside and inside <= set(batch.teacher_tokens.continuations[:, 0].tolist())
    assert 0.5 < cached.present.float().mean() < 1.0


def test_training_from_the_cache_is_training_with_the_live_teacher(
    topk_cache, teacher_dir, other_student, text, tmp_path
):
    """Same student, data and seed at T = 1: the losses of a run from the cache are the live
    cross-tokenizer run's (up to the one token top-k leaves out), and both report the teacher's
    held-out bits per byte on its own tokens alike."""
    one = ("--set", "distill.temperature=1", "--set", "distill.min_temperature=1")
    cached = _train(topk_cache, other_student, text, tmp_path / "cached", *one)
    assert cached.returncode == 0, cached.stderr[-3000:]
    live = cli("train", "--teacher", str(teacher_dir), "--student", str(other_student), "--data", str(text),
               "--output-dir", str(tmp_path / "live"), "--batch-size", "2", "--max-steps", "4", "--eval-every", "2",
               "--lr", "3e-3", "--no-progress", *BLOCK, *one)  # fmt: skip
    assert live.returncode == 0, live.stderr[-3000:]
    runs = [read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("cached", "live")]
    steps = [[r for r in lines if "loss" in r] for lines in runs]
    assert len(steps[0]) == len(steps[1]) == 4
    for a, b in zip(*steps):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-4) and a["kd_loss"] == pytest.approx(b["kd_loss"], rel=1e-3)
    evals = [[r for r in lines if "eval_bpb" in r][-1] for lines in runs]
    for key in ("eval_bpb", "teacher_bpb", "aligned_fraction", "eval_ce_loss"):
        assert evals[0][key] == pytest.approx(evals[1][key], rel=1e-4), key
    assert "bits/byte" in cached.stdout and "teacher (own tokens)" in cached.stdout


def test_a_sampled_cache_trains_at_an_annealed_temperature(teacher_dir, other_student, text, tmp_path):
    """The default mode and the original recipe's temperature schedule: draws made at T = 2 are
    re-weighted for each step's T, and the student learns."""
    built = _build(teacher_dir, other_student, text, tmp_path / "cache")
    assert built.returncode == 0, built.stderr[-3000:]
    run = _train(tmp_path / "cache", other_student, text, tmp_path / "run", "--max-steps", "6")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in lines if "loss" in r]
    assert all(math.isfinite(r["loss"]) and r["kd_loss"] > 0 for r in steps)
    assert steps[0]["temperature"] > steps[-1]["temperature"]
    evals = [r for r in lines if "eval_bpb" in r]
    assert evals[-1]["eval_bpb"] < evals[0]["eval_bpb"] and evals[-1]["teacher_bpb"] > 0


def test_refusals(topk_cache, teacher_dir, other_student, student_dir, text, tmp_path):
    one_error_line(_build(teacher_dir, other_student, text, tmp_path / "dense", "--mode", "dense"), "dense", "topk")
    too_many = _build(teacher_dir, other_student, text, tmp_path / "k", "--mode", "topk", "--k", str(STUDENT_VOCAB))
    one_error_line(too_many, "cache.k", f"--k {STUDENT_VOCAB - 1}")
    fresh = cli("train", "--teacher-cache", str(topk_cache), "--data", str(text), "--output-dir", str(tmp_path / "run"),
                "--no-progress", *BLOCK)  # fmt: skip
    one_error_line(fresh, "tokens of the student it was built for", "model.student")
    other = _train(topk_cache, student_dir, text, tmp_path / "run")  # a student with the teacher's tokenizer
    one_error_line(other, "built for a student with another tokenizer", "cache-teacher --student")
    assert not any((tmp_path / name).exists() for name in ("dense", "k", "run"))


def test_a_damaged_cache_across_tokenizers_is_refused(topk_cache, tmp_path):
    """A manifest whose teacher side is garbled, or a shard holding a position kind no build
    writes (its SHA-256 recorded anew, as a crafted cache would), is refused in one line."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from lmdistill.core.errors import LmdistillError
    from lmdistill.core.paths import sha256_file
    from lmdistill.teacher.cache import TeacherCache

    garbled = tmp_path / "garbled"
    shutil.copytree(topk_cache, garbled)
    manifest = json.loads((garbled / "manifest.json").read_text())
    (garbled / "manifest.json").write_text(json.dumps({**manifest, "cross_tokenizer": "teacher"}))
    with pytest.raises(LmdistillError, match="damaged.*cross_tokenizer does not name the teacher's tokenizer"):
        TeacherCache.open(garbled)
    crafted = tmp_path / "crafted"
    shutil.copytree(topk_cache, crafted)
    shard = crafted / "train-00000.safetensors"
    tensors = load_file(shard)
    tensors["kind"][0, 0] = 7
    save_file(tensors, shard)
    manifest["shards"][shard.name] = {"bytes": shard.stat().st_size, "sha256": sha256_file(shard)}
    (crafted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmdistillError, match="train-00000.safetensors is damaged.*position kinds"):
        TeacherCache.open(crafted)
