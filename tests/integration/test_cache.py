"""The offline teacher cache end to end: a dense cache trains exactly like the live teacher, a
killed build resumes byte-identical, two processes build the same cache as one, and a cache
that does not fit the run is refused with one line naming the difference."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cli, one_error_line, read_jsonl

STUDENT = (
    "model.student_config={num_hidden_layers: 1, hidden_size: 16, intermediate_size: 32, "
    "num_attention_heads: 2, num_key_value_heads: 2}"
)
DATA = ("--set", "data.block_size=32", "--set", "data.max_eval_blocks=8")


def _cache(teacher_dir, small_text, out: Path, *extra: str):
    return cli(
        "cache-teacher",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(small_text),
        "--out",
        str(out),
        "--no-progress",
        *DATA,
        "--set",
        "cache.shard_blocks=16",
        *extra,
    )


def _train(small_text, out: Path, *extra: str, steps: int = 6):
    return cli(
        "train",
        "--data",
        str(small_text),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        str(steps),
        "--no-progress",
        *DATA,
        "--set",
        STUDENT,
        "--set",
        "model.student_init=random",
        *extra,
    )


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, corpus_texts) -> Path:
    """A small corpus (a few hundred blocks): a dense cache of it stays a few MiB."""
    path = tmp_path_factory.mktemp("cache-data") / "small.txt"
    path.write_text("\n\n".join(corpus_texts[:3]))
    return path


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory, teacher_dir, small_text) -> Path:
    out = tmp_path_factory.mktemp("cache") / "dense"
    proc = _cache(teacher_dir, small_text, out, "--mode", "dense")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, teacher_dir, small_text) -> Path:
    out = tmp_path_factory.mktemp("cache") / "sampled"
    proc = _cache(teacher_dir, small_text, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_dense_cache_trains_like_the_live_teacher(tmp_path, teacher_dir, small_text, dense_cache):
    live = _train(small_text, tmp_path / "live", "--teacher", str(teacher_dir), "--set", "loss.impl=full")
    assert live.returncode == 0, live.stderr[-2000:]
    cached = _train(small_text, tmp_path / "cached", "--teacher-cache", str(dense_cache))
    assert cached.returncode == 0, cached.stderr[-2000:]
    a = [r for r in read_jsonl(tmp_path / "live" / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_jsonl(tmp_path / "cached" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 6
    for x, y in zip(a, b):  # the annealed temperature is re-applied to the cached fp32 logits exactly
        for key in ("loss", "kd_loss", "ce_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
    ea = [r for r in read_jsonl(tmp_path / "live" / "metrics.jsonl") if "teacher_ppl" in r]
    eb = [r for r in read_jsonl(tmp_path / "cached" / "metrics.jsonl") if "teacher_ppl" in r]
    assert eb[-1]["teacher_ppl"] == pytest.approx(ea[-1]["teacher_ppl"], rel=1e-5)
    assert eb[-1]["eval_kl"] == pytest.approx(ea[-1]["eval_kl"], rel=1e-4)
    # the report names the cache (and its teacher) where the teacher would be, not "no KD"
    report = (tmp_path / "cached" / "report.md").read_text()
    assert f"teacher cache {dense_cache} (dense; teacher {teacher_dir}" in report and "no KD" not in report


def test_sampled_cache_trains_and_reports_the_teacher(tmp_path, teacher_dir, small_text):
    out = tmp_path / "sampled"
    assert _cache(teacher_dir, small_text, out).returncode == 0
    proc = _train(
        small_text,
        tmp_path / "run",
        "--teacher-cache",
        str(out),
        "--set",
        "distill.temperature=2.0",
        "--set",
        "distill.min_temperature=2.0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "teacher_ppl" in r]
    assert evals and all(r["eval_kl"] > 0 and 0 <= r["top1_agreement"] <= 1 for r in evals)
    assert "self-normalised" not in proc.stdout  # trained at the capture temperature: no re-weighting
    # Small logits: the sparse targets meet the student's whole logits (auto -> full); the
    # chunked path from hidden states is the same loss step for step.
    chunked = _train(
        small_text,
        tmp_path / "chunked",
        "--teacher-cache",
        str(out),
        "--set",
        "distill.temperature=2.0",
        "--set",
        "distill.min_temperature=2.0",
        "--set",
        "loss.impl=chunked",
    )
    assert chunked.returncode == 0, chunked.stderr[-2000:]
    impl = {
        run: json.loads((tmp_path / run / "run.json").read_text())["plan"]["loss_impl"] for run in ("run", "chunked")
    }
    assert impl == {"run": "full", "chunked": "chunked"}
    steps = {
        run: [(r["step"], r["loss"], r["kd_loss"]) for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in r]
        for run in ("run", "chunked")
    }
    assert len(steps["run"]) == 6 and [s for s, *_ in steps["run"]] == [s for s, *_ in steps["chunked"]]
    for (_, loss, kd), (_, loss_c, kd_c) in zip(steps["run"], steps["chunked"]):
        assert loss == pytest.approx(loss_c, rel=1e-4) and kd == pytest.approx(kd_c, rel=1e-4)
    # the default anneal (2.0 to 1.5) from a cache captured at 2.0: re-weighted, said once
    annealed = _train(small_text, tmp_path / "annealed", "--teacher-cache", str(out))
    assert annealed.returncode == 0, annealed.stderr[-2000:]
    assert annealed.stdout.count("self-normalised importance weights") == 1, annealed.stdout
    lines = [r for r in read_jsonl(tmp_path / "annealed" / "metrics.jsonl") if "loss" in r]
    assert lines[-1]["temperature"] < 2.0 and all(r["kd_loss"] > 0 for r in lines)


def test_a_cache_that_does_not_fit_the_run_is_refused(tmp_path, teacher_dir, small_text, dense_cache, corpus_texts):
    one_error_line(
        _train(small_text, tmp_path / "a", "--teacher-cache", str(dense_cache), "--set", "data.block_size=16"),
        "block size",
        "32",
        "16",
    )
    other = tmp_path / "other.txt"
    other.write_text("\n".join(corpus_texts[5:20]))
    one_error_line(_train(other, tmp_path / "b", "--teacher-cache", str(dense_cache)), "other data")
    one_error_line(_train(small_text, tmp_path / "c", "--teacher-cache", str(tmp_path)), "not a teacher cache")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "craft, needle",
    [
        (lambda m: {**m, "shards": {}}, "its shard list does not match its"),
        (lambda m: {**m, "mode": "bogus"}, "mode 'bogus' is none of sampled, topk, dense"),
        (lambda m: {**m, "shard_rows": "abc"}, "shard_rows is 'abc'"),
        (lambda m: {**m, "tensors": {"logits": "float64"}}, "its tensors are not those of a dense cache"),
        (lambda m: [m], "a JSON list, not an object"),
        (lambda m: json.dumps(m)[:200], "not valid JSON"),
    ],
    ids=["no-shards", "mode", "type", "tensors", "not-an-object", "truncated"],
)
def test_a_crafted_or_damaged_manifest_is_refused_in_one_line(tmp_path, small_text, dense_cache, craft, needle):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dense_cache, copy)
    crafted = craft(json.loads((copy / "manifest.json").read_text()))
    (copy / "manifest.json").write_text(crafted if isinstance(crafted, str) else json.dumps(crafted))
    one_error_line(
        _train(small_text, tmp_path / "run", "--teacher-cache", str(copy)),
        f"teacher cache '{copy}': manifest.json is damaged or was not written by lmdistill",
        needle,
        "rebuild the cache",
    )
    assert not (tmp_path / "run").exists()


def test_topk_with_k_above_the_vocabulary_is_refused_before_anything_runs(tmp_path, teacher_dir, small_text):
    out = tmp_path / "cache"
    one_error_line(
        _cache(teacher_dir, small_text, out, "--mode", "topk", "--k", "100000"),
        "cache.k = 100000 (--k) is not below the vocabulary of 384 tokens",
        "give --k 383 or less",
    )
    # k = V keeps no tail (mass 0, log -inf): every step would be skipped as nonfinite
    one_error_line(_cache(teacher_dir, small_text, out, "--mode", "topk", "--k", "384"), "--mode dense")
    assert not out.exists()


def test_cache_teacher_refuses_a_bert_or_a_teacher_short_of_the_tokenizer(tmp_path, small_text, tiny_tokenizer):
    """As train does: checked before the data is read or anything is written into --out (#47c, #22e)."""
    from transformers import BertConfig, BertForMaskedLM

    from conftest import tiny_llama

    bert, short = tmp_path / "bert", tmp_path / "short"
    BertForMaskedLM(
        BertConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(bert)
    tiny_llama(300, hidden=16, layers=1, seed=3).save_pretrained(short)
    for model in (bert, short):
        tiny_tokenizer.save_pretrained(model)
    one_error_line(_cache(bert, small_text, tmp_path / "a"), f"the teacher '{bert}'", "not a causal language model")
    one_error_line(_cache(short, small_text, tmp_path / "b"), f"teacher '{short}' has 300 output rows", "384 tokens")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    one_error_line(
        _train(small_text, tmp_path / "c", "--teacher", str(short)), f"teacher '{short}' has 300 output rows"
    )


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda t: t["counts"].fill(0), "do not add up to 12 draws"),
        (lambda t: t["ids"].fill(60000), "token ids outside the vocabulary of 384"),
        (lambda t: t["logz"].fill(np.nan), "logz holds NaN"),
    ],
    ids=["zero-counts", "ids", "nan"],
)
def test_a_rehashed_shard_with_impossible_values_is_refused(
    tmp_path, teacher_dir, small_text, sampled_cache, damage, needle
):
    """The hash only says the shard is the one hashed: its values are checked too (a shard of zero
    counts trained with a negative kd_loss, ids past the vocabulary crashed in indexing)."""
    import hashlib
    import shutil

    from safetensors.numpy import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(sampled_cache, copy)
    shard = copy / "train-00000.safetensors"
    tensors = load_file(str(shard))
    damage(tensors)
    save_file(tensors, str(shard))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][shard.name] = {
        "bytes": shard.stat().st_size,
        "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
    }
    (copy / "manifest.json").write_text(json.dumps(manifest))
    one_error_line(
        _train(small_text, tmp_path / "run", "--teacher-cache", str(copy)),
        "shard train-00000.safetensors is damaged",
        needle,
        "rebuild the cache",
    )
    assert not (tmp_path / "run").exists()


def test_a_named_teacher_must_be_the_caches_own(tmp_path, teacher_dir, small_text, dense_cache, tiny_tokenizer):
    from conftest import tiny_llama

    other = tmp_path / "other"
    tiny_llama(len(tiny_tokenizer), hidden=48, layers=2, seed=5).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    one_error_line(
        _train(small_text, tmp_path / "a", "--teacher-cache", str(dense_cache), "--teacher", str(other)),
        f"the teacher '{other}' is not the one teacher cache '{dense_cache}' was built from",
        "content hash",
        "leave model.teacher (--teacher) out",
    )
    one_error_line(
        _train(small_text, tmp_path / "b", "--teacher-cache", str(dense_cache), "--teacher", "someone/another-teacher"),
        "the cache records the teacher",
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    same = _train(
        small_text, tmp_path / "c", "--teacher-cache", str(dense_cache), "--teacher", str(teacher_dir), steps=1
    )
    assert same.returncode == 0, same.stderr[-2000:]


def test_a_corrupt_shard_is_refused(tmp_path, teacher_dir, small_text, dense_cache):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dense_cache, copy)
    shard = copy / "train-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    one_error_line(_train(small_text, tmp_path / "run", "--teacher-cache", str(copy)), "train-00001", "SHA-256")


def test_a_different_cache_is_not_overwritten_without_asking(tmp_path, teacher_dir, small_text, dense_cache):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dense_cache, copy)
    before = _files(copy)
    one_error_line(_cache(teacher_dir, small_text, copy, "--mode", "topk"), "different teacher cache", "--overwrite")
    assert _files(copy) == before
    again = _cache(teacher_dir, small_text, copy, "--mode", "dense")
    assert again.returncode == 0 and "already complete" in again.stdout


def test_overwrite_replaces_a_teacher_cache_and_nothing_else(tmp_path, teacher_dir, small_text, dense_cache):
    """--overwrite replaces only a directory that is a cache through and through: a web project
    with a manifest.json, a run's checkpoint, or a cache with a file of the user's beside it are
    refused in one line that does not offer --overwrite, and left as they were."""
    import json
    import shutil

    web = tmp_path / "web"
    web.mkdir()
    (web / "manifest.json").write_text(json.dumps({"name": "app", "start_url": "/", "icons": []}))
    (web / "app.js").write_text("console.log('mine')\n")
    step = tmp_path / "run" / "checkpoints" / "step-4"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(
        json.dumps({"format": "lmdistill-checkpoint", "format_version": 1, "step": 4, "files": {}})
    )
    (step / "model.safetensors").write_bytes(b"weights")
    for target in (web, step):
        before = _files(target)
        for extra in ((), ("--overwrite",)):
            line = one_error_line(
                _cache(teacher_dir, small_text, target, "--mode", "topk", *extra), "not a teacher cache"
            )
            assert "--overwrite" not in line
        assert _files(target) == before
    copy = tmp_path / "copy"
    shutil.copytree(dense_cache, copy)
    assert (copy / ".lmdistill-cache").is_file()  # a cache carries its marker
    (copy / "notes.txt").write_text("mine")
    before = _files(copy)
    line = one_error_line(
        _cache(teacher_dir, small_text, copy, "--mode", "topk", "--overwrite"),
        "notes.txt",
        "files lmdistill did not write",
    )
    assert "--overwrite" not in line and _files(copy) == before
    # a cache written before caches had a marker is still known by its manifest
    (copy / "notes.txt").unlink()
    (copy / ".lmdistill-cache").unlink()
    again = _cache(teacher_dir, small_text, copy, "--mode", "dense")
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr[-2000:]
    one_error_line(_cache(teacher_dir, small_text, copy, "--mode", "topk"), "different teacher cache", "--overwrite")


def test_overwrite_deletes_only_the_shards_the_old_cache_lists(tmp_path, teacher_dir, small_text, dense_cache):
    """A file named like a shard that the old manifest does not list is the user's (#10)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dense_cache, copy)
    (copy / "train-00099.safetensors").write_text("mine")
    before = _files(copy)
    one_error_line(
        _cache(teacher_dir, small_text, copy, "--mode", "topk", "--overwrite"),
        "train-00099.safetensors",
        "not listed by the cache there",
        "never deletes",
    )
    assert _files(copy) == before
    (copy / "train-00099.safetensors").unlink()
    proc = _cache(teacher_dir, small_text, copy, "--mode", "topk", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_cache_lock_is_never_opened_through_a_link(tmp_path, teacher_dir, small_text):
    """A lock link planted in --out: the build stops in one line and the link's target keeps its
    bytes (opened through the link, the lock would truncate it and write a pid into it)."""
    from lmdistill.core.errors import LmdistillError
    from lmdistill.teacher import cache as tc

    victim = tmp_path / "precious.txt"
    victim.write_text("precious\n")
    out = tmp_path / "cache"
    out.mkdir()
    (out / tc.LOCK).symlink_to(victim)
    one_error_line(_cache(teacher_dir, small_text, out), "not a teacher cache and not empty")  # not "empty"
    with pytest.raises(LmdistillError, match="is a symbolic link"):  # the lock itself, whatever the checks
        tc._lock(out)
    assert victim.read_text() == "precious\n" and (out / tc.LOCK).is_symlink()


PAUSED_BUILD = """
import sys, time
from pathlib import Path
from lmdistill.teacher import cache
from lmdistill.cli import main
go = Path(sys.argv.pop(1))
real, done = cache.write_shard, []
def pausing(*args, **kw):
    done.append(real(*args, **kw))
    if len(done) == 1:  # one shard written: say so, and wait for the test
        (go.parent / "paused").touch()
        while not go.exists():
            time.sleep(0.05)
cache.write_shard = pausing
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_build_into_the_same_directory_is_refused_while_the_first_runs(tmp_path, teacher_dir, small_text):
    """Two builds into one --out at two temperatures: the second (even with --overwrite) stops in
    one line naming the first's pid and writes nothing; the first ends with a cache whose shards
    are all its own. Once the first has ended, the second may replace it."""
    from lmdistill.teacher.cache import TeacherCache

    out, go = tmp_path / "cache", tmp_path / "go"
    args = [
        "cache-teacher",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(small_text),
        "--out",
        str(out),
        "--no-progress",
        *DATA,
        "--set",
        "cache.shard_blocks=16",
        "--temperature",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSED_BUILD, str(go), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (tmp_path / "paused").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "paused").exists(), first.stderr.read()[-2000:] if first.poll() is not None else "slow"
        before = _files(out)
        second = _cache(teacher_dir, small_text, out, "--temperature", "2", "--overwrite")
        one_error_line(second, "another cache-teacher is writing", str(out), f"pid {first.pid} on ", "another --out")
        assert _files(out) == before
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert TeacherCache.open(out).temperature == 1.0  # every shard matches the manifest (verified on open)
    again = _cache(teacher_dir, small_text, out, "--temperature", "2", "--overwrite")
    assert again.returncode == 0, again.stderr[-2000:]
    assert TeacherCache.open(out).temperature == 2.0


KILLED_BUILD = """
import os, sys
from lmdistill.teacher import cache
from lmdistill.cli import main
real, done = cache.write_shard, []
def dying(*args, **kw):
    if len(done) == 2:
        os._exit(137)  # as SIGKILL: no cleanup, no flush
    done.append(real(*args, **kw))
cache.write_shard = dying
main(sys.argv[1:])
"""


def test_a_killed_build_resumes_byte_identical(tmp_path, teacher_dir, small_text):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # A fresh process (a fork of this one could deadlock in torch's thread pool).
    args = [
        "cache-teacher",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(small_text),
        "--out",
        str(killed),
        "--no-progress",
        *DATA,
        "--set",
        "cache.shard_blocks=16",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", KILLED_BUILD, *args], env=env, capture_output=True, timeout=300)
    assert child.returncode == 137 and not (killed / "manifest.json").exists(), child.stderr[-2000:]
    assert len(list(killed.glob("*.safetensors"))) == 2
    one_error_line(_train(small_text, tmp_path / "run", "--teacher-cache", str(killed)), "unfinished cache build")
    assert _cache(teacher_dir, small_text, killed).returncode == 0
    assert _cache(teacher_dir, small_text, clean).returncode == 0
    assert _files(killed) == _files(clean)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to name descriptors")
def test_a_full_disk_at_the_manifest_leaves_an_unfinished_cache_that_a_rerun_finishes(
    tmp_path, teacher_dir, small_text, dense_cache, monkeypatch
):
    """The manifest is written last: a build that cannot write it stops in one line and leaves an
    unfinished cache (its shards, no manifest, no temporary file), which the rerun completes
    byte-identical to a build that never failed."""
    from lmdistill.teacher import cache as tc

    out = tmp_path / "cache"
    real_fsync = os.fsync

    def full_disk_at_the_manifest(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.parent == out and path.name.startswith(f".{tc.MANIFEST}.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_at_the_manifest)
    one_error_line(_cache(teacher_dir, small_text, out, "--mode", "dense"), "No space left on device", tc.MANIFEST)
    monkeypatch.setattr(os, "fsync", real_fsync)
    names = os.listdir(out)
    assert tc.MANIFEST not in names and not any(n.startswith(f".{tc.MANIFEST}") for n in names)
    assert any(n.endswith(".safetensors") for n in names)
    assert _cache(teacher_dir, small_text, out, "--mode", "dense").returncode == 0
    assert _files(out) == _files(dense_cache)


@pytest.mark.slow
def test_two_processes_build_the_cache_one_process_builds(tmp_path, teacher_dir, small_text, dense_cache):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "lmdistill",
        "cache-teacher",
        "--teacher",
        str(teacher_dir),
        "--data",
        str(small_text),
        "--out",
        str(out),
        "--mode",
        "dense",
        "--no-progress",
        *DATA,
        "--set",
        "cache.shard_blocks=16",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(out) == _files(dense_cache)


def test_a_cached_run_resumes_bit_exact(tmp_path, teacher_dir, small_text):
    """Kill a run from a sampled cache after step 3 and resume it: the same losses and weights as
    a run straight through (the signal changes, the loop's resume does not)."""
    from safetensors.torch import load_file

    from forked import run_cli_forked

    cache = tmp_path / "cache"
    assert _cache(teacher_dir, small_text, cache).returncode == 0
    args = (
        "--teacher-cache",
        str(cache),
        "--set",
        "checkpoint.every=1",
        "--set",
        "distill.temperature=2.0",
        "--set",
        "distill.min_temperature=2.0",
    )
    straight = tmp_path / "straight"
    assert _train(small_text, straight, *args).returncode == 0
    resumed = tmp_path / "resumed"
    first = run_cli_forked(
        "train",
        "--data",
        str(small_text),
        "--output-dir",
        str(resumed),
        "--batch-size",
        "2",
        "--max-steps",
        "6",
        "--no-progress",
        *DATA,
        "--set",
        STUDENT,
        "--set",
        "model.student_init=random",
        *args,
        "--set",
        "debug.exit_after_step=3",
        log=str(tmp_path / "first.log"),
    )
    assert first == 137, (tmp_path / "first.log").read_text()[-2000:]
    again = _train(small_text, resumed, *args, "--resume")
    assert again.returncode == 0 and "from step-3" in again.stdout, again.stderr[-2000:]

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]

    assert losses(resumed) == losses(straight)
    want = load_file(straight / "checkpoints" / "step-6" / "model.safetensors")
    got = load_file(resumed / "checkpoints" / "step-6" / "model.safetensors")
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


CUT = "model.student_config={num_hidden_layers: 1, hidden_size: 24, intermediate_size: 48}"


def test_a_cached_run_with_a_cut_student_resumes_without_the_teacher_on_disk(tmp_path, teacher_dir, small_text):
    """The student was cut from the teacher when the run started; its resume takes the student's
    shape from the checkpoint and needs no teacher weights (the teacher is gone by then), and
    ends where a run straight through ends."""
    import shutil

    from safetensors.torch import load_file

    from forked import run_cli_forked

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    cache = tmp_path / "cache"
    assert _cache(teacher, small_text, cache).returncode == 0
    args = (
        "--data",
        str(small_text),
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--no-progress",
        *DATA,
        "--set",
        CUT,
        "--teacher-cache",
        str(cache),
        "--set",
        "checkpoint.every=1",
    )
    straight = tmp_path / "straight"
    proc = cli("train", *args, "--output-dir", str(straight))
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = tmp_path / "resumed"
    first = run_cli_forked(
        "train",
        *args,
        "--output-dir",
        str(resumed),
        "--set",
        "debug.exit_after_step=2",
        log=str(tmp_path / "first.log"),
    )
    assert first == 137, (tmp_path / "first.log").read_text()[-2000:]
    shutil.rmtree(teacher)
    again = cli("train", *args, "--output-dir", str(resumed), "--resume")
    assert again.returncode == 0 and "from step-2" in again.stdout, again.stderr[-2000:]
    want = load_file(straight / "checkpoints" / "step-4" / "model.safetensors")
    got = load_file(resumed / "checkpoints" / "step-4" / "model.safetensors")
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


def _cut_run(small_text, out: Path, cache: Path, *extra: str):
    """A cached run whose student is not given: one step at a learning rate too small to move a
    weight, so the final student is the one the run started from."""
    return cli(
        "train",
        "--data",
        str(small_text),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--no-progress",
        *DATA,
        "--set",
        CUT,
        "--set",
        "train.lr=1e-12",
        "--teacher-cache",
        str(cache),
        *extra,
    )


def test_a_cached_run_cuts_its_student_out_of_the_teacher_on_disk(
    tmp_path, teacher_dir, small_text, dense_cache, monkeypatch
):
    """The same student as lmdistill prune cuts with the same settings (and a live run starts from),
    and the teacher loaded for the cut is gone before training."""
    import gc
    import json
    import weakref

    import torch
    from safetensors.torch import load_file

    from lmdistill.config import Config
    from lmdistill.data.sources import build_block_data
    from lmdistill.models import loading as models_module

    pruned = tmp_path / "pruned"
    proc = cli(
        "prune", "--teacher", str(teacher_dir), "--data", str(small_text), "--out", str(pruned), *DATA, "--set", CUT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    proc = _cut_run(small_text, run, dense_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["student"]["name"].startswith("from the teacher")
    want, got = load_file(pruned / "model.safetensors"), load_file(run / "student" / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), key

    # in the process: the teacher's weights were loaded once, for the cut, and no longer exist
    cfg = Config.load(
        None,
        [CUT, "data.block_size=32", "data.max_eval_blocks=8"],
        {"data.path": str(small_text), "model.teacher_cache": str(dense_cache)},
    )
    loaded = []
    real = models_module.load_causal_lm

    def recording(*args, **kwargs):
        model = real(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(models_module, "load_causal_lm", recording)
    models = models_module.load_models(cfg, train_blocks=lambda tok: build_block_data(cfg.data, tok).train)
    gc.collect()
    assert models.teacher is None and len(loaded) == 1 and loaded[0]() is None
    assert all(torch.equal(models.student.state_dict()[k], want[k]) for k in want)
    # model.student_init: random keeps the fresh start
    cfg.model.student_init = "random"
    fresh = models_module.load_models(cfg)
    assert fresh.student_name.startswith("fresh") and len(loaded) == 1
    assert not torch.equal(fresh.student.state_dict()["model.norm.weight"], want["model.norm.weight"])


def test_a_cache_whose_teacher_is_gone_or_other_is_refused_in_one_line(
    tmp_path, teacher_dir, small_text, tiny_tokenizer
):
    import json
    import shutil

    from conftest import tiny_llama

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    cache = tmp_path / "cache"
    assert _cache(teacher, small_text, cache, "--set", "cache.samples=2").returncode == 0
    moved = tmp_path / "moved"
    teacher.rename(moved)
    for init in ("auto", "teacher"):
        proc = _cut_run(small_text, tmp_path / init, cache, "--set", f"model.student_init={init}")
        one_error_line(
            proc,
            f"model.student_init: {init}",
            str(teacher),
            "no longer exists",
            "lmdistill prune --teacher T --out DIR",
            "--student DIR",
            "model.student_init=random",
        )
        assert not (tmp_path / init).exists()
    # a hub teacher that is not in the local cache (the tests run with HF_HUB_OFFLINE=1)
    hub = tmp_path / "hub-cache"
    shutil.copytree(cache, hub)
    manifest = json.loads((hub / "manifest.json").read_text())
    manifest["teacher"] = {"source": "nobody-here/no-such-teacher", "hash": None}
    (hub / "manifest.json").write_text(json.dumps(manifest))
    one_error_line(
        _cut_run(small_text, tmp_path / "h", hub),
        "'nobody-here/no-such-teacher' is not on disk",
        "HF_HUB_OFFLINE=1",
        "--student DIR",
        "model.student_init=random",
    )
    # another teacher than the cache's: refused, named by its content hash
    other = tmp_path / "other"
    tiny_llama(len(tiny_tokenizer), hidden=48, layers=2, seed=5).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    one_error_line(
        _cut_run(small_text, tmp_path / "o", cache, "--teacher", str(other)),
        "is not the one teacher cache",
        "content hash",
        "leave model.teacher (--teacher) out",
    )
    # the same teacher where it is now: cut from it
    proc = _cut_run(small_text, tmp_path / "found", cache, "--teacher", str(moved))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_teacher_signal_trains_and_evaluates_through_the_same_objects(
    teacher_dir, small_text, dense_cache, sampled_cache
):
    """The contract a new signal joins: every signal's view goes through the training objective
    (a finite loss, finite gradients) and through the evaluation (finite scores) on the same
    blocks; the views of one teacher agree where they hold the same numbers."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import tiny_llama
    from lmdistill.config import Config
    from lmdistill.data.sources import build_block_data
    from lmdistill.loss.objective import KDSpec, Objective
    from lmdistill.teacher.cache import TeacherCache
    from lmdistill.teacher.signals import CachedTeacher, LiveHidden, LiveLogits, NoTeacher
    from lmdistill.training.evaluate import evaluate

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    vocab = len(tokenizer)
    cfg = Config.load(overrides=["data.block_size=32", "data.max_eval_blocks=8"], values={"data.path": str(small_text)})
    data = build_block_data(cfg.data, tokenizer, progress=False)
    dense, sampled = TeacherCache.open(dense_cache), TeacherCache.open(sampled_cache)
    signals = {
        "none": NoTeacher(),
        "live logits": LiveLogits(teacher, vocab),
        "live hidden": LiveHidden(teacher),
        "dense cache": CachedTeacher(dense),
        "sampled cache, whole logits": CachedTeacher(sampled, student_output="logits"),
        "sampled cache, hidden states": CachedTeacher(sampled, student_output="hidden"),
    }
    eval_signals = {
        "live logits": LiveLogits(teacher, vocab),
        "dense cache": CachedTeacher(dense, "eval"),
        "sampled cache": CachedTeacher(sampled, "eval"),
    }
    batch = data.train.batch(range(4))
    num_tokens = float(batch.num_targets)
    losses = {}
    for name, signal in signals.items():
        student = tiny_llama(vocab, hidden=16, layers=1, seed=5)
        kd = KDSpec(kd_weight=0.0 if name == "none" else 0.5)
        objective = Objective(kd, vocab, signal.student_output, student)
        parts = objective(student, batch, signal(batch, 1.0), 1.0, num_tokens)
        parts.total.backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert math.isfinite(parts.total.item()) and grads, name
        assert all(bool(torch.isfinite(g).all()) for g in grads), name
        losses[name] = parts.total.item()
    # the same teacher as logits, as hidden states or as a dense cache: the same loss
    assert losses["live hidden"] == pytest.approx(losses["live logits"], rel=1e-5)
    assert losses["dense cache"] == pytest.approx(losses["live logits"], rel=1e-4)
    student = tiny_llama(vocab, hidden=16, layers=1, seed=5)
    scores = {
        name: evaluate(
            student,
            signal,
            data.eval,
            vocab_size=vocab,
            temperature=2.0,
            progress=False,
            teacher_ce=None if name == "live logits" else 3.0,
        )
        for name, signal in eval_signals.items()
    }
    for name, out in scores.items():
        assert all(math.isfinite(out[k]) for k in ("eval_kd_loss", "eval_kl", "top1_agreement")), name
    live, cached = scores["live logits"], scores["dense cache"]
    for key in ("eval_ce_loss", "eval_kd_loss", "eval_kl", "top1_agreement"):
        assert cached[key] == pytest.approx(live[key], rel=1e-4), key
    # sampled targets estimate the same KL (12 draws per position: close, not equal)
    assert scores["sampled cache"]["eval_kl"] == pytest.approx(live["eval_kl"], rel=0.1)
