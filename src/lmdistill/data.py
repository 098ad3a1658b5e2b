"""Text sources -> tokenized, packed blocks -> deterministic, resumable batches.

Documents are tokenized without special tokens, joined with EOS and cut into
blocks of ``block_size`` tokens (the tail that does not fill a block is dropped).
Every block is a full window, so all its next-token targets are valid.

Batches come from ``BlockSampler``: a per-epoch permutation drawn from ``run.seed``, so
the data position of a run is a single integer (micro-batches consumed). That makes
resume exact and lets each data-parallel rank take its own slice of a global batch.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .errors import LmdistillError
from .paths import is_hub_id

EXTENSION_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
                      ".parquet": "parquet"}


def embedded_corpus_texts() -> list[str]:
    """CPython's reference documentation (``pydoc_data.topics``): ships with every Python.

    About 465k characters in 79 documents; sorted by topic name so every machine with
    the same Python sees the same order.
    """
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _data_files(path: Path) -> tuple[str, list[str], list[Path]]:
    """(datasets builder, the files it reads, the files of a directory it leaves out)."""
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
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


def _read_error(role: str, source: str, files: list[str], exc: Exception, text_field: str = "text") -> LmdistillError:
    """One line for a data file datasets could not read: the root cause, not its wrapper."""
    if all(Path(f).stat().st_size == 0 for f in files):
        return LmdistillError(f"{role} '{source}' is empty; give a file with text in it")
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if any("corresponds to no data" in str(c) for c in chain):  # datasets' words for zero records
        return LmdistillError(f"{role} '{source}' has no records (none with a non-empty '{text_field}' field); give "
                              f"records with text, e.g. one {{\"{text_field}\": \"...\"}} object per line of a .jsonl")
    data_files = {str(Path(f).resolve()) for f in files}
    for c in chain:
        if (isinstance(c, OSError) and c.errno in _CACHE_ERRNOS
                and not (c.filename and str(Path(str(c.filename)).resolve()) in data_files)):
            where = f": {c.filename}" if c.filename else ""
            return LmdistillError(f"{c.strerror or c}{where}: datasets could not write its cache while loading {role} "
                                  f"'{source}'; set HF_DATASETS_CACHE (or HF_HOME) to a writable directory")
    cause = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError):
            return LmdistillError(f"{role} '{source}' is not UTF-8 text (a byte {cause.object[cause.start]:#04x} at "
                                  f"position {cause.start} of a file); convert it to UTF-8, e.g. with iconv")
    detail = (str(cause).splitlines() or [type(cause).__name__])[0][:200]
    return LmdistillError(f"could not read {role} '{source}': {detail}; check the file's format")


# A data file datasets only reads; these errors on another path are its cache that cannot be written.
_CACHE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR)


def load_texts(source: str | None, cfg: DataConfig, role: str = "data.path"):
    """Load a text source as a ``datasets.Dataset`` with one column, ``text``."""
    import datasets

    datasets.disable_progress_bars()
    if source is None:
        return datasets.Dataset.from_dict({"text": embedded_corpus_texts()}), "embedded: CPython reference docs (pydoc_data)"
    path = Path(source).expanduser()
    if path.exists():
        builder, files, ignored = _data_files(path)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            with _quiet_logger("datasets"):  # its own error lines would repeat ours
                ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        except Exception as exc:  # datasets raises many types for unreadable files
            raise _read_error(role, source, files, exc, cfg.text_field) from None
        description = f"{source} ({len(files)} file{'s' if len(files) > 1 else ''})"
        if ignored:
            kinds = sorted({p.suffix or p.name for p in ignored})
            _note(f"{role} '{source}': {len(ignored)} file(s) of a type that is not read ({', '.join(kinds[:5])}) "
                  "left out; only .txt, .md, .jsonl, .json and .parquet are read")
    elif is_hub_id(source):
        try:
            ds = datasets.load_dataset(source, cfg.dataset_config, split=cfg.split)
        except Exception as exc:
            raise LmdistillError(
                f"{role} '{source}' is not a local file and could not be loaded as a datasets name "
                f"({type(exc).__name__}); check the path, or the name and your network"
            ) from None
        description = f"datasets: {source}" + (f"/{cfg.dataset_config}" if cfg.dataset_config else "") + f" [{cfg.split}]"
    else:
        raise LmdistillError(f"{role} '{source}' does not exist; give a .txt, .jsonl or .parquet file or a directory")
    if cfg.text_field not in ds.column_names:
        raise LmdistillError(
            f"{role} '{source}' has no field '{cfg.text_field}' (fields: {', '.join(ds.column_names)}); "
            "set data.text_field to the one that holds the text"
        )
    ds = ds.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    missing = sum(1 for text in ds["text"] if not text)
    if missing:
        _note(f"{role} '{source}': {missing} of {len(ds)} record(s) have no text in '{cfg.text_field}' (null or "
              "empty) and are left out")
    return ds, description


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


def pack_blocks(texts, tokenizer, block_size: int, num_proc: int | None = None) -> torch.Tensor:
    """Tokenize, join documents with EOS and cut into (num_blocks, block_size) int64."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LmdistillError("the tokenizer has no EOS token to join documents with; set tokenizer.eos_token")

    def tokenize(batch):
        texts = [t if t is not None else "" for t in batch["text"]]
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise LmdistillError(f"a record's text field holds {type(bad).__name__} ({str(bad)[:40]!r}), not text; "
                                 "set data.text_field to the field that holds the text")
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids if x]}

    if len(texts) == 0:
        return torch.zeros((0, block_size), dtype=torch.long)
    tokenized = texts.map(tokenize, batched=True, remove_columns=texts.column_names, num_proc=num_proc)
    if "ids" not in tokenized.column_names:  # every document was empty
        return torch.zeros((0, block_size), dtype=torch.long)
    flat = np.fromiter(itertools.chain.from_iterable(tokenized["ids"]), dtype=np.int64)
    num_blocks = len(flat) // block_size
    return torch.from_numpy(flat[: num_blocks * block_size].copy()).view(num_blocks, block_size)


@dataclass
class BlockData:
    train: torch.Tensor  # (num_train_blocks, block_size)
    eval: torch.Tensor  # (num_eval_blocks, block_size)
    source: str
    eval_source: str

    def describe(self) -> dict:
        return {"source": self.source, "eval_source": self.eval_source, "train_blocks": len(self.train),
                "eval_blocks": len(self.eval), "block_size": self.train.shape[1],
                "train_tokens": self.train.numel()}


def build_block_data(cfg: DataConfig, tokenizer) -> BlockData:
    """Load, tokenize and pack the training text; split off (or load) the eval blocks."""
    texts, source = load_texts(cfg.path, cfg)
    blocks = pack_blocks(texts, tokenizer, cfg.block_size, cfg.num_proc)
    minimum = 1 if cfg.eval_path else 2
    if len(blocks) < minimum:
        raise LmdistillError(
            f"data '{cfg.path or 'embedded'}' gives {len(blocks)} block(s) of {cfg.block_size} tokens, fewer than "
            f"{minimum} needed; add text or lower data.block_size"
        )
    if cfg.eval_path:
        eval_texts, eval_source = load_texts(cfg.eval_path, cfg, role="data.eval_path")
        eval_blocks = pack_blocks(eval_texts, tokenizer, cfg.block_size, cfg.num_proc)
        if len(eval_blocks) == 0:
            raise LmdistillError(
                f"data.eval_path '{cfg.eval_path}' gives no block of {cfg.block_size} tokens; add text or lower "
                "data.block_size"
            )
        train_blocks = blocks
    else:
        # Hold out whole blocks, drawn with data.split_seed, so eval text never appears in training.
        perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(cfg.split_seed))
        num_eval = max(1, int(round(cfg.eval_fraction * len(blocks))))
        num_eval = min(num_eval, len(blocks) - 1)
        eval_blocks = blocks[perm[:num_eval].sort().values]
        train_blocks = blocks[perm[num_eval:].sort().values]
        eval_source = f"{num_eval} held-out blocks ({cfg.eval_fraction:.0%})"
    if cfg.max_eval_blocks is not None:
        eval_blocks = eval_blocks[: cfg.max_eval_blocks]
    return BlockData(train=train_blocks, eval=eval_blocks, source=source, eval_source=eval_source)


class BlockSampler:
    """Micro-batches of block indices, reshuffled every epoch from ``seed``.

    A *global* micro-batch holds ``batch_size * world_size`` blocks; rank r takes its
    r-th slice. Micro-batch m of the run is a pure function of m, which is the whole
    data position saved in a checkpoint.
    """

    def __init__(self, num_blocks: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.num_blocks = num_blocks
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.micro_batches_per_epoch = num_blocks // (batch_size * world_size)
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm = torch.randperm(self.num_blocks, generator=g)
            else:
                self._perm = torch.arange(self.num_blocks)
            self._perm_epoch = epoch
        return self._perm

    def epoch_of(self, micro_batch: int) -> int:
        return micro_batch // self.micro_batches_per_epoch

    def indices(self, micro_batch: int) -> torch.Tensor:
        """Block indices of this rank for the run's ``micro_batch``-th micro-batch."""
        epoch, index = divmod(micro_batch, self.micro_batches_per_epoch)
        global_size = self.batch_size * self.world_size
        start = index * global_size + self.rank * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]
