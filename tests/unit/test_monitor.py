"""The original report's health checks (monitor.py) and the guards that feed them (guards.py).

Numbers come from the original report: start loss ~38 at T=3 against the healthy ~17, the spike
pattern 17 -> 25 -> 17, and perplexity 2.3e12 against the 1M limit after step 5000 of 25000.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lmdistill.config import DebugConfig, GuardConfig, HealthConfig
from lmdistill.training.faults import FaultInjector, poison
from lmdistill.training.guards import CHECKED_TERMS, SpikeDetector, first_nonfinite
from lmdistill.training.monitor import HealthMonitor, verdict_line


def default_detector() -> SpikeDetector:
    g = GuardConfig()
    return SpikeDetector(window=g.spike_window, warmup=g.spike_warmup, factor=g.spike_factor, mad_k=g.spike_mad)


def flat_noisy(n: int, level: float = 17.0, noise: float = 0.4, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.uniform(-noise, noise) for _ in range(n)]


def feed(detector: SpikeDetector, losses: list[float]) -> list[bool]:
    flags = []
    for loss in losses:
        flags.append(detector.judge(loss)[0])
        detector.observe(loss)
    return flags


# ---- SpikeDetector -------------------------------------------------------------------------


def test_seed_spike_pattern_is_flagged_after_warmup():
    det = default_detector()
    assert not any(feed(det, flat_noisy(40)))
    is_spike, median = det.judge(25.0)
    assert is_spike
    assert median == pytest.approx(17.0, abs=0.4)
    det.observe(25.0)
    # back to 17: not a spike, and one spike does not move the median much
    is_spike, median = det.judge(17.0)
    assert not is_spike
    assert median == pytest.approx(17.0, abs=0.4)


def test_normal_noise_is_not_flagged():
    det = default_detector()
    assert not any(feed(det, flat_noisy(500, noise=1.5, seed=1)))


def test_decreasing_loss_is_not_flagged():
    det = default_detector()
    losses = [17.0 * math.exp(-i / 200) + random.Random(i).uniform(-0.2, 0.2) for i in range(400)]
    assert not any(feed(det, losses))


def test_no_judgement_during_warmup():
    det = default_detector()
    feed(det, flat_noisy(GuardConfig().spike_warmup - 1))
    assert det.judge(25.0) == (False, pytest.approx(float("nan"), nan_ok=True))


def test_both_conditions_are_needed():
    # relative jump below the factor (1.2x < 1.4x), although many MADs out: no spike
    det = default_detector()
    feed(det, flat_noisy(40, noise=0.05))
    assert not det.judge(17.0 * 1.2)[0]
    assert det.judge(25.0)[0]  # the original report's 17 -> 25
    # very noisy history (MAD ~ 7): 25 is within the noise, no spike
    det2 = default_detector()
    feed(det2, [10.0, 24.0] * 20)
    assert not det2.judge(25.0)[0]


def test_nonfinite_losses_are_neither_spikes_nor_history():
    det = default_detector()
    feed(det, flat_noisy(30))
    assert not det.judge(float("nan"))[0]
    det.observe(float("nan"))
    det.observe(float("inf"))
    assert len(det.history) == 30


def test_spike_detector_state_round_trip():
    det = default_detector()
    feed(det, flat_noisy(30))
    other = default_detector()
    other.load_state_dict(det.state_dict())
    assert other.judge(25.0) == det.judge(25.0)


# ---- HealthMonitor: start loss and eval perplexity -----------------------------------------


def test_start_loss_fires_for_the_seed_38_not_for_17_5():
    hot = HealthMonitor(HealthConfig(), total_steps=100)
    fired = hot.on_train_loss(0, 38.0)
    assert [name for name, _ in fired] == ["start_loss"]
    assert "38.00" in fired[0][1]
    ok = HealthMonitor(HealthConfig(), total_steps=100)
    assert ok.on_train_loss(0, 17.5) == []
    assert ok.checks["start_loss"].status == "passed"


def test_start_loss_judges_only_the_first_finite_loss():
    mon = HealthMonitor(HealthConfig(), total_steps=100)
    assert mon.on_train_loss(0, float("nan")) == []
    assert [n for n, _ in mon.on_train_loss(1, 38.0)] == ["start_loss"]
    assert mon.on_train_loss(2, 40.0) == []  # later losses are the spike detector's business
    assert mon.checks["start_loss"].steps == [1]


def test_eval_ppl_fires_only_after_ppl_after_step():
    mon = HealthMonitor(HealthConfig(ppl_after_step=5000), total_steps=25_000)
    assert mon.on_eval(4999, 2.3e12) == []
    fired = mon.on_eval(5000, 2.3e12)
    assert [n for n, _ in fired] == ["eval_ppl"]
    assert "2.3e+12" in fired[0][1]
    assert mon.on_eval(6000, 485.0) == []
    assert mon.checks["eval_ppl"].steps == [5000]


def test_eval_ppl_defaults_to_20_percent_of_the_run():
    mon = HealthMonitor(HealthConfig(), total_steps=25_000)
    assert mon.ppl_after_step == 5000  # the original report's "after step 5000" of 25000
    assert mon.on_eval(4000, 2.3e12) == []
    assert mon.on_eval(5000, 2.3e12) != []
    assert HealthMonitor(HealthConfig(), total_steps=100).ppl_after_step == 20


def test_eval_ppl_limit_and_nan():
    mon = HealthMonitor(HealthConfig(ppl_after_step=0), total_steps=10)
    assert mon.on_eval(1, 1e6) == []  # at the limit: fine
    assert mon.on_eval(2, 1.0001e6) != []
    assert mon.on_eval(3, float("nan")) != []
    assert mon.on_eval(4, math.inf) != []


# ---- loss plateau --------------------------------------------------------------------------


def run_losses(losses, window=10, patience=2, total=1000):
    mon = HealthMonitor(HealthConfig(plateau_window=window, plateau_patience=patience), total_steps=total)
    fired = []
    for step, loss in enumerate(losses):
        fired += [(step, name) for name, _ in mon.on_train_loss(step, loss)]
    return mon, fired


def test_plateau_fires_on_a_flat_series():
    mon, fired = run_losses([5.0] * 60)
    plateau = [s for s, n in fired if n == "loss_plateau"]
    # windows end at steps 9, 19, 29, ...; the 2nd and 3rd windows do not beat the 1st
    assert plateau and plateau[0] == 29
    assert mon.checks["loss_plateau"].status == "fired"


def test_plateau_fires_on_an_increasing_series():
    _, fired = run_losses([3.0 + 0.01 * i for i in range(60)])
    assert any(n == "loss_plateau" for _, n in fired)


def test_plateau_does_not_fire_on_a_decreasing_series():
    rng = random.Random(0)
    mon, fired = run_losses([8.0 * math.exp(-i / 100) + rng.uniform(-0.05, 0.05) for i in range(200)])
    assert fired == []
    assert mon.finalize()["verdict"] == "healthy"


def test_plateau_window_default_is_10_percent_of_the_run_at_least_10():
    assert HealthMonitor(HealthConfig(), total_steps=1000).window == 100
    assert HealthMonitor(HealthConfig(), total_steps=30).window == 10


# ---- finalize ------------------------------------------------------------------------------


def statuses(health: dict) -> dict:
    return {c["name"]: c["status"] for c in health["checks"]}


def test_finalize_healthy_run():
    mon, _ = run_losses([8.0 - 0.05 * i for i in range(40)], total=40)
    mon.on_eval(39, 50.0)
    health = mon.finalize()
    assert health["verdict"] == "healthy" and health["fired"] == []
    assert statuses(health) == {
        "start_loss": "passed",
        "loss_spike": "passed",
        "nonfinite": "passed",
        "eval_ppl": "passed",
        "loss_plateau": "passed",
        "teacher_ppl": "not_reached",
    }
    assert verdict_line(health).startswith("HEALTHY")


def test_finalize_not_reached_and_fired():
    mon = HealthMonitor(HealthConfig(), total_steps=25_000)
    health = mon.finalize()
    assert statuses(health) == {
        "start_loss": "not_reached",
        "loss_spike": "passed",
        "nonfinite": "passed",
        "eval_ppl": "not_reached",
        "loss_plateau": "not_reached",
        "teacher_ppl": "not_reached",
    }
    assert health["verdict"] == "healthy"

    mon = HealthMonitor(HealthConfig(), total_steps=25_000)
    mon.on_train_loss(0, 38.0)
    mon.on_spike(600, 28.0, 17.0, "warn")
    mon.on_nonfinite(436, "ce")
    mon.on_eval(5000, 2.3e12)
    health = mon.finalize()
    assert health["verdict"] == "attention"
    assert set(health["fired"]) == {"start_loss", "loss_spike", "nonfinite", "eval_ppl"}
    assert statuses(health)["loss_plateau"] == "not_reached"
    by_name = {c["name"]: c for c in health["checks"]}
    assert by_name["nonfinite"]["steps"] == [436] and "ce" in by_name["nonfinite"]["messages"][0]
    assert verdict_line(health).startswith("ATTENTION: 4 of 6")


def test_monitor_state_round_trip_continues_the_same_way():
    a, _ = run_losses([5.0] * 15)
    b = HealthMonitor(HealthConfig(plateau_window=10, plateau_patience=2), total_steps=1000)
    # through JSON, as a checkpoint stores it (state_dict returns live references, not copies)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    fired_a = [a.on_train_loss(s, 5.0) for s in range(15, 30)]
    fired_b = [b.on_train_loss(s, 5.0) for s in range(15, 30)]
    assert fired_a == fired_b and any(fired_a)


# ---- guards: non-finite ordering and fault injection ---------------------------------------


def test_first_nonfinite_follows_checked_terms_order():
    assert CHECKED_TERMS[0] == "teacher_logits" and CHECKED_TERMS[-1] == "grad"
    assert first_nonfinite({"grad": math.nan, "loss": math.inf, "kd": math.nan}) == "kd"
    assert first_nonfinite({"ce": math.nan, "teacher_logits": -math.inf}) == "teacher_logits"
    assert first_nonfinite({"loss": 1.0, "grad": math.inf}) == "grad"
    assert first_nonfinite({"kd": 1.0, "ce": 2.0, "loss": 3.0, "grad": 4.0}) is None
    assert first_nonfinite({"other": math.nan}) is None  # only the checked terms count


def test_fault_injector_poison_replaces_first_element_and_keeps_autograd():
    inj = FaultInjector(
        DebugConfig(
            inject=[{"step": 3, "where": "loss", "value": "nan"}, {"step": 4, "where": "grad", "value": "-inf"}]
        )
    )
    assert inj.active
    x = torch.arange(1.0, 5.0, requires_grad=True)
    y = x * 2
    out = poison(y, inj.value(3, "loss"))
    assert out is not y
    assert math.isnan(out[0].item())
    assert out[1:].tolist() == [4.0, 6.0, 8.0]
    assert y.tolist() == [2.0, 4.0, 6.0, 8.0]  # the input is not modified
    out[1:].sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 2.0, 2.0]
    assert poison(y, inj.value(4, "grad"))[0].item() == -math.inf
    # other steps or places, or outside a training step: the very same tensor
    assert poison(y, inj.value(3, "grad")) is y
    assert poison(y, inj.value(5, "loss")) is y
    assert poison(y, inj.value(None, "loss")) is y


def test_fault_injector_rank_filter_and_multiplier():
    cfg = DebugConfig(inject=[{"step": 1, "where": "loss", "value": "inf", "rank": 1}], loss_multiplier={30: 4.0})
    rank0, rank1 = FaultInjector(cfg, rank=0), FaultInjector(cfg, rank=1)
    assert rank0.value(1, "loss") is None
    assert rank1.value(1, "loss") == math.inf
    assert rank0.loss_multiplier == {30: 4.0}
    assert not FaultInjector(DebugConfig()).active


def test_teacher_worse_than_uniform_fires_once_and_a_good_teacher_passes():
    """A uniform guess over V tokens has perplexity V: a teacher above it knows less than nothing."""
    bad = HealthMonitor(HealthConfig(), total_steps=100, vocab_size=4096)
    fired = bad.on_eval(0, 4000.0, teacher_ppl=19150.0)
    assert [name for name, _ in fired] == ["teacher_ppl"] and "1.915e+04" in fired[0][1] and "4096" in fired[0][1]
    assert bad.on_eval(50, 300.0, teacher_ppl=19150.0) == []  # judged once
    assert "teacher_ppl" in bad.finalize()["fired"]
    good = HealthMonitor(HealthConfig(), total_steps=100, vocab_size=4096)
    assert good.on_eval(0, 4000.0, teacher_ppl=145.2) == []
    assert statuses(good.finalize())["teacher_ppl"] == "passed"
    nan = HealthMonitor(HealthConfig(), total_steps=100, vocab_size=4096)
    assert [name for name, _ in nan.on_eval(0, 10.0, teacher_ppl=float("nan"))] == ["teacher_ppl"]


def test_spike_must_be_material_as_well_as_unusual():
    """A healthy pure-KD loss near 0.14 that wobbles to 0.19 (1.37x its median, far outside its tiny
    MAD) fired the old defaults (factor 1.3, no floor); so would 0.21 (1.5x). Both are a few
    hundredths of a nat: no spike under the default floor of 0.5 nats. A 20x jump still is one."""
    g = GuardConfig()
    flat = [0.138 + 0.001 * (i % 3) for i in range(30)]
    detector = SpikeDetector(g.spike_window, g.spike_warmup, g.spike_factor, g.spike_mad, g.spike_min_increase)
    feed(detector, flat)
    assert detector.judge(0.190) == (False, pytest.approx(0.139))
    assert not detector.judge(0.210)[0]
    assert detector.judge(0.138 * 20)[0]
    old = SpikeDetector(g.spike_window, g.spike_warmup, 1.3, g.spike_mad, 0.0)
    feed(old, flat)
    assert old.judge(0.190)[0] and old.judge(0.210)[0]  # the false alarms the defaults now avoid
