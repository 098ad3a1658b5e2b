"""Teacher views: what a teacher signal hands the objective for one micro-batch, and how logits are read.

What the view holds decides how the student's side of the loss is computed:

  TeacherLogits   the teacher's logits (B, L-1, V): the student's logits are formed too and
                  compared with them (``loss.impl: full``).
  TeacherHidden   the teacher's final hidden states and its lm_head: the student's hidden
                  states go with them into the chunked loss, which never holds a
                  (tokens x vocab) tensor for the whole batch (``chunked``).
  TeacherSparse   sparse targets from an offline cache (sampled tokens or top-k).
  TeacherAligned  a teacher with another tokenizer: its logits at the positions where it and
                  the student are about to write the same text (``crosstok.py``);
                  ``TeacherAlignedHidden``, its hidden states there, for the chunked path.

Every view carries ``nonfinite``: a 0-d flag, 1.0 when the teacher produced NaN or +Inf.
It is a tensor so that the check costs no device sync; the trainer reduces it with the
other step statistics. -Inf is a legitimate (masked) logit and is not flagged.

The views belong to the loss (it says what it consumes); the signals that produce them are
in ``lmdistill.teacher``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmdistill.core.batch import IGNORE_INDEX, Batch
from lmdistill.loss.crosstok import cross_tokenizer_divergence
from lmdistill.loss.dense import head_logits, token_divergence
from lmdistill.loss.sparse import sparse_kd_sum


def _dense_diagnostics(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> dict:
    # The expected acceptance of speculative sampling with the student as the draft q and the
    # teacher as the target p, per position: sum over the vocabulary of min(p, q) (Leviathan et
    # al. 2023; it is 1 - the total variation distance).
    accept = torch.minimum(F.softmax(student, -1), F.softmax(teacher, -1)).sum()
    return {
        "accept": accept,
        "kl": token_divergence(student, teacher, 1.0, "forward_kl").sum(),
        "agree": (student.argmax(-1) == teacher.argmax(-1)).sum(),
        "teacher_ce": F.cross_entropy(teacher, targets, reduction="sum"),
    }


def _kept(rows: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return rows if keep is None else rows[keep]


@dataclass
class TeacherLogits:
    """The teacher's logits at every position that predicts a target: (B, L-1, V), detached.
    ``layers``: the outputs (B, L-1, H) of the teacher layers the hidden-state term asked for."""

    logits: torch.Tensor
    nonfinite: torch.Tensor
    layers: list[torch.Tensor] = field(default_factory=list)
    tempered: ClassVar[bool] = False  # raw logits: the loss applies the temperature

    def diagnostics(self, student, targets, keep, at_one, temperature: float) -> dict:
        """An evaluation's sums at T = 1 against (N, V) fp32 ``student`` logits of the kept
        positions (``keep``, a mask over all of them, or None): ``kl`` (KL(teacher || student)),
        ``agree`` (top-1 agreement), ``accept`` (the student's expected acceptance as a draft
        model for this teacher) and ``teacher_ce``. Logits do not depend on the temperature,
        so ``at_one`` is this view. (The loss terms themselves come from the objective.)"""
        teacher = _kept(self.logits.reshape(-1, self.logits.shape[-1])[:, : student.shape[-1]].float(), keep)
        return _dense_diagnostics(student, teacher, targets)


@dataclass
class TeacherHidden:
    """The teacher's final hidden states (B, L-1, H) and its output layer, detached."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    nonfinite: torch.Tensor
    layers: list[torch.Tensor] = field(default_factory=list)
    tempered: ClassVar[bool] = False

    def diagnostics(self, student, targets, keep, at_one, temperature: float) -> dict:
        """As ``TeacherLogits.diagnostics``, the teacher's logits formed from its hidden states
        (the kept positions only: an evaluation batch's logits are small)."""
        hidden = _kept(self.hidden.reshape(-1, self.hidden.shape[-1]), keep)
        teacher = head_logits(hidden, self.weight, self.bias, student.shape[-1]).float()
        return _dense_diagnostics(student, teacher, targets)


@dataclass
class TeacherSparse:
    """Sparse teacher targets for every predicting position, flattened to (B * (L-1), slots)
    (``sparse.SparseTargets``), from an offline cache."""

    targets: object
    nonfinite: torch.Tensor
    layers: list[torch.Tensor] = field(default_factory=list)
    tempered: ClassVar[bool] = True  # the teacher's distribution at one temperature

    def diagnostics(self, student, targets, keep, at_one, temperature: float) -> dict:
        """An evaluation's sums against sparse targets (no ``teacher_ce``: a cache records the
        teacher's own held-out CE; no ``accept``: it needs the teacher's whole distribution). KL comes from ``at_one``, the targets at T = 1 where the source
        has them (sampled), else it is the KL at ``temperature``, the capture temperature (top-k);
        the teacher's top-1 is its most likely cached id (exact for top-k; for sampled, whenever
        the argmax was drawn)."""
        at_t = self.targets if keep is None else self.targets.rows(keep)
        one = at_one.targets if keep is None else at_one.targets.rows(keep)
        out = {}
        if at_t.paired is not None:  # a cache built across tokenizers: over the aligned pairs, as live
            here = at_t.paired
            student, targets, at_t, one = student[here], targets[here], at_t.rows(here), one.rows(here)
            out["paired"] = here.sum()
        kl = sparse_kd_sum(student, targets, one, 1.0 if at_one is not self else temperature)
        best = torch.where(at_t.weights > 0, at_t.logp, float("-inf")).argmax(-1, keepdim=True)
        agree = (student.argmax(-1) == at_t.ids.gather(1, best).squeeze(1)).sum()
        return {**out, "kl": kl, "agree": agree}


@dataclass
class TeacherAligned:
    """A teacher whose tokenizer differs from the student's: its logits (K, Vt) at the teacher
    positions of the K aligned pairs, the pairs' student positions (flat, (K,)), and the student
    token each teacher token carries its probability to (``data/alignment.vocabulary_map``).
    ``all_logits`` and ``targets`` are the teacher's on its own tokens, for an evaluation's
    teacher figures."""

    logits: torch.Tensor
    student_positions: torch.Tensor
    mapping: torch.Tensor
    nonfinite: torch.Tensor
    all_logits: torch.Tensor
    targets: torch.Tensor
    # (student positions (C,), ids (C, k), weights (C, k)): the teacher's sparse targets at student
    # positions inside spans it writes in one token (``data/alignment.ContinuationTargets``)
    continuation: tuple | None = None
    # (token, source, mass), each (K,): at pairs whose next student token the teacher writes in
    # several, its probability of that token's text, moved onto it (``crosstok.longer_token_moves``)
    moves: tuple | None = None
    layers: list[torch.Tensor] = field(default_factory=list)
    tempered: ClassVar[bool] = False

    def diagnostics(self, student, targets, keep, at_one, temperature: float) -> dict:
        """At T = 1, over the aligned pairs (``paired`` counts them): ``kl``, the cross-tokenizer
        divergence; ``agree``, how often the student's top token is the one the teacher's top
        token maps to. And the teacher's own CE over its own targets (``teacher_ce``,
        ``teacher_ce_tokens``): per token of the teacher's."""
        at = self.student_positions if keep is None else (keep.cumsum(0) - 1)[self.student_positions]
        paired = student[at]
        kl = cross_tokenizer_divergence(paired, self.logits, self.mapping, 1.0, self.moves).sum()
        agree = (paired.argmax(-1) == self.mapping[self.logits.argmax(-1)]).sum()
        flat, y = self.all_logits.reshape(-1, self.all_logits.shape[-1]).float(), self.targets.reshape(-1)
        valid = y != IGNORE_INDEX
        return {
            "kl": kl,
            "agree": agree,
            "paired": torch.tensor(len(at)),
            "teacher_ce": F.cross_entropy(flat[valid], y[valid], reduction="sum"),
            "teacher_ce_tokens": valid.sum(),
        }


@dataclass
class TeacherAlignedHidden:
    """As ``TeacherAligned`` on the chunked path: the teacher's final hidden states (K, Ht) at
    the pairs and its output layer instead of its logits (``crosstok.chunked_cross_tokenizer_kd``
    forms them chunk by chunk). Training only: an evaluation meets the teacher's logits."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    vocab_size: int
    student_positions: torch.Tensor
    mapping: torch.Tensor
    nonfinite: torch.Tensor
    continuation: tuple | None = None  # as ``TeacherAligned.continuation``
    moves: tuple | None = None  # as ``TeacherAligned.moves``
    layers: list[torch.Tensor] = field(default_factory=list)
    tempered: ClassVar[bool] = False


TeacherView = TeacherLogits | TeacherHidden | TeacherSparse | TeacherAligned | TeacherAlignedHidden


def predicting_positions(model: torch.nn.Module, batch: Batch) -> dict:
    """Forward kwargs that make ``model`` form logits only at positions 0 .. L-2, the ones with a
    next token: the last position's logits (and a copy of the whole output to slice them off,
    forward and backward) are never made. Empty for a model without ``logits_to_keep``."""
    # A LoRA student (a peft wrapper) passes the keyword on to the model it wraps.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not _accepts_logits_to_keep(type(inner)):
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


def final_hidden(
    model, batch: Batch, layers: tuple[int, ...] = (), forward=None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(final hidden states (B, L-1, H) at the predicting positions, the outputs of decoder
    ``layers``) of ``model`` on ``batch`` (run through ``forward``, the possibly wrapped model,
    when given), its logits formed at one position only (``logits_to_keep=1``): what the chunked
    forms start from, never holding (tokens x vocab) logits.

    Every layer's output is asked for (``output_hidden_states``) only when ``layers`` names some:
    the model then keeps all L + 1 of them (B x L x H each) to the end of its forward. Otherwise
    the final hidden state is read off the same forward as it passes (``_final_hidden_only``),
    the very tensor that would have been ``hidden_states[-1]``, and nothing else is kept."""
    decoder = _decoder(model)
    if layers or decoder is None:
        out = _forward_one_logit(forward or model, batch, output_hidden_states=True)
        return out.hidden_states[-1][:, :-1], layer_outputs(out.hidden_states, layers)
    with _final_hidden_only(model, decoder):
        out = _forward_one_logit(forward or model, batch)
    if out.hidden_states is None:  # (``forward`` ran another model than ``model``)
        raise RuntimeError(f"the forward did not run {type(model).__name__}'s {type(decoder).__name__}")
    return out.hidden_states[-1][:, :-1], []


def _forward_one_logit(model, batch: Batch, **kwargs):
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        logits_to_keep=1,
        use_cache=False,
        **kwargs,
    )


def _decoder(model) -> torch.nn.Module | None:
    """The module whose output's first field (``last_hidden_state``, after the final norm) is
    what ``model``'s output layer multiplies: the base model a transformers causal LM calls
    (``model.model``, GPT-2's ``transformer``), inside a LoRA wrapper too. None where there is
    no such module apart from the model itself."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(inner, "base_model", None)
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not inner else None


@contextlib.contextmanager
def _final_hidden_only(model: torch.nn.Module, decoder: torch.nn.Module):
    """Within: a forward of ``model`` returns ``decoder``'s ``last_hidden_state`` as its one
    hidden state (``hidden_states = (last,)``), its other layers' outputs never gathered.

    The whole model still runs, so what wraps it keeps working (a DDP wrapper's gradient hooks,
    FSDP's root hooks, which gather the root's weights before the forward). The final hidden
    state is handed over in the model's output before any other hook on the model sees that
    output (``prepend``): there FSDP registers its pre-backward hook on a sharded student's
    outputs, and fault injection (``training/faults.py``) poisons the last hidden state, as they
    did when every layer's output was asked for."""
    seen: list[torch.Tensor] = []

    def hand_over(module, args, output):
        if seen:
            output.hidden_states = (seen.pop(),)

    handles = [
        decoder.register_forward_hook(lambda module, args, output: seen.append(output[0])),
        model.register_forward_hook(hand_over, prepend=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_outputs(hidden_states, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """The outputs of decoder ``layers`` (0-based) at the positions that predict a target, from a
    forward's ``hidden_states`` (embeddings first)."""
    return [hidden_states[i + 1][:, :-1] for i in layers]
