"""``fastv``: FastV (Chen et al., arXiv 2403.06764), drop the image tokens least attended at layer K-1."""

from __future__ import annotations

from dataclasses import dataclass

from tokprune import LLMContext, LLMPlan, PruningStrategy, Stage, TokenRole, param
from tokprune.scoring import fixed_counts, keep_top

from ._llm import QuerySet, received


@dataclass(frozen=True)
class FastVParams:
    layer: int = param(2, "K: layers 0..K-1 see every token; scores from layer K-1's attention", ge=1)
    keep_ratio: float = param(0.5, "fraction of image tokens kept, round(n * keep_ratio) (1 - FastV's R)", gt=0, le=1)
    keep: int | None = param(None, "image tokens kept per sample (FastV's attention_rank); overrides keep_ratio", ge=1)
    query: QuerySet = param(
        "last", "query rows: last (reference code), question (QUESTION+PROTECTED, paper wording), all_text"
    )


class FastV(PruningStrategy):
    """Keep the image tokens that receive the most attention at layer K-1; drop the rest for layers >= K.

    Follows ``pkunlp-icler/FastV`` (``modeling_llama.py`` L730-762):

    1. take the attention probabilities of layer K-1 (here computed from its q/k), average over heads;
    2. ``query="last"``: the last token's row (the reference code); ``question``/``all_text``: the mean
       row over those query tokens, each position averaged over the queries that can see it (the paper
       says "average attention received from all other tokens");
    3. keep the top ``keep`` (or ``round(n_image * keep_ratio)``, at least 1) image tokens; every other
       token is kept. Positions are kept by the adapter (FastV: ``position_ids = keep``).

    Budget: counts are image tokens per sample, whatever the earlier stages left.

    Deviations: per sample (the reference takes batch item 0's scores for the whole batch and drops the
    padding mask), the image span comes from the roles (not ``fast_v_sys_length``), and scores come from
    q/k rather than from eager attention weights (same values).

    Diagnostics: ``scores`` ``[B, L]``, ``keep_count`` ``[B]``.
    """

    name = "fastv"
    stage = Stage.LLM
    Params = FastVParams

    def plan(self, ctx: LLMContext) -> LLMPlan:
        p = self.params
        scores = received(ctx, p.query)
        image = ctx.role_mask(TokenRole.IMAGE)
        counts = fixed_counts(image.sum(dim=1), p.keep, p.keep_ratio)
        keep = keep_top(scores, counts, image) | ~image
        return LLMPlan(keep=keep, diagnostics={"scores": scores, "keep_count": counts})
