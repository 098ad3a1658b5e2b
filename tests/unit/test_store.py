"""The tokenized block store: files and manifest, reuse, parallel and resumed builds, chat
packing and masks, mixtures. References are computed here by hand: the tokenizer called on
each document, the chat layout written out, the samplers' counts tallied."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from chat_fixtures import END_OF_TURN, chat_tokenizer
from lmdistill.config import DataConfig
from lmdistill.core.errors import LmdistillError
from lmdistill.data import store as store_module
from lmdistill.data.blocks import MixtureSampler, layout_blocks, quotas
from lmdistill.data.sources import build_block_data, make_sampler, open_store
from lmdistill.loss.dense import IGNORE_INDEX


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def docs(corpus_texts) -> list[str]:
    return [t[:2000] for t in corpus_texts[:10]]


@pytest.fixture()
def home(tmp_path) -> Path:
    return tmp_path / "stores"


def cfg_for(path, home, **kw) -> DataConfig:
    return DataConfig(path=str(path) if path else None, store_dir=str(home), **kw)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- the store on disk ---------------------------------------------------------------------


def test_store_holds_each_document_then_eos_in_uint16_with_hashes(tmp_path, home, docs, tiny_tokenizer):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    store, built = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    assert built
    expected, ends = [], []
    for d in docs:
        expected += ids_of(tiny_tokenizer, d) + [tiny_tokenizer.eos_token_id]
        ends.append(len(expected))
    assert store.tokens.dtype == np.uint16 and store.tokens.tolist() == expected
    assert store.doc_ends.tolist() == ends and store.mask is None
    manifest = json.loads((store.path / "manifest.json").read_text())
    for name, record in manifest["files"].items():
        assert hashlib.sha256((store.path / name).read_bytes()).hexdigest() == record["sha256"]
    assert manifest["tokens"] == len(expected) and manifest["documents"] == len(docs)
    assert manifest["key"]["tokenizer"].startswith("sha256:")
    assert manifest["source_files"] == [
        {
            "path": str(source.resolve()),
            "bytes": source.stat().st_size,
            "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        }
    ]
    assert list(home.iterdir()) == [store.path] or {p.suffix for p in home.iterdir()} <= {"", ".lock"}


def test_second_open_does_not_tokenize(tmp_path, home, docs, tiny_tokenizer, monkeypatch):
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    first, built = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    monkeypatch.setattr(store_module, "_tokenize_shard", lambda *a: pytest.fail("tokenized again"))
    again, built_again = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    assert built and not built_again and again.path == first.path and again.fingerprint == first.fingerprint


def test_a_changed_file_gets_a_new_store(tmp_path, home, docs, tiny_tokenizer):
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    first, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    source.write_text(docs[1])
    second, built = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    assert built and second.path != first.path and second.fingerprint != first.fingerprint
    assert second.tokens.tolist() == ids_of(tiny_tokenizer, docs[1]) + [tiny_tokenizer.eos_token_id]


def small_shards(monkeypatch):
    monkeypatch.setattr(store_module, "SHARD_BYTES", 3000)
    monkeypatch.setattr(store_module, "PIECE_BYTES", 700)


def _die(*args):
    os._exit(9)  # as a worker killed by the out-of-memory killer ends


def test_a_worker_that_dies_ends_the_build_with_one_line(tmp_path, docs, tiny_tokenizer, monkeypatch):
    small_shards(monkeypatch)
    monkeypatch.setattr(store_module, "_tokenize_shard", _die)  # (the forked workers inherit it)
    source = tmp_path / "big.txt"
    source.write_text("\n".join(docs))
    with pytest.raises(LmdistillError, match=r"tokenizer process .* died .* lower data.num_proc \(now 2\)"):
        open_store(str(source), cfg_for(source, tmp_path / "s", num_proc=2), tiny_tokenizer)
    monkeypatch.undo()
    small_shards(monkeypatch)
    store, _ = open_store(str(source), cfg_for(source, tmp_path / "s", num_proc=2), tiny_tokenizer)  # the rerun
    assert store.tokens[-1] == tiny_tokenizer.eos_token_id


def test_parallel_build_equals_one_process_and_decodes_to_the_text(tmp_path, docs, tiny_tokenizer, monkeypatch):
    small_shards(monkeypatch)
    source = tmp_path / "big.txt"
    text = "\n".join(docs)
    source.write_text(text)
    one, _ = open_store(str(source), cfg_for(source, tmp_path / "one", num_proc=1), tiny_tokenizer)
    two, _ = open_store(str(source), cfg_for(source, tmp_path / "two", num_proc=2), tiny_tokenizer)
    assert one.manifest["key"] == two.manifest["key"]
    assert len(one.manifest["key"]["source"]["files"]) == 1
    assert (one.path / "tokens.bin").read_bytes() == (two.path / "tokens.bin").read_bytes()
    assert one.fingerprint == two.fingerprint
    ids = one.tokens.tolist()
    assert ids[-1] == tiny_tokenizer.eos_token_id and ids.count(tiny_tokenizer.eos_token_id) == 1
    assert tiny_tokenizer.decode(ids[:-1]) == text  # cut into pieces after newlines, nothing lost or doubled


def _killed_build(source: str, home: str, tokenizer, after: int) -> None:
    """Child process: build, dying like SIGKILL (no cleanup) after ``after`` shards."""
    store_module.SHARD_BYTES, store_module.PIECE_BYTES = 3000, 700
    real, done = store_module._tokenize_shard, []

    def dying(*args):
        if len(done) == after:
            os._exit(137)
        done.append(real(*args))
        return done[-1]

    store_module._tokenize_shard = dying
    open_store(source, cfg_for(source, home, num_proc=1), tokenizer, progress=False)


def test_killed_build_resumes_and_equals_an_uninterrupted_one(tmp_path, docs, tiny_tokenizer, monkeypatch, capsys):
    source = tmp_path / "big.txt"
    source.write_text("\n".join(docs))
    child = multiprocessing.get_context("fork").Process(
        target=_killed_build, args=(str(source), str(tmp_path / "k"), tiny_tokenizer, 2)
    )
    child.start()
    child.join()
    assert child.exitcode == 137
    leftovers = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert not any((tmp_path / "k" / n / "manifest.json").exists() for n in leftovers)  # nothing usable yet
    build = next(tmp_path.glob("k/*.build"))
    assert len(list(build.glob("shard-*.json"))) == 2
    small_shards(monkeypatch)
    resumed, built = open_store(str(source), cfg_for(source, tmp_path / "k", num_proc=1), tiny_tokenizer)
    assert built and "resuming the data store build" in capsys.readouterr().out
    clean, _ = open_store(str(source), cfg_for(source, tmp_path / "clean", num_proc=1), tiny_tokenizer)
    assert (resumed.path / "tokens.bin").read_bytes() == (clean.path / "tokens.bin").read_bytes()
    assert not build.exists()


def _build_in_child(source: str, home: str, tokenizer, log: str) -> None:
    real = store_module._build

    def logged(*args, **kw):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        import time

        time.sleep(0.5)  # the other process arrives while this one holds the lock
        return real(*args, **kw)

    store_module._build = logged
    open_store(source, cfg_for(source, home, num_proc=1), tokenizer, progress=False)


def test_two_processes_build_one_store_once(tmp_path, docs, tiny_tokenizer):
    source, log = tmp_path / "a.txt", tmp_path / "builds.log"
    source.write_text(docs[2])
    ctx = multiprocessing.get_context("fork")
    children = [
        ctx.Process(target=_build_in_child, args=(str(source), str(tmp_path / "h"), tiny_tokenizer, str(log)))
        for _ in range(2)
    ]
    for c in children:
        c.start()
    for c in children:
        c.join()
    assert [c.exitcode for c in children] == [0, 0]
    assert len(log.read_text().split()) == 1  # one process tokenized; the other waited and mapped its files
    assert len([p for p in (tmp_path / "h").iterdir() if (p / "manifest.json").exists()]) == 1


def test_a_damaged_store_is_refused_with_the_fix(tmp_path, home, docs, tiny_tokenizer):
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    store, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    with open(store.path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(LmdistillError, match=r"is damaged: tokens.bin has 10 bytes.*delete the directory"):
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)


def test_bad_record_leaves_no_store_and_names_the_record(tmp_path, home, tiny_tokenizer):
    source = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine words"}, {"text": "more"}, {"text": 7}])
    with pytest.raises(LmdistillError, match=r"record 2: a record's text field holds int"):
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    assert [p for p in home.iterdir() if p.suffix != ".lock"] == []


def test_max_tokens_takes_the_first_tokens_of_text(tmp_path, home, docs, tiny_tokenizer):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    full, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    capped, _ = open_store(str(source), cfg_for(source, home, max_tokens=1000), tiny_tokenizer)
    assert capped.num_tokens == 1000 and capped.tokens.tolist() == full.tokens[:1000].tolist()
    assert capped.path != full.path


def test_id_dtype_is_the_narrowest_that_holds_the_vocabulary():
    assert store_module.id_dtype(384) == "uint16" and store_module.id_dtype(65_536) == "uint16"
    assert store_module.id_dtype(65_537) == "uint32" and store_module.id_dtype(151_936) == "uint32"


# ---- chat data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tok(tiny_tokenizer):
    return chat_tokenizer(tiny_tokenizer)


def conversation(i: int) -> list[dict]:
    return [
        {"role": "user", "content": f"What is item {i}?"},
        {"role": "assistant", "content": f"Item {i} is a number."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Nothing more."},
    ]


def assistant_tokens(tokenizer, messages) -> int:
    """By hand: an assistant turn trains on its content, the end-of-turn token and the newline after it."""
    return sum(
        len(ids_of(tokenizer, m["content"])) + 1 + len(ids_of(tokenizer, "\n"))
        for m in messages
        if m["role"] == "assistant"
    )


def test_chat_store_masks_assistant_turns_and_packs_whole_conversations(tmp_path, home, chat_tok):
    convs = [conversation(i) for i in range(12)]
    source = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": c} for c in convs] + [{"messages": [{"role": "user", "content": "no reply"}]}],
    )
    cfg = cfg_for(source, home, block_size=64, max_eval_blocks=None)
    store, _ = open_store(str(source), cfg, chat_tok)
    assert store.chat and store.manifest["skipped_no_assistant"] == 1 and store.manifest["documents"] == 12
    assert int(store.mask.sum()) == sum(assistant_tokens(chat_tok, c) for c in convs)
    lengths = np.diff(np.concatenate([[0], store.doc_ends]))
    assert lengths.max() <= 64  # each conversation fits a block: none may be split
    layout = layout_blocks(store, 64, "assistant")
    starts = set(np.concatenate([[0], store.doc_ends[:-1]]).tolist())
    assert set(layout.starts.tolist()) <= starts  # every block starts at a conversation
    assert (layout.lengths <= 64).all() and layout.lengths.sum() == store.num_tokens
    # Greedy: a block is closed only when the next conversation would not fit in it.
    for start, length in zip(layout.starts[:-1], layout.lengths[:-1]):
        nxt = int(np.searchsorted(store.doc_ends, start + length, side="right"))
        assert length + lengths[nxt] > 64
    # Every target of every block is an assistant token: the hand count, as no block starts on one.
    data = build_block_data(
        DataConfig(path=str(source), store_dir=str(home), block_size=64, max_eval_blocks=None, eval_fraction=0.2),
        chat_tok,
    )
    total = sum(assistant_tokens(chat_tok, c) for c in convs)
    assert data.train.num_targets + data.eval.num_targets == total
    valid = []
    for part in (data.train, data.eval):
        batch = part.batch(range(len(part)))
        assert batch.num_targets == part.num_targets == int((batch.targets != IGNORE_INDEX).sum())
        valid += batch.targets[batch.targets != IGNORE_INDEX].tolist()
    role_ids = set(chat_tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]))
    assert not role_ids & set(valid)  # no role header is ever a target
    assert valid.count(chat_tok.convert_tokens_to_ids(END_OF_TURN)) == 2 * len(convs)


def test_loss_on_all_trains_on_every_real_token_but_not_padding(tmp_path, home, chat_tok):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(6)])
    store, _ = open_store(str(source), cfg_for(source, home), chat_tok)
    layout = layout_blocks(store, 64, "all")
    assert layout.targets.tolist() == (layout.lengths - 1).tolist()


def test_prompt_completion_strings_train_on_the_completion_and_eos(tmp_path, home, tiny_tokenizer):
    records = [{"prompt": f"Question {i}:", "completion": f" answer number {i}."} for i in range(5)]
    source = write_jsonl(tmp_path / "pc.jsonl", records)
    store, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    expected = sum(len(ids_of(tiny_tokenizer, r["completion"])) + 1 for r in records)
    assert int(store.mask.sum()) == expected


def test_chat_errors_are_one_line_and_leave_nothing(tmp_path, home, tiny_tokenizer, chat_tok):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(0)}])
    with pytest.raises(LmdistillError, match="no chat template"):
        open_store(str(chat), cfg_for(chat, home), tiny_tokenizer)
    lonely = write_jsonl(tmp_path / "lonely.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    with pytest.raises(LmdistillError, match="none of its 3 conversation"):
        open_store(str(lonely), cfg_for(lonely, home), chat_tok)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"messages": conversation(0)}, {"text": "plain words"}])
    with pytest.raises(LmdistillError, match=r"record 1: mixed formats"):
        open_store(str(mixed), cfg_for(mixed, home), chat_tok)
    assert [p for p in home.iterdir() if p.suffix != ".lock"] == []


def test_loss_on_assistant_for_plain_text_is_refused(tmp_path, home, docs, tiny_tokenizer):
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    with pytest.raises(LmdistillError, match="loss_on is 'assistant' but data.path"):
        build_block_data(cfg_for(source, home, loss_on="assistant", block_size=16), tiny_tokenizer)


# ---- mixtures ------------------------------------------------------------------------------


def test_quotas_follow_the_weights_and_sum_to_the_period():
    assert quotas([1, 1], 1000) == [500, 500]
    assert quotas([1, 2], 1000) == [333, 667]
    assert quotas([1e-9, 1], 1000) == [1, 999]  # every source is seen
    assert sum(quotas([0.3, 0.3, 0.4], 7)) == 7


def test_mixture_shares_are_exact_per_period_and_each_source_walks_its_epochs():
    s = MixtureSampler([30, 50], [1, 3], batch_size=4, seed=2)
    slots = 2 * MixtureSampler.PERIOD
    rows = [r for m in range(slots // 4) for r in s.indices(m).tolist()]
    per_source = Counter(0 if r < 30 else 1 for r in rows)
    assert per_source == {0: 500, 1: 1500}
    assert s.seen(slots).tolist() == [500, 1500]
    first = [r for r in rows if r < 30][:30]
    assert sorted(first) == list(range(30))  # a whole epoch of source 0 before any repeat


def test_mixture_is_a_pure_function_of_the_micro_batch_and_ranks_split_it():
    a = MixtureSampler([30, 50], [2, 1], batch_size=3, seed=5)
    fresh = MixtureSampler([30, 50], [2, 1], batch_size=3, seed=5)
    seq = [a.indices(m).tolist() for m in range(400)]
    assert fresh.indices(399).tolist() == seq[399]  # random access equals sequential (resume)
    r0 = MixtureSampler([30, 50], [2, 1], batch_size=3, seed=5, rank=0, world_size=2)
    r1 = MixtureSampler([30, 50], [2, 1], batch_size=3, seed=5, rank=1, world_size=2)
    single = MixtureSampler([30, 50], [2, 1], batch_size=6, seed=5)
    for m in range(50):
        assert r0.indices(m).tolist() + r1.indices(m).tolist() == single.indices(m).tolist()
    assert (
        MixtureSampler([30, 50], [2, 1], batch_size=3, seed=6).indices(0).tolist() != seq[0]
        or MixtureSampler([30, 50], [2, 1], batch_size=3, seed=6).indices(1).tolist() != seq[1]
    )


def test_a_mixture_of_two_sources_draws_their_blocks(tmp_path, home, docs, tiny_tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(docs[:5]))
    b.write_text("\n".join(docs[5:]))
    cfg = DataConfig(
        sources=[{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1, "name": "bee"}],
        store_dir=str(home),
        block_size=16,
    )
    data = build_block_data(cfg, tiny_tokenizer)
    assert [s.name for s in data.sources] == [str(a), "bee"] and data.weights == [3.0, 1.0]
    assert len(data.train) == len(data.sources[0].train) + len(data.sources[1].train)
    sampler = make_sampler(data, 4, seed=0)
    rows = torch.cat([sampler.indices(m) for m in range(250)])
    batch = data.train.batch(rows[:8])
    assert torch.equal(batch.input_ids, torch.stack([data.train.ids([r])[0] for r in rows[:8].tolist()]))
    from_a = int((rows < len(data.sources[0].train)).sum())
    assert from_a == 750  # 3:1 over one period of 1000 slots


# ---- streaming -----------------------------------------------------------------------------


def test_a_streamed_jsonl_gives_the_same_store_as_a_loaded_one(tmp_path, docs, tiny_tokenizer, monkeypatch):
    from lmdistill.data.sources import StreamSource

    monkeypatch.setattr(StreamSource, "STREAM_RECORDS", 3)  # several shards from 10 records
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    loaded, _ = open_store(str(source), cfg_for(source, tmp_path / "a"), tiny_tokenizer)
    streamed, _ = open_store(str(source), cfg_for(source, tmp_path / "b", streaming=True, num_proc=2), tiny_tokenizer)
    assert streamed.fingerprint == loaded.fingerprint and streamed.manifest["documents"] == len(docs)


def test_streaming_stops_reading_once_max_tokens_are_stored(tmp_path, docs, tiny_tokenizer, monkeypatch):
    from lmdistill.data.sources import StreamSource

    monkeypatch.setattr(StreamSource, "STREAM_RECORDS", 2)
    records = [{"text": d} for d in docs] * 20  # 200 records, about 100 shards
    source = write_jsonl(tmp_path / "d.jsonl", records)
    first_two = sum(len(ids_of(tiny_tokenizer, d)) + 1 for d in docs[:2])
    store, _ = open_store(
        str(source),
        cfg_for(source, tmp_path / "s", streaming=True, num_proc=1, max_tokens=first_two - 5),
        tiny_tokenizer,
    )
    assert store.num_tokens == first_two - 5
    assert store.manifest["records"] == 2  # one shard of two records was read, nothing more


def test_an_open_ended_progress_line_says_how_far_without_an_eta():
    import io

    from lmdistill.core.progress import LineProgress

    out = io.StringIO()
    bar = LineProgress(None, 0, "tokenizing", unit="records", every_s=0.0, stream=out)
    bar.set_postfix({"tokens/s": "1,000"})
    bar.update(2048)
    assert out.getvalue().startswith("tokenizing: records 2048, elapsed 0:00, tokens/s 1,000")
    assert "ETA" not in out.getvalue() and "%" not in out.getvalue()


def test_batches_report_their_rows_in_the_set_they_came_from(tmp_path, home, docs, tiny_tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(docs[:5]))
    b.write_text("\n".join(docs[5:]))
    cfg = DataConfig(
        sources=[{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}],
        store_dir=str(home),
        block_size=16,
        max_eval_blocks=None,
    )
    data = build_block_data(cfg, tiny_tokenizer)
    rows = torch.tensor([len(data.train) - 1, 0, 3])
    assert data.train.batch(rows).rows.tolist() == rows.tolist()
    shard = data.eval.subset(slice(1, None, 2))  # what rank 1 of 2 evaluates
    assert shard.batch(range(len(shard))).rows.tolist() == list(range(1, len(data.eval), 2))
    assert torch.equal(shard.ids(range(len(shard))), data.eval.ids(range(1, len(data.eval), 2)))


# ---- hostile input: damaged stores, unwritable places, broken streams ----------------------------------------------


def test_a_store_directory_without_its_manifest_is_refused_not_built_over(tmp_path, home, docs, tiny_tokenizer):
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    store, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    (store.path / "manifest.json").unlink()
    with pytest.raises(LmdistillError, match=r"has no readable manifest.json.*delete the directory"):
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)


def test_a_missing_store_file_is_named_missing(tmp_path, home, docs, tiny_tokenizer):
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    store, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    (store.path / "tokens.bin").unlink()
    with pytest.raises(LmdistillError, match=r"damaged: tokens.bin is missing, its manifest says \d+ bytes"):
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)


def test_a_read_only_store_dir_is_named_with_the_setting_that_moves_it(
    tmp_path, home, docs, tiny_tokenizer, monkeypatch
):
    import errno

    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    home.mkdir()
    from lmdistill.core import paths

    real = paths.open_no_link

    def read_only(path, *args, **kw):  # the lock file is the first write there (root ignores chmod)
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(paths, "open_no_link", read_only)
    with pytest.raises(LmdistillError, match=r"cannot write in the data store directory .*set data.store_dir"):
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)


def test_the_build_lock_is_never_opened_through_a_link(tmp_path, home, docs, tiny_tokenizer):
    """A link planted where the build lock goes: one line naming it, and its target is neither
    created nor touched (opened through the link, the lock would create or lock that file)."""
    import shutil

    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    store, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    shutil.rmtree(store.path)  # to be built again, under the lock beside it
    lock = store.path.with_name(f"{store.path.name}.lock")
    lock.unlink()
    target = tmp_path / "not-a-lock"
    lock.symlink_to(target)
    with pytest.raises(LmdistillError, match=r"is a symbolic link.*remove the link") as info:
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    assert str(lock) in str(info.value) and not target.exists() and lock.is_symlink()
    assert not store.path.exists()


def test_a_killed_join_leaves_no_temporary_copy_behind(tmp_path, home, docs, tiny_tokenizer):
    import shutil

    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    store, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    shutil.rmtree(store.path)
    stale = home / f"{store.path.name}.tmp-999999"  # what a process killed while joining its shards leaves
    stale.mkdir()
    (stale / "tokens.bin").write_bytes(b"\0" * 64)
    open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    assert not stale.exists()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to name descriptors")
def test_a_full_disk_at_the_manifest_publishes_no_store_and_keeps_the_shards(
    tmp_path, home, docs, tiny_tokenizer, monkeypatch
):
    """The manifest is written last: a failure there leaves no store (nor its staging directory),
    only the build's finished shards, from which the rerun makes the store without tokenizing."""
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    clean, _ = open_store(str(source), cfg_for(source, tmp_path / "clean"), tiny_tokenizer)
    real_fsync = os.fsync

    def full_disk_at_the_manifest(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_at_the_manifest)
    with pytest.raises(
        LmdistillError, match="could not write the data store .*No space left.*finished shards are kept"
    ):
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    left = sorted(p.name for p in home.iterdir())
    assert [n for n in left if not n.endswith((".build", ".lock"))] == [] and any(n.endswith(".build") for n in left)

    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(store_module, "_tokenize_shard", lambda *a: pytest.fail("tokenized again"))
    store, built = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    assert built and store.fingerprint == clean.fingerprint
    assert sorted(p.name for p in home.iterdir()) == sorted([store.path.name, f"{store.path.name}.lock"])


def test_a_truncated_finished_shard_is_redone_not_joined(tmp_path, docs, tiny_tokenizer, monkeypatch):
    source = tmp_path / "big.txt"
    source.write_text("\n".join(docs))
    child = multiprocessing.get_context("fork").Process(
        target=_killed_build, args=(str(source), str(tmp_path / "k"), tiny_tokenizer, 2)
    )
    child.start()
    child.join()
    build = next(tmp_path.glob("k/*.build"))
    with open(build / "shard-00000.tokens", "r+b") as f:  # a power loss after the marker reached the disk
        f.truncate(6)
    small_shards(monkeypatch)
    resumed, _ = open_store(str(source), cfg_for(source, tmp_path / "k", num_proc=1), tiny_tokenizer)
    clean, _ = open_store(str(source), cfg_for(source, tmp_path / "clean", num_proc=1), tiny_tokenizer)
    assert resumed.fingerprint == clean.fingerprint


def test_a_source_file_that_cannot_be_read_is_not_blamed_on_the_store_dir(tmp_path, home, docs, tiny_tokenizer):
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    plan = store_module.plan_files([str(source)], "a.txt (1 file)")
    source.unlink()  # gone between the listing and the build
    with pytest.raises(LmdistillError, match=r"a.txt \(1 file\): cannot read .*a.txt \(No such file") as info:
        store_module.open_or_build(plan, tiny_tokenizer, home=home, num_proc=1, max_tokens=None, progress=False)
    assert "free space" not in str(info.value)


class _BreaksAfter:
    """A stream that yields ``records`` and then fails, as datasets does on a broken line deep in a file."""

    def __init__(self, records: list[dict], after: int):
        self.records, self.after = records, after

    def __iter__(self):
        for i, record in enumerate(self.records):
            if i == self.after:
                raise ValueError("JSON parse error: Invalid encoding in string.")
            yield record


@pytest.mark.parametrize("local", [True, False])
def test_a_stream_that_breaks_part_way_is_one_line_not_a_traceback(
    tmp_path, home, docs, tiny_tokenizer, monkeypatch, local
):
    from lmdistill.data.sources import StreamSource

    monkeypatch.setattr(StreamSource, "STREAM_RECORDS", 2)
    (tmp_path / "d.jsonl").write_text("{}\n")  # a local source's files are hashed before the build reads them
    identity = {"files": [[str(tmp_path / "d.jsonl"), 1, 1]], "builder": "json"} if local else {"datasets_stream": "x"}
    plan = StreamSource(
        "d.jsonl (1 file)",
        identity,
        "text",
        "data.path",
        "d.jsonl",
        lambda: _BreaksAfter([{"text": d} for d in docs] * 10, after=70),
    )
    with pytest.raises(LmdistillError, match=r"reading the stream stopped after 70 record\(s\): ValueError: JSON"):
        store_module.open_or_build(plan, tiny_tokenizer, home=home, num_proc=1, max_tokens=None, progress=False)
    builds = list(home.glob("*.build"))
    assert (builds == []) if local else (len(list(builds[0].glob("shard-*.json"))) == 35)  # a network drop keeps them


def test_a_stream_whose_first_record_has_no_text_is_read_like_a_loaded_one(tmp_path, docs, tiny_tokenizer):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": None}] + [{"text": d} for d in docs])
    loaded, _ = open_store(str(source), cfg_for(source, tmp_path / "a"), tiny_tokenizer)
    streamed, _ = open_store(str(source), cfg_for(source, tmp_path / "b", streaming=True), tiny_tokenizer)
    assert streamed.fingerprint == loaded.fingerprint and streamed.manifest["empty_records"] == 1


# ---- stale sources and damaged stores that keep their sizes -----------------------------------------------------


def _rewrite_keeping_size_and_time(path: Path, data: bytes) -> None:
    """What ``cp -p``, ``rsync -a`` or ``tar`` do: other content, the same size and modification time."""
    before = path.stat()
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl"])
def test_a_source_changed_with_the_same_size_and_time_is_built_again(tmp_path, home, tiny_tokenizer, name, capsys):
    source = tmp_path / name
    old, new = "alpha beta gamma delta " * 30, "delta gamma beta alpha " * 30
    encode = (lambda t: t.encode()) if name.endswith(".txt") else (lambda t: (json.dumps({"text": t}) + "\n").encode())
    source.write_bytes(encode(old))
    first, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    _rewrite_keeping_size_and_time(source, encode(new))
    second, built = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    assert built and second.path == first.path  # the same key: the stale store was replaced
    assert second.tokens.tolist() == ids_of(tiny_tokenizer, new) + [tiny_tokenizer.eos_token_id]
    assert "is not the file the data store" in capsys.readouterr().out
    assert not open_store(str(source), cfg_for(source, home), tiny_tokenizer)[1]  # and now it is current
    assert sorted(p.name for p in home.iterdir()) == sorted([first.path.name, f"{first.path.name}.lock"])


def test_a_killed_build_whose_source_changed_redoes_its_shards(tmp_path, docs, tiny_tokenizer, monkeypatch):
    source = tmp_path / "big.txt"
    text = "\n".join(docs)
    source.write_text(text)
    child = multiprocessing.get_context("fork").Process(
        target=_killed_build, args=(str(source), str(tmp_path / "k"), tiny_tokenizer, 2)
    )
    child.start()
    child.join()
    assert list(tmp_path.glob("k/*.build/shard-00001.json"))
    _rewrite_keeping_size_and_time(source, text.translate(str.maketrans("ae", "ea")).encode())  # the same cuts
    small_shards(monkeypatch)
    resumed, _ = open_store(str(source), cfg_for(source, tmp_path / "k", num_proc=1), tiny_tokenizer)
    clean, _ = open_store(str(source), cfg_for(source, tmp_path / "clean", num_proc=1), tiny_tokenizer)
    assert resumed.fingerprint == clean.fingerprint


def test_ids_past_the_vocabulary_are_refused_naming_the_store(tmp_path, home, docs, tiny_tokenizer):
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    store, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    tokens = np.memmap(store.path / "tokens.bin", dtype=np.uint16, mode="r+")
    tokens[7] = 60000  # overwritten in place: the file keeps its size
    tokens.flush()
    del tokens
    with pytest.raises(
        LmdistillError,
        match=r"damaged: tokens.bin holds token id 60,000, past the tokenizer's 384 "
        r"ids; delete the directory and run again to rebuild it",
    ) as info:
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    assert str(store.path) in str(info.value)


def _set(manifest: dict, keys: tuple, value) -> dict:
    """``manifest`` with the value at ``keys`` replaced (deleted if ``value`` is ``_set``)."""
    *parents, last = keys
    holder = manifest
    for key in parents:
        holder = holder[key]
    if value is _set:
        del holder[last]
    else:
        holder[last] = value
    return manifest


@pytest.mark.parametrize(
    "craft, says",
    [
        (lambda m: [m], "manifest.json holds a JSON list, not an object"),
        (lambda m: _set(m, ("files",), _set), "does not list docs.bin, tokens.bin under 'files'"),
        (
            lambda m: _set(m, ("files", "tokens.bin", "bytes"), _set),
            "lacks the dtype (uint16 or uint32), bytes or sha256",
        ),
        (lambda m: _set(m, ("files", "tokens.bin", "dtype"), "object"), "lacks the dtype (uint16 or uint32)"),
        (
            lambda m: _set(m, ("files", "../../etc/passwd"), {"dtype": "uint8", "bytes": 1, "sha256": ""}),
            "does not list",
        ),
        (lambda m: _set(m, ("tokens",), m["tokens"] * 10), "which tokens.bin would hold in"),
        (lambda m: _set(m, ("tokens",), "many"), "has no whole number 'tokens'"),
        (lambda m: _set(m, ("pad_id",), 1000), "pad id 1,000, past the tokenizer's 384 ids"),
        (lambda m: _set(m, ("source_files",), {}), "lacks the paths and SHA-256 of its source files"),
    ],
    ids=[
        "list",
        "no-files",
        "no-bytes",
        "object-dtype",
        "foreign-file",
        "inflated-tokens",
        "tokens-text",
        "pad-id",
        "source-files",
    ],
)
def test_a_crafted_manifest_is_one_line_saying_the_store_is_damaged(tmp_path, home, docs, tiny_tokenizer, craft, says):
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    store, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    manifest = store.path / "manifest.json"
    manifest.write_text(json.dumps(craft(json.loads(manifest.read_text()))))
    with pytest.raises(LmdistillError) as info:
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    message = str(info.value)
    assert f"data store '{store.path}' is damaged: " in message and says in message, message
    assert message.endswith("delete the directory and run again to rebuild it") and "\n" not in message


def test_store_files_that_link_elsewhere_or_end_documents_past_the_tokens_are_refused(
    tmp_path, home, docs, tiny_tokenizer
):
    source = tmp_path / "a.txt"
    source.write_text(docs[0])
    store, _ = open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    tokens = store.path / "tokens.bin"
    elsewhere = tmp_path / "elsewhere.bin"
    tokens.rename(elsewhere)
    tokens.symlink_to(elsewhere)
    with pytest.raises(
        LmdistillError,
        match=r"damaged: tokens.bin is a symbolic link \(to .*elsewhere.bin\), not a "
        r"file of the store; delete the directory",
    ):
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)
    tokens.unlink()
    elsewhere.rename(tokens)
    ends = np.memmap(store.path / "docs.bin", dtype=np.int64, mode="r+")
    ends[-1] += 5
    ends.flush()
    del ends
    with pytest.raises(
        LmdistillError,
        match=r"damaged: docs.bin does not hold document ends in order up to the "
        r"last token",
    ):
        open_store(str(source), cfg_for(source, home), tiny_tokenizer)


# ---- a killed build --------------------------------------------------------------------------


def test_a_waiter_for_the_store_lock_is_told_which_process_holds_it(tmp_path):
    import threading

    from lmdistill.core.paths import claim_lock

    lock = tmp_path / "store.lock"
    held = claim_lock(lock, "data store build lock")  # as a build in another process would hold it
    threading.Timer(0.3, os.close, args=(held,)).start()
    said: list[str] = []
    with store_module._locked(lock, said.append):
        pass
    assert len(said) == 1 and f"another process (pid {os.getpid()} on " in said[0] and "stuck, end it" in said[0]


_BUILD_SCRIPT = """
import os, sys, time
from pathlib import Path
from transformers import PreTrainedTokenizerFast
from lmdistill.data import store
tokenizer_dir, source, pids, mode, home = sys.argv[1:]
real_init = store._init_worker

def init(*args):
    real_init(*args)
    (Path(pids) / str(os.getpid())).touch()

def stuck(*args):
    time.sleep(600)

store._init_worker = init
if mode == "stuck":
    store._tokenize_shard = stuck
store.SHARD_BYTES, store.PIECE_BYTES = 3000, 700
plan = store.plan_files([source], "big.txt (1 file)")
store.open_or_build(plan, PreTrainedTokenizerFast.from_pretrained(tokenizer_dir), home=Path(home), num_proc=2,
                    max_tokens=None, progress=False)
print("built")
"""


def _running(pid: int) -> bool:
    """The process is there and not a zombie (nobody may reap an orphan in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_the_workers_of_a_killed_parallel_build_end_with_it(tmp_path, docs, tiny_tokenizer):
    import signal
    import subprocess
    import sys
    import time

    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    source = tmp_path / "big.txt"
    source.write_text("\n".join(docs))
    pids = tmp_path / "pids"
    pids.mkdir()

    def build(mode: str, **kwargs):
        args = [
            sys.executable,
            "-c",
            _BUILD_SCRIPT,
            str(tmp_path / "tokenizer"),
            str(source),
            str(pids),
            mode,
            str(tmp_path / "stores"),
        ]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)

    parent, workers = build("stuck"), []
    try:
        deadline = time.monotonic() + 120
        while len(workers := [int(p.name) for p in pids.iterdir()]) < 2:
            assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()
            time.sleep(0.1)
        parent.send_signal(signal.SIGKILL)  # the parent only, as the OOM killer does
        parent.wait()
        deadline = time.monotonic() + 5
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_running, workers)), "the build's workers outlived it"
        again = build("build")
        out, err = again.communicate(timeout=120)  # a worker left holding the store lock: it would wait forever
        assert again.returncode == 0 and "built" in out and "waiting" not in out, out + err
    finally:
        for pid in workers:  # (only if they outlived the build: the processes this test started)
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_tokenizer_without_eos_is_refused_by_its_path(tmp_path, tiny_tokenizer):
    """Documents are ended with EOS; a tokenizer without one is refused naming where it came from
    (across tokenizers there are two: the message must say which)."""
    from transformers import AutoTokenizer

    saved = tmp_path / "no-eos-student"
    tiny_tokenizer.save_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(saved, eos_token=None)
    assert tokenizer.eos_token_id is None
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one document"}, {"text": "another"}])
    with pytest.raises(LmdistillError) as info:
        build_block_data(cfg_for(source, tmp_path / "home", block_size=4), tokenizer)
    message = str(info.value)
    assert message.startswith(f"the tokenizer {str(saved)!r} has no EOS token") and "eos_token" in message
    assert "\n" not in message
