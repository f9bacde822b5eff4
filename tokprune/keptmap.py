"""Which patches survived: each image's tokens as cells of its patch grid, and which of them the LLM received.

A :class:`KeptMap` is part of every :class:`~tokprune.stats.PruneStats` (``stats.kept``). It holds a
few index tensors per batch, no features:

* ``cells`` (long ``[I, N, 4]``): where token ``j`` of image ``i`` (its ``j``-th placeholder in the
  prompt) sits: ``(tile, frame, row, col)``. The family says (each adapter's ``patch_cells``):

  - LLaVA-1.5: tile 0, frame 0, the ``24 x 24`` raster of its one tower pass;
  - LLaVA-NeXT: tile 0 is the base view (its own ``24 x 24`` raster); tiles ``1..`` are the AnyRes tiles,
    whose tokens get their row and column on the **unpadded** high-resolution grid (the grid the LLM
    sees, newline-separated rows; it spans the whole image), so ``row // 24`` is not the tile row when
    unpadding cut the first tile rows. Newline tokens are no patch: their row is ``-1``;
  - Qwen2.5-VL / Qwen3-VL: one token is a merged ``2 x 2`` patch: row and column on the merged grid
    (``h / 2`` by ``w / 2``), frame ``t``;

  rows past an image's own token count (images of different sizes share the padded width) are ``-1``.
* ``vision`` (bool ``[I, N]``): the tokens the vision stage passed to the LLM (all, without a vision step);
* ``layers[K]`` (bool ``[I, N]``): the tokens still in the sequence after the LLM step before layer ``K``;
* ``columns[K]`` (long ``[I, N]``): each token's column in the sequence that step saw (its scores' index);
* ``merges[stage]`` (long ``[M, 4]``, ``(source image, source token, target image, target token)``):
  what a merging strategy folded into what (``"vision"``, or ``"llm@K"``), from its ``merge_sources`` /
  ``merge_target`` diagnostics; a source may feed several targets (PruMerge's neighbours).

Tokens a strategy makes (PruMerge's global token, VisionZip's contextual ones) come from no patch and are
not in the map; ``stats.image_kept`` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "CELL_FIELDS",
    "KeptMap",
    "MERGE_KEYS",
    "anyres_cells",
    "raster_cells",
    "strategy_columns",
    "take_merges",
    "thw_cells",
    "token_columns",
    "token_present",
    "token_slots",
]

#: The four columns of ``KeptMap.cells``.
CELL_FIELDS = ("tile", "frame", "row", "col")


def raster_cells(images: int, rows: int, cols: int) -> Tensor:
    """One tower pass per image, raster order: long ``[images, rows * cols, 4]`` (tile 0, frame 0, row, col)."""
    j = torch.arange(rows * cols)
    cell = torch.stack([torch.zeros_like(j), torch.zeros_like(j), j // cols, j % cols], dim=1)
    return cell[None].expand(images, -1, -1).clone()


def thw_cells(grid_thw: Tensor, merge: int) -> Tensor:
    """Qwen's merged tokens, per image ``(t, h, w)`` patches (long ``[I, 3]``) merged ``merge x merge``:
    long ``[I, N_max, 4]`` (tile 0, frame, row, col on the merged grid), ``-1`` past each image's tokens."""
    grid = grid_thw.detach().to("cpu", torch.long)
    t, h, w = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge
    counts = t * h * w
    j = torch.arange(int(counts.max()) if counts.numel() else 0)[None, :]
    per_frame = (h * w)[:, None]
    cell = torch.stack(
        [torch.zeros_like(j).expand(grid.shape[0], -1), j // per_frame, (j % per_frame) // w[:, None], j % w[:, None]],
        dim=-1,
    )
    return torch.where((j < counts[:, None])[..., None], cell, -1)


def anyres_cells(layout: list[Tensor], tokens_per_tile: int, side: int) -> Tensor:
    """LLaVA-NeXT, from each image's packing (:func:`tokprune.hf_compat.anyres_layout`: long ``[P_i]``, entry
    ``tile * n + patch`` or -1 for a newline): long ``[I, P_max, 4]``.

    Base-view tokens (tile 0) sit on its ``side x side`` raster. A tile token's row is the number of
    newlines before it (the packing ends each row of the unpadded grid with one) and its column its
    distance from the row's start, so positions are on the unpadded grid whatever the unpadding cut.
    """
    width = max((int(lay.numel()) for lay in layout), default=0)
    out = torch.full((len(layout), width, 4), -1, dtype=torch.long)
    for i, lay in enumerate(layout):  # images, each vectorised over its tokens
        lay = lay.detach().to("cpu", torch.long)
        newline = lay < 0
        tile = torch.where(newline, -1, lay // tokens_per_tile)
        patch = lay % tokens_per_tile
        base = tile == 0
        index = torch.arange(lay.numel())
        # a row of the high-resolution grid starts after the base view and after each newline
        starts = torch.where(newline, index + 1, 0)
        starts = torch.maximum(starts, torch.where(base, index + 1, 0))
        start = torch.cummax(torch.cat([torch.zeros(1, dtype=torch.long), starts[:-1]]), dim=0).values
        row = torch.where(base, patch // side, newline.long().cumsum(0) - newline.long())
        col = torch.where(base, patch % side, index - start)
        cell = torch.stack([tile, torch.zeros_like(tile), row, col], dim=1)
        out[i, : lay.numel()] = torch.where(newline[:, None], -1, cell)
    return out


def token_slots(image: Tensor, counts: Tensor, width: int) -> Tensor:
    """Where each image token sits in the flat prompt: long ``[I, width]``, ``b * n + l``, -1 past its count.

    ``image`` (bool ``[B, n]``): the placeholders, images filling them in order, image ``i`` taking the
    next ``counts[i]`` (long ``[I]``). Branch-free (no sync): a scatter into a spare last column.
    """
    flat = image.flatten()
    rank = flat.long().cumsum(0) - 1  # index of each placeholder among all of them
    ends = counts.cumsum(0)
    img = torch.searchsorted(ends, rank, right=True).clamp_max(max(counts.numel() - 1, 0))
    within = rank - (ends - counts)[img]
    ok = flat & (within < width) & (within >= 0)
    slots = torch.full((counts.numel(), width + 1), -1, dtype=torch.long, device=image.device)
    slots[torch.where(ok, img, 0), torch.where(ok, within, width)] = torch.arange(flat.numel(), device=image.device)
    return slots[:, :width]


def token_columns(src: Tensor, valid: Tensor, slots: Tensor, n: int) -> Tensor:
    """Column of each image token in a packed sequence (``src`` long ``[B, L]``: index in the caller's
    ``n`` positions, -1 for inserted tokens; ``valid`` bool ``[B, L]``): long ``[I, N]``, -1 where absent."""
    b, width = src.shape
    here = valid & (src >= 0)
    flat = torch.where(here, torch.arange(b, device=src.device)[:, None] * n + src, b * n)
    column = torch.full((b * n + 1,), -1, dtype=torch.long, device=src.device)
    column[flat.flatten()] = torch.arange(width, device=src.device).repeat(b)
    column[b * n] = -1
    return torch.where(slots >= 0, column[slots.clamp_min(0)], -1)


def token_present(src: Tensor, valid: Tensor, slots: Tensor, n: int) -> Tensor:
    """bool ``[I, N]``: which image tokens a packed sequence (``src``, ``valid`` as in :func:`token_columns`) holds."""
    return token_columns(src, valid, slots, n) >= 0


def strategy_columns(cells: Tensor | None, keep_width: int) -> Tensor:
    """Each image token's column in the vision strategy's row (long ``[I, N]``, -1 for no patch): the
    strategy sees an image's patch tokens in prompt order, without the tokens that are no patch
    (LLaVA-NeXT's newlines). Without cells: the identity."""
    if cells is None:
        return torch.arange(keep_width)[None, :]
    patch = cells[..., 2] >= 0
    return torch.where(patch, patch.long().cumsum(dim=1) - 1, -1)


@dataclass
class KeptMap:
    """Kept tokens of one prefill as cells of each image's patch grid (the module docstring has the fields).

    Every tensor is on the CPU; ``I`` images in prompt order, ``N`` the most tokens of one image.
    """

    #: long ``[I]``: each image's sample.
    image_sample: Tensor
    #: long ``[I]``: each image's own token count (its placeholders, newlines included).
    tokens: Tensor
    #: bool ``[I, N]``: the tokens the vision stage passed to the LLM.
    vision: Tensor
    #: long ``[I, N, 4]`` ``(tile, frame, row, col)``, or None when the family gives no grid.
    cells: Tensor | None = None
    #: layer K -> bool ``[I, N]``: tokens left after the LLM step before decoder layer K.
    layers: dict[int, Tensor] = field(default_factory=dict)
    #: layer K -> long ``[I, N]``: each token's column in the sequence the step at K saw, -1 where absent.
    columns: dict[int, Tensor] = field(default_factory=dict)
    #: ``"vision"`` or ``"llm@K"`` -> long ``[M, 4]``: ``(source image, source token, target image, target
    #: token)`` of each merge (:func:`take_merges`).
    merges: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.image_sample.shape[0])

    @property
    def cut_layers(self) -> tuple[int, ...]:
        """The LLM layers a step cut before, increasing."""
        return tuple(sorted(self.layers))

    def images_of(self, sample: int) -> list[int]:
        """The images of ``sample``, in prompt order."""
        return (self.image_sample == sample).nonzero().flatten().tolist()

    def patches(self) -> Tensor:
        """bool ``[I, N]``: tokens that are patches of the image (not newlines, not padding)."""
        if self.cells is None:
            return torch.arange(self.vision.shape[1])[None, :] < self.tokens[:, None]
        return self.cells[..., 2] >= 0

    def kept(self, layer: int | None = None) -> Tensor:
        """bool ``[I, N]``: patches the LLM received after the vision stage (``layer=None``) or still held
        after the last cut at or before ``layer``."""
        mask = self.vision
        for k in self.cut_layers:
            if layer is not None and k <= layer:
                mask = self.layers[k]
        return mask & self.patches()

    def positions(self, image: int, layer: int | None = None) -> Tensor:
        """long ``[K, 4]``: the kept patches of ``image`` as ``(tile, frame, row, col)`` (see :meth:`kept`)."""
        if self.cells is None:
            raise ValueError("this model family gives no patch grid (its adapter has no patch_cells)")
        return self.cells[image][self.kept(layer)[image]]

    def to_records(self, sample: int) -> list[dict[str, object]]:
        """JSON-friendly per image of ``sample``: kept cells after the vision stage and after each cut."""
        out = []
        for i in self.images_of(sample):
            rec: dict[str, object] = {"tokens": int(self.tokens[i])}
            if self.cells is not None:
                rec["vision"] = self.positions(i).tolist()
                for k in self.cut_layers:
                    rec[f"llm_{k}"] = self.positions(i, k).tolist()
            out.append(rec)
        return out


#: Diagnostics a merging strategy reports its merges in (moved from ``stats.diagnostics`` into ``merges``):
#: ``merge_sources`` long ``[R, C, k]`` (the columns each kept column absorbed, -1 padded) or
#: ``merge_target`` long ``[R, C]`` (the column each column was folded into, -1: none).
MERGE_KEYS = ("merge_sources", "merge_target")


def _pairs(target: Tensor, inverse: Tensor) -> Tensor:
    """``(row, source column, target column)`` of a merge diagnostic mapped through ``inverse`` (long
    ``[R, W]``: the flat token ``i * N + j`` at each row's column, -1: none) to ``[M, 2]`` flat tokens."""
    if target.dim() == 3:  # kept column c absorbed target[r, c, :]
        r, c, k = target.shape
        src, tgt = target, torch.arange(c)[None, :, None].expand(r, c, k)
    else:
        src, tgt = torch.arange(target.shape[1])[None, :].expand_as(target), target
    row = torch.arange(src.shape[0]).view(-1, *[1] * (src.dim() - 1)).expand_as(src)
    ok = (src >= 0) & (tgt >= 0) & (src < inverse.shape[1]) & (tgt < inverse.shape[1])
    flat = torch.stack([inverse[row[ok], src[ok]], inverse[row[ok], tgt[ok]]], dim=1)
    return flat[(flat >= 0).all(dim=1)]


def _inverse(columns: Tensor, rows: Tensor) -> Tensor:
    """long ``[R, W]``: the flat token ``i * N + j`` at column ``columns[i, j]`` of row ``rows[i]``."""
    num_images, n = columns.shape
    width = int(columns.max()) + 1 if columns.numel() else 0
    inverse = torch.full((int(rows.max()) + 1 if rows.numel() else 0, width), -1, dtype=torch.long)
    i, j = (columns >= 0).nonzero(as_tuple=True)
    inverse[rows[i], columns[i, j]] = i * n + j
    return inverse


def take_merges(kept: KeptMap, diagnostics: dict[str, object], vision: str | None, llm: dict[str, int]) -> None:
    """Move the merge diagnostics of the vision step (``vision``: its name) and of the LLM steps (``llm``:
    diagnostic prefix -> layer) out of ``diagnostics`` into ``kept.merges`` as ``(source image, source token,
    target image, target token)`` rows (long ``[M, 4]``). Host tensors; rows that are not images
    (``budget_scope="tile"``) are left where they are."""
    n = kept.vision.shape[1]
    found: list[tuple[str, Tensor, Tensor]] = []
    for key in MERGE_KEYS:
        value = diagnostics.get(f"{vision}.{key}") if vision is not None else None
        if isinstance(value, Tensor) and value.shape[0] == kept.num_images:
            columns = strategy_columns(kept.cells, n).expand_as(kept.vision)
            columns = torch.where(kept.patches(), columns, -1)
            found.append(("vision", value, _inverse(columns, torch.arange(kept.num_images))))
            del diagnostics[f"{vision}.{key}"]
        for prefix, layer in llm.items():
            value = diagnostics.get(f"{prefix}.{key}")
            if isinstance(value, Tensor) and layer in kept.columns:
                found.append((f"llm@{layer}", value, _inverse(kept.columns[layer], kept.image_sample)))
                del diagnostics[f"{prefix}.{key}"]
    for stage, value, inverse in found:
        flat = _pairs(value.long(), inverse)
        kept.merges[stage] = torch.stack([flat[:, 0] // n, flat[:, 0] % n, flat[:, 1] // n, flat[:, 1] % n], dim=1)
