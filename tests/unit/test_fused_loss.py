"""The chunked fused-linear KD loss against the full-logits reference.

The reference is ``lmdistill.loss.dense.distillation_loss`` on materialised logits
``h @ W[:v].T + b[:v]`` differentiated by autograd; the fused loss derives its gradients
by hand, so every divergence, temperature, weight and masking case is compared in value
and in the gradients of the student's hidden states, lm_head weight and bias. The inputs
of the reference are float64 (the logits matmul is exact; the loss itself runs in fp32 as
the reference always does), ours are float32; "close" means a norm-wise relative error
below 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

import lmdistill.loss.chunked as fused_mod
from lmdistill.loss.chunked import fused_linear_distillation_loss
from lmdistill.loss.dense import distillation_loss
from lmdistill.loss.divergences import DIVERGENCES

RTOL = 1e-5
# bf16 logits and bf16 gradients: we measured a 0.4-0.7% norm-wise gradient error against
# the fp32 reference, the same as the naive full-logits path run in bf16 (within 5%). The
# bound leaves 2x headroom; the second check says fusing adds no error of its own.
BF16_GRAD_RTOL = 1.5e-2
BF16_VS_NAIVE = 1.25


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: a second OpenMP thread only adds scheduling latency per op,
    which on a busy shared machine multiplies this file's runtime several times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    scale = ref.norm()
    if scale == 0:
        return float((ours - ref).norm())
    return float((ours - ref).norm() / scale)


def make_inputs(n=29, hs=12, ht=20, v=53, vt=None, seed=0, ignore=(), student_bias=True, teacher_bias=False):
    """float64 master copies; logits have a spread of a few nats so the divergences are not tiny."""
    g = torch.Generator().manual_seed(seed)
    vt = v if vt is None else vt
    d = dict(
        h=torch.randn(n, hs, generator=g, dtype=torch.float64),
        w=torch.randn(v, hs, generator=g, dtype=torch.float64) * 3 / math.sqrt(hs),
        b=torch.randn(v, generator=g, dtype=torch.float64) if student_bias else None,
        ht=torch.randn(n, ht, generator=g, dtype=torch.float64),
        wt=torch.randn(vt, ht, generator=g, dtype=torch.float64) * 3 / math.sqrt(ht),
        bt=torch.randn(vt, generator=g, dtype=torch.float64) if teacher_bias else None,
    )
    y = torch.randint(0, min(v, vt), (n,), generator=g)
    for i in ignore:
        y[i] = -100
    d["y"] = y
    return d


def run_reference(d, vocab=None, **kw):
    """Full logits + distillation_loss + autograd. Returns (parts, grad_h, grad_w, grad_b)."""
    v = vocab or min(d["w"].shape[0], d["wt"].shape[0])
    h = d["h"].clone().requires_grad_()
    w = d["w"].clone().requires_grad_()
    b = d["b"].clone().requires_grad_() if d["b"] is not None else None
    s = h @ w[:v].T + (b[:v] if b is not None else 0)
    t = d["ht"] @ d["wt"][:v].T + (d["bt"][:v] if d["bt"] is not None else 0)
    parts = distillation_loss(s, t, d["y"], **kw)
    parts.total.backward()
    return parts, h.grad, w.grad, (b.grad if b is not None else None)


def run_fused(d, dtype=torch.float32, **kw):
    h = d["h"].to(dtype).requires_grad_()
    w = d["w"].to(dtype).requires_grad_()
    b = d["b"].to(dtype).requires_grad_() if d["b"] is not None else None
    bt = d["bt"].to(dtype) if d["bt"] is not None else None
    parts = fused_linear_distillation_loss(
        h, w, d["ht"].to(dtype), d["wt"].to(dtype), d["y"], student_bias=b, teacher_bias=bt, **kw
    )
    parts.total.backward()
    return parts, h.grad, w.grad, (b.grad if b is not None else None)


def assert_parity(ours, ref, rtol=RTOL):
    po, *go = ours
    pr, *gr = ref
    assert po.num_valid == pr.num_valid
    for name in ("total", "kd", "kd_unscaled", "ce"):
        a, b = getattr(po, name), getattr(pr, name)
        assert torch.isfinite(a), name
        assert rel_err(a, b) <= rtol, f"{name}: {float(a)} vs {float(b)}"
    for name, a, b in zip(("grad_h", "grad_w", "grad_b"), go, gr):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        assert rel_err(a, b) <= rtol, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0, 10.0])
@pytest.mark.parametrize("kd_weight", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("scale_by_t2", [True, False])
def test_parity_grid(divergence, temperature, kd_weight, scale_by_t2):
    d = make_inputs(seed=int(temperature * 10), ignore=(0, 5, 6, 7))
    kw = dict(temperature=temperature, kd_weight=kd_weight, scale_by_t2=scale_by_t2, divergence=divergence)
    # TVD's gradient has sign(p - q) in it: where a student and a teacher probability are equal
    # to fp32 rounding, the two fp32 computations may take opposite signs. That moves the
    # gradient by a few 1e-5 (measured 2.5e-5 here), so TVD gets a looser bound.
    assert_parity(run_fused(d, chunk_size=8, **kw), run_reference(d, **kw), rtol=RTOL if divergence != "tvd" else 1e-4)


@pytest.mark.parametrize(
    "n,hs,ht,v,chunk_size",
    [
        (1, 4, 6, 7, 1024),  # a single token
        (17, 8, 12, 31, 1),  # one row per chunk
        (17, 8, 12, 31, 5),  # 17 = 3 * 5 + 2: the last chunk is short
        (64, 16, 24, 97, 13),
        (64, 16, 24, 97, 64),  # exactly one chunk
        (40, 24, 8, 200, 7),  # teacher narrower than the student
    ],
)
def test_parity_shapes_and_chunks(n, hs, ht, v, chunk_size):
    d = make_inputs(n=n, hs=hs, ht=ht, v=v, seed=n + v, teacher_bias=True)
    kw = dict(temperature=2.0, kd_weight=0.5)
    assert_parity(run_fused(d, chunk_size=chunk_size, **kw), run_reference(d, **kw))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_allocation_path_matches(divergence, monkeypatch):
    """Without the CPU workspace (the path torch.compile traces) the result is the same."""
    monkeypatch.setattr(fused_mod, "_USE_WORKSPACE", False)
    d = make_inputs(ignore=(3, 4))
    for temperature in (1.0, 3.0):
        kw = dict(temperature=temperature, kd_weight=0.7, divergence=divergence)
        assert_parity(run_fused(d, chunk_size=6, **kw), run_reference(d, **kw))


def test_ignored_runs_longer_than_a_chunk():
    # 12 ignored rows in a row, chunks of 4: whole chunks' worth of rows are skipped.
    d = make_inputs(n=30, ignore=range(3, 15))
    kw = dict(temperature=2.0, kd_weight=0.5)
    ours = run_fused(d, chunk_size=4, **kw)
    assert_parity(ours, run_reference(d, **kw))
    grad_h = ours[1]
    assert torch.equal(grad_h[3:15], torch.zeros_like(grad_h[3:15]))
    assert ours[0].num_valid == 18


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("num_tokens", [None, 0, 128])
def test_all_ignored_is_exactly_zero(divergence, num_tokens):
    d = make_inputs(n=9, ignore=range(9))
    parts, gh, gw, gb = run_fused(
        d, temperature=2.0, kd_weight=0.5, divergence=divergence, num_tokens=num_tokens, chunk_size=4
    )
    assert parts.num_valid == 0
    for name in ("total", "kd", "kd_unscaled", "ce"):
        assert float(getattr(parts, name).detach()) == 0.0, name
    for g in (gh, gw, gb):
        assert g is not None and torch.equal(g, torch.zeros_like(g))


def test_teacher_vocab_padded_beyond_student():
    """V' > V: the teacher's extra rows are padding, excluded and never given probability."""
    d = make_inputs(v=40, vt=47, teacher_bias=True)
    d["wt"][40:] *= 100.0  # huge logits on the padded rows must not matter
    d["bt"][40:] = 50.0
    kw = dict(temperature=2.0, kd_weight=0.5)
    ours = run_fused(d, **kw)  # vocab_size defaults to min(V, V') = 40
    assert_parity(ours, run_reference(d, **kw))
    assert_parity(run_fused(d, vocab_size=40, **kw), ours, rtol=0.0)


def test_both_padded_with_vocab_size():
    """vocab_size below both heads: padded student rows get exactly zero gradient."""
    d = make_inputs(v=45, vt=50)
    d["y"] = d["y"] % 41
    kw = dict(temperature=3.0, kd_weight=0.5, divergence="jsd")
    ours = run_fused(d, vocab_size=41, **kw)
    assert_parity(ours, run_reference(d, vocab=41, **kw))
    _, _, gw, gb = ours
    assert torch.equal(gw[41:], torch.zeros_like(gw[41:]))
    assert torch.equal(gb[41:], torch.zeros_like(gb[41:]))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"])
def test_teacher_minus_inf_logits_stay_finite(divergence):
    """A -inf teacher bias (banned tokens) gives 0 * log 0 entries: exactly zero, not NaN."""
    d = make_inputs(teacher_bias=True, ignore=(2,))
    d["bt"][[0, 7, 19, 33]] = -math.inf
    d["y"][d["y"] == 7] = 8  # the CE target itself may not be a banned token here
    for temperature in (0.5, 1.0, 10.0):
        kw = dict(temperature=temperature, kd_weight=0.5, divergence=divergence)
        ours = run_fused(d, chunk_size=5, **kw)
        assert_parity(ours, run_reference(d, **kw))


def test_reverse_kl_against_teacher_zero_is_infinite_like_the_reference():
    d = make_inputs(teacher_bias=True)
    d["bt"][3] = -math.inf
    kw = dict(temperature=2.0, kd_weight=0.5, divergence="reverse_kl")
    ref = distillation_loss(d["h"] @ d["w"].T + d["b"], d["ht"] @ d["wt"].T + d["bt"], d["y"], **kw)
    parts, *_ = run_fused(d, **kw)
    assert math.isinf(float(ref.kd)) and math.isinf(float(parts.kd)) and float(parts.kd) > 0


def test_global_normaliser_splits_add_up():
    """Two micro-batches normalised by the global count sum to the whole batch (STYLE rule 5)."""
    d = make_inputs(n=40, ignore=(1, 2, 30))
    total_valid = int((d["y"] != -100).sum())
    kw = dict(temperature=2.0, kd_weight=0.5, chunk_size=6)
    whole = run_fused(d, **kw)
    halves = []
    for sl in (slice(0, 17), slice(17, 40)):
        part = dict(d, h=d["h"][sl], ht=d["ht"][sl], y=d["y"][sl])
        halves.append(run_fused(part, num_tokens=torch.tensor(total_valid), **kw))
    for name in ("total", "kd", "kd_unscaled", "ce"):
        summed = getattr(halves[0][0], name) + getattr(halves[1][0], name)
        assert rel_err(summed, getattr(whole[0], name)) <= RTOL, name
    assert rel_err(torch.cat([halves[0][1], halves[1][1]]), whole[1]) <= RTOL
    assert rel_err(halves[0][2] + halves[1][2], whole[2]) <= RTOL
    assert rel_err(halves[0][3] + halves[1][3], whole[3]) <= RTOL


def test_grad_output_scales_and_leading_dims():
    d = make_inputs(n=24)
    h = d["h"].float().reshape(4, 6, -1).requires_grad_()
    w = d["w"].float().requires_grad_()
    kw = dict(temperature=2.0, kd_weight=0.5, chunk_size=5)
    parts = fused_linear_distillation_loss(
        h, w, d["ht"].float().reshape(4, 6, -1), d["wt"].float(), d["y"].reshape(4, 6), **kw
    )
    (3.0 * parts.total).backward()
    d["b"] = None
    _, gh, gw, _ = run_reference(d, temperature=2.0, kd_weight=0.5)
    assert h.grad.shape == (4, 6, d["h"].shape[1])
    assert rel_err(h.grad.reshape(24, -1), 3.0 * gh) <= RTOL
    assert rel_err(w.grad, 3.0 * gw) <= RTOL


def test_tied_embedding_weight_accumulates():
    """lm_head tied to the input embedding: both uses add into one .grad."""
    g = torch.Generator().manual_seed(3)
    v, hs, n = 37, 10, 21
    emb = (torch.randn(v, hs, generator=g) * 0.5).requires_grad_()
    ids = torch.randint(0, v, (n,), generator=g)
    teacher_h, teacher_w = torch.randn(n, 14, generator=g), torch.randn(v, 14, generator=g) * 0.5
    y = torch.roll(ids, -1)
    y[-1] = -100
    kw = dict(temperature=2.0, kd_weight=0.5)

    h = torch.tanh(torch.nn.functional.embedding(ids, emb))
    fused_linear_distillation_loss(h, emb, teacher_h, teacher_w, y, chunk_size=4, **kw).total.backward()
    ours = emb.grad.clone()
    emb.grad = None
    h = torch.tanh(torch.nn.functional.embedding(ids, emb))
    distillation_loss(h @ emb.T, teacher_h @ teacher_w.T, y, **kw).total.backward()
    assert rel_err(ours, emb.grad) <= RTOL


def test_bf16_gradient_error_is_bounded():
    """bf16 matmuls, fp32 softmax: gradient error vs an fp32 reference on the same values."""
    d = make_inputs(n=96, hs=64, ht=96, v=500, seed=1, ignore=range(9), student_bias=False)
    for k in ("h", "w", "ht", "wt"):  # the bf16 values are the truth both sides start from
        d[k] = d[k].to(torch.bfloat16).double()
    kw = dict(temperature=2.0, kd_weight=0.5)
    ref = run_reference(d, **kw)
    parts, gh, gw, _ = run_fused(d, dtype=torch.bfloat16, chunk_size=32, **kw)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16

    # The naive path: full bf16 logits, then the same fp32 loss.
    hn = d["h"].to(torch.bfloat16).requires_grad_()
    wn = d["w"].to(torch.bfloat16).requires_grad_()
    naive_t = d["ht"].to(torch.bfloat16) @ d["wt"].to(torch.bfloat16).T
    distillation_loss(hn @ wn.T, naive_t, d["y"], **kw).total.backward()

    assert rel_err(parts.total, ref[0].total) <= 1e-3
    for ours, naive, exact in ((gh, hn.grad, ref[1]), (gw, wn.grad, ref[2])):
        err, naive_err = rel_err(ours, exact), rel_err(naive, exact)
        assert err <= BF16_GRAD_RTOL, err
        assert err <= BF16_VS_NAIVE * naive_err, (err, naive_err)


def test_no_grad_mode_returns_the_same_values():
    d = make_inputs()
    kw = dict(temperature=2.0, kd_weight=0.5)
    with_grad, *_ = run_fused(d, **kw)
    with torch.no_grad():
        parts = fused_linear_distillation_loss(
            d["h"].float(), d["w"].float(), d["ht"].float(), d["wt"].float(), d["y"], student_bias=d["b"].float(), **kw
        )
    assert parts.total.grad_fn is None
    assert float(parts.total) == pytest.approx(float(with_grad.total.detach()), rel=1e-6)


def test_backward_twice_is_a_clear_error():
    d = make_inputs()
    h, w = d["h"].float().requires_grad_(), d["w"].float().requires_grad_()
    parts = fused_linear_distillation_loss(
        h, w, d["ht"].float(), d["wt"].float(), d["y"], temperature=2.0, kd_weight=0.5
    )
    parts.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        parts.total.backward()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kd_weight=1.5), "kd_weight"),
        (dict(temperature=0.0), "temperature"),
        (dict(divergence="kl"), "divergence"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(vocab_size=54), "vocab_size"),
    ],
)
def test_invalid_arguments(kwargs, match):
    d = make_inputs()
    kw = dict(temperature=2.0, kd_weight=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        fused_linear_distillation_loss(d["h"].float(), d["w"].float(), d["ht"].float(), d["wt"].float(), d["y"], **kw)


def test_missing_teacher_and_bad_targets():
    d = make_inputs()
    h, w = d["h"].float(), d["w"].float()
    with pytest.raises(ValueError, match="teacher"):
        fused_linear_distillation_loss(h, w, None, None, d["y"], temperature=2.0, kd_weight=0.5)
    # kd_weight == 0 needs no teacher at all.
    parts = fused_linear_distillation_loss(h, w, None, None, d["y"], temperature=2.0, kd_weight=0.0)
    assert float(parts.kd) == 0.0 and float(parts.ce) > 0
    y = d["y"].clone()
    y[0] = 53  # == V: out of range
    with pytest.raises(ValueError, match="targets"):
        fused_linear_distillation_loss(h, w, d["ht"].float(), d["wt"].float(), y, temperature=2.0, kd_weight=0.5)


def test_autocast_with_fp32_master_weights_stays_close_to_fp32():
    """The trainer's mixed-precision case: fp32 weights, bf16 autocast. Every matmul (the
    in-place weight-gradient accumulation included) runs in bf16; the error stays bf16-sized."""
    d = make_inputs(n=96, hs=64, ht=96, v=500, seed=3, ignore=range(5), student_bias=False)
    kw = dict(temperature=2.0, kd_weight=0.5)
    ref = run_reference(d, **kw)
    h = d["h"].float().requires_grad_()
    w = d["w"].float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = fused_linear_distillation_loss(h, w, d["ht"].float(), d["wt"].float(), d["y"], chunk_size=32, **kw)
    parts.total.backward()
    assert w.grad.dtype == torch.float32
    assert rel_err(parts.total, ref[0].total) <= 1e-2
    assert rel_err(h.grad, ref[1]) <= BF16_GRAD_RTOL
    assert rel_err(w.grad, ref[2]) <= BF16_GRAD_RTOL
    assert rel_err(w.grad, ref[2]) > 1e-6  # it really ran in bf16, not silently in fp32
