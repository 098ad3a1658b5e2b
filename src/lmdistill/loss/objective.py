"""The objective: the loss of one micro-batch, given the teacher's view of it.

``kd_weight * T^2 * D(teacher || student) + (1 - kd_weight) * CE``, each term summed over the
batch's valid targets and divided once by ``num_tokens``, the global count of valid targets
across the step's micro-batches and all ranks. D is a divergence from
``divergences.REGISTRY``.

The objective runs the student forward (through the wrapped model, so that data-parallel
gradient synchronisation works) and computes what the teacher's view calls for: full logits
next to ``TeacherLogits``, final hidden states next to ``TeacherHidden`` and next to the
sparse targets of a cache (``TeacherSparse``, through ``sparse.py``: from whole logits or from
hidden states, as the signal's ``student_output`` says).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lmdistill.core.batch import Batch
from lmdistill.loss import divergences
from lmdistill.loss.chunked import fused_linear_distillation_loss, fused_logits_distillation_loss
from lmdistill.loss.crosstok import (
    aligned_distillation_loss,
    chunked_aligned_loss,
    chunked_aligned_terms,
    continuation_terms,
)
from lmdistill.loss.dense import LossParts, distillation_loss, head_logits
from lmdistill.loss.divergences import DivergenceParams
from lmdistill.loss.hidden import HiddenProjection, hidden_state_loss
from lmdistill.loss.sampled import (
    sampled_token_loss,
    teacher_token_logprobs,
    token_logprobs,
    token_logprobs_from_hidden,
)
from lmdistill.loss.sparse import sparse_distillation_loss, sparse_logits_distillation_loss
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


@dataclass(frozen=True)
class KDSpec:
    """What the loss computes (the ``distill`` section of the config)."""

    kd_weight: float
    divergence: str = "forward_kl"
    scale_by_t2: bool = True
    params: DivergenceParams = DivergenceParams()

    def loss_kwargs(self) -> dict:
        return {
            "kd_weight": self.kd_weight,
            "divergence": self.divergence,
            "scale_by_t2": self.scale_by_t2,
            "params": self.params,
        }


@dataclass(frozen=True)
class OnPolicySpec:
    """What the loss computes on a batch the student wrote (``distill.on_policy``): ``spec``'s
    divergence over the vocabulary (``loss`` full), or the sampled-token estimator. The KD
    weight is 1: the student's own text is not ground truth to train CE on."""

    spec: KDSpec
    loss: str = "full"


@dataclass
class HiddenTerm:
    """The hidden-state term (``distill.hidden``): ``weight * hidden_state_loss`` over the
    student layers paired with the teacher layers the signal's views carry."""

    weight: float
    kind: str
    student_layers: tuple[int, ...]
    projection: HiddenProjection
    forward: Callable  # the projection as the step calls it (wrapped for data parallelism)


class Objective:
    """``objective(student, batch, teacher_view, T, num_tokens) -> LossParts``.

    ``student_output`` ("logits" or "hidden") must match the teacher signal's views; with no
    teacher (kd_weight 0) it picks the full or the chunked form of the CE term alone.
    ``model`` is the unwrapped student: its class says which forward arguments it takes, and
    its output layer is what the chunked form multiplies by. ``reference`` computes the full
    path with autograd on all positions' logits (``loss.impl: reference``).
    """

    def __init__(
        self,
        spec: KDSpec,
        vocab_size: int,
        student_output: str,
        model: torch.nn.Module,
        chunk_size: int = 1024,
        reference: bool = False,
        hidden: HiddenTerm | None = None,
        on_policy: OnPolicySpec | None = None,
    ):
        if student_output not in ("logits", "hidden"):
            raise ValueError(f"student_output must be 'logits' or 'hidden', got {student_output!r}")
        self.spec = spec
        self.vocab_size = vocab_size
        self.student_output = student_output
        self.model = model
        self.chunk_size = chunk_size
        # ``reference``: the full path exactly as autograd computes it (loss.impl: reference).
        self.reference = reference
        self.hidden = hidden
        self.on_policy = on_policy

    @property
    def head(self) -> torch.nn.Module:
        """The student's output layer: what the chunked forms multiply hidden states by."""
        return self.model.get_output_embeddings()

    @classmethod
    def for_run(
        cls,
        cfg,
        vocab_size: int,
        student_output: str,
        model: torch.nn.Module,
        reference: bool = False,
        hidden: HiddenTerm | None = None,
    ) -> Objective:
        """The objective of a run's config: its ``distill`` section, and ``distill.on_policy``'s
        loss for the batches the student wrote."""
        d, o = cfg.distill, cfg.distill.on_policy
        spec = KDSpec(d.kd_weight, d.divergence, d.scale_by_t2, d.divergence_params)
        on_policy = (
            OnPolicySpec(replace(spec, kd_weight=1.0, divergence=o.divergence), o.loss) if o.fraction > 0 else None
        )
        return cls(
            spec,
            vocab_size,
            student_output,
            model,
            cfg.loss.chunk_size,
            reference=reference,
            hidden=hidden,
            on_policy=on_policy,
        )

    def __call__(
        self, student: torch.nn.Module, batch: Batch, teacher: TeacherView | None, temperature: float, num_tokens: float
    ) -> LossParts:
        spec = self.spec
        if batch.generated and self.on_policy is not None:
            spec = self.on_policy.spec
            if self.on_policy.loss == "sampled_token":
                return self._sampled_token(student, batch, teacher, num_tokens)
        if isinstance(teacher, TeacherSparse):
            compute = self._from_sparse
        elif isinstance(teacher, TeacherAlignedHidden):
            compute = self._aligned_from_hidden
        else:
            compute = self._from_hidden if self.student_output == "hidden" else self._from_logits
        parts, layers = compute(student, batch, teacher, temperature, num_tokens, spec)
        h = self.hidden
        if h is None:
            return parts
        term = hidden_state_loss(
            layers,
            teacher.layers,
            h.projection,
            h.kind,
            batch.targets,
            num_tokens,
            batch.all_valid,
            forward=h.forward,
        )
        return replace(parts, total=parts.total + h.weight * term, hidden=term.detach())

    def loss_from_logits(
        self, logits, batch: Batch, teacher: TeacherView | None, temperature: float, num_tokens: float, spec=None
    ) -> LossParts:
        """The loss of a micro-batch whose student logits (B, L-1, V) are formed already: against
        the view's logits, against its sparse targets, or CE alone without a teacher. The training
        step forms the logits in ``__call__``; an evaluation forms them once and scores them here,
        under no_grad, so that what it reports is what training computes."""
        spec = spec or self.spec
        if isinstance(teacher, TeacherSparse):
            _check_sparse(spec)
            return sparse_logits_distillation_loss(
                logits,
                batch.targets,
                teacher.targets,
                temperature=temperature,
                kd_weight=spec.kd_weight,
                scale_by_t2=spec.scale_by_t2,
                num_tokens=num_tokens,
                chunk_size=self.chunk_size,
            )
        if isinstance(teacher, TeacherHidden):
            raise TypeError("a view of hidden states meets the student's hidden states (student_output 'hidden')")
        if isinstance(teacher, TeacherAligned):  # a teacher with another tokenizer
            _forward_kl_only(spec, "a teacher with another tokenizer gives")
            return aligned_distillation_loss(
                logits,
                batch.targets,
                teacher.logits,
                teacher.student_positions,
                teacher.mapping,
                temperature=temperature,
                kd_weight=spec.kd_weight,
                scale_by_t2=spec.scale_by_t2,
                num_tokens=num_tokens,
                continuation=teacher.continuation,
                moves=teacher.moves,
            )
        # With a closed-form gradient the loss needs no autograd graph over (tokens x vocab):
        # fewer passes over the logits and no fresh buffers per step (the autograd form is the
        # reference, and the fallback for a divergence without a closed form).
        closed_form = divergences.get(spec.divergence).chunk is not None and not self.reference
        loss = fused_logits_distillation_loss if closed_form else distillation_loss
        return loss(
            logits,
            teacher.logits if teacher is not None else None,
            batch.targets,
            temperature=temperature,
            num_tokens=num_tokens,
            all_valid=batch.all_valid,
            **spec.loss_kwargs(),
        )

    def _student_logits(self, student, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's logits at the predicting positions, and the outputs of the layers the
        hidden-state term compares (none without the term)."""
        out = prediction_logits(
            self.model,
            batch,
            self.vocab_size,
            forward=student,
            trim=not self.reference,
            hidden_states=self.hidden is not None,
        )
        if self.hidden is None:
            return out, []
        logits, states = out
        return logits, layer_outputs(states, self.hidden.student_layers)

    def _student_hidden(self, student, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The student's final hidden states at the predicting positions (its forward forms one
        position's logits), and the outputs of the layers the hidden-state term compares: the
        forward is asked for every layer's output only for that term."""
        layers = self.hidden.student_layers if self.hidden is not None else ()
        return final_hidden(self.model, batch, layers, forward=student)

    def _from_logits(
        self, student, batch: Batch, teacher: TeacherLogits | None, temperature: float, num_tokens: float, spec: KDSpec
    ) -> tuple[LossParts, list[torch.Tensor]]:
        logits, layers = self._student_logits(student, batch)
        return self.loss_from_logits(logits, batch, teacher, temperature, num_tokens, spec), layers

    def _from_sparse(
        self, student, batch: Batch, teacher: TeacherSparse, temperature: float, num_tokens: float, spec: KDSpec
    ) -> tuple[LossParts, list[torch.Tensor]]:
        """Sparse targets from a cache: from the student's whole logits when the loss path is full
        (they are small), else chunk by chunk from its hidden states. Sparse targets estimate
        forward KL only (a cache of other divergences is refused when it is opened)."""
        if self.student_output == "logits":
            logits, layers = self._student_logits(student, batch)
            return self.loss_from_logits(logits, batch, teacher, temperature, num_tokens, spec), layers
        _check_sparse(spec)
        hidden, layers = self._student_hidden(student, batch)
        s = spec
        return sparse_distillation_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            self.head.weight,
            batch.targets.reshape(-1),
            teacher.targets,
            temperature=temperature,
            kd_weight=s.kd_weight,
            scale_by_t2=s.scale_by_t2,
            num_tokens=num_tokens,
            vocab_size=self.vocab_size,
            student_bias=self.head.bias,
            chunk_size=self.chunk_size,
        ), layers

    def _from_hidden(
        self, student, batch: Batch, teacher: TeacherHidden | None, temperature: float, num_tokens: float, spec: KDSpec
    ) -> tuple[LossParts, list[torch.Tensor]]:
        hidden, layers = self._student_hidden(student, batch)
        return self._fused(hidden, batch, teacher, temperature, num_tokens, spec), layers

    def _fused(
        self,
        hidden: torch.Tensor,
        batch: Batch,
        teacher: TeacherHidden | None,
        temperature: float,
        num_tokens: float,
        spec: KDSpec,
    ) -> LossParts:
        # The forward computed one position's logits; the fused loss forms the rest chunk by chunk,
        # never all (tokens x vocab) at once.
        with_teacher = teacher is not None
        return fused_linear_distillation_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            self.head.weight,
            teacher.hidden.reshape(-1, teacher.hidden.shape[-1]) if with_teacher else None,
            teacher.weight if with_teacher else None,
            batch.targets.reshape(-1),
            temperature=temperature,
            num_tokens=num_tokens,
            all_valid=batch.all_valid,
            vocab_size=self.vocab_size,
            student_bias=self.head.bias,
            teacher_bias=teacher.bias if with_teacher else None,
            chunk_size=self.chunk_size,
            **spec.loss_kwargs(),
        )

    def _aligned_from_hidden(
        self, student, batch: Batch, teacher: TeacherAlignedHidden, temperature: float, num_tokens: float, spec: KDSpec
    ) -> tuple[LossParts, list[torch.Tensor]]:
        """A teacher with another tokenizer, on the chunked path: the CE term chunk by chunk over
        every target (the fused loss without a teacher), the KD term chunk by chunk over the pairs."""
        _forward_kl_only(spec, "a teacher with another tokenizer gives")
        hidden, layers = self._student_hidden(student, batch)
        ce = self._fused(hidden, batch, None, temperature, num_tokens, replace(spec, kd_weight=0.0))
        flat, at = hidden.reshape(-1, hidden.shape[-1]), teacher.student_positions
        kd_sum, ce_at_pairs = chunked_aligned_terms(
            flat[at],
            (self.head.weight, self.head.bias),
            batch.targets.reshape(-1)[at],
            teacher.hidden,
            (teacher.weight, teacher.bias),
            teacher.mapping,
            temperature=temperature,
            vocab_sizes=(self.vocab_size, teacher.vocab_size),
            chunk_size=self.chunk_size,
            moves=teacher.moves,
        )
        if teacher.continuation is not None and spec.kd_weight > 0:  # (a few rows: formed at once)
            positions, ids, weights = teacher.continuation
            rows = head_logits(flat[positions], self.head.weight, self.head.bias, self.vocab_size)
            kd, ce_c = continuation_terms(rows, batch.targets.reshape(-1)[positions], ids, weights, temperature)
            kd_sum, ce_at_pairs = kd_sum + kd, ce_at_pairs + ce_c
        return chunked_aligned_loss(ce, kd_sum, ce_at_pairs, spec, temperature, num_tokens), layers

    def _sampled_token(
        self, student, batch: Batch, teacher: TeacherLogits | TeacherHidden, num_tokens: float
    ) -> LossParts:
        """The per-token reverse-KL estimator on the student's own text (``sampled.py``); on the
        chunked path log q(x) comes chunk by chunk from the hidden states."""
        if self.student_output == "hidden":
            student_logp = token_logprobs_from_hidden(
                final_hidden(self.model, batch, forward=student)[0],
                self.head.weight,
                self.head.bias,
                batch.targets,
                self.vocab_size,
                self.chunk_size,
            )
        else:
            student_logp = token_logprobs(
                prediction_logits(self.model, batch, self.vocab_size, forward=student), batch.targets
            )
        teacher_logp = teacher_token_logprobs(teacher, batch.targets, self.vocab_size, self.chunk_size)
        return sampled_token_loss(student_logp, teacher_logp, batch.targets, num_tokens)


def _check_sparse(spec: KDSpec) -> None:
    """Sparse targets estimate forward KL only (a cache of other divergences is refused when opened)."""
    _forward_kl_only(spec, "sparse teacher targets give")


def _forward_kl_only(spec: KDSpec, what_gives: str) -> None:
    """ValueError for a divergence other than forward KL, from a teacher view that gives only that."""
    if spec.divergence != "forward_kl":
        raise ValueError(f"{what_gives} forward_kl only, not {spec.divergence!r}")
