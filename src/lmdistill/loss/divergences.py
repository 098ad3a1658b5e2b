"""The registry of KD divergences: one entry per divergence, used by every loss path.

Each entry names a divergence between the teacher's distribution q and the student's p (both
softened by the KD temperature T) and gives it in two forms:

- ``per_token(log_p, log_q, params) -> (N,)``: the reference, from fp32 log-probabilities,
  differentiable with autograd. The full-logits loss (``dense.distillation_loss``) and the
  evaluation use it.
- ``chunk(ls, lt, params, need_grad, ws) -> (sum, dD/ds)``: the same divergence summed over a
  chunk of rows together with its closed-form gradient with respect to the student's scaled
  logits s = z_s / T. The fused chunked loss (``chunked.py``) uses it to push the gradient
  through the lm_head without autograd. ``None`` when there is no closed form; then
  ``loss.impl: auto`` takes the full path and ``chunked`` is refused with a clear error.

Adding a divergence is one ``Divergence(...)`` entry in ``REGISTRY`` plus its tests (value and
gradient of both forms against a float64 reference written in the test).

Conventions. Everything is fp32 log space: probabilities are formed only to multiply a
difference of logs, an entry with zero probability contributes exactly zero (0 log 0 = 0),
and nothing divides by a probability. Mixtures are formed as ``logaddexp`` of log-weighted
log-probabilities, never as ``log(a p + b q)``, which underflows. The chunk functions may
overwrite ``lt`` (the teacher's log-probs) but never ``ls``; ``ws(slot, rows)`` hands out
reusable fp32 scratch buffers (slots 0, 4 and 5 are theirs; it returns None when every op
should allocate, as under torch.compile). The gradient they return is never in slot 0: the
caller stages the student's logits there for the CE term while it still holds that gradient.

Closed-form gradients, per row, with p = softmax(s) and dp_i/ds_j = p_i (delta_ij - p_j), so
that for any D(p) the gradient is dD/ds_j = p_j (g_j - sum_k p_k g_k) with g = dD/dp:

  forward_kl       KL(q || p)                         dD/ds = p - q
  reverse_kl       KL(p || q)                         dD/ds = p (log p - log q - D)
  jsd(beta)        beta KL(q || m) + (1 - beta) KL(p || m),  m = beta q + (1 - beta) p
                                                      dD/ds = (1 - beta) p (log p - log m - KL(p || m))
  skew_kl(a)       KL(q || m),  m = a q + (1 - a) p   dD/ds = -(1 - a) (t - p sum t),  t = p q / m
  skew_reverse_kl  KL(p || m),  m = (1 - a) q + a p   dD/ds = p (g - sum p g),  g = log p - log m - a p / m
  tvd              1/2 sum |p - q|                     dD/ds = p (h - sum p h),  h = sign(p - q) / 2

The JSD form holds because the terms through log m sum to (1 - beta) sum_i dp_i/ds_j = 0.
``jsd`` follows TRL's GKD definition at its ends: beta = 0 is forward KL and beta = 1 is
reverse KL exactly (the mixture formula itself tends to 0 there). ``skew_kl`` and
``skew_reverse_kl`` are DistiLLM's (Ko et al., 2024); skew_alpha = 0 is forward and reverse KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_FP32_MIN = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class DivergenceParams:
    """Shape parameters of the divergences that have one (``distill.jsd_beta``, ``distill.skew_alpha``).

    Checked once, here: a ValueError names the parameter and its range, so every loss, the
    evaluation and the config refuse the same values with the same words."""

    jsd_beta: float = 0.5
    skew_alpha: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(
                f"jsd_beta = {self.jsd_beta!r} is not allowed: must be in [0, 1] (0 = forward_kl, 1 = reverse_kl)"
            )
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ValueError(f"skew_alpha = {self.skew_alpha!r} is not allowed: must be in [0, 1) (0 = no skew)")


def _no_workspace(slot: int, rows: int, dtype: torch.dtype = torch.float32) -> None:
    return None


# --------------------------------------------------------------------------------------------
# Per-token reference forms: (N, V) fp32 log-probs -> (N,) nats, autograd-differentiable.
# --------------------------------------------------------------------------------------------


def _xlogy_ratio(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Elementwise a * (log a - log b) with the convention 0 * anything = 0.

    ``F.kl_div(..., log_target=True)`` computes exp(t) * (t - s), which is 0 * (-inf) = NaN
    wherever the target has a -inf log-probability. Selecting instead of multiplying keeps
    such entries exactly zero, forward and back.
    """
    a = log_a.exp()
    out = a * (log_a - log_b)
    return torch.where(a > 0, out, torch.zeros_like(out))


def _log_mix(log_a: Tensor, weight_a: float, log_b: Tensor) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b) from log a and log b, for 0 < weight_a < 1."""
    return torch.logsumexp(
        torch.stack([log_a + torch.log(torch.tensor(weight_a)), log_b + torch.log(torch.tensor(1 - weight_a))]),
        dim=0,
    )


def forward_kl(log_p: Tensor, log_q: Tensor, params: DivergenceParams) -> Tensor:
    return _xlogy_ratio(log_q, log_p).sum(dim=-1)


def reverse_kl(log_p: Tensor, log_q: Tensor, params: DivergenceParams) -> Tensor:
    return _xlogy_ratio(log_p, log_q).sum(dim=-1)


def jsd(log_p: Tensor, log_q: Tensor, params: DivergenceParams) -> Tensor:
    beta = params.jsd_beta
    if beta == 0.0:
        return forward_kl(log_p, log_q, params)
    if beta == 1.0:
        return reverse_kl(log_p, log_q, params)
    log_m = _log_mix(log_q, beta, log_p)
    return (beta * _xlogy_ratio(log_q, log_m) + (1 - beta) * _xlogy_ratio(log_p, log_m)).sum(dim=-1)


def skew_kl(log_p: Tensor, log_q: Tensor, params: DivergenceParams) -> Tensor:
    alpha = params.skew_alpha
    if alpha == 0.0:
        return forward_kl(log_p, log_q, params)
    return _xlogy_ratio(log_q, _log_mix(log_q, alpha, log_p)).sum(dim=-1)


def skew_reverse_kl(log_p: Tensor, log_q: Tensor, params: DivergenceParams) -> Tensor:
    alpha = params.skew_alpha
    if alpha == 0.0:
        return reverse_kl(log_p, log_q, params)
    return _xlogy_ratio(log_p, _log_mix(log_p, alpha, log_q)).sum(dim=-1)


def tvd(log_p: Tensor, log_q: Tensor, params: DivergenceParams) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


# --------------------------------------------------------------------------------------------
# Fused chunk forms: (sum over the chunk, dD/ds per entry or None). ``lt`` may be consumed.
# --------------------------------------------------------------------------------------------


def _log_mixture(log_a: Tensor, weight_a: float, log_b: Tensor, ws, rows: int) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b) in slot 4, 0 < weight_a < 1: finite wherever a or
    b is non-zero, never formed as a log of a sum of probabilities. Written as
    log(1 - w) + logaddexp(log a + log(w / (1 - w)), log b), so that no second (rows x vocab)
    buffer holds log b + log(1 - w)."""
    log_m = torch.add(log_a, math.log(weight_a) - math.log1p(-weight_a), out=ws(4, rows))
    return torch.logaddexp(log_m, log_b, out=log_m).add_(math.log1p(-weight_a))


def _softmax_jacobian(g: Tensor, p: Tensor, scratch: Tensor | None) -> Tensor:
    """p * (g - sum(p * g)) row by row, in place in ``g``: dD/ds from g = dD/dp."""
    row = torch.mul(p, g, out=scratch).sum(dim=-1, keepdim=True)
    return g.sub_(row).mul_(p)


def _forward_kl_chunk(ls: Tensor, lt: Tensor, params: DivergenceParams, need_grad: bool, ws=_no_workspace):
    rows = ls.shape[0]
    pt = torch.exp(lt, out=ws(0, rows))
    # q * (log q - log p) with 0 * log 0 = 0: a -inf teacher log-prob is clamped to the most
    # negative finite float, so that entry is 0 * (huge) = 0 rather than 0 * inf = NaN.
    # log p <= 0, so subtracting it cannot push the clamped value to -inf.
    entries = lt.clamp_(min=_FP32_MIN).sub_(ls).mul_(pt)
    kd = entries.sum()
    if not need_grad:
        return kd, None
    grad = entries.copy_(ls).exp_().sub_(pt)  # p - q, in the buffer just freed
    return kd, grad


def _reverse_kl_chunk(ls: Tensor, lt: Tensor, params: DivergenceParams, need_grad: bool, ws=_no_workspace):
    """A teacher zero (log q = -inf) where the student has mass makes the divergence +inf by
    definition, as in the per-token form; the trainer's non-finite guard handles that."""
    rows = ls.shape[0]
    ps = torch.exp(ls, out=ws(0, rows))
    diff = lt.neg_().add_(ls)  # log p - log q: finite, or +inf where q == 0
    # p * diff is NaN only for p == 0 (underflow) times diff == inf; such an entry is 0 by
    # the 0 * anything = 0 convention. Infinities are kept: they are the true value.
    inf = float("inf")
    entries = torch.mul(ps, diff, out=ws(4, rows)).nan_to_num_(nan=0.0, posinf=inf, neginf=-inf)
    per_row = entries.sum(dim=-1, keepdim=True)
    kd = per_row.sum()
    if not need_grad:
        return kd, None
    grad = entries.copy_(diff).sub_(per_row).mul_(ps).nan_to_num_(nan=0.0, posinf=inf, neginf=-inf)
    return kd, grad


def _jsd_chunk(ls: Tensor, lt: Tensor, params: DivergenceParams, need_grad: bool, ws=_no_workspace):
    beta = params.jsd_beta
    if beta == 0.0:
        return _forward_kl_chunk(ls, lt, params, need_grad, ws)
    if beta == 1.0:
        return _reverse_kl_chunk(ls, lt, params, need_grad, ws)
    rows = ls.shape[0]
    pt = torch.exp(lt, out=ws(0, rows))
    log_m = _log_mixture(lt, beta, ls, ws, rows)  # m = beta q + (1 - beta) p >= (1 - beta) p
    # Teacher side: q * (log q - log m), clamping -inf as in the forward KL.
    kd_t = lt.clamp_(min=_FP32_MIN).sub_(log_m).mul_(pt).sum()
    del pt
    ratio = log_m.neg_().add_(ls)  # log p - log m, finite
    ps = torch.exp(ls, out=ws(0, rows))
    kl_sm_rows = torch.mul(ratio, ps, out=lt).sum(dim=-1, keepdim=True)  # KL(p || m) per row
    kd = beta * kd_t + (1.0 - beta) * kl_sm_rows.sum()
    if not need_grad:
        return kd, None
    grad = ratio.sub_(kl_sm_rows).mul_(ps).mul_(1.0 - beta)
    return kd, grad


def _skew_kl_chunk(ls: Tensor, lt: Tensor, params: DivergenceParams, need_grad: bool, ws=_no_workspace):
    alpha = params.skew_alpha
    if alpha == 0.0:
        return _forward_kl_chunk(ls, lt, params, need_grad, ws)
    rows = ls.shape[0]
    log_m = _log_mixture(lt, alpha, ls, ws, rows)  # m = a q + (1 - a) p
    # t = p q / m, from logs: exactly 0 where q == 0, and at most p / alpha.
    t = torch.add(ls, lt, out=ws(5, rows)).sub_(log_m).exp_()
    pt = torch.exp(lt, out=ws(0, rows))
    kd = lt.clamp_(min=_FP32_MIN).sub_(log_m).mul_(pt).sum()  # q (log q - log m), 0 where q == 0
    if not need_grad:
        return kd, None
    ps = torch.exp(ls, out=lt)  # lt is spent; slot 0 must be free when we return
    t_rows = t.sum(dim=-1, keepdim=True)
    grad = ps.mul_(t_rows).sub_(t).mul_(1.0 - alpha)  # -(1 - a) (t - p sum t)
    return kd, grad


def _skew_reverse_kl_chunk(ls: Tensor, lt: Tensor, params: DivergenceParams, need_grad: bool, ws=_no_workspace):
    alpha = params.skew_alpha
    if alpha == 0.0:
        return _reverse_kl_chunk(ls, lt, params, need_grad, ws)
    rows = ls.shape[0]
    log_m = _log_mixture(ls, alpha, lt, ws, rows)  # m = a p + (1 - a) q
    ratio = log_m.neg_().add_(ls)  # log p - log m <= -log(alpha): finite
    ps = torch.exp(ls, out=ws(0, rows))
    kd = torch.mul(ps, ratio, out=ws(5, rows)).sum()
    if not need_grad:
        return kd, None
    g = torch.exp(ratio, out=lt).mul_(-alpha).add_(ratio)  # log p - log m - a p / m
    return kd, _softmax_jacobian(g, ps, ws(5, rows))


def _tvd_chunk(ls: Tensor, lt: Tensor, params: DivergenceParams, need_grad: bool, ws=_no_workspace):
    rows = ls.shape[0]
    ps = torch.exp(ls, out=ws(0, rows))
    diff = lt.exp_().neg_().add_(ps)  # p - q
    kd = 0.5 * torch.abs(diff, out=ws(4, rows)).sum()
    if not need_grad:
        return kd, None
    return kd, _softmax_jacobian(diff.sign_().mul_(0.5), ps, ws(4, rows))  # (|p - q| is spent)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Divergence:
    """One KD divergence: its name, what it computes, and its two forms (see the module docstring)."""

    name: str
    formula: str
    per_token: Callable[[Tensor, Tensor, DivergenceParams], Tensor]
    chunk: Callable | None
    params: tuple[str, ...] = ()


REGISTRY: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence("forward_kl", "KL(teacher || student), the classic KD term", forward_kl, _forward_kl_chunk),
        Divergence("reverse_kl", "KL(student || teacher), mode-seeking", reverse_kl, _reverse_kl_chunk),
        Divergence(
            "jsd",
            "generalised Jensen-Shannon with weight jsd_beta on the teacher (0 = forward KL, 1 = reverse KL)",
            jsd,
            _jsd_chunk,
            ("jsd_beta",),
        ),
        Divergence(
            "skew_kl",
            "KL(teacher || a*teacher + (1-a)*student), a = skew_alpha",
            skew_kl,
            _skew_kl_chunk,
            ("skew_alpha",),
        ),
        Divergence(
            "skew_reverse_kl",
            "KL(student || (1-a)*teacher + a*student), a = skew_alpha",
            skew_reverse_kl,
            _skew_reverse_kl_chunk,
            ("skew_alpha",),
        ),
        Divergence("tvd", "total variation distance, 1/2 sum |teacher - student|", tvd, _tvd_chunk),
    )
}

DIVERGENCES: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> Divergence:
    """The registry entry for ``name``; a ValueError that lists the choices otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}") from None
