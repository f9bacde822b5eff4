"""``dart``: DART (Wen et al., arXiv 2502.11494), keep the image tokens least similar to a few pivot tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokprune import LLMContext, LLMPlan, PruningStrategy, Stage, TokenRole, param
from tokprune.scoring import (
    fixed_counts,
    merge_mean,
    nearest_kept,
    norm_pivots,
    ragged_gather,
    similarity_to_pivots,
    topk_mask,
)

PivotOrder = Literal["position", "norm"]


@dataclass(frozen=True)
class DartParams:
    layer: int = param(2, "K: prune before decoder layer K; keys of layer K-1, hidden states entering K", ge=1)
    keep_ratio: float = param(0.25, "fraction of image tokens kept, round(n * keep_ratio), at least 1", gt=0, le=1)
    keep: int | None = param(None, "image tokens kept per sample (pivots included); overrides keep_ratio", ge=1)
    pivot_image: int = param(4, "image pivots: the image tokens with the largest key L1 norm (kept)", ge=1)
    pivot_text: int = param(4, "text pivots: the tokens after the image with the largest key L1 norm (not dropped)", ge=0)
    pivot_order: PivotOrder = param(
        "position", "order the pivots take their picks in: position (sequence order) or norm (largest key norm first)"
    )
    merge: bool = param(
        False,
        "our extension: fold every dropped image token into its most similar kept image token (mean of the "
        "hidden states entering layer K) instead of discarding it",
    )


def _ordered_pivots(pivots: Tensor, norms: Tensor, order: PivotOrder) -> tuple[Tensor, Tensor]:
    """Pivot positions ``[B, P]`` in the order they pick and their validity ``[B, P]``."""
    _, valid, index = ragged_gather(pivots[..., None], pivots)  # positions in sequence order, left-aligned
    index = index.clamp_min(0)
    if order == "norm":
        key = norms.gather(1, index).masked_fill(~valid, float("-inf"))
        rank = torch.sort(key, dim=1, descending=True, stable=True).indices
        index, valid = index.gather(1, rank), valid.gather(1, rank)
    return index, valid


class Dart(PruningStrategy):
    """Before decoder layer K, keep the image pivots and, for each pivot, the image tokens least similar to it.

    Follows ``ZichenWen1/DART`` as snapshotted in the fork ``xqy1111111/DART`` at
    ``0247657060a42dd329d6f273455bfad05d5b2c74``, ``llava/model/language_model/modeling_llama_self.py``
    L20-74 (``get_retained_image_token``) and its call in ``DART_K_norm.forward`` (``K=2``, 4 + 4 pivots,
    ``max_num_trunction=128``; the original repository has no snapshot here):

    1. pivots: the ``pivot_image`` image tokens and the ``pivot_text`` tokens *after* the image with the
       largest L1 norm of their keys at layer K-1 (heads concatenated);
    2. each pivot in turn takes its quota of the not-yet-taken, non-pivot image tokens with the lowest
       cosine similarity of their hidden states (entering layer K) to its own;
    3. keep the image pivots and every token taken; text pivots are not dropped (text never is).

    No attention weights: keys and hidden states only, so it works under sdpa/FlashAttention.

    Budget: ``T = keep`` or ``round(n * keep_ratio)`` image tokens per sample, pivots included (n = image
    tokens present); ``T - pivots`` picks are shared by the pivots, ``floor`` each, the remainder one
    more each to the first pivots.

    Deviations: the reference keeps ``pivot_image + P * (max_num_trunction // P)`` tokens (132 for 128:
    its budget excludes the pivots and rounds down per pivot); here exactly ``T`` (``keep=132`` is the
    reference's 128 setting). The reference compares ``norm(h)`` (the LM's final RMSNorm, weights
    included); the context carries the hidden states before any norm, and the per-channel RMSNorm
    weight changes cosines. The reference walks its pivots in Python ``set`` order (a hashing
    artefact); ``pivot_order`` makes the order explicit. Keys have RoPE applied (as the adapter captures
    them; DART's hack returns the layer's cached keys). Per sample (the reference reads batch item 0).
    A pivot whose quota exceeds what is left takes what is left (the reference's ``topk`` raises).

    ``merge=true`` is our extension (DART does not merge): every dropped image token is folded into its
    most cosine-similar kept image token, the kept token's state entering layer K becoming the mean
    (``LLMPlan.hidden``; ``scoring.nearest_kept`` decides, ``scoring.merge_mean`` applies).

    Diagnostics: ``pivots`` ``[B, L]`` (image and text pivots), ``keep_count`` ``[B]``; with ``merge=true``,
    ``merge_target`` ``[B, L]`` (where each dropped image token was folded; moved into ``stats.kept.merges``).
    """

    name = "dart"
    stage = Stage.LLM
    Params = DartParams

    def plan(self, ctx: LLMContext) -> LLMPlan:
        p = self.params
        b, n = ctx.roles.shape
        image = ctx.role_mask(TokenRole.IMAGE)
        counts = fixed_counts(image.sum(dim=1), p.keep, p.keep_ratio)
        position = torch.arange(n, device=image.device)[None, :]
        last_image = torch.where(image, position, torch.full_like(position, -1)).amax(dim=1, keepdim=True)
        after_image = ctx.valid & ~image & (position > last_image) & (last_image >= 0)
        k = ctx.attention.k  # [B, Hkv, L, D]
        keys = k.permute(0, 2, 1, 3).reshape(b, n, -1)
        image_pivots = norm_pivots(keys, torch.clamp(counts, max=p.pivot_image), image)
        text_pivots = norm_pivots(keys, p.pivot_text, after_image) if p.pivot_text else torch.zeros_like(image)
        norms = keys.float().abs().sum(dim=-1)
        index, valid = _ordered_pivots(image_pivots | text_pivots, norms, p.pivot_order)
        # quotas: the picks left after the image pivots, shared evenly, the remainder to the first pivots
        n_pivots = valid.sum(dim=1)
        picks = counts - image_pivots.sum(dim=1)
        slot = torch.arange(index.shape[1], device=index.device)[None, :]
        share = torch.div(picks, n_pivots.clamp_min(1), rounding_mode="floor")
        quota = (share[:, None] + (slot < (picks - share * n_pivots)[:, None]).long()) * valid.long()
        similarity = similarity_to_pivots(ctx.hidden, index, valid)  # [B, P, L]
        taken = image_pivots.clone()
        pool = image & ~image_pivots
        for t in range(index.shape[1]):  # a handful of pivots; each step is batched over B and L
            pick = topk_mask((-similarity[:, t]).masked_fill(~pool, float("-inf")), quota[:, t]) & pool
            taken |= pick
            pool &= ~pick
        keep = taken | ~image
        hidden = None
        diagnostics = {"pivots": image_pivots | text_pivots, "keep_count": (taken & image).sum(dim=1)}
        if p.merge:
            target = nearest_kept(ctx.hidden, keep, image)
            hidden = merge_mean(ctx.hidden, target)
            diagnostics["merge_target"] = target  # where each dropped token went (stats.kept.merges)
        return LLMPlan(keep=keep, diagnostics=diagnostics, hidden=hidden)
