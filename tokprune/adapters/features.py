"""The encoded images of one call, as the assembly consumes them (:class:`VisionOut`) and as a patched
``get_image_features`` returns them to ``generate`` (:class:`PrunedImageFeatures`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import hf_compat as hf
from ..errors import InputError

__all__ = ["PrunedImageFeatures", "VisionOut", "join_items"]


@dataclass
class VisionOut:
    """A family's encoded images, in the one form the assembly consumes."""

    kept: Tensor  #: ``[S, D]`` projected kept tokens of every image, image-major raster order
    keep: Tensor  #: bool ``[I, N]``: which of each image's tokens are kept (padded rows: False past its length)
    extra: Tensor | None  #: ``[I, E, D]`` projected extra tokens (inserted after each image), or None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: long ``[I]``: each image's own token count when images differ in size; None: ``N`` each.
    lengths: Tensor | None = None
    #: long ``[I]``: tower passes each image cost (AnyRes: its tiles); None: one each.
    tower_runs: Tensor | None = None
    # Optional family features are keyword-only: two branches once each appended one positionally.
    _: KW_ONLY
    #: DeepStack (Qwen3-VL): one ``[S, D]`` per decoder layer ``i`` (rows aligned with ``kept``), added to
    #: the kept image tokens' hidden states after layer ``i``, wherever they are by then; None: no additions.
    deepstack: list[Tensor] | None = None
    #: bool ``[I, E]``: which extra tokens of each image are real (images bringing different counts,
    #: e.g. one set per AnyRes tile); None: all ``E`` of every image.
    extra_valid: Tensor | None = None
    #: fp64 ``[I]``: each image's tower FLOPs where the family counts them itself (Qwen2.5-VL's windowed
    #: tower, :class:`~tokprune.stats.WindowedTower`); None: ``FlopModel.vision`` over ``tower_runs``.
    tower_flops: Tensor | None = None
    #: long ``[I]``: tokens of each image the projector mapped, where not every token entering the LLM
    #: was (LLaVA-NeXT's row newlines are a learned vector); None: ``kept_counts``.
    projected: Tensor | None = None
    #: long ``[I, N, 4]``: each token's cell on its image's patch grid (:mod:`tokprune.keptmap`), set from
    #: the family's :meth:`PrunedDecoderAdapter.patch_cells`; None: not known yet (or no grid).
    cells: Tensor | None = None
    #: long ``[I, 3]``: each item's patch grid ``(t, h, w)`` where the family has one (Qwen: its
    #: ``image_grid_thw`` / ``video_grid_thw`` row); ``t`` is its frame count (temporal patch groups).
    grid_thw: Tensor | None = None
    #: bool ``[I]``: which items are videos (None: all images).
    videos: Tensor | None = None

    @classmethod
    def unpruned(cls, per_image: Sequence[Tensor]) -> VisionOut:
        """Unpruned features (one ``[N_i, D]`` per image) keeping everything, rows padded to the longest."""
        kept = torch.cat(list(per_image))
        lengths = torch.tensor([p.shape[0] for p in per_image], dtype=torch.long, device=kept.device)
        keep = torch.arange(int(lengths.max()), device=kept.device)[None, :] < lengths[:, None]
        return cls(kept=kept, keep=keep, extra=None, lengths=lengths)

    @property
    def token_counts(self) -> Tensor:
        """long ``[I]``: unpruned tokens of each image."""
        if self.lengths is not None:
            return self.lengths
        return torch.full((self.keep.shape[0],), self.keep.shape[1], dtype=torch.long, device=self.keep.device)

    @property
    def kept_counts(self) -> Tensor:
        """long ``[I]``: tokens of each image entering the LLM (kept + extra)."""
        return self.keep.sum(dim=1) + self.extra_counts

    @property
    def extra_counts(self) -> Tensor | int:
        """Extra tokens of each image: long ``[I]`` when they differ (``extra_valid``), else one int."""
        if self.extra is None:
            return 0
        if self.extra_valid is not None:
            return self.extra_valid.sum(dim=1)
        return self.extra.shape[1]


@dataclass
class PrunedImageFeatures(hf.BaseModelOutputWithPooling):
    """``get_image_features`` output of a patched model (what ``generate`` pre-encodes and passes back).

    ``pooler_output`` is a list with one ``[n_i + E, D]`` tensor per image: its kept tokens in order,
    then its ``E`` extra tokens. ``keep`` (bool ``[I, N]``) says which tokens they are, ``lengths``
    (long ``[I]`` or None) how many each image has, ``tower_runs`` its tower passes, ``tower_flops`` their
    cost where the family counts it, ``projected`` the tokens its projector mapped.
    """

    keep: Tensor | None = None
    num_extra: int | None = None
    diagnostics: dict[str, Any] | None = None
    lengths: Tensor | None = None
    tower_runs: Tensor | None = None
    tower_flops: Tensor | None = None
    projected: Tensor | None = None
    #: the flat kept tokens and the extra ones as the adapter made them, so that passing these
    #: features back (``generate``) rebuilds the :class:`VisionOut` without reading counts again
    kept: Tensor | None = None
    extra: Tensor | None = None
    deepstack: list[Tensor] | None = None
    extra_valid: Tensor | None = None
    cells: Tensor | None = None
    grid_thw: Tensor | None = None
    videos: Tensor | None = None

    @classmethod
    def of(cls, out: VisionOut) -> PrunedImageFeatures:
        # The one sync left here: HF's contract is a list of per-image tensors, whose sizes live on the device.
        per_image = list(out.kept.split(out.keep.sum(dim=1).tolist()))
        if out.extra is not None and out.extra_valid is not None:
            per_image = [torch.cat([p, e[v]]) for p, e, v in zip(per_image, out.extra, out.extra_valid)]
        elif out.extra is not None:
            per_image = [torch.cat([p, e]) for p, e in zip(per_image, out.extra)]
        num_extra = 0 if out.extra is None else int(out.extra.shape[1])
        return cls(
            pooler_output=per_image,
            keep=out.keep,
            num_extra=num_extra,
            diagnostics=out.diagnostics,
            lengths=out.lengths,
            tower_runs=out.tower_runs,
            tower_flops=out.tower_flops,
            projected=out.projected,
            kept=out.kept,
            extra=out.extra,
            deepstack=out.deepstack,
            extra_valid=out.extra_valid,
            cells=out.cells,
            grid_thw=out.grid_thw,
            videos=out.videos,
        )

    def vision_out(self) -> VisionOut:
        if self.keep is None:
            raise InputError(
                "these image features carry no keep mask; pass the PrunedImageFeatures get_image_features returned, "
                "unchanged (or pixel_values)"
            )
        if self.kept is not None:
            diagnostics = dict(self.diagnostics or {})
            return VisionOut(self.kept, self.keep, self.extra, diagnostics, **self._optional())
        if self.extra_valid is not None:
            raise InputError(
                "image features with a different number of extra tokens per image must carry their kept and extra "
                "tensors (pass the PrunedImageFeatures get_image_features returned, unchanged)"
            )
        per_image, keep, e = list(self.pooler_output), self.keep, self.num_extra or 0
        counts = keep.sum(dim=1).tolist()
        kept = torch.cat([p[:c] for p, c in zip(per_image, counts)])
        extra = torch.stack([p[c:] for p, c in zip(per_image, counts)]) if e else None
        diagnostics = dict(self.diagnostics or {})
        return VisionOut(kept, keep, extra, diagnostics, **self._optional())

    def _optional(self) -> dict[str, Any]:
        names = (
            "lengths", "tower_runs", "tower_flops", "projected", "deepstack", "extra_valid", "cells", "grid_thw", "videos"
        )
        return {name: getattr(self, name) for name in names}


def _pad_cols(x: Tensor, width: int, value: float | bool | int) -> Tensor:
    """``x`` ``[I, W, ...]`` padded on dim 1 to ``width`` with ``value``."""
    if x.shape[1] == width:
        return x
    pad = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


def join_items(parts: Sequence[VisionOut], order: Tensor) -> VisionOut:
    """The items of several encoder calls (a prompt's images and its videos) as one :class:`VisionOut`.

    ``order`` (long ``[I]``, a permutation of ``0..I-1``, ``I`` the items of all ``parts`` in turn): joined
    item ``k`` is item ``order[k]`` of the parts' concatenation, so the joined items follow the prompt.
    Rows of ``kept`` (and of each DeepStack layer) move with their item; padded per-item fields are padded
    to the widest part. Diagnostics are merged as they are (keys of different parts must differ).
    """
    if len(parts) == 1:
        only = parts[0]
        if order.numel() and not torch.equal(order, torch.arange(order.numel(), device=order.device)):
            raise InputError("one part of visual items can only be joined in its own order")
        return only
    device = parts[0].keep.device
    width = max(p.keep.shape[1] for p in parts)
    keep = torch.cat([_pad_cols(p.keep, width, False) for p in parts])
    counts = keep.sum(dim=1)
    # each kept row's item, and the rows regrouped item by item in the joined order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    row_item = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    rows = torch.sort(rank[row_item], stable=True).indices
    kept = torch.cat([p.kept for p in parts])[rows]

    def joined(name: str, fill: float | bool | int = 0) -> Tensor | None:
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            return None
        if values[0].dim() >= 2 and name not in ("grid_thw",):
            most = max(v.shape[1] for v in values)
            values = [_pad_cols(v, most, fill) for v in values]
        joined_values = torch.cat(values)
        return joined_values[order.to(joined_values.device)]  # grids and cells may live on the host

    deepstack = None
    if all(p.deepstack is not None for p in parts):
        layers = len(parts[0].deepstack)
        deepstack = [torch.cat([p.deepstack[i] for p in parts])[rows] for i in range(layers)]
    extra, extra_valid = None, None
    if any(p.extra is not None for p in parts):
        d = kept.shape[-1]
        most = max(p.extra.shape[1] for p in parts if p.extra is not None)
        extras, valids = [], []
        for p in parts:
            e = p.extra if p.extra is not None else kept.new_zeros(p.keep.shape[0], 0, d)
            v = p.extra_valid if p.extra_valid is not None else torch.ones(e.shape[:2], dtype=torch.bool, device=device)
            extras.append(_pad_cols(e, most, 0.0))
            valids.append(_pad_cols(v, most, False))
        extra, extra_valid = torch.cat(extras)[order], torch.cat(valids)[order]
    lengths = torch.cat([p.token_counts for p in parts])[order]
    videos = torch.cat(
        [p.videos if p.videos is not None else torch.zeros(p.keep.shape[0], dtype=torch.bool, device=device) for p in parts]
    )[order]
    diagnostics: dict[str, Any] = {}
    for p in parts:
        diagnostics.update(p.diagnostics)
    return VisionOut(
        kept,
        keep[order],
        extra,
        diagnostics,
        lengths=lengths,
        tower_runs=joined("tower_runs"),
        deepstack=deepstack,
        extra_valid=extra_valid,
        tower_flops=joined("tower_flops"),
        projected=joined("projected"),
        cells=joined("cells", -1),
        grid_thw=joined("grid_thw"),
        videos=videos,
    )
