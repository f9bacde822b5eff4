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

__all__ = ["ImageFeatures", "PrunedImageFeatures", "VisionOut"]

_OPTIONAL = ("lengths", "tower_runs", "tower_flops", "projected", "deepstack", "extra_valid", "cells")


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
