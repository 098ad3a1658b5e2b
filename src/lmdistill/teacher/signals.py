"""Teacher signals: where the teacher's view of a batch comes from.

The training step asks one question of the teacher per micro-batch -- ``signal(batch, T)``
-- and hands the answer, a *teacher view* (``lmdistill.loss.views``), to the objective.

A new source (a served teacher, say) is a new ``TeacherSignal`` and, if it hands out a new
kind of view, that view; the training loop does not change. ``prepare_step`` is the hook for
sources that change the step's batches themselves (on-policy generation, ``onpolicy.py``)
before their targets are counted, and ``metrics`` adds what such a source did to the step's
log line.
"""

from __future__ import annotations

import copy

import torch

from lmdistill.core.batch import Batch
from lmdistill.core.parallel import is_sharded
from lmdistill.data.alignment import ContinuationTargets, shared_vocabulary, vocabulary_map, written_by_student
from lmdistill.loss.crosstok import longer_token_moves, span_rows, token_log_probs
from lmdistill.loss.dense import head_logits
from lmdistill.loss.views import (
    TeacherAligned,
    TeacherAlignedHidden,
    TeacherHidden,
    TeacherLogits,
    TeacherSparse,
    TeacherView,
    final_hidden,
    layer_outputs,
    prediction_logits,
)


class TeacherSignal:
    """The interface: ``student_output`` says what the objective must compute from the student
    ("logits" or "hidden") to meet this signal's views."""

    student_output = "logits"

    def prepare_step(self, batches: list[Batch], step: int) -> list[Batch]:
        """The batches optimizer step ``step`` trains on; live teachers take them as they are."""
        return batches

    def metrics(self, step_seconds: float) -> dict:
        """What this source did in the last step (which took ``step_seconds``), for its log line."""
        return {}

    def __call__(self, batch: Batch, temperature: float) -> TeacherView | None:
        raise NotImplementedError

    def view_at_one(self, batch: Batch, view: TeacherView, temperature: float) -> TeacherView:
        """The view that the T = 1 diagnostics of an evaluation (KL, agreement) compare with:
        ``view`` itself unless it holds the teacher at another temperature."""
        return view if not view.tempered or temperature == 1.0 else self(batch, 1.0)


class NoTeacher(TeacherSignal):
    """Plain language-model training (kd_weight 0): no teacher runs during the step."""

    def __init__(self, student_output: str = "logits"):
        self.student_output = student_output

    def __call__(self, batch: Batch, temperature: float) -> None:
        return None


class LiveLogits(TeacherSignal):
    """A teacher model in memory, run forward on every micro-batch; its logits for the full path."""

    student_output = "logits"

    def __init__(
        self, teacher: torch.nn.Module, vocab_size: int, reference: bool = False, layers: tuple[int, ...] = ()
    ):
        self.teacher = teacher
        self.vocab_size = vocab_size
        self.reference = reference
        self.layers = layers  # teacher layers whose outputs the hidden-state term compares with

    def __call__(self, batch: Batch, temperature: float) -> TeacherLogits:
        # Layer outputs take part in the hidden-state term's autograd graph as constants, which
        # inference-mode tensors cannot; plain no_grad then. So for a sharded teacher: FSDP keeps
        # its all-gather buffers, and buffers made in inference mode refuse the next gather
        # outside it (an evaluation).
        with torch.no_grad() if self.layers or is_sharded(self.teacher) else torch.inference_mode():
            if not self.layers:
                logits = prediction_logits(self.teacher, batch, self.vocab_size, trim=not self.reference)
                layers = []
            else:
                logits, states = prediction_logits(
                    self.teacher, batch, self.vocab_size, trim=not self.reference, hidden_states=True
                )
                layers = layer_outputs(states, self.layers)
            # -inf is a legitimate masked entry; NaN or +inf is a broken teacher. max() finds both.
            return TeacherLogits(logits, (~torch.isfinite(logits.amax())).float(), layers)


class LiveHidden(TeacherSignal):
    """A teacher model in memory; its final hidden states and lm_head for the chunked path.

    ``logits_to_keep=1`` makes the teacher compute the logits of one position only: the
    fused loss forms the rest chunk by chunk from these hidden states. Its other layers' outputs
    are asked for only when the hidden-state term compares with some (``layers``): without them
    the forward keeps none of them (``views.final_hidden``).
    """

    student_output = "hidden"

    def __init__(self, teacher: torch.nn.Module, layers: tuple[int, ...] = ()):
        self.teacher = teacher
        self.layers = layers

    @torch.no_grad()
    def __call__(self, batch: Batch, temperature: float) -> TeacherHidden:
        hidden, layers = final_hidden(self.teacher, batch, self.layers)
        head = self.teacher.get_output_embeddings()
        return TeacherHidden(hidden, head.weight, head.bias, (~torch.isfinite(hidden).all()).float(), layers)


class LiveAligned(TeacherSignal):
    """A teacher model in memory with a tokenizer of its own: run forward on the teacher's tokens
    of each micro-batch's text (``Batch.teacher_tokens``), its logits taken at the positions
    aligned with the student's (``loss/crosstok.py``), with the student token each teacher token
    carries its probability to (``data/alignment.vocabulary_map``)."""

    student_output = "logits"

    def __init__(self, teacher: torch.nn.Module, teacher_tokenizer, student_tokenizer):
        self.teacher, self.vocab_size = teacher, len(teacher_tokenizer)
        written = written_by_student(teacher_tokenizer, student_tokenizer)  # (one pass, read by both)
        self.mapping = torch.from_numpy(vocabulary_map(teacher_tokenizer, student_tokenizer, written))
        self.num_shared = len(shared_vocabulary(teacher_tokenizer, student_tokenizer)[0])
        self.continuing = ContinuationTargets(teacher_tokenizer, student_tokenizer, written=written)

    def on_full_logits(self) -> LiveAligned:
        """This signal on the full-logits path, sharing its maps (evaluation forms the teacher's
        logits for its bits per byte whichever path the training steps take)."""
        if type(self) is LiveAligned:
            return self
        full = copy.copy(self)
        full.__class__ = LiveAligned
        return full

    def continuation(self, batch: Batch, teacher_logits: torch.Tensor, pairs: torch.Tensor | None = None):
        """(student positions, ids, weights) of the teacher's targets for the batch's positions
        inside spans it writes in one token (``data/alignment.ContinuationTargets``); None if none.
        ``teacher_logits``: at every pair, or at ``pairs`` only (sorted pair indices)."""
        found = batch.teacher_tokens.continuations
        if found is None or not len(found):
            return None
        pair_of = found[:, 1] if pairs is None else torch.searchsorted(pairs.cpu(), found[:, 1].contiguous())
        width = batch.input_ids.shape[1] - 1
        ids = batch.input_ids.cpu()
        read = [ids[pos // width, pos % width - n + 1 : pos % width + 1].tolist() for pos, _, n in found.tolist()]
        rows, targets, weights = self.continuing.targets(teacher_logits, pair_of, read)
        device = teacher_logits.device
        return (
            found[torch.from_numpy(rows), 0].to(device),
            torch.from_numpy(targets).to(device),
            torch.from_numpy(weights).to(device),
        )

    @staticmethod
    def teacher_tokens(batch: Batch):
        """The teacher's tokens of the batch's text (``Batch.teacher_tokens``), which it must carry."""
        if batch.teacher_tokens is None:
            raise ValueError(
                "a teacher with another tokenizer needs the teacher's tokens of the batch (teacher_tokens)"
            )
        return batch.teacher_tokens

    def moves(self, batch: Batch, logits_at) -> tuple | None:
        """``crosstok.longer_token_moves`` at the batch's pairs, for the spans the student writes in
        one token and the teacher in several (``TeacherTokens.longer``); None if there are none.
        ``logits_at(rows)``: the teacher's logits at flat positions ``rows`` of its own tokens."""
        tokens = batch.teacher_tokens
        if tokens.longer is None or not len(tokens.longer):
            return None
        rows, which = span_rows(tokens.teacher_positions, tokens.longer)
        own = tokens.batch.targets.reshape(-1)
        rows = rows.to(own.device)
        student_next = batch.targets.reshape(-1)[tokens.student_positions]
        source = self.mapping.to(own.device)[own[tokens.teacher_positions]]
        log_probs = token_log_probs(logits_at(rows), own[rows])
        return longer_token_moves(log_probs, which, tokens.longer, student_next, source)

    def __call__(self, batch: Batch, temperature: float) -> TeacherAligned:
        tokens = self.teacher_tokens(batch)
        with torch.inference_mode():
            logits = prediction_logits(self.teacher, tokens.batch, self.vocab_size)
            flat = logits.reshape(-1, logits.shape[-1])
            at_pairs = flat[tokens.teacher_positions]
            moves = self.moves(batch, lambda rows: flat[rows])
        return TeacherAligned(
            at_pairs,
            tokens.student_positions,
            self.mapping.to(logits.device),
            (~torch.isfinite(logits.amax())).float(),
            logits,
            tokens.batch.targets,
            self.continuation(batch, at_pairs),
            moves,
        )


class LiveAlignedHidden(LiveAligned):
    """``LiveAligned`` for the chunked path: the teacher's final hidden states at the aligned
    positions and its output layer; its logits are never formed for the whole batch."""

    student_output = "hidden"

    @torch.no_grad()
    def __call__(self, batch: Batch, temperature: float) -> TeacherAlignedHidden:
        tokens = self.teacher_tokens(batch)
        hidden, _ = final_hidden(self.teacher, tokens.batch)
        flat = hidden.reshape(-1, hidden.shape[-1])
        at_pairs = flat[tokens.teacher_positions]
        head = self.teacher.get_output_embeddings()

        def logits_at(rows):  # (the few rows that need them, never the whole batch's)
            return head_logits(flat[rows], head.weight, head.bias, self.vocab_size)

        found = tokens.continuations
        continuation = None
        if found is not None and len(found):  # (the logits of the pairs that start such spans only)
            starts = found[:, 1].unique()  # (sorted)
            continuation = self.continuation(
                batch, logits_at(tokens.teacher_positions[starts.to(hidden.device)]), starts
            )
        return TeacherAlignedHidden(
            at_pairs,
            head.weight,
            head.bias,
            self.vocab_size,
            tokens.student_positions,
            self.mapping.to(hidden.device),
            (~torch.isfinite(at_pairs).all()).float(),
            continuation=continuation,
            moves=self.moves(batch, logits_at),
        )


# Config fields that change logits after the lm_head; the fused loss does not model them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def fused_loss_unsupported(model) -> str | None:
    """Why the chunked loss cannot reproduce ``model``'s logits, or None if it can."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"{type(model).__name__} has no plain linear output layer"
    for name in _LOGIT_TRANSFORMS:
        if getattr(model.config, name, None) not in (None, 1, 1.0):
            return f"{type(model).__name__} transforms its logits ({name})"
    return None


class CachedTeacher(TeacherSignal):
    """An offline teacher cache (``cache.py``): no teacher runs; a batch's blocks are looked up by
    their rows. Dense caches give logits (the full path, every divergence); sampled and top-k
    caches give sparse targets, which the objective meets with the student's whole logits
    (``student_output`` "logits", when they are small) or its hidden states (``"hidden"``, the
    chunked path)."""

    def __init__(self, cache, split: str = "train", student_output: str = "hidden"):
        self.cache, self.split = cache, split
        self.student_output = "logits" if cache.mode == "dense" else student_output

    def view_at_one(self, batch: Batch, view: TeacherView, temperature: float) -> TeacherView:
        # A top-k cache holds its capture temperature only: its KL is the one at that temperature.
        return view if self.cache.mode == "topk" else super().view_at_one(batch, view, temperature)

    def __call__(self, batch: Batch, temperature: float) -> TeacherLogits | TeacherSparse:
        if batch.rows is None:
            raise ValueError("a cached teacher needs the batch's block rows (Batch.rows)")
        view = self.cache.targets(self.split, batch.rows, temperature)
        device = batch.input_ids.device
        if self.cache.mode == "dense":
            logits = view.to(device)
            return TeacherLogits(logits, (~torch.isfinite(logits) & (logits != float("-inf"))).any().float())
        moved = view.to(device)
        return TeacherSparse(moved, (~torch.isfinite(moved.weights)).any().float())


def choose_loss_impl(
    impl: str, divergence, tokens_per_micro_batch: int, vocab_size: int, student, teacher, threshold_mib: float
) -> str:
    """``full`` or ``chunked`` for ``loss.impl`` (auto: chunked when one micro-batch's fp32 logits of
    both models would exceed ``threshold_mib``: the memory budget, or on the CPU the smaller size
    above which chunked was measured the faster path, benchmarks/bench_loss_impl_cpu.py).

    Raises ValueError for ``chunked`` where it cannot work: a model whose logits the fused
    loss cannot reproduce, or a divergence without a closed-form gradient.
    """
    if impl in ("full", "reference"):
        return impl
    problems = [p for p in (fused_loss_unsupported(m) for m in (student, teacher) if m is not None) if p]
    if teacher is not None and divergence.chunk is None:
        problems.append(f"divergence {divergence.name!r} has no closed-form gradient")
    if impl == "chunked":
        if problems:
            raise ValueError(f"loss.impl = chunked is not possible: {problems[0]}; use loss.impl=full")
        return "chunked"
    models = 2 if teacher is not None else 1
    logits_mib = tokens_per_micro_batch * vocab_size * 4 * models / 2**20
    return "chunked" if not problems and logits_mib > threshold_mib else "full"


def make_signal(
    impl: str, teacher: torch.nn.Module | None, vocab_size: int, layers: tuple[int, ...] = ()
) -> TeacherSignal:
    """The live signal for loss implementation ``impl``; ``NoTeacher`` when no teacher is in play.
    ``layers``: teacher layers whose outputs the views carry (the hidden-state term)."""
    if teacher is None:
        return NoTeacher("hidden" if impl == "chunked" else "logits")
    if impl == "chunked":
        return LiveHidden(teacher, layers)
    return LiveLogits(teacher, vocab_size, reference=impl == "reference", layers=layers)
