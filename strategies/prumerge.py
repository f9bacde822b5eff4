"""``prumerge``: LLaVA-PruMerge (Shang et al., arXiv 2403.15388), IQR-adaptive selection plus key-similarity
merging and one extra global token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokprune import PruningStrategy, Signal, Stage, VisionContext, VisionPlan, param, scoring

from ._vision import ScoreSource, score_signal, vision_scores


@dataclass(frozen=True)
class PruMergeParams:
    score: ScoreSource = param(
        "cls_attn",
        "CLS score ranking, fencing and weighting the merge: cls_attn (the reference's single-head surrogate), "
        "cls_attn_mean (head mean), cls_sim (cosine)",
    )
    layer: int = param(-1, "encoder layer of the q/k for CLS attention and merge keys (reference: -1, the last)")
    iqr_factor: float = param(1.5, "IQR fence Q3 + factor * IQR; kept = high outliers of the CLS attention", gt=0)
    k_neighbors: int = param(32, "each kept token absorbs its k most key-similar other tokens", ge=1)
    min_keep: int = param(1, "keep at least this many outliers per sample (the reference may keep 0)", ge=1)


class PruMerge(PruningStrategy):
    """Keep the IQR outliers of the CLS attention, merge every token into its key-nearest kept tokens, and
    append one global token built from the pruned ones.

    Follows ``42Shawn/LLaVA-PruMerge`` ``clip_encoder.py::token_prune_merge_advanced`` (L85-171;
    the IQR rule ``outlier_dectection`` L34-47):

    1. ``a = softmax(q_cls . k^T / sqrt(C))[1:]``: single-head surrogate from the full-width q/k of encoder
       ``layer`` (default the last), ``[B, N]``; ``score`` swaps in another CLS score (the head mean, or the
       cosine), which then also weights the merge;
    2. kept count = number of ``a > Q3 + 1.5 IQR`` (NumPy-style linear quartiles); keep the top ones;
    3. each kept token ``i``: ``x_i + sum_{j in top-k by key cosine, j != i} a_j x_j`` over *all* other
       tokens (kept or not), weights unnormalised, clusters may overlap;
    4. extra token ``sum_{j pruned} a_j x_j`` (``VisionPlan.extra``, ``[B, 1, C]``).

    Budget: kept visual tokens per image = outliers (at least ``min_keep``) + 1 extra token. Images of
    different sizes (``ctx.lengths``): the IQR fence is each image's own, ``min_keep`` is capped at its
    tokens, and the merge's neighbours and the extra token's pruned tokens are its own (docs/adapters.md).

    Deviations, each deliberate:
    * per sample: the reference pools the IQR statistics over the flattened batch (B=1 assumed);
    * ``min_keep`` (default 1) where there is no outlier: the reference then keeps 0 tokens (only the extra
      token survives);
    * the count is the exact outlier count; the reference's ``int(N * (count / N))`` can round one down;
    * output in raster order: the reference emits tokens in descending-attention order. Kept tokens keep
      their original raster positions here, so an adapter can keep position ids and 2-D layout;
    * ``k_neighbors`` is capped at ``N - 1`` (the reference's ``topk`` fails on fewer than 33 tokens).

    Diagnostics: ``scores`` ``[B, N]`` (the chosen ``score``), ``outliers`` ``[B]`` (before ``min_keep``),
    ``keep_count`` ``[B]``.
    """

    name = "prumerge"
    stage = Stage.VISION
    ragged_vision = True
    Params = PruMergeParams

    def positions(self) -> Literal["compact"]:
        return "compact"  # the reference returns a shorter image block to the LLM: contiguous ids

    def requires(self) -> frozenset[Signal]:
        # The merge always needs the layer's keys; the score may read another signal.
        return frozenset({Signal("qk", self.params.layer), score_signal(self.params.score, self.params.layer)})

    def select(
        self, scores: Tensor, outliers: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Kept tokens, bool ``[B, N]``, given ``outliers`` ``[B]`` (already at least ``min_keep``), each
        image's valid tokens (bool ``[B, N]``; None = every token), and extra diagnostics."""
        return scoring.keep_top(scores, outliers, valid), {}

    def plan(self, ctx: VisionContext) -> VisionPlan:
        p = self.params
        # images of different sizes: fence, count, keep and merge within each image's own tokens
        lengths, valid = ctx.lengths, None if ctx.lengths is None else ctx.token_valid
        n = ctx.token_counts
        scores = vision_scores(ctx.signals, p.score, p.layer)
        outliers = scoring.iqr_outlier_count(scores, factor=p.iqr_factor, lengths=lengths).long()
        counts = torch.minimum(torch.maximum(outliers, torch.clamp(n, max=p.min_keep)), n)
        keep, extra_diagnostics = self.select(scores, counts, valid)
        keys = ctx.signals.patch_keys(p.layer)
        features = scoring.prumerge_merge(ctx.features, keys, scores, keep, k_neighbors=p.k_neighbors, valid=valid)
        extra = scoring.prumerge_extra_token(ctx.features, scores, keep, valid=valid)[:, None, :]
        diagnostics = {"scores": scores, "outliers": outliers, "keep_count": keep.sum(dim=1), **extra_diagnostics}
        return VisionPlan(keep=keep, features=features, extra=extra, diagnostics=diagnostics)
