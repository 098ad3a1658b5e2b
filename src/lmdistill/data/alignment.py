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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    t_ends, s_ends = token_ends(teacher_offsets), token_ends(student_offsets)
    # a boundary: an offset both sides end a token at, taken where each side last ends there
    # (tokens that cover nothing, or that share a split character, join the span before them)
    t_last = _last_index_of_each_end(t_ends)
    s_last = _last_index_of_each_end(s_ends)
    common = np.intersect1d(np.fromiter(t_last, np.int64), np.fromiter(s_last, np.int64))
    common = common[common > 0]
    t_end = np.asarray([t_last[c] + 1 for c in common], dtype=np.int64)
    s_end = np.asarray([s_last[c] + 1 for c in common], dtype=np.int64)
    t_start = np.concatenate([[0], t_end[:-1]]).astype(np.int64)
    s_start = np.concatenate([[0], s_end[:-1]]).astype(np.int64)
    return Alignment(t_start, t_end, s_start, s_end)


def _last_index_of_each_end(ends: np.ndarray) -> dict[int, int]:
    last: dict[int, int] = {}
    for i, end in enumerate(ends.tolist()):
        last[end] = i
    return last


# The markers tokenizers use for a leading space: byte-level BPE's and SentencePiece's.
_SPACE_MARKERS = ("\u0120", "\u2581")


def token_text(token: str) -> str:
    """A vocabulary entry as text, its leading-space marker read as a space."""
    for marker in _SPACE_MARKERS:
        token = token.replace(marker, " ")
    return token


def shared_vocabulary(teacher_tokenizer, student_tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(teacher ids, student ids) of the tokens both vocabularies have, in teacher id order."""
    student = {}
    for token, index in student_tokenizer.get_vocab().items():
        student.setdefault(token_text(token), index)
    pairs = sorted(
        (index, student[token_text(token)])
        for token, index in teacher_tokenizer.get_vocab().items()
        if token_text(token) in student
    )
    ids = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return ids[:, 0], ids[:, 1]
