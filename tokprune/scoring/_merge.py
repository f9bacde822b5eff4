"""Merging, batched: PruMerge's key-similarity merge, and a decide/apply merge of dropped tokens into their
nearest kept token (used inside the LLM, ``LLMPlan.hidden``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ._validate import check_bool, check_float, check_tensor


def _check_merge_inputs(features: Tensor, weights: Tensor, keep: Tensor) -> tuple[int, int]:
    check_tensor("features", features, 3, "[B, N, C]")
    check_float("features", features)
    check_tensor("weights", weights, 2, "[B, N]")
    check_tensor("keep", keep, 2, "[B, N]")
    check_bool("keep", keep)
    b, n, _ = features.shape
    for name, t in (("weights", weights), ("keep", keep)):
        if tuple(t.shape) != (b, n):
            raise InputError(f"{name} must have shape [B={b}, N={n}], got {tuple(t.shape)}")
    return b, n


def _check_valid(valid: Tensor, b: int, n: int) -> None:
    check_tensor("valid", valid, 2, "[B, N]")
    check_bool("valid", valid)
    if tuple(valid.shape) != (b, n):
        raise InputError(f"valid must have shape [B={b}, N={n}], got {tuple(valid.shape)}")


def _acc_dtype(features: Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def prumerge_neighbors(keys: Tensor, k_neighbors: int = 32, valid: Tensor | None = None) -> Tensor:
    """Decide PruMerge's merge: each token's ``k_neighbors`` most key-similar other tokens (the *decide* half
    of :func:`prumerge_merge`, which applies it; the kept tokens' rows are the merge's sources).

    Args:
        keys: ``[B, N, Ck]`` patch keys (L2-normalised here).
        k_neighbors: neighbours per token, ``min(k_neighbors, N - 1)`` of them.
        valid: bool ``[B, N]``, ragged rows: only valid tokens are neighbours and row ``b`` has
            ``min(k_neighbors, valid[b].sum() - 1)`` of them; None = every token.

    Returns:
        long ``[B, N, k]``, most similar first; -1 past a ragged row's own neighbour count (``k = 0``: empty).
    """
    check_tensor("keys", keys, 3, "[B, N, Ck]")
    check_float("keys", keys)
    b, n = keys.shape[:2]
    if valid is not None:
        _check_valid(valid, b, n)
    if not isinstance(k_neighbors, int) or k_neighbors < 0:
        raise InputError(f"k_neighbors must be an int >= 0, got {k_neighbors!r}")
    k = min(k_neighbors, n - 1)
    if k <= 0:
        return torch.zeros(b, n, 0, dtype=torch.long, device=keys.device)
    kn = torch.nn.functional.normalize(keys.to(_acc_dtype(keys)), dim=-1)
    sim = kn @ kn.transpose(1, 2)  # [B, N, N]
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # never your own neighbour
    if valid is not None:
        sim = sim.masked_fill(~valid[:, None, :], float("-inf"))  # padding is nobody's neighbour
    nbr = sim.topk(k, dim=-1).indices  # [B, N, k]
    if valid is not None:  # row b's own neighbour count: ranks past it (padding) are no neighbour
        own = torch.clamp(valid.sum(dim=1) - 1, max=k)  # [B]
        nbr = nbr.masked_fill(torch.arange(k, device=nbr.device)[None, None, :] >= own[:, None, None], -1)
    return nbr


def prumerge_merge(
    features: Tensor,
    keys: Tensor,
    weights: Tensor,
    keep: Tensor,
    k_neighbors: int = 32,
    valid: Tensor | None = None,
    neighbors: Tensor | None = None,
) -> Tensor:
    """Update every kept token with its most key-similar tokens, PruMerge style.

    LLaVA-PruMerge ``token_prune_merge_advanced`` (``clip_encoder.py`` L85-171, the merge step): for a kept token i, cosine
    similarity of its key to the keys of **all other** tokens (kept and pruned, itself excluded); the
    ``k_neighbors`` most similar ``j`` give ``x̃_i = x_i + Σ_j w_j · x_j`` with the raw CLS-attention
    weights (unnormalised, self weight 1, a token may feed several centres). When ``N - 1 < k_neighbors``
    all other tokens are used. Ties in similarity follow ``torch.topk``.

    Args:
        features: ``[B, N, C]`` patch features to merge (LLaVA: ``hidden_states[-2][:, 1:]``).
        keys: ``[B, N, Ck]`` patch keys of the scoring layer (L2-normalised here).
        weights: ``[B, N]`` merge weights (PruMerge: CLS attention).
        keep: bool ``[B, N]`` kept tokens.
        k_neighbors: neighbours per kept token (32 in PruMerge).
        valid: bool ``[B, N]``, ragged rows (images of different sizes): only valid tokens are neighbours,
            and row ``b`` uses ``min(k_neighbors, valid[b].sum() - 1)`` of them, as it would alone;
            None = every token.
        neighbors: :func:`prumerge_neighbors` of the same inputs when the caller decided already (to report
            the merge's sources); None: decided here.

    Returns:
        ``[B, N, C]`` in ``features.dtype`` (accumulated in fp32): merged values at kept positions, the
        original values elsewhere (gather the kept rows with :func:`ragged_gather`).
    """
    b, n = _check_merge_inputs(features, weights, keep)
    if tuple(keys.shape[:2]) != (b, n):
        raise InputError(f"keys must have shape [B={b}, N={n}, Ck], got {tuple(keys.shape)}")
    nbr = prumerge_neighbors(keys, k_neighbors, valid) if neighbors is None else neighbors
    if nbr.shape[-1] == 0:
        return features.clone()
    acc = _acc_dtype(features)
    # ranks past a ragged row's own neighbour count (-1) weigh nothing
    w = weights.to(acc)[:, None, :].expand(b, n, n).gather(2, nbr.clamp_min(0)).masked_fill(nbr < 0, 0.0)
    nbr = nbr.clamp_min(0)
    # sparse [B, N, N] weight matrix so the sum is one batched matmul instead of a [B, N, k, C] gather
    # scatter_add_: a clamped -1 rank may share an index with a real neighbour; its weight is 0
    mix = torch.zeros(b, n, n, dtype=acc, device=features.device).scatter_add_(2, nbr, w)
    x = features.to(acc)
    merged = x + mix @ x
    return torch.where(keep[:, :, None], merged, x).to(features.dtype)


def prumerge_extra_token(features: Tensor, weights: Tensor, keep: Tensor, valid: Tensor | None = None) -> Tensor:
    """PruMerge's extra global token: ``Σ_{j pruned} w_j · x_j``.

    Args:
        features: ``[B, N, C]``.
        weights: ``[B, N]`` (PruMerge: CLS attention, unnormalised).
        keep: bool ``[B, N]``.
        valid: bool ``[B, N]``, ragged rows: padding (False) is not a pruned token; None = every token.

    Returns:
        ``[B, C]`` in ``features.dtype`` (accumulated in fp32); zeros when nothing is pruned.
    """
    b, n = _check_merge_inputs(features, weights, keep)
    acc = _acc_dtype(features)
    pruned = ~keep
    if valid is not None:
        _check_valid(valid, b, n)
        pruned = pruned & valid
    w = weights.to(acc).masked_fill(~pruned, 0.0)
    return torch.einsum("bn,bnc->bc", w, features.to(acc)).to(features.dtype)


def nearest_kept(x: Tensor, keep: Tensor, candidates: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Decide a merge: each dropped candidate's most cosine-similar kept candidate.

    The *decide* half of a ToMe-style split (``facebookresearch/ToMe`` ``tome/merge.py``: matching returns
    what to merge, a separate step applies it); :func:`merge_mean` applies.

    Args:
        x: ``[B, L, D]`` states the similarity is measured on.
        keep: bool ``[B, L]`` kept positions.
        candidates: optional bool ``[B, L]``: only candidates merge, and only into kept candidates;
            None = every position.
        eps: lower bound on each norm.

    Returns:
        long ``[B, L]``: the target position of each dropped candidate, -1 elsewhere (kept positions,
        non-candidates, and dropped candidates of a row with no kept candidate). Ties go to the lower index.
    """
    check_tensor("x", x, 3, "[B, L, D]")
    check_float("x", x)
    check_tensor("keep", keep, 2, "[B, L]")
    check_bool("keep", keep)
    b, n = keep.shape
    cand = torch.ones_like(keep) if candidates is None else check_bool("candidates", candidates)
    v = x.to(_acc_dtype(x))
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(eps)
    sim = v @ v.transpose(1, 2)  # [B, L, L]
    targets_ok = (keep & cand)[:, None, :]
    sim = sim.masked_fill(~targets_ok, float("-inf"))
    target = sim.argmax(dim=-1)  # first maximum: ties to the lower index
    source = ~keep & cand & targets_ok.any(dim=-1)
    return torch.where(source, target, torch.full_like(target, -1))


def merge_mean(x: Tensor, target: Tensor) -> Tensor:
    """Apply a merge: each target becomes the mean of itself and every position merged into it.

    Args:
        x: ``[B, L, D]``.
        target: long ``[B, L]`` from :func:`nearest_kept` (-1 = not merged).

    Returns:
        ``[B, L, D]`` in ``x.dtype`` (accumulated in fp32): ``(x_i + sum_{j -> i} x_j) / (1 + #{j -> i})``
        at targets, ``x`` unchanged elsewhere (merged-away positions keep their value; they are dropped).
    """
    check_tensor("x", x, 3, "[B, L, D]")
    check_float("x", x)
    check_tensor("target", target, 2, "[B, L]")
    b, n, d = x.shape
    if tuple(target.shape) != (b, n):
        raise InputError(f"target must have shape [B={b}, L={n}], got {tuple(target.shape)}")
    acc = _acc_dtype(x)
    moving = target >= 0
    slot = torch.where(moving, target, torch.full_like(target, n))  # column n absorbs the non-moving rows
    total = torch.zeros(b, n + 1, d, dtype=acc, device=x.device)
    total.scatter_add_(1, slot[:, :, None].expand(b, n, d), x.to(acc))
    count = torch.zeros(b, n + 1, dtype=acc, device=x.device).scatter_add_(1, slot, moving.to(acc))
    merged = (x.to(acc) + total[:, :n]) / (1.0 + count[:, :n, None])
    return torch.where(count[:, :n, None] > 0, merged, x.to(acc)).to(x.dtype)
