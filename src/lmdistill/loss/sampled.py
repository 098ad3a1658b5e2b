"""The sampled-token loss of on-policy steps: reverse KL estimated from the tokens the student wrote.

On text the student wrote itself, only the teacher's log-probability of each written token is
needed: ``sampled_token_loss`` turns log q(x) - log p(x) into a score-function estimator of the
reverse-KL gradient (see its docstring). The token log-probabilities come from whole logits or,
chunk by chunk, from hidden states and an output layer.
"""

from __future__ import annotations

import torch

from lmdistill.core.batch import IGNORE_INDEX
from lmdistill.loss.dense import LossParts, normaliser


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] at every position, fp32 (0 where the target is -100)."""
    safe = targets.clamp(min=0).unsqueeze(-1)
    return torch.log_softmax(logits.float(), -1).gather(-1, safe).squeeze(-1)


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    vocab_size: int,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The same from hidden states (..., H) and an output layer, one chunk of rows' logits at a
    time: under autograd each chunk is recomputed in backward (activation checkpointing), so
    no (tokens x vocab) tensor is kept."""
    from torch.utils.checkpoint import checkpoint

    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    w, b = weight[:vocab_size], (bias[:vocab_size] if bias is not None else None)

    def chunk(h, y):
        return token_logprobs(torch.nn.functional.linear(h, w, b), y)

    parts = []
    for start in range(0, len(flat_y), chunk_size):
        h, y = flat_h[start : start + chunk_size], flat_y[start : start + chunk_size]
        parts.append(checkpoint(chunk, h, y, use_reentrant=False) if torch.is_grad_enabled() else chunk(h, y))
    return torch.cat(parts).reshape(targets.shape)


def teacher_token_logprobs(view, targets: torch.Tensor, vocab_size: int, chunk_size: int = 1024) -> torch.Tensor:
    """log p_teacher(target) at every position (B, L-1), fp32, from a live teacher's view: its
    logits, or its hidden states and output layer (one chunk of rows' logits at a time)."""
    with torch.no_grad():
        if hasattr(view, "logits"):
            return token_logprobs(view.logits[..., :vocab_size], targets)
        return token_logprobs_from_hidden(view.hidden, view.weight, view.bias, targets, vocab_size, chunk_size)


def sampled_token_loss(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, targets: torch.Tensor, num_tokens: float
):
    """The per-token reverse-KL estimator on the student's own samples.

    ``student_logp``: log q(x) of each written token x (with its graph); ``teacher_logp``:
    log p(x). ``k(x) = log q(x) - log p(x)`` (student minus teacher, at temperature 1) is a
    one-sample estimate of KL(q || p) at that position. Used as a fixed advantage on the
    student's log-probability, ``loss = k(x) log q(x)``, its gradient ``k(x) grad log q(x)`` has,
    over x ~ q, the expected value of the exact reverse-KL gradient (score function:
    ``sum_x q(x) grad log q(x) = 0``). Only the teacher's log-probability of the written token is
    needed. The value of ``total`` and ``kd`` is the mean of k (the per-token reverse-KL
    estimate); ``ce`` is the student's NLL of its own text (not trained).
    """

    valid = targets != IGNORE_INDEX
    logq = student_logp
    advantage = (logq - teacher_logp).detach()
    denom = normaliser(num_tokens, int(valid.sum()))
    zero = logq.new_zeros(())
    # value: the mean of k (what is logged as the loss); gradient: k grad log q
    total = torch.where(valid, advantage * (1 + logq - logq.detach()), zero).sum() / denom
    kd = torch.where(valid, advantage, zero).sum() / denom
    ce = -torch.where(valid, logq, zero).sum().detach() / denom
    return LossParts(total=total, kd=kd, kd_unscaled=kd, ce=ce, num_valid=int(valid.sum()))
