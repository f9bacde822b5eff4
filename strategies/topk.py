"""``topk``: a fixed number of patches per sample by a CLS score (VTC-CLS-like baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from tokprune import PruningStrategy, Signal, Stage, VisionContext, VisionPlan, param
from tokprune.scoring import fixed_counts, keep_top

from ._vision import ScoreSource, score_signal, vision_scores


@dataclass(frozen=True)
class TopKParams:
    score: ScoreSource = param(
        "cls_attn", "CLS score: cls_attn (single-head surrogate), cls_attn_mean (head mean), cls_sim (cosine)"
    )
    layer: int = param(-1, "encoder layer of the score (-1 = last); cls_sim reads that layer's input")
    keep: int | None = param(None, "patches kept per sample; overrides keep_ratio", ge=1)
    keep_ratio: float = param(0.25, "fraction of patches kept, round(N * keep_ratio), at least 1", gt=0, le=1)


class TopK(PruningStrategy):
    """Keep the ``keep`` (or ``round(N * keep_ratio)``) patches with the highest CLS score, in raster order.

    A fixed-budget control for the adaptive cuts; with ``score="cls_attn_mean"`` and a single layer it is
    VTC-CLS (arXiv 2412.05819) restricted to one layer (VTC-CLS sums several layers). ``keep_ratio=1.0``
    (and no ``keep``) keeps every patch and reads no signal: the identity step.

    Budget: counts are visual tokens per image, of its own tokens when images differ in size
    (``keep_ratio`` of ``ctx.lengths[b]``; ``keep`` capped at it), see docs/adapters.md. Diagnostics: ``scores`` ``[B, N]``, ``keep_count`` ``[B]``.
    """

    name = "topk"
    stage = Stage.VISION
    ragged_vision = True
    Params = TopKParams

    def _keeps_all(self) -> bool:
        return self.params.keep is None and self.params.keep_ratio >= 1.0

    def requires(self) -> frozenset[Signal]:
        if self._keeps_all():
            return frozenset()
        return frozenset({score_signal(self.params.score, self.params.layer)})

    def plan(self, ctx: VisionContext) -> VisionPlan:
        n, valid = ctx.token_counts, ctx.token_valid  # each image's own tokens (ragged: padded rows)
        if self._keeps_all():
            return VisionPlan(keep=valid, diagnostics={"keep_count": n})
        p = self.params
        scores = vision_scores(ctx.signals, p.score, p.layer)
        counts = fixed_counts(n, p.keep, p.keep_ratio)
        return VisionPlan(keep=keep_top(scores, counts, valid), diagnostics={"scores": scores, "keep_count": counts})
