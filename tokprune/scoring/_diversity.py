"""Diversity-driven selection: greedy max-min (DivPrune), greedy DPP MAP (CDPruner), pivots (DART) and
near-duplicate removal (VisPruner).

Greedy selections are sequential by nature: they loop over their *selection steps* (at most the largest
keep count), and every step is one batched operation over all rows and tokens. Rows may ask for
different counts: the run goes to the largest one and each row keeps the first ``k[b]`` picks, which is
exactly what a run to ``k[b]`` would pick (a greedy prefix does not depend on where the run stops).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ._validate import check_bool, check_float, check_lengths, check_tensor, score_dtype

__all__ = [
    "dpp_greedy_map",
    "max_min_diversity",
    "norm_pivots",
    "pairwise_cosine",
    "remove_duplicates",
    "similarity_to_pivots",
]


def _counts(name: str, k: Tensor | int, b: int, limit: Tensor, device: torch.device) -> Tensor:
    """``k`` as long ``[B]`` capped at each row's candidate count ``limit`` (long ``[B]``)."""
    k_t = torch.as_tensor(k, device=device)
    if k_t.dtype.is_floating_point or k_t.dtype == torch.bool or k_t.dim() > 1:
        raise InputError(
            f"{name} must be an int or an integer tensor [B={b}], got {k_t.dtype} shape {tuple(k_t.shape)}"
        )
    if k_t.dim() == 1 and k_t.shape[0] != b:
        raise InputError(f"{name} must have shape [B={b}], got {tuple(k_t.shape)}")
    if bool((k_t < 0).any()):
        raise InputError(f"{name} must be >= 0, got {k_t.tolist()}")
    return torch.minimum(k_t.long().expand(b), limit)


def _candidates(candidates: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    if candidates is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    check_tensor("candidates", candidates, 2, "[B, N]")
    check_bool("candidates", candidates)
    if tuple(candidates.shape) != (b, n):
        raise InputError(f"candidates must have shape [B={b}, N={n}], got {tuple(candidates.shape)}")
    return candidates


def _mask_from_order(order: Tensor, counts: Tensor, n: int) -> Tensor:
    """bool ``[B, N]``: the first ``counts[b]`` entries of ``order[b]`` (long ``[B, K]``)."""
    b, k = order.shape
    take = torch.arange(k, device=order.device)[None, :] < counts[:, None]
    mask = torch.zeros(b, n + 1, dtype=torch.bool, device=order.device)
    mask.scatter_(1, torch.where(take, order, torch.full_like(order, n)), True)
    return mask[:, :n]


def pairwise_cosine(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity between every pair of tokens of each row.

    Args:
        x: ``[B, N, C]`` token features.
        eps: lower bound on each norm (a zero vector has similarity 0 to everything).

    Returns:
        fp32 (fp64 for fp64 inputs) ``[B, N, N]``, exactly symmetric.
    """
    check_tensor("x", x, 3, "[B, N, C]")
    check_float("x", x)
    v = x.to(score_dtype(x))
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(eps)
    sim = v @ v.transpose(1, 2)
    # a matmul need not be bitwise symmetric; exact symmetry keeps the tie of a mutual-nearest pair a tie
    return (sim + sim.transpose(1, 2)) * 0.5


def max_min_diversity(features: Tensor, k: Tensor | int, candidates: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Greedy max-min diverse subset (DivPrune, CVPR 2025), batched.

    ``vbdi/divprune`` at ``799e2d9``, ``LLaVA/llava/model/llava_arch.py`` L152-171, one sample at a time there.

    Distance ``d(i, j) = 1 - cos(x_i, x_j)``. The first pick is the candidate farthest from its nearest
    other candidate; every next pick is the candidate whose distance to the nearest *selected* token is
    largest (the max-min / farthest-point rule). Ties go to the lower index.

    Args:
        features: ``[B, N, C]``.
        k: int or long ``[B]`` picks per row, capped at the row's candidate count.
        candidates: optional bool ``[B, N]``: only these may be picked (and only they count as "other
            candidates" for the first pick); None = every token.

    Returns:
        ``(keep bool [B, N], order long [B, K])``: the picked tokens, and the picks in selection order
        (``K = max(k)``, entries past a row's count are -1).
    """
    check_tensor("features", features, 3, "[B, N, C]")
    b, n, _ = features.shape
    cand = _candidates(candidates, b, n, features.device)
    counts = _counts("k", k, b, cand.sum(dim=1), features.device)
    steps = int(counts.max()) if b else 0
    dist = 1.0 - pairwise_cosine(features)  # [B, N, N]
    pair = cand[:, :, None] & cand[:, None, :]
    pair &= ~torch.eye(n, dtype=torch.bool, device=features.device)
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=features.device)
    # first pick: the largest distance to the nearest other candidate (a lone candidate scores +inf)
    nearest = torch.where(pair, dist, inf).amin(dim=1)
    score = torch.where(cand, nearest, -inf)
    order = torch.full((b, max(steps, 0)), -1, dtype=torch.long, device=features.device)
    rows = torch.arange(b, device=features.device)
    to_selected = torch.full((b, n), float("inf"), dtype=dist.dtype, device=features.device)
    open_ = cand.clone()  # candidates not picked yet
    for step in range(steps):
        j = score.argmax(dim=1)
        order[:, step] = j
        open_[rows, j] = False
        # distance of every token to the selected set, updated with the new pick's row
        to_selected = torch.minimum(to_selected, dist[rows, j])
        score = torch.where(open_, to_selected, -inf)
    order = torch.where(torch.arange(order.shape[1], device=order.device)[None, :] < counts[:, None], order, -1)
    return _mask_from_order(order, counts, n), order


def dpp_greedy_map(
    kernel: Tensor, k: Tensor | int, candidates: Tensor | None = None, eps: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Greedy MAP inference of a DPP with an incremental Cholesky update (Chen et al., NeurIPS 2018), batched.

    Each step picks ``j = argmax d_i^2`` (the gain in log-determinant of adding ``i``), then updates
    ``e_i = (L[j, i] - <c_j, c_i>) / d_j``, ``c_i <- [c_i, e_i]``, ``d_i^2 <- d_i^2 - e_i^2``: O(N K)
    per step instead of a determinant per candidate. This is CDPruner's loop
    (``Theia-4869/CDPruner`` at ``9541616``, ``llava/model/llava_arch.py`` L169-182) with per-row counts and candidates.

    Once the kernel's rank is exhausted (``d_j^2 <= eps``: every remaining candidate lies in the span of
    the selected ones) the reference divides by ``sqrt(<= 0)`` and produces NaN; here the update is
    skipped and the remaining picks follow the residual gains (ties to the lower index).

    Args:
        kernel: ``[B, N, N]`` symmetric positive semi-definite kernel (e.g. ``r_i S_ij r_j``).
        k: int or long ``[B]`` picks per row, capped at the row's candidate count.
        candidates: optional bool ``[B, N]``; None = every token.
        eps: the smallest gain treated as positive.

    Returns:
        ``(keep bool [B, N], order long [B, K])`` as :func:`max_min_diversity`.
    """
    check_tensor("kernel", kernel, 3, "[B, N, N]")
    check_float("kernel", kernel)
    b, n, n2 = kernel.shape
    if n != n2:
        raise InputError(f"kernel must be square [B, N, N], got {tuple(kernel.shape)}")
    cand = _candidates(candidates, b, n, kernel.device)
    counts = _counts("k", k, b, cand.sum(dim=1), kernel.device)
    steps = int(counts.max()) if b else 0
    lk = kernel.to(score_dtype(kernel))
    rows = torch.arange(b, device=kernel.device)
    cis = lk.new_zeros(max(steps, 0), b, n)  # [K, B, N]: the incremental Cholesky factor
    gains = torch.diagonal(lk, dim1=1, dim2=2).clone()  # d_i^2, [B, N]
    gains = torch.where(cand, gains, torch.full_like(gains, float("-inf")))
    order = torch.full((b, max(steps, 0)), -1, dtype=torch.long, device=kernel.device)
    for step in range(steps):
        j = gains.argmax(dim=1)
        order[:, step] = j
        dj = gains[rows, j]
        ok = dj > eps
        proj = torch.einsum("tb,tbn->bn", cis[:step, rows, j], cis[:step])
        e = (lk[rows, j] - proj) / torch.sqrt(torch.where(ok, dj, torch.ones_like(dj)))[:, None]
        e = torch.where(ok[:, None], e, torch.zeros_like(e))
        cis[step] = e
        gains = gains - e.square()
        gains[rows, j] = float("-inf")
    order = torch.where(torch.arange(order.shape[1], device=order.device)[None, :] < counts[:, None], order, -1)
    return _mask_from_order(order, counts, n), order


def norm_pivots(x: Tensor, k: Tensor | int, candidates: Tensor | None = None, p: float = 1.0) -> Tensor:
    """The ``k`` candidates with the largest ``L_p`` norm (DART's pivots: L1 norm of the keys).

    Args:
        x: ``[B, L, C]`` (e.g. keys with heads concatenated).
        k: int or long ``[B]`` pivots per row, capped at the row's candidate count.
        candidates: optional bool ``[B, L]``; None = every position.
        p: the norm's order (``float("inf")`` allowed).

    Returns:
        bool ``[B, L]``; ties go to the lower index.
    """
    from ._select import topk_mask

    check_tensor("x", x, 3, "[B, L, C]")
    check_float("x", x)
    b, n, _ = x.shape
    cand = _candidates(candidates, b, n, x.device)
    counts = _counts("k", k, b, cand.sum(dim=1), x.device)
    norms = x.to(score_dtype(x)).norm(p=p, dim=-1)
    return topk_mask(norms.masked_fill(~cand, float("-inf")), counts) & cand


def similarity_to_pivots(
    x: Tensor, pivot_index: Tensor, pivot_valid: Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    """Cosine similarity of every position to each pivot.

    Args:
        x: ``[B, L, C]``.
        pivot_index: long ``[B, P]`` pivot positions.
        pivot_valid: optional bool ``[B, P]``; invalid pivots give rows of zeros.
        eps: lower bound on each norm.

    Returns:
        fp32 (fp64 for fp64 inputs) ``[B, P, L]``.
    """
    check_tensor("x", x, 3, "[B, L, C]")
    check_float("x", x)
    check_tensor("pivot_index", pivot_index, 2, "[B, P]")
    b = x.shape[0]
    if pivot_index.shape[0] != b:
        raise InputError(f"pivot_index must have shape [B={b}, P], got {tuple(pivot_index.shape)}")
    v = x.to(score_dtype(x))
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(eps)
    rows = torch.arange(b, device=x.device)[:, None]
    sim = v[rows, pivot_index.long().clamp_min(0)] @ v.transpose(1, 2)  # [B, P, L]
    if pivot_valid is not None:
        check_bool("pivot_valid", pivot_valid)
        sim = sim * pivot_valid[:, :, None].to(sim.dtype)
    return sim


def remove_duplicates(
    features: Tensor, index: Tensor, target: int | Tensor, step: int = 8, lengths: Tensor | None = None
) -> Tensor:
    """Iterative bipartite near-duplicate removal (VisPruner, ICCV 2025), batched.

    ``Theia-4869/VisPruner`` at ``aefa01a``, ``llava/model/llava_arch.py`` L159-175: split the current tokens
    alternately into ``A`` (even slots) and ``B`` (odd slots); each ``a`` scores its largest cosine
    similarity to any ``b``; drop the ``r = min(step, R - target)`` most similar ``a``; the survivors
    are the remaining ``a`` (most similar first, as the reference's descending argsort leaves them)
    followed by every ``b``. Repeat until ``target`` tokens remain. The order matters: it decides the
    next round's split, and it is reproduced exactly (a stable sort, so ties keep their slot order).

    Args:
        features: ``[B, N, C]``.
        index: long ``[B, R]``: the tokens to thin out, in their current order (VisPruner: the
            non-important tokens by descending CLS attention).
        target: how many to keep, ``0 <= target``; ``target >= R`` returns ``index`` unchanged. With
            ``lengths``: an int or long ``[B]`` (each row's own target).
        step: the most tokens one round drops (VisPruner: 8).
        lengths: long ``[B]``, ragged rows (images of different sizes): row ``b`` thins out
            ``index[b, :lengths[b]]`` only, the rest is padding (ignored), and gives what it gives alone;
            None = every entry of every row.

    Returns:
        long ``[B, min(target, R)]``: the surviving token indices, in the reference's final order. With
        ``lengths``: ``[B, max_b min(target[b], lengths[b])]``, row ``b``'s survivors first, then -1.
    """
    if lengths is not None:
        return _remove_duplicates_ragged(features, index, target, step, lengths)
    check_tensor("features", features, 3, "[B, N, C]")
    check_float("features", features)
    check_tensor("index", index, 2, "[B, R]")
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise InputError(f"target must be an int >= 0, got {target!r}")
    if not isinstance(step, int) or step < 1:
        raise InputError(f"step must be an int >= 1, got {step!r}")
    b = features.shape[0]
    v = features.to(score_dtype(features))
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    rows = torch.arange(b, device=features.device)[:, None]
    current = index.long()
    while current.shape[1] > target:
        size = current.shape[1]
        r = min(step, size - target)
        tokens = v[rows, current]  # [B, R, C]
        a, bb = tokens[:, ::2], tokens[:, 1::2]
        if bb.shape[1] == 0:  # a single token left: nothing to match it with
            break
        scores = (a @ bb.transpose(1, 2)).amax(dim=-1)  # [B, |A|]
        survivors = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, r:]
        current = torch.cat([current[:, ::2].gather(1, survivors), current[:, 1::2]], dim=1)
    return current[:, :target]


def _remove_duplicates_ragged(
    features: Tensor, index: Tensor, target: int | Tensor, step: int, lengths: Tensor
) -> Tensor:
    """:func:`remove_duplicates` over rows of different lengths, every round one batched op over all rows.

    Each row keeps its own size; a round drops ``min(step, size - target)`` of its ``A`` slots and writes
    the survivors (remaining ``a`` in descending-score order, then every ``b``) to the front of its row.
    Rows already at their target (or down to one token) are left as they are.
    """
    check_tensor("features", features, 3, "[B, N, C]")
    check_float("features", features)
    check_tensor("index", index, 2, "[B, R]")
    if not isinstance(step, int) or step < 1:
        raise InputError(f"step must be an int >= 1, got {step!r}")
    b, width = index.shape
    check_lengths(lengths, b, width)
    device = features.device
    tgt = torch.minimum(_counts("target", target, b, lengths.long(), device), lengths.long())
    v = features.to(score_dtype(features))
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    rows = torch.arange(b, device=device)[:, None]
    slot = torch.arange(width, device=device)[None, :]
    current = torch.where(slot < lengths[:, None], index.long(), torch.full_like(index, -1, dtype=torch.long))
    size = lengths.long().clone()
    while True:
        active = (size > tgt) & (size >= 2)  # a single token has nothing to match it with
        if not bool(active.any()):
            break
        n_a, n_b = (size + 1) // 2, size // 2
        # at most every a goes (the reference's ranked[r:] is then empty)
        r = torch.where(active, torch.minimum(torch.clamp(size - tgt, max=step), n_a), torch.zeros_like(size))
        tokens = v[rows, current.clamp_min(0)]  # [B, R, C]
        a, bb = tokens[:, ::2], tokens[:, 1::2]
        sim = (a @ bb.transpose(1, 2)).masked_fill(~(slot[:, : bb.shape[1]] < n_b[:, None])[:, None, :], float("-inf"))
        scores = sim.amax(dim=-1).masked_fill(~(slot[:, : a.shape[1]] < n_a[:, None]), float("-inf"))  # [B, |A|]
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # padding of A sorts last
        a_sorted = current[:, ::2].gather(1, order)
        t_a, t_b = slot[:, : a.shape[1]], slot[:, : bb.shape[1]]
        # destinations: surviving a at sorted rank t -> t - r; b at odd slot u -> (n_a - r) + u; the rest to
        # the spare column `width`, cut off below
        dest_a = torch.where((t_a >= r[:, None]) & (t_a < n_a[:, None]), t_a - r[:, None], width)
        dest_b = torch.where(t_b < n_b[:, None], (n_a - r)[:, None] + t_b, width)
        nxt = torch.full((b, width + 1), -1, dtype=torch.long, device=device)
        nxt.scatter_(1, torch.cat([dest_a, dest_b], dim=1), torch.cat([a_sorted, current[:, 1::2]], dim=1))
        current = torch.where(active[:, None], nxt[:, :width], current)
        size = size - r
    out = current[:, : int(tgt.max()) if b else 0]
    return torch.where(slot[:, : out.shape[1]] < tgt[:, None], out, torch.full_like(out, -1))
