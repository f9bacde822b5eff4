"""Attention-derived scores computed from q/k projections: only the rows that are needed, in fp32."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ._validate import check_bool, check_float, check_tensor, score_dtype


def _drop_column(x: Tensor, index: int) -> Tensor:
    """``x [B, T]`` -> ``[B, T-1]`` without column ``index``."""
    return torch.cat((x[:, :index], x[:, index + 1 :]), dim=1)


def _normalise_index(name: str, index: int, size: int) -> int:
    if not -size <= index < size:
        raise InputError(f"{name}={index} is out of range for a sequence of {size} tokens; valid: {-size}..{size - 1}")
    return index % size


def cls_attention(
    q: Tensor,
    k: Tensor,
    num_heads: int = 1,
    cls_index: int = 0,
    scale: float | None = None,
    key_valid: Tensor | None = None,
) -> Tensor:
    """CLS-row attention over the patch tokens of one encoder layer, from its q/k projections.

    ``num_heads=1`` is PruMerge's single-head surrogate ``softmax(q_cls · kᵀ · C^-0.5)`` over the full
    width C (LLaVA-PruMerge ``clip_encoder.py``: ``attn[:, 0, 1:]``); ``num_heads=H`` splits C into H heads
    of ``D = C/H``, softmaxes each with ``D^-0.5`` and averages over heads (the encoder's own attention,
    head-mean, as VTC-CLS / VisionZip read it). Only the CLS row is computed, never the ``[T, T]`` map.

    Args:
        q: ``[B, 1+N, C]`` query projections (bias included, *not* pre-scaled), CLS at ``cls_index``.
        k: ``[B, 1+N, C]`` key projections.
        num_heads: number of heads H; must divide C.
        cls_index: position of the CLS token (negative indices allowed).
        scale: logit scale; default ``(C/H)^-0.5``.
        key_valid: bool ``[B, 1+N]``: tokens that exist (padded rows of a ragged batch: False past each
            image's length); the others get no attention mass (zero in the output). None: all exist.

    Returns:
        fp32 (fp64 for fp64 inputs) ``[B, N]``: attention of CLS to each patch. The CLS column is part of
        the softmax denominator but dropped from the output, so rows sum to ``1 - attn(CLS->CLS)``.
    """
    check_tensor("q", q, 3, "[B, 1+N, C]")
    check_tensor("k", k, 3, "[B, 1+N, C]")
    check_float("q", q)
    if q.shape != k.shape:
        raise InputError(f"q and k must have the same shape [B, 1+N, C], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, t, c = q.shape
    if not isinstance(num_heads, int) or num_heads < 1 or c % num_heads:
        divisors = [h for h in range(1, min(c, 64) + 1) if c % h == 0]
        raise InputError(f"num_heads={num_heads!r} must be a positive divisor of C={c}; e.g. one of {divisors}")
    cls = _normalise_index("cls_index", cls_index, t)
    dt = score_dtype(q)
    d = c // num_heads
    scale = d**-0.5 if scale is None else scale
    q_cls = q[:, cls].to(dt)  # [B, C]
    if num_heads == 1:
        logits = torch.bmm(k.to(dt), q_cls[:, :, None])  # [B, T, 1]
    else:
        # block-diagonal [B, C, H] query: one k @ Qbd matmul gives every head's logits without
        # permuting k into [B, H, T, D] (a full copy of k)
        eye = torch.eye(num_heads, dtype=dt, device=q.device)
        q_bd = (q_cls.view(b, num_heads, d, 1) * eye[:, None, :]).view(b, c, num_heads)
        logits = torch.bmm(k.to(dt), q_bd)  # [B, T, H]
    logits = logits * scale
    if key_valid is not None:  # padding is not a key: softmax over each image's own tokens
        logits = logits.masked_fill(~key_valid[:, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=1).mean(dim=2)  # [B, T]
    return _drop_column(probs, cls)


def query_attention(
    q: Tensor,
    k: Tensor,
    query_index: Tensor,
    key_padding_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Attention probabilities of selected query rows of one decoder layer (eager-attention equivalent).

    Grouped-query attention: query head ``h`` uses key head ``h // (H / Hkv)`` (as HF ``repeat_kv``).
    q/k are taken *after* rotary embedding, as the layer's attention sees them.

    Args:
        q: ``[B, H, L, D]`` queries (not pre-scaled).
        k: ``[B, Hkv, L, D]`` keys, ``H % Hkv == 0``.
        query_index: long ``[B, Q]`` sequence positions of the wanted query rows; ``-1`` marks a padding
            query whose output row is all zeros.
        key_padding_mask: bool ``[B, L]``, True = real token; padded keys get probability 0.
        causal: a query at position i only sees keys at positions <= i.
        scale: logit scale; default ``D^-0.5``.
        key_mask: bool ``[B, Q, L]``: the keys each selected query sees, where the layer's mask is not causal +
            padding (a sliding window, a bidirectional image block: the layer's own mask, rows at
            ``query_index``); replaces ``causal`` and ``key_padding_mask``. None: those two.

    Returns:
        fp32 (fp64 for fp64 inputs) ``[B, H, Q, L]``: softmax over the allowed keys; disallowed keys are
        exactly 0; rows with no allowed key (padding queries) are all 0.
    """
    check_tensor("q", q, 4, "[B, H, L, D]")
    check_tensor("k", k, 4, "[B, Hkv, L, D]")
    check_float("q", q)
    check_tensor("query_index", query_index, 2, "[B, Q]")
    b, h, length, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != b or k.shape[2:] != q.shape[2:]:
        raise InputError(f"k must have shape [B={b}, Hkv, L={length}, D={d}], got {tuple(k.shape)}")
    if hkv < 1 or h % hkv:
        raise InputError(f"query heads H={h} must be a multiple of key heads Hkv={hkv} (grouped-query attention)")
    if query_index.shape[0] != b or query_index.dtype not in (torch.int64, torch.int32):
        raise InputError(
            f"query_index must be an integer tensor [B={b}, Q], got {tuple(query_index.shape)} {query_index.dtype}"
        )
    if key_padding_mask is not None:
        check_bool("key_padding_mask", key_padding_mask)
        if tuple(key_padding_mask.shape) != (b, length):
            raise InputError(
                f"key_padding_mask must have shape [B={b}, L={length}], got {tuple(key_padding_mask.shape)}"
            )
    dt = score_dtype(q)
    scale = d**-0.5 if scale is None else scale
    n_q = query_index.shape[1]
    qi = query_index.long()
    rows = qi.clamp_min(0)[:, None, :, None].expand(b, h, n_q, d)
    q_sel = q.gather(2, rows).to(dt).view(b, hkv, h // hkv, n_q, d)  # [B, Hkv, G, Q, D]
    logits = torch.einsum("bkgqd,bkld->bkgql", q_sel, k.to(dt)).reshape(b, h, n_q, length) * scale
    allowed = (qi >= 0)[:, None, :, None]  # [B, 1, Q, 1]
    if key_mask is not None:
        check_bool("key_mask", key_mask)
        if tuple(key_mask.shape) != (b, n_q, length):
            raise InputError(f"key_mask must have shape [B={b}, Q={n_q}, L={length}], got {tuple(key_mask.shape)}")
        allowed = allowed & key_mask[:, None]
    elif causal:
        key_pos = torch.arange(length, device=q.device)
        allowed = allowed & (key_pos[None, None, None, :] <= qi[:, None, :, None])
    if key_padding_mask is not None and key_mask is None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    # rows with nothing allowed are NaN after softmax; zero them (and keep masked keys exactly 0)
    return probs.masked_fill(~allowed, 0.0)


def attention_received(
    probs: Tensor,
    query_valid: Tensor,
    query_index: Tensor,
    causal: bool = True,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Head-mean attention each key receives, averaged over the valid queries that can see it.

    With causal attention key j is visible only to queries at positions >= j, so a plain sum or a mean
    over all queries favours early tokens (FasterVLM issue #10); we divide by the number of valid queries
    with ``query_index >= j`` instead (all valid queries when ``causal=False``).

    Args:
        probs: ``[B, H, Q, L]`` attention probabilities (e.g. from :func:`query_attention`).
        query_valid: bool ``[B, Q]``, False for padding queries.
        query_index: long ``[B, Q]`` positions of the queries.
        causal: use the causal visibility count.
        key_mask: bool ``[B, Q, L]``: the keys each query sees (:func:`query_attention`'s); where given, the
            visibility count is read from it instead.

    Returns:
        fp32 (fp64 for fp64 inputs) ``[B, L]``; keys no valid query can see get 0.
    """
    check_tensor("probs", probs, 4, "[B, H, Q, L]")
    check_float("probs", probs)
    check_tensor("query_valid", query_valid, 2, "[B, Q]")
    check_bool("query_valid", query_valid)
    check_tensor("query_index", query_index, 2, "[B, Q]")
    b, _, n_q, length = probs.shape
    for name, t in (("query_valid", query_valid), ("query_index", query_index)):
        if tuple(t.shape) != (b, n_q):
            raise InputError(f"{name} must have shape [B={b}, Q={n_q}], got {tuple(t.shape)}")
    dt = score_dtype(probs)
    w = query_valid.to(dt)  # [B, Q]
    head_mean = probs.to(dt).mean(dim=1)  # [B, Q, L]
    total = torch.bmm(w[:, None, :], head_mean).squeeze(1)  # summed over valid queries
    if key_mask is not None:
        count = (query_valid[:, :, None] & key_mask).sum(dim=1)
    elif causal:
        key_pos = torch.arange(length, device=probs.device)
        sees = query_valid[:, :, None] & (query_index.long()[:, :, None] >= key_pos[None, None, :])
        count = sees.sum(dim=1)  # [B, L]
    else:
        count = query_valid.sum(dim=1, keepdim=True).expand(b, length)
    return torch.where(count > 0, total / count.clamp_min(1).to(dt), torch.zeros((), dtype=dt, device=probs.device))


def cls_cosine_similarity(hidden: Tensor, cls_index: int = 0, eps: float = 1e-8) -> Tensor:
    """Cosine similarity between the CLS hidden state and each patch hidden state.

    Args:
        hidden: ``[B, 1+N, C]`` hidden states of one encoder layer, CLS at ``cls_index``.
        cls_index: position of the CLS token (negative indices allowed).
        eps: lower bound on each vector norm (zero vectors give similarity 0).

    Returns:
        fp32 (fp64 for fp64 inputs) ``[B, N]`` in [-1, 1].
    """
    check_tensor("hidden", hidden, 3, "[B, 1+N, C]")
    check_float("hidden", hidden)
    cls = _normalise_index("cls_index", cls_index, hidden.shape[1])
    x = hidden.to(score_dtype(hidden))
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    sim = torch.einsum("bc,btc->bt", x[:, cls], x)
    return _drop_column(sim, cls)


def query_cosine_similarity(hidden: Tensor, query: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity between each position's hidden state and the mean hidden state of the query rows.

    Args:
        hidden: ``[B, L, D]`` hidden states of one decoder layer.
        query: bool ``[B, L]``: the positions mean-pooled into each sample's query vector.
        eps: lower bound on each vector norm (zero vectors, and rows without queries, give 0).

    Returns:
        fp32 (fp64 for fp64 inputs) ``[B, L]`` in [-1, 1].
    """
    check_tensor("hidden", hidden, 3, "[B, L, D]")
    check_float("hidden", hidden)
    check_tensor("query", query, 2, "[B, L]")
    check_bool("query", query)
    if query.shape != hidden.shape[:2]:
        raise InputError(
            f"query must have shape {tuple(hidden.shape[:2])} ([B, L] of hidden), got {tuple(query.shape)}"
        )
    x = hidden.to(score_dtype(hidden))
    w = query.to(x.dtype)
    pooled = torch.einsum("bl,bld->bd", w, x) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
    pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(eps)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.einsum("bd,bld->bl", pooled, x)
