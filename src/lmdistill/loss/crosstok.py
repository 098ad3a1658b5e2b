"""The KD term between a teacher and a student that do not share a tokenizer.

Inputs come from ``data/alignment.py``: pairs of positions (teacher position, student position)
where both models predict the first token of the same span of text, and the tokens the two
vocabularies share (teacher id, student id). At each pair the divergence has two parts:

- on the shared tokens, the forward KL terms p_v (log p_v - log q_v) summed over them (p the
  teacher's, q the student's distribution at T), the exact comparison where both models can
  name the same token;
- on the rest, which one vocabulary has and the other does not, ULD's comparison (Boizard et
  al., 2024): the two distributions' remaining probabilities sorted in decreasing order, the
  shorter list padded with zeros, and the L1 distance between them (no token mapping needed).

With one tokenizer on both sides every token is shared and the rest is empty: the term is the
forward KL over the whole vocabulary at every position, the ordinary KD term, value and
gradient (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmdistill.core.batch import IGNORE_INDEX
from lmdistill.loss.dense import LossParts, check_loss_args, normaliser


def cross_tokenizer_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    shared_teacher: torch.Tensor,
    shared_student: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-pair divergence in nats, not multiplied by T^2.

    Args:
        student_logits: (K, Vs) the student's logits at the pairs' student positions.
        teacher_logits: (K, Vt) the teacher's logits at the pairs' teacher positions.
        shared_teacher, shared_student: (S,) ids of the shared tokens, in matching order.
        temperature: T > 0 for both.

    Returns:
        (K,) fp32: the shared tokens' KL terms plus the ULD distance of the rest.
    """
    if shared_teacher.shape != shared_student.shape:
        raise ValueError("shared_teacher and shared_student must pair ids one to one")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    lp, lq = log_p[:, shared_teacher], log_q[:, shared_student]
    exact = (lp.exp() * (lp - lq)).sum(-1)
    return exact + _uld_of_rest(log_p.exp(), log_q.exp(), shared_teacher, shared_student)


def _uld_of_rest(p: torch.Tensor, q: torch.Tensor, shared_teacher, shared_student) -> torch.Tensor:
    """L1 distance between the sorted probabilities of the tokens each side does not share."""
    rest_p = _without(p, shared_teacher)
    rest_q = _without(q, shared_student)
    width = max(rest_p.shape[-1], rest_q.shape[-1])
    if width == 0:
        return p.new_zeros(p.shape[0])
    sorted_p = F.pad(rest_p.sort(dim=-1, descending=True).values, (0, width - rest_p.shape[-1]))
    sorted_q = F.pad(rest_q.sort(dim=-1, descending=True).values, (0, width - rest_q.shape[-1]))
    return (sorted_p - sorted_q).abs().sum(-1)


def _without(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(probs.shape[-1], dtype=torch.bool, device=probs.device)
    keep[ids] = False
    return probs[:, keep]


def aligned_distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_positions: torch.Tensor,
    shared_teacher: torch.Tensor,
    shared_student: torch.Tensor,
    *,
    temperature: float,
    kd_weight: float,
    scale_by_t2: bool = True,
    num_tokens: int | float | None = None,
) -> LossParts:
    """``kd_weight * T^2 * KD + (1 - kd_weight) * CE`` for a teacher with another tokenizer.

    CE is the student's, on its own tokens (every valid target). KD is
    ``cross_tokenizer_divergence`` at the aligned pairs only: ``teacher_logits`` (K, Vt) at the
    teacher's positions of the pairs, ``student_positions`` (K,) the student's, as flat indices
    into its (B * (L - 1)) predicting positions. Positions without a partner (inside a span
    that one side writes in more tokens than the other) have no KD term. Both sums are
    divided by ``num_tokens``, the count of the student's targets, as in every other loss: with
    one tokenizer every position is a pair and this is the ordinary KD loss.
    """
    check_loss_args(temperature, kd_weight, "forward_kl")
    flat = student_logits.reshape(-1, student_logits.shape[-1])
    y = targets.reshape(-1)
    valid = y != IGNORE_INDEX
    num_valid = int(valid.sum())
    ce_sum = F.cross_entropy(flat[valid].float(), y[valid], reduction="sum")
    if kd_weight > 0 and len(student_positions):
        kd_unscaled_sum = cross_tokenizer_divergence(
            flat[student_positions], teacher_logits, shared_teacher, shared_student, temperature
        ).sum()
    else:
        kd_unscaled_sum = ce_sum.new_zeros(())
    denom = normaliser(num_tokens, num_valid)
    kd_sum = kd_unscaled_sum * (temperature**2 if scale_by_t2 else 1.0)
    return LossParts(
        total=(kd_weight * kd_sum + (1.0 - kd_weight) * ce_sum) / denom,
        kd=(kd_sum / denom).detach(),
        kd_unscaled=(kd_unscaled_sum / denom).detach(),
        ce=(ce_sum / denom).detach(),
        num_valid=num_valid,
    )
