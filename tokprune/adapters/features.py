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

__all__ = ["PrunedImageFeatures", "VisionOut"]


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
        names = ("lengths", "tower_runs", "tower_flops", "projected", "deepstack", "extra_valid", "cells")
        return {name: getattr(self, name) for name in names}
