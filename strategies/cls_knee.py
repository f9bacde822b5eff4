"""``cls_knee``: stage 1 of the reference method (arXiv 2409.01162), a per-sample cut at the knee of the
sorted CLS-score curve."""

from __future__ import annotations

from dataclasses import dataclass

from tokprune import PruningStrategy, Signal, Stage, VisionContext, VisionPlan, param
from tokprune.scoring import CutParams, cut, keep_top

from ._vision import ScoreSource, score_signal, vision_scores


@dataclass(frozen=True)
class _ScoreParams:
    score: ScoreSource = param(
        "cls_attn", "CLS score: cls_attn (single-head surrogate, PruMerge), cls_attn_mean (head mean), cls_sim (cosine)"
    )
    layer: int = param(-1, "encoder layer of the score (-1 = last, as PruMerge); cls_sim reads that layer's input")


@dataclass(frozen=True)
class ClsKneeParams(CutParams, _ScoreParams):
    """Score parameters first, then the shared cut parameters (dataclass fields follow the reverse MRO)."""


class ClsKnee(PruningStrategy):
    """Keep, per sample, the patches above the knee of the descending-sorted CLS-score curve.

    Follows the reference method's stage 1 as read in ``docs/reference-method.md``:

    1. score every patch against the CLS token at encoder ``layer`` (default: PruMerge's single-head
       CLS attention of the last layer, the score the authors' sibling code computes);
    2. sort each sample's scores descending and find the cut with ``cut`` (default Kneedle, S=1, offline,
       as ``kneed.KneeLocator(curve="convex", direction="decreasing")``); keep ``knee + 1`` tokens;
    3. no knee (flat, linear or too short curve) -> ``fallback``; then clamp to ``[min_keep, max_keep]``;
    4. keep the top-``count`` patches by score, in raster order; drop the rest (no merging).

    Budget: ``min_keep``/``max_keep``/``fallback_keep`` count visual tokens per image, each capped at the
    image's own tokens; with images of different sizes (``ctx.lengths``) the knee is found on each image's
    curve over its own tokens alone, so an image cuts as it would alone (docs/adapters.md).

    Choices the paper leaves open (each a parameter): the knee rule (``cut``, ``sensitivity``,
    ``online``), the similarity (``score``) and its layer (``layer``), the bounds and the fallback.
    Deviation: the paper reports no bounds or fallback; ``min_keep=16`` guards against the knee landing
    on the few high-norm artifact tokens that absorb CLS attention.

    Diagnostics: ``scores`` ``[B, N]``, ``knee`` (cut index, -1 none), ``raw_keep``, ``keep_count``,
    ``fallback``, ``clamped`` (each ``[B]``).
    """

    name = "cls_knee"
    stage = Stage.VISION
    ragged_vision = True
    Params = ClsKneeParams

    def requires(self) -> frozenset[Signal]:
        return frozenset({score_signal(self.params.score, self.params.layer)})

    def plan(self, ctx: VisionContext) -> VisionPlan:
        p = self.params
        scores = vision_scores(ctx.signals, p.score, p.layer)
        # images of different sizes: each curve is its own valid tokens only (padding is never a candidate)
        valid = None if ctx.lengths is None else ctx.token_valid
        decision = cut(
            scores,
            p.rule,
            candidates=valid,
            min_keep=p.min_keep,
            max_keep=p.max_keep,
            fallback=p.fallback,
            fallback_keep=p.fallback_keep,
        )
        keep = keep_top(scores, decision.counts, valid)
        return VisionPlan(keep=keep, diagnostics={"scores": scores, **decision.diagnostics()})
