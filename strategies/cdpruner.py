"""``cdpruner``: CDPruner (Zhang et al., NeurIPS 2025), a conditional DPP over the patches, greedy MAP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokprune import PruningStrategy, Signal, Stage, VisionContext, VisionPlan, param
from tokprune.scoring import dpp_greedy_map, fixed_counts, pairwise_cosine

Relevance = Literal["cls", "uniform"]


@dataclass(frozen=True)
class CDPrunerParams:
    keep: int | None = param(None, "patches kept per sample (the reference's visual_token_num); overrides keep_ratio", ge=1)
    keep_ratio: float = param(0.25, "fraction of patches kept, round(N * keep_ratio), at least 1", gt=0, le=1)
    relevance: Relevance = param(
        "cls",
        "the DPP's condition: cls (head-mean CLS attention at `layer`, instruction-agnostic; the vision stage "
        "has no instruction) or uniform (r = 1: a plain DPP over similarity)",
    )
    layer: int = param(-2, "encoder layer of the CLS attention (relevance=cls)")
    theta: float | None = param(
        None,
        "relevance weight: r -> exp(theta / (2 (1 - theta)) * r), the reference's commented-out option; none = r as is",
        ge=0,
        lt=1,
    )


def normalised_relevance(raw: Tensor, theta: float | None, valid: Tensor | None = None) -> Tensor:
    """Per-sample min-max scaling ``(r - min + 1e-6) / (max - min)`` (fp32 ``[B, N]``), then the optional
    ``exp(alpha * r)`` with ``alpha = theta / (2 (1 - theta))``. A constant row becomes all ones.
    ``valid`` (bool ``[B, N]``, images of different sizes): min and max over each row's valid entries
    only (padding's values are then meaningless); None = every entry."""
    if valid is None:
        lo = raw.amin(dim=1, keepdim=True)
        hi = raw.amax(dim=1, keepdim=True)
    else:
        lo = raw.masked_fill(~valid, float("inf")).amin(dim=1, keepdim=True)
        hi = raw.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True)
    span = hi - lo
    r = torch.where(span > 0, (raw - lo + 1e-6) / span.clamp_min(1e-12), torch.ones_like(raw))
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


class CDPruner(PruningStrategy):
    """Keep the greedy MAP of a conditional DPP over the patches: relevance times cosine similarity.

    The kernel is ``L = diag(r) S diag(r)``: cosine similarity ``S`` for diversity, relevance ``r`` as the
    condition; ``keep`` (or ``round(N * keep_ratio)``) patches are kept.

    Follows ``Theia-4869/CDPruner`` at ``9541616c40fcd5625de1cdb8ea6c33c129eb7864``,
    ``llava/model/llava_arch.py`` L141-187 (``encode_images``):

    1. ``S = cos(x_i, x_j)`` over the visual tokens (L150-153);
    2. relevance ``r``: the reference uses the instruction: minus the mean cosine between each patch's
       CLIP image embedding and the instruction's CLIP text embeddings, min-max scaled (L155-160);
    3. ``L = r_i S_ij r_j`` (L162-167; optionally ``r -> exp(alpha r)``, ``alpha = theta / (2 (1 - theta))``,
       the reference's commented-out knob, here ``theta``);
    4. fast greedy MAP inference with the incremental Cholesky update (L169-182,
       ``tokprune.scoring.dpp_greedy_map``); keep the picks in raster order.

    **The condition is a choice here.** The vision stage sees the image only: no instruction, no CLIP
    text tower (LLaVA ships none), so step 2 cannot be reproduced. ``relevance`` says what stands in:
    ``cls`` (default) scales each patch by the tower's own head-mean CLS attention at ``layer``
    (instruction-agnostic importance, min-max scaled per sample like the reference's relevance);
    ``uniform`` is the unconditional DPP (the paper's "w/o relevance" ablation).

    Budget: counts are visual tokens per image; images of different sizes (``ctx.lengths``): ``keep_ratio``
    of each image's own tokens, ``keep`` capped at them, the relevance scaled over them and the DPP's
    candidates are them (padding is never picked), see docs/adapters.md.

    Other deviations: ``S`` is taken on the tower's features before the projector (the reference: after
    it); min-max scaling is per sample (the reference pools min and max over the batch); a constant
    relevance row is all ones (the reference divides by zero); once the kernel's rank is exhausted the
    remaining picks follow the residual gains instead of NaN (see ``dpp_greedy_map``).

    Diagnostics: ``relevance`` ``[B, N]``, ``order`` ``[B, K]`` (picks in selection order), ``keep_count``.
    """

    name = "cdpruner"
    stage = Stage.VISION
    ragged_vision = True
    Params = CDPrunerParams

    def requires(self) -> frozenset[Signal]:
        return frozenset({Signal("qk", self.params.layer)}) if self.params.relevance == "cls" else frozenset()

    def plan(self, ctx: VisionContext) -> VisionPlan:
        p = self.params
        b, n = ctx.features.shape[:2]
        device = ctx.features.device
        similarity = pairwise_cosine(ctx.features)  # [B, N, N]
        if p.relevance == "cls":
            raw = ctx.signals.cls_attention(p.layer, heads="mean").to(similarity.dtype)
        else:
            raw = torch.ones(b, n, dtype=similarity.dtype, device=device)
        valid = None if ctx.lengths is None else ctx.token_valid  # images of different sizes
        r = normalised_relevance(raw, p.theta, valid)
        kernel = r[:, :, None] * similarity * r[:, None, :]
        counts = fixed_counts(ctx.token_counts, p.keep, p.keep_ratio)
        keep, order = dpp_greedy_map(kernel, counts, valid)
        return VisionPlan(keep=keep, diagnostics={"relevance": r, "order": order, "keep_count": counts})
