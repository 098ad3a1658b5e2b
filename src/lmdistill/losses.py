"""Distillation losses as pure functions of logits.

Everything here runs in fp32 log space whatever dtype the models produce: logits are
upcast before the temperature is applied, probabilities never leave log space until
they are multiplied by a difference of logs, and entries a distribution gives zero
probability (teacher logits of -inf, masked vocabulary) contribute exactly zero.
That is what keeps T = 3, 5 or 10 finite; the T^2 factor only rescales the KD
gradient back to the size of the cross-entropy gradient (Hinton et al. 2015).

Reduction rule (DESIGN.md): every term is a *sum* over valid target tokens divided
once by a token count the caller supplies -- the global count across micro-batches
and ranks -- so gradient accumulation and data parallelism do not change the result.
A batch without valid tokens contributes exactly 0 and a zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")


def _xlogy_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise p * (log p - log q) with the convention 0 * anything = 0.

    ``F.kl_div(..., log_target=True)`` computes exp(t) * (t - s), which is
    0 * (-inf) = NaN wherever the target has a -inf log-probability. We select
    instead of multiplying so that such entries are exactly zero, forward and back.
    """
    p = log_p.exp()
    out = p * (log_p - log_q)
    return torch.where(p > 0, out, torch.zeros_like(out))


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    divergence: Divergence = "forward_kl",
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Per-token divergence between temperature-softened distributions, in nats.

    Args:
        student_logits: (N, V) any float dtype.
        teacher_logits: (N, V) any float dtype, same V (slice padded rows first).
        temperature: T > 0; both models' logits are divided by it.
        divergence: ``forward_kl`` = KL(teacher || student), the classic KD term;
            ``reverse_kl`` = KL(student || teacher); ``jsd`` = generalised
            Jensen-Shannon with mixture weight ``jsd_beta`` on the teacher.

    Returns:
        (N,) fp32, not multiplied by T^2.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "forward_kl":
        per_entry = _xlogy_ratio(log_t, log_s)
    elif divergence == "reverse_kl":
        per_entry = _xlogy_ratio(log_s, log_t)
    elif divergence == "jsd":
        beta = jsd_beta
        # log of the mixture m = beta * p_t + (1 - beta) * p_s, computed in log space.
        log_m = torch.logsumexp(
            torch.stack([log_t + torch.log(torch.tensor(beta)), log_s + torch.log(torch.tensor(1 - beta))]),
            dim=0,
        )
        per_entry = beta * _xlogy_ratio(log_t, log_m) + (1 - beta) * _xlogy_ratio(log_s, log_m)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    return per_entry.sum(dim=-1)


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


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float,
    kd_weight: float,
    scale_by_t2: bool = True,
    divergence: Divergence = "forward_kl",
    ignore_index: int = IGNORE_INDEX,
    num_tokens: int | float | torch.Tensor | None = None,
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
        num_tokens: the normaliser. Pass the global count of valid targets across
            micro-batches and ranks; defaults to this call's own count.

    Returns:
        LossParts; with no valid tokens every part is 0 and gradients are zero.
    """
    if not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    y = targets.reshape(-1)
    valid = y != ignore_index
    num_valid = int(valid.sum())
    denom = float(num_tokens) if num_tokens is not None else float(max(num_valid, 1))
    denom = max(denom, 1.0)  # 0 valid tokens anywhere: every sum is 0, so 0/1 = 0

    # Only rows with a target enter the softmax; an empty selection yields 0-sums.
    s_valid = s[valid]
    ce_sum = F.cross_entropy(s_valid.float(), y[valid], reduction="sum")

    if kd_weight > 0:
        if teacher_logits is None:
            raise ValueError("teacher_logits is required when kd_weight > 0")
        t_valid = teacher_logits.reshape(-1, teacher_logits.shape[-1])[valid]
        if t_valid.shape[-1] != vocab:
            raise ValueError(
                f"student and teacher logits differ in vocabulary size ({vocab} vs "
                f"{t_valid.shape[-1]}); slice both to the tokenizer's length first"
            )
        kd_unscaled_sum = token_divergence(s_valid, t_valid, temperature, divergence).sum()
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


def shift_for_next_token(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Align (B, L, V) logits with next-token targets: position i predicts token i+1.

    Returns logits (B, L-1, V) and targets (B, L-1) with padding set to ``ignore_index``.
    """
    targets = input_ids[:, 1:].clone()
    if attention_mask is not None:
        targets[attention_mask[:, 1:] == 0] = ignore_index
    return logits[:, :-1, :], targets
