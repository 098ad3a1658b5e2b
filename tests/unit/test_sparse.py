"""KD from sparse teacher targets against independent references: the sampled estimator's
mean over many draws against the dense loss and gradient (statistical tolerance), top-k with
its tail bucket against its closed form written with autograd, CE alone against cross_entropy.
The exact references are met by both paths: from hidden states (chunked) and from whole logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmdistill.loss.dense import IGNORE_INDEX
from lmdistill.loss.sparse import SparseTargets, sparse_distillation_loss, sparse_logits_distillation_loss

T = 2.0


def problem(seed: int = 0, n: int = 5, hidden: int = 8, vocab: int = 40):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.7
    zt = torch.randn(n, vocab, generator=g) * 2.0
    y = torch.randint(0, vocab, (n,), generator=g)
    return h, w, zt, y


def dense_reference(h, w, zt, y, kd_weight):
    """KD (forward KL at T, times T^2) + CE written out, with autograd for the gradients."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    zs = h @ w.t()
    p = F.softmax(zt / T, -1)
    kl = (p * (F.log_softmax(zt / T, -1) - F.log_softmax(zs / T, -1))).sum(-1).mean()
    ce = F.cross_entropy(zs, y)
    total = kd_weight * T * T * kl + (1 - kd_weight) * ce
    total.backward()
    return total.detach(), h.grad, w.grad


def sparse_loss(path: str, h, w, y, targets, **kwargs):
    """The loss and the gradients of ``h`` and ``w`` by one of the two paths."""
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    if path == "hidden":
        parts = sparse_distillation_loss(hh, ww, y, targets, **kwargs)
    else:  # the logits formed whole, the lm_head's backward left to autograd
        parts = sparse_logits_distillation_loss(hh @ ww.t(), y, targets, **kwargs)
    parts.total.backward()
    return parts, hh.grad, ww.grad


PATHS = pytest.mark.parametrize("path", ["hidden", "logits"])


def sampled_targets(zt, samples: int, g) -> SparseTargets:
    """S draws per row from softmax(zt / T), as unique ids with their counts / S."""
    p = F.softmax(zt / T, -1)
    draws = torch.multinomial(p, samples, replacement=True, generator=g)
    ids = torch.zeros_like(draws)
    weights = torch.zeros(draws.shape)
    for r in range(len(draws)):
        unique, counts = draws[r].unique(return_counts=True)
        ids[r, : len(unique)] = unique
        weights[r, : len(unique)] = counts / samples
    logp = F.log_softmax(zt / T, -1).gather(1, ids)
    return SparseTargets(ids, weights, logp)


def test_the_sampled_estimator_is_unbiased_for_the_dense_loss_and_gradient():
    h, w, zt, y = problem()
    want, want_h, want_w = dense_reference(h, w, zt, y, kd_weight=0.5)
    g = torch.Generator().manual_seed(1)
    values, grads_h, grads_w = [], [], []
    for _ in range(1500):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        parts = sparse_distillation_loss(hh, ww, y, sampled_targets(zt, 12, g), temperature=T, kd_weight=0.5)
        parts.total.backward()
        values.append(parts.total.detach())
        grads_h.append(hh.grad)
        grads_w.append(ww.grad)
    for draws, reference in (
        (torch.stack(values), want),
        (torch.stack(grads_h), want_h),
        (torch.stack(grads_w), want_w),
    ):
        mean, sem = draws.mean(0), draws.std(0) / len(draws) ** 0.5
        assert ((mean - reference).abs() <= 5 * sem + 1e-6).all(), (mean - reference).abs().max()
    # and a single draw is not the dense value: the test above has something to find
    assert (torch.stack(values) - want).abs().max() > 10 * (torch.stack(values).std() / 1500**0.5)


@PATHS
def test_sampled_targets_equal_to_the_full_distribution_give_the_dense_loss_exactly(path):
    h, w, zt, y = problem(seed=3)
    want, want_h, want_w = dense_reference(h, w, zt, y, kd_weight=0.7)
    ids = torch.arange(zt.shape[1]).expand(len(zt), -1).contiguous()
    full = SparseTargets(ids, F.softmax(zt / T, -1), F.log_softmax(zt / T, -1))
    parts, grad_h, grad_w = sparse_loss(path, h, w, y, full, temperature=T, kd_weight=0.7, chunk_size=2)
    torch.testing.assert_close(parts.total.detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h, want_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_w, want_w, rtol=1e-4, atol=1e-6)


@PATHS
def test_topk_with_its_tail_bucket_matches_the_bucketed_kl_closed_form(path):
    h, w, zt, y = problem(seed=5)
    k = 6
    p = F.softmax(zt / T, -1)
    top_p, ids = p.topk(k, dim=-1)
    tail = 1 - top_p.sum(-1)
    targets = SparseTargets(ids, top_p, top_p.log(), tail)
    # Reference: the KL between the (k + 1)-bucket distributions, differentiated by autograd.
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    q = F.softmax(hr @ wr.t() / T, -1)
    q_top = q.gather(1, ids)
    q_tail = 1 - q_top.sum(-1)
    bucket_kl = (top_p * (top_p.log() - q_top.log())).sum(-1) + tail * (tail.log() - q_tail.log())
    ce = F.cross_entropy(hr @ wr.t(), y)
    (0.5 * T * T * bucket_kl.mean() + 0.5 * ce).backward()
    parts, grad_h, grad_w = sparse_loss(path, h, w, y, targets, temperature=T, kd_weight=0.5, chunk_size=3)
    torch.testing.assert_close(parts.kd_unscaled, bucket_kl.mean().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h, hr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_w, wr.grad, rtol=1e-4, atol=1e-6)


@PATHS
def test_ce_only_and_ignored_rows(path):
    h, w, zt, y = problem(seed=7)
    y = y.clone()
    y[1] = IGNORE_INDEX
    parts, grad_h, grad_w = sparse_loss(path, h, w, y, None, temperature=T, kd_weight=0.0)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    F.cross_entropy(hr @ wr.t(), y, ignore_index=IGNORE_INDEX).backward()
    torch.testing.assert_close(parts.total.detach(), F.cross_entropy(h @ w.t(), y, ignore_index=IGNORE_INDEX))
    torch.testing.assert_close(grad_h, hr.grad)
    torch.testing.assert_close(grad_w, wr.grad)
    assert parts.num_valid == len(y) - 1 and grad_h[1].abs().sum() == 0


def test_the_logits_path_takes_a_batch_of_sequences_and_refuses_mismatched_targets():
    """(B, L, V) logits with (B, L) targets, as the trainer passes them; the value equals the
    flattened call's."""
    h, w, zt, y = problem(seed=9, n=6)
    top_p, ids = F.softmax(zt / T, -1).topk(4, dim=-1)
    targets = SparseTargets(ids, top_p, top_p.log(), 1 - top_p.sum(-1))
    flat = sparse_logits_distillation_loss(h @ w.t(), y, targets, temperature=T, kd_weight=0.5)
    batched = sparse_logits_distillation_loss(
        (h @ w.t()).view(2, 3, -1), y.view(2, 3), targets, temperature=T, kd_weight=0.5
    )
    torch.testing.assert_close(batched.total, flat.total)
    with pytest.raises(ValueError, match="do not match"):
        sparse_logits_distillation_loss(h @ w.t(), y[:4], targets, temperature=T, kd_weight=0.5)


def test_systematic_draws_are_unbiased_and_never_miss_by_a_whole_draw():
    """The cache's draws: each token's count is floor(S p) or ceil(S p) (independent draws
    would give anything from 0 to S), and counts / S averages to p over many rows."""
    from lmdistill.teacher.cache import capture

    samples, rows = 12, 4000
    zt = torch.tensor([3.0, 2.2, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, float("-inf")])
    p = F.softmax(zt / T, -1).double()
    kept = capture(zt.expand(rows, -1).contiguous(), "sampled", T, samples, 0, torch.Generator().manual_seed(5))
    counts = torch.zeros(rows, len(zt), dtype=torch.float64).scatter_add_(1, kept["ids"], kept["counts"].double())
    assert (counts.sum(1) == samples).all()
    assert counts[:, -1].eq(0).all(), "a token of probability 0 was drawn"
    expected = samples * p
    assert ((counts >= expected.floor() - 1e-9) & (counts <= expected.ceil() + 1e-9)).all()
    share = counts / samples
    sem = share.std(0) / rows**0.5
    assert ((share.mean(0) - p).abs() <= 5 * sem + 1e-9).all()
    # less spread than independent draws, whose per-token variance is p (1 - p) / S
    assert (share.var(0)[:-1] < p[:-1] * (1 - p[:-1]) / samples).all()
    # the stored logits and log-normaliser are the teacher's
    torch.testing.assert_close(kept["logits"], zt.expand(rows, -1).gather(1, kept["ids"]))
    torch.testing.assert_close(kept["logz"][0], torch.logsumexp(zt / T, 0))


def _retempered_mean(zt, samples: int, t_capture: float, t: float, rows: int = 3000):
    """Mean over many rows of the re-tempered weights, spread over the vocabulary, and the
    re-tempered log-probabilities of the drawn ids against the true ones."""
    from lmdistill.teacher.cache import capture, retempered

    kept = capture(
        zt.expand(rows, -1).contiguous(), "sampled", t_capture, samples, 0, torch.Generator().manual_seed(samples)
    )
    got = retempered(
        kept["ids"], kept["counts"].float(), kept["logits"], kept["logz"], kept["entropy"], float(samples), t_capture, t
    )
    spread = torch.zeros(rows, len(zt), dtype=torch.float64).scatter_add_(1, got.ids, got.weights.double())
    true_logp = F.log_softmax(zt / t, -1).expand(rows, -1).gather(1, got.ids)
    logp_error = ((got.logp - true_logp).abs() * (got.weights > 0)).sum() / (got.weights > 0).sum()
    return spread, got, float(logp_error)


def test_retempering_sampled_draws_is_consistent_and_biased_for_few_draws():
    """Draws made at T_c = 1, trained at T = 2: self-normalised importance weights. Per row
    they sum to 1; with many draws their mean is the T = 2 distribution and the estimated
    log-probabilities are the true ones; with few draws the mean stays measurably nearer the
    capture distribution (the documented bias)."""
    zt = torch.linspace(4.0, -4.0, 24)
    p2 = F.softmax(zt / 2.0, -1).double()
    p1 = F.softmax(zt / 1.0, -1).double()
    many, got, logp_error = _retempered_mean(zt, 255, 1.0, 2.0)
    torch.testing.assert_close(got.weights.sum(1), torch.ones(len(got.weights)))
    assert (many.mean(0) - p2).abs().sum() < 0.01
    assert logp_error < 0.05
    few, _, few_logp_error = _retempered_mean(zt, 4, 1.0, 2.0)
    bias = (few.mean(0) - p2).abs().sum()
    assert bias > 0.1 and bias > 4 * (many.mean(0) - p2).abs().sum()
    assert (few.mean(0) - p1).abs().sum() < (p2 - p1).abs().sum()  # pulled towards the capture distribution
    assert few_logp_error > 4 * logp_error
    # at the capture temperature: the draws' own frequencies, and the stored entropy
    same, got1, _ = _retempered_mean(zt, 12, 1.0, 1.0)
    torch.testing.assert_close(same.mean(0), p1, atol=0.01, rtol=0)
    assert got1.entropy is not None


@PATHS
def test_where_the_teacher_is_silent_the_data_token_is_the_whole_target(path):
    """Targets at some positions only (a cache across tokenizers): the loss is
    ``(CE over every position + w (T^2 KL - CE) over the positions with a target)) / N``,
    written out here with autograd; the silent rows' (garbage) targets are never read."""
    h, w, zt, y = problem(seed=5, n=7)
    present = torch.tensor([True, False, True, True, False, False, True])
    ids = torch.arange(zt.shape[1]).expand(len(zt), -1).contiguous()
    weights, logp = F.softmax(zt / T, -1), F.log_softmax(zt / T, -1)
    weights[~present], logp[~present] = float("nan"), float("nan")  # silent rows: not read
    targets = SparseTargets(ids, weights, logp, present=present)
    parts, grad_h, grad_w = sparse_loss(path, h, w, y, targets, temperature=T, kd_weight=0.6, chunk_size=3)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    zs = hh @ ww.t()
    p = F.softmax(zt / T, -1)
    kl = (p * (F.log_softmax(zt / T, -1) - F.log_softmax(zs / T, -1))).sum(-1)
    ce = F.cross_entropy(zs, y, reduction="none")
    want = (ce.sum() + 0.6 * (T * T * kl[present] - ce[present]).sum()) / len(y)
    want.backward()
    torch.testing.assert_close(parts.total.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h, hh.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_w, ww.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parts.kd, T * T * kl[present].sum().detach() / len(y), rtol=1e-5, atol=1e-6)
