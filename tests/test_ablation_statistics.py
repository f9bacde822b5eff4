"""The statistics module against hand values and brute-force oracles (loops over the definition)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokprune.ablation.statistics import (
    indistinguishable,
    mcnemar_exact,
    normalized_auc,
    paired_counts,
    wilson_interval,
)

Z = 1.959963984540054


def _wilson_by_inversion(k: int, n: int) -> tuple[float, float]:
    """The Wilson interval by its definition: every p the score test does not reject, on a fine grid."""
    p = np.linspace(0.0, 1.0, 400_001)
    accepted = p[(k / n - p) ** 2 <= Z * Z * p * (1 - p) / n]
    return float(accepted.min()), float(accepted.max())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2000), frac=st.floats(0, 1))
def test_wilson_equals_the_inverted_score_test(n: int, frac: float) -> None:
    k = round(frac * n)
    low, high = wilson_interval(k, n)
    ref_low, ref_high = _wilson_by_inversion(k, n)
    assert low == pytest.approx(ref_low, abs=5e-6)
    assert high == pytest.approx(ref_high, abs=5e-6)


def test_wilson_hand_values() -> None:
    # 0 of 10: (0, z²/(n+z²)); 500 questions: +-2.6 points at 90%, +-4.3 at 60% (the figures).
    assert wilson_interval(0, 10) == pytest.approx((0.0, Z * Z / (10 + Z * Z)))
    for k, half in ((450, 0.026), (300, 0.043)):
        low, high = wilson_interval(k, 500)
        assert (high - low) / 2 == pytest.approx(half, abs=5e-4)
        assert low < k / 500 < high


@pytest.mark.parametrize("k, n", [(1, 0), (-1, 10), (11, 10)])
def test_wilson_rejects_impossible_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError, match="n"):
        wilson_interval(k, n)


def _mcnemar_by_enumeration(b: int, c: int) -> float:
    """Two-sided exact binomial test by enumeration: the probability of every outcome at most as likely."""
    n = b + c
    probs = [math.comb(n, i) * 0.5**n for i in range(n + 1)]
    observed = probs[b]
    return min(1.0, sum(p for p in probs if p <= observed * (1 + 1e-12)))


@settings(max_examples=60, deadline=None)
@given(b=st.integers(0, 60), c=st.integers(0, 60))
def test_mcnemar_equals_enumeration(b: int, c: int) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(_mcnemar_by_enumeration(b, c), rel=1e-9)


def test_mcnemar_hand_values_and_symmetry() -> None:
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(3, 30) == mcnemar_exact(30, 3)
    # Large counts stay exact (no float overflow in 2**n).
    assert 0 < mcnemar_exact(900, 1100) < 1e-4


def test_paired_counts_counts_each_direction() -> None:
    assert paired_counts([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (2, 1)
    assert paired_counts([0.5, 1.0], [0.3, 1.0]) == (1, 0)
    with pytest.raises(ValueError, match="same questions"):
        paired_counts([1], [1, 0])


def test_normalized_auc_hand_values() -> None:
    assert normalized_auc([0, 1], [0, 1], 0, 1) == pytest.approx(0.5)
    assert normalized_auc([0, 1], [0, 1], 0.5, 1) == pytest.approx(0.75)
    assert normalized_auc([0.1, 0.5], [0.6, 0.6], 0.1, 0.5) == pytest.approx(0.6)
    assert normalized_auc([0.2, 0.5], [0.6, 0.9], 0.1, 0.5) is None  # does not reach 0.1: no extrapolation
    # Repeated x (random seeds) are averaged first.
    assert normalized_auc([0, 0, 1, 1], [0.2, 0.4, 0.6, 0.8], 0, 1) == pytest.approx(0.5)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=8, unique_by=lambda t: t[0]))
def test_normalized_auc_equals_a_fine_riemann_sum(points: list[tuple[float, float]]) -> None:
    points.sort()
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if xs[-1] - xs[0] < 1e-3:
        return
    low, high = xs[0] + (xs[-1] - xs[0]) * 0.1, xs[-1]
    grid = np.linspace(low, high, 200_001)
    reference = float(np.interp(grid, xs, ys).mean())
    assert normalized_auc(xs, ys, low, high) == pytest.approx(reference, abs=1e-4)


def test_indistinguishable_keeps_the_best_and_runs_not_separated() -> None:
    acc = {"a": 0.9, "b": 0.88, "c": 0.7}
    assert indistinguishable(acc, {"b": 0.3, "c": 0.001}) == ["a", "b"]
    assert indistinguishable(acc, {"b": 0.01, "c": 0.001}) == ["a"]
    assert indistinguishable({}, {}) == []
