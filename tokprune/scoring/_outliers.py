"""Adaptive token counts from outlier rules on a score row (PruMerge's IQR, the sibling code's LOF)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ._validate import check_choice, check_float, check_lengths, check_tensor, score_dtype

LOF_TAILS = ("both", "high")


def iqr_outlier_count(scores: Tensor, factor: float = 1.5, *, lengths: Tensor | None = None) -> Tensor:
    """Number of high outliers per row: values ``> Q3 + factor * (Q3 - Q1)``.

    PruMerge's ``outlier_dectection`` (LLaVA-PruMerge ``clip_encoder.py`` L34-47), but per sample instead of
    pooled over the batch. Quartiles use linear interpolation, numpy's ``np.percentile`` default. Only the
    upper fence counts, as in the reference.

    Args:
        scores: ``[B, N]`` float scores.
        factor: fence multiplier (1.5 in PruMerge).
        lengths: long ``[B]``, ragged rows: row ``b`` is ``scores[b, :lengths[b]]``, the rest is padding
            (ignored). Quartiles and counts are those of each row alone.

    Returns:
        long ``[B]`` in ``[0, N]`` (0 for empty rows). PruMerge's ratio is ``count / N``.
    """
    check_tensor("scores", scores, 2, "[B, N]")
    check_float("scores", scores)
    x = scores.to(score_dtype(scores))
    if lengths is None:
        quart = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device), dim=1)  # [2, B]
        q1, q3 = quart[0], quart[1]
        fence = q3 + factor * (q3 - q1)
        return (x > fence[:, None]).sum(dim=1)
    b, n = x.shape
    check_lengths(lengths, b, n)
    valid = torch.arange(n, device=x.device) < lengths[:, None]
    # Padding sorts last as +inf; each row's quartiles interpolate within its own prefix, with the rank
    # arithmetic of torch.quantile (q * (n - 1), then lerp) so a row gives what it gives alone.
    v = x.masked_fill(~valid, float("inf")).sort(dim=1).values
    last = (lengths - 1).clamp_min(0).to(x.dtype)[:, None]
    rank = torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device) * last  # [B, 2]
    lo, hi = rank.floor().long(), rank.ceil().long()
    q = torch.lerp(v.gather(1, lo), v.gather(1, hi), rank - lo.to(x.dtype))
    fence = q[:, 1] + factor * (q[:, 1] - q[:, 0])
    return ((x > fence[:, None]) & valid).sum(dim=1)


def _lof_scores(x: Tensor, n_neighbors: int) -> Tensor:
    """``x [B, N]`` sorted ascending -> sklearn's ``negative_outlier_factor_`` ``[B, N]`` (same order)."""
    b, n = x.shape
    k = n_neighbors
    # In 1-D the k nearest neighbours of a point are among the k positions on either side of it in sorted
    # order, so [B, N, 2k] candidate distances replace the [B, N, N] distance matrix.
    offsets = torch.cat([torch.arange(-k, 0, device=x.device), torch.arange(1, k + 1, device=x.device)])
    pos = torch.arange(n, device=x.device)[:, None] + offsets  # [N, 2k]
    inside = (pos >= 0) & (pos < n)
    pos = pos.clamp(0, n - 1)
    cand = x[:, pos]  # [B, N, 2k]
    dist = (cand - x[:, :, None]).abs().masked_fill(~inside, float("inf"))
    knn_dist, j = torch.topk(dist, k, dim=-1, largest=False)  # [B, N, k], ascending
    nbr = pos.expand(b, n, 2 * k).gather(2, j)  # neighbour positions (sorted coordinates)
    k_distance = knn_dist[:, :, -1]  # [B, N]
    reach = torch.maximum(knn_dist, k_distance.gather(1, nbr.reshape(b, -1)).view(b, n, k))
    lrd = 1.0 / (reach.mean(dim=-1) + 1e-10)  # sklearn adds 1e-10 against duplicates
    ratios = lrd.gather(1, nbr.reshape(b, -1)).view(b, n, k) / lrd[:, :, None]
    return -ratios.mean(dim=-1)


def lof_outlier_count(scores: Tensor, n_neighbors: int = 20, *, tail: str = "both") -> Tensor:
    """Outlier count per row from LocalOutlierFactor on the scalar scores (the authors' sibling code).

    Batched equivalent of ``sklearn.neighbors.LocalOutlierFactor(n_neighbors, contamination="auto")
    .fit_predict(scores[b, :, None]) == -1`` as used by Recoverable-Compression's
    ``find_max_derivative_position`` (``clip_encoder.py`` L36-46, docs/reference-method.md#sources): ``n_neighbors`` is capped at ``N - 1`` as in
    sklearn; lrd uses sklearn's ``+1e-10``; a point is an outlier when its negative outlier factor is below
    the ``'auto'`` offset -1.5. Like sklearn, this counts outliers in **both tails** by default (the
    reference then keeps ``int(N * count / N)`` top-scoring tokens, i.e. counts low outliers too);
    ``tail="high"`` counts only outliers at or above the row median.

    Ties between equal distances may pick different (equidistant) neighbours than sklearn's tree; the
    result then can differ on data with repeated values.

    Args:
        scores: ``[B, N]`` float scores.
        n_neighbors: k of the k-nearest-neighbour graph (sibling code: 20 in the active path).
        tail: ``"both"`` (sklearn, default) or ``"high"``.

    Returns:
        long ``[B]`` in ``[0, N]`` (0 for N < 2).
    """
    check_tensor("scores", scores, 2, "[B, N]")
    check_float("scores", scores)
    check_choice("tail", tail, LOF_TAILS)
    if not isinstance(n_neighbors, int) or n_neighbors < 1:
        raise InputError(f"n_neighbors must be a positive int, got {n_neighbors!r}")
    b, n = scores.shape
    if n < 2:
        return torch.zeros(b, dtype=torch.long, device=scores.device)
    # sklearn computes in float64; the comparison with -1.5 is sensitive to rounding, so do the same
    x = torch.sort(scores.to(torch.float64), dim=1).values
    nof = _lof_scores(x, min(n_neighbors, n - 1))
    outlier = nof < -1.5
    if tail == "high":
        median = x[:, (n - 1) // 2 : n // 2 + 1].mean(dim=1, keepdim=True)
        outlier = outlier & (x >= median)
    return outlier.sum(dim=1)
