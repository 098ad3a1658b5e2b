"""Every divergence of the registry, in both loss paths, against float64 references written here.

The references below are plain probability-space formulas in float64, differentiated by
autograd; they share no code with lmdistill. Each divergence is checked in value and in
gradient, at T = 1, 3 and 10, mixed with the CE term, with ignored positions and with a
vocabulary padded past the tokenizer:

- the full path: ``dense.distillation_loss`` (autograd) and ``chunked.fused_logits_distillation_loss``
  (closed-form gradients, what the trainer runs) on logits sliced to the real vocabulary;
- the chunked path: ``chunked.fused_linear_distillation_loss`` on hidden states and lm_head
  weights with padded rows (``vocab_size``), with its hand-derived gradients.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from lmdistill.loss.chunked import fused_linear_distillation_loss, fused_logits_distillation_loss
from lmdistill.loss.dense import IGNORE_INDEX, distillation_loss
from lmdistill.loss.divergences import DIVERGENCES, REGISTRY, DivergenceParams

N, H, V, PAD = 23, 10, 37, 5  # tokens, hidden width, real vocabulary, padded rows
IGNORED = (1, 8, 9, 20)


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, probability space; 0 log 0 = 0."""
    return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(-1)


def reference(name: str, p: torch.Tensor, q: torch.Tensor, jsd_beta: float, skew_alpha: float) -> torch.Tensor:
    """D(teacher q, student p) per row, from the definitions (GKD's JSD, DistiLLM's skewed KLs)."""
    if name == "forward_kl" or (name == "jsd" and jsd_beta == 0) or (name == "skew_kl" and skew_alpha == 0):
        return kl(q, p)
    if name == "reverse_kl" or (name == "jsd" and jsd_beta == 1) or (name == "skew_reverse_kl" and skew_alpha == 0):
        return kl(p, q)
    if name == "jsd":
        m = jsd_beta * q + (1 - jsd_beta) * p
        return jsd_beta * kl(q, m) + (1 - jsd_beta) * kl(p, m)
    if name == "skew_kl":
        return kl(q, skew_alpha * q + (1 - skew_alpha) * p)
    if name == "skew_reverse_kl":
        return kl(p, (1 - skew_alpha) * q + skew_alpha * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(f"no reference for {name}: add one with the new registry entry")


def reference_loss(zs, zt, y, name, temperature, kd_weight, jsd_beta, skew_alpha):
    """kd_weight * T^2 * D + (1 - kd_weight) * CE, summed over valid rows, divided by their count."""
    valid = y != IGNORE_INDEX
    zs, zt, y = zs[valid], zt[valid], y[valid]
    p, q = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)
    kd = reference(name, p, q, jsd_beta, skew_alpha).sum()
    ce = -torch.log_softmax(zs, -1).gather(1, y[:, None]).sum()
    n = valid.sum()
    return (kd_weight * temperature**2 * kd + (1 - kd_weight) * ce) / n, kd / n


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V + PAD, H, generator=g, dtype=torch.float64) * 1.5
    ht = torch.randn(N, H + 3, generator=g, dtype=torch.float64)
    wt = torch.randn(V + PAD, H + 3, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(0, V, (N,), generator=g)
    y[list(IGNORED)] = IGNORE_INDEX
    return h, w, ht, wt, y


PARAMS = [(name, 0.5, 0.1) for name in DIVERGENCES] + [
    ("jsd", 0.0, 0.1),
    ("jsd", 1.0, 0.1),
    ("jsd", 0.2, 0.1),
    ("skew_kl", 0.5, 0.0),
    ("skew_kl", 0.5, 0.5),
    ("skew_reverse_kl", 0.5, 0.0),
    ("skew_reverse_kl", 0.5, 0.5),
]


def test_every_registry_entry_is_tested_here():
    assert {name for name, _, _ in PARAMS} == set(REGISTRY)


@pytest.mark.parametrize("loss_fn", [distillation_loss, fused_logits_distillation_loss], ids=["autograd", "closed"])
@pytest.mark.parametrize("temperature", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("name,jsd_beta,skew_alpha", PARAMS)
def test_full_path_value_and_gradient(name, jsd_beta, skew_alpha, temperature, loss_fn):
    h, w, ht, wt, y = inputs(seed=10 * DIVERGENCES.index(name) + int(temperature))
    zs = (h @ w.T).requires_grad_()  # (N, V + PAD): the model's padded logits
    zt = ht @ wt.T
    ref_total, ref_kd = reference_loss(zs[:, :V], zt[:, :V], y, name, temperature, 0.7, jsd_beta, skew_alpha)
    (ref_grad,) = torch.autograd.grad(ref_total, zs)

    ours_in = zs.detach().float().requires_grad_()
    parts = loss_fn(
        ours_in[:, :V],
        zt[:, :V].float(),
        y,
        temperature=temperature,
        kd_weight=0.7,
        divergence=name,
        params=DivergenceParams(jsd_beta, skew_alpha),
    )
    parts.total.backward()
    assert parts.kd_unscaled.item() == pytest.approx(ref_kd.item(), rel=2e-5, abs=1e-7)
    assert parts.total.item() == pytest.approx(ref_total.item(), rel=2e-5)
    torch.testing.assert_close(ours_in.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert ref_kd.item() > 1e-3  # the divergence is far from 0 here, so the checks could fail
    assert torch.all(ours_in.grad[:, V:] == 0) and torch.all(ours_in.grad[list(IGNORED)] == 0)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("name,jsd_beta,skew_alpha", PARAMS)
def test_chunked_path_value_and_gradient(name, jsd_beta, skew_alpha, temperature):
    assert REGISTRY[name].chunk is not None
    h, w, ht, wt, y = inputs(seed=100 + 10 * DIVERGENCES.index(name) + int(temperature))
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref_total, ref_kd = reference_loss(
        h_ref @ w_ref[:V].T, ht @ wt[:V].T, y, name, temperature, 0.7, jsd_beta, skew_alpha
    )
    ref_gh, ref_gw = torch.autograd.grad(ref_total, (h_ref, w_ref))

    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    parts = fused_linear_distillation_loss(
        h32,
        w32,
        ht.float(),
        wt.float(),
        y,
        temperature=temperature,
        kd_weight=0.7,
        divergence=name,
        params=DivergenceParams(jsd_beta, skew_alpha),
        vocab_size=V,
        chunk_size=6,
    )
    parts.total.backward()
    assert parts.kd_unscaled.item() == pytest.approx(ref_kd.item(), rel=2e-5, abs=1e-7)
    assert parts.total.item() == pytest.approx(ref_total.item(), rel=2e-5)
    torch.testing.assert_close(h32.grad.double(), ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w32.grad.double(), ref_gw, rtol=1e-4, atol=1e-6)
    assert torch.all(w32.grad[V:] == 0)  # padded rows get no probability and no gradient


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_masked_teacher_entries_stay_finite_in_both_paths(name):
    """A teacher logit of -inf (a banned token) has zero probability: divergences that stay finite
    there must not turn 0 * log 0 into NaN, in value or gradient."""
    h, w, ht, wt, y = inputs(seed=7)
    zt = (ht @ wt.T).float()
    zt[:, [2, 11]] = -math.inf
    y[y == 2] = 3
    y[y == 11] = 3
    zs = (h @ w.T).float().requires_grad_()
    parts = distillation_loss(zs[:, :V], zt[:, :V], y, temperature=2.0, kd_weight=1.0, divergence=name)
    parts.total.backward()
    assert math.isfinite(parts.total.item()) and torch.isfinite(zs.grad).all()
    ref_total, _ = reference_loss(zs.detach().double()[:, :V], zt.double()[:, :V], y, name, 2.0, 1.0, 0.5, 0.1)
    assert parts.total.item() == pytest.approx(ref_total.item(), rel=2e-5)


def test_zero_when_student_equals_teacher():
    z = torch.randn(6, 9) * 3
    y = torch.randint(0, 9, (6,))
    for name in DIVERGENCES:
        parts = distillation_loss(z, z.clone(), y, temperature=2.0, kd_weight=1.0, divergence=name)
        assert parts.kd.item() == pytest.approx(0.0, abs=1e-6), name


def test_jsd_ends_are_forward_and_reverse_kl_and_the_middle_is_continuous():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(8, 11, generator=g) * 2, torch.randn(8, 11, generator=g) * 2
    y = torch.randint(0, 11, (8,), generator=g)

    def kd(name, **kw):
        params = DivergenceParams(**kw)
        return distillation_loss(zs, zt, y, temperature=1.0, kd_weight=1.0, divergence=name, params=params).kd.item()

    assert kd("jsd", jsd_beta=0.0) == kd("forward_kl")
    assert kd("jsd", jsd_beta=1.0) == kd("reverse_kl")
    # GKD's convention: near beta = 0 the mixture formula is about beta * KL(teacher || student).
    assert kd("jsd", jsd_beta=1e-4) / 1e-4 == pytest.approx(kd("forward_kl"), rel=1e-2)
    assert kd("skew_kl", skew_alpha=0.0) == kd("forward_kl")
    assert kd("skew_reverse_kl", skew_alpha=0.0) == kd("reverse_kl")


def test_unknown_names_and_bad_parameters_are_refused():
    z, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="choose one of forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd"):
        distillation_loss(z, z, y, temperature=1.0, kd_weight=0.5, divergence="kl")
    with pytest.raises(ValueError, match=re.escape("jsd_beta = 1.5 is not allowed: must be in [0, 1]")):
        DivergenceParams(jsd_beta=1.5)
    with pytest.raises(ValueError, match=re.escape("skew_alpha = 1.0 is not allowed: must be in [0, 1)")):
        DivergenceParams(skew_alpha=1.0)


def test_closed_form_logits_loss_on_views_of_padded_3d_logits():
    """The trainer's call: ``logits[:, :-1, :V]`` of (B, L, V + pad) model outputs, a view that does
    not flatten; per-sequence blocks, chunks shorter than a sequence, bf16 in and out."""
    g = torch.Generator().manual_seed(5)
    zs = (torch.randn(3, 9, V + PAD, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    zt = (torch.randn(3, 9, V + PAD, generator=g) * 2).to(torch.bfloat16)
    y = torch.randint(0, V, (3, 8), generator=g)
    y[1, 2:5] = IGNORE_INDEX
    kw = dict(temperature=2.0, kd_weight=0.5, num_tokens=40)
    ours = fused_logits_distillation_loss(zs[:, :-1, :V], zt[:, :-1, :V], y, chunk_size=3, **kw)
    ours.total.backward()
    grad_ours, zs.grad = zs.grad.clone(), None
    ref = distillation_loss(zs[:, :-1, :V], zt[:, :-1, :V], y, **kw)
    ref.total.backward()
    assert ours.num_valid == ref.num_valid == 21
    for name in ("total", "kd", "kd_unscaled", "ce"):
        assert getattr(ours, name).item() == pytest.approx(getattr(ref, name).item(), rel=1e-5), name
    assert grad_ours.dtype == torch.bfloat16
    # Both round an fp32 gradient to bf16 once; they differ by at most that rounding.
    torch.testing.assert_close(grad_ours.float(), zs.grad.float(), rtol=1e-2, atol=1e-4)
    assert torch.all(grad_ours[:, -1] == 0) and torch.all(grad_ours[..., V:] == 0)
    assert torch.all(grad_ours[1, 2:5] == 0)


def test_closed_form_logits_loss_gradient_is_handed_out_once():
    zs = torch.randn(4, V, requires_grad=True)
    parts = fused_logits_distillation_loss(zs, zs.detach() * 2, torch.arange(4), temperature=1.0, kd_weight=0.5)
    parts.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        parts.total.backward()
    with torch.no_grad():
        again = fused_logits_distillation_loss(zs, zs * 2, torch.arange(4), temperature=1.0, kd_weight=0.5)
    assert again.total.item() == pytest.approx(parts.total.item(), rel=1e-6)
