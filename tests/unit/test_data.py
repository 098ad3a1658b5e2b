"""Text sources through the block store: packing, the train/eval split and the block sampler.

Expected blocks are built here independently: tokenize each document with the tokenizer,
append EOS, concatenate, drop the tail and cut into rows of ``block_size``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from lmdistill.config import DataConfig
from lmdistill.core.errors import LmdistillError
from lmdistill.data.sources import BlockSampler, block_data_of, build_block_data, plan_source


def expected_blocks(docs: list[str], tokenizer, block_size: int) -> torch.Tensor:
    flat: list[int] = []
    for doc in docs:
        flat += tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.int64).view(n, block_size)


def all_ids(blocks) -> torch.Tensor:
    return blocks.ids(slice(None))


def pack(source, tokenizer, block_size: int, **kw) -> torch.Tensor:
    """Every block of one source, through its store."""
    blocks, _ = block_data_of(str(source), DataConfig(path=str(source), block_size=block_size, **kw), tokenizer)
    return all_ids(blocks)


@pytest.fixture(scope="module")
def docs(corpus_texts) -> list[str]:
    # eight real documents, trimmed so the file stays small and each has a distinct start
    return [text[:1500] for text in corpus_texts[:8]]


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory, docs) -> Path:
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def eval_docs(corpus_texts) -> list[str]:
    return [text[:1200] for text in corpus_texts[10:13]]


# ---- loading -------------------------------------------------------------------------------


def test_jsonl_with_non_default_text_field(jsonl_file, docs, tiny_tokenizer):
    cfg = DataConfig(path=str(jsonl_file), text_field="body", block_size=7)
    blocks, description = block_data_of(cfg.path, cfg, tiny_tokenizer)
    assert torch.equal(all_ids(blocks), expected_blocks(docs, tiny_tokenizer, 7))
    assert str(jsonl_file) in description


def test_parquet(tmp_path, docs, tiny_tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": docs, "n": list(range(len(docs)))}), path)
    cfg = DataConfig(path=str(path), text_field="content", block_size=32, max_eval_blocks=None)
    data = build_block_data(cfg, tiny_tokenizer)
    everything = expected_blocks(docs, tiny_tokenizer, 32)
    assert len(data.train) + len(data.eval) == len(everything)


def test_txt_files_in_a_directory_are_one_document_each(tmp_path, docs, tiny_tokenizer):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in enumerate(docs[:3]):
        (folder / f"{i:02d}.txt").write_text(doc)
    blocks, description = block_data_of(str(folder), DataConfig(path=str(folder), block_size=24), tiny_tokenizer)
    assert "3 files" in description
    assert torch.equal(all_ids(blocks), expected_blocks(docs[:3], tiny_tokenizer, 24))


def test_hidden_files_and_directories_of_a_data_directory_are_not_read(tmp_path, docs, tiny_tokenizer, capsys):
    folder = tmp_path / "texts"
    for name, doc in [
        ("00.txt", docs[0]),
        ("sub/01.txt", docs[1]),
        (".notes.txt", docs[2]),
        (".ipynb_checkpoints/00-checkpoint.txt", docs[3]),
        (".git/HEAD", "ref: main"),
        (".git/objects/ab/cdef", "blob"),
        ("sub/.cache/02.txt", docs[4]),
    ]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(doc)
    blocks, description = block_data_of(str(folder), DataConfig(path=str(folder), block_size=24), tiny_tokenizer)
    assert "2 files" in description
    assert torch.equal(all_ids(blocks), expected_blocks(docs[:2], tiny_tokenizer, 24))
    assert "left out" not in capsys.readouterr().out  # not even counted as files of another type


def test_a_store_dir_inside_the_data_directory_is_not_read_as_data(tmp_path, docs, tiny_tokenizer):
    """The second run used to read the first run's store files as data (#8)."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in enumerate(docs[:2]):
        (folder / f"{i:02d}.txt").write_text(doc)
    cfg = DataConfig(path=str(folder), block_size=24, store_dir=str(folder / "stores"))
    for _ in range(2):
        blocks, description = block_data_of(str(folder), cfg, tiny_tokenizer)
        assert "2 files" in description and (folder / "stores").is_dir()
        assert torch.equal(all_ids(blocks), expected_blocks(docs[:2], tiny_tokenizer, 24))


def test_a_jsonl_file_that_is_not_utf8_names_the_file_line_and_byte_offset(tmp_path, docs, tiny_tokenizer):
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[:3]).encode()
    path = tmp_path / "latin.jsonl"
    path.write_bytes(lines + '{"text": "caf\xe9"}\n'.encode("latin-1") + lines)
    with pytest.raises(LmdistillError) as info:
        block_data_of(str(path), DataConfig(path=str(path), block_size=16), tiny_tokenizer)
    assert str(info.value) == (
        f"--data: '{path}' is not UTF-8 text (a byte 0xe9 on line 4, at byte offset "
        f"{len(lines) + 13}); convert it to UTF-8, e.g. with iconv"
    )


def test_a_streamed_jsonl_file_that_is_not_utf8_is_named_not_the_network(tmp_path, docs, tiny_tokenizer):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps({"text": docs[0]}).encode() + b"\n" + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(LmdistillError) as info:
        block_data_of(str(path), DataConfig(path=str(path), block_size=16, streaming=True), tiny_tokenizer)
    assert f"'{path}' is not UTF-8 text" in str(info.value) and "network" not in str(info.value)


def test_single_txt_file(tmp_path, docs, tiny_tokenizer):
    path = tmp_path / "one.txt"
    path.write_text(docs[0])
    assert torch.equal(pack(path, tiny_tokenizer, 16), expected_blocks([docs[0]], tiny_tokenizer, 16))


@pytest.mark.parametrize("block_size", [7, 32, 128])
def test_packed_blocks_equal_documents_plus_eos_cut_into_blocks(jsonl_file, docs, tiny_tokenizer, block_size):
    blocks = pack(jsonl_file, tiny_tokenizer, block_size, text_field="body")
    expected = expected_blocks(docs, tiny_tokenizer, block_size)
    assert blocks.dtype == torch.int64
    assert blocks.shape == expected.shape
    assert torch.equal(blocks, expected)
    # EOS sits exactly at the end of each document in the stream, and nowhere else
    lengths = [len(tiny_tokenizer.encode(d, add_special_tokens=False)) + 1 for d in docs]
    ends, pos = [], -1
    for n in lengths:
        pos += n
        ends.append(pos)
    eos_positions = (blocks.reshape(-1) == tiny_tokenizer.eos_token_id).nonzero().flatten().tolist()
    assert eos_positions == [e for e in ends if e < blocks.numel()]
    assert sum(lengths) - blocks.numel() < block_size  # only the tail is dropped


# ---- train / eval split --------------------------------------------------------------------


def split(jsonl_file, tokenizer, **kw):
    cfg = DataConfig(path=str(jsonl_file), text_field="body", block_size=32, max_eval_blocks=None, **kw)
    return build_block_data(cfg, tokenizer)


def rows(blocks) -> list[tuple]:
    return [tuple(r.tolist()) for r in all_ids(blocks)]


def test_eval_split_is_disjoint_and_covers_all_blocks(jsonl_file, docs, tiny_tokenizer):
    everything = expected_blocks(docs, tiny_tokenizer, 32)
    assert len(set(map(tuple, everything.tolist()))) == len(everything)  # precondition: rows are distinct
    data = split(jsonl_file, tiny_tokenizer, eval_fraction=0.2)
    assert set(rows(data.train)).isdisjoint(rows(data.eval))
    assert Counter(rows(data.train)) + Counter(rows(data.eval)) == Counter(map(tuple, everything.tolist()))
    assert len(data.eval) == round(0.2 * len(everything))
    # train keeps the original order of its blocks
    index = {r: i for i, r in enumerate(map(tuple, everything.tolist()))}
    train_idx = [index[r] for r in rows(data.train)]
    assert train_idx == sorted(train_idx)
    assert data.describe()["train_blocks"] == len(data.train)


def test_eval_split_is_deterministic_given_split_seed(jsonl_file, tiny_tokenizer):
    a = split(jsonl_file, tiny_tokenizer, split_seed=3)
    b = split(jsonl_file, tiny_tokenizer, split_seed=3)
    c = split(jsonl_file, tiny_tokenizer, split_seed=4)
    assert rows(a.eval) == rows(b.eval) and rows(a.train) == rows(b.train)
    assert set(rows(a.eval)) != set(rows(c.eval))


def test_max_eval_blocks_caps_the_eval_set(jsonl_file, tiny_tokenizer):
    cfg = DataConfig(path=str(jsonl_file), text_field="body", block_size=32, eval_fraction=0.3, max_eval_blocks=2)
    data = build_block_data(cfg, tiny_tokenizer)
    assert len(data.eval) == 2


def test_eval_path_is_used_when_given(tmp_path, jsonl_file, docs, eval_docs, tiny_tokenizer):
    eval_file = tmp_path / "held_out.jsonl"
    eval_file.write_text("".join(json.dumps({"body": d}) + "\n" for d in eval_docs))
    cfg = DataConfig(
        path=str(jsonl_file), text_field="body", block_size=32, eval_path=str(eval_file), max_eval_blocks=None
    )
    data = build_block_data(cfg, tiny_tokenizer)
    assert torch.equal(all_ids(data.train), expected_blocks(docs, tiny_tokenizer, 32))  # nothing held out of train
    assert torch.equal(all_ids(data.eval), expected_blocks(eval_docs, tiny_tokenizer, 32))
    assert str(eval_file) in data.eval_source


# ---- errors --------------------------------------------------------------------------------


def test_too_short_data_names_the_path_and_the_fix(tmp_path, tiny_tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("hello world")
    with pytest.raises(LmdistillError) as info:
        build_block_data(DataConfig(path=str(path), block_size=64), tiny_tokenizer)
    message = str(info.value)
    assert str(path) in message and "block_size" in message and "add text" in message


def test_too_short_eval_path_names_it(tmp_path, jsonl_file, tiny_tokenizer):
    eval_file = tmp_path / "tiny_eval.txt"
    eval_file.write_text("hi")
    cfg = DataConfig(path=str(jsonl_file), text_field="body", block_size=32, eval_path=str(eval_file))
    with pytest.raises(LmdistillError, match="data.eval_path") as info:
        build_block_data(cfg, tiny_tokenizer)
    assert str(eval_file) in str(info.value)


def test_empty_txt_file_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(LmdistillError) as info:
        build_block_data(DataConfig(path=str(path), block_size=16), tiny_tokenizer)
    assert str(path) in str(info.value)


def test_empty_jsonl_file_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(LmdistillError) as info:
        build_block_data(DataConfig(path=str(path), block_size=16), tiny_tokenizer)
    assert str(path) in str(info.value)


def test_missing_path(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(LmdistillError, match="does not exist") as info:
        plan_source(str(missing), DataConfig())
    assert str(missing) in str(info.value)


def test_missing_relative_path_is_not_a_traceback():
    # 'nope.txt' could be a datasets name; offline it must still end in a clear user error.
    with pytest.raises(LmdistillError, match="nope.txt"):
        plan_source("nope.txt", DataConfig())
    with pytest.raises(LmdistillError, match="does not exist"):
        plan_source("./nope.txt", DataConfig())


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(LmdistillError, match=r"unsupported extension '\.csv'.*\.txt, \.jsonl or \.parquet"):
        plan_source(str(path), DataConfig())


def test_directory_without_data_files(tmp_path):
    (tmp_path / "notes.csv").write_text("x")
    with pytest.raises(LmdistillError, match="holds no .txt, .jsonl or .parquet files"):
        plan_source(str(tmp_path), DataConfig())


def test_missing_text_field_lists_the_fields(jsonl_file, tiny_tokenizer):
    with pytest.raises(LmdistillError) as info:
        build_block_data(DataConfig(path=str(jsonl_file)), tiny_tokenizer)  # default text_field 'text'
    message = str(info.value)
    assert "no field 'text'" in message and "body" in message and "id" in message
    assert "data.text_field" in message


# ---- BlockSampler --------------------------------------------------------------------------


def epoch_indices(sampler: BlockSampler, epoch: int) -> list[int]:
    per = sampler.micro_batches_per_epoch
    return [i for m in range(epoch * per, (epoch + 1) * per) for i in sampler.indices(m).tolist()]


def test_sampler_is_deterministic_for_the_same_seed():
    a = BlockSampler(24, 3, seed=7)
    b = BlockSampler(24, 3, seed=7)
    assert [a.indices(m).tolist() for m in range(20)] == [b.indices(m).tolist() for m in range(20)]
    # random access equals sequential access (the data position is one integer)
    c = BlockSampler(24, 3, seed=7)
    assert c.indices(13).tolist() == a.indices(13).tolist()
    assert epoch_indices(a, 0) != epoch_indices(BlockSampler(24, 3, seed=8), 0)


def test_sampler_reshuffles_every_epoch_and_uses_each_block_once():
    s = BlockSampler(24, 3, seed=1)
    assert s.micro_batches_per_epoch == 8
    epochs = [epoch_indices(s, e) for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(24))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert s.epoch_of(7) == 0 and s.epoch_of(8) == 1
    assert all(len(s.indices(m)) == 3 for m in range(24))


def test_sampler_drops_the_ragged_tail_without_repeats():
    s = BlockSampler(20, 3, seed=0)
    assert s.micro_batches_per_epoch == 6
    e = epoch_indices(s, 0)
    assert len(e) == len(set(e)) == 18


def test_two_ranks_take_disjoint_halves_of_each_global_batch():
    r0 = BlockSampler(24, 3, seed=5, rank=0, world_size=2)
    r1 = BlockSampler(24, 3, seed=5, rank=1, world_size=2)
    single = BlockSampler(24, 6, seed=5)  # one process with the global batch size
    assert r0.micro_batches_per_epoch == r1.micro_batches_per_epoch == 4
    seen = []
    for m in range(4):
        a, b = r0.indices(m).tolist(), r1.indices(m).tolist()
        assert len(a) == len(b) == 3
        assert not set(a) & set(b)
        assert a + b == single.indices(m).tolist()
        seen += a + b
    assert sorted(seen) == list(range(24))


def test_sampler_without_shuffle_is_in_order():
    s = BlockSampler(10, 2, seed=3, shuffle=False)
    assert epoch_indices(s, 0) == list(range(10))
    assert epoch_indices(s, 1) == list(range(10))


def test_non_text_field_is_a_clear_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "numbers.jsonl"
    path.write_text('{"text": "hello world"}\n{"text": 12345}\n')
    with pytest.raises(LmdistillError, match="text field holds int"):
        build_block_data(DataConfig(path=str(path), block_size=4), tiny_tokenizer)


def test_a_missing_file_with_a_data_extension_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import lmdistill.data.sources as data_module

    monkeypatch.setattr(data_module, "datasets_module", lambda: pytest.fail("no datasets look-up for a file name"))
    for streaming in (False, True):
        with pytest.raises(LmdistillError, match=r"data.path 'nope.jsonl' does not exist; check the path"):
            plan_source("nope.jsonl", DataConfig(streaming=streaming))


def test_too_few_blocks_after_max_tokens_says_to_raise_it(jsonl_file, tiny_tokenizer):
    cfg = DataConfig(path=str(jsonl_file), text_field="body", block_size=32, max_tokens=5)
    with pytest.raises(LmdistillError, match=r"raise data.max_tokens \(now 5\) or lower data.block_size"):
        build_block_data(cfg, tiny_tokenizer)
