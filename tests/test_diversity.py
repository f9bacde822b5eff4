"""The diversity primitives against slow per-sample loop references written from the papers' steps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokprune import scoring

# ---------------------------------------------------------------------------------------------
# Loop references: one sample at a time, plain Python over tokens
# ---------------------------------------------------------------------------------------------


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    nu, nv = max(u.norm().item(), 1e-8), max(v.norm().item(), 1e-8)
    return float((u @ v).item() / (nu * nv))


def divprune_loop(x: torch.Tensor, k: int, cand: list[int]) -> list[int]:
    """DivPrune (vbdi/divprune llava_arch.py::DivPrune) for one sample, over the candidate tokens."""
    # symmetric by construction: a mutual-nearest pair ties exactly, and the tie goes to the lower index
    dist = {(i, j): 1.0 - _cos(x[min(i, j)], x[max(i, j)]) for i in cand for j in cand}
    picks: list[int] = []
    for step in range(min(k, len(cand))):
        best, best_score = None, -math.inf
        for j in cand:
            if j in picks:
                continue
            if step == 0:
                others = [dist[(i, j)] for i in cand if i != j]
                score = min(others) if others else math.inf
            else:
                score = min(dist[(i, j)] for i in picks)
            if score > best_score:
                best, best_score = j, score
        picks.append(best)
    return picks


def dpp_loop(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy DPP MAP by brute force: each step adds the item maximising log det(L_S)."""
    n = kernel.shape[0]
    picks: list[int] = []
    for _ in range(min(k, n)):
        best, best_det = None, -math.inf
        for j in range(n):
            if j in picks:
                continue
            idx = picks + [j]
            det = torch.linalg.det(kernel[idx][:, idx].double()).item()
            if det > best_det:
                best, best_det = j, det
        picks.append(best)
    return picks


def vispruner_loop(x: torch.Tensor, index: list[int], target: int, step: int = 8) -> list[int]:
    """VisPruner's duplicate removal written per sample with lists."""
    current = list(index)
    while len(current) > target:
        r = min(step, len(current) - target)
        a, b = current[::2], current[1::2]
        if not b:
            break
        scores = [max(_cos(x[i], x[j]) for j in b) for i in a]
        ranked = sorted(range(len(a)), key=lambda t: -scores[t])  # stable: ties keep slot order
        current = [a[t] for t in ranked[r:]] + b
    return current[:target]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 3),
    n=st.integers(1, 12),
    k=st.integers(0, 14),
    masked=st.booleans(),
)
def test_max_min_diversity_matches_the_loop(seed, b, n, k, masked):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 5, generator=gen, dtype=torch.float64)
    cand = torch.rand(b, n, generator=gen) < 0.7 if masked else torch.ones(b, n, dtype=torch.bool)
    keep, order = scoring.max_min_diversity(x, k, cand)
    for i in range(b):
        ref = divprune_loop(x[i], k, cand[i].nonzero().flatten().tolist())
        assert order[i, : len(ref)].tolist() == ref
        assert keep[i].nonzero().flatten().tolist() == sorted(ref)
        assert (order[i, len(ref) :] == -1).all()


def test_max_min_diversity_per_row_counts_are_prefixes():
    x = torch.randn(3, 10, 4, generator=torch.Generator().manual_seed(0))
    keep, order = scoring.max_min_diversity(x, torch.tensor([2, 5, 9]))
    assert keep.sum(dim=1).tolist() == [2, 5, 9]
    _, alone = scoring.max_min_diversity(x[1:2], 5)
    assert order[1, :5].tolist() == alone[0].tolist()


def test_max_min_diversity_spreads_over_clusters():
    # three tight clusters: three picks land in three different clusters, whatever the cluster sizes
    centres = torch.eye(3)
    x = torch.cat([centres[0].repeat(6, 1), centres[1].repeat(2, 1), centres[2].repeat(1, 1)])
    x = x + 0.01 * torch.randn(9, 3, generator=torch.Generator().manual_seed(1))
    keep, _ = scoring.max_min_diversity(x[None], 3)
    picked = keep[0].nonzero().flatten().tolist()
    assert {0 if i < 6 else 1 if i < 8 else 2 for i in picked} == {0, 1, 2}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), k=st.integers(0, 9), rank=st.integers(1, 8))
def test_dpp_greedy_map_matches_brute_force_log_det(seed, n, k, rank):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(2, n, rank, generator=gen, dtype=torch.float64)
    kernel = f @ f.transpose(1, 2) + 1e-3 * torch.eye(n, dtype=torch.float64)  # full rank
    keep, order = scoring.dpp_greedy_map(kernel, k)
    for i in range(2):
        ref = dpp_loop(kernel[i], k)
        assert order[i, : len(ref)].tolist() == ref
        assert keep[i].sum().item() == min(k, n)


def test_dpp_greedy_map_rank_deficient_kernel_has_no_nan_and_fills_the_budget():
    f = torch.ones(1, 6, 1)  # rank 1: the reference divides by sqrt(0) after the first pick
    keep, order = scoring.dpp_greedy_map(f @ f.transpose(1, 2), 4)
    assert keep.sum().item() == 4 and (order >= 0).all()


def test_dpp_greedy_map_respects_candidates_and_counts():
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(2, 7, 7, generator=gen)
    kernel = f @ f.transpose(1, 2)
    cand = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    keep, _ = scoring.dpp_greedy_map(kernel, torch.tensor([5, 2]), cand)
    assert keep.sum(dim=1).tolist() == [3, 2]
    assert not (keep & ~cand).any()


def test_norm_pivots_are_the_largest_l1_norms_among_candidates():
    x = torch.tensor([[[1.0, 1.0], [3.0, -3.0], [0.5, 0.0], [-2.0, 2.5]]])
    cand = torch.tensor([[True, False, True, True]])
    assert scoring.norm_pivots(x, 2, cand).tolist() == [[True, False, False, True]]
    assert scoring.norm_pivots(x, 1, p=float("inf")).tolist() == [[False, True, False, False]]


def test_similarity_to_pivots_is_cosine():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, generator=gen)
    index = torch.tensor([[0, 3], [5, 5]])
    sim = scoring.similarity_to_pivots(x, index, torch.tensor([[True, True], [True, False]]))
    for b in range(2):
        for p in range(2):
            for j in range(6):
                expected = _cos(x[b, index[b, p]], x[b, j]) if (b, p) != (1, 1) else 0.0
                assert sim[b, p, j].item() == pytest.approx(expected, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(0, 30), target=st.integers(0, 30), step=st.integers(1, 9))
def test_remove_duplicates_matches_the_loop(seed, r, target, step):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, 6, generator=gen, dtype=torch.float64)
    index = torch.stack([torch.randperm(32, generator=gen)[:r] for _ in range(2)])
    out = scoring.remove_duplicates(x, index, target, step=step)
    for i in range(2):
        assert out[i].tolist() == vispruner_loop(x[i], index[i].tolist(), target, step)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), step=st.integers(1, 9), full=st.booleans())
def test_remove_duplicates_of_ragged_rows_is_each_row_alone(seed, step, full):
    # rows of different lengths and targets, noise past each row's length: one batched run gives every
    # row what the reference loop gives it alone, then -1; full rows give the dense result
    gen = torch.Generator().manual_seed(seed)
    b, width = 4, 30
    x = torch.randn(b, 40, 6, generator=gen, dtype=torch.float64)
    index = torch.stack([torch.randperm(40, generator=gen)[:width] for _ in range(b)])
    lengths = torch.full((b,), width) if full else torch.randint(0, width + 1, (b,), generator=gen)
    target = torch.randint(0, width + 1, (b,), generator=gen)
    out = scoring.remove_duplicates(x, index, target, step=step, lengths=lengths)
    for i in range(b):
        want = vispruner_loop(x[i], index[i, : lengths[i]].tolist(), int(target[i]), step)
        assert out[i, : len(want)].tolist() == want and bool((out[i, len(want) :] == -1).all())
    if full:
        same = torch.full((b,), int(target[0]))
        dense = scoring.remove_duplicates(x, index, int(target[0]), step=step)
        assert torch.equal(scoring.remove_duplicates(x, index, same, step=step, lengths=lengths), dense)


def test_remove_duplicates_drops_the_duplicate_first():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.01], [-1.0, 0.3]]])
    # slots A = (0, 3), B = (1, 2): token 0 nearly duplicates token 2 across the split and goes first;
    # the surviving a's come first, then every b
    out = scoring.remove_duplicates(x, torch.tensor([[0, 1, 3, 2]]), 3, step=1)
    assert out.tolist() == [[3, 1, 2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_primitives_accept_low_precision_without_nan(dtype):
    x = torch.ones(2, 5, 3, dtype=dtype)  # constant: every distance 0, the kernel rank 1
    keep, _ = scoring.max_min_diversity(x, 3)
    assert keep.sum(dim=1).tolist() == [3, 3]
    kernel = torch.ones(2, 5, 5, dtype=dtype)
    keep, _ = scoring.dpp_greedy_map(kernel, 4)
    assert keep.sum(dim=1).tolist() == [4, 4]
    assert torch.isfinite(scoring.similarity_to_pivots(x, torch.zeros(2, 1, dtype=torch.long))).all()


def test_bad_arguments_name_the_value():
    x = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="k must be >= 0"):
        scoring.max_min_diversity(x, -1)
    with pytest.raises(ValueError, match="square"):
        scoring.dpp_greedy_map(torch.ones(1, 3, 4), 1)
    with pytest.raises(ValueError, match="target"):
        scoring.remove_duplicates(x, torch.zeros(1, 2, dtype=torch.long), -2)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 2\]"):
        scoring.remove_duplicates(x, torch.zeros(1, 2, dtype=torch.long), 1, lengths=torch.tensor([3]))


def merge_loop(x: torch.Tensor, keep: list[bool], cand: list[bool]) -> torch.Tensor:
    """Fold each dropped candidate into its most similar kept candidate (first on ties); mean per group."""
    n = x.shape[0]
    kept = [i for i in range(n) if keep[i] and cand[i]]
    groups = {i: [i] for i in kept}
    for j in range(n):
        if cand[j] and not keep[j] and kept:
            best = max(kept, key=lambda i: (_cos(x[i], x[j]), -i))
            groups[best].append(j)
    out = x.clone()
    for i, members in groups.items():
        out[i] = x[members].mean(dim=0)
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 10))
def test_nearest_kept_and_merge_mean_match_the_loop(seed, n):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 4, generator=gen, dtype=torch.float64)
    keep = torch.rand(2, n, generator=gen) < 0.4
    cand = torch.rand(2, n, generator=gen) < 0.8
    target = scoring.nearest_kept(x, keep, cand)
    merged = scoring.merge_mean(x, target)
    for b in range(2):
        expected = merge_loop(x[b], keep[b].tolist(), cand[b].tolist())
        assert torch.allclose(merged[b], expected, atol=1e-12)
        assert ((target[b] >= 0) == (~keep[b] & cand[b] & bool((keep[b] & cand[b]).any()))).all()
