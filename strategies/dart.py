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

PivotOrder = Literal["set", "position", "norm"]
Norm = Literal["final", "raw"]


@dataclass(frozen=True)
class DartParams:
    layer: int = param(2, "K: prune before decoder layer K; keys of layer K-1, hidden states entering K", ge=1)
    keep_ratio: float = param(0.25, "fraction of image tokens kept, round(n * keep_ratio), at least 1", gt=0, le=1)
    keep: int | None = param(None, "image tokens kept per sample (pivots included); overrides keep_ratio", ge=1)
    pivot_image: int = param(4, "image pivots: the image tokens with the largest key L1 norm (kept)", ge=1)
    pivot_text: int = param(
        4, "text pivots: the tokens after the image with the largest key L1 norm (not dropped)", ge=0
    )
    pivot_order: PivotOrder = param(
        "set",
        "order the pivots take their picks in: set (the reference's: Python's set iteration order over the "
        "pivots' sequence indices), position (sequence order) or norm (largest key norm first)",
    )
    norm: Norm = param(
        "final",
        "the states the cosines compare: final (the LM's final norm applied, weights included: the reference's "
        "norm(h)) or raw (the hidden states entering layer K)",
    )
    merge: bool = param(
        False,
        "our extension: fold every dropped image token into its most similar kept image token (mean of the "
        "hidden states entering layer K) instead of discarding it",
    )


def _set_order(image_pivots: Tensor, text_pivots: Tensor, norms: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """The reference's walk: ``list(set(image_indices + query_indices))``, each list in descending key norm
    (``topk``), over the pivots' indices in the unpadded sequence. Returns positions ``[B, P]`` (-1 padded)
    in that order and their validity.

    The order is CPython's set iteration order, a hashing artefact of small ints (deterministic for a
    CPython version): it is reproduced by running Python's own ``set`` on the same list, a host-side loop
    over the batch's few pivots per sample.
    """
    seq_index = (valid.long().cumsum(dim=1) - 1).tolist()  # index in the sample's own, unpadded sequence
    walks = []
    for b, row in enumerate(seq_index):
        listed = []
        for mask in (image_pivots[b], text_pivots[b]):
            where = mask.nonzero().flatten()
            listed += where[norms[b, where].argsort(descending=True, stable=True)].tolist()
        back = {row[i]: i for i in listed}
        # a set built from a list (not a dict: set(dict) presizes its table), then copied, as the reference does
        walks.append([back[i] for i in set(list(back)).copy()])
    width = max(1, max(len(w) for w in walks))
    index = torch.tensor([w + [-1] * (width - len(w)) for w in walks], dtype=torch.long, device=norms.device)
    return index.clamp_min(0), index >= 0


def _ordered_pivots(pivots: Tensor, norms: Tensor, order: PivotOrder) -> tuple[Tensor, Tensor]:
    """Pivot positions ``[B, P]`` in the order they pick and their validity ``[B, P]`` (``position``/``norm``)."""
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
    L18-74 (``get_retained_image_token``) and its call in ``DART_K_norm.forward`` L197-214
    (``last_layer_state = self.norm(layer_outputs[0])`` at L200-201, ``position_ids = keep_indexs`` at
    L214; ``K=2``, 4 + 4 pivots, ``max_num_trunction=128``; the original repository has no snapshot here):

    1. pivots: the ``pivot_image`` image tokens and the ``pivot_text`` tokens *after* the image with the
       largest L1 norm of their keys at layer K-1 (heads concatenated);
    2. each pivot in turn takes its quota of the not-yet-taken, non-pivot image tokens with the lowest
       cosine similarity of their hidden states (entering layer K, through the LM's final norm) to its own;
    3. keep the image pivots and every token taken; text pivots are not dropped (text never is).

    No attention weights: keys and hidden states only, so it works under sdpa/FlashAttention.

    Budget: ``T = keep`` or ``round(n * keep_ratio)`` image tokens per sample, pivots included (n = image
    tokens present); ``T - pivots`` picks are shared by the pivots, ``floor`` each, the remainder one
    more each to the first pivots.

    The reference's computation, and the switches (default = the reference's choice):

    ==================  ==========================================  ===========================
    what                reference                                   switch
    ==================  ==========================================  ===========================
    compared states     ``norm(h)``: the LM's final RMSNorm         ``norm=final|raw``
    pivot keys          layer K-1's cached keys, RoPE at 0..n-1     (keys from each sample's start)
    pivot walk order    Python ``set`` order (hashing), L52-53      ``pivot_order=set|position|norm``
    positions           original ids kept (``keep_indexs``)         adapter ``llm_positions=keep``
    ==================  ==========================================  ===========================

    The pivot keys are rotated at each sample's positions counted from its first token
    (``LLMAttention.keys_from_start``), which is what the reference (one unpadded sample, positions from
    0) computes; keys rotated at left-padding-shifted positions would change their L1 norms (RoPE keeps
    L2 norms, not L1), and with them a sample's pivots, between a padded batch and the sample alone.

    Other deviations: the reference keeps ``pivot_image + P * (max_num_trunction // P)`` tokens (132 for
    128: its budget excludes the pivots and rounds down per pivot); here exactly ``T`` (``keep=132`` is
    the reference's 128 setting). Per sample (the reference reads batch item 0). A pivot whose quota
    exceeds what is left takes what is left (the reference's ``topk`` raises).

    ``merge=true`` is our extension (DART does not merge): every dropped image token is folded into its
    most cosine-similar kept image token, the kept token's state entering layer K becoming the mean
    (``LLMPlan.hidden``; ``scoring.nearest_kept`` decides, ``scoring.merge_mean`` applies).

    Diagnostics: ``pivots`` ``[B, L]`` (image and text pivots), ``keep_count`` ``[B]``.
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
        k = ctx.attention.keys_from_start()  # [B, Hkv, L, D], as each sample alone has them
        keys = k.permute(0, 2, 1, 3).reshape(b, n, -1)
        image_pivots = norm_pivots(keys, torch.clamp(counts, max=p.pivot_image), image)
        text_pivots = norm_pivots(keys, p.pivot_text, after_image) if p.pivot_text else torch.zeros_like(image)
        norms = keys.float().abs().sum(dim=-1)
        if p.pivot_order == "set":
            index, valid = _set_order(image_pivots, text_pivots, norms, ctx.valid)
        else:
            index, valid = _ordered_pivots(image_pivots | text_pivots, norms, p.pivot_order)
        # quotas: the picks left after the image pivots, shared evenly, the remainder to the first pivots
        n_pivots = valid.sum(dim=1)
        picks = counts - image_pivots.sum(dim=1)
        slot = torch.arange(index.shape[1], device=index.device)[None, :]
        share = torch.div(picks, n_pivots.clamp_min(1), rounding_mode="floor")
        quota = (share[:, None] + (slot < (picks - share * n_pivots)[:, None]).long()) * valid.long()
        states = ctx.normed_hidden() if p.norm == "final" else ctx.hidden
        similarity = similarity_to_pivots(states, index, valid)  # [B, P, L]
        taken = image_pivots.clone()
        pool = image & ~image_pivots
        for t in range(index.shape[1]):  # a handful of pivots; each step is batched over B and L
            pick = topk_mask((-similarity[:, t]).masked_fill(~pool, float("-inf")), quota[:, t]) & pool
            taken |= pick
            pool &= ~pick
        keep = taken | ~image
        hidden = None
        if p.merge:
            hidden = merge_mean(ctx.hidden, nearest_kept(ctx.hidden, keep, image))
        diagnostics = {"pivots": image_pivots | text_pivots, "keep_count": (taken & image).sum(dim=1)}
        return LLMPlan(keep=keep, diagnostics=diagnostics, hidden=hidden)
