"""Two tokenizations of one text, aligned by the characters their tokens cover.

The ground of cross-tokenizer distillation: teacher and student each tokenize the same text,
and a teacher prediction can be compared with a student prediction only where both are about
to write the same characters. A *boundary* is a character offset where a token ends in both
tokenizations; the text between two consecutive boundaries is a *span*, covered by one or more
teacher tokens and one or more student tokens. At the start of every span both models predict
the next token from the same text before it: that pair of positions is where the
cross-tokenizer loss compares them (``loss/crosstok.py``). With one tokenizer on both sides
every token is its own span, and the pairs are the positions themselves.

``shared_vocabulary`` pairs the tokens the two vocabularies both have: the same text, with
the byte-level and SentencePiece markers of a leading space read as a space.
``vocabulary_map`` carries every teacher token to the student token the same text begins with:
what the loss moves the teacher's probabilities along (``loss/crosstok.py``).

In a run, the text is the source's, tokenized once by each tokenizer into a data store that
records where every token ends (``bytes.bin``, in UTF-8 bytes). The student's blocks are
cut from its own store; ``teacher_windows`` finds, for each, the teacher tokens that cover the
same bytes, and ``pair_positions`` aligns the two inside a block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from lmdistill.core.batch import Batch, TeacherTokens


@dataclass(frozen=True)
class Alignment:
    """Spans of a text covered by whole tokens on both sides: span k is teacher tokens
    ``teacher_start[k]:teacher_end[k]`` and student tokens ``student_start[k]:student_end[k]``."""

    teacher_start: np.ndarray
    teacher_end: np.ndarray
    student_start: np.ndarray
    student_end: np.ndarray

    def __len__(self) -> int:
        return len(self.teacher_start)

    @property
    def one_to_one(self) -> np.ndarray:
        """Spans of one token on each side."""
        return (self.teacher_end - self.teacher_start == 1) & (self.student_end - self.student_start == 1)


def prediction_pairs(spans: Alignment) -> tuple[np.ndarray, np.ndarray]:
    """(teacher positions, student positions) whose next-token predictions meet: the position just
    before each span's first token on both sides (the first span has none before it)."""
    later = slice(1, None)
    return spans.teacher_start[later] - 1, spans.student_start[later] - 1


def token_ends(offsets) -> np.ndarray:
    """The character offset where each token ends, never going backwards (byte-level tokens that
    split one character share its offsets; special tokens cover no characters)."""
    ends = np.asarray([end for _, end in offsets], dtype=np.int64)
    return np.maximum.accumulate(ends) if len(ends) else ends


def align(teacher_offsets, student_offsets) -> Alignment:
    """The spans of two tokenizations of one text, from each token's (start, end) characters
    (a fast tokenizer's ``return_offsets_mapping``)."""
    return align_ends(token_ends(teacher_offsets), token_ends(student_offsets))


def align_ends(t_ends: np.ndarray, s_ends: np.ndarray) -> Alignment:
    """The spans of two tokenizations of one text, from where each token ends (non-decreasing
    offsets from the text's start).

    Several tokens can end at one offset (the pieces of a character split in two, a token that
    covers nothing): the last token ending there on one side meets the last on the other, the
    one before it the one before, and so on; the tokens one side has more of join the span
    before. So one tokenizer on both sides makes every token its own span, whatever the text."""
    t_key, s_key = _boundary_keys(t_ends), _boundary_keys(s_ends)
    _, t_last, s_last = np.intersect1d(t_key, s_key, assume_unique=True, return_indices=True)
    t_end, s_end = (t_last + 1).astype(np.int64), (s_last + 1).astype(np.int64)
    t_start = np.concatenate([[0], t_end[:-1]]).astype(np.int64)
    s_start = np.concatenate([[0], s_end[:-1]]).astype(np.int64)
    return Alignment(t_start, t_end, s_start, s_end)


_TIES = 1 << 16  # more tokens than this ending at one offset do not occur


def _boundary_keys(ends: np.ndarray) -> np.ndarray:
    """One key per token, ordered as the tokens are: its end, and how many tokens after it end
    there too (counted down, so the last of them has the largest key at that end)."""
    ends = np.asarray(ends, dtype=np.int64)
    later = np.searchsorted(ends, ends, "right") - 1 - np.arange(len(ends))
    return ends * _TIES + (_TIES - 1 - later)


# The markers tokenizers use for a leading space: byte-level BPE's and SentencePiece's.
_SPACE_MARKERS = ("\u0120", "\u2581")


def token_text(token: str) -> str:
    """A vocabulary entry as text, its leading-space marker read as a space."""
    for marker in _SPACE_MARKERS:
        token = token.replace(marker, " ")
    return token


def shared_vocabulary(teacher_tokenizer, student_tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(teacher ids, student ids) of the tokens both vocabularies have, in teacher id order."""
    student = _ids_by_text(student_tokenizer)
    pairs = sorted(
        (index, student[token_text(token)])
        for token, index in teacher_tokenizer.get_vocab().items()
        if token_text(token) in student
    )
    ids = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return ids[:, 0], ids[:, 1]


def _ids_by_text(tokenizer) -> dict[str, int]:
    ids: dict[str, int] = {}
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        ids.setdefault(token_text(token), index)
    return ids


def _token_texts(tokenizer) -> list[tuple[int, str]]:
    """(id, text) of every token but the special ones whose text is whole characters: the text
    the token writes, its leading-space marker read as a space."""
    specials = set(tokenizer.all_special_ids)
    out = []
    for token, index in tokenizer.get_vocab().items():
        if index >= len(tokenizer) or index in specials:
            continue
        text = tokenizer.convert_tokens_to_string([token])
        if token[:1] in _SPACE_MARKERS and not text.startswith(" "):  # (SentencePiece drops it)
            text = " " + text
        if text and "\ufffd" not in text:
            out.append((index, text))
    return out


def written_by_student(teacher_tokenizer, student_tokenizer) -> dict[int, list[int]]:
    """For every teacher token whose text is whole characters (``_token_texts``), the student
    tokens its text is written in, in the middle of a text (``written_mid_text``): one pass of the
    student's tokenizer over the teacher's vocabulary, which ``vocabulary_map`` and
    ``ContinuationTargets`` both read."""
    texts = _token_texts(teacher_tokenizer)
    if not texts:
        return {}
    pieces = written_mid_text(student_tokenizer, [t for _, t in texts])
    return {index: written for (index, _), written in zip(texts, pieces)}


_CONTEXTS = ("\n", "x")  # what a piece is written after (their own tokens are dropped), in turn


def written_mid_text(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's tokens as ``tokenizer`` writes it where it follows other text. Written alone, a
    text is the start of a document: a SentencePiece-style tokenizer (a Metaspace pre-tokenizer
    that prepends its space marker, or a normalizer that prepends "▁") writes " the" there as
    "▁" + "▁the", and "ing" as "▁ing", though in the middle of a text they are "▁the" and "ing".
    So each text is written after a context and the context's own tokens are dropped. Where the
    text's first token merges with the context's (a newline after a newline, a letter after
    "x"), the next context is tried; where every one merges, the text is written alone."""
    out: list[list[int] | None] = [None] * len(texts)
    for context_text in _CONTEXTS:
        todo = [i for i, written in enumerate(out) if written is None]
        if not todo:
            break
        context = tokenizer(context_text, add_special_tokens=False)["input_ids"]
        if not context:  # (a normalizer that strips it: nothing to tell the text's tokens by)
            continue
        after = tokenizer([context_text + texts[i] for i in todo], add_special_tokens=False)["input_ids"]
        n = len(context)
        for i, ids in zip(todo, after):
            if len(ids) > n and ids[:n] == context:
                out[i] = ids[n:]
    todo = [i for i, written in enumerate(out) if written is None]
    for i, ids in zip(todo, tokenizer([texts[i] for i in todo], add_special_tokens=False)["input_ids"] if todo else []):
        out[i] = ids
    return out


def vocabulary_map(teacher_tokenizer, student_tokenizer, written: dict[int, list[int]] | None = None) -> np.ndarray:
    """For every teacher id, the student token that the same text begins with (-1: none).

    A teacher token the student's vocabulary also has maps to it; the teacher's EOS maps to the
    student's. Any other token's text is tokenized by the student's tokenizer and maps to the first
    token of that: the student's way of starting to write it (a teacher token " collection"
    whose text the student writes " co" + "ll" + "ection" maps to " co"). A byte-level piece of a
    character maps to the student's longest token it begins with. The teacher's other special
    tokens map to nothing (-1). ``written``: ``written_by_student`` of the two, when made already."""
    student = _ids_by_text(student_tokenizer)
    pieces = _BytePieces(student_tokenizer.get_vocab(), student)
    out = np.full(len(teacher_tokenizer), -1, dtype=np.int64)
    specials = set(teacher_tokenizer.all_special_ids)
    for token, index in teacher_tokenizer.get_vocab().items():
        if index >= len(out) or index in specials:
            continue
        if (text := token_text(token)) in student:
            out[index] = student[text]
        else:  # a piece of a character, unless its text is whole (below)
            out[index] = pieces.first(token)
    if written is None:
        written = written_by_student(teacher_tokenizer, student_tokenizer)
    for index, ids in written.items():
        if token_text(teacher_tokenizer.convert_ids_to_tokens(index)) not in student:
            out[index] = ids[0] if ids else -1
    if teacher_tokenizer.eos_token_id is not None and student_tokenizer.eos_token_id is not None:
        out[teacher_tokenizer.eos_token_id] = student_tokenizer.eos_token_id
    return out


class _BytePieces:
    """The student token that a teacher token which is not whole characters begins with.

    Two tokenizer families write such pieces: byte-level BPE (GPT-2's alphabet, one character
    for each byte: "Ã" is the byte 0xC3) and SentencePiece's byte fallback ("<0xC3>"). A piece
    maps to the student's longest token it begins with where the student is byte-level too (the
    same alphabet), else through its first byte: an ASCII byte is a whole character (the
    student's token for it), any other byte goes to the student's byte token of it ("<0xC3>",
    or a byte-level student's "Ã"). -1 where the student has none."""

    _BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, raw: dict[str, int], by_text: dict[str, int]):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.raw, self.by_text = raw, by_text
        self.char_of = bytes_to_unicode()  # byte -> GPT-2's character for it
        self.byte_of = {char: byte for byte, char in self.char_of.items()}
        # (a large SentencePiece vocabulary may hold all 256 characters too; its byte tokens tell it apart)
        self.byte_level = all(char in raw for char in self.char_of.values()) and "<0x41>" not in raw

    def first(self, token: str) -> int:
        if (match := self._BYTE_TOKEN.fullmatch(token)) is not None:
            value = int(match.group(1), 16)
        elif token and all(char in self.byte_of for char in token):
            value = self.byte_of[token[0]]
            if self.byte_level:
                prefix = next((token[:k] for k in range(len(token), 0, -1) if token[:k] in self.raw), None)
                return self.raw[prefix] if prefix is not None else -1
        else:
            return -1
        if self.byte_level:
            return self.raw.get(self.char_of[value], -1)
        if value < 0x80 and chr(value) in self.by_text:
            return self.by_text[chr(value)]
        return self.raw.get(f"<0x{value:02X}>", -1)


# ---------------------------------------------------------------------------- two stores in step
def teacher_windows(
    s_ends: np.ndarray, starts: np.ndarray, lengths: np.ndarray, t_ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of the teacher tokens that cover the text of each student block.

    ``s_ends`` and ``t_ends`` are where each token of the two stores ends (``bytes.bin``); a
    student block of ``lengths[i]`` tokens from ``starts[i]`` covers the bytes after the token
    before it (``lo``) up to its last token's end (``hi``). The teacher's window is its tokens
    inside that stretch: a token that crosses an edge is left out. Tokens of no width (the
    second piece of a character split in two) sit on an edge: the window takes as many of them
    at each edge as the student block does, so that with one tokenizer the window is the block.
    """
    starts = np.asarray(starts, dtype=np.int64)
    last = starts + np.asarray(lengths, dtype=np.int64) - 1
    lo = np.where(starts > 0, s_ends[np.maximum(starts - 1, 0)], 0)
    hi = s_ends[last]
    # at lo: the first teacher token ending there has width (it is before the block), the others
    # ending there have none; with no token ending there, the one ending after lo crosses it
    first, right = np.searchsorted(t_ends, lo, "left"), np.searchsorted(t_ends, lo, "right")
    no_width_inside = np.searchsorted(s_ends, lo, "right") - starts  # the block's tokens that end at lo
    t_start = np.where(right > first, right - np.minimum(no_width_inside, right - first - 1), first + 1)
    t_start = np.where(lo == 0, 0, t_start)  # the store's first token starts at its first byte
    # at hi: the block's last token ends there, with the block's tokens of no width before it
    first, right = np.searchsorted(t_ends, hi, "left"), np.searchsorted(t_ends, hi, "right")
    ending_at_hi = last + 1 - np.searchsorted(s_ends, hi, "left")
    t_stop = first + np.minimum(ending_at_hi, right - first)
    return t_start, np.maximum(t_stop - t_start, 0)


def pair_positions(
    s_ends: np.ndarray, t_ends: np.ndarray, base: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(teacher positions, student positions, continuations, longer) in one block whose student
    and teacher tokens end at ``s_ends`` and ``t_ends`` (absolute offsets; ``base`` is where the
    block's text starts). The first two are the pairs whose predictions meet.

    A continuation is a student position inside a span that the teacher writes in one token and
    the student in several: (its student position, the pair at the span's start, how many of the
    span's student tokens it has read); ``ContinuationTargets`` gives the teacher's prediction
    there. ``longer`` is the other way round: a pair whose span the student writes in one token
    and the teacher in several ("123" against "1", "2", "3"): (the pair, the teacher's tokens in
    the span). There the teacher's probability of the student's token is that of the span's
    text, the product of its probabilities of its own tokens in it (``loss/crosstok.py``)."""
    empty = np.zeros(0, dtype=np.int64)
    if len(s_ends) < 2 or len(t_ends) < 2:
        return empty, empty, empty.reshape(0, 3), empty.reshape(0, 2)
    spans = align_ends(np.asarray(t_ends) - base, np.asarray(s_ends) - base)
    t_pos, s_pos = prediction_pairs(spans)
    later = slice(1, None)  # spans with a pair at their start
    teacher_pieces = spans.teacher_end[later] - spans.teacher_start[later]
    pieces = spans.student_end[later] - spans.student_start[later]
    rows = [
        (spans.student_start[k + 1] + read - 1, k, read)
        for k in np.nonzero((teacher_pieces == 1) & (pieces > 1))[0].tolist()
        for read in range(1, int(pieces[k]))
    ]
    longer = np.nonzero((pieces == 1) & (teacher_pieces > 1))[0]
    return (
        t_pos,
        s_pos,
        np.asarray(rows, dtype=np.int64).reshape(-1, 3),
        np.stack([longer, teacher_pieces[longer]], axis=1).astype(np.int64).reshape(-1, 2),
    )


class ContinuationTargets:
    """The teacher's prediction for student positions inside a span it writes in one token
    (``pair_positions``'s continuations).

    Every teacher token's text is written by the student's tokenizer as a few of its own tokens
    (" collection" as " co", "ll", "ection"). At a continuation the student has read the first
    tokens of the span (" co"); the teacher's next-token distribution at the span's pair,
    narrowed to the teacher tokens the student writes beginning with exactly those tokens and
    renormalised, is carried to the student token that comes next in each ("ll" for
    " collection"): what the teacher expects the student to write next. A table from each
    student-token prefix to (teacher ids, next student ids) is built once (from ``written``,
    ``written_by_student`` of the two, when made already)."""

    def __init__(self, teacher_tokenizer, student_tokenizer, k: int = 64, written: dict | None = None):
        self.k = k
        if written is None:
            written = written_by_student(teacher_tokenizer, student_tokenizer)
        table: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
        for teacher_id, pieces in written.items():
            for read in range(1, len(pieces)):
                teachers, following = table.setdefault(tuple(pieces[:read]), ([], []))
                teachers.append(teacher_id)
                following.append(pieces[read])
        self.table = {key: (np.asarray(t), np.asarray(f)) for key, (t, f) in table.items()}

    def targets(self, teacher_logits, pair_of, read_ids: list[list[int]]):
        """(rows, ids, weights): for each continuation that has a target, its index, and the
        student ids and probabilities of that target ((C, k), padded with weight 0).
        ``teacher_logits`` (K, Vt) at the pairs; ``pair_of`` (C,) each continuation's pair;
        ``read_ids`` the student tokens each has read since the span's start."""
        found = [
            (c, pair, self.table.get(tuple(read))) for c, (pair, read) in enumerate(zip(pair_of.tolist(), read_ids))
        ]
        found = [(c, pair, entry) for c, pair, entry in found if entry is not None]
        rows, out_ids, out_weights = [], [], []
        if found:  # one gather of the candidates' probabilities, on the logits' device
            pairs = torch.as_tensor(np.concatenate([np.full(len(e[0]), pair) for _, pair, e in found]))
            teachers = torch.as_tensor(np.concatenate([e[0] for _, _, e in found]))
            device = teacher_logits.device
            log_z = torch.logsumexp(teacher_logits.float(), dim=-1)
            picked = teacher_logits[pairs.to(device), teachers.to(device)].float() - log_z[pairs.to(device)]
            candidates = np.split(picked.exp().cpu().numpy(), np.cumsum([len(e[0]) for _, _, e in found])[:-1])
        for (c, _, entry), probs in zip(found, candidates if found else []):
            following, where = np.unique(entry[1], return_inverse=True)
            weights = np.bincount(where, weights=probs, minlength=len(following))
            if weights.sum() <= 0:
                continue
            keep = np.argsort(-weights)[: self.k]
            padded_ids, padded_w = np.zeros(self.k, np.int64), np.zeros(self.k, np.float32)
            padded_ids[: len(keep)], padded_w[: len(keep)] = following[keep], weights[keep] / weights[keep].sum()
            rows.append(c)
            out_ids.append(padded_ids)
            out_weights.append(padded_w)
        as_ids = np.asarray(out_ids, dtype=np.int64).reshape(-1, self.k)
        return np.asarray(rows, dtype=np.int64), as_ids, np.asarray(out_weights, dtype=np.float32).reshape(-1, self.k)


class TeacherWindows:
    """The teacher's side of a set of student blocks: a store of the same source tokenized by
    the teacher's tokenizer, and for each block row the window of its tokens that covers the
    block's text (``teacher_windows``). ``Blocks`` carries one and hands its rows' tokens, and
    the pairs of positions that meet, to each batch (``Batch.teacher_tokens``)."""

    def __init__(self, store, starts: np.ndarray, lengths: np.ndarray):
        self.store, self.starts, self.lengths = store, starts, lengths

    @classmethod
    def for_blocks(cls, teacher_store, student_store, starts: np.ndarray, lengths: np.ndarray) -> TeacherWindows:
        t_start, t_length = teacher_windows(student_store.text_bytes, starts, lengths, teacher_store.text_bytes)
        return cls(teacher_store, t_start, t_length)

    def subset(self, rows: np.ndarray) -> TeacherWindows:
        return TeacherWindows(self.store, self.starts[rows], self.lengths[rows])

    @property
    def longest(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def tokens(self, rows: np.ndarray, student_store, s_starts: np.ndarray, s_lengths: np.ndarray, width: int):
        """The ``TeacherTokens`` of block ``rows`` whose student tokens start at ``s_starts`` (with
        ``s_lengths``) in ``student_store``, in a student batch ``width`` tokens wide."""
        t_starts, t_lengths = self.starts[rows], self.lengths[rows]
        t_width = max(2, int(t_lengths.max()) if len(rows) else 2)
        ids = np.full((len(rows), t_width), self.store.manifest["pad_id"], dtype=np.int64)
        real = np.zeros((len(rows), t_width), dtype=bool)
        t_pos, s_pos, cont, longer, t_bytes = [], [], [], [], 0
        pairs_before = 0
        s_all, t_all = student_store.text_bytes, self.store.text_bytes
        for r, (s0, n, t0, m) in enumerate(
            zip(s_starts.tolist(), s_lengths.tolist(), t_starts.tolist(), t_lengths.tolist())
        ):
            ids[r, :m] = self.store.tokens[t0 : t0 + m]
            real[r, :m] = True
            s_ends, t_ends = np.asarray(s_all[s0 : s0 + n]), np.asarray(t_all[t0 : t0 + m])
            teacher_at, student_at, inside, wide = pair_positions(s_ends, t_ends, int(s_all[s0 - 1]) if s0 > 0 else 0)
            t_pos.append(teacher_at + r * (t_width - 1))
            s_pos.append(student_at + r * (width - 1))
            cont.append(inside + np.asarray([r * (width - 1), pairs_before, 0]))
            longer.append(wide + np.asarray([pairs_before, 0]))
            pairs_before += len(teacher_at)
            t_bytes += int(t_ends[-1] - t_ends[0]) if m > 1 else 0
        ids_t = torch.from_numpy(ids)
        batch = (
            Batch.from_blocks(ids_t) if real.all() else Batch.from_ids(ids_t, torch.from_numpy(real.astype(np.int64)))
        )
        return TeacherTokens(
            batch,
            torch.from_numpy(np.concatenate(t_pos) if t_pos else np.zeros(0, np.int64)),
            torch.from_numpy(np.concatenate(s_pos) if s_pos else np.zeros(0, np.int64)),
            t_bytes,
            torch.from_numpy(np.concatenate(cont) if cont else np.zeros((0, 3), np.int64)),
            torch.from_numpy(np.concatenate(longer) if longer else np.zeros((0, 2), np.int64)),
        )
