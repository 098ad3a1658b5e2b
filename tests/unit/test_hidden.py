"""Hidden-state distillation against an independent float64 reference.

The reference below, ``ref_loss``, walks every pair, sequence and position in Python and
writes cosine and MSE out as explicit sums (no ``lmdistill`` code, no
``F.cosine_similarity``); its gradients come from autograd on float64 leaves. The loss
under test runs in fp32, so comparisons with the reference use rtol 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from lmdistill.core.errors import LmdistillError
from lmdistill.loss.hidden import HiddenProjection, hidden_state_loss, resolve_layer_map

IGNORE = -100
EPS = 1e-8  # the cosine eps the module documents: |x| is clamped at eps in the denominator


# ---- independent float64 reference --------------------------------------------------------


def ref_loss(student, teacher, weights, kind, targets, num_tokens):
    """sum over pairs k, valid (b, p) of the per-position loss, / max(num_tokens, 1) / pairs."""
    total = torch.zeros((), dtype=torch.float64)
    n_pairs = len(student)
    batch, positions = targets.shape
    for k in range(n_pairs):
        for b in range(batch):
            for p in range(positions):
                if int(targets[b, p]) == IGNORE:
                    continue
                x = student[k][b, p]
                if weights is not None:
                    w = weights[k]  # (H_t, H_s): x'_i = sum_j w_ij x_j
                    x = torch.stack([(w[i] * x).sum() for i in range(w.shape[0])])
                y = teacher[k][b, p]
                if kind == "cosine":
                    dot = (x * y).sum()
                    nx = torch.clamp((x * x).sum().sqrt(), min=EPS)
                    ny = torch.clamp((y * y).sum().sqrt(), min=EPS)
                    term = 1.0 - dot / (nx * ny)
                else:
                    term = ((x - y) ** 2).sum() / y.shape[0]
                    if kind == "nmse":
                        term = term / torch.clamp((y * y).sum() / y.shape[0], min=EPS)
                total = total + term
    return total / max(float(num_tokens), 1.0) / n_pairs


def linears(projection):
    return [m for m in projection.modules() if isinstance(m, torch.nn.Linear)]


def make_case(seed, batch=2, positions=5, hs=6, ht=8, n_pairs=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(batch, positions, hs, generator=g, dtype=torch.float64).to(dtype) for _ in range(n_pairs)]
    # teacher correlated with the student where widths agree, so cosine is not ~1 everywhere
    teacher = []
    for k in range(n_pairs):
        t = torch.randn(batch, positions, ht, generator=g, dtype=torch.float64) * 2.0
        if hs == ht:
            t = t + 3.0 * student[k].double()
        teacher.append(t.to(dtype))
    targets = torch.randint(0, 50, (batch, positions), generator=g)
    return student, teacher, targets


def run_module(student, teacher, projection, kind, targets, num_tokens, all_valid=False):
    """Loss and gradients (student hidden, projection weights) of the module under test."""
    leaves = [h.clone().requires_grad_(True) for h in student]
    for m in linears(projection):
        m.weight.grad = None
    loss = hidden_state_loss(leaves, teacher, projection, kind, targets, num_tokens, all_valid=all_valid)
    loss.backward()
    return loss, [h.grad for h in leaves], [m.weight.grad.clone() for m in linears(projection)]


def run_ref(student, teacher, projection, kind, targets, num_tokens):
    leaves = [h.detach().double().requires_grad_(True) for h in student]
    weights = None
    if projection.trainable:
        weights = [m.weight.detach().double().requires_grad_(True) for m in linears(projection)]
    loss = ref_loss(leaves, [t.double() for t in teacher], weights, kind, targets, num_tokens)
    loss.backward()
    return loss, [h.grad for h in leaves], [w.grad for w in weights] if weights else []


# ---- value and gradient against the reference ------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "mse", "nmse"])
@pytest.mark.parametrize("widths", [(8, 8), (6, 8), (8, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_value_and_gradient_match_reference(kind, widths, masked):
    hs, ht = widths
    student, teacher, targets = make_case(seed=hs * 10 + ht, hs=hs, ht=ht)
    if masked:
        targets[0, 1] = IGNORE
        targets[1, 3:] = IGNORE
    num_tokens = int((targets != IGNORE).sum())
    torch.manual_seed(0)
    projection = HiddenProjection([(0, 1), (1, 3)], hs, ht)
    assert projection.trainable == (hs != ht)

    loss, g_hidden, g_weight = run_module(student, teacher, projection, kind, targets, num_tokens)
    ref, r_hidden, r_weight = run_ref(student, teacher, projection, kind, targets, num_tokens)

    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert ref.item() > 1e-3  # a real, nonzero loss: the comparison below can fail
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in zip(g_hidden, r_hidden):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
        assert want.abs().max() > 0
    assert len(g_weight) == len(r_weight) == (2 if hs != ht else 0)
    for got, want in zip(g_weight, r_weight):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
        assert want.abs().max() > 0

    if not masked:
        # all_valid skips the mask and must give the same value and gradients
        loss_av, g_hidden_av, g_weight_av = run_module(
            student, teacher, projection, kind, targets, num_tokens, all_valid=True
        )
        assert loss_av.item() == pytest.approx(loss.item(), rel=1e-7)
        for a, b in zip(g_hidden_av + g_weight_av, g_hidden + g_weight):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["cosine", "mse", "nmse"])
def test_float64_inputs_stay_float64_and_match_reference_tightly(kind):
    student, teacher, targets = make_case(seed=3, hs=4, ht=7, dtype=torch.float64)
    targets[1, 0] = IGNORE
    torch.manual_seed(1)
    projection = HiddenProjection([(0, 0), (1, 1)], 4, 7)
    loss, g_hidden, g_weight = run_module(student, teacher, projection, kind, targets, 9)
    ref, r_hidden, r_weight = run_ref(student, teacher, projection, kind, targets, 9)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for got, want in zip(g_hidden, r_hidden):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(g_weight, r_weight):
        # the weights are fp32 parameters: their gradient is rounded to fp32 on the way back
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-9)


def test_pairs_are_averaged_and_num_tokens_divides_once():
    student, teacher, targets = make_case(seed=4, hs=8, ht=8, n_pairs=3)
    projection = HiddenProjection([(0, 0), (1, 1), (2, 2)], 8, 8)
    singles = []
    for k in range(3):
        one = HiddenProjection([(k, k)], 8, 8)
        singles.append(hidden_state_loss([student[k]], [teacher[k]], one, "mse", targets, 10).item())
    both = hidden_state_loss(student, teacher, projection, "mse", targets, 10).item()
    assert both == pytest.approx(sum(singles) / 3, rel=1e-6)
    assert len({round(s, 6) for s in singles}) == 3  # the pairs really differ
    wider = hidden_state_loss(student, teacher, projection, "mse", targets, 40).item()
    assert wider == pytest.approx(both * 10 / 40, rel=1e-6)


def test_cosine_ignores_scale_and_mse_does_not():
    student, _, targets = make_case(seed=5, hs=8, ht=8)
    projection = HiddenProjection([(0, 0), (1, 1)], 8, 8)
    scaled = [2.5 * h for h in student]
    assert hidden_state_loss(student, scaled, projection, "cosine", targets, 10).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss(student, [h.clone() for h in student], projection, "mse", targets, 10).item() == 0.0
    assert hidden_state_loss(student, scaled, projection, "mse", targets, 10).item() > 0.1
    opposite = [-h for h in student]
    anti = hidden_state_loss(student, opposite, projection, "cosine", targets, 10).item()
    assert anti == pytest.approx(2.0, rel=1e-6)


def test_nmse_is_scale_free_per_position_and_a_huge_position_does_not_swamp_it():
    student, teacher, targets = make_case(seed=7, hs=8, ht=8)
    projection = HiddenProjection([(0, 0), (1, 1)], 8, 8)
    both_scaled = hidden_state_loss(
        [3.0 * h for h in student], [3.0 * h for h in teacher], projection, "nmse", targets, 10
    ).item()
    assert both_scaled == pytest.approx(
        hidden_state_loss(student, teacher, projection, "nmse", targets, 10).item(), rel=1e-5
    )
    # one position of the teacher (and the student's error there) blown up 1000x, as a real model's
    # first-token activations are: plain mse is then that position; nmse is unchanged
    sink_t = [h.clone() for h in teacher]
    sink_s = [h.clone() for h in student]
    for s, t in zip(sink_s, sink_t):
        s[:, 0] = t[:, 0] * 1000 + (s[:, 0] - t[:, 0]) * 1000
        t[:, 0] *= 1000
    for kind, change in (("mse", "large"), ("nmse", "none")):
        before = hidden_state_loss(student, teacher, projection, kind, targets, 10).item()
        after = hidden_state_loss(sink_s, sink_t, projection, kind, targets, 10).item()
        if change == "large":
            assert after > 1000 * before
        else:
            assert after == pytest.approx(before, rel=1e-4)


def test_cosine_of_zero_and_tiny_vectors():
    student, teacher, targets = make_case(seed=6, batch=1, positions=3, hs=8, ht=8, n_pairs=1)
    student[0][0, 0] = 0.0
    teacher[0][0, 1] = 0.0
    student[0][0, 2] *= 1e-5  # tiny but nonzero: still a real direction (eps must stay small)
    projection = HiddenProjection([(0, 0)], 8, 8)
    loss, g_hidden, _ = run_module(student, teacher, projection, "cosine", targets, 3)
    ref, r_hidden, _ = run_ref(student, teacher, projection, "cosine", targets, 3)
    assert torch.isfinite(loss) and torch.isfinite(g_hidden[0]).all()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # a zero vector has similarity 0: its position contributes exactly 1
    one_pos = hidden_state_loss([student[0][:, :1]], [teacher[0][:, :1]], projection, "cosine", targets[:, :1], 1)
    assert one_pos.item() == pytest.approx(1.0, abs=1e-7)


# ---- masking and accumulation ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "mse", "nmse"])
def test_ignored_positions_change_nothing_and_get_no_gradient(kind):
    student, teacher, targets = make_case(seed=7, hs=6, ht=8)
    keep = torch.ones_like(targets, dtype=torch.bool)
    keep[0, 2] = keep[1, 0] = keep[1, 4] = False
    targets[~keep] = IGNORE
    torch.manual_seed(2)
    projection = HiddenProjection([(0, 1), (1, 3)], 6, 8)
    base, g_base, w_base = run_module(student, teacher, projection, kind, targets, 7)
    for fill in (0.0, 1e4, -3.0, float("nan"), float("inf")):
        s2 = [h.clone() for h in student]
        t2 = [h.clone() for h in teacher]
        for h in s2 + t2:
            h[~keep] = fill
        loss, g_hidden, g_weight = run_module(s2, t2, projection, kind, targets, 7)
        assert loss.item() == pytest.approx(base.item(), rel=1e-7), fill
        for got, want in zip(g_hidden, g_base):
            assert torch.equal(got[~keep], torch.zeros_like(got[~keep])), fill
            assert (got[keep] != 0).any()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        for got, want in zip(g_weight, w_base):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_no_valid_target_gives_zero_loss_and_zero_gradient():
    student, teacher, targets = make_case(seed=8, hs=6, ht=8)
    targets[:] = IGNORE
    projection = HiddenProjection([(0, 0), (1, 1)], 6, 8)
    for num_tokens in (0, 12):
        loss, g_hidden, g_weight = run_module(student, teacher, projection, "cosine", targets, num_tokens)
        assert loss.item() == 0.0
        for g in g_hidden + g_weight:
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("kind", ["cosine", "mse", "nmse"])
def test_micro_batches_with_shared_num_tokens_add_up_to_the_whole_batch(kind):
    student, teacher, targets = make_case(seed=9, batch=4, positions=6, hs=6, ht=8)
    targets[1, 2:] = IGNORE
    targets[2, :] = IGNORE
    targets[3, 5] = IGNORE
    total_tokens = int((targets != IGNORE).sum())
    torch.manual_seed(3)
    projection = HiddenProjection([(0, 1), (1, 3)], 6, 8)

    whole, g_whole, w_whole = run_module(student, teacher, projection, kind, targets, total_tokens)
    summed = 0.0
    g_parts = []
    w_sum = [torch.zeros_like(w) for w in w_whole]
    for sl in (slice(0, 2), slice(2, 4)):
        part, g, w = run_module(
            [h[sl] for h in student], [h[sl] for h in teacher], projection, kind, targets[sl], total_tokens
        )
        summed += part.item()
        g_parts.append(g)
        w_sum = [a + b for a, b in zip(w_sum, w)]
    assert summed == pytest.approx(whole.item(), abs=1e-6)
    for k in range(2):
        torch.testing.assert_close(torch.cat([g_parts[0][k], g_parts[1][k]]), g_whole[k], rtol=0, atol=1e-6)
    for a, b in zip(w_sum, w_whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # control: normalising each micro-batch by its own count gives a different total
    own = sum(
        hidden_state_loss(
            [h[sl] for h in student],
            [h[sl] for h in teacher],
            projection,
            kind,
            targets[sl],
            int((targets[sl] != IGNORE).sum()),
        ).item()
        / 2
        for sl in (slice(0, 2), slice(2, 4))
    )
    assert abs(own - whole.item()) > 1e-3


# ---- numerics -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "mse", "nmse"])
def test_bf16_inputs_give_fp32_close_to_float64_reference(kind):
    student64, teacher64, targets = make_case(seed=10, hs=16, ht=24, dtype=torch.float64)
    targets[0, 0] = IGNORE
    torch.manual_seed(4)
    projection = HiddenProjection([(0, 0), (1, 1)], 16, 24)
    student = [h.to(torch.bfloat16).requires_grad_(True) for h in student64]
    teacher = [h.to(torch.bfloat16) for h in teacher64]
    loss = hidden_state_loss(student, teacher, projection, kind, targets, 9)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(h.grad).all() for h in student)

    ref_exact, _, _ = run_ref(student64, teacher64, projection, kind, targets, 9)
    assert loss.item() == pytest.approx(ref_exact.item(), rel=2e-2)
    # on the bf16-rounded values themselves the fp32 computation is accurate
    ref_rounded, _, _ = run_ref([h.detach() for h in student], teacher, projection, kind, targets, 9)
    assert loss.item() == pytest.approx(ref_rounded.item(), rel=1e-5)


# ---- argument errors ------------------------------------------------------------------------


def test_unknown_kind_is_a_one_line_user_error():
    student, teacher, targets = make_case(seed=11, hs=8, ht=8)
    projection = HiddenProjection([(0, 0), (1, 1)], 8, 8)
    with pytest.raises(LmdistillError) as info:
        hidden_state_loss(student, teacher, projection, "l1", targets, 10)
    msg = str(info.value)
    assert "distill.hidden.loss" in msg and "cosine" in msg and "mse" in msg and "'l1'" in msg
    assert "\n" not in msg


def test_mismatched_lists_and_shapes_are_programming_errors():
    student, teacher, targets = make_case(seed=12, hs=6, ht=8)
    projection = HiddenProjection([(0, 0), (1, 1)], 6, 8)
    with pytest.raises(ValueError, match="one per pair"):
        hidden_state_loss(student[:1], teacher, projection, "mse", targets, 10)
    with pytest.raises(ValueError, match="one per pair"):
        hidden_state_loss(student, teacher[:1], projection, "mse", targets, 10)
    with pytest.raises(ValueError, match="leading dimensions"):
        hidden_state_loss(student, [h[:, :-1] for h in teacher], projection, "mse", targets, 10)
    with pytest.raises(ValueError, match="leading dimensions"):
        hidden_state_loss(student, teacher, projection, "mse", targets[:1], 10)
    with pytest.raises(ValueError, match="widths"):
        hidden_state_loss([h[..., :-1] for h in student], teacher, projection, "mse", targets, 10)
    with pytest.raises(ValueError, match="widths"):
        hidden_state_loss(student, [h[..., :-1] for h in teacher], projection, "mse", targets, 10)
    with pytest.raises(ValueError, match="out of range"):
        projection(2, student[0])
    with pytest.raises(ValueError):
        HiddenProjection([], 6, 8)


# ---- HiddenProjection -----------------------------------------------------------------------


def test_projection_is_identity_without_parameters_when_widths_match():
    projection = HiddenProjection([(0, 0), (1, 2)], 8, 8)
    assert list(projection.parameters()) == []
    assert projection.trainable is False
    h = torch.randn(2, 3, 8)
    assert projection(0, h) is h and projection(1, h) is h


def test_projection_has_one_bias_free_linear_per_pair_when_widths_differ():
    torch.manual_seed(5)
    projection = HiddenProjection([(0, 1), (1, 3), (2, 5)], 6, 10)
    maps = linears(projection)
    assert projection.trainable is True
    assert len(maps) == 3
    assert len(list(projection.parameters())) == 3
    for m in maps:
        assert m.bias is None and m.weight.shape == (10, 6)
    assert not torch.equal(maps[0].weight, maps[1].weight)
    h = torch.randn(2, 4, 6)
    for k, m in enumerate(maps):
        torch.testing.assert_close(projection(k, h), h @ m.weight.detach().T)


def test_projection_weights_follow_the_seed():
    torch.manual_seed(123)
    a = HiddenProjection([(0, 1), (1, 3)], 6, 10)
    torch.manual_seed(123)
    b = HiddenProjection([(0, 1), (1, 3)], 6, 10)
    torch.manual_seed(124)
    c = HiddenProjection([(0, 1), (1, 3)], 6, 10)
    for ma, mb, mc in zip(linears(a), linears(b), linears(c)):
        assert torch.equal(ma.weight, mb.weight)
        assert not torch.equal(ma.weight, mc.weight)


# ---- resolve_layer_map ----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 5, 12])
def test_auto_with_equal_depths_is_the_identity(depth):
    assert resolve_layer_map("auto", depth, depth) == [(i, i) for i in range(depth)]


def test_auto_spreads_the_student_evenly_ending_at_the_last_teacher_layer():
    assert resolve_layer_map("auto", 2, 4) == [(0, 1), (1, 3)]
    assert resolve_layer_map("auto", 3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert resolve_layer_map("auto", 1, 7) == [(0, 6)]
    # half-up rounding: 4 of 6 -> 1.5, 3, 4.5, 6 -> 2, 3, 5, 6 -> minus 1
    assert resolve_layer_map("auto", 4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]
    for s in range(1, 13):
        for t in range(s, 25):
            pairs = resolve_layer_map("auto", s, t)
            assert [p[0] for p in pairs] == list(range(s))
            teach = [p[1] for p in pairs]
            assert teach[-1] == t - 1, (s, t)
            assert all(0 <= x < t for x in teach)
            assert teach == sorted(set(teach)), (s, t)  # strictly increasing when the student is shallower


def test_auto_with_a_deeper_student_stays_in_range():
    assert resolve_layer_map("auto", 4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert resolve_layer_map("auto", 3, 1) == [(0, 0), (1, 0), (2, 0)]


def test_auto_with_sources_follows_the_pruning_map():
    assert resolve_layer_map("auto", 3, 8, sources=[0, 4, 7]) == [(0, 0), (1, 4), (2, 7)]
    assert resolve_layer_map("auto", 2, 4, sources=[3, 3]) == [(0, 3), (1, 3)]
    # explicit pairs win over sources
    assert resolve_layer_map([[0, 2]], 2, 4, sources=[3, 3]) == [(0, 2)]
    for bad in ([0, 1], [0, 1, 9], [0, True, 2]):
        with pytest.raises(LmdistillError) as info:
            resolve_layer_map("auto", 3, 8, sources=bad)
        assert "distill.hidden.layers" in str(info.value) and "\n" not in str(info.value)


def test_explicit_pairs_pass_through_as_tuples_in_order():
    pairs = resolve_layer_map([[1, 3], (0, 0), [2, 3]], 3, 4)
    assert pairs == [(1, 3), (0, 0), (2, 3)]
    assert all(type(p) is tuple and all(type(x) is int for x in p) for p in pairs)


@pytest.mark.parametrize(
    ("layers", "needles"),
    [
        ([[2, 0]], ["student layer 2", "0..1", "'auto'"]),
        ([[-1, 0]], ["student layer -1", "0..1"]),
        ([[0, 4]], ["teacher layer 4", "0..3"]),
        ([[0, -2]], ["teacher layer -2", "0..3"]),
        ([[0, 1], [1, 2], [0, 3]], ["student layer 0", "twice"]),
        ([[0, 1, 2]], ["[0, 1, 2]", "pair"]),
        ([[0]], ["[0]", "pair"]),
        ([0, 1], ["entry 0", "pair"]),
        ([["0", "1"]], ["['0', '1']", "pair"]),
        ([[0.0, 1]], ["[0.0, 1]", "pair"]),
        ([[True, 1]], ["[True, 1]", "pair"]),
        ([[0, False]], ["[0, False]", "pair"]),
        ("all", ["'all'", "'auto'"]),
        ("AUTO", ["'AUTO'", "'auto'"]),
        ("", ["'auto'"]),
        ([], ["empty"]),
        (None, ["None", "'auto'"]),
        (3, ["= 3", "'auto'"]),
        ({"0": 1}, ["{'0': 1}"]),
        (((0, 1),), ["((0, 1),)"]),
    ],
)
def test_invalid_layer_maps_are_one_line_user_errors(layers, needles):
    with pytest.raises(LmdistillError) as info:
        resolve_layer_map(layers, 2, 4)
    msg = str(info.value)
    assert "distill.hidden.layers" in msg
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_bad_depths_are_programming_errors():
    with pytest.raises(ValueError):
        resolve_layer_map("auto", 0, 4)
    with pytest.raises(ValueError):
        resolve_layer_map("auto", 2, 0)
