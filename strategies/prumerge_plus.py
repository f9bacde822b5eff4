"""``prumerge_plus``: PruMerge+ (Shang et al., arXiv 2403.15388 v6), PruMerge plus column-strided spatial samples."""

from __future__ import annotations

import torch
from torch import Tensor

from tokprune import scoring

from .prumerge import PruMerge


def spatial_stride(outliers: Tensor, n: int | Tensor) -> Tensor:
    """long ``[B]``: the reference's sampling stride ``int(int(1 / ratio) / 3)`` with ``ratio = outliers / n``,
    at least 1 (the reference crashes with stride 0 when ``ratio > 1/3``). ``n``: the token count, an int
    or long ``[B]`` (each image's own, images of different sizes).

    Computed in float64 like the reference's Python floats, so ``int(1 / ratio)`` rounds identically.
    """
    ratio = outliers.double() / n
    step = torch.floor(1.0 / ratio)
    return torch.clamp(torch.floor(step / 3), min=1).long()


def spatial_mask(stride: Tensor, n: int, lengths: Tensor | None = None) -> Tensor:
    """bool ``[B, n]``: ``arange(0, n - 1, stride)`` per sample (the reference's ``arange(0, 575, stride)``),
    i.e. column stripes of the flattened grid, not a 2-D uniform grid. ``lengths`` (long ``[B]``): row
    ``b`` is ``arange(0, lengths[b] - 1, stride[b])``, its own tokens; None = ``n`` for every row."""
    index = torch.arange(n, device=stride.device)[None, :]
    end = n if lengths is None else lengths[:, None]
    return (index % stride[:, None] == 0) & (index < end - 1)


class PruMergePlus(PruMerge):
    """PruMerge plus spatially sampled tokens: keep the IQR outliers *and* every ``stride``-th token of the
    flattened grid, then merge and add the extra token exactly as ``prumerge``.

    Follows ``42Shawn/LLaVA-PruMerge`` ``clip_encoder.py::token_prune_merge_advanced_plus`` (L174-281,
    adaptive path): ``ratio = outliers / N``, ``step = int(1 / ratio)``, candidates
    ``arange(0, N - 1, int(step / 3))``, outliers first, candidates not already kept added.
    Example: 32 outliers of 576 -> step 18 -> stride 6 -> columns {0, 6, 12, 18} of every row.

    Budget: kept visual tokens per image = outliers (at least ``min_keep``) + spatial samples + 1 extra;
    images of different sizes: ratio, stride and stripes of each image's own tokens (docs/adapters.md).

    Deviations: those of ``prumerge`` (per sample, ``min_keep``, raster order, exact count), plus:
    no outliers -> ``ratio = min_keep / N`` (the reference divides by zero); ``ratio > 1/3`` -> stride 1
    (the reference's ``arange`` step 0 crashes); the non-adaptive training path (top N/8 plus
    ``arange(step/2, N-1, 8)``) is not implemented.

    Diagnostics: those of ``prumerge`` plus ``stride`` ``[B]``.
    """

    name = "prumerge_plus"

    def select(
        self, scores: Tensor, outliers: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        n = scores.shape[1]
        if valid is None:
            stride = spatial_stride(outliers, n)
            return scoring.topk_mask(scores, outliers) | spatial_mask(stride, n), {"stride": stride}
        lengths = valid.sum(dim=1)  # images of different sizes: the stride and stripes of each image's own tokens
        stride = spatial_stride(outliers, lengths)
        keep = scoring.keep_top(scores, outliers, valid) | spatial_mask(stride, n, lengths)
        return keep, {"stride": stride}
