"""``divprune``: DivPrune (Alvar et al., CVPR 2025), a greedy max-min diverse subset of the patches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tokprune import PruningStrategy, Stage, VisionContext, VisionPlan, param
from tokprune.scoring import fixed_counts, max_min_diversity

Features = Literal["projected", "encoder"]


@dataclass(frozen=True)
class DivPruneParams:
    keep: int | None = param(None, "patches kept per sample; overrides keep_ratio", ge=1)
    keep_ratio: float = param(
        0.098, "fraction of patches kept, round(N * keep_ratio), at least 1 (reference SUBSET_RATIO=0.098)", gt=0, le=1
    )
    features: Features = param(
        "projected",
        "where the distances are taken: projected (the tokens the LLM receives, after the projector: the "
        "reference) or encoder (the tower's features before the projector)",
    )


class DivPrune(PruningStrategy):
    """Keep the most diverse ``keep`` (or ``round(N * keep_ratio)``) patches: greedy max-min on cosine distance.

    Follows ``vbdi/divprune`` at ``799e2d950aa01ba7860907f5a6d86061f885dca6``,
    ``LLaVA/llava/model/llava_arch.py`` L147-171 (``DivPrune``) and L352-383 (the call):

    1. ``d(i, j) = 1 - cos(x_i, x_j)`` between every pair of visual tokens;
    2. first pick: the token whose distance to its nearest other token is largest (the reference's
       second-smallest entry of each column, the smallest being the token itself);
    3. each next pick: the token whose distance to the nearest already-picked token is largest;
    4. ``round(N * SUBSET_RATIO)`` picks, kept in raster order (the reference sorts the kept indices).

    No attention weights and no encoder signal: it works under any attention implementation.

    Budget: counts are visual tokens per image (``keep_ratio=0.098`` keeps 56 of 576, the reference's
    LLaVA-1.5 setting); of each image's own tokens when images differ in size (docs/adapters.md).

    The reference's computation, and the switches (default = the reference's choice):

    ==================  ==========================================  ============================
    what                reference                                   switch
    ==================  ==========================================  ============================
    features            projected tokens (``new_input_embeds``,     ``features=projected|encoder``
                        after ``mm_projector``, L143 and L374)
    budget              ``round(N * SUBSET_RATIO)``                 ``keep_ratio`` / ``keep``
    positions           contiguous (``position_ids`` None, L349)    ``vision_positions="keep"``
    ==================  ==========================================  ============================

    Deviations: the reference prunes batch item 0's slice only (``new_input_embeds[0]``, a hard-coded ``SYS_TOKEN_LEN=35``);
    here every sample is pruned on its own tokens. Step 2 excludes the token itself explicitly; the
    reference relies on ``1 - cos(x, x)`` being the column's smallest entry, which rounding can break.
    Ties (a mutual-nearest pair always ties in step 2) go to the lower index.

    Diagnostics: ``keep_count`` ``[B]``, ``order`` ``[B, K]`` (picks in selection order, -1 padded).
    """

    name = "divprune"
    stage = Stage.VISION
    ragged_vision = True
    Params = DivPruneParams

    def positions(self) -> Literal["compact"]:
        return "compact"  # the reference prunes new_input_embeds with position_ids None: renumbered (L349-350)

    def plan(self, ctx: VisionContext) -> VisionPlan:
        p = self.params
        counts = fixed_counts(ctx.token_counts, p.keep, p.keep_ratio)  # of each image's own tokens
        x = ctx.projected() if p.features == "projected" else ctx.features
        keep, order = max_min_diversity(x, counts, ctx.token_valid)  # padding is never a candidate
        return VisionPlan(keep=keep, diagnostics={"keep_count": counts, "order": order})
