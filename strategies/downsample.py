"""``downsample``: the patch grid pooled to the budget, area-weighted (VTC-Bench's downsampling baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokprune import PruningStrategy, Stage, VisionContext, VisionPlan, param
from tokprune.errors import MissingCapabilityError
from tokprune.scoring import fixed_counts

__all__ = ["Downsample", "area_pool", "area_weights", "cell_centres", "pooled_grid"]


def pooled_grid(rows: int, cols: int, count: int) -> Tensor:
    """long ``[r]``: the cells of each row of the pooled layout, ``count`` cells of the image's proportions.

    ``r = round(sqrt(count * rows / cols))`` (half up) rows, clamped to ``ceil(count / cols)..min(rows, count)``;
    each row has ``c = count // r`` cells and ``count - r * c`` of them, spread evenly, one more. When
    ``r`` divides ``count`` this is the ``r x c`` grid of image downsampling; otherwise the budget is still
    met exactly (40 of 12 x 12: four rows of 7 cells and two of 6, where a regular grid has 36 or 42).
    """
    if rows < 1 or cols < 1 or not 1 <= count <= rows * cols:
        raise ValueError(
            f"pooled_grid needs rows, cols >= 1 and 1 <= count <= rows * cols, got {rows}, {cols}, {count}"
        )
    r = math.floor(math.sqrt(count * rows / cols) + 0.5)
    r = max(-(-count // cols), min(r, rows, count))
    c, extra = divmod(count, r)
    i = torch.arange(r)
    return c + (i + 1) * extra // r - i * extra // r


def _cells(per_row: Tensor) -> tuple[Tensor, Tensor]:
    """long ``([K], [K])``: each output cell's row in the layout and its index within that row."""
    row = torch.repeat_interleave(torch.arange(per_row.numel(), device=per_row.device), per_row)
    return row, torch.arange(row.numel(), device=per_row.device) - (per_row.cumsum(0) - per_row)[row]


def _spans(size: int, index: Tensor, parts: Tensor) -> Tensor:
    """fp64 ``[K, size]``: the share of each input cell ``[w, w + 1)`` covered by ``[j, j + 1) * size / parts``
    (``index`` = j, ``parts``: long ``[K]``), over the span's length: each row sums to 1. Exact in integers
    (both intervals scaled by ``parts``) until the last division."""
    w = torch.arange(size, device=index.device)[None, :]
    lo = torch.maximum(index[:, None] * size, w * parts[:, None])
    hi = torch.minimum((index[:, None] + 1) * size, (w + 1) * parts[:, None])
    return (hi - lo).clamp(min=0).double() / size


def area_weights(rows: int, cols: int, per_row: Tensor) -> Tensor:
    """fp32 ``[K, rows*cols]``: output cell ``k``'s weight on each input patch (raster order), rows summing to 1.

    Row ``i`` of the layout (``per_row``: long ``[r]``, ``K = per_row.sum()``) spans input rows
    ``[i, i + 1) * rows / r``; its ``j``-th cell spans input columns ``[j, j + 1) * cols / per_row[i]``. A
    patch's weight is the area of its overlap with the cell over the cell's area: a box filter, as image
    downsampling by area (PIL's ``BOX``, OpenCV's ``INTER_AREA``).
    """
    row, col = _cells(per_row)
    vertical = _spans(rows, row, torch.full_like(row, per_row.numel()))  # [K, rows]
    horizontal = _spans(cols, col, per_row[row])  # [K, cols]
    return (vertical[:, :, None] * horizontal[:, None, :]).flatten(1).float()


def cell_centres(rows: int, cols: int, per_row: Tensor) -> Tensor:
    """long ``[K]``: the raster index of the patch holding each output cell's centre (ascending)."""
    row, col = _cells(per_row)
    at_row = torch.div((2 * row + 1) * rows, 2 * per_row.numel(), rounding_mode="floor")
    at_col = torch.div((2 * col + 1) * cols, 2 * per_row[row], rounding_mode="floor")
    return at_row * cols + at_col


def area_pool(features: Tensor, weights: Tensor) -> Tensor:
    """``[B, N, C]`` patches -> ``[B, K, C]`` cell means by :func:`area_weights` ``[K, N]``; computed in
    fp32, returned in ``features``' dtype."""
    return torch.einsum("kn,bnc->bkc", weights, features.float()).to(features.dtype)


@dataclass(frozen=True)
class DownsampleParams:
    keep: int | None = param(None, "pooled tokens per image (cells of the pooled grid); overrides keep_ratio", ge=1)
    keep_ratio: float = param(0.25, "fraction of patches kept, round(N * keep_ratio), at least 1", gt=0, le=1)


class Downsample(PruningStrategy):
    """Pool the patch grid, per image, to the budget: ``keep`` cells in the image's proportions, area-weighted.

    The downsampling baseline of VTC-Bench (Liao et al., arXiv 2510.07143, "Are We Using the Right
    Benchmark"), which found that plain image downsampling beats many pruning methods at equal token
    counts:

    1. the output layout has the image's proportions and exactly the budget's cells (``keep`` or
       ``round(N * keep_ratio)``): ``r`` rows of ``c`` cells, some rows one more when ``r`` does not divide
       the budget (:func:`pooled_grid`);
    2. each output token is the area-weighted mean of the patch features under its cell (:func:`area_weights`);
    3. it takes the place, and so the position, of the patch at its cell's centre (:func:`cell_centres`):
       the kept tokens are rows of the original grid, in raster order, so the grid layout and the positions
       (LLaVA-1.5's 1-D ids with ``positions.vision=keep``) stay those of the full image.

    Deviation: VTC-Bench resizes the *image* before the vision tower (Qwen2-VL takes any resolution);
    a fixed-resolution tower (CLIP at 336 px) cannot, so here the tower's patch features (what the
    projector receives) are pooled instead. Families: it needs one raster grid per row (``ctx.grid``):
    LLaVA-1.5's square grid. LLaVA-NeXT's rows are a base view plus tiles unpadded to the image (several
    grids, cut by the unpadding) and Qwen2.5-VL/Qwen3-VL's merged patches come one image per row without
    a grid in the context (their M-RoPE ``(h, w)`` positions would carry over the same way), so those
    adapters refuse it at ``patch()`` (``ragged_vision`` is off).

    Diagnostics: ``keep_count`` ``[B]``.
    """

    name = "downsample"
    stage = Stage.VISION
    Params = DownsampleParams

    def plan(self, ctx: VisionContext) -> VisionPlan:
        if ctx.grid is None or ctx.lengths is not None:
            raise MissingCapabilityError(
                f"downsample pools a raster grid of patches, and this vision context has none (grid={ctx.grid}, "
                f"{ctx.num_patches} patches{', images of different sizes' if ctx.lengths is not None else ''}); "
                "it runs on one grid per image (LLaVA-1.5); use random, topk or divprune for a fixed budget here"
            )
        rows, cols = ctx.grid
        device = ctx.features.device
        n = ctx.token_counts
        count = int(fixed_counts(n[:1], self.params.keep, self.params.keep_ratio)[0])  # every row has N patches
        per_row = pooled_grid(rows, cols, count).to(device)
        pooled = area_pool(ctx.features, area_weights(rows, cols, per_row))  # [B, K, C]
        at = cell_centres(rows, cols, per_row)
        keep = torch.zeros(ctx.batch_size, ctx.num_patches, dtype=torch.bool, device=device)
        keep[:, at] = True
        features = ctx.features.clone()
        features[:, at] = pooled  # ``at`` ascends, so the pooled raster order is the kept raster order
        counts = torch.full_like(n, count)
        return VisionPlan(keep=keep, features=features, diagnostics={"keep_count": counts})
