"""The knob search: monotone curves either way, integer and log-scale float knobs, unreachable targets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokprune.ablation.calibrate import axis_value, search


@settings(max_examples=50, deadline=None)
@given(n=st.integers(8, 600), target=st.floats(0.01, 1.0), lag=st.integers(0, 5))
def test_integer_knob_lands_on_the_closest_reachable_value(n: int, target: float, lag: int) -> None:
    # A budget like FastV's: a floor, then linear in keep (in fractions of n).
    calls: list[int] = []

    def measure(k: int) -> float:
        calls.append(k)
        return (lag + k) / (lag + n)

    tol = 0.5 / n
    found = search(measure, 1, n, target, tolerance=tol, integer=True, max_steps=6)
    best = min(abs(measure(k) - target) for k in range(1, n + 1))
    # Within the tolerance when some value is; else the closest value there is (the lowest keep).
    assert abs(measure(found.value) - target) <= max(tol, best) + 1e-12
    assert found.reachable == (best <= tol + 1e-12)
    assert found.steps <= 8  # both ends plus max_steps


def test_decreasing_float_knob_on_a_log_scale() -> None:
    def measure(factor: float) -> float:  # fewer tokens for a larger fence, a steep then flat curve
        return 0.05 + 0.4 / (1 + factor)

    found = search(measure, 0.02, 50.0, 0.2, tolerance=0.002, integer=False, max_steps=10)
    assert found.reachable and abs(found.budget - 0.2) <= 0.002
    assert found.value == pytest.approx(0.4 / 0.15 - 1, rel=0.05)


def test_unreachable_target_takes_the_closest_end() -> None:
    found = search(lambda k: 0.5 + k / 1000, 1, 144, 0.07, tolerance=0.01, integer=True)
    assert (found.value, found.reachable, found.steps) == (1, False, 2)


def test_a_step_function_stops_between_adjacent_integers() -> None:
    calls: list[int] = []

    def measure(k: int) -> float:
        calls.append(k)
        return 0.1 if k < 50 else 0.9

    found = search(measure, 1, 144, 0.5, tolerance=0.01, integer=True, max_steps=20)
    assert {49, 50} <= set(calls) and len(calls) < 20  # the bracket shrank to the jump, then stopped
    assert found.budget in (0.1, 0.9) and not found.reachable  # no setting within the tolerance


def test_axis_values() -> None:
    sums = {"visual_layer_sum": 30.0, "visual_last_sum": 10.0, "visual_total_sum": 100.0,
            "flops_pruned_sum": 3.0, "flops_unpruned_sum": 4.0}
    assert axis_value("equiv_tokens", sums) == 0.3
    assert axis_value("kept_tokens", sums) == 0.1
    assert axis_value("flops", sums) == 0.75
    with pytest.raises(ValueError, match="equiv_tokens, kept_tokens, flops"):
        axis_value("tokens", sums)
    assert math.isfinite(axis_value("flops", sums))
