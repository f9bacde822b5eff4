"""The encoded images of one call, in one form: :class:`ImageFeatures`.

The same object is what the assembly consumes (flat ``kept`` rows, the ``keep`` mask, ``extra`` tokens)
and what a patched ``get_image_features`` returns to ``generate``, which passes it back to the forward
(HF's contract: a :class:`~transformers.modeling_outputs.BaseModelOutputWithPooling` whose ``pooler_output``
lists one ``[n_i, D]`` tensor per image). ``VisionOut`` and ``PrunedImageFeatures`` were its two halves
before 0.x; both names remain aliases of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import hf_compat as hf
from ..errors import InputError

__all__ = ["ImageFeatures", "PrunedImageFeatures", "VisionOut", "join_items"]

_OPTIONAL = (
    "lengths", "tower_runs", "tower_flops", "projected", "deepstack", "extra_valid", "cells", "grid_thw", "videos"
)


@dataclass
class ImageFeatures(hf.BaseModelOutputWithPooling):
    """A call's encoded images: which tokens of each image the LLM receives, projected, and their costs.

    Every field defaults to None (HF's ``ModelOutput`` rule); ``kept`` and ``keep`` are always set by the
    core. ``pooler_output`` (one ``[n_i + E_i, D]`` per image: its kept tokens, then its extra ones) is
    filled by :meth:`for_generate` when the features leave the core for ``generate``.
    """

    #: ``[S, D]``: projected kept tokens of every image, image-major, each image's in its token order.
    kept: Tensor | None = None
    #: bool ``[I, N]``: which of each image's tokens are kept (rows padded: False past each image's length).
    keep: Tensor | None = None
    #: ``[I, E, D]``: projected extra tokens a strategy made (inserted after each image), or None.
    extra: Tensor | None = None
    #: bool ``[I, E]``: which extra tokens of each image are real (counts differ per image); None: all ``E``.
    extra_valid: Tensor | None = None
    #: the vision step's diagnostics, prefixed with its name.
    diagnostics: dict[str, object] | None = None
    #: long ``[I]``: each image's own token count when images differ in size; None: ``N`` each.
    lengths: Tensor | None = None
    #: long ``[I]``: tower passes each image cost (AnyRes: its tiles); None: one each.
    tower_runs: Tensor | None = None
    #: fp64 ``[I]``: each image's tower FLOPs where the family counts them itself (Qwen2.5-VL's windowed
    #: tower, :class:`~tokprune.stats.WindowedTower`); None: ``FlopModel.vision`` over ``tower_runs``.
    tower_flops: Tensor | None = None
    #: long ``[I]``: tokens of each image the projector mapped, where not every token entering the LLM
    #: was (LLaVA-NeXT's row newlines are a learned vector); None: ``kept_counts``.
    projected: Tensor | None = None
    #: DeepStack (Qwen3-VL): one ``[S, D]`` per decoder layer ``i`` (rows aligned with ``kept``), added to
    #: the kept image tokens' hidden states after layer ``i``, wherever they are by then; None: no additions.
    deepstack: list[Tensor] | None = None
    #: long ``[I, N, 4]``: each token's cell on its image's patch grid (:mod:`tokprune.keptmap`), set from
    #: the family's :meth:`~tokprune.adapters.Family.patch_cells`; None: not known yet (or no grid).
    cells: Tensor | None = None
    #: long ``[I, 3]``: each item's patch grid ``(t, h, w)`` where the family has one (Qwen: its
    #: ``image_grid_thw`` / ``video_grid_thw`` row); ``t`` is its frame count (temporal patch groups).
    grid_thw: Tensor | None = None
    #: bool ``[I]``: which items are videos (None: all images).
    videos: Tensor | None = None
    #: extra tokens per image when only ``pooler_output`` and ``keep`` were given (features built by hand).
    num_extra: int | None = None

    @classmethod
    def unpruned(cls, per_image: Sequence[Tensor]) -> ImageFeatures:
        """Unpruned features (one ``[N_i, D]`` per image) keeping everything, rows padded to the longest."""
        kept = torch.cat(list(per_image))
        lengths = torch.tensor([p.shape[0] for p in per_image], dtype=torch.long, device=kept.device)
        keep = torch.arange(int(lengths.max()), device=kept.device)[None, :] < lengths[:, None]
        return cls(kept=kept, keep=keep, lengths=lengths)

    @classmethod
    def of(cls, features: ImageFeatures) -> ImageFeatures:
        """``features`` with its per-image ``pooler_output`` (the form ``generate`` splits and passes back)."""
        return features.for_generate()

    def for_generate(self) -> ImageFeatures:
        """Fill ``pooler_output`` (one ``[n_i + E_i, D]`` per image) from the flat tensors; returns self."""
        if self.kept is None or self.keep is None:
            raise InputError("image features without kept rows and a keep mask cannot be handed to generate()")
        # The one sync left here: HF's contract is a list of per-image tensors, whose sizes live on the device.
        per_image = list(self.kept.split(self.keep.sum(dim=1).tolist()))
        if self.extra is not None and self.extra_valid is not None:
            per_image = [torch.cat([p, e[v]]) for p, e, v in zip(per_image, self.extra, self.extra_valid)]
        elif self.extra is not None:
            per_image = [torch.cat([p, e]) for p, e in zip(per_image, self.extra)]
        self["pooler_output"] = per_image  # item assignment: the ModelOutput's keys follow
        self.num_extra = 0 if self.extra is None else int(self.extra.shape[1])
        return self

    def vision_out(self) -> ImageFeatures:
        """These features as the assembly consumes them (flat ``kept``), rebuilt from ``pooler_output`` and
        ``keep`` when they came without their flat tensors."""
        if self.keep is None:
            raise InputError(
                "these image features carry no keep mask; pass the ImageFeatures get_image_features returned, "
                "unchanged (or pixel_values)"
            )
        if self.kept is not None:
            return self
        if self.extra_valid is not None:
            raise InputError(
                "image features with a different number of extra tokens per image must carry their kept and extra "
                "tensors (pass the ImageFeatures get_image_features returned, unchanged)"
            )
        per_image, keep, e = list(self.pooler_output), self.keep, self.num_extra or 0
        counts = keep.sum(dim=1).tolist()
        kept = torch.cat([p[:c] for p, c in zip(per_image, counts)])
        extra = torch.stack([p[c:] for p, c in zip(per_image, counts)]) if e else None
        optional = {name: getattr(self, name) for name in _OPTIONAL}
        return ImageFeatures(kept=kept, keep=keep, extra=extra, diagnostics=dict(self.diagnostics or {}), **optional)

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


#: Aliases of :class:`ImageFeatures` (its two halves before 0.x).
VisionOut = ImageFeatures
PrunedImageFeatures = ImageFeatures


def _pad_cols(x: Tensor, width: int, value: float | bool | int) -> Tensor:
    """``x`` ``[I, W, ...]`` padded on dim 1 to ``width`` with ``value``."""
    if x.shape[1] == width:
        return x
    pad = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


def join_items(parts: Sequence[ImageFeatures], order: Tensor) -> ImageFeatures:
    """The items of several encoder calls (a prompt's images and its videos) as one :class:`ImageFeatures`.

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
    diagnostics: dict[str, object] = {}
    for p in parts:
        diagnostics.update(p.diagnostics or {})
    return ImageFeatures(
        kept=kept,
        keep=keep[order],
        extra=extra,
        diagnostics=diagnostics,
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
