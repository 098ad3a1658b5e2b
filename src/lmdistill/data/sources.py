"""A run's data: sources -> tokenized stores on disk -> blocks -> deterministic, resumable batches.

A source is the embedded corpus, a plain-text file (one document), a .jsonl/.json/.parquet
file, a directory of one of these kinds, or a ``datasets`` name. Its records are plain
``text``, chat ``messages`` or ``prompt`` + ``completion`` (``chat.py``). Each source is
tokenized once into a memory-mapped store (``store.py``); each start cuts the stores into
blocks for its own block size and holds out whole blocks for evaluation (``blocks.py``).

Batches come from a sampler, a pure function of the run's micro-batch counter: a per-epoch
permutation drawn from ``run.seed`` for one source, a weighted schedule for a mixture
(``data.sources``). So the data position of a run is that one integer, resume is exact, and
each data-parallel rank takes its own slice of a global batch.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lmdistill.config import DataConfig, source_names
from lmdistill.core.errors import LmdistillError
from lmdistill.core.paths import is_hub_id
from lmdistill.data.blocks import Blocks, BlockSampler, ConcatBlocks, MixtureSampler, layout_blocks, split_blocks
from lmdistill.data.chat import record_format
from lmdistill.data.store import RecordError, SourcePlan, Store, open_or_build, plan_files, plan_records, stores_home

__all__ = [
    "BlockData",
    "BlockSampler",
    "MixtureSampler",
    "build_block_data",
    "make_sampler",
    "open_store",
    "plan_source",
    "embedded_corpus_texts",
]

EXTENSION_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


def embedded_corpus_texts() -> list[str]:
    """CPython's reference documentation (``pydoc_data.topics``): ships with every Python.

    About 465k characters in 79 documents; sorted by topic name so every machine with
    the same Python sees the same order.
    """
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _data_files(path: Path, store_home: Path | None = None) -> tuple[str, list[str], list[Path]]:
    """(datasets builder, the files it reads, the files of a directory it leaves out; never those
    of ``store_home``, the data stores' own directory, should it lie inside ``path``)."""
    if path.is_dir():
        found = _visible_files(path, store_home)
        files = [p for p in found if p.suffix.lower() in EXTENSION_BUILDERS]
        ignored = [p for p in found if p.suffix.lower() not in EXTENSION_BUILDERS]
        if not files:
            raise LmdistillError(
                f"data directory '{path}' holds no .txt, .jsonl or .parquet files; point data.path at a file or "
                "a directory of them"
            )
        builders = {EXTENSION_BUILDERS[p.suffix.lower()] for p in files}
        if len(builders) > 1:
            raise LmdistillError(
                f"data directory '{path}' mixes file types ({', '.join(sorted(builders))}); keep one type per directory"
            )
        return builders.pop(), [str(p) for p in files], ignored
    builder = EXTENSION_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise LmdistillError(
            f"data file '{path}' has an unsupported extension '{path.suffix}'; use .txt, .jsonl or .parquet"
        )
    return builder, [str(path)], []


def _visible_files(folder: Path, skip: Path | None = None) -> list[Path]:
    """The files under ``folder``, sorted, without hidden ones or anything in a hidden directory
    (``.git/``, ``.ipynb_checkpoints/``) or in ``skip``, which are not even walked."""
    found, skip = [], skip.resolve() if skip is not None else None
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and Path(parent, d).resolve() != skip]
        found += [Path(parent, name) for name in names if not name.startswith(".")]
    return sorted(p for p in found if p.is_file())


def _check_utf8(path: str, role: str) -> None:
    """A one-line error naming the file, line and byte offset of the first byte that is not
    UTF-8 (pyarrow takes such bytes into its strings and fails only when a record is read)."""
    decoder, offset, lines = codecs.getincrementaldecoder("utf-8")(), 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 23)
            held = len(decoder.getstate()[0])  # the start of a character cut at the previous chunk's end
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset - held + exc.start
                line = lines + chunk.count(b"\n", 0, max(0, exc.start - held)) + 1
                raise LmdistillError(
                    f"{role}: '{path}' is not UTF-8 text (a byte "
                    f"{exc.object[exc.start]:#04x} on line {line}, at byte offset {at}); convert it "
                    "to UTF-8, e.g. with iconv"
                ) from None
            if not chunk:
                return
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def _read_error(role: str, source: str, files: list[str], exc: Exception, text_field: str = "text") -> LmdistillError:
    """One line for a data file datasets could not read: the root cause, not its wrapper."""
    if all(Path(f).stat().st_size == 0 for f in files):
        return LmdistillError(f"{role} '{source}' is empty; give a file with text in it")
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if any("corresponds to no data" in str(c) for c in chain):  # datasets' words for zero records
        return LmdistillError(
            f"{role} '{source}' has no records (none with a non-empty '{text_field}' field); give "
            f'records with text, e.g. one {{"{text_field}": "..."}} object per line of a .jsonl'
        )
    data_files = {str(Path(f).resolve()) for f in files}
    for c in chain:
        if (
            isinstance(c, OSError)
            and c.errno in _CACHE_ERRNOS
            and not (c.filename and str(Path(str(c.filename)).resolve()) in data_files)
        ):
            where = f": {c.filename}" if c.filename else ""
            return LmdistillError(
                f"{c.strerror or c}{where}: datasets could not write its cache while loading {role} "
                f"'{source}'; set HF_DATASETS_CACHE (or HF_HOME) to a writable directory"
            )
    cause = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError):
            return LmdistillError(
                f"{role} '{source}' is not UTF-8 text (a byte {cause.object[cause.start]:#04x} at "
                f"position {cause.start} of a file); convert it to UTF-8, e.g. with iconv"
            )
    detail = (str(cause).splitlines() or [type(cause).__name__])[0][:200]
    return LmdistillError(f"could not read {role} '{source}': {detail}; check the file's format")


# A data file datasets only reads; these errors on another path are its cache that cannot be written.
_CACHE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR)


def plan_source(source: str | None, cfg: DataConfig, role: str = "data.path") -> SourcePlan:
    """What a store for ``source`` is built from; reads no more of the source than its listing.

    Plain-text files are read by the store's workers directly (a file is one document, read in
    pieces); .jsonl/.json/.parquet files and datasets names go through ``datasets``, loaded
    only when a store has to be built (a local file's store is found by its size and
    modification time, then checked against its SHA-256)."""
    if source is None:
        texts = embedded_corpus_texts()
        digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        return RecordSource(
            "embedded: CPython reference docs (pydoc_data)",
            {"embedded": digest},
            cfg.text_field,
            lambda: (datasets_module().Dataset.from_dict({"text": texts}), "text"),
        )
    path = Path(source).expanduser()
    if path.exists():
        builder, files, ignored = _data_files(path, stores_home(cfg.store_dir))
        description = f"{source} ({len(files)} file{'s' if len(files) > 1 else ''})"
        if ignored:
            kinds = sorted({p.suffix or p.name for p in ignored})
            _note(
                f"{role} '{source}': {len(ignored)} file(s) of a type that is not read ({', '.join(kinds[:5])}) "
                "left out; only .txt, .md, .jsonl, .json and .parquet are read"
            )
        if all(Path(f).stat().st_size == 0 for f in files):
            raise LmdistillError(f"{role} '{source}' is empty; give a file with text in it")
        if builder == "text":
            return plan_files(files, description)
        identity = {"files": [_file_identity(f) for f in files], "builder": builder}
        if cfg.streaming:  # the same records in the same order: the same store as without streaming
            return StreamSource(
                description, identity, cfg.text_field, role, source, lambda: _stream_local(builder, files, role)
            )
        return RecordSource(
            description, identity, cfg.text_field, lambda: _load_local(builder, files, role, source, cfg)
        )
    if path.suffix.lower() in EXTENSION_BUILDERS:  # a file's name, never a datasets name: no hub look-up
        raise LmdistillError(
            f"{role} '{source}' does not exist; check the path (relative paths are from '{Path.cwd()}')"
        )
    if is_hub_id(source) and cfg.streaming:
        description = (
            f"datasets (streaming): {source}"
            + (f"/{cfg.dataset_config}" if cfg.dataset_config else "")
            + f" [{cfg.split}]"
        )
        identity = {"datasets_stream": source, "config": cfg.dataset_config, "split": cfg.split}
        return StreamSource(
            description,
            identity,
            cfg.text_field,
            role,
            source,
            lambda: datasets_module().load_dataset(source, cfg.dataset_config, split=cfg.split, streaming=True),
        )
    if is_hub_id(source):
        ds = _load_hub(source, cfg, role)
        description = (
            f"datasets: {source}" + (f"/{cfg.dataset_config}" if cfg.dataset_config else "") + f" [{cfg.split}]"
        )
        identity = {"datasets": ds._fingerprint, "name": source, "config": cfg.dataset_config, "split": cfg.split}
        return RecordSource(description, identity, cfg.text_field, lambda: _record_format(ds, role, source, cfg))
    raise LmdistillError(f"{role} '{source}' does not exist; give a .txt, .jsonl or .parquet file or a directory")


class RecordSource(SourcePlan):
    """Records through ``datasets``: the dataset is loaded (and the shards cut) on ``prepare``."""

    def __init__(self, description: str, identity: dict, text_field: str, loader):
        super().__init__("records", "text", description, identity, text_field=text_field)
        self._loader = loader

    def prepare(self) -> None:
        dataset, fmt = self._loader()
        full = plan_records(dataset, fmt, self.description, self.identity, self.text_field)
        self.fmt, self.shards, self.dataset, self.work = fmt, full.shards, dataset, full.work


class StreamSource(SourcePlan):
    """Records read as a stream (``data.streaming``): shards of ``STREAM_RECORDS`` records are
    made while the stream is read, and reading stops once ``data.max_tokens`` are stored."""

    STREAM_RECORDS = 2048

    def __init__(self, description: str, identity: dict, text_field: str, role: str, source: str, opener):
        super().__init__("records", "text", description, identity, shards=None, text_field=text_field)
        self.role, self.source, self._opener = role, source, opener

    def prepare(self) -> None:
        try:
            with _quiet_logger("datasets"):  # its own error lines would repeat ours
                self.dataset = self._opener()
                head = list(itertools.islice(self.dataset, FORMAT_PROBE))
        except LmdistillError:
            raise
        except Exception as exc:  # datasets raises many types for a name or file it cannot stream
            raise LmdistillError(
                f"{self.role} '{self.source}' could not be read as a stream ({_one_line(exc)}); "
                "check the name, the network, or set data.streaming=false"
            ) from None
        if not head:
            raise LmdistillError(f"{self.role} '{self.source}' has no records; give records with text")
        first = head[0]
        # The first record with a format is the source's, as for a loaded source (a null text first is no error).
        self.fmt = next(
            (f for f in (record_format(r, self.text_field) for r in head) if f),
            "text" if self.text_field in first else None,
        )
        if self.fmt is None:
            raise LmdistillError(
                f"{self.role} '{self.source}' has no field '{self.text_field}' (fields: {', '.join(first)}); set "
                "data.text_field to the one that holds the text, or give chat records ('messages') or 'prompt' and "
                "'completion'"
            )

    def iter_shards(self):
        batch, first, index = [], 0, 0
        for number, record in enumerate(self._records()):
            batch.append(record)
            if len(batch) == self.STREAM_RECORDS:
                yield index, ("rows", first, batch)
                batch, first, index = [], number + 1, index + 1
        if batch:
            yield index, ("rows", first, batch)

    def _records(self):
        """The stream's records; a failure part-way (a broken line deep in a file, a dropped
        connection) is a one-line error, not a traceback from inside datasets."""
        records, number = iter(self.dataset), 0
        with _quiet_logger("datasets"):
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    return
                except Exception as exc:
                    raise self._stream_error(number, exc) from None
                yield record
                number += 1

    def _stream_error(self, number: int, exc: Exception) -> Exception:
        what = f"reading the stream stopped after {number:,} record(s): {_one_line(exc)}"
        if self.identity.get("files"):  # a local file: bad input, so its build is not kept (RecordError)
            return RecordError(
                f"{what}; fix the file (a broken line?) or set data.streaming=false to have it checked as a whole"
            )
        return LmdistillError(
            f"{self.role} '{self.source}': {what}; check the network and run again (finished "
            "shards are kept), or set data.streaming=false"
        )


def _one_line(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


FORMAT_PROBE = 64  # records read to find a source's format (the first that has one)


def datasets_module():
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _file_identity(name: str) -> list:
    path = Path(name).resolve()
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def _stream_local(builder: str, files: list[str], role: str):
    if builder == "json":  # a byte that is not UTF-8 is the file's fault, named as it is without streaming
        for name in files:
            _check_utf8(name, role)
    return datasets_module().load_dataset(builder, data_files=files, split="train", streaming=True)


def _load_local(builder: str, files: list[str], role: str, source: str, cfg: DataConfig):
    if builder == "json":
        for name in files:
            _check_utf8(name, role)
    datasets = datasets_module()
    try:
        with _quiet_logger("datasets"):  # its own error lines would repeat ours
            # Converted afresh: datasets keys its cache of a local file by path and modification time
            # only, so a file rewritten keeping its time (cp -p, rsync -a, tar) would be read as it was.
            ds = datasets.load_dataset(builder, data_files=files, split="train", download_mode="force_redownload")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise _read_error(role, source, files, exc, cfg.text_field) from None
    return _record_format(ds, role, source, cfg)


def _load_hub(source: str, cfg: DataConfig, role: str):
    datasets = datasets_module()
    try:
        return datasets.load_dataset(source, cfg.dataset_config, split=cfg.split)
    except Exception as exc:
        raise LmdistillError(
            f"{role} '{source}' is not a local file and could not be loaded as a datasets name "
            f"({type(exc).__name__}); check the path, or the name and your network"
        ) from None


def _record_format(ds, role: str, source: str, cfg: DataConfig) -> tuple:
    """(the dataset with only the fields a format reads, its format). The first record's format
    is the source's; the build checks every other record against it."""
    columns = ds.column_names
    wanted = [c for c in (cfg.text_field, "messages", "prompt", "completion") if c in columns]
    if not wanted:
        raise LmdistillError(
            f"{role} '{source}' has no field '{cfg.text_field}' (fields: {', '.join(columns)}); set data.text_field "
            "to the one that holds the text, or give chat records ('messages') or 'prompt' and 'completion'"
        )
    ds = ds.select_columns(list(dict.fromkeys(wanted)))
    first = next(
        (
            record_format(r, cfg.text_field)
            for r in ds.select(range(min(len(ds), FORMAT_PROBE)))
            if record_format(r, cfg.text_field)
        ),
        None,
    )
    return ds, first or "text"


def _note(message: str) -> None:
    """A one-line notice, from the main process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {message}")


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)


@dataclass
class SourceData:
    """One source of a run: its store, and its blocks in this run's layout."""

    name: str
    weight: float
    store: Store
    built: bool
    loss_on: str
    train: Blocks
    eval: Blocks | None

    def record(self) -> dict:
        m = self.store.manifest
        return {
            "name": self.name,
            "weight": self.weight,
            "source": m["source"],
            "store": str(self.store.path),
            "fingerprint": self.store.fingerprint,
            "built": self.built,
            "format": m["format"],
            "loss_on": self.loss_on,
            "tokens": m["tokens"],
            "documents": m["documents"],
            "skipped_no_assistant": m["skipped_no_assistant"],
            "train_blocks": len(self.train),
            "train_targets": self.train.num_targets,
        }


@dataclass
class BlockData:
    """The run's blocks: train (a mixture's sources one after another) and eval."""

    train: Blocks | ConcatBlocks
    eval: Blocks | ConcatBlocks
    source: str
    eval_source: str
    sources: list[SourceData]
    eval_store: SourceData | None = None
    layout: dict = field(default_factory=dict)

    @property
    def weights(self) -> list[float] | None:
        return [s.weight for s in self.sources] if len(self.sources) > 1 else None

    def describe(self) -> dict:
        return {
            "source": self.source,
            "eval_source": self.eval_source,
            "train_blocks": len(self.train),
            "eval_blocks": len(self.eval),
            "block_size": self.train.block_size,
            "train_tokens": len(self.train) * self.train.block_size,
            "train_targets": self.train.num_targets,
            "eval_targets": self.eval.num_targets,
            "sources": [s.record() for s in self.sources],
            "eval_store": self.eval_store.record() if self.eval_store else None,
            "layout": self.layout,
        }


def _say(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message)


def open_store(
    source: str | None,
    cfg: DataConfig,
    tokenizer,
    role: str = "data.path",
    progress: bool = True,
    text_bytes: bool = False,
    capped: bool = True,
) -> tuple[Store, bool]:
    """The tokenized store of ``source``, built on first use (see ``store.py``); ``text_bytes``:
    with where each token ends in the text; ``capped``: cut at ``data.max_tokens``."""
    plan = plan_source(source, cfg, role)
    return open_or_build(
        plan,
        tokenizer,
        home=stores_home(cfg.store_dir),
        num_proc=cfg.num_proc,
        max_tokens=cfg.max_tokens if capped else None,
        say=_say,
        progress=progress and _is_main(),
        text_bytes=text_bytes,
    )


def teacher_store(source: str | None, cfg: DataConfig, tokenizer, student: Store, role: str, progress: bool) -> Store:
    """The same source in the teacher's tokenizer, for a teacher whose tokenizer differs: whole
    (``data.max_tokens`` counts the student's tokens; the teacher's store must cover their text)."""
    if student.chat:
        raise LmdistillError(
            f"{role} '{source or 'embedded'}' is chat or prompt/completion data, and cross-tokenizer distillation "
            "reads plain text only (the two tokenizers' chat templates write different text); give plain text"
        )
    store, built = open_store(source, cfg, tokenizer, role, progress, text_bytes=True, capped=False)
    if not built:
        _say(f"data: the teacher's tokens of {store.manifest['source']}: {store.num_tokens:,} tokens from {store.path}")
    covered = int(student.text_bytes[-1]) if len(student.text_bytes) else 0
    if (int(store.text_bytes[-1]) if len(store.text_bytes) else 0) < covered:
        raise LmdistillError(
            f"the teacher's data store {store.path} covers less text than the student's {student.path}; delete "
            "both and run again to rebuild them"
        )
    return store


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _loss_on(cfg: DataConfig, store: Store, role: str, source: str | None) -> str:
    if cfg.loss_on == "auto":
        return "assistant" if store.chat else "all"
    if cfg.loss_on == "assistant" and not store.chat:
        raise LmdistillError(
            f"data.loss_on is 'assistant' but {role} '{source or 'embedded'}' is plain text with no "
            "assistant turns; use data.loss_on: all (or auto), or give chat / prompt-completion records"
        )
    return cfg.loss_on


def _source_data(
    name: str,
    weight: float,
    source: str | None,
    cfg: DataConfig,
    tokenizer,
    role: str,
    hold_out: bool,
    progress: bool,
    teacher_tokenizer=None,
    text_bytes: bool = False,
) -> SourceData:
    text_bytes = text_bytes or teacher_tokenizer is not None
    store, built = open_store(source, cfg, tokenizer, role, progress, text_bytes=text_bytes)
    if not built:
        _say(f"data: {store.manifest['source']}: {store.num_tokens:,} tokens from the store {store.path}")
    if store.manifest["skipped_no_assistant"]:
        _note(
            f"{role} '{source or 'embedded'}': {store.manifest['skipped_no_assistant']} record(s) without an "
            "assistant turn (or with an empty completion) left out"
        )
    if store.manifest["empty_records"]:
        _note(
            f"{role} '{source or 'embedded'}': {store.manifest['empty_records']} of {store.manifest['records']} "
            f"record(s) have no text in "
            f"'{cfg.text_field}' (null or empty) and are left out"
        )
    loss_on = _loss_on(cfg, store, role, source)
    layout = layout_blocks(store, cfg.block_size, loss_on)
    minimum = 2 if hold_out else 1
    if len(layout.starts) < minimum:
        more = (
            "add text"
            if store.manifest["tokens_before_cap"] <= store.num_tokens  # else max_tokens cut it short
            else f"raise data.max_tokens (now {cfg.max_tokens:,})"
        )
        raise LmdistillError(
            f"{role} '{source or 'embedded'}' gives {len(layout.starts)} block(s) of {cfg.block_size} tokens, fewer "
            f"than {minimum} needed; {more} or lower {'--block-size' if role.startswith('--') else 'data.block_size'}"
        )
    twin = None if teacher_tokenizer is None else teacher_store(source, cfg, teacher_tokenizer, store, role, progress)
    train, held_out = split_blocks(
        layout, store, loss_on == "assistant", cfg.eval_fraction if hold_out else None, cfg.split_seed, twin
    )
    return SourceData(name, weight, store, built, loss_on, train, held_out)


def build_block_data(
    cfg: DataConfig, tokenizer, progress: bool = True, teacher_tokenizer=None, text_bytes: bool = False
) -> BlockData:
    """The run's sources as stores (built on first use), cut into blocks; eval blocks split off
    (whole blocks, with ``data.split_seed``) or taken from ``data.eval_path``. With a
    ``teacher_tokenizer`` (a teacher whose tokenizer differs), every block also carries the
    teacher's tokens of its text, from a second store of the same source. ``text_bytes``: stores
    that know the text each token covers (implied by ``teacher_tokenizer``; a cache built across
    tokenizers was built on those), so that batches report their bytes."""
    entries = cfg.sources or [{"path": cfg.path, "weight": 1.0}]
    names = source_names(cfg) if cfg.sources else [cfg.path or "embedded"]
    hold_out = cfg.eval_path is None
    sources = [
        _source_data(
            name,
            float(e.get("weight", 1.0)),
            e["path"],
            cfg,
            tokenizer,
            "data.sources" if cfg.sources else "data.path",
            hold_out,
            progress,
            teacher_tokenizer,
            text_bytes,
        )
        for name, e in zip(names, entries)
    ]
    train = sources[0].train if len(sources) == 1 else ConcatBlocks([s.train for s in sources])
    eval_store = None
    if hold_out:
        cap = None if cfg.max_eval_blocks is None else max(1, cfg.max_eval_blocks // len(sources))
        parts = [s.eval.subset(slice(0, cap)) for s in sources]
        eval_blocks = parts[0] if len(parts) == 1 else ConcatBlocks(parts)
        eval_source = (
            f"{len(eval_blocks)} held-out blocks ({cfg.eval_fraction:.0%}"
            f"{' of each source' if len(sources) > 1 else ''})"
        )
    else:
        eval_store = _source_data(
            "eval", 1.0, cfg.eval_path, cfg, tokenizer, "data.eval_path", False, progress, teacher_tokenizer, text_bytes
        )
        eval_blocks = eval_store.train.subset(slice(0, cfg.max_eval_blocks))
        eval_source = eval_store.store.manifest["source"]
    if len(eval_blocks) == 0:
        raise LmdistillError(
            f"data.eval_path '{cfg.eval_path}' gives no block of {cfg.block_size} tokens; add text "
            "or lower data.block_size"
        )
    source = (
        sources[0].store.manifest["source"]
        if len(sources) == 1
        else "mixture: " + ", ".join(f"{s.name} ({s.weight:g})" for s in sources)
    )
    layout = {
        "block_size": cfg.block_size,
        "split_seed": cfg.split_seed,
        "eval_fraction": cfg.eval_fraction if hold_out else None,
        "train": train.digest(),
        "eval": eval_blocks.digest(),
    }
    if teacher_tokenizer is not None:  # the teacher's tokens of the blocks come from these stores
        layout["teacher_stores"] = [blocks.teacher.store.fingerprint for blocks in (train, eval_blocks)]
    return BlockData(train, eval_blocks, source, eval_source, sources, eval_store, layout)


def block_data_of(
    source: str | None, cfg: DataConfig, tokenizer, role: str = "--data", progress: bool = True, teacher_tokenizer=None
) -> tuple[Blocks, str]:
    """Every block of one source (no split): what ``lmdistill eval --data`` scores (with the
    teacher's tokens of each block's text, for a ``teacher_tokenizer`` that differs)."""
    data = _source_data(source or "embedded", 1.0, source, cfg, tokenizer, role, False, progress, teacher_tokenizer)
    return data.train, data.store.manifest["source"]


def make_sampler(data: BlockData, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
    """The run's sampler: one source's blocks reshuffled per epoch, or a weighted mixture."""
    if data.weights is None:
        return BlockSampler(len(data.train), batch_size, seed, rank, world_size)
    return MixtureSampler([len(s.train) for s in data.sources], data.weights, batch_size, seed, rank, world_size)
