"""Intermediate-layer (hidden-state) distillation.

Config section ``distill.hidden: {weight, loss: cosine | mse | nmse, layers: auto | [[s, t], ...]}``.
Layer indices are 0-based decoder-layer indices: layer ``i``'s output is
``outputs.hidden_states[i + 1]`` of a transformers causal LM called with
``output_hidden_states=True`` (``hidden_states[0]`` is the embedding output).

Layer map. ``layers: auto`` maps student layer ``i`` to the teacher layer it was copied
from when the student was pruned from the teacher (``sources``); otherwise it spreads the
student evenly over the teacher so that the last student layer meets the last teacher
layer::

    i -> round_half_up((i + 1) * T / S) - 1,   clamped at 0,

with S student and T teacher layers (2 of 4 -> 1, 3; 3 of 6 -> 1, 3, 5; equal depths ->
the identity). The rounding is done in integer arithmetic, half up, so it does not depend
on Python's round-half-to-even or on float error.

Loss. For each pair k the student's hidden state h_s (width H_s) is first projected to the
teacher's width by a learned ``W_k`` (H_t x H_s, no bias; only when H_s != H_t), then
compared with the teacher's h_t at every position that predicts a target:

    cosine: 1 - <W h_s, h_t> / (max(|W h_s|, eps) * max(|h_t|, eps)),   eps = 1e-8
    mse:    mean over the H_t hidden units of (W h_s - h_t)^2
    nmse:   that mean divided by the teacher's own mean square at the position, max(mean(h_t^2), eps)

The eps keeps a zero vector at 0/eps = 0 similarity (loss 1) instead of 0/0. ``nmse`` is mse
made scale-free position by position: real models carry a few huge activations (SmolLM2-135M's
first position reaches 22,552 in layers 2-11, against an RMS of 6-22 elsewhere), and plain mse is
then almost all about those few positions and thousands of times the size of the KD term. Each term is
a *sum* over valid positions divided once by the caller's global token count, as in
``dense.py``, so micro-batch losses add up to the batch mean; the pairs are then
averaged. Everything runs in fp32 (fp64 if the inputs are fp64), whatever the models'
dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lmdistill.core.errors import ConfigError
from lmdistill.loss.dense import IGNORE_INDEX, normaliser

HiddenLoss = Literal["cosine", "mse", "nmse"]
HIDDEN_LOSSES: tuple[str, ...] = ("cosine", "mse", "nmse")
COSINE_EPS = 1e-8
__all__ = ["COSINE_EPS", "HIDDEN_LOSSES", "HiddenProjection", "hidden_state_loss", "resolve_layer_map"]

_KEY = "distill.hidden.layers"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` on one line, cut to ``limit`` characters (reprs escape newlines)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _auto_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    pairs = []
    for i in range(student_layers):
        # round_half_up(x) - 1 with x = (i + 1) * T / S, i.e. floor((2 (i + 1) T + S) / 2S) - 1
        t = (2 * (i + 1) * teacher_layers + student_layers) // (2 * student_layers) - 1
        pairs.append((i, max(t, 0)))
    return pairs


def _sources_map(sources: Sequence[int], student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    if len(sources) != student_layers:
        raise ConfigError(
            f"{_KEY}: 'auto' got {len(sources)} source layers for a student with {student_layers} layers; "
            f"list the pairs explicitly, e.g. [[0, 0], [1, {teacher_layers - 1}]]"
        )
    for i, t in enumerate(sources):
        if not _is_int(t) or not 0 <= t < teacher_layers:
            raise ConfigError(
                f"{_KEY}: 'auto' got source layer {_short(t)} for student layer {i}, but the teacher has "
                f"{teacher_layers} layers (0..{teacher_layers - 1}); list the pairs explicitly instead"
            )
    return [(i, int(t)) for i, t in enumerate(sources)]


def resolve_layer_map(
    layers: Any,
    student_layers: int,
    teacher_layers: int,
    sources: list[int] | None = None,
) -> list[tuple[int, int]]:
    """The (student_layer, teacher_layer) pairs that ``distill.hidden.layers`` asks for.

    Args:
        layers: ``"auto"`` or a non-empty list of ``[student, teacher]`` pairs (lists or
            tuples of two ints), as read from the config.
        student_layers, teacher_layers: the models' decoder depths (``num_hidden_layers``).
        sources: for ``"auto"`` only: the teacher layer each student layer was copied from
            (a pruned student); ``len(sources) == student_layers``.

    Returns:
        The pairs as tuples, in the order given (``auto``: student layer order).

    Raises:
        ConfigError (an ``LmdistillError``) with one line naming ``distill.hidden.layers``.
    """
    if not _is_int(student_layers) or not _is_int(teacher_layers) or student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be ints >= 1, got student={student_layers!r}, teacher={teacher_layers!r}")
    s_range = f"the student has {student_layers} layers: 0..{student_layers - 1}"
    t_range = f"the teacher has {teacher_layers} layers: 0..{teacher_layers - 1}"
    example = f"[[0, 0], [{student_layers - 1}, {teacher_layers - 1}]]"

    if isinstance(layers, str):
        if layers == "auto":
            if sources is not None:
                return _sources_map(sources, student_layers, teacher_layers)
            return _auto_map(student_layers, teacher_layers)
        raise ConfigError(
            f"{_KEY} = {_short(layers)} is not allowed: use 'auto' or a list of "
            f"[student_layer, teacher_layer] pairs, e.g. {example}"
        )
    if not isinstance(layers, list):
        raise ConfigError(
            f"{_KEY} = {_short(layers)} is not allowed: use 'auto' or a list of "
            f"[student_layer, teacher_layer] pairs, e.g. {example}"
        )
    if not layers:
        raise ConfigError(
            f"{_KEY} is an empty list: give at least one [student_layer, teacher_layer] pair, "
            f"e.g. {example}, or use 'auto'"
        )

    pairs: list[tuple[int, int]] = []
    seen: dict[int, int] = {}
    for item in layers:
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not all(_is_int(x) for x in item):
            raise ConfigError(
                f"{_KEY}: entry {_short(item)} is not a [student_layer, teacher_layer] pair of integers; "
                f"write e.g. [{student_layers - 1}, {teacher_layers - 1}] or use 'auto'"
            )
        s, t = int(item[0]), int(item[1])
        if not 0 <= s < student_layers:
            raise ConfigError(
                f"{_KEY}: student layer {s} in {_short(item)} is out of range ({s_range}); "
                f"use indices 0..{student_layers - 1} or 'auto'"
            )
        if not 0 <= t < teacher_layers:
            raise ConfigError(
                f"{_KEY}: teacher layer {t} in {_short(item)} is out of range ({t_range}); "
                f"use indices 0..{teacher_layers - 1} or 'auto'"
            )
        if s in seen:
            raise ConfigError(
                f"{_KEY}: student layer {s} is listed twice ([{s}, {pairs[seen[s]][1]}] and "
                f"{_short(item)}); keep one pair per student layer"
            )
        seen[s] = len(pairs)
        pairs.append((s, t))
    return pairs


class HiddenProjection(torch.nn.Module):
    """Maps student hidden states to the teacher's width, one map per layer pair.

    With equal widths there is nothing to learn and ``forward`` is the identity. Otherwise
    pair k gets ``Linear(student_width, teacher_width, bias=False)`` with torch's default
    initialisation, drawn in pair order from torch's global RNG (seed it first for
    reproducible weights). Its parameters must go to the optimiser with the student's.
    """

    def __init__(self, pairs: Sequence[tuple[int, int]], student_width: int, teacher_width: int) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("HiddenProjection needs at least one layer pair")
        if student_width < 1 or teacher_width < 1:
            raise ValueError(f"hidden widths must be >= 1, got student={student_width}, teacher={teacher_width}")
        self.pairs: tuple[tuple[int, int], ...] = tuple((int(s), int(t)) for s, t in pairs)
        self.student_width = int(student_width)
        self.teacher_width = int(teacher_width)
        self.maps: torch.nn.ModuleList | None = None
        if self.student_width != self.teacher_width:
            self.maps = torch.nn.ModuleList(
                torch.nn.Linear(self.student_width, self.teacher_width, bias=False) for _ in self.pairs
            )

    @torch.no_grad()
    def start_from_channels(self, channels: Sequence[int]) -> None:
        """Start every map as the inverse of width pruning: student channel j goes back to
        teacher channel ``channels[j]``, the one it was cut from (zeros elsewhere), so that a
        pruned student's hidden states already point the teacher's way at step 0."""
        if self.maps is None:
            return
        if len(channels) != self.student_width:
            raise ValueError(f"{len(channels)} channels for a student width of {self.student_width}")
        for linear in self.maps:
            linear.weight.zero_()
            linear.weight[torch.as_tensor(list(channels)), torch.arange(self.student_width)] = 1.0

    @property
    def trainable(self) -> bool:
        """True when there are projection weights to train (the widths differ)."""
        return self.maps is not None

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Pair ``index``'s projection of ``hidden`` (..., H_s) -> (..., H_t), in ``hidden``'s dtype."""
        if not 0 <= index < len(self.pairs):
            raise ValueError(f"pair index {index} out of range for {len(self.pairs)} pairs")
        if self.maps is None:
            return hidden
        weight = self.maps[index].weight
        return F.linear(hidden, weight.to(hidden.dtype))


def hidden_state_loss(
    student_hidden: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    projection: HiddenProjection,
    kind: str,
    targets: torch.Tensor,
    num_tokens: float,
    all_valid: bool = False,
    forward=None,
) -> torch.Tensor:
    """Hidden-state distillation loss, averaged over the layer pairs.

    Args:
        student_hidden: per pair, (B, P, H_s) student hidden states at the P positions that
            predict a target (already shifted like the logits).
        teacher_hidden: per pair, (B, P, H_t) teacher hidden states; treated as constants.
        projection: the pairs and their student -> teacher width maps.
        kind: ``"cosine"``, ``"mse"`` or ``"nmse"`` (see the module docstring).
        targets: (B, P) int64; ``IGNORE_INDEX`` (-100) marks positions without a target.
        num_tokens: the normaliser: the global count of valid targets across micro-batches
            and ranks (values below 1 count as 1, so a batch with no target gives 0).
        all_valid: the caller knows no target is -100; skips the mask and its device sync.
        forward: the projection as the training step calls it (wrapped for data-parallel
            gradient synchronisation); default: ``projection`` itself.

    Returns:
        0-d fp32 tensor (fp64 for fp64 inputs) with gradient to ``student_hidden`` and the
        projection weights: sum over valid positions / num_tokens, averaged over pairs.
    """
    if kind not in HIDDEN_LOSSES:
        raise ConfigError(f"distill.hidden.loss = {_short(kind)} is not allowed: choose cosine, mse or nmse")
    n_pairs = len(projection.pairs)
    if len(student_hidden) != n_pairs or len(teacher_hidden) != n_pairs:
        raise ValueError(
            f"expected {n_pairs} student and teacher hidden states (one per pair), "
            f"got {len(student_hidden)} and {len(teacher_hidden)}"
        )
    for k, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden)):
        if hs.shape[:-1] != targets.shape or ht.shape[:-1] != targets.shape:
            raise ValueError(
                f"pair {k}: hidden states {tuple(hs.shape)} / {tuple(ht.shape)} do not match "
                f"targets {tuple(targets.shape)} in their leading dimensions"
            )
        if hs.shape[-1] != projection.student_width or ht.shape[-1] != projection.teacher_width:
            raise ValueError(
                f"pair {k}: hidden widths {hs.shape[-1]} / {ht.shape[-1]} differ from the projection's "
                f"{projection.student_width} / {projection.teacher_width}"
            )

    wide = any(h.dtype == torch.float64 for h in (*student_hidden, *teacher_hidden))
    dtype = torch.float64 if wide else torch.float32
    valid = None if all_valid else targets.reshape(-1) != IGNORE_INDEX
    denom = normaliser(num_tokens, 0)

    total: torch.Tensor | None = None
    for k, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden)):
        s = hs.reshape(-1, hs.shape[-1])
        t = ht.detach().reshape(-1, ht.shape[-1])
        if valid is not None:
            # Only rows with a target are computed: padding rows cannot leak NaN or gradient.
            s, t = s[valid], t[valid]
        s = (forward or projection)(k, s.to(dtype))
        t = t.to(dtype)
        if kind == "cosine":
            per_position = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=COSINE_EPS)
        else:
            per_position = (s - t).pow(2).mean(dim=-1)
            if kind == "nmse":
                per_position = per_position / t.pow(2).mean(dim=-1).clamp_min(COSINE_EPS)
        term = per_position.sum()
        total = term if total is None else total + term
    assert total is not None  # HiddenProjection has at least one pair
    return total / (denom * n_pairs)


def build_projection(cfg, models) -> HiddenProjection | None:
    """The projection of the hidden-state term (``distill.hidden``, config ``cfg``) between the
    two models, with its layer pairs; None when the term is off. A pruned student's maps start
    as the inverse of its width pruning."""
    if cfg.weight <= 0:
        return None
    student, teacher = models.student, models.teacher
    if teacher is None:
        raise ConfigError(
            "distill.hidden.weight > 0 needs a teacher to compare hidden states with; set "
            "model.teacher, or distill.hidden.weight: 0"
        )
    pairs = resolve_layer_map(
        cfg.layers, student.config.num_hidden_layers, teacher.config.num_hidden_layers, models.student_layers
    )
    projection = HiddenProjection(pairs, student.config.hidden_size, teacher.config.hidden_size)
    if models.student_channels is not None:
        projection.start_from_channels(models.student_channels)
    return projection
