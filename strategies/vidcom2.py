"""``vidcom2``: VidCom2, Video Compression Commander (Liu et al., EMNLP 2025, arXiv 2505.14454)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokprune import FrameLayout, PruningStrategy, Stage, VisionContext, VisionPlan, param

from .evs import _frames

#: The reference's Gaussian bandwidths ``2**k, k = -3..1`` (vidcom2.py L54).
ALPHAS: tuple[float, ...] = tuple(2.0**k for k in range(-3, 2))


@dataclass(frozen=True)
class VidCom2Params:
    keep: int | None = param(
        None, "tokens kept per video, exactly (base = keep / N, then vLLM's reconcile step); overrides keep_ratio", ge=1
    )
    keep_ratio: float = param(
        0.25, "base retention ratio of each frame before the frame-uniqueness scaling (reference base_scale / R_RATIO)",
        gt=0, le=1,
    )
    low_var_ratio: float = param(0.5, "fraction of channels scored: the lowest-variance ones (reference 0.5)", gt=0, le=1)
    temperature: float = param(0.01, "softmax temperature of the frame-uniqueness budgets (reference 0.01)", gt=0)
    reconcile: bool = param(
        False,
        "vLLM's extra step: move the video's kept count to exactly max(frames, floor(N * keep_ratio)) by dropping the "
        "most similar kept tokens or adding the least similar dropped ones (the authors' code keeps the per-frame sum)",
    )


def low_variance_channels(features: Tensor, valid: Tensor, ratio: float) -> Tensor:
    """``[B, N, k]``: each row's ``k = int(C * ratio)`` channels of lowest variance over its valid tokens
    (population variance, the reference's ``x.var(dim=0, unbiased=False)``)."""
    x = features.float()
    weight = valid[..., None].float()
    n = weight.sum(dim=1).clamp_min(1)  # [B, 1]
    mean = (x * weight).sum(dim=1) / n
    variance = (((x - mean[:, None]) ** 2) * weight).sum(dim=1) / n  # [B, C]
    k = max(int(x.shape[-1] * ratio), 1)
    channels = torch.topk(variance, k, dim=1, largest=False).indices  # [B, k]
    return torch.take_along_dim(x, channels[:, None, :], dim=2)


def gaussian_scores(x: Tensor, frames: FrameLayout, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-scale Gaussian similarity of each token to its video's centre and its frame's centre.

    ``x`` ``[B, N, k]`` (unnormalised); tokens are L2-normalised, the centres are the means of the normalised
    tokens (of the row, of the frame). Returns ``(video [B, N], frame [B, N], frame_of long [B, N])``;
    ``sum_a exp(-|x - c|^2 / 2a)`` over :data:`ALPHAS`, 0 at padding.
    """
    b, n, k = x.shape
    x = torch.nn.functional.normalize(x, dim=-1) * valid[..., None]
    frame_of = frames.frame_of(n).to(x.device)
    slots = int(frames.counts.max()) + 1  # frames of the longest video, and a spare slot for padding
    slot = torch.where(frame_of >= 0, frame_of, slots - 1)
    sums = x.new_zeros(b, slots, k).scatter_add_(1, slot[..., None].expand(-1, -1, k), x)
    per_frame = frames.tokens_per_frame.to(x)[:, None, None].clamp_min(1)
    frame_centre = torch.take_along_dim(sums / per_frame, slot[..., None], dim=1)  # each token's frame's
    video_centre = x.sum(dim=1, keepdim=True) / valid.sum(dim=1).clamp_min(1)[:, None, None].to(x)

    def kernel(centre: Tensor) -> Tensor:
        distance = ((x - centre) ** 2).sum(dim=-1)
        return sum(torch.exp(-distance / (2 * a)) for a in ALPHAS) * valid

    return kernel(video_centre), kernel(frame_centre), frame_of


def frame_budgets(video_score: Tensor, frame_of: Tensor, frames: FrameLayout, base: Tensor, temperature: float) -> Tensor:
    """long ``[B, T]``: tokens kept of each frame (0 past a video's frames), the reference's ``compute_scales``
    and ``select_outlier_indices`` budgets: frame uniqueness ``u_t = -mean(video_score over frame t)``,
    ``p = softmax((u - max u) / temperature)`` over the video's frames, ``scale_t = min(base * (1 + p_t -
    mean p), 1)``, ``k_t = max(round(scale_t * tokens_per_frame), 1)`` (``round`` half to even, as torch's)."""
    b, n = video_score.shape
    slots = int(frames.counts.max())
    real = torch.arange(slots, device=video_score.device)[None, :] < frames.counts.to(video_score.device)[:, None]
    slot = torch.where(frame_of >= 0, frame_of, slots)
    sums = video_score.new_zeros(b, slots + 1).scatter_add_(1, slot, video_score)[:, :slots]
    per = frames.tokens_per_frame.to(video_score)[:, None]
    uniqueness = (-sums / per).masked_fill(~real, float("-inf"))
    top = uniqueness.max(dim=1, keepdim=True).values
    probs = torch.softmax((uniqueness - top) / temperature, dim=1)
    mean = probs.sum(dim=1, keepdim=True) / frames.counts.to(probs)[:, None]
    scale = (base[:, None] * (1 + probs - mean)).clamp(max=1.0)
    return torch.where(real, torch.round(scale * per).long().clamp_min(1), 0)


def keep_lowest_per_frame(score: Tensor, frame_of: Tensor, budgets: Tensor) -> Tensor:
    """bool ``[B, N]``: in each frame the ``budgets[b, t]`` tokens of lowest ``score`` (ties to the lower index),
    by one sort on (frame, score): a token's rank in its frame is its place after its frame's start."""
    b, n = score.shape
    slots = budgets.shape[1]
    slot = torch.where(frame_of >= 0, frame_of, slots)
    by_score = torch.sort(score, dim=1, stable=True).indices
    by_frame = torch.sort(torch.take_along_dim(slot, by_score, dim=1), dim=1, stable=True).indices
    order = torch.take_along_dim(by_score, by_frame, dim=1)  # frame-major, ascending score within a frame
    sorted_slot = torch.take_along_dim(slot, order, dim=1)
    sizes = torch.zeros(b, slots + 1, dtype=torch.long, device=score.device).scatter_add_(1, slot, torch.ones_like(slot))
    start = torch.take_along_dim(sizes.cumsum(1) - sizes, sorted_slot, dim=1)
    rank = torch.arange(n, device=score.device)[None, :] - start
    allowed = torch.take_along_dim(torch.cat([budgets, budgets.new_zeros(b, 1)], dim=1), sorted_slot, dim=1)
    return torch.zeros(b, n, dtype=torch.bool, device=score.device).scatter(1, order, rank < allowed)


def reconcile_target(tokens: Tensor, frames: Tensor, keep: int | None, keep_ratio: float) -> Tensor:
    """long ``[B]``: the reconcile step's exact count per video of ``tokens`` in ``frames`` (long ``[B]``):
    ``max(frames, floor(N * keep_ratio))`` (vLLM's ``int(N * (1 - q))``), or ``max(frames, min(keep, N))``."""
    target = tokens.clamp(max=keep) if keep is not None else torch.floor(tokens.double() * keep_ratio).long()
    return torch.maximum(target, frames)


def reconcile(keep: Tensor, score: Tensor, valid: Tensor, target: Tensor) -> Tensor:
    """vLLM's step 5: bool ``[B, N]`` with exactly ``target[b]`` kept, dropping the kept tokens of highest
    ``score`` or adding the dropped (valid) ones of lowest, as many as the difference."""
    current = keep.sum(dim=1)
    index = torch.arange(keep.shape[1], device=keep.device)[None, :]
    drop_order = torch.sort(score.masked_fill(~keep, float("-inf")), dim=1, descending=True, stable=True).indices
    drop = torch.zeros_like(keep).scatter(1, drop_order, index < (current - target).clamp_min(0)[:, None])
    spare = valid & ~keep
    add_order = torch.sort(score.masked_fill(~spare, float("inf")), dim=1, stable=True).indices
    add = torch.zeros_like(keep).scatter(1, add_order, index < (target - current).clamp_min(0)[:, None])
    return (keep & ~drop) | (add & spare)


class VidCom2(PruningStrategy):
    """Keep each frame's most distinctive tokens, with larger budgets for more distinctive frames.

    Follows the authors' ``xuyang-liu16/VidCom2`` at ``d31b1560e4ddcd0e7bbceb48dd933a9f634d8905``,
    ``token_compressor/vidcom2/vidcom2.py`` (``vidcom2_compression`` L15-36), on the merged tokens the LLM
    receives (their Qwen patch calls it on the merger's output, ``models/qwen2_vl.py`` at ``f22712c``):

    1. score in the ``int(C * 0.5)`` channels of lowest variance over the video (``select_low_var_channels``,
       L38-43);
    2. tokens L2-normalised; video centre = mean of all tokens, frame centre = mean of the frame's; each
       token's similarity to each centre ``sum_a exp(-|x - c|^2 / 2a)``, ``a = 2^-3..2^1``
       (``compute_gaussian_scores``, L45-62);
    3. frame budgets (``compute_scales``, L64-68): uniqueness ``u_t = -mean`` of its tokens' video
       similarity, ``p = softmax((u - max u) / 0.01)``, ``scale_t = min(base (1 + p_t - mean p), 1)``;
    4. in frame ``t`` keep the ``max(round(scale_t * tokens_per_frame), 1)`` tokens of lowest
       video + frame similarity (``select_outlier_indices``, L70-78), in raster order; survivors keep their
       M-RoPE positions (the Qwen patch gathers ``position_ids`` with the kept indices).

    ``reconcile=True`` adds vLLM's step (``vllm/multimodal/video_prune/vidcom2.py`` at
    ``0f17ee061e413bf8ab7927f926f69cdff24dc63e``, L99-120): the kept count moved to exactly
    ``max(T, min(int(N (1 - q)), N))`` so that placeholders sized in its frontend match. Everything else
    in vLLM's port is the authors' rule.

    A "frame" is a temporal patch group (``ctx.frames``). Temporal: run on videos only (images pass whole),
    refused on families without video and under ``budget_scope="frame"``. Every frame keeps at least one
    token. Deviations: ``keep`` (an exact count per video: ``base = keep / N``, then the reconcile step, at
    least one token per frame) is ours; the reference scores all the
    videos of one call as one flattened tensor (its Qwen patch); here each video is scored on its own.
    Diagnostics: ``keep_count`` ``[B]``, ``frame_budget`` ``[B, T]``, ``keep_floor`` ``[B]`` (its frames).
    """

    name = "vidcom2"
    stage = Stage.VISION
    ragged_vision = True
    temporal = True
    Params = VidCom2Params

    def video_counts(self, token_counts: Tensor, frames: FrameLayout) -> Tensor | None:
        """With ``reconcile`` or ``keep``: exactly the reconcile target (known before the features); the
        authors' rule (per-frame budgets from the frames' uniqueness) lets the features decide: None."""
        p = self.params
        if not (p.reconcile or p.keep is not None):
            return None
        return reconcile_target(token_counts, frames.counts.to(token_counts), p.keep, p.keep_ratio)

    def plan(self, ctx: VisionContext) -> VisionPlan:
        frames = _frames(self.name, ctx)
        p = self.params
        valid, n = ctx.token_valid, ctx.token_counts
        if p.keep is not None:  # the base ratio of an absolute count: keep / N of each video
            base = n.clamp(max=p.keep).double() / n.clamp_min(1)
        else:
            base = torch.full(n.shape, p.keep_ratio, dtype=torch.float64, device=n.device)
        x = low_variance_channels(ctx.features, valid, p.low_var_ratio)
        video, frame, frame_of = gaussian_scores(x, frames, valid)
        budgets = frame_budgets(video, frame_of, frames, base.to(video), p.temperature)
        score = (video + frame).masked_fill(~valid, float("inf"))
        keep = keep_lowest_per_frame(score, frame_of, budgets) & valid
        if p.reconcile or p.keep is not None:  # an absolute keep is exact: vLLM's step reaches it
            keep = reconcile(keep, score, valid, reconcile_target(n, frames.counts.to(n), p.keep, p.keep_ratio))
        floor = frames.counts.to(n).minimum(n)  # one token per frame, whatever the budget
        diagnostics = {"keep_count": keep.sum(dim=1), "frame_budget": budgets, "keep_floor": floor}
        return VisionPlan(keep=keep, diagnostics=diagnostics)
