"""``evs``: Efficient Video Sampling (Bagrov et al., arXiv 2510.14624), the video pruning vLLM and SGLang ship."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokprune import FrameLayout, PruningStrategy, Stage, VisionContext, VisionPlan, param

#: The score vLLM gives first-frame tokens: above any ``1 - cos`` (at most 2), so the first frame is kept whole.
FIRST_FRAME_SCORE = 255.0


@dataclass(frozen=True)
class EVSParams:
    keep: int | None = param(None, "tokens kept per video (at least its first frame's); overrides keep_ratio", ge=1)
    keep_ratio: float = param(
        0.25,
        "fraction of each video's tokens kept, floor(N * keep_ratio) (vLLM: int(N * (1 - video_pruning_rate))), "
        "at least the first frame's tokens",
        gt=0,
        le=1,
    )


def evs_scores(features: Tensor, frames: FrameLayout, valid: Tensor) -> Tensor:
    """fp32 ``[B, N]``: each token's dissimilarity ``1 - cos`` to the token at its position in the previous
    frame; :data:`FIRST_FRAME_SCORE` on the first frame, ``-inf`` at padding (``valid`` bool ``[B, N]``)."""
    b, n, _ = features.shape
    per = frames.tokens_per_frame.to(features.device)
    index = torch.arange(n, device=features.device)[None, :]
    previous = index - per[:, None]  # the same spatial position one frame earlier
    x = features.float()
    before = torch.take_along_dim(x, previous.clamp_min(0)[..., None], dim=1)
    dissimilarity = 1 - torch.nn.functional.cosine_similarity(x, before, dim=-1)
    scores = torch.where(previous >= 0, dissimilarity, torch.full_like(dissimilarity, FIRST_FRAME_SCORE))
    return scores.masked_fill(~valid, float("-inf"))


def evs_counts(tokens: Tensor, per_frame: Tensor, keep: int | None, keep_ratio: float) -> Tensor:
    """long ``[B]``: tokens kept per video of ``tokens`` (long ``[B]``), frames of ``per_frame`` tokens:
    ``max(per_frame, floor(tokens * keep_ratio))`` (vLLM's ``compute_retained_tokens_count``), or
    ``max(per_frame, min(keep, tokens))``."""
    if keep is not None:
        wanted = tokens.clamp(max=keep)
    else:
        wanted = torch.floor(tokens.double() * keep_ratio).long()
    return torch.maximum(wanted, per_frame.to(wanted)).minimum(tokens)


def top_stable(scores: Tensor, counts: Tensor) -> Tensor:
    """bool ``[B, N]``: the ``counts[b]`` highest scores of each row, ties to the lower index (a stable
    descending sort, as vLLM's ``argsort(..., descending=True, stable=True)``)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranked = torch.arange(scores.shape[1], device=scores.device)[None, :] < counts[:, None]
    return torch.zeros_like(ranked).scatter(1, order, ranked)


class EVS(PruningStrategy):
    """Keep a video's tokens that changed most since the previous frame; the first frame whole.

    Follows vLLM's ``vllm/multimodal/evs.py`` at ``094f117823287790739d3022162a3f30f13d758b``
    (``compute_retention_mask`` L39-93: scores L71-79, top-k L81-86; ``compute_retained_tokens_count``
    L17-36), the rule SGLang also ships:

    1. per token of frame ``t >= 1``: ``d = 1 - cos(x_t[p], x_{t-1}[p])``, the same spatial position ``p``
       in the previous frame, on the merged tokens the LLM receives (after Qwen's patch merger);
    2. every first-frame token scores 255 (above any ``d``), so the first frame is kept whole;
    3. a global top-k over the whole video by score, ``k = max(tokens_per_frame, int(N * (1 - q)))``
       with ``q = 1 - keep_ratio``, ties to the lower index (stable sort); kept tokens stay in raster order
       and keep their M-RoPE positions (vLLM's ``recompute_mrope_positions`` restores the originals).

    A "frame" is a temporal patch group (Qwen: 2 video frames per group, ``ctx.frames``). Temporal: the
    adapter runs it on videos only (images in the same prompt pass whole, as vLLM leaves them) and
    refuses it on families without video and with ``budget_scope="frame"``. A one-frame video is kept
    whole (its first frame). A frame can lose all its tokens (a static frame): the budget is per video.

    Deviations: scores are computed in fp32 (vLLM computes in the embeddings' dtype, bf16 in practice);
    ``keep`` (an absolute count per video) is ours. Diagnostics: ``scores`` ``[B, N]``, ``keep_count`` ``[B]``,
    ``keep_floor`` ``[B]`` (the first frame's tokens, kept whatever the budget).
    """

    name = "evs"
    stage = Stage.VISION
    ragged_vision = True
    temporal = True
    Params = EVSParams

    def video_counts(self, token_counts: Tensor, frames: FrameLayout) -> Tensor:
        """:func:`evs_counts`: fixed by the counts alone (a server sizes the video's placeholders from it)."""
        p = self.params
        return evs_counts(token_counts, frames.tokens_per_frame.to(token_counts), p.keep, p.keep_ratio)

    def plan(self, ctx: VisionContext) -> VisionPlan:
        frames = _frames(self.name, ctx)
        p = self.params
        scores = evs_scores(ctx.features, frames, ctx.token_valid)
        counts = evs_counts(ctx.token_counts, frames.tokens_per_frame.to(ctx.token_counts), p.keep, p.keep_ratio)
        keep = top_stable(scores, counts) & ctx.token_valid
        floor = frames.tokens_per_frame.to(counts).minimum(ctx.token_counts)  # the first frame, whatever the budget
        return VisionPlan(keep=keep, diagnostics={"scores": scores, "keep_count": counts, "keep_floor": floor})


def _frames(name: str, ctx: VisionContext) -> FrameLayout:
    """``ctx.frames``, or a clear error where the adapter gave no frame structure."""
    if ctx.frames is None:
        from tokprune.errors import MissingCapabilityError

        raise MissingCapabilityError(
            f"{name} prunes across the frames of a video and needs ctx.frames (the frame structure of each row); "
            "this vision context has none (an adapter without video, or a plugin's own caller)"
        )
    return ctx.frames
