"""The statistics module against hand values and brute-force oracles (loops over the definition)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from tokprune.ablation.statistics import (
    indistinguishable,
    mcnemar_exact,
    normalized_auc,
    paired_counts,
    wilson_formula,
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


# -- scipy against the formulas the report printed before it (issue 26: equal to 1e-9) -----------------


def _wilson_before(successes: float, n: int, z: float = Z) -> tuple[float, float]:
    """The report's Wilson interval before scipy: the closed formula in pure Python."""
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _wald(successes: float, n: int, z: float = Z) -> tuple[float, float]:
    """A wrong interval (the normal approximation) the comparison must reject."""
    p = successes / n
    half = z * math.sqrt(p * (1 - p) / n)
    return max(0.0, p - half), min(1.0, p + half)


def _mcnemar_before(b: int, c: int) -> float:
    """The report's exact McNemar p-value before scipy: an exact integer sum."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


@pytest.mark.parametrize("n", [1, 7, 16, 125, 500, 2000])
def test_wilson_from_scipy_equals_the_formula_printed_before(n: int) -> None:
    for k in range(n + 1):
        assert wilson_interval(k, n) == pytest.approx(_wilson_before(k, n), abs=1e-9, rel=0), (k, n)
        assert wilson_interval(float(k), n) == wilson_interval(k, n)  # 0/1 scores arrive as float sums
    # The comparison has teeth: the Wald interval differs by far more than 1e-9 away from p = 0, 1/2, 1.
    assert wilson_interval(450, 500) != pytest.approx(_wald(450, 500), abs=1e-9)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (450, 500), (1, 2000)])
def test_our_wilson_formula_equals_scipy_where_both_apply(k: int, n: int) -> None:
    ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    assert wilson_formula(k, n, confidence=0.9) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_fractional_counts_use_the_formula() -> None:
    # VQA-style scores sum to a fraction, which scipy's binomtest refuses: the same formula answers.
    assert wilson_interval(2.5, 10) == pytest.approx(_wilson_before(2.5, 10), abs=1e-12)
    assert wilson_interval(2.5, 10) == wilson_formula(2.5, 10)


def test_mcnemar_from_scipy_equals_the_exact_sum_printed_before() -> None:
    pairs = [(b, c) for b in range(0, 61, 3) for c in range(0, 61, 4)] + [(0, 500), (900, 1100), (250, 250), (1, 499)]
    for b, c in pairs:
        before = _mcnemar_before(b, c)
        assert mcnemar_exact(b, c) == pytest.approx(before, abs=1e-9, rel=1e-9), (b, c)
    # One-sided by mistake would halve every p-value below 1: the comparison rejects it.
    one_sided = scipy.stats.binomtest(3, 30, 0.5, alternative="less").pvalue
    assert one_sided != pytest.approx(_mcnemar_before(3, 30), abs=1e-9)


def _auc_before(xs, ys, low, high):
    """The report's curve area before numpy/scipy: interpolation and trapezoids in pure Python."""
    by_x = {}
    for x, y in zip(xs, ys):
        by_x.setdefault(float(x), []).append(float(y))
    px = sorted(by_x)
    py = [sum(by_x[x]) / len(by_x[x]) for x in px]
    if px[0] > low or px[-1] < high:
        return None

    def at(x):
        for (x0, y0), (x1, y1) in zip(zip(px, py), zip(px[1:], py[1:])):
            if x0 <= x <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        raise AssertionError(x)

    cut = [low, *[x for x in px if low < x < high], high]
    vals = [at(x) for x in cut]
    return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(cut, cut[1:], vals, vals[1:])) / (high - low)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=10))
def test_normalized_auc_equals_the_area_printed_before(points: list[tuple[float, float]]) -> None:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if max(xs) - min(xs) < 1e-6:
        return
    low, high = min(xs) + (max(xs) - min(xs)) * 0.2, max(xs)
    assert normalized_auc(xs, ys, low, high) == pytest.approx(_auc_before(xs, ys, low, high), abs=1e-9)


def test_the_report_metrics_equal_the_numbers_printed_before() -> None:
    from tokprune.ablation.metrics import accuracy_by_type_ci

    records = [{"qtype": "ab"[i % 2], "score": float(i % 3 != 0)} for i in range(500)]
    for qtype, ci in accuracy_by_type_ci(records).items():
        scores = [r["score"] for r in records if r["qtype"] == qtype]
        assert ci == pytest.approx(list(_wilson_before(sum(scores), len(scores))), abs=1e-9)
