"""``vispruner``: VisPruner (Zhang et al., ICCV 2025), important patches by CLS attention plus diverse ones
after near-duplicate removal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokprune import PruningStrategy, Signal, Stage, VisionContext, VisionPlan, param
from tokprune.scoring import fixed_counts, remove_duplicates


@dataclass(frozen=True)
class VisPrunerParams:
    keep: int | None = param(None, "patches kept per sample (the reference's visual_token_num); overrides keep_ratio", ge=1)
    keep_ratio: float = param(0.25, "fraction of patches kept, round(N * keep_ratio), at least 1", gt=0, le=1)
    important_ratio: float = param(
        0.5, "share of the budget filled by CLS attention, int(T * r); the rest is diverse (reference: 0.5)", ge=0, le=1
    )
    layer: int = param(-2, "encoder layer of the CLS attention (reference: attentions[-2], LLaVA's feature layer)")
    step: int = param(8, "duplicates removed per round of bipartite matching (reference: 8)", ge=1)


class VisPruner(PruningStrategy):
    """Keep patches by CLS attention, then fill the budget with diverse ones left after near-duplicate removal.

    ``int(T * important_ratio)`` patches by CLS attention; the rest of the budget ``T`` with the diverse
    patches left after removing near-duplicates among the others.

    Follows ``Theia-4869/VisPruner`` at ``aefa01adc7c7ce6334e880c88225e90cede760d1``,
    ``llava/model/llava_arch.py`` L141-187 (``encode_images``) and
    ``llava/model/multimodal_encoder/clip_encoder.py`` L36-52 (the CLS row of ``attentions[select_layer]``):

    1. head-mean CLS attention over the patches at encoder ``layer`` (``attentions[-2]``, from its q/k);
    2. important: the top ``T_imp = int(T * r)`` by attention; the others, in descending attention
       order, are the residual;
    3. residual thinning: alternately split into ``A``/``B``, drop the ``min(step, R - T_div)`` tokens of
       ``A`` most cosine-similar to some token of ``B``, repeat until ``T_div = T - T_imp`` remain
       (``tokprune.scoring.remove_duplicates``);
    4. keep important + residual survivors, in raster order.

    Budget: ``T`` = ``keep`` or ``round(N * keep_ratio)`` visual tokens per sample. Images of different
    sizes (``ctx.lengths``): per image, of its own tokens (``T`` of ``lengths[b]``, ``keep`` capped at it),
    ``int(T * important_ratio)`` of them by attention, the residual and its thinning within the image
    (docs/adapters.md).

    Deviations: the attention comes from the layer's q/k (same values as eager ``output_attentions``,
    which the reference needs and sdpa cannot give); ``argsort`` is stable here (ties to the lower
    index; the reference's is not). The reference crashes when the residual count is odd (its index
    ``expand(-1, R // 2 - r)`` does not match ``ceil(R / 2) - r`` tokens); here an odd split works.

    Diagnostics: ``scores`` ``[B, N]``, ``important`` ``[B, N]`` (the CLS-attention part),
    ``keep_count`` ``[B]``.
    """

    name = "vispruner"
    stage = Stage.VISION
    ragged_vision = True
    Params = VisPrunerParams

    def positions(self) -> Literal["compact"]:
        return "compact"  # the reference drops the pruned tokens before inserting the image: contiguous ids

    def requires(self) -> frozenset[Signal]:
        return frozenset({Signal("qk", self.params.layer)})

    def plan(self, ctx: VisionContext) -> VisionPlan:
        p = self.params
        b, n = ctx.features.shape[:2]
        device = ctx.features.device
        scores = ctx.signals.cls_attention(p.layer, heads="mean")
        if ctx.lengths is not None:
            return self._plan_ragged(ctx, scores)
        # one budget for the whole batch: every sample has N patches (an int, as the reference's T)
        total = int(fixed_counts(torch.tensor([n], device=device), p.keep, p.keep_ratio)[0])
        n_imp = int(total * p.important_ratio)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        important, residual = order[:, :n_imp], order[:, n_imp:]
        diverse = remove_duplicates(ctx.features, residual, total - n_imp, step=p.step)
        keep = torch.zeros(b, n, dtype=torch.bool, device=device)
        keep.scatter_(1, torch.cat([important, diverse], dim=1), True)
        important_mask = torch.zeros_like(keep).scatter_(1, important, True)
        return self._plan(scores, keep, important_mask)

    @staticmethod
    def _plan(scores: Tensor, keep: Tensor, important: Tensor) -> VisionPlan:
        diagnostics = {"scores": scores, "important": important, "keep_count": keep.sum(dim=1)}
        return VisionPlan(keep=keep, diagnostics=diagnostics)

    def _plan_ragged(self, ctx: VisionContext, scores: Tensor) -> VisionPlan:
        """Images of different sizes: each image's budget, ranking, residual and thinning of its own tokens,
        every step batched (row ``b``'s residual is its ranking past ``n_imp[b]``, gathered left-aligned)."""
        p = self.params
        b, n = ctx.features.shape[:2]
        device = ctx.features.device
        lengths, valid = ctx.token_counts, ctx.token_valid
        total = fixed_counts(lengths, p.keep, p.keep_ratio)  # [B]
        n_imp = torch.floor(total.double() * p.important_ratio).long()  # int(T * r) per image
        order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices
        slot = torch.arange(n, device=device)[None, :]
        important = torch.zeros(b, n + 1, dtype=torch.bool, device=device)
        important.scatter_(1, torch.where(slot < n_imp[:, None], order, n), True)
        residual = order.gather(1, (slot + n_imp[:, None]).clamp(max=n - 1))  # [B, N]: valid past lengths - n_imp
        diverse = remove_duplicates(ctx.features, residual, total - n_imp, step=p.step, lengths=lengths - n_imp)
        keep = important.clone()
        keep.scatter_(1, torch.where(diverse >= 0, diverse, n), True)
        return self._plan(scores, keep[:, :n], important[:, :n])
