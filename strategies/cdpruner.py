"""``cdpruner``: CDPruner (Zhang et al., NeurIPS 2025), a conditional DPP over the patches, greedy MAP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tokprune import PruningStrategy, Signal, Stage, VisionContext, VisionPlan, param
from tokprune.scoring import dpp_greedy_map, fixed_counts, pairwise_cosine

Relevance = Literal["text", "cls", "uniform"]
Features = Literal["projected", "encoder"]


@dataclass(frozen=True)
class CDPrunerParams:
    keep: int | None = param(
        None, "patches kept per sample (the reference's visual_token_num); overrides keep_ratio", ge=1
    )
    keep_ratio: float = param(0.25, "fraction of patches kept, round(N * keep_ratio), at least 1", gt=0, le=1)
    relevance: Relevance = param(
        "text",
        "the DPP's condition: text (minus the mean CLIP cosine of each patch to the instruction, the reference; "
        "needs a CLIP text encoder given to patch(), else the cls stand-in runs and the diagnostics say so), "
        "cls (head-mean CLS attention at `layer`, instruction-agnostic) or uniform (r = 1: a plain DPP)",
    )
    layer: int = param(-2, "encoder layer of the CLS attention (relevance=cls, and text's stand-in)")
    features: Features = param(
        "projected",
        "the similarity's features: projected (the tokens the LLM receives, after the projector: the "
        "reference) or encoder (the tower's features before the projector)",
    )
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


def text_relevance(patches: Tensor, text: Tensor, text_valid: Tensor) -> Tensor:
    """CDPruner's raw relevance, fp32 ``[B, N]``: minus the mean cosine between each patch embedding
    (``[B, N, E]``) and the image's valid text embeddings (``[B, M, E]``, ``text_valid`` bool ``[B, M]``)."""
    p = patches.float() / patches.float().norm(dim=-1, keepdim=True)
    t = text.float() / text.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (p @ t.transpose(1, 2)) * text_valid[:, None, :]  # [B, N, M]
    return -cos.sum(dim=-1) / text_valid.sum(dim=-1, keepdim=True).clamp_min(1)


class CDPruner(PruningStrategy):
    """Keep the greedy MAP of a conditional DPP over the patches: relevance times cosine similarity.

    The kernel is ``L = diag(r) S diag(r)``: cosine similarity ``S`` for diversity, relevance ``r`` as the
    condition; ``keep`` (or ``round(N * keep_ratio)``) patches are kept.

    Follows ``Theia-4869/CDPruner`` at ``9541616c40fcd5625de1cdb8ea6c33c129eb7864``,
    ``llava/model/llava_arch.py`` L141-187 (``encode_images``):

    1. ``S = cos(x_i, x_j)`` over the projected visual tokens (L146-153);
    2. relevance ``r``: the reference uses the instruction: minus the mean cosine between each patch's
       CLIP image embedding and the instruction's CLIP text embeddings, min-max scaled (L155-160);
    3. ``L = r_i S_ij r_j`` (L162-167; optionally ``r -> exp(alpha r)``, ``alpha = theta / (2 (1 - theta))``,
       the reference's commented-out knob, here ``theta``);
    4. fast greedy MAP inference with the incremental Cholesky update (L169-182,
       ``tokprune.scoring.dpp_greedy_map``); keep the picks in raster order.

    The reference's computation, and the switches (default = the reference's choice):

    ==================  ==============================================  =============================
    what                reference                                       switch
    ==================  ==============================================  =============================
    similarity          projected tokens (after ``mm_projector``, L146)  ``features=projected|encoder``
    relevance           the instruction through CLIP's text tower       ``relevance=text|cls|uniform``
                        (``clip_encoder.py`` L79-96)
    relevance weight    none (``theta`` commented out, L162-165)        ``theta``
    ==================  ==============================================  =============================

    **The instruction needs a CLIP text tower**, which LLaVA does not ship: ``relevance=text`` reads it
    from ``VisionContext.text`` (``tokprune.patch(..., text_encoder=ClipTextEncoder(...) or a path)``,
    :mod:`tokprune.text_encoder`); without one the documented stand-in runs, the tower's head-mean CLS
    attention at ``layer`` (instruction-agnostic, min-max scaled like the reference's relevance), and
    the diagnostics' ``relevance_source`` says which ran (``text`` or ``cls``). ``uniform`` is the
    unconditional DPP (the paper's "w/o relevance" ablation).

    Budget: counts are visual tokens per image; images of different sizes (``ctx.lengths``): ``keep_ratio``
    of each image's own tokens, ``keep`` capped at them, the relevance scaled over them and the DPP's
    candidates are them (padding is never picked), see docs/adapters.md.

    Other deviations: min-max scaling is per sample (the reference pools min and max over the batch); a constant
    relevance row is all ones (the reference divides by zero); once the kernel's rank is exhausted the
    remaining picks follow the residual gains instead of NaN (see ``dpp_greedy_map``).

    Diagnostics: ``relevance`` ``[B, N]``, ``order`` ``[B, K]`` (picks in selection order), ``keep_count``,
    ``relevance_source`` (``text``, ``cls`` or ``uniform``).
    """

    name = "cdpruner"
    stage = Stage.VISION
    ragged_vision = True
    Params = CDPrunerParams

    def requires(self) -> frozenset[Signal]:
        # relevance=text declares the CLS attention too: its stand-in where no text encoder was given
        return frozenset() if self.params.relevance == "uniform" else frozenset({Signal("qk", self.params.layer)})

    def positions(self) -> Literal["compact"]:
        return "compact"  # the reference drops the pruned tokens before inserting the image: contiguous ids

    def reads_instruction(self) -> bool:
        return self.params.relevance == "text"

    def plan(self, ctx: VisionContext) -> VisionPlan:
        p = self.params
        b, n = ctx.features.shape[:2]
        device = ctx.features.device
        x = ctx.projected() if p.features == "projected" else ctx.features
        similarity = pairwise_cosine(x)  # [B, N, N]
        # A token's cosine with itself is 1; computed, it is 1 up to rounding that depends on the batch's shapes,
        # and under equal relevance (relevance=uniform) the DPP's first pick is the largest of these: batch == solo
        # needs the exact value (the reference's rule in exact arithmetic: the tie goes to the lowest index).
        similarity.diagonal(dim1=1, dim2=2).fill_(1.0)
        source = p.relevance if p.relevance != "text" or ctx.text is not None else "cls"
        if source == "text":
            assert ctx.text is not None
            raw = text_relevance(ctx.text.patches, ctx.text.text, ctx.text.text_valid).to(similarity.dtype)
        elif source == "cls":
            raw = ctx.signals.cls_attention(p.layer, heads="mean").to(similarity.dtype)
        else:
            raw = torch.ones(b, n, dtype=similarity.dtype, device=device)
        valid = None if ctx.lengths is None else ctx.token_valid  # images of different sizes
        r = normalised_relevance(raw, p.theta, valid)
        kernel = r[:, :, None] * similarity * r[:, None, :]
        counts = fixed_counts(ctx.token_counts, p.keep, p.keep_ratio)
        keep, order = dpp_greedy_map(kernel, counts, valid)
        diagnostics = {"relevance": r, "order": order, "keep_count": counts, "relevance_source": source}
        return VisionPlan(keep=keep, diagnostics=diagnostics)
