"""Statistics for ablation tables: Wilson intervals, exact paired tests, curve areas, tie groups.

The tests and intervals come from scipy; our own code is left only where no library does it:

* :func:`wilson_interval`: the Wilson score interval for a proportion (Wilson 1927), the interval
  recommended over the normal ("Wald") one by Brown, Cai & DasGupta (2001) for n in the hundreds and
  proportions near 0 or 1: ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``. A fractional
  count (a sum of VQA's 0..1 scores) is not a binomial count, which scipy refuses: the same closed
  formula is evaluated here for it (:func:`wilson_formula`, tested against scipy at integer counts);
* :func:`mcnemar_exact`: McNemar's test in its exact form, a two-sided binomial test of the discordant
  pairs against p = 1/2 (the "exact conditional" McNemar test): ``scipy.stats.binomtest(b, b + c, 0.5)``;
* :func:`normalized_auc`: mean accuracy over a budget interval (the area under the piecewise-linear
  accuracy-budget curve divided by the interval's width): ``numpy.interp`` and ``scipy.integrate.trapezoid``
  on the curve cut at the interval's ends;
* :func:`indistinguishable`: the runs a paired test cannot separate from the best one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import integrate, stats

__all__ = [
    "Z95",
    "indistinguishable",
    "mcnemar_exact",
    "normalized_auc",
    "paired_counts",
    "wilson_formula",
    "wilson_interval",
]

#: The two-sided 95% normal quantile (``Phi^-1(0.975)``).
Z95 = 1.959963984540054


def _check_counts(successes: float, n: int) -> None:
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1 samples, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")


def wilson_formula(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval by its closed formula, for any (also fractional) ``successes``.

    ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = successes / n`` and ``z`` the
    two-sided normal quantile of ``confidence``: the ``p`` whose normal test does not reject the observation.
    """
    _check_counts(successes, n)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` for ``successes`` out of ``n`` (scipy's ``proportion_ci``).

    ``successes`` may be fractional (a sum of 0..1 scores such as VQA's); the interval then treats the mean
    score as a proportion, an approximation, by :func:`wilson_formula` (scipy takes whole counts only).
    """
    _check_counts(successes, n)
    if not float(successes).is_integer():
        return wilson_formula(successes, n, confidence)
    ci = stats.binomtest(int(successes), n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def paired_counts(a: Sequence[float], b: Sequence[float]) -> tuple[int, int]:
    """Discordant pairs of two runs scored on the same questions: ``(#a better, #b better)``.

    For 0/1 scores these are McNemar's off-diagonal cells; for fractional scores a question counts for
    whichever run scored higher (the sign test).
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same questions: got {len(a)} and {len(b)} scores")
    return sum(x > y for x, y in zip(a, b)), sum(x < y for x, y in zip(a, b))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    Under the null each discordant pair goes either way with probability 1/2: a two-sided binomial test
    of ``b`` successes in ``b + c`` trials at ``p = 1/2`` (``scipy.stats.binomtest``), which for this
    symmetric null is ``min(1, 2 P(X <= min(b, c)))``. No discordant pair: ``p = 1``.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue)


def normalized_auc(xs: Sequence[float], ys: Sequence[float], low: float, high: float) -> float | None:
    """Mean of the piecewise-linear curve through ``(xs, ys)`` over ``[low, high]``, or ``None`` when
    the curve does not cover the interval (no extrapolation: a method that cannot reach a budget has no
    value there).

    ``(1 / (high - low)) ∫ y(x) dx`` by the trapezoid rule, with the curve cut at ``low`` and ``high``
    by linear interpolation; points with equal ``x`` are averaged. For accuracies in [0, 1] the result is
    in [0, 1]: 1 means full accuracy at every budget of the interval.
    """
    if not high > low:
        raise ValueError(f"normalized_auc needs high > low, got [{low}, {high}]")
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length: {len(xs)} vs {len(ys)}")
    by_x: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
        by_x.setdefault(float(x), []).append(float(y))
    px = sorted(by_x)
    py = [sum(by_x[x]) / len(by_x[x]) for x in px]
    if not px or px[0] > low or px[-1] < high:
        return None
    cut = np.array([low, *[x for x in px if low < x < high], high])
    return float(integrate.trapezoid(np.interp(cut, px, py), cut)) / (high - low)


def indistinguishable(accuracy: Mapping[str, float], p_vs_best: Mapping[str, float], alpha: float = 0.05) -> list[str]:
    """The runs a paired test cannot separate from the most accurate one, best first.

    ``accuracy``: run -> accuracy; ``p_vs_best``: run -> p-value of its paired test against the best run
    (the best itself may be absent). A run is in the group when ``p >= alpha`` (unadjusted: a run left
    out differs at level ``alpha``; a run kept in is *not shown* to differ, which is not the same as equal).
    """
    if not accuracy:
        return []
    best = max(accuracy, key=lambda k: accuracy[k])
    group = [k for k in accuracy if k == best or p_vs_best.get(k, 0.0) >= alpha]
    return sorted(group, key=lambda k: -accuracy[k])
