"""Blocks over a store, and the samplers that order them.

``layout_blocks`` cuts a store's token stream into blocks of ``block_size`` tokens:

- plain text: back to back, every block full (the tail that does not fill one is dropped),
  so every position but the first has a target;
- chat / prompt-completion data: whole conversations packed greedily. A conversation goes
  into the current block if it fits, else it starts a new one (the rest of the old block
  is padding, never a target); only a conversation longer than a block is split. Blocks
  left without a single target (a split-off piece of a long prompt, with
  ``loss_on: assistant``) are dropped.

A block is a (start, length) window of the memory-mapped ids; ``Blocks`` reads the windows
of one micro-batch when it is asked for them, so a run's data memory is its index arrays,
not its corpus. The train/eval split holds out whole blocks drawn with ``data.split_seed``.

Samplers turn the run's micro-batch counter into block rows, as a pure function of it, so
the data position of a run is that one integer: ``BlockSampler`` for one source,
``MixtureSampler`` for weighted sources.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from lmdistill.core.batch import Batch
from lmdistill.data.alignment import TeacherWindows
from lmdistill.data.store import Store


@dataclass
class Layout:
    """Where a store's blocks are: start offsets, lengths and target counts, one per block.

    Plain text keeps only the starts (lengths and targets None: every block is full, with
    block_size - 1 targets), so a billion-token corpus costs 8 bytes per block here."""

    starts: np.ndarray  # int64
    lengths: np.ndarray | None  # int64
    targets: np.ndarray | None  # int64: valid next-token targets in each block
    block_size: int


def layout_blocks(store: Store, block_size: int, loss_on: str) -> Layout:
    """The store cut into blocks (see the module docstring); ``loss_on`` is assistant | all."""
    if not store.chat:
        return Layout(np.arange(store.num_tokens // block_size, dtype=np.int64) * block_size, None, None, block_size)
    starts, lengths = _pack_whole_documents(np.asarray(store.doc_ends), block_size)
    if loss_on == "assistant":
        targets = _masked_sums(store.mask, starts + 1, starts + lengths)
    else:
        targets = np.maximum(lengths - 1, 0)
    keep = targets > 0
    return Layout(starts[keep], lengths[keep], targets[keep], block_size)


def _pack_whole_documents(ends: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing: consecutive documents share a block while they fit; a longer one is split."""
    starts, lengths = [], []
    block_start, used, doc_start = 0, 0, 0
    for end in ends.tolist():
        size = end - doc_start
        if used and used + size > block_size:  # does not fit: close the block, start the document in a new one
            starts.append(block_start)
            lengths.append(used)
            used = 0
        if not used:
            block_start = doc_start
        while used + size > block_size:  # only a document longer than a block gets here
            starts.append(block_start)
            lengths.append(block_size)
            block_start += block_size
            size -= block_size
        used += size
        doc_start = end
    if used:
        starts.append(block_start)
        lengths.append(used)
    return np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def _masked_sums(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """sum(mask[lo[i]:hi[i]]) for sorted, non-overlapping windows, reading the mask once."""
    out = np.zeros(len(lo), dtype=np.int64)
    for a in range(0, len(lo), chunk):
        low, h = lo[a : a + chunk], hi[a : a + chunk]
        base, top = int(low[0]), int(h.max())
        if top <= base:
            continue
        window = np.asarray(mask[base:top], dtype=np.int64)
        cumulative = np.concatenate([[0], np.cumsum(window)])
        out[a : a + chunk] = cumulative[np.maximum(h - base, low - base)] - cumulative[low - base]
    return out


class Blocks:
    """Some blocks of one store: row i is the window (starts[i], lengths[i]).

    ``use_mask``: targets only where the store's mask is 1 (assistant tokens); otherwise
    every real token is a target. Padding (past a block's length) never is.
    """

    def __init__(
        self,
        store: Store,
        starts: np.ndarray,
        lengths: np.ndarray | None,
        targets: np.ndarray | None,
        block_size: int,
        use_mask: bool,
        origin: np.ndarray | None = None,
        teacher: TeacherWindows | None = None,
    ):
        self.store, self.block_size, self.use_mask = store, block_size, use_mask
        # A teacher with another tokenizer: its tokens of each block's text (``alignment.py``).
        self.teacher = teacher
        self.starts, self.lengths, self.targets = starts, lengths, targets
        self.full = lengths is None  # plain text: every block is block_size real tokens, all targets valid
        # Each row's number in the set it was taken from (a run's train or eval blocks): what a
        # batch reports as ``rows``, and what a teacher cache is indexed by.
        self.origin = np.arange(len(starts), dtype=np.int64) if origin is None else origin

    def __len__(self) -> int:
        return len(self.starts)

    def subset(self, rows) -> Blocks:
        rows = _as_index(rows, len(self))

        def pick(a):
            return None if a is None else a[rows]

        return Blocks(
            self.store,
            self.starts[rows],
            pick(self.lengths),
            pick(self.targets),
            self.block_size,
            self.use_mask,
            self.origin[rows],
            self.teacher.subset(rows) if self.teacher is not None else None,
        )

    def numbered(self) -> Blocks:
        """The same blocks as a set of their own: rows numbered 0 .. n-1."""
        return Blocks(
            self.store, self.starts, self.lengths, self.targets, self.block_size, self.use_mask, teacher=self.teacher
        )

    def shifted(self, offset: int) -> Blocks:
        """The same blocks, numbered from ``offset`` (their place in a mixture)."""
        return Blocks(
            self.store,
            self.starts,
            self.lengths,
            self.targets,
            self.block_size,
            self.use_mask,
            self.origin + offset,
            self.teacher,
        )

    @property
    def num_targets(self) -> int:
        return len(self) * (self.block_size - 1) if self.full else int(self.targets.sum())

    def ids(self, rows) -> torch.Tensor:
        """(len(rows), block_size) int64 token ids; padding is the store's pad id."""
        return self._read(_as_index(rows, len(self)))[0]

    def batch(self, rows) -> Batch:
        rows = _as_index(rows, len(self))
        ids, loss_mask = self._read(rows)
        batch = Batch.from_blocks(ids) if loss_mask is None else Batch.from_ids(ids, None, loss_mask)
        batch.rows = torch.from_numpy(self.origin[rows])
        lengths = np.full(len(rows), self.block_size) if self.full else self.lengths[rows]
        if self.store.text_bytes is not None:  # the text from each block's first token's end to its last's
            ends = self.store.text_bytes
            batch.target_bytes = int((ends[self.starts[rows] + lengths - 1] - ends[self.starts[rows]]).sum())
        if self.teacher is not None:
            batch.teacher_tokens = self.teacher.tokens(rows, self.store, self.starts[rows], lengths, self.block_size)
        return batch

    def _read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        size, tokens = self.block_size, self.store.tokens
        out = np.full((len(rows), size), self.store.manifest["pad_id"], dtype=np.int64)
        if self.full:
            for r, start in enumerate(self.starts[rows].tolist()):
                out[r] = tokens[start : start + size]
            return torch.from_numpy(out), None
        mask = np.zeros((len(rows), size), dtype=bool)
        for r, (start, length) in enumerate(zip(self.starts[rows].tolist(), self.lengths[rows].tolist())):
            out[r, :length] = tokens[start : start + length]
            mask[r, :length] = self.store.mask[start : start + length] if self.use_mask else True
        return torch.from_numpy(out), torch.from_numpy(mask)

    def digest(self) -> str:
        """A hash of which windows, in which order: the block layout a teacher cache must share (the
        student's side only: a cache built across tokenizers serves runs with no teacher tokens)."""
        h = hashlib.sha256(f"{self.store.fingerprint} {self.block_size}".encode())
        for array in (self.starts, self.lengths):
            if array is not None:
                h.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        h.update(b"mask" if self.use_mask else b"all")
        return "sha256:" + h.hexdigest()


class ConcatBlocks:
    """Several ``Blocks`` (one per source of a mixture) as one list of rows."""

    def __init__(self, parts: list[Blocks], number: bool = True):
        """``number``: the rows of the parts, one after another, become the set's row numbers."""
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.parts = [p.shifted(int(o)) for p, o in zip(parts, self.offsets)] if number else parts
        self.block_size = parts[0].block_size

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_targets(self) -> int:
        return sum(p.num_targets for p in self.parts)

    def _split(self, rows) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(part, positions in ``rows``, rows of the part) for every part the rows touch."""
        rows = _as_index(rows, len(self))
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        return [(p, np.nonzero(which == p)[0], rows[which == p] - self.offsets[p]) for p in np.unique(which)]

    def subset(self, rows) -> ConcatBlocks | Blocks:
        pieces = [self.parts[p].subset(local) for p, _, local in self._split(rows)]
        return pieces[0] if len(pieces) == 1 else ConcatBlocks(pieces, number=False)

    def ids(self, rows) -> torch.Tensor:
        return self.batch(rows).input_ids

    def batch(self, rows) -> Batch:
        rows = _as_index(rows, len(self))
        ids = torch.empty((len(rows), self.block_size), dtype=torch.int64)
        mask = torch.empty((len(rows), self.block_size), dtype=torch.bool)
        full = True
        numbers = torch.empty(len(rows), dtype=torch.int64)
        for p, positions, local in self._split(rows):
            part_ids, part_mask = self.parts[p]._read(local)
            numbers[positions] = torch.from_numpy(self.parts[p].origin[local])
            ids[positions] = part_ids
            mask[positions] = part_mask if part_mask is not None else True
            full &= part_mask is None
        batch = Batch.from_blocks(ids) if full else Batch.from_ids(ids, None, mask)
        batch.rows = numbers
        return batch

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256("".join(p.digest() for p in self.parts).encode()).hexdigest()


def _as_index(rows, n: int) -> np.ndarray:
    if isinstance(rows, slice):
        return np.arange(n, dtype=np.int64)[rows]
    if isinstance(rows, torch.Tensor):
        return rows.numpy().astype(np.int64, copy=False)
    return np.asarray(rows, dtype=np.int64)


def split_blocks(
    layout: Layout,
    store: Store,
    use_mask: bool,
    eval_fraction: float | None,
    split_seed: int,
    teacher_store: Store | None = None,
) -> tuple[Blocks, Blocks | None]:
    """(train, eval): whole blocks held out with ``split_seed`` (eval None when eval_fraction is None).
    ``teacher_store``: the same source in the teacher's tokenizer, when it differs (the blocks
    then carry the teacher's tokens of their text)."""
    teacher = None
    if teacher_store is not None:
        lengths = layout.lengths if layout.lengths is not None else np.full(len(layout.starts), layout.block_size)
        teacher = TeacherWindows.for_blocks(teacher_store, store, layout.starts, lengths)
    everything = Blocks(
        store, layout.starts, layout.lengths, layout.targets, layout.block_size, use_mask, teacher=teacher
    )
    if eval_fraction is None:
        return everything, None
    n = len(everything)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    num_eval = min(max(1, int(round(eval_fraction * n))), n - 1)
    train, held_out = (
        everything.subset(perm[num_eval:].sort().values),
        everything.subset(perm[:num_eval].sort().values),
    )
    return train.numbered(), held_out.numbered()  # each a set of its own, numbered from 0


# ---------------------------------------------------------------------------- samplers
class BlockSampler:
    """Micro-batches of block indices, reshuffled every epoch from ``seed``.

    A *global* micro-batch holds ``batch_size * world_size`` blocks; rank r takes its
    r-th slice. Micro-batch m of the run is a pure function of m, which is the whole
    data position saved in a checkpoint.
    """

    def __init__(
        self, num_blocks: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ):
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


class MixtureSampler:
    """Weighted sources, deterministically: every run of ``PERIOD`` consecutive block slots
    holds exactly ``quota[s]`` blocks of source s (the weights rounded to 1/PERIOD), in an
    order shuffled per period from ``seed``.

    Slot k of the run (global micro-batch m, rank r, position j: k = (m * world + r) * B + j)
    therefore has a closed form: its source, and how many blocks of that source came before
    it, hence which block (source s walks its own per-epoch permutations). Micro-batch m is
    a pure function of m, as with one source; resume stays exact.
    """

    PERIOD = 1000

    def __init__(
        self, sizes: list[int], weights: list[float], batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.offsets = np.cumsum([0] + self.sizes)
        self.quota = quotas(weights, self.PERIOD)
        self.num_blocks = int(sum(self.sizes))
        self.micro_batches_per_epoch = self.num_blocks // (batch_size * world_size)
        self._period: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def epoch_of(self, micro_batch: int) -> int:
        return micro_batch // self.micro_batches_per_epoch

    def _pattern(self, period: int) -> tuple[np.ndarray, np.ndarray]:
        """The period's source per slot, and per slot the count of each source before it in the period."""
        if self._period is None or self._period[0] != period:
            pattern = np.repeat(np.arange(len(self.quota)), self.quota)
            rng = np.random.Generator(np.random.PCG64([self.seed, period, 0x6D6978]))
            pattern = pattern[rng.permutation(len(pattern))]
            before = np.zeros((len(pattern) + 1, len(self.quota)), dtype=np.int64)
            before[1:] = np.cumsum(np.eye(len(self.quota), dtype=np.int64)[pattern], axis=0)
            self._period = (period, pattern, before)
        return self._period[1], self._period[2]

    def seen(self, slots: int) -> np.ndarray:
        """Blocks of each source among the run's first ``slots`` slots."""
        period, at = divmod(slots, self.PERIOD)
        return period * np.asarray(self.quota, dtype=np.int64) + self._pattern(period)[1][at]

    def _row(self, source: int, n: int) -> int:
        """The row (in the concatenated sources) of the n-th block taken from ``source``."""
        epoch, index = divmod(n, self.sizes[source])
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            rng = np.random.Generator(np.random.PCG64([self.seed, source, epoch]))
            self._perms[key] = rng.permutation(self.sizes[source])
        return int(self.offsets[source] + self._perms[key][index])

    def indices(self, micro_batch: int) -> torch.Tensor:
        first = (micro_batch * self.world_size + self.rank) * self.batch_size
        rows = []
        for k in range(first, first + self.batch_size):
            period, at = divmod(k, self.PERIOD)
            pattern, before = self._pattern(period)
            source = int(pattern[at])
            n = period * self.quota[source] + int(before[at][source])
            rows.append(self._row(source, n))
        return torch.tensor(rows, dtype=torch.int64)


def quotas(weights: list[float], period: int) -> list[int]:
    """Integer shares of ``period`` proportional to ``weights`` (largest remainders), each at least 1."""
    total = sum(weights)
    exact = [w / total * period for w in weights]
    quota = [max(1, int(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(quota) < period:
        quota[order[i % len(order)]] += 1
        i += 1
    while sum(quota) > period:
        j = max(range(len(quota)), key=lambda i: quota[i])
        quota[j] -= 1
    return quota
