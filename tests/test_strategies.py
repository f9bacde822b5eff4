"""Behavioural tests of the built-in strategies: each would fail on a plausible wrong implementation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokprune_strategies.prumerge_plus import spatial_mask, spatial_stride

from tokprune import (
    LLMAttention,
    LLMContext,
    Signal,
    TokenRole,
    VisionContext,
    VisionSignals,
    scoring,
    strategies,
)
from tokprune.scoring import CutRule, cut, raw_counts

DOCS = Path(__file__).resolve().parents[1] / "docs"


def strategy(spec: str):
    return strategies.get(spec)[0]


# ---------------------------------------------------------------------------------------------
# Fabricated contexts with known scores
# ---------------------------------------------------------------------------------------------


def vision_ctx(features, qk=None, hidden=None, num_heads=1):
    """A VisionContext whose every qk signal is ``qk`` and every hidden signal is ``hidden``."""

    def fetch(signal: Signal):
        return qk if signal.kind == "qk" else hidden

    return VisionContext(features=features, signals=VisionSignals(fetch, num_layers=24, num_heads=num_heads))


def qk_for_scores(scores: torch.Tensor):
    """q/k with C=1 whose single-head CLS attention is proportional to ``scores`` ``[B, N]`` (> 0)."""
    b, n = scores.shape
    q = torch.ones(b, n + 1, 1, dtype=torch.float64)
    k = torch.cat([torch.zeros(b, 1, 1, dtype=torch.float64), scores.double().log()[:, :, None]], dim=1)
    return q, k


def two_segment(n: int, brk: int, generator: torch.Generator) -> torch.Tensor:
    """A shuffled long-tailed row: a steep drop over ``brk`` ranks, then a nearly flat tail."""
    ranks = torch.arange(n, dtype=torch.float64)
    curve = torch.where(ranks <= brk, 1.0 - 0.9 * ranks / brk, 0.1 - 0.09 * (ranks - brk) / (n - brk))
    return (curve + 1e-3)[torch.randperm(n, generator=generator)]


def kneed_count(row: torch.Tensor) -> int | None:
    from kneed import KneeLocator

    y = np.sort(row.numpy())[::-1]
    knee = KneeLocator(np.arange(len(y)), y, curve="convex", direction="decreasing").knee
    return None if knee is None else int(knee) + 1


# ---------------------------------------------------------------------------------------------
# cls_knee
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("brk", [8, 20, 45])
def test_cls_knee_cuts_at_the_break_of_a_two_segment_curve(brk):
    g = torch.Generator().manual_seed(brk)
    scores = torch.stack([two_segment(144, brk, g), two_segment(144, brk + 5, g)])
    ctx = vision_ctx(torch.randn(2, 144, 8), qk=qk_for_scores(scores))
    plan = strategy("cls_knee(min_keep=1)")(ctx)
    counts = plan.keep.sum(dim=1)
    for row, expected_break in zip(range(2), (brk, brk + 5)):
        assert abs(int(counts[row]) - (expected_break + 1)) <= 1  # knee at the break, within one rank
        assert int(counts[row]) == kneed_count(scores[row])  # and exactly what kneed says
        # the kept set is the top-count tokens by score, wherever they sit in raster order
        top = torch.topk(scores[row], int(counts[row])).indices
        assert set(plan.keep[row].nonzero().flatten().tolist()) == set(top.tolist())
    assert not plan.diagnostics["fallback"].any()
    assert torch.equal(plan.diagnostics["knee"] + 1, counts)


def test_cls_knee_keeps_raster_order_and_features_untouched():
    g = torch.Generator().manual_seed(0)
    scores = two_segment(64, 10, g)[None]
    feats = torch.randn(1, 64, 4)
    plan = strategy("cls_knee(min_keep=1)")(vision_ctx(feats, qk=qk_for_scores(scores)))
    assert plan.features is None and plan.extra is None  # dropping only, no merging
    gathered, _, index = scoring.ragged_gather(feats, plan.keep)
    assert torch.all(index[0, 1:] > index[0, :-1])  # kept tokens in raster order


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("cls_knee(fallback=fixed, fallback_keep=10, min_keep=1)", 10),
        ("cls_knee(fallback=all)", 64),
        ("cls_knee(fallback=min, min_keep=5)", 5),
        ("cls_knee(fallback=all, max_keep=30)", 30),  # bounds win over the fallback
        ("cls_knee(fallback=fixed, fallback_keep=2, min_keep=7)", 7),
        ("cls_knee(cut=iqr, fallback=fixed, fallback_keep=12, min_keep=1)", 12),  # flat: no outlier
        ("cls_knee(cut=chord, fallback=all, min_keep=1)", 64),
    ],
)
def test_cls_knee_fallback_on_flat_curves(spec, expected):
    flat = torch.full((3, 64), 0.5)
    plan = strategy(spec)(vision_ctx(torch.randn(3, 64, 4), qk=qk_for_scores(flat)))
    assert plan.keep.sum(dim=1).tolist() == [expected] * 3
    assert plan.diagnostics["fallback"].all()
    assert plan.diagnostics["knee"].tolist() == [-1] * 3


def test_cls_knee_clamps_and_reports_it():
    g = torch.Generator().manual_seed(1)
    scores = torch.stack([two_segment(100, 5, g), two_segment(100, 40, g)])
    plan = strategy("cls_knee(min_keep=10, max_keep=30)")(vision_ctx(torch.randn(2, 100, 4), qk=qk_for_scores(scores)))
    assert plan.keep.sum(dim=1).tolist() == [10, 30]
    assert plan.diagnostics["clamped"].tolist() == [True, True]


def test_cls_knee_score_sources_read_the_right_signals():
    assert strategy("cls_knee").requires() == {Signal("qk", -1)}
    assert strategy("cls_knee(score=cls_attn_mean, layer=22)").requires() == {Signal("qk", 22)}
    # cls_sim reads the layer's *input*: layer -1 -> hidden_states[-2], the features LLaVA projects
    assert strategy("cls_knee(score=cls_sim)").requires() == {Signal("hidden", -2)}
    assert strategy("cls_knee(score=cls_sim, layer=5)").requires() == {Signal("hidden", 5)}


def test_cls_knee_cls_sim_cuts_on_cosine():
    g = torch.Generator().manual_seed(3)
    cos = two_segment(80, 12, g).clamp(max=1.0)[None]
    angle = torch.arccos(cos)
    patches = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)  # unit vectors at known angles
    hidden = torch.cat([torch.tensor([[[1.0, 0.0]]], dtype=torch.float64), patches], dim=1)
    plan = strategy("cls_knee(score=cls_sim, min_keep=1)")(vision_ctx(torch.randn(1, 80, 4), hidden=hidden))
    assert int(plan.keep.sum()) == kneed_count(cos[0])


# ---------------------------------------------------------------------------------------------
# the shared cut
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["knee", "chord", "iqr", "lof"])
def test_cut_on_ragged_candidates_equals_each_row_alone(rule):
    g = torch.Generator().manual_seed(4)
    scores = torch.rand(5, 40, generator=g) ** 6
    n = [40, 33, 17, 33, 2]
    cand = torch.arange(40)[None, :] < torch.tensor(n)[:, None]
    perm = torch.randperm(40, generator=g)  # candidates scattered, not a prefix
    scores, cand = scores[:, perm], cand[:, perm]
    got = cut(scores, CutRule(rule, lof_neighbors=5), candidates=cand, min_keep=1, fallback="min")
    for b in range(5):
        alone = raw_counts(scores[b][cand[b]][None], CutRule(rule, lof_neighbors=5))
        assert int(got.raw[b]) == int(alone[0])
    assert int(got.raw[4]) == 0 and bool(got.fallback[4])  # two candidates: no curve to cut


# ---------------------------------------------------------------------------------------------
# prumerge / prumerge_plus against the reference steps
# ---------------------------------------------------------------------------------------------


def reference_prumerge(features, q, k, plus=False):
    """Slow B=1 re-implementation of LLaVA-PruMerge's token_prune_merge_advanced(_plus) (adaptive)."""
    x, q, k = features[0].double(), q[0].double(), k[0].double()
    n, c = x.shape
    attn = torch.softmax(q @ k.T * c**-0.5, dim=-1)
    a = attn[0, 1:]
    a_np = a.numpy().astype(np.float32)
    q1, q3 = np.percentile(a_np, 25), np.percentile(a_np, 75)
    ratio = float(np.sum(a_np > q3 + 1.5 * (q3 - q1))) / len(a_np)
    idx = torch.topk(a, int(n * ratio)).indices.tolist()
    if plus:
        step = int(1 / ratio)
        idx += [i for i in range(0, n - 1, int(step / 3)) if i not in idx]
    keys = torch.nn.functional.normalize(k[1:], dim=-1)
    merged = {}
    for i in idx:
        others = [j for j in range(n) if j != i]
        sims = keys[i] @ keys[others].T
        top = torch.topk(sims, 32).indices
        chosen = torch.tensor(others)[top]
        merged[i] = x[i] + (a[chosen, None] * x[chosen]).sum(dim=0)
    pruned = [j for j in range(n) if j not in idx]
    extra = (a[pruned, None] * x[pruned]).sum(dim=0)
    return idx, merged, extra


def prumerge_inputs(seed, n=144, c=64, outliers=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n + 1, c, generator=g)
    k = torch.randn(1, n + 1, c, generator=g)
    hot = torch.randperm(n, generator=g)[:outliers] + 1
    k[0, hot] += q[0, 0] * torch.linspace(0.3, 0.6, outliers)[:, None]
    return torch.randn(1, n, c, generator=g), q, k


@pytest.mark.parametrize(("name", "plus"), [("prumerge", False), ("prumerge_plus", True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prumerge_matches_the_reference_loop(name, plus, seed):
    feats, q, k = prumerge_inputs(seed)
    idx, merged, extra = reference_prumerge(feats, q, k, plus=plus)
    plan = strategy(name)(vision_ctx(feats, qk=(q, k)))
    assert set(plan.keep[0].nonzero().flatten().tolist()) == set(idx)
    for i, value in merged.items():
        torch.testing.assert_close(plan.features[0, i].double(), value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plan.extra[0, 0].double(), extra, rtol=1e-4, atol=1e-5)
    # unkept rows of features are untouched (only kept rows are read by the adapter anyway)
    dropped = ~plan.keep[0]
    assert torch.equal(plan.features[0, dropped], feats[0, dropped])


def test_prumerge_is_per_sample_not_pooled():
    samples = [prumerge_inputs(s, outliers=o) for s, o in ((0, 3), (1, 12), (2, 7))]
    feats, q, k = (torch.cat(t) for t in zip(*samples))
    # a batch-pooled IQR (the reference) would give a different outlier set than each sample alone
    pooled = scoring.iqr_outlier_count(scoring.cls_attention(q, k).flatten()[None])
    batch = strategy("prumerge")(vision_ctx(feats, qk=(q, k)))
    per_sample = 0
    for b, (f, qq, kk) in enumerate(samples):
        idx, _, extra = reference_prumerge(f, qq, kk)
        assert set(batch.keep[b].nonzero().flatten().tolist()) == set(idx)
        torch.testing.assert_close(batch.extra[b, 0].double(), extra, rtol=1e-4, atol=1e-5)
        per_sample += len(idx)
    assert int(pooled) != per_sample


def test_prumerge_safe_without_outliers():
    flat = torch.full((2, 50), 0.5)
    feats = torch.randn(2, 50, 8)
    plan = strategy("prumerge(min_keep=3)")(vision_ctx(feats, qk=qk_for_scores(flat)))
    assert plan.keep.sum(dim=1).tolist() == [3, 3]  # the reference keeps 0 (only the extra token)
    plus = strategy("prumerge_plus")(vision_ctx(feats, qk=qk_for_scores(flat)))  # the reference divides by 0
    assert torch.isfinite(plus.extra).all() and plus.keep.any(dim=1).all()


@pytest.mark.parametrize("n", [576, 144, 50])
def test_prumerge_plus_spatial_indices_match_the_reference_formula(n):
    for outliers in range(1, n + 1):
        ratio = outliers / n
        stride = int(int(1 / ratio) / 3)
        expected = set(range(0, n - 1, max(stride, 1)))  # stride 0 crashes the reference: we use 1
        got = spatial_mask(spatial_stride(torch.tensor([outliers]), n), n)[0]
        assert set(got.nonzero().flatten().tolist()) == expected, (n, outliers)
    # algorithms.md 3.3's example: 32 of 576 -> step 18 -> stride 6 -> columns {0, 6, 12, 18}
    if n == 576:
        mask = spatial_mask(spatial_stride(torch.tensor([32]), 576), 576)[0].view(24, 24)
        assert mask.any(dim=0).nonzero().flatten().tolist() == [0, 6, 12, 18] and mask.all(dim=1)[:-1].sum() == 0


def test_prumerge_plus_spatial_samples_of_images_of_different_sizes_are_each_image_alone():
    # rows of 576, 300 and 50 tokens padded to 576: each row's stride and stripes are of its own tokens
    lengths, outliers = torch.tensor([576, 300, 50]), torch.tensor([32, 32, 4])
    stride = spatial_stride(outliers, lengths)
    got = spatial_mask(stride, 576, lengths)
    for i, m in enumerate(lengths.tolist()):
        solo_stride = spatial_stride(outliers[i : i + 1], m)
        assert stride[i] == solo_stride[0]
        assert torch.equal(got[i, :m], spatial_mask(solo_stride, m)[0]) and not got[i, m:].any()
    assert stride.tolist() == [6, 3, 4]  # 576/32 = 18 -> 6; 300/32 -> 9 -> 3; 50/4 -> 12 -> 4


# ---------------------------------------------------------------------------------------------
# LLM stage: fastv and text_interact
# ---------------------------------------------------------------------------------------------


def llm_batch(seed=0, heads=4, kv_heads=2, dim=8):
    """Two left-padded samples: [PAD][TEMPLATE x2][IMAGE x n][QUESTION x m][TEMPLATE][PROTECTED]."""
    layouts = [(0, 10, 4), (3, 7, 4)]
    rows = []
    for pad, n_img, n_q in layouts:
        parts = [(TokenRole.PADDING, pad), (TokenRole.TEMPLATE, 2), (TokenRole.IMAGE, n_img)]
        parts += [(TokenRole.QUESTION, n_q), (TokenRole.TEMPLATE, 1), (TokenRole.PROTECTED, 1)]
        rows.append(torch.cat([torch.full((c,), int(r)) for r, c in parts]))
    roles = torch.stack(rows).long()
    b, length = roles.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, length, dim, generator=g) * 2
    k = torch.randn(b, kv_heads, length, dim, generator=g) * 2
    valid = roles != TokenRole.PADDING
    ctx = LLMContext(layer=2, roles=roles, hidden=torch.randn(b, length, 4), attention=LLMAttention(q, k, valid))
    return ctx, q, k, valid


def hand_attention(q, k, valid):
    """Head-mean probabilities ``[B, L, L]`` by hand: GQA expansion, causal + padding mask, softmax."""
    b, h, length, d = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal[None, None] & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return probs.mean(dim=1)


@pytest.mark.parametrize("spec", ["fastv(keep_ratio=0.5)", "fastv(keep=3)"])
def test_fastv_keeps_the_top_image_tokens_by_last_row_attention(spec):
    ctx, q, k, valid = llm_batch()
    plan = strategy(spec)(ctx)
    probs = hand_attention(q, k, valid)
    for b in range(2):
        image = (ctx.roles[b] == TokenRole.IMAGE).nonzero().flatten()
        row = probs[b, -1, image]  # the last token's head-mean attention row, image columns
        n_keep = 3 if "keep=3" in spec else round(len(image) * 0.5 + 1e-9)
        expected = set(image[torch.topk(row, n_keep).indices].tolist())
        assert set((plan.keep[b] & (ctx.roles[b] == TokenRole.IMAGE)).nonzero().flatten().tolist()) == expected
        assert plan.keep[b][ctx.roles[b] != TokenRole.IMAGE].all()  # only image tokens are dropped


def test_fastv_question_query_averages_the_text_rows():
    ctx, q, k, valid = llm_batch(seed=1)
    plan = strategy("fastv(query=question, keep=4)")(ctx)
    probs = hand_attention(q, k, valid)
    for b in range(2):
        rows = ((ctx.roles[b] == TokenRole.QUESTION) | (ctx.roles[b] == TokenRole.PROTECTED)).nonzero().flatten()
        image = (ctx.roles[b] == TokenRole.IMAGE).nonzero().flatten()
        score = probs[b][rows][:, image].mean(dim=0)  # every question row sees every image token
        expected = set(image[torch.topk(score, 4).indices].tolist())
        assert set((plan.keep[b] & (ctx.roles[b] == TokenRole.IMAGE)).nonzero().flatten().tolist()) == expected


def test_text_interact_scores_are_the_causally_normalised_mean():
    ctx, q, k, valid = llm_batch(seed=2)
    plan = strategy("text_interact(min_keep=1)")(ctx)
    probs = hand_attention(q, k, valid)
    for b in range(2):
        queries = ((ctx.roles[b] == TokenRole.QUESTION) | (ctx.roles[b] == TokenRole.PROTECTED)).nonzero().flatten()
        for j in ((ctx.roles[b] == TokenRole.IMAGE) | (ctx.roles[b] == TokenRole.QUESTION)).nonzero().flatten():
            seeing = queries[queries >= j]
            expected = probs[b, seeing, j].mean()
            assert plan.diagnostics["scores"][b, j].item() == pytest.approx(expected.item(), rel=1e-5)


def test_text_interact_cosine_scores_the_hidden_states_against_the_mean_query():
    ctx, _, _, _ = llm_batch(seed=3)
    plan = strategy("text_interact(score=cosine, min_keep=1)")(ctx)
    scores = plan.diagnostics["scores"]
    for b in range(2):
        queries = (ctx.roles[b] == TokenRole.QUESTION) | (ctx.roles[b] == TokenRole.PROTECTED)
        pooled = ctx.hidden[b][queries].mean(dim=0)
        expected = torch.nn.functional.cosine_similarity(ctx.hidden[b], pooled[None], dim=-1)
        valid = ctx.roles[b] != TokenRole.PADDING
        assert torch.allclose(scores[b][valid], expected[valid], atol=1e-6)
    # the attention score would rank the tokens differently: the parameter is not ignored
    assert not torch.equal(strategy("text_interact(min_keep=1)")(ctx).diagnostics["scores"], scores)


class FixedAttention(LLMAttention):
    """Attention rows taken from a given probability matrix ``[B, 1, L, L]`` instead of q/k."""

    def __init__(self, probs, key_padding_mask):
        self.probs, self.key_padding_mask = probs, key_padding_mask

    def rows(self, query_mask):
        index = query_mask.nonzero()[:, 1][None]  # B = 1
        return self.probs[:, :, index[0]], index, torch.ones_like(index, dtype=torch.bool)


def test_text_interact_causal_normalisation_does_not_favour_early_tokens():
    # [TEMPLATE][IMAGE a][IMAGE x 3][QUESTION x 8][QUESTION b][QUESTION][PROTECTED]
    roles = [TokenRole.TEMPLATE] + [TokenRole.IMAGE] * 4 + [TokenRole.QUESTION] * 10 + [TokenRole.PROTECTED]
    roles = torch.tensor([[int(r) for r in roles]])
    length = roles.shape[1]
    a, b = 1, 13  # early image token seen by all 11 queries; late question token seen by 3
    probs = torch.zeros(1, 1, length, length)
    for i in range(length):
        probs[0, 0, i, : i + 1] = 0.01
        if i >= a:
            probs[0, 0, i, a] = 0.1  # sum over 11 queries = 1.1, mean = 0.1
        if i >= b:
            probs[0, 0, i, b] = 0.3  # sum over 3 queries = 0.9, mean = 0.3
        probs[0, 0, i] /= probs[0, 0, i].sum()
    ctx = LLMContext(layer=2, roles=roles, hidden=torch.zeros(1, length, 2), attention=FixedAttention(probs, roles > 0))
    plan = strategy("text_interact(min_keep=1, max_keep=1)")(ctx)
    scores = plan.diagnostics["scores"][0]
    queries = torch.arange(5, length)
    assert probs[0, 0, queries, a].sum() > probs[0, 0, queries, b].sum()  # a plain sum would pick a
    assert scores[b] > scores[a]
    kept = plan.keep[0] & ((roles[0] == TokenRole.IMAGE) | (roles[0] == TokenRole.QUESTION))
    assert kept.nonzero().flatten().tolist() == [b]


def test_text_interact_drops_text_but_never_template_protected_or_padding():
    ctx, *_ = llm_batch(seed=3)
    plan = strategy("text_interact(min_keep=2, max_keep=2)")(ctx)
    roles = ctx.roles
    for role in (TokenRole.TEMPLATE, TokenRole.PROTECTED, TokenRole.PADDING):
        assert plan.keep[roles == role].all()
    cand = (roles == TokenRole.IMAGE) | (roles == TokenRole.QUESTION)
    assert (plan.keep & cand).sum(dim=1).tolist() == [2, 2]
    image_only = strategy("text_interact(min_keep=1, max_keep=2, candidates=image)")(ctx)
    assert image_only.keep[roles == TokenRole.QUESTION].all()


# ---------------------------------------------------------------------------------------------
# topk and random
# ---------------------------------------------------------------------------------------------


def test_topk_keeps_the_top_scores_and_ratio_one_is_identity():
    scores = torch.rand(3, 30) + 0.01
    plan = strategy("topk(keep=7)")(vision_ctx(torch.randn(3, 30, 4), qk=qk_for_scores(scores)))
    for b in range(3):
        assert set(plan.keep[b].nonzero().flatten().tolist()) == set(torch.topk(scores[b], 7).indices.tolist())
    identity = strategy("topk(keep_ratio=1.0)")
    assert identity.requires() == frozenset()
    assert identity(vision_ctx(torch.randn(2, 30, 4))).keep.all()
    assert strategy("topk(keep_ratio=0.25)")(vision_ctx(torch.randn(1, 576, 4), qk=qk_for_scores(torch.rand(1, 576) + 0.1))).keep.sum() == 144


def test_random_is_seeded_batch_invariant_and_image_dependent():
    feats = torch.randn(5, 64, 8)
    ctx = vision_ctx(feats)
    plan = strategy("random(keep=16, seed=1)")(ctx)
    assert plan.keep.sum(dim=1).tolist() == [16] * 5
    for b in range(5):  # alone, or in a different batch, a sample selects the same tokens
        assert torch.equal(strategy("random(keep=16, seed=1)")(vision_ctx(feats[b : b + 1])).keep[0], plan.keep[b])
    shuffled = strategy("random(keep=16, seed=1)")(vision_ctx(feats.flip(0))).keep.flip(0)
    assert torch.equal(shuffled, plan.keep)
    assert torch.equal(strategy("random(keep=16, seed=1)")(ctx).keep, plan.keep)  # deterministic
    other_seed = strategy("random(keep=16, seed=2)")(ctx).keep
    assert not torch.equal(other_seed, plan.keep)
    assert len({tuple(row.tolist()) for row in plan.keep}) == 5  # different images, different subsets


def test_random_is_roughly_uniform():
    feats = torch.randn(400, 32, 4, generator=torch.Generator().manual_seed(0))
    freq = strategy("random(keep=8)")(vision_ctx(feats)).keep.float().mean(dim=0)
    assert freq.min() > 0.15 and freq.max() < 0.35  # expected 0.25 each; sd ~0.022


# ---------------------------------------------------------------------------------------------
# docs
# ---------------------------------------------------------------------------------------------


def test_every_builtin_strategy_and_param_is_in_the_catalogue():
    text = (DOCS / "strategies.md").read_text()
    for name in strategies.available():
        info = strategies.describe(name)
        if info.source.name != "builtin":
            continue
        section = re.search(rf"^## `{name}`\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
        assert section, f"docs/strategies.md has no '## `{name}`' section"
        for p in info.params:
            assert f"`{p.name}`" in section.group(1), f"docs/strategies.md: {name} does not document `{p.name}`"


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
@pytest.mark.parametrize("score", ["cls_attn", "cls_attn_mean", "cls_sim"])
def test_prumerge_ranks_and_fences_by_its_score_parameter(name, score):
    # Hidden states with a CLS that points at a few patches: the cosine score then has its own outliers,
    # different from the q/k attention's, so keeping the attention's outliers would fail for cls_sim.
    feats, q, k = prumerge_inputs(3, c=64)
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(1, 145, 64, generator=g)
    hidden[0, 1 + torch.arange(100, 108)] += 3 * hidden[0, 0]
    ctx = vision_ctx(feats, qk=(q, k), hidden=hidden, num_heads=4)
    plan = strategy(f"{name}(score={score})")(ctx)
    expected = plan.diagnostics["scores"]
    from tokprune_strategies._vision import vision_scores

    torch.testing.assert_close(expected, vision_scores(ctx.signals, score, -1))
    outliers = scoring.iqr_outlier_count(expected).long()
    top = scoring.topk_mask(expected, torch.clamp(outliers, min=1))
    assert (plan.keep & top).sum() == top.sum()  # every outlier of *this* score is kept
    if name == "prumerge":
        assert torch.equal(plan.keep, top)
