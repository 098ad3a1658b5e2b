"""The KD term between a teacher and a student that do not share a tokenizer.

Inputs come from ``data/alignment.py``: pairs of positions (teacher position, student position)
where both models have read the same text and are about to write the same text, and
``mapping``, for every teacher token the student token that the same text begins with
(``vocabulary_map``). At each pair the teacher's next-token distribution p (at temperature T)
is carried to the student's vocabulary -- each teacher token's probability goes to the student
token its text begins with, so the teacher's " collection" counts for the student's " co" when
that is how the student starts to write it -- and the term is forward KL from that carried
distribution to the student's q at T. Probability on teacher tokens that map to nothing (the
teacher's special tokens) is left out and the rest renormalised.

With one tokenizer on both sides every token maps to itself and the term is the forward KL over
the whole vocabulary at every position: the ordinary KD term, value and gradient (tested).

An earlier form kept forward KL on the tokens both vocabularies share and compared the rest with
ULD's sorted-probability distance (Boizard et al., 2024), as GOLD does. It did not help the
student (docs/cross-tokenizer.md): a shared short token means "this text, then a token boundary"
to the teacher, which puts its probability on the longer tokens the student lacks, so the KL
taught the student to avoid the very tokens it needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmdistill.core.batch import IGNORE_INDEX
from lmdistill.loss.dense import LossParts, check_loss_args, normaliser


def carried_distribution(teacher_logits: torch.Tensor, mapping: torch.Tensor, vocab: int, temperature: float):
    """(K, vocab) fp32: the teacher's distribution at T carried to the student's vocabulary."""
    p = F.softmax(teacher_logits.float() / temperature, dim=-1)
    mapped = mapping >= 0
    carried = p.new_zeros((p.shape[0], vocab)).index_add_(1, mapping[mapped], p[:, mapped])
    return carried / carried.sum(-1, keepdim=True).clamp_min(torch.finfo(carried.dtype).tiny)


def cross_tokenizer_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mapping: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-pair KL(carried teacher || student) in nats, not multiplied by T^2.

    Args:
        student_logits: (K, Vs) the student's logits at the pairs' student positions.
        teacher_logits: (K, Vt) the teacher's logits at the pairs' teacher positions.
        mapping: (Vt,) int64, the student id each teacher id carries its probability to (-1: none).
        temperature: T > 0 for both.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    carried = carried_distribution(teacher_logits, mapping, log_q.shape[-1], temperature)
    return (torch.xlogy(carried, carried) - carried * log_q).sum(-1)


def aligned_distillation_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_positions: torch.Tensor,
    mapping: torch.Tensor,
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
            flat[student_positions], teacher_logits, mapping, temperature
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


def chunked_cross_tokenizer_kd(
    student_hidden: torch.Tensor,
    student_head: tuple[torch.Tensor, torch.Tensor | None],
    teacher_hidden: torch.Tensor,
    teacher_head: tuple[torch.Tensor, torch.Tensor | None],
    mapping: torch.Tensor,
    *,
    temperature: float,
    vocab_sizes: tuple[int, int],
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The sum over K pairs of ``cross_tokenizer_divergence``, from the two models' final hidden
    states at the pairs ((K, Hs) and (K, Ht)) and their output layers ((weight, bias) each),
    holding ``chunk_size`` rows of each model's logits at a time: each chunk's logits are formed,
    reduced to its sum and dropped, and formed again in the backward (activation checkpointing),
    so memory does not grow with K x the teacher's vocabulary. ``vocab_sizes``: (student,
    teacher) tokenizer lengths, where output layers padded past them are cut."""
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(student_hidden), chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(
            _chunk_divergence,
            student_hidden[rows],
            *student_head,
            teacher_hidden[rows],
            *teacher_head,
            mapping,
            temperature,
            vocab_sizes,
            use_reentrant=False,
        )
    return total


def _chunk_divergence(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mapping, temperature, vocab):
    student = F.linear(s_hidden, s_weight[: vocab[0]], s_bias[: vocab[0]] if s_bias is not None else None)
    teacher = F.linear(t_hidden, t_weight[: vocab[1]], t_bias[: vocab[1]] if t_bias is not None else None)
    return cross_tokenizer_divergence(student, teacher, mapping, temperature).sum()
