"""Teacher views: what a teacher signal hands the objective for one micro-batch, and how logits are read.

What the view holds decides how the student's side of the loss is computed:

  TeacherLogits   the teacher's logits (B, L-1, V): the student's logits are formed too and
                  compared with them (``loss.impl: full``).
  TeacherHidden   the teacher's final hidden states and its lm_head: the student's hidden
                  states go with them into the chunked loss, which never holds a
                  (tokens x vocab) tensor for the whole batch (``chunked``).
  TeacherSparse   sparse targets from an offline cache (sampled tokens or top-k).

Every view carries ``nonfinite``: a 0-d flag, 1.0 when the teacher produced NaN or +Inf.
It is a tensor so that the check costs no device sync; the trainer reduces it with the
other step statistics. -Inf is a legitimate (masked) logit and is not flagged.

The views belong to the loss (it says what it consumes); the signals that produce them are
in ``lmdistill.teacher``.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch

from lmdistill.core.batch import Batch


@dataclass
class TeacherLogits:
    """The teacher's logits at every position that predicts a target: (B, L-1, V), detached.
    ``layers``: the outputs (B, L-1, H) of the teacher layers the hidden-state term asked for."""

    logits: torch.Tensor
    nonfinite: torch.Tensor
    layers: list[torch.Tensor] = field(default_factory=list)


@dataclass
class TeacherHidden:
    """The teacher's final hidden states (B, L-1, H) and its output layer, detached."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    nonfinite: torch.Tensor
    layers: list[torch.Tensor] = field(default_factory=list)


@dataclass
class TeacherSparse:
    """Sparse teacher targets for every predicting position, flattened to (B * (L-1), slots)
    (``sparse.SparseTargets``), from an offline cache."""

    targets: object
    nonfinite: torch.Tensor
    layers: list[torch.Tensor] = field(default_factory=list)


TeacherView = TeacherLogits | TeacherHidden | TeacherSparse


def predicting_positions(model: torch.nn.Module, batch: Batch) -> dict:
    """Forward kwargs that make ``model`` form logits only at positions 0 .. L-2, the ones with a
    next token: the last position's logits (and a copy of the whole output to slice them off,
    forward and backward) are never made. Empty for a model without ``logits_to_keep``."""
    if not _accepts_logits_to_keep(type(model)):
        return {}
    return {"logits_to_keep": torch.arange(batch.input_ids.shape[1] - 1, device=batch.input_ids.device)}


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def prediction_logits(
    model: torch.nn.Module, batch: Batch, vocab_size: int, forward=None, trim: bool = True, hidden_states: bool = False
):
    """(B, L-1, vocab_size) logits of the positions that predict a target (through ``forward``, the
    possibly wrapped model, when given). ``trim=False`` forms all L positions' logits and slices.
    With ``hidden_states``: ``(logits, outputs.hidden_states)``."""
    kwargs = predicting_positions(model, batch) if trim else {}
    if hidden_states:
        kwargs["output_hidden_states"] = True
    out = (forward or model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kwargs)
    logits = out.logits if "logits_to_keep" in kwargs else out.logits[:, :-1]
    logits = logits[..., :vocab_size]
    return (logits, out.hidden_states) if hidden_states else logits


def layer_outputs(hidden_states, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """The outputs of decoder ``layers`` (0-based) at the positions that predict a target."""
    return [hidden_states[i + 1][:, :-1] for i in layers]
