"""Pure index arithmetic of AnyRes images (LLaVA-NeXT): ragged rows padded, the per-tile rows of
``budget_scope="tile"`` and their extra tokens gathered back per image. No model, no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TileRows", "extra_per_image", "packed_keep", "pad_rows", "tile_rows"]


@dataclass(frozen=True)
class TileRows:
    """The per-pass rows of ``budget_scope="tile"`` and how image tokens map onto them (R rows)."""

    tile: Tensor  #: long ``[R]``: the tower pass of each row (passes left with no token get none)
    patch: Tensor  #: long ``[R, W]``: each row's tokens as indices into its pass (CLS at 0), raster order
    lengths: Tensor  #: long ``[R]``: real tokens of each row (the rest of ``patch`` is padding)
    row_image: Tensor  #: long ``[R]``: the image each row belongs to
    row_of_tile: Tensor  #: long ``[T]``: the row of each pass (0 for a pass with no token)
    slot: Tensor  #: long ``[I, L]``: each image token's index within its row (0 where invalid)


def tile_rows(tile: Tensor, patch: Tensor, valid: Tensor, num_passes: int, n: int) -> TileRows:
    """Rows of ``budget_scope="tile"`` from the image rows' sources (pure index arithmetic).

    ``tile``, ``patch`` (long ``[I, L]``): each image token's pass and index in it (1..n); ``valid``
    (bool ``[I, L]``). Within a pass, the LLM's order (rows of the unpadded grid) is the pass's raster
    order, so a row lists its pass's present tokens by ascending index.
    """
    device = tile.device
    present = torch.zeros(num_passes, n + 1, dtype=torch.bool, device=device)
    present[tile[valid], patch[valid]] = True
    present = present[:, 1:]  # [T, n]: the pass's tokens the LLM sees
    counts = present.sum(dim=1)
    used = (counts > 0).nonzero().flatten()  # [R]
    width = int(counts.max())
    order = torch.sort((~present[used]).to(torch.int8), dim=1, stable=True).indices[:, :width] + 1  # [R, W]
    lengths = counts[used]
    row_of_tile = torch.zeros(num_passes, dtype=torch.long, device=device)
    row_of_tile[used] = torch.arange(used.numel(), device=device)
    image_of_tile = torch.zeros(num_passes, dtype=torch.long, device=device)
    image_of_tile[tile[valid]] = torch.arange(tile.shape[0], device=device)[:, None].expand_as(tile)[valid]
    rank = present.long().cumsum(dim=1) - 1  # [T, n]: index of each present token within its row
    slot = torch.where(valid, rank[tile, patch - 1], 0)
    return TileRows(used, order, lengths, image_of_tile[used], row_of_tile, slot)


def extra_per_image(
    extra: Tensor, extra_valid: Tensor | None, row_image: Tensor, num_images: int
) -> tuple[Tensor, Tensor]:
    """Per-row extra tokens ``[R, E, C]`` gathered per image: ``([I, K*E, C], valid bool [I, K*E])``.

    Rows of one image are contiguous (passes are image-major); image ``i``'s slots hold its rows' extra
    tokens in row order, K being the most rows of one image; a row's invalid extras stay invalid.
    """
    r, e, _ = extra.shape
    per_image = torch.bincount(row_image, minlength=num_images)  # [I]
    first = per_image.cumsum(0) - per_image
    most = int(per_image.max())
    k = torch.arange(most * e, device=extra.device)
    local, which = k // e, k % e  # [K*E]
    rows = (first[:, None] + local[None, :]).clamp(max=r - 1)  # [I, K*E]
    valid = local[None, :] < per_image[:, None]
    if extra_valid is not None:
        valid = valid & extra_valid[rows, which[None, :]]
    return extra[rows, which[None, :]], valid


def pad_rows(rows: list[Tensor], fill: int) -> tuple[Tensor, Tensor]:
    """Ragged long rows -> ``([I, W] padded with fill, bool [I, W] valid)``."""
    width = max(int(r.numel()) for r in rows)
    out = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)
    lengths = torch.tensor([r.numel() for r in rows], device=out.device)
    return out[:, :width], torch.arange(width, device=out.device)[None, :] < lengths[:, None]


def packed_keep(newline: Tensor, packed_valid: Tensor, keep: Tensor) -> Tensor:
    """A plan's keep mask over an item's tokens (bool ``[I, L]``, newlines excluded) on the LLM's rows (bool
    ``[I, P]``: each non-newline row takes its token's decision in order, every newline row is kept).

    ``newline``, ``packed_valid``: bool ``[I, P]``; row ``p`` of item ``i`` that is no newline is token
    ``#non-newline rows before it`` of the item.
    """
    rank = ((~newline & packed_valid).long().cumsum(dim=1) - 1).clamp(min=0, max=keep.shape[1] - 1)
    return packed_valid & (newline | keep.gather(1, rank))
