"""Equivalence tests: every batched primitive against a slow, obviously-correct loop reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import LocalOutlierFactor

from tokprune import scoring
from tokprune.scoring import (
    PAD_INDEX,
    attention_received,
    cls_attention,
    cls_cosine_similarity,
    counts_from_mask,
    iqr_outlier_count,
    lof_outlier_count,
    prumerge_extra_token,
    prumerge_merge,
    query_attention,
    query_cosine_similarity,
    ragged_gather,
    ragged_scatter,
    topk_mask,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# tolerance of the fp32 result of a low-precision input against the fp64 reference of the same
# (already rounded) values: only accumulation order differs
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5, torch.float64: 1e-10}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- slow references


def ref_cls_attention(q, k, num_heads=1, cls_index=0, scale=None):
    q, k = q.double(), k.double()
    b, t, c = q.shape
    d = c // num_heads
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, t - 1, dtype=torch.float64)
    for bi in range(b):
        heads = []
        for h in range(num_heads):
            qh = q[bi, :, h * d : (h + 1) * d]
            kh = k[bi, :, h * d : (h + 1) * d]
            attn = torch.softmax(qh @ kh.T * scale, dim=-1)  # full map, as the reference code does
            heads.append(attn[cls_index])
        row = torch.stack(heads).mean(0)
        out[bi] = torch.cat([row[:cls_index], row[cls_index + 1 :]])
    return out


def ref_query_attention(q, k, query_index, key_padding_mask=None, causal=True, scale=None):
    q, k = q.double(), k.double()
    b, h, length, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, h, query_index.shape[1], length, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = k[bi, hi // (h // hkv)]
            for qi, pos in enumerate(query_index[bi].tolist()):
                if pos < 0:
                    continue
                allowed = [
                    (not causal or j <= pos) and (key_padding_mask is None or bool(key_padding_mask[bi, j]))
                    for j in range(length)
                ]
                if not any(allowed):
                    continue
                logits = (kh @ q[bi, hi, pos]) * scale
                logits[~torch.tensor(allowed)] = float("-inf")
                out[bi, hi, qi] = torch.softmax(logits, dim=0)
    return out


def ref_attention_received(probs, query_valid, query_index, causal=True):
    b, h, nq, length = probs.shape
    out = torch.zeros(b, length, dtype=torch.float64)
    for bi in range(b):
        for j in range(length):
            qs = [
                qi
                for qi in range(nq)
                if query_valid[bi, qi] and (not causal or int(query_index[bi, qi]) >= j)
            ]
            if qs:
                out[bi, j] = np.mean([probs[bi, :, qi, j].double().mean().item() for qi in qs])
    return out


def ref_cls_cos(hidden, cls_index=0):
    hidden = hidden.double()
    b, t, _ = hidden.shape
    out = torch.zeros(b, t - 1, dtype=torch.float64)
    for bi in range(b):
        c = hidden[bi, cls_index]
        others = [j for j in range(t) if j != cls_index]
        for o, j in enumerate(others):
            p = hidden[bi, j]
            out[bi, o] = (c @ p) / (c.norm().clamp_min(1e-8) * p.norm().clamp_min(1e-8))
    return out


def ref_iqr(scores, factor=1.5):
    out = []
    for row in scores.double().numpy():
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        out.append(int((row > q3 + factor * (q3 - q1)).sum()))
    return torch.tensor(out)


def ref_lof(scores, n_neighbors=20):
    out = []
    for row in scores.double().numpy():
        k = min(n_neighbors, len(row) - 1)
        lof = LocalOutlierFactor(n_neighbors=k, contamination="auto")
        out.append(int((lof.fit_predict(row[:, None]) == -1).sum()))
    return torch.tensor(out)


def ref_topk_mask(scores, k, force=None):
    b, n = scores.shape
    ks = [k] * b if isinstance(k, int) else k.tolist()
    out = torch.zeros(b, n, dtype=torch.bool)
    for bi in range(b):
        vals = scores[bi].tolist()
        order = sorted(range(n), key=lambda i: (-vals[i], i))  # lower index wins ties
        for i in order[: max(0, min(n, ks[bi]))]:
            out[bi, i] = True
        if force is not None:
            out[bi] |= force[bi]
    return out


def ref_prumerge_merge(features, keys, weights, keep, k_neighbors=32, valid=None):
    """Per-token loop as in LLaVA-PruMerge token_prune_merge_advanced (cosine on normalised keys); with
    ``valid``, row ``b`` is its valid tokens alone."""
    x = features.double()
    kn = torch.nn.functional.normalize(keys.double(), dim=-1)
    out = x.clone()
    b, n, _ = x.shape
    for bi in range(b):
        real = [j for j in range(n) if valid is None or valid[bi, j]]
        for i in range(n):
            if not keep[bi, i]:
                continue
            others = [j for j in real if j != i]
            if not others:
                continue
            sim = kn[bi, others] @ kn[bi, i]
            top = torch.topk(sim, min(k_neighbors, len(real) - 1)).indices
            idx = torch.tensor(others)[top]
            out[bi, i] = x[bi, i] + (weights[bi, idx].double()[:, None] * x[bi, idx]).sum(0)
    return out


def ref_extra_token(features, weights, keep, valid=None):
    b, n, c = features.shape
    out = torch.zeros(b, c, dtype=torch.float64)
    for bi in range(b):
        for j in range(n):
            if not keep[bi, j] and (valid is None or valid[bi, j]):
                out[bi] += weights[bi, j].double() * features[bi, j].double()
    return out


def ref_ragged_gather(x, keep, pad_value=0.0, pad_side="right"):
    b, n = keep.shape
    rows = [[j for j in range(n) if keep[bi, j]] for bi in range(b)]
    kmax = max(len(r) for r in rows)
    g = torch.full((b, kmax, *x.shape[2:]), pad_value, dtype=x.dtype)
    valid = torch.zeros(b, kmax, dtype=torch.bool)
    index = torch.full((b, kmax), PAD_INDEX, dtype=torch.long)
    for bi, r in enumerate(rows):
        off = kmax - len(r) if pad_side == "left" else 0
        for t, j in enumerate(r):
            g[bi, off + t] = x[bi, j]
            valid[bi, off + t] = True
            index[bi, off + t] = j
    return g, valid, index


# ---------------------------------------------------------------- helpers


def close(a, b, dtype):
    torch.testing.assert_close(a.double(), b.double(), rtol=TOL[dtype] * 10, atol=TOL[dtype])


def score_dtype_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- cls_attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads", [1, 4])
@pytest.mark.parametrize("cls_index", [0, 3, -1])
def test_cls_attention_matches_loop(dtype, num_heads, cls_index):
    q = torch.randn(3, 17, 32, generator=gen(1)).to(dtype)
    k = torch.randn(3, 17, 32, generator=gen(2)).to(dtype)
    got = cls_attention(q, k, num_heads=num_heads, cls_index=cls_index)
    assert got.dtype == torch.float32 and got.shape == (3, 16)
    close(got, ref_cls_attention(q, k, num_heads, cls_index % 17), dtype)


def test_cls_attention_rows_exclude_cls_mass():
    q, k = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    a = cls_attention(q, k)
    full = torch.softmax(q[:, 0:1] @ k.transpose(1, 2) * 8**-0.5, -1)[:, 0]
    torch.testing.assert_close(a.sum(1), 1 - full[:, 0])


def test_cls_attention_scale_and_batch_invariance():
    q, k = torch.randn(4, 9, 8, generator=gen(3)), torch.randn(4, 9, 8, generator=gen(4))
    both = cls_attention(q, k, num_heads=2, scale=0.3)
    for i in range(4):
        torch.testing.assert_close(both[i : i + 1], cls_attention(q[i : i + 1], k[i : i + 1], num_heads=2, scale=0.3))
    close(both, ref_cls_attention(q, k, 2, 0, 0.3), torch.float32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=torch.randn(2, 5), k=torch.randn(2, 5)), r"\[B, 1\+N, C\].*rank 2"),
        (dict(q=torch.randn(2, 5, 6), k=torch.randn(2, 5, 7)), "same shape"),
        (dict(q=torch.randn(2, 5, 6), k=torch.randn(2, 5, 6), num_heads=4), r"num_heads=4.*C=6.*\[1, 2, 3, 6\]"),
        (dict(q=torch.randn(2, 5, 6), k=torch.randn(2, 5, 6), cls_index=5), r"cls_index=5.*-5\.\.4"),
    ],
)
def test_cls_attention_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls_attention(**kwargs)


# ---------------------------------------------------------------- query_attention / attention_received


def _qa_inputs(dtype, b=2, h=4, hkv=2, length=11, d=8, seed=0):
    q = torch.randn(b, h, length, d, generator=gen(seed)).to(dtype)
    k = torch.randn(b, hkv, length, d, generator=gen(seed + 1)).to(dtype)
    query_index = torch.tensor([[10, 7, 3, -1], [9, 0, 10, 5]])[:b]
    pad = torch.ones(b, length, dtype=torch.bool)
    pad[1, :2] = False  # left padding on row 1
    return q, k, query_index, pad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_pad", [True, False])
@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_query_attention_matches_loop(dtype, causal, use_pad, hkv):
    q, k, qi, pad = _qa_inputs(dtype, hkv=hkv)
    pad = pad if use_pad else None
    got = query_attention(q, k, qi, key_padding_mask=pad, causal=causal)
    assert got.dtype == torch.float32 and got.shape == (2, 4, 4, 11)
    close(got, ref_query_attention(q, k, qi, pad, causal), dtype)
    assert torch.all(got[0, :, 3] == 0)  # padding query
    if use_pad:
        assert torch.all(got[1, ..., :2] == 0)  # padded keys exactly zero
    if causal:
        assert torch.all(got[0, :, 2, 4:] == 0)  # query at 3 sees keys 0..3 only


def test_query_attention_no_allowed_key_is_zero_not_nan():
    q, k, _, pad = _qa_inputs(torch.float32)
    got = query_attention(q, k, torch.tensor([[0, 1], [1, 0]]), key_padding_mask=pad)
    assert not torch.isnan(got).any()
    assert torch.all(got[1, :, :] == 0)  # row 1: keys 0,1 are padding; queries at 0/1 see nothing


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention_received_matches_loop(dtype, causal):
    q, k, qi, pad = _qa_inputs(torch.float32)
    probs = query_attention(q, k, qi, key_padding_mask=pad, causal=causal).to(dtype)
    valid = qi >= 0
    got = attention_received(probs, valid, qi, causal=causal)
    assert got.dtype == torch.float32 and got.shape == (2, 11)
    close(got, ref_attention_received(probs, valid, qi, causal), dtype)


def test_attention_received_causal_normalisation_does_not_favour_early_keys():
    # uniform causal attention from every position: each key receives the same mean attention per viewer
    length = 6
    probs = torch.zeros(1, 1, length, length)
    for i in range(length):
        probs[0, 0, i, : i + 1] = 1.0 / (i + 1)
    qi = torch.arange(length)[None]
    got = attention_received(probs, torch.ones(1, length, dtype=torch.bool), qi)
    expected = torch.tensor([np.mean([1 / (i + 1) for i in range(j, length)]) for j in range(length)])
    torch.testing.assert_close(got[0], expected.float())
    # keys after the last query are visible to nobody -> 0
    got = attention_received(probs[:, :, :3], torch.ones(1, 3, dtype=torch.bool), qi[:, :3])
    assert torch.all(got[0, 3:] == 0)


def test_query_attention_bad_input():
    q, k, qi, pad = _qa_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"H=4 must be a multiple of key heads Hkv=3"):
        query_attention(q, torch.randn(2, 3, 11, 8), qi)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        query_attention(q[0], k, qi)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B=2, L=11\]"):
        query_attention(q, k, qi, key_padding_mask=pad[:, :5])
    with pytest.raises(ValueError, match="bool"):
        query_attention(q, k, qi, key_padding_mask=pad.float())


# ---------------------------------------------------------------- cosine


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls_index", [0, 2])
def test_cls_cosine_matches_loop(dtype, cls_index):
    h = torch.randn(3, 10, 16, generator=gen(5)).to(dtype)
    h[0, 4] = 0  # zero vector -> 0, not NaN
    got = cls_cosine_similarity(h, cls_index)
    assert got.dtype == torch.float32 and got.shape == (3, 9)
    close(got, ref_cls_cos(h, cls_index), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_query_cosine_matches_loop(dtype):
    h = torch.randn(3, 9, 16, generator=gen(6)).to(dtype)
    h[1, 2] = 0  # zero vector -> 0, not NaN
    query = torch.zeros(3, 9, dtype=torch.bool)
    query[0, 6:] = True
    query[1, [1, 4, 8]] = True  # query set scattered, not a suffix; row 2 has no queries
    got = query_cosine_similarity(h, query)
    assert got.dtype == torch.float32 and got.shape == (3, 9)
    ref = torch.zeros(3, 9, dtype=torch.float64)
    hd = h.double()
    for b in range(2):
        pooled = hd[b][query[b]].mean(dim=0)
        for j in range(9):
            ref[b, j] = (pooled @ hd[b, j]) / (pooled.norm().clamp_min(1e-8) * hd[b, j].norm().clamp_min(1e-8))
    close(got, ref, dtype)
    with pytest.raises(ValueError, match=r"query must have shape \(3, 9\)"):
        query_cosine_similarity(h, query[:, :5])
    with pytest.raises(ValueError, match="bool"):
        query_cosine_similarity(h, query.float())


# ---------------------------------------------------------------- outlier counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iqr_matches_numpy(dtype):
    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.lognormal(0, 1.5, size=(40, 576))).to(dtype)
    got = iqr_outlier_count(s)
    assert got.dtype == torch.long
    assert torch.equal(got, ref_iqr(s))
    assert torch.equal(iqr_outlier_count(s, factor=3.0), ref_iqr(s, 3.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_iqr_low_precision_inputs(dtype):
    s = torch.randn(8, 100, generator=gen(7)).exp().to(dtype)
    assert torch.equal(iqr_outlier_count(s), ref_iqr(s.float()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_iqr_ragged_rows_equal_each_row_alone(dtype):
    rng = np.random.default_rng(5)
    s = torch.from_numpy(rng.lognormal(0, 1.5, size=(30, 90))).to(dtype)
    s[::4, 10:20] = 1.0  # ties around the quartiles
    lengths = torch.from_numpy(rng.integers(0, 91, size=30))
    lengths[:3] = torch.tensor([0, 1, 90])
    s_padded = s.clone()
    s_padded[torch.arange(90)[None] >= lengths[:, None]] = 1e4  # padding must not count or move quartiles
    got = iqr_outlier_count(s_padded, lengths=lengths)
    alone = [int(iqr_outlier_count(s[b:b + 1, :n])[0]) if n else 0 for b, n in enumerate(lengths.tolist())]
    assert got.tolist() == alone
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 90\]"):
        iqr_outlier_count(s, lengths=torch.full((30,), 91))


@pytest.mark.parametrize("n, k", [(576, 20), (576, 10), (50, 20), (15, 20), (3, 1)])
def test_lof_matches_sklearn(n, k):
    rng = np.random.default_rng(n + k)
    s = torch.from_numpy(rng.lognormal(0, 1.2, size=(6, n)))
    s[0, :3] += 50.0  # a few huge artifact values
    assert torch.equal(lof_outlier_count(s, k), ref_lof(s, k))


def test_lof_high_tail_subset_and_bad_tail():
    s = torch.from_numpy(np.random.default_rng(1).normal(size=(4, 200)))
    both, high = lof_outlier_count(s), lof_outlier_count(s, tail="high")
    assert torch.all(high <= both)
    with pytest.raises(ValueError, match=r"tail='top'.*\['both', 'high'\]"):
        lof_outlier_count(s, tail="top")


# ---------------------------------------------------------------- top-k masks


def test_topk_mask_matches_loop_with_ties_and_ragged_k():
    s = torch.randint(0, 5, (6, 30), generator=gen(8)).float()  # many ties
    k = torch.tensor([0, 1, 7, 30, 45, -3])
    force = torch.zeros(6, 30, dtype=torch.bool)
    force[:, 29] = True
    got = topk_mask(s, k, force=force)
    assert torch.equal(got, ref_topk_mask(s, k, force))
    assert torch.equal(counts_from_mask(topk_mask(s, k)), k.clamp(0, 30))
    assert torch.equal(topk_mask(s, 4), ref_topk_mask(s, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_dtypes_and_row_alone(dtype):
    s = torch.randn(5, 40, generator=gen(9)).to(dtype)
    k = torch.tensor([3, 9, 0, 40, 12])
    got = topk_mask(s, k)
    assert torch.equal(got, ref_topk_mask(s.float(), k))
    for i in range(5):
        assert torch.equal(got[i : i + 1], topk_mask(s[i : i + 1], k[i : i + 1]))


def test_topk_mask_bad_k():
    with pytest.raises(ValueError, match=r"k must have shape \[B=2\]"):
        topk_mask(torch.randn(2, 5), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        topk_mask(torch.randn(2, 5), 2.5)


# ---------------------------------------------------------------- PruMerge merge


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_neighbors", [32, 5, 100])
def test_prumerge_merge_matches_loop(dtype, k_neighbors):
    b, n, c = 3, 40, 16
    x = torch.randn(b, n, c, generator=gen(10)).to(dtype)
    keys = torch.randn(b, n, 12, generator=gen(11)).to(dtype)
    w = torch.softmax(torch.randn(b, n, generator=gen(12)), -1)
    keep = torch.rand(b, n, generator=gen(13)) < 0.2
    got = prumerge_merge(x, keys, w, keep, k_neighbors=k_neighbors)
    assert got.dtype == dtype and got.shape == (b, n, c)
    ref = ref_prumerge_merge(x, keys, w, keep, k_neighbors)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), ref.to(dtype).double(), rtol=tol, atol=tol)
    assert torch.equal(got[~keep], x[~keep])
    for i in range(b):
        torch.testing.assert_close(got[i : i + 1], prumerge_merge(x[i : i + 1], keys[i : i + 1], w[i : i + 1],
                                                                  keep[i : i + 1], k_neighbors))


@pytest.mark.parametrize("k_neighbors", [32, 5])
def test_prumerge_merge_and_extra_token_of_ragged_rows_are_each_row_alone(k_neighbors):
    # rows of 40, 25, 6 and 1 valid tokens, noise in the padding: neighbours and pruned tokens are valid
    # ones only, each row uses min(k, its tokens - 1) neighbours, as it would alone; padding noise is inert
    b, n, c = 4, 40, 16
    lengths = torch.tensor([40, 25, 6, 1])
    valid = torch.arange(n)[None, :] < lengths[:, None]
    x = torch.randn(b, n, c, generator=gen(20))
    keys = torch.randn(b, n, 12, generator=gen(21))
    w = torch.softmax(torch.randn(b, n, generator=gen(22)), -1)
    keep = (torch.rand(b, n, generator=gen(23)) < 0.3) & valid
    keep[:, 0] = True
    got = prumerge_merge(x, keys, w, keep, k_neighbors=k_neighbors, valid=valid)
    extra = prumerge_extra_token(x, w, keep, valid=valid)
    torch.testing.assert_close(got.double(), ref_prumerge_merge(x, keys, w, keep, k_neighbors, valid), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extra.double(), ref_extra_token(x, w, keep, valid), rtol=1e-5, atol=1e-5)
    noisy = torch.where(valid[:, :, None], x, 1e3 * torch.randn(b, n, c, generator=gen(24)))
    noisy_keys = torch.where(valid[:, :, None], keys, torch.randn(b, n, 12, generator=gen(25)))
    noisy_w = torch.where(valid, w, 5.0)
    torch.testing.assert_close(
        prumerge_merge(noisy, noisy_keys, noisy_w, keep, k_neighbors=k_neighbors, valid=valid)[valid], got[valid]
    )
    torch.testing.assert_close(prumerge_extra_token(noisy, noisy_w, keep, valid=valid), extra)
    for i, m in enumerate(lengths.tolist()):
        solo = prumerge_merge(x[i : i + 1, :m], keys[i : i + 1, :m], w[i : i + 1, :m], keep[i : i + 1, :m], k_neighbors)
        torch.testing.assert_close(got[i : i + 1, :m], solo)
    with pytest.raises(ValueError, match=r"valid must have shape \[B=4, N=40\]"):
        prumerge_merge(x, keys, w, keep, valid=valid[:, :5])


def test_prumerge_merge_single_token_and_extra_token():
    x = torch.randn(2, 1, 4)
    assert torch.equal(prumerge_merge(x, torch.randn(2, 1, 3), torch.ones(2, 1), torch.ones(2, 1, dtype=torch.bool)), x)
    for dtype in DTYPES:
        f = torch.randn(3, 20, 8, generator=gen(14)).to(dtype)
        w = torch.rand(3, 20, generator=gen(15))
        keep = torch.rand(3, 20, generator=gen(16)) < 0.5
        got = prumerge_extra_token(f, w, keep)
        assert got.dtype == dtype and got.shape == (3, 8)
        torch.testing.assert_close(got.double(), ref_extra_token(f, w, keep).to(dtype).double(),
                                   rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- ragged gather / scatter


@pytest.mark.parametrize("pad_side", ["right", "left"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_gather_scatter_roundtrip(pad_side, dtype):
    x = torch.randn(4, 12, 3, generator=gen(17)).to(dtype)
    keep = torch.rand(4, 12, generator=gen(18)) < 0.5
    keep[2] = False  # an empty row
    keep[3] = True  # a full row
    g, valid, index = ragged_gather(x, keep, pad_value=-7.0, pad_side=pad_side)
    rg, rvalid, rindex = ref_ragged_gather(x, keep, -7.0, pad_side)
    assert torch.equal(g, rg) and torch.equal(valid, rvalid) and torch.equal(index, rindex)
    back = ragged_scatter(g, index, valid, 12)
    assert torch.equal(back, torch.where(keep[..., None], x, torch.zeros((), dtype=dtype)))
    # a row alone == the row in a batch (up to the padding width)
    for i in range(4):
        gi, vi, ii = ragged_gather(x[i : i + 1], keep[i : i + 1], pad_side=pad_side)
        sel = valid[i]
        assert torch.equal(gi[0][vi[0]], g[i][sel]) and torch.equal(ii[0][vi[0]], index[i][sel])


def test_ragged_gather_2d_and_bad_pad_side():
    x = torch.arange(10.0).view(2, 5)
    keep = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    g, valid, index = ragged_gather(x, keep, pad_side="left")
    assert g.tolist() == [[0.0, 0.0, 2.0], [6.0, 7.0, 8.0]]
    assert index.tolist() == [[-1, 0, 2], [1, 2, 3]]
    with pytest.raises(ValueError, match=r"pad_side='middle'.*\['right', 'left'\]"):
        ragged_gather(x, keep, pad_side="middle")
    with pytest.raises(ValueError, match="bool"):
        ragged_gather(x, keep.long())


def test_public_api_is_explicit():
    assert sorted(scoring.__all__) == sorted(set(scoring.__all__))
    for name in scoring.__all__:
        assert hasattr(scoring, name)


def test_a_layer_mask_replaces_causal_and_padding_and_sets_the_visibility_count():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, :3] = False
    idx = torch.tensor([[6, 7, 8], [4, 7, 8]])
    causal = torch.arange(9)[None, None, :] <= idx[:, :, None]
    same = scoring.query_attention(q, k, idx, key_padding_mask=pad, key_mask=causal & pad[:, None, :])
    assert torch.equal(same, scoring.query_attention(q, k, idx, key_padding_mask=pad))
    window = causal & pad[:, None, :] & (torch.arange(9)[None, None, :] > idx[:, :, None] - 3)  # 3 back
    probs = scoring.query_attention(q, k, idx, key_padding_mask=pad, key_mask=window)
    assert bool((probs.sum(-1) - 1).abs().max() < 1e-6) and bool((probs[~window[:, None].expand_as(probs)] == 0).all())
    valid = torch.ones(2, 3, dtype=torch.bool)
    received = scoring.attention_received(probs, valid, idx, key_mask=window)
    count = window.sum(1)  # queries seeing each key
    want = probs.mean(1).sum(1) / count.clamp_min(1)
    assert torch.allclose(received, torch.where(count > 0, want, torch.zeros(())))
