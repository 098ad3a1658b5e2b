"""Temperature and learning-rate schedules: pure functions of the step.

Expected values are the original report's table and numbers worked out by hand below.
"""

from __future__ import annotations

import math

import pytest

from lmdistill.training.schedules import lr_at, temperature_at

SEED_TOTAL = 25_000
SEED_TABLE = [(0, 2.00), (5000, 1.90), (10000, 1.80), (15000, 1.70), (20000, 1.60), (25000, 1.50)]


@pytest.mark.parametrize("step, expected", SEED_TABLE)
def test_linear_temperature_reproduces_the_seed_table(step, expected):
    assert temperature_at(step, SEED_TOTAL, 2.0, 1.5) == pytest.approx(expected, abs=1e-12)
    assert temperature_at(step, SEED_TOTAL, 2.0, 1.5, "linear") == pytest.approx(expected, abs=1e-12)


def test_linear_temperature_is_clamped_outside_the_run():
    assert temperature_at(-10, SEED_TOTAL, 2.0, 1.5) == pytest.approx(2.0)
    assert temperature_at(30_000, SEED_TOTAL, 2.0, 1.5) == pytest.approx(1.5)
    # midpoint by hand: 2.0 + (1.5 - 2.0) * 0.5
    assert temperature_at(12_500, SEED_TOTAL, 2.0, 1.5) == pytest.approx(1.75)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_annealing_schedules_are_monotone_with_right_endpoints(schedule):
    total = 1000
    values = [temperature_at(s, total, 3.0, 1.0, schedule) for s in range(total + 1)]
    assert values[0] == pytest.approx(3.0)
    assert values[-1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] > values[total // 2] > values[-1]


def test_cosine_temperature_midpoint_and_quarter():
    # end + (start - end) * 0.5 * (1 + cos(pi * p))
    assert temperature_at(500, 1000, 3.0, 1.0, "cosine") == pytest.approx(2.0)
    assert temperature_at(250, 1000, 3.0, 1.0, "cosine") == pytest.approx(1.0 + 2.0 * 0.5 * (1 + math.cos(math.pi / 4)))
    # cosine stays above linear in the first half (slow start)
    assert temperature_at(250, 1000, 3.0, 1.0, "cosine") > temperature_at(250, 1000, 3.0, 1.0, "linear")


def test_constant_temperature():
    for step in (0, 1, 12_345, SEED_TOTAL, 10**6):
        assert temperature_at(step, SEED_TOTAL, 2.0, 1.5, "constant") == 2.0


def test_zero_total_steps_gives_the_end_value():
    assert temperature_at(0, 0, 2.0, 1.5) == pytest.approx(1.5)


def test_unknown_schedules_raise():
    with pytest.raises(ValueError, match="schedule"):
        temperature_at(0, 10, 2.0, 1.5, "exponential")
    with pytest.raises(ValueError, match="schedule"):
        lr_at(50, 100, 1e-3, 10, "linear")


def test_lr_warmup_rises_linearly_to_the_peak():
    peak, warmup, total = 1e-3, 10, 100
    values = [lr_at(s, total, peak, warmup) for s in range(warmup)]
    # equal increments of peak / warmup, starting at peak / warmup (step 0 already trains)
    for step, value in enumerate(values):
        assert value == pytest.approx(peak * (step + 1) / warmup)
    diffs = [b - a for a, b in zip(values, values[1:])]
    assert all(d == pytest.approx(peak / warmup) for d in diffs)
    assert values[-1] == pytest.approx(peak)
    assert lr_at(warmup, total, peak, warmup) == pytest.approx(peak)


def test_lr_cosine_decays_to_min_ratio():
    peak, warmup, total, ratio = 1e-3, 10, 110, 0.1
    after = [lr_at(s, total, peak, warmup, "cosine", ratio) for s in range(warmup, total + 1)]
    assert after[0] == pytest.approx(peak)
    assert after[-1] == pytest.approx(peak * ratio)
    assert all(a >= b for a, b in zip(after, after[1:]))
    # halfway through the decay: min + (peak - min) * 0.5 = 0.55 * peak
    assert lr_at(60, total, peak, warmup, "cosine", ratio) == pytest.approx(0.55 * peak)
    # past the end it stays at the floor
    assert lr_at(500, total, peak, warmup, "cosine", ratio) == pytest.approx(peak * ratio)


def test_lr_min_ratio_zero_reaches_zero():
    assert lr_at(100, 100, 2e-3, 0, "cosine", 0.0) == pytest.approx(0.0, abs=1e-15)


def test_lr_constant_schedule_after_warmup():
    peak = 3e-4
    assert lr_at(0, 100, peak, 4, "constant") == pytest.approx(peak / 4)
    for step in (4, 50, 100, 1000):
        assert lr_at(step, 100, peak, 4, "constant") == peak


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, 100, 1e-3, 0) == pytest.approx(1e-3)
