"""``text_interact``: stage 2 of the reference method (arXiv 2409.01162), an in-LLM cut of the image and
question tokens with low text correlation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tokprune import LLMContext, LLMPlan, PruningStrategy, Stage, TokenRole, param
from tokprune.scoring import CutParams, FallbackName, cut, keep_top, ratio_bounds

from ._llm import QuerySet, query_similarity, received

Candidates = Literal["image+text", "image"]
ScoreName = Literal["attention", "cosine"]


@dataclass(frozen=True)
class _QueryParams:
    layer: int = param(2, "prune before decoder layer K; scores come from the attention of layer K-1", ge=1)
    query: QuerySet = param(
        "question", "query rows: question (QUESTION+PROTECTED), last (last prompt token), all_text (every text token)"
    )
    candidates: Candidates = param("image+text", "tokens that may be cut: image+text (image and question) or image")
    score: ScoreName = param(
        "attention",
        "text correlation: attention (received from the query rows at layer K-1) or cosine (hidden state "
        "entering layer K vs the mean query hidden state)",
    )


@dataclass(frozen=True)
class TextInteractParams(CutParams, _QueryParams):
    """Layer and query parameters first, then the shared cut parameters, then the ratio bounds."""

    min_keep_ratio: float = param(0.0, "keep at least this fraction of the candidates (with min_keep)", ge=0, le=1)
    max_keep_ratio: float = param(1.0, "keep at most this fraction of the candidates (with max_keep)", gt=0, le=1)
    fallback: FallbackName = param("all", "when the rule finds no cut: all (no pruning), fixed (fallback_keep) or min")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_keep_ratio > self.max_keep_ratio:
            raise ValueError(f"min_keep_ratio={self.min_keep_ratio} must be <= max_keep_ratio={self.max_keep_ratio}")


class TextInteract(PruningStrategy):
    """Before decoder layer K, drop the image and question tokens the question attends to least.

    Follows the reference method's stage 2 as read in ``docs/reference-method.md``:

    1. query rows ``query`` (default: the question tokens and the last prompt token) attend at layer K-1;
       each position's score is their head-mean attention to it, averaged over the queries that can
       *see* it (causal normalisation: a plain sum would favour early tokens, visible to more queries).
       ``score=cosine`` (the ablation docs/reference-method.md names) scores instead the cosine similarity of each
       hidden state entering layer K to the mean hidden state of the query rows;
    2. the candidates (``image+text``: IMAGE and QUESTION positions; ``image``: IMAGE only) are cut at the
       knee of their descending-sorted scores (``cut``, same rules and fallback as ``cls_knee``);
    3. the count is clamped to ``[max(min_keep, ceil(min_keep_ratio * n)), min(max_keep, floor(max_keep_ratio
       * n))]`` (n = candidates in the sample, upper bound at least 1); the top candidates are kept.

    Template, protected and padding positions are never candidates and the base class keeps them.
    ``drops_text = True``: the reference stage 2 "filters visual and textual tokens with low text
    correlation". Query tokens that are candidates include their attention to themselves in their score.

    Budget: counts are candidates per sample (image + question tokens, or image only).

    Deviations / choices (the paper is silent): K=2 (FastV's default), the query set, causal mean
    normalisation, the candidates and the bounds are parameters; fallback ``all`` = no pruning at
    this layer when the curve has no knee. Rows with different candidate counts are cut in one batched
    call, each at its own length (a curve's knee depends on its length).

    Diagnostics: ``scores`` ``[B, L]``, ``candidates`` ``[B, L]``, ``knee``, ``raw_keep``, ``keep_count``,
    ``fallback``, ``clamped`` (``[B]``).
    """

    name = "text_interact"
    stage = Stage.LLM
    Params = TextInteractParams
    drops_text = True

    def plan(self, ctx: LLMContext) -> LLMPlan:
        p = self.params
        scores = received(ctx, p.query) if p.score == "attention" else query_similarity(ctx, p.query)
        roles = (TokenRole.IMAGE, TokenRole.QUESTION) if p.candidates == "image+text" else (TokenRole.IMAGE,)
        candidates = ctx.role_mask(*roles)
        n = candidates.sum(dim=1)
        lo, hi = ratio_bounds(n, p.min_keep_ratio, p.max_keep_ratio)
        hi = torch.maximum(hi, torch.clamp(n, max=1))
        if p.max_keep is not None:
            hi = torch.clamp(hi, max=p.max_keep)
        lo = torch.clamp(lo, min=p.min_keep)
        decision = cut(
            scores, p.rule, candidates=candidates, min_keep=lo, max_keep=hi, fallback=p.fallback,
            fallback_keep=p.fallback_keep,
        )
        keep = keep_top(scores, decision.counts, candidates) | ~candidates
        return LLMPlan(keep=keep, diagnostics={"scores": scores, "candidates": candidates, **decision.diagnostics()})
