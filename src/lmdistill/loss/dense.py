"""Distillation losses as pure functions of logits.

Everything here runs in fp32 log space whatever dtype the models produce: logits are
upcast before the temperature is applied, probabilities never leave log space until
they are multiplied by a difference of logs, and entries a distribution gives zero
probability (teacher logits of -inf, masked vocabulary) contribute exactly zero.
That is what keeps T = 3, 5 or 10 finite; the T^2 factor only rescales the KD
gradient back to the size of the cross-entropy gradient (Hinton et al. 2015).

Reduction rule: every term is a *sum* over valid target tokens divided once by a token
count the caller supplies -- the global count across micro-batches and ranks -- so
gradient accumulation and data parallelism do not change the result. A batch without
valid tokens contributes exactly 0 and a zero gradient.

The divergences themselves live in ``divergences.REGISTRY``; this module applies one to
logits. ``chunked.py`` computes the same loss from hidden states without full logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmdistill.core.batch import IGNORE_INDEX
from lmdistill.loss import divergences
from lmdistill.loss.divergences import DIVERGENCES, DivergenceParams

__all__ = ["DIVERGENCES", "IGNORE_INDEX", "LossParts", "distillation_loss", "token_divergence"]


def check_loss_args(temperature: float, kd_weight: float, divergence: str) -> divergences.Divergence:
    """ValueError for an argument no loss accepts; the divergence's registry entry otherwise."""
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return divergences.get(divergence)


def normaliser(num_tokens: int | float | torch.Tensor | None, num_valid: int) -> float:
    """The one denominator of every term: ``num_tokens`` (global), else this call's count; >= 1.

    With no valid token anywhere every sum is 0, and 0 / 1 = 0 rather than 0 / 0.
    """
    denom = float(num_tokens) if num_tokens is not None else float(num_valid)
    return max(denom, 1.0)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    divergence: str = "forward_kl",
    *,
    params: DivergenceParams = DivergenceParams(),
) -> torch.Tensor:
    """Per-token divergence between temperature-softened distributions, in nats.

    Args:
        student_logits: (N, V) any float dtype.
        teacher_logits: (N, V) any float dtype, same V (slice padded rows first).
        temperature: T > 0; both models' logits are divided by it.
        divergence: a name from ``divergences.REGISTRY`` (``forward_kl`` = KL(teacher ||
            student), the classic KD term; ``reverse_kl``; ``jsd``; ``skew_kl``;
            ``skew_reverse_kl``; ``tvd``).
        params: the parameters of ``jsd`` and of the skewed KLs (``DivergenceParams``).

    Returns:
        (N,) fp32, not multiplied by T^2.
    """
    entry = divergences.get(divergence)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return entry.per_token(log_s, log_t, params)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """``hidden`` through an output layer cut to its tokenizer's ``vocab`` rows (layers padded past
    the tokenizer have more): the logits the losses compare."""
    return F.linear(hidden, weight[:vocab], bias[:vocab] if bias is not None else None)


@dataclass
class LossParts:
    """The pieces of one distillation loss evaluation.

    ``total`` carries the graph; the others are detached fp32 scalars except where noted.
    All are already divided by ``num_tokens`` (the normaliser the caller passed).
    """

    total: torch.Tensor
    kd: torch.Tensor  # KD term with the T^2 factor (when enabled), the one in ``total``
    kd_unscaled: torch.Tensor  # the same divergence without T^2
    ce: torch.Tensor  # student next-token cross-entropy
    num_valid: int  # valid target tokens in *this* call (not the normaliser)
    hidden: torch.Tensor | None = None  # the hidden-state term, unweighted (when distill.hidden is on)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float,
    kd_weight: float,
    scale_by_t2: bool = True,
    divergence: str = "forward_kl",
    params: DivergenceParams = DivergenceParams(),
    ignore_index: int = IGNORE_INDEX,
    num_tokens: int | float | torch.Tensor | None = None,
    all_valid: bool = False,
) -> LossParts:
    """``kd_weight * KD + (1 - kd_weight) * CE`` summed over valid tokens, divided once.

    Args:
        student_logits: (..., V) student logits aligned with ``targets`` (already
            shifted: position i predicts ``targets[i]``).
        teacher_logits: (..., V) or None when ``kd_weight == 0``.
        targets: (...) int64 token ids; ``ignore_index`` marks positions without a target.
        temperature: KD temperature T > 0 (the CE term always uses T = 1).
        kd_weight: in [0, 1].
        scale_by_t2: multiply the divergence by T^2.
        divergence, params: see :func:`token_divergence`.
        num_tokens: the normaliser. Pass the global count of valid targets across
            micro-batches and ranks; defaults to this call's own count.
        all_valid: the caller knows that no target is ``ignore_index`` (packed text
            blocks): the masking is skipped, and with it a device sync.

    Returns:
        LossParts; with no valid tokens every part is 0 and gradients are zero.
    """
    entry = check_loss_args(temperature, kd_weight, divergence)
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    y = targets.reshape(-1)
    if all_valid:
        num_valid = y.numel()
        s_valid, y_valid = s, y
    else:
        valid = y != ignore_index
        num_valid = int(valid.sum())
        # Only rows with a target enter the softmax; an empty selection yields 0-sums.
        s_valid, y_valid = s[valid], y[valid]
    denom = normaliser(num_tokens, num_valid)

    ce_sum = F.cross_entropy(s_valid.float(), y_valid, reduction="sum")
    if kd_weight > 0:
        if teacher_logits is None:
            raise ValueError("teacher_logits is required when kd_weight > 0")
        t_valid = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        if not all_valid:
            t_valid = t_valid[valid]
        if t_valid.shape[-1] != vocab:
            raise ValueError(
                f"student and teacher logits differ in vocabulary size ({vocab} vs "
                f"{t_valid.shape[-1]}); slice both to the tokenizer's length first"
            )
        log_s = F.log_softmax(s_valid.float() / temperature, dim=-1)
        log_t = F.log_softmax(t_valid.float() / temperature, dim=-1)
        kd_unscaled_sum = entry.per_token(log_s, log_t, params).sum()
    else:
        kd_unscaled_sum = ce_sum.new_zeros(())
    t2 = temperature**2 if scale_by_t2 else 1.0
    kd_sum = kd_unscaled_sum * t2

    total = (kd_weight * kd_sum + (1.0 - kd_weight) * ce_sum) / denom
    return LossParts(
        total=total,
        kd=(kd_sum / denom).detach(),
        kd_unscaled=(kd_unscaled_sum / denom).detach(),
        ce=(ce_sum / denom).detach(),
        num_valid=num_valid,
    )
