"""VisionZip for tokprune: dominant tokens by CLS attention, the rest merged into a few contextual tokens.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (arXiv 2412.04467,
CVPR 2025). Reference code: ``dvlab-research/VisionZip`` @ ``3151f6df`` (``visionzip/clip_encoder.py``,
``visionzip/utils.py``, ``visionzip/main.py``).

A third-party plugin: it uses only tokprune's public API and arrives through the ``tokprune``
entry-point group (``pip install ./plugins/tokprune-visionzip``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokprune import PruningStrategy, Signal, Stage, VisionContext, VisionPlan, hookimpl, param, scoring

__all__ = [
    "VisionZip",
    "contextual_merge",
    "contextual_merge_ragged",
    "head_mean_keys",
    "register_strategies",
    "uniform_targets",
]
__version__ = "0.1.0"


def head_mean_keys(keys: Tensor, num_heads: int) -> Tensor:
    """VisionZip's merge metric: keys averaged over heads, ``[B, N, C] -> [B, N, C/H]`` (fp32).

    The reference returns ``key_states.mean(dim=1)`` from the patched ``CLIPAttention.forward``
    (keys of shape ``[B, H, T, D]``, before any scaling).
    """
    b, n, c = keys.shape
    return keys.float().view(b, n, num_heads, c // num_heads).mean(dim=2)


def uniform_targets(remaining: int, contextual: int, device: torch.device | None = None) -> Tensor:
    """Positions of the contextual targets among ``remaining`` tokens: long ``[min(contextual, remaining)]``.

    The reference's ``arange(0, M, max(1, M // c))[:c]``: uniform in index space, so the targets spread
    over the raster order of what the dominant selection left.
    """
    step = max(1, remaining // max(contextual, 1))
    return torch.arange(0, remaining, step, device=device)[:contextual]


def contextual_merge(hidden: Tensor, metric: Tensor, contextual: int) -> tuple[Tensor, Tensor]:
    """Merge ``M`` remaining tokens into ``c = min(contextual, M)`` contextual tokens (VisionZip step 4).

    Targets are :func:`uniform_targets`; every other token joins the target whose L2-normalised metric
    is most cosine-similar; a contextual token is ``hidden[target] + mean(hidden[assigned])`` (the mean
    over an empty group is 0, the reference's ``counts.clamp(min=1)``).

    Args:
        hidden: ``[B, M, C]`` features of the remaining tokens, in raster order.
        metric: ``[B, M, D]`` merge keys of the same tokens.
        contextual: requested number of contextual tokens.

    Returns:
        ``(tokens [B, c, C] fp32, assignment long [B, M - c])``: the contextual tokens, and for each
        non-target token (in order) the target it joined.
    """
    b, m, _ = hidden.shape
    targets = uniform_targets(m, contextual, hidden.device)
    c = targets.numel()
    is_target = torch.zeros(m, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    # eps instead of the reference's bare division: an all-zero key would otherwise give NaN.
    normed = F.normalize(metric.float(), dim=-1, eps=1e-12)
    similarity = normed[:, ~is_target] @ normed[:, targets].transpose(1, 2)  # [B, M-c, c]
    assignment = similarity.argmax(dim=2) if c else similarity.new_zeros(b, m - c, dtype=torch.long)
    one_hot = F.one_hot(assignment, num_classes=c).float() if c else similarity.new_zeros(b, m, 0)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [B, c, 1]
    merged = one_hot.transpose(1, 2) @ hidden[:, ~is_target].float() / counts  # [B, c, C]
    return hidden[:, targets].float() + merged, assignment


def contextual_merge_ragged(
    hidden: Tensor, metric: Tensor, remaining: Tensor, contextual: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`contextual_merge` on rows of different lengths: row ``b`` merges only its own first
    ``remaining[b]`` tokens into ``c_b = min(contextual, remaining[b])`` contextual tokens.

    Each row's targets are :func:`uniform_targets` of its own count (``j * max(1, M_b // contextual)``);
    the tokens past ``remaining[b]`` (padding) neither join a group nor serve as a target.

    Args:
        hidden: ``[B, M, C]`` features of the remaining tokens, each row's first ``remaining[b]`` real.
        metric: ``[B, M, D]`` merge keys of the same tokens.
        remaining: long ``[B]`` real remaining tokens per row.
        contextual: requested number of contextual tokens per row.

    Returns:
        ``(tokens [B, c, C] fp32, valid bool [B, c], assignment long [B, M])`` with ``c = max_b c_b``:
        row ``b``'s contextual tokens are ``tokens[b, :c_b]`` (``valid``), and ``assignment`` gives each
        merged token's target (-1 for the targets themselves and for padding).
    """
    b, m, _ = hidden.shape
    device = hidden.device
    want = torch.clamp(remaining, max=contextual)  # c_b
    c = int(want.max()) if b else 0
    if c == 0:
        return hidden.new_zeros(b, 0, hidden.shape[2]).float(), want.new_zeros(b, 0).bool(), want.new_full((b, m), -1)
    step = torch.clamp(remaining // max(contextual, 1), min=1)  # [B], the reference's max(1, M // c)
    slot = torch.arange(c, device=device)
    valid = slot[None, :] < want[:, None]  # [B, c]
    targets = torch.where(valid, slot[None, :] * step[:, None], 0)  # [B, c], in range for every row
    real = torch.arange(m, device=device)[None, :] < remaining[:, None]  # [B, M]
    # Invalid slots write into a spare column M (their gather index 0 would collide with a real target).
    dump = torch.where(valid, targets, m)
    is_target = torch.zeros(b, m + 1, dtype=torch.bool, device=device).scatter_(1, dump, True)[:, :m]
    members = real & ~is_target
    normed = F.normalize(metric.float(), dim=-1, eps=1e-12)
    target_keys = torch.gather(normed, 1, targets[..., None].expand(-1, -1, normed.shape[2]))
    similarity = (normed @ target_keys.transpose(1, 2)).masked_fill(~valid[:, None, :], float("-inf"))  # [B, M, c]
    choice = similarity.argmax(dim=2)  # [B, M]
    one_hot = F.one_hot(choice, num_classes=c).float() * members[..., None]  # [B, M, c]
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [B, c, 1]
    merged = one_hot.transpose(1, 2) @ hidden.float() / counts  # [B, c, C]
    target_hidden = torch.gather(hidden.float(), 1, targets[..., None].expand(-1, -1, hidden.shape[2]))
    tokens = (target_hidden + merged) * valid[..., None]
    return tokens, valid, torch.where(members, choice, -1)


class VisionZip(PruningStrategy):
    """VisionZip: ``dominant`` tokens by CLS attention (the CLS token included) plus ``contextual`` merged tokens.

    Steps (reference ``clip_encoder.py`` and ``utils.py``):

    1. Score each patch by the CLS row of encoder layer ``layer``'s attention (the reference sums over
       heads; we average, which ranks identically).
    2. **Dominant**: the top ``dominant - 1`` patches plus the CLS token itself (``dominant`` patches
       when ``include_cls`` is false).
    3. **Contextual**: the ``M`` remaining patches, in raster order, are merged into ``contextual``
       targets spaced uniformly among them (``arange(0, M, M // contextual)``): each joins the target
       whose head-mean key at ``layer`` is most cosine-similar, and a contextual token is
       ``target + mean(assigned)``. See :func:`contextual_merge`.
    4. Budget: ``dominant + contextual`` visual tokens per sample.

    Images of different sizes (``ctx.lengths``: LLaVA-NeXT's base view + AnyRes tiles, one row per
    image): every count is the image's own. Image ``b`` keeps ``min(dominant - 1, L_b)`` dominant
    patches of its own ``L_b`` tokens and merges its own remaining ``M_b`` tokens (never padding, never
    another image's) into ``min(contextual, M_b)`` contextual tokens at its own uniform targets; an image
    smaller than the budget therefore brings fewer extra tokens (``plan.extra_valid``). The budget is
    absolute per image; with ``tokprune.patch(..., budget_scope="tile")`` the LLaVA-NeXT adapter gives
    every tile its own row, which is what the reference does (``visionzip/llava_arch.py``: the tower
    keeps ``dominant + contextual`` tokens of each 336px crop, base view and tiles alike).

    How it maps to :class:`tokprune.VisionPlan`: ``keep`` marks the ``dominant - 1`` patches;
    ``extra`` (``[B, 1 + contextual, C]``) holds the CLS hidden state at ``hidden_states[layer]``, then
    the contextual tokens in target order. The LLM therefore sees ``[dominant patches (raster) | CLS |
    contextual]``; the reference emits ``[CLS | dominant patches | contextual]``. On ragged rows ``extra``
    is ``[B, 1 + max_b c_b, C]`` with ``extra_valid`` marking each image's ``1 + c_b`` real tokens.

    Deviations from the reference:

    * CLS moves from the front of the image block to just after the dominant patches (``extra`` tokens
      follow the kept ones in a :class:`~tokprune.VisionPlan`). With ``include_cls=false`` it is left
      out and ``dominant`` counts patches only.
    * Attention comes from the encoder's q/k projections (works under sdpa); ties go to the lower
      patch index.
    * Merge keys are L2-normalised with an epsilon (the reference divides by the bare norm).
    * More dominant or contextual tokens than there are patches keep what there is
      (``dominant_clamped`` in the diagnostics); the reference would fail on the shapes.
    * The patch features are the projector's input (``hidden_states[-2]`` on LLaVA-1.5); the CLS token
      is read from ``hidden_states[layer]``, which is the same layer at the default ``layer=-2``.
    * LLaVA-NeXT: the reference drops the unpadding and the newline tokens of the tiles and emits every
      crop's CLS and contextual tokens after the kept patches; here the adapter keeps its unpadded
      layout and newlines, and each image's extra tokens (CLS, contextual) follow its kept tokens.
    """

    name = "visionzip"
    stage = Stage.VISION
    ragged_vision = True

    @dataclass(frozen=True)
    class Params:
        dominant: int = param(
            191, "dominant tokens per sample, the CLS token included (reference default 191; its README uses 54)", ge=1
        )
        contextual: int = param(30, "contextual (merged) tokens per sample (reference default 30; README 10)", ge=0)
        layer: int = param(-2, "encoder layer of the CLS attention, the merge keys and the CLS token (reference: -2)")
        include_cls: bool = param(True, "count the CLS token as a dominant token, emitted as an extra token")

        def __post_init__(self) -> None:
            if self.include_cls and self.dominant < 2:
                raise ValueError(
                    f"dominant must be >= 2 when include_cls=true (the CLS token plus at least one patch), "
                    f"got {self.dominant}; set include_cls=false to keep a single patch"
                )

    def requires(self) -> frozenset[Signal]:
        signals = {Signal("qk", self.params.layer)}
        if self.params.include_cls:
            signals.add(Signal("hidden", self.params.layer))
        return frozenset(signals)

    def plan(self, ctx: VisionContext) -> VisionPlan:
        if ctx.lengths is not None:
            return self._plan_per_image(ctx)
        p = self.params
        b, n, _ = ctx.features.shape
        scores = ctx.signals.cls_attention(p.layer, heads="mean")  # [B, N]
        wanted = p.dominant - int(p.include_cls)
        n_dominant = min(wanted, n)
        keep = scoring.topk_mask(scores, n_dominant)
        # The remaining patches in raster order: a stable sort puts the non-kept ones first, in order.
        rest = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, : n - n_dominant]  # [B, M]
        metric = head_mean_keys(ctx.signals.patch_keys(p.layer), ctx.signals.num_heads)  # [B, N, D]
        hidden = torch.gather(ctx.features, 1, rest[..., None].expand(-1, -1, ctx.features.shape[2]))
        metric = torch.gather(metric, 1, rest[..., None].expand(-1, -1, metric.shape[2]))
        tokens, assignment = contextual_merge(hidden, metric, p.contextual)
        extra = [tokens.to(ctx.features.dtype)]
        if p.include_cls:
            cls = ctx.signals.hidden(p.layer)[:, ctx.signals.cls_index]  # [B, C]
            extra.insert(0, cls[:, None].to(ctx.features.dtype))
        extra_tokens = torch.cat(extra, dim=1)
        return VisionPlan(
            keep=keep,
            extra=extra_tokens if extra_tokens.shape[1] else None,
            diagnostics={
                "scores": scores,
                "dominant": keep.sum(dim=1),
                "contextual": keep.new_full((b,), tokens.shape[1], dtype=torch.long),
                "assignment": assignment,
                "dominant_clamped": keep.new_full((b,), wanted > n),
            },
        )

    def _plan_per_image(self, ctx: VisionContext) -> VisionPlan:
        """Images of different sizes: the same steps within each image's own ``L_b`` tokens.

        Kept apart from the full-row path so that LLaVA-1.5's numbers stay bit-identical; the ragged
        contract check proves both agree on every image.
        """
        p = self.params
        length, real = ctx.token_counts, ctx.token_valid  # [B], [B, N]
        scores = ctx.signals.cls_attention(p.layer, heads="mean")  # [B, N]
        wanted = p.dominant - int(p.include_cls)
        n_dominant = torch.clamp(length, max=wanted)  # [B]
        keep = scoring.keep_top(scores, n_dominant, real)
        remaining = length - n_dominant  # [B]
        # Each image's remaining tokens in raster order first (stable sort), padding and dominant after.
        m = int(remaining.max())
        rest = torch.sort((~(real & ~keep)).to(torch.int8), dim=1, stable=True).indices[:, :m]  # [B, M]
        metric = head_mean_keys(ctx.signals.patch_keys(p.layer), ctx.signals.num_heads)  # [B, N, D]
        hidden = torch.gather(ctx.features, 1, rest[..., None].expand(-1, -1, ctx.features.shape[2]))
        metric = torch.gather(metric, 1, rest[..., None].expand(-1, -1, metric.shape[2]))
        tokens, valid, assignment = contextual_merge_ragged(hidden, metric, remaining, p.contextual)
        extra, extra_valid = [tokens.to(ctx.features.dtype)], [valid]
        if p.include_cls:
            cls = ctx.signals.hidden(p.layer)[:, ctx.signals.cls_index]  # [B, C]: each image's own CLS
            extra.insert(0, cls[:, None].to(ctx.features.dtype))
            extra_valid.insert(0, valid.new_ones(valid.shape[0], 1))
        extra_tokens = torch.cat(extra, dim=1)
        has_extra = extra_tokens.shape[1] > 0
        return VisionPlan(
            keep=keep,
            extra=extra_tokens if has_extra else None,
            extra_valid=torch.cat(extra_valid, dim=1) if has_extra else None,
            diagnostics={
                "scores": scores,
                "dominant": keep.sum(dim=1),
                "contextual": valid.sum(dim=1),
                "assignment": assignment,  # [B, M]: per remaining token (-1: target or padding)
                "dominant_clamped": wanted > length,
            },
        )


@hookimpl
def register_strategies(register: Callable[..., None]) -> None:
    register(VisionZip)
