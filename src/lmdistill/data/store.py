"""The tokenized block store: a source's token ids on disk, memory-mapped, built once.

A store holds one source (a file, a directory of files, a ``datasets`` name, the embedded
corpus) tokenized with one tokenizer::

    <store>/
      manifest.json   written last: format version, what the store was built from (source
                      files with sizes and hashes, or a datasets fingerprint; the tokenizer's
                      content hash), token and document counts, dtypes, per-file SHA-256
      tokens.bin      every token id, documents back to back, uint16 (vocabularies up to
                      65,536) or uint32
      docs.bin        int64: where each document ends in tokens.bin
      mask.bin        chat and prompt/completion data only: uint8, 1 on the tokens a
                      model should learn to produce (assistant turns, completions)
      bytes.bin       stores built for cross-tokenizer distillation only: int64, where each
                      token ends in the source's text, in UTF-8 bytes counted from the
                      store's first document (a document's EOS counts as one byte)

The byte offsets are what lets two stores of one source, tokenized by two tokenizers, be read
in step: the source's text is cut into the same pieces whatever the tokenizer, so both count
the same bytes, and a block of one store covers a known stretch of text that the other's
tokens can be found for (``data/alignment.py``).

Plain text gets an EOS after every document, as training has always packed it; a chat
conversation ends however its template ends it.

Why token ids and not blocks: tokenizing is the expensive part and depends only on the
source and the tokenizer. Cutting into blocks, packing conversations and the train/eval
split are cheap, depend on the run's settings (``data.block_size``, ``data.loss_on``,
``data.split_seed``), and are computed on each start (``layout_blocks``), so another block
size never tokenizes again.

Building. The source is cut into shards of about ``SHARD_BYTES`` of text; ``data.num_proc``
worker processes tokenize them, one core each, into shard files of a build directory beside
the store. A shard is done when its marker file is; a killed build, run again, keeps the
finished shards and redoes the rest. When all are done their contents are joined into the
store's files in a temporary directory that is renamed into place in one step, so a store
at its final path is always complete. A file lock (``<key>.lock``) makes every other
process (the other ranks of a torchrun job, a second run on the same data) wait for the
build and then map the same files: nothing is tokenized or stored twice.

Where: ``data.store_dir`` or ``$LMDISTILL_HOME/stores``, in a directory named by the
*key*: a hash of the source (file paths, sizes and modification times, or the datasets
fingerprint), the tokenizer's content hash and the options that change the ids. The
manifest's *fingerprint* is the hash of the stored ids themselves: what a teacher cache
and a checkpoint record, so that they match the data, not the path it came from.

Each start hashes the source files against the manifest (a file can change and keep its size
and modification time: ``cp -p``, ``rsync -a``, ``tar``) and builds a stale store again; it
refuses a damaged one (``Store.open``: the manifest's shape, file sizes, document ends, ids
past the vocabulary) with one line saying to delete it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lmdistill.core.errors import LmdistillError
from lmdistill.core.files import ManifestDir, file_record
from lmdistill.core.paths import atomic_write_json, cache_home, exclusive_lock, sha256_file
from lmdistill.core.progress import progress_bar
from lmdistill.data import chat
from lmdistill.data.chat import check_chat_template, record_format

FORMAT_VERSION = 1
SHARD_BYTES = 4 << 20  # a worker's unit of work: about this much text (small enough to balance 2-8 workers)
PIECE_BYTES = 1 << 20  # a plain-text file is tokenized in pieces of about this size, cut after a newline
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------- the source
@dataclass
class SourcePlan:
    """What a build reads, and how it is cut into shards.

    kind "files": plain-text files, one document each; a shard is a byte range of one file.
    kind "records": a ``datasets.Dataset`` (jsonl, parquet, a hub name, the embedded
    corpus); a shard is a range of records. ``fmt`` is the records' format (text,
    messages, prompt_completion; see ``chat.py``).
    """

    kind: str
    fmt: str
    description: str
    identity: dict  # what the key hashes: where the source came from, in a form that changes when it does
    # ("files", [(path, start, end, ends the file), ...]) | ("records", start, end) | ("rows", first, records);
    # None for a stream, whose shards are made while it is read (``iter_shards``)
    shards: list[tuple] | None = field(default_factory=list)
    dataset: object | None = None
    text_field: str = "text"
    work: int = 0  # bytes or records, for the progress bar

    @property
    def chat(self) -> bool:
        return self.fmt != "text"

    def prepare(self) -> None:
        """Load what the build reads (records sources load their dataset here)."""

    def iter_shards(self) -> Iterator[tuple[int, tuple]]:
        """(index, shard) in order; a stream makes them as it is read (``shards`` is None then)."""
        return enumerate(self.shards)


def plan_files(files: list[str], description: str) -> SourcePlan:
    """Plain-text files, each one document. A shard is about SHARD_BYTES: several small files
    whole, or a piece of a large one cut after a newline."""
    ranges, identity = [], []
    for name in files:
        path = Path(name).resolve()
        stat = path.stat()
        identity.append([str(path), stat.st_size, stat.st_mtime_ns])
        start = 0
        while start < stat.st_size:
            end = _cut_after_newline(path, start + SHARD_BYTES, stat.st_size)
            ranges.append((str(path), start, end, end == stat.st_size))
            start = end
    shards, current, size = [], [], 0
    for r in ranges:
        if current and size + (r[2] - r[1]) > SHARD_BYTES:
            shards.append(("files", current))
            current, size = [], 0
        current.append(r)
        size += r[2] - r[1]
    if current:
        shards.append(("files", current))
    return SourcePlan("files", "text", description, {"files": identity}, shards, work=sum(r[2] - r[1] for r in ranges))


def _cut_after_newline(path: Path, at: int, size: int) -> int:
    """The first byte after a newline at or after ``at`` (the file's end if there is none).

    A newline byte never occurs inside a multi-byte UTF-8 character, so a cut there never
    splits one."""
    if at >= size:
        return size
    with open(path, "rb") as f:
        f.seek(at)
        while chunk := f.read(1 << 16):
            hit = chunk.find(b"\n")
            if hit >= 0:
                return at + hit + 1
            at += len(chunk)
    return size


def plan_records(dataset, fmt: str, description: str, identity: dict, text_field: str = "text") -> SourcePlan:
    """A datasets.Dataset, cut into shards of about SHARD_BYTES of records."""
    n = len(dataset)
    size = max(int(getattr(dataset.data, "nbytes", 0) or 0), 1)
    per_shard = max(1, int(n * SHARD_BYTES / size))
    shards = [("records", start, min(start + per_shard, n)) for start in range(0, n, per_shard)]
    return SourcePlan("records", fmt, description, identity, shards, dataset, text_field, work=n)


# ---------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _init_worker(
    tokenizer, dataset, fmt: str, text_field: str, text_bytes: bool = False, parent: int | None = None
) -> None:
    """Per process: the tokenizer and dataset, and one core each (num_proc is the parallelism).
    ``text_bytes``: record where each token ends in the text (``bytes.bin``). A worker of the
    build process ``parent`` ends with it (``_die_with_parent``)."""
    if parent is not None:
        _die_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=tokenizer, dataset=dataset, fmt=fmt, text_field=text_field, text_bytes=text_bytes)


def _die_with_parent(parent: int) -> None:
    """End this worker process when ``parent`` ends, a SIGKILL (the OOM killer) included: a forked
    worker shares the store lock's descriptor, so one left running would hold the lock, and every
    later build would wait for it forever. On Linux the kernel sends the SIGKILL (PR_SET_PDEATHSIG);
    elsewhere a thread watches for the parent to change."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
                if os.getppid() != parent:  # it died before the request took
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


class RecordError(Exception):
    """A record a build cannot take: the message, and which record (for the parent's one line)."""

    def __init__(self, message: str, record: int | None = None):
        super().__init__(message)
        self.record = record


def _tokenize_shard(index: int, shard: tuple, out_dir: str, dtype: str) -> dict:
    """Tokenize one shard into ``shard-NNNNN.*`` files of ``out_dir``; returns its counts.

    The marker (``.json``) is written last, by rename: a shard without one is redone."""
    tokenizer, fmt = _WORKER["tokenizer"], _WORKER["fmt"]
    ids, ends, mask, counts = [], [], [], {"skipped_no_assistant": 0, "empty": 0, "records": 0}
    text = _TextBytes(_WORKER["text_bytes"])
    if shard[0] == "files":
        for path, start, end, last in shard[1]:
            before = len(ids)
            pieces = _text_pieces(path, start, end)
            for piece, encoded in zip(pieces, _encode(tokenizer, pieces, text.on)):
                ids.extend(encoded["input_ids"])
                text.add(piece, encoded)
            if last and (len(ids) > before or start > 0):  # the file's end: its document ends with EOS
                ids.append(tokenizer.eos_token_id)
                ends.append(len(ids))
                text.end_document()
    elif shard[0] == "records":
        _, start, end = shard
        rows = _WORKER["dataset"][start:end]
        records = [dict(zip(rows, values)) for values in zip(*rows.values())]
        _records_to_ids(records, start, fmt, tokenizer, ids, ends, mask, counts, text)
    else:  # ("rows", number of the first record, the records): a piece of a stream
        _records_to_ids(shard[2], shard[1], fmt, tokenizer, ids, ends, mask, counts, text)
    base = Path(out_dir) / f"shard-{index:05d}"
    array = np.asarray(ids, dtype=dtype)
    if len(ids) and int(array.max()) != max(ids):  # a wider id than the dtype holds: the vocabulary grew
        raise RecordError(f"token id {max(ids)} does not fit the store's {dtype}")
    _write_synced(f"{base}.tokens", array)
    _write_synced(f"{base}.ends", np.asarray(ends, dtype=np.int64))
    if fmt != "text":
        _write_synced(f"{base}.mask", np.asarray(mask, dtype=np.uint8))
    if text.on:
        _write_synced(f"{base}.bytes", np.asarray(text.ends, dtype=np.int64))
    result = {"tokens": len(ids), "documents": len(ends), **counts, **({"text_bytes": text.total} if text.on else {})}
    atomic_write_json(Path(f"{base}.json"), result, fsync=True)
    return result


class _TextBytes:
    """Where each token of a shard ends in its text, in UTF-8 bytes from the shard's start
    (``bytes.bin``; off unless the store is built for cross-tokenizer distillation)."""

    def __init__(self, on: bool):
        self.on, self.ends, self.total = on, [], 0

    def add(self, text: str, encoded) -> None:
        """A piece of text and its encoding (with ``offset_mapping``, character offsets)."""
        if not self.on:
            return
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        width = 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)
        at = np.concatenate([[0], np.cumsum(width)])  # character offset -> byte offset
        chars = np.asarray([end for _, end in encoded["offset_mapping"]], dtype=np.int64)
        # Byte-level tokens that split one character share its offsets: the ends never go back.
        ends = np.maximum.accumulate(at[chars]) if len(chars) else chars
        self.ends.extend((self.total + ends).tolist())
        self.total += int(at[-1])

    def end_document(self) -> None:
        """A document's EOS: one byte of its own, so that no token is at the seam of two documents."""
        if self.on:
            self.total += 1
            self.ends.append(self.total)


def _encode(tokenizer, texts: list[str], offsets: bool):
    """Each text's encoding (``input_ids``, and ``offset_mapping`` when ``offsets``)."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False, verbose=False, return_offsets_mapping=offsets)
    return [{key: out[key][i] for key in out} for i in range(len(texts))]


def _write_synced(path: str, array: np.ndarray) -> None:
    """``array`` into ``path``, on the disk before the shard's marker is: after a power loss a
    marker never vouches for a shard file that did not reach the disk."""
    with open(path, "wb") as f:
        array.tofile(f)
        f.flush()
        os.fsync(f.fileno())


def _text_pieces(path: str, start: int, end: int) -> list[str]:
    """The text of bytes [start, end) of ``path`` in pieces of about PIECE_BYTES cut after a newline."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    pieces, at = [], 0
    while at < len(data):
        cut = data.find(b"\n", at + PIECE_BYTES) + 1 if at + PIECE_BYTES < len(data) else len(data)
        cut = cut if cut > 0 else len(data)
        try:
            pieces.append(data[at:cut].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RecordError(
                f"'{path}' is not UTF-8 text (a byte {data[at + exc.start]:#04x} at byte offset "
                f"{start + at + exc.start}); convert it to UTF-8, e.g. with iconv"
            ) from None
        at = cut
    return pieces


def _records_to_ids(records: list[dict], start: int, fmt: str, tokenizer, ids, ends, mask, counts, text_bytes) -> None:
    """Append the ids (and mask, and document ends) of ``records``, numbered from ``start``."""

    counts["records"] += len(records)
    text_field = _WORKER["text_field"]
    if fmt == "text":
        texts = []
        for number, record in enumerate(records, start):
            text = record.get(text_field)
            if text is not None and not isinstance(text, str):
                raise RecordError(
                    f"a record's text field holds {type(text).__name__} ({str(text)[:40]!r}), not "
                    "text; set data.text_field to the field that holds the text",
                    number,
                )
            _check_format(record, fmt, text_field, number)
            if text:
                texts.append(text)
            else:
                counts["empty"] += 1
        for doc, encoded in zip(texts, _encode(tokenizer, texts, text_bytes.on)):
            if encoded["input_ids"]:
                ids.extend(encoded["input_ids"])
                text_bytes.add(doc, encoded)
                ids.append(tokenizer.eos_token_id)
                ends.append(len(ids))
                text_bytes.end_document()
        return
    if text_bytes.on:
        raise RecordError("cross-tokenizer distillation reads plain text only, not chat or prompt/completion records")
    for number, record in enumerate(records, start):
        _check_format(record, fmt, text_field, number)
        try:
            doc, doc_mask = chat.encode_record(record, tokenizer, fmt, text_field)
        except chat.NoAssistantTurn:
            counts["skipped_no_assistant"] += 1
            continue
        except LmdistillError as exc:
            raise RecordError(str(exc), number) from None
        ids.extend(doc)
        mask.extend(doc_mask)
        ends.append(len(ids))


def _check_format(record: dict, fmt: str, text_field: str, number: int) -> None:

    found = record_format(record, text_field)
    if found != fmt and not (fmt == "text" and found is None):  # a record without text is counted, not an error
        what = "no text, messages or prompt/completion field" if found is None else f"a '{found}' record"
        raise RecordError(
            f"mixed formats: this source's first record is '{fmt}' but record {number} has {what}; "
            "keep one format per source (use data.sources for a mixture)",
            number,
        )


# ---------------------------------------------------------------------------- the store on disk
@dataclass
class Store:
    """A finished store, memory-mapped. Nothing is read until a block is."""

    path: Path
    manifest: dict
    tokens: np.ndarray
    doc_ends: np.ndarray
    mask: np.ndarray | None
    text_bytes: np.ndarray | None = None  # where each token ends in the text (bytes.bin), when built with it

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def chat(self) -> bool:
        return self.mask is not None

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["tokens"])

    def unknown_byte_share(self, unk_id: int | None, limit: int = 1 << 21) -> float:
        """The share of the text's bytes (in the first ``limit`` tokens) that the tokenizer wrote as
        its unknown token ``unk_id``; 0 without one, or without the byte ends (``text_bytes``)."""
        if unk_id is None or self.text_bytes is None or not len(self.tokens):
            return 0.0
        n = min(len(self.tokens), limit)
        ends = np.asarray(self.text_bytes[:n], dtype=np.int64)
        sizes = np.diff(ends, prepend=0)
        unknown = np.asarray(self.tokens[:n]) == unk_id
        doc_ends = np.asarray(self.doc_ends)
        unknown[doc_ends[doc_ends <= n] - 1] = False  # each document's EOS (a tokenizer whose unknown token is its EOS)
        return float(sizes[unknown].sum() / max(int(ends[-1]), 1))

    @classmethod
    def open(cls, path: Path, vocab_size: int) -> Store:
        """The store at ``path``, for a tokenizer of ``vocab_size`` ids; a damaged one is refused.

        Checked at every open, without hashing: the manifest's shape, each file's size against
        the counts, the document ends, and every id below ``vocab_size`` (one max over the
        memory map: a bad id would otherwise fail mid-run inside the model)."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise LmdistillError(
                f"data store '{path}' has no readable {MANIFEST} ({exc.__class__.__name__}); delete "
                "the directory and run again to rebuild it"
            ) from None
        if isinstance(manifest, dict) and manifest.get("format_version") != FORMAT_VERSION:
            raise LmdistillError(
                f"data store '{path}' has format version {manifest.get('format_version')}, this "
                f"lmdistill reads {FORMAT_VERSION}; delete the directory and run again to rebuild it"
            )
        problem = _manifest_problem(manifest, vocab_size) or _files_problem(path, manifest)
        if problem is None:
            arrays = {
                name: np.memmap(path / name, dtype=record["dtype"], mode="r")
                if record["bytes"]
                else np.zeros(0, dtype=record["dtype"])
                for name, record in manifest["files"].items()
            }
            store = cls(
                path,
                manifest,
                arrays["tokens.bin"],
                arrays["docs.bin"],
                arrays.get("mask.bin"),
                arrays.get("bytes.bin"),
            )
            problem = store._contents_problem(vocab_size)
            if problem is None:
                return store
        raise LmdistillError(
            f"data store '{path}' is damaged: {problem}; delete the directory and run again to rebuild it"
        )

    def _contents_problem(self, vocab_size: int) -> str | None:
        """What is wrong with the ids or document ends (None if nothing)."""
        top = int(self.tokens.max()) if len(self.tokens) else 0
        if top >= vocab_size:
            return f"tokens.bin holds token id {top:,}, past the tokenizer's {vocab_size:,} ids"
        ends = self.doc_ends
        in_order = len(ends) == 0 or (ends[0] >= 0 and not np.any(ends[1:] < ends[:-1]))
        if not in_order or (int(ends[-1]) if len(ends) else 0) != self.num_tokens:
            return "docs.bin does not hold document ends in order up to the last token"
        return None

    def verify(self) -> None:
        """Check every file against its SHA-256 in the manifest (reads all of them)."""
        for name, record in self.manifest["files"].items():
            if sha256_file(self.path / name) != record["sha256"]:
                raise LmdistillError(
                    f"data store '{self.path}' is damaged: {name} does not match its SHA-256 in the "
                    "manifest; delete the directory and run again to rebuild it"
                )


# The files a store may hold, with the dtypes each may have; the manifest's counts that must be whole numbers.
_FILE_DTYPES = {
    "tokens.bin": ("uint16", "uint32"),
    "docs.bin": ("int64",),
    "mask.bin": ("uint8",),
    "bytes.bin": ("int64",),
}
_COUNTS = ("tokens", "documents", "tokens_before_cap", "skipped_no_assistant", "empty_records", "records", "pad_id")


def _manifest_problem(manifest, vocab_size: int) -> str | None:
    """What makes a manifest unusable (None if nothing): every field a run reads, checked in
    this one place before any is used."""
    if not isinstance(manifest, dict):
        return f"{MANIFEST} holds a JSON {type(manifest).__name__}, not an object"
    for name in _COUNTS:
        value = manifest.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{MANIFEST} has no whole number '{name}'"
    if not all(isinstance(manifest.get(name), str) for name in ("fingerprint", "source", "format")):
        return f"{MANIFEST} lacks its fingerprint, source or format"
    files = manifest.get("files")
    wanted = {"tokens.bin", "docs.bin"} | ({"mask.bin"} if manifest["format"] != "text" else set())
    if isinstance(manifest.get("key"), dict) and manifest["key"].get("text_bytes"):
        wanted.add("bytes.bin")
    if not isinstance(files, dict) or set(files) != wanted:
        return f"{MANIFEST} does not list {', '.join(sorted(wanted))} under 'files'"
    for name, record in files.items():
        if (
            not isinstance(record, dict)
            or record.get("dtype") not in _FILE_DTYPES[name]
            or not isinstance(record.get("bytes"), int)
            or not isinstance(record.get("sha256"), str)
        ):
            return f"{MANIFEST} lacks the dtype ({' or '.join(_FILE_DTYPES[name])}), bytes or sha256 of {name}"
    tokens, documents = manifest["tokens"], manifest["documents"]
    sizes = {
        "tokens.bin": tokens * np.dtype(files["tokens.bin"]["dtype"]).itemsize,
        "docs.bin": documents * 8,
        "mask.bin": tokens,
        "bytes.bin": tokens * 8,
    }
    for name, record in files.items():
        if record["bytes"] != sizes[name]:
            return (
                f"{MANIFEST} counts {tokens:,} tokens in {documents:,} documents, which {name} would hold in "
                f"{sizes[name]:,} bytes, not the {record['bytes']:,} it lists"
            )
    if manifest["pad_id"] >= vocab_size:
        return f"{MANIFEST} has pad id {manifest['pad_id']:,}, past the tokenizer's {vocab_size:,} ids"
    sources = manifest.get("source_files")
    if not isinstance(sources, list) or not all(
        isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("sha256"), str) for f in sources
    ):
        return f"{MANIFEST} lacks the paths and SHA-256 of its source files"
    return None


def _files_problem(path: Path, manifest: dict) -> str | None:
    """Whether the store's files are there, its own (no link out of the store), and of their sizes."""
    for name, record in manifest["files"].items():
        file = path / name
        if file.is_symlink():
            return f"{name} is a symbolic link (to {os.readlink(file)}), not a file of the store"
        size = file.stat().st_size if file.is_file() else None
        if size != record["bytes"]:
            found = ("is missing" if not file.exists() else "is not a file") if size is None else f"has {size} bytes"
            return f"{name} {found}, its manifest says {record['bytes']} bytes"
    return None


def _changed_source(manifest: dict) -> str | None:
    """The first source file whose content is not what the store was built from, read and
    hashed in full (None if none is): a file can change and keep its size and modification
    time (``cp -p``, ``rsync -a``, ``tar``), which is all the store's key sees."""
    for source in manifest["source_files"]:
        try:
            if sha256_file(Path(source["path"])) != source["sha256"]:
                return source["path"]
        except OSError:
            return source["path"]
    return None


def tokenizer_hash(tokenizer) -> str:
    """What decides the ids: the tokenizer's full definition, its EOS and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    template = (
        tokenizer.chat_template
        if isinstance(tokenizer.chat_template, str)
        else json.dumps(tokenizer.chat_template, sort_keys=True)
    )
    parts = [spec, str(tokenizer.eos_token_id), template or ""]
    return "sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def id_dtype(vocab_size: int) -> str:
    """The narrowest unsigned type that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def store_key(plan: SourcePlan, tokenizer, max_tokens: int | None, text_bytes: bool = False) -> dict:
    """Everything that changes the stored ids (and whether the store holds ``bytes.bin``); its
    hash names the store's directory."""
    return {
        **({"text_bytes": True} if text_bytes else {}),
        "format_version": FORMAT_VERSION,
        "source": plan.identity,
        "text_field": plan.text_field if plan.kind == "records" else None,
        "max_tokens": max_tokens,
        "tokenizer": tokenizer_hash(tokenizer),
        "dtype": id_dtype(len(tokenizer)),
        "shard_bytes": SHARD_BYTES,
        "piece_bytes": PIECE_BYTES,
    }


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def stores_home(store_dir: str | None) -> Path:
    if store_dir:
        return Path(store_dir).expanduser()

    return cache_home() / "stores"


@contextlib.contextmanager
def _locked(path: Path, say) -> Iterator[None]:
    """An exclusive lock on ``path``; says once that it waits when another process holds it."""
    try:  # never through a link: a planted one would have us create or lock its target
        with exclusive_lock(
            path,
            "data store build lock",
            lambda holder: say(
                f"waiting for another process ({holder}) to finish building the data store "
                f"({path.with_suffix('')}); if that process is stuck, end it"
            ),
        ):
            yield
    except OSError as exc:  # a read-only store_dir: the lock file is the first thing written there
        if exc.filename is not None and Path(exc.filename) == path:
            raise _unwritable(path.parent, exc) from None
        raise


def _tokenizer_name(tokenizer) -> str:
    """``'path' `` for a tokenizer loaded from a directory or the hub, else nothing: which side's it is."""
    name = getattr(tokenizer, "name_or_path", "")
    return f"{name!r} " if name else ""


def open_or_build(
    plan: SourcePlan,
    tokenizer,
    *,
    home: Path,
    num_proc: int | None,
    max_tokens: int | None,
    say=print,
    progress: bool = True,
    text_bytes: bool = False,
) -> tuple[Store, bool]:
    """The store for ``plan`` and ``tokenizer``: opened if it exists, else built. (store, built).
    ``text_bytes``: a store that also records where each token ends in the text (``bytes.bin``)."""
    key = store_key(plan, tokenizer, max_tokens, text_bytes)
    final = home / key_name(key)
    try:  # only ever renamed into place whole: a damaged one is refused, not built over
        store = Store.open(final, len(tokenizer)) if final.exists() else None
    except LmdistillError:
        if final.exists():
            raise
        store = None  # set aside meanwhile by a process that builds it again (its source changed)
    if store is not None:
        if (changed := _changed_source(store.manifest)) is None:
            return store, False
        say(
            f"note: {changed} is not the file the data store {final} was built from (same size and modification "
            "time, other content); building it again"
        )
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(home, exc) from None
    with _locked(home / f"{final.name}.lock", say):
        if final.exists():
            store = Store.open(final, len(tokenizer))
            if _changed_source(store.manifest) is None:  # built by the process we waited for
                return store, False
            stale = final.with_name(f"{final.name}.tmp-stale-{os.getpid()}")  # swept like a killed join's copy
            try:
                os.replace(final, stale)
            except OSError as exc:
                raise _unwritable(home, exc) from None
            shutil.rmtree(stale, ignore_errors=True)
        _build(plan, tokenizer, key, final, num_proc, max_tokens, say, progress)
    return Store.open(final, len(tokenizer)), True


def _unwritable(home: Path, exc: OSError) -> LmdistillError:
    return LmdistillError(
        f"cannot write in the data store directory '{home}' ({exc.strerror or exc}); set "
        "data.store_dir (or LMDISTILL_HOME) to a writable directory"
    )


def _build(
    plan: SourcePlan,
    tokenizer,
    key: dict,
    final: Path,
    num_proc: int | None,
    max_tokens: int | None,
    say,
    progress: bool,
) -> None:
    plan.prepare()
    if tokenizer.eos_token_id is None and plan.fmt in ("text", "prompt_completion"):
        raise LmdistillError(
            f"the tokenizer {_tokenizer_name(tokenizer)}has no EOS token to end documents with; set eos_token in its "
            "tokenizer_config.json (or tokenizer.eos_token)"
        )
    if plan.fmt == "messages":
        check_chat_template(tokenizer, plan.description)
    build = final.with_name(final.name + ".build")
    t0 = time.perf_counter()
    try:
        # Hashed before they are tokenized: a source changed meanwhile leaves a store that is found stale.
        sources = _source_files(plan)
        finished = _start_build_dir(build, key, plan, sources)
        procs = max(1, num_proc or default_num_proc())
        if plan.shards is not None:
            procs = min(procs, max(1, len(plan.shards) - len(finished)))
        if finished:
            say(f"note: resuming the data store build in '{build}': {len(finished)} shard(s) are done")
        shards = "a stream" if plan.shards is None else f"{len(plan.shards)} shard(s)"
        say(f"tokenizing {plan.description} into a data store ({shards}, {procs} process(es)): {final}")
        results = _run_shards(
            plan, tokenizer, build, finished, procs, max_tokens, progress, key["dtype"], key.get("text_bytes", False)
        )
        manifest = _assemble(plan, key, build, final, results, max_tokens, tokenizer, sources)
    except RecordError as exc:
        shutil.rmtree(build, ignore_errors=True)  # bad input: nothing is kept half-way
        where = f", record {exc.record}" if exc.record is not None else ""
        raise LmdistillError(f"{plan.description}{where}: {exc}") from None
    except OSError as exc:  # a full disk, a read-only directory: the finished shards stay for a rerun
        if _is_source_file(exc, plan):  # not the store's fault: a source file went away or cannot be read
            raise LmdistillError(
                f"{plan.description}: cannot read {exc.filename} ({exc.strerror or exc}); check "
                "that the file is there and readable, then run again"
            ) from None
        raise LmdistillError(
            f"could not write the data store in '{final.parent}' ({exc.strerror or exc}); free "
            "space there or set data.store_dir (or LMDISTILL_HOME) to another directory, then run "
            "again: finished shards are kept"
        ) from None
    seconds = time.perf_counter() - t0
    say(
        f"data store built: {manifest['tokens']:,} tokens in {manifest['documents']:,} documents, "
        f"{_mib(manifest)} MiB, {seconds:.1f} s ({manifest['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)"
    )


def _is_source_file(exc: OSError, plan: SourcePlan) -> bool:
    """Whether ``exc`` is about one of the source's own files rather than the store's."""
    sources = {entry[0] for entry in plan.identity.get("files") or []}
    return exc.filename is not None and str(Path(os.fsdecode(exc.filename)).resolve()) in sources


def _mib(manifest: dict) -> str:
    return f"{sum(r['bytes'] for r in manifest['files'].values()) / 2**20:.1f}"


def default_num_proc() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _start_build_dir(build: Path, key: dict, plan: SourcePlan, sources: list[dict]) -> dict[int, dict]:
    """Make or reuse the build directory; the finished shards (index -> counts) an earlier
    attempt of the same build, of the same source content, left, which are kept."""
    record = json.loads(json.dumps({"key": key, "shards": plan.shards, "sources": sources}))  # as it reads back
    plan_file = build / "plan.json"
    if plan_file.exists():
        try:
            same = json.loads(plan_file.read_text()) == record
        except ValueError:
            same = False
        if same:
            finished = {int(p.name[6:11]): json.loads(p.read_text()) for p in sorted(build.glob("shard-*.json"))}
            return {
                i: r
                for i, r in finished.items()
                if _shard_intact(build, i, r, key["dtype"], plan.chat, key.get("text_bytes", False))
            }
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    atomic_write_json(plan_file, record, fsync=True)
    return {}


def _shard_intact(build: Path, index: int, result: dict, dtype: str, chat: bool, text_bytes: bool) -> bool:
    """Whether a finished shard's files hold what its marker counts (else it is redone): a
    truncated shard would otherwise be joined into a store whose documents end past its tokens."""
    sizes = {"tokens": result["tokens"] * np.dtype(dtype).itemsize, "ends": result["documents"] * 8}
    if chat:
        sizes["mask"] = result["tokens"]
    if text_bytes:
        sizes["bytes"] = result["tokens"] * 8
    for name, size in sizes.items():
        file = build / f"shard-{index:05d}.{name}"
        if not file.exists() or file.stat().st_size != size:
            return False
    return True


def _run_shards(
    plan: SourcePlan,
    tokenizer,
    build: Path,
    finished: dict[int, dict],
    procs: int,
    max_tokens: int | None,
    progress: bool,
    dtype: str,
    text_bytes: bool = False,
) -> list[dict]:
    """Tokenize the shards not yet finished, in order, stopping once the shards so far hold
    ``max_tokens``; returns the counts of the shards the store is made of, in order."""
    results = dict(finished)
    stream = plan.shards is None
    done_work = 0 if stream else sum(_shard_work(s) for i, s in enumerate(plan.shards) if i in results)
    # A bar for work that takes a while (a stream, or more than one shard); a small source is done at once.
    bar = progress_bar(
        None if stream else plan.work,
        done_work,
        "tokenizing",
        progress and (stream or len(plan.shards) > 1),
        unit="B" if plan.kind == "files" else "records",
    )
    t0, tokens_now = time.perf_counter(), 0

    def done(i: int, shard: tuple, result: dict) -> None:
        nonlocal tokens_now
        results[i] = result
        tokens_now += result["tokens"]
        bar.update(_shard_work(shard))
        bar.set_postfix({"tokens/s": f"{tokens_now / max(time.perf_counter() - t0, 1e-9):,.0f}"})

    def enough() -> bool:  # the shards in order so far hold max_tokens
        total, i = 0, 0
        while max_tokens is not None and i in results:
            total += results[i]["tokens"]
            if total >= max_tokens:
                return True
            i += 1
        return False

    tasks = ((i, shard) for i, shard in plan.iter_shards() if i not in results)
    args = (tokenizer, plan.dataset, plan.fmt, plan.text_field, text_bytes)
    try:
        if procs == 1:
            with _single_threaded_tokenizer():
                _WORKER.clear()
                _init_worker(*args)
                while not enough() and (task := next(tasks, None)) is not None:
                    done(*task, _tokenize_shard(task[0], task[1], str(build), dtype))
        else:
            _run_pool(tasks, build, procs, dtype, args, done, enough)
    finally:
        bar.close()
        _WORKER.clear()
    prefix = []  # the shards in order, up to the first missing one (later ones are past max_tokens)
    while len(prefix) in results:
        prefix.append(results[len(prefix)])
    return prefix


def _run_pool(tasks, build: Path, procs: int, dtype: str, args: tuple, done, enough) -> None:
    """Shards over ``procs`` worker processes, at most two each in flight, taken in order. A
    worker that dies (killed, e.g. by the out-of-memory killer) ends the build with one line; the
    shards finished so far stay in the build directory for the rerun."""
    try:
        _pool_over(tasks, build, procs, dtype, args, done, enough)
    except BrokenProcessPool:
        raise LmdistillError(
            f"a tokenizer process of the data store build died (killed, perhaps out of memory); the "
            f"shards finished so far are kept: run again, or lower data.num_proc (now {procs})"
        ) from None


def _pool_over(tasks, build: Path, procs: int, dtype: str, args: tuple, done, enough) -> None:
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(
        procs, mp_context=context, initializer=_init_worker, initargs=(*args, os.getpid())
    ) as pool:
        pending: dict = {}
        try:
            while True:
                while len(pending) < 2 * procs and not enough() and (task := next(tasks, None)) is not None:
                    pending[pool.submit(_tokenize_shard, task[0], task[1], str(build), dtype)] = task
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    done(*pending.pop(future), future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


@contextlib.contextmanager
def _single_threaded_tokenizer():
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _shard_work(shard: tuple) -> int:
    """Bytes of text (files) or records (records, rows): the progress bar's unit."""
    if shard[0] == "files":
        return sum(end - start for _, start, end, _ in shard[1])
    return shard[2] - shard[1] if shard[0] == "records" else len(shard[2])


def _assemble(
    plan: SourcePlan,
    key: dict,
    build: Path,
    final: Path,
    results: list[dict],
    max_tokens: int | None,
    tokenizer,
    sources: list[dict],
) -> dict:
    """Join the shard files into the store's files, in a staging directory renamed into place
    with the manifest written last (``ManifestDir``)."""
    total = sum(r["tokens"] for r in results)
    skipped = sum(r["skipped_no_assistant"] for r in results)
    documents = sum(r["documents"] for r in results)
    if plan.chat and documents == 0 and skipped:
        raise RecordError(
            f"none of its {skipped} conversation(s) has an assistant turn to train on; give "
            "records with an assistant message (or a completion)"
        )
    keep = total if max_tokens is None else min(total, max_tokens)
    for stale in final.parent.glob(f"{final.name}.tmp-*"):  # a killed join's, as large as the store (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    ends = _join_ends(build, results, keep, chat=plan.chat)
    if plan.chat:  # a conversation is kept whole or not at all
        keep = int(ends[-1]) if len(ends) else 0
    dtypes = {"tokens.bin": key["dtype"], "docs.bin": "int64", **({"mask.bin": "uint8"} if plan.chat else {})}
    if key.get("text_bytes"):
        dtypes["bytes.bin"] = "int64"
    with ManifestDir(
        final,
        staging=final.with_name(f"{final.name}.tmp-{os.getpid()}"),
        names=list(dtypes),
        record=lambda path: {"dtype": dtypes[path.name], **file_record(path, size_key="bytes")},
        sort_keys=False,
    ) as out:
        tokens_bytes = keep * np.dtype(key["dtype"]).itemsize
        out.write("tokens.bin", lambda f: _concat(build, len(results), "tokens", f, tokens_bytes))
        out.write("docs.bin", ends.tofile)
        if plan.chat:
            out.write("mask.bin", lambda f: _concat(build, len(results), "mask", f, keep))
        if key.get("text_bytes"):
            out.write("bytes.bin", lambda f: _join_text_bytes(build, results, keep).tofile(f))
        files = out.records()  # (hashed once: the fingerprint is made of them)
        manifest = out.publish(_manifest_fields(plan, key, tokenizer, results, files, len(ends), keep, sources))
    shutil.rmtree(build, ignore_errors=True)
    return manifest


def _manifest_fields(
    plan: SourcePlan,
    key: dict,
    tokenizer,
    results: list[dict],
    files: dict,
    documents: int,
    keep: int,
    sources: list[dict],
) -> dict:
    """The store's manifest: what it was built from, its counts, and its files' records."""
    fingerprint = hashlib.sha256(json.dumps({n: f["sha256"] for n, f in files.items()}, sort_keys=True).encode())
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": "sha256:" + fingerprint.hexdigest(),
        "key": key,
        "source": plan.description,
        "format": plan.fmt,
        "tokens": keep,
        "documents": documents,
        "tokens_before_cap": sum(r["tokens"] for r in results),
        "skipped_no_assistant": sum(r["skipped_no_assistant"] for r in results),
        "empty_records": sum(r["empty"] for r in results),
        "records": sum(r["records"] for r in results),
        "vocab_size": len(tokenizer),
        "eos_id": tokenizer.eos_token_id,
        "pad_id": _pad_id(tokenizer),
        "files": files,
        "source_files": sources,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def _source_files(plan: SourcePlan) -> list[dict]:
    """The local files a store is made from, with their sizes and SHA-256 (what each start checks them against)."""
    files = plan.identity.get("files") or []
    return [{"path": path, "bytes": size, "sha256": sha256_file(Path(path))} for path, size, _ in files]


def _join_ends(build: Path, results: list[dict], keep: int, chat: bool) -> np.ndarray:
    """Document ends across shards, as offsets into the joined tokens, cut at ``keep`` tokens."""
    parts, offset = [], 0
    for i, result in enumerate(results):
        parts.append(np.fromfile(build / f"shard-{i:05d}.ends", dtype=np.int64) + offset)
        offset += result["tokens"]
    ends = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    ends = ends[ends <= keep]
    if not chat and keep and (len(ends) == 0 or ends[-1] < keep):
        ends = np.append(ends, keep)  # text cut by max_tokens: its last document ends at the cut
    return ends.astype(np.int64)


def _join_text_bytes(build: Path, results: list[dict], keep: int) -> np.ndarray:
    """The shards' byte ends as offsets from the store's first byte, cut at ``keep`` tokens."""
    parts, offset = [], 0
    for i, result in enumerate(results):
        parts.append(np.fromfile(build / f"shard-{i:05d}.bytes", dtype=np.int64) + offset)
        offset += result["text_bytes"]
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return joined[:keep]


def _concat(build: Path, shards: int, name: str, dst: BinaryIO, limit: int) -> None:
    """Append the shards' ``name`` files to the open file ``dst``, stopping after ``limit`` bytes."""
    left = limit
    for i in range(shards):
        if left <= 0:
            break
        with open(build / f"shard-{i:05d}.{name}", "rb") as src:
            while left > 0 and (chunk := src.read(min(1 << 22, left))):
                dst.write(chunk)
                left -= len(chunk)
