"""A step's statistics and the guard's decision travel by name: a value cannot land in another's slot."""

from __future__ import annotations

import math

import pytest

from lmdistill.config import GuardConfig
from lmdistill.training.guards import SUMMED_TERMS, Action, Cause, Decision, Guard, StepStats


def test_reduced_sums_become_statistics_by_name():
    # distinct values, so that any two swapped names would show
    sums = {name: float(i + 1) for i, name in enumerate(SUMMED_TERMS)} | {"grad_norm": 8.0, "stop_requested": 0.0}
    stats = StepStats.from_reduced(sums, processes=4, with_hidden=True, on_policy=True)
    assert (stats.loss, stats.kd, stats.kd_unscaled, stats.ce) == (
        sums["loss"],
        sums["kd"],
        sums["kd_unscaled"],
        sums["ce"],
    )
    assert stats.grad_norm == 2.0  # the mean of the four processes' norms
    assert stats.teacher_nonfinite is True and stats.stop_requested is False
    assert stats.hidden == sums["hidden"] and stats.on_policy is True
    assert StepStats.from_reduced(sums, processes=1, with_hidden=False, on_policy=False).hidden is None


def test_statistics_and_decisions_refuse_positional_values():
    with pytest.raises(TypeError):
        StepStats(1.0, 0.5, 0.2, 1.5, 0.3, False)
    with pytest.raises(TypeError):
        Decision("skip", "nonfinite:kd", "kd")


def test_a_decision_says_its_cause_as_the_metrics_line_did():
    guard = Guard(GuardConfig())
    bad = StepStats(loss=math.nan, kd=math.nan, kd_unscaled=math.nan, ce=1.0, grad_norm=1.0, teacher_nonfinite=False)
    decision = guard.decide(bad)
    # the culprit is the first non-finite term in the guard's order (teacher, kd, ce, loss, grad)
    assert (decision.action, decision.cause, decision.term) == (Action.SKIP, Cause.NONFINITE, "kd")
    assert decision.reason == "nonfinite:kd" and not decision.applies_update
    assert Decision(action=Action.ROLLBACK, cause=Cause.SPIKE, term="spike").reason == "spike"
    assert Decision(action=Action.STEP).reason is None
