"""``pyramiddrop``: PyramidDrop (Xing et al., CVPR 2025), drop image tokens in stages at several LLM layers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from tokprune import LLMContext, LLMPlan, PruningStrategy, Stage, TokenRole, param
from tokprune.errors import StrategyContractError
from tokprune.scoring import keep_top

from ._llm import QuerySet, received

Scores = Literal["own", "previous"]
Positions = Literal["compact", "keep"]


@dataclass(frozen=True)
class PyramidDropParams:
    layer: tuple[int, ...] = param(
        (8, 16, 24), "the schedule of layers K_s to drop before (reference layer_list [8, 16, 24], LLaVA-1.5-7B)", ge=1
    )
    keep_ratio: tuple[float, ...] = param(
        (0.5, 0.25, 0.125),
        "image tokens kept after each stage, as fractions of those entering the first (reference "
        "image_token_ratio_list), non-increasing",
        gt=0,
        le=1,
    )
    query: QuerySet = param(
        "last", "query rows: last (the last instruction token, the reference at inference), question, all_text"
    )
    scores: Scores = param(
        "own",
        "whose q/k score stage s: own (layer K_s's input norm, q_proj/k_proj and RoPE on the states entering "
        "it, the reference) or previous (layer K_s - 1's, FastV's convention, no extra projection)",
    )
    positions: Positions = param(
        "compact",
        "survivors' position ids after each stage: compact (renumbered contiguously, the reference) or keep "
        "(their original ids); overrides the adapter's llm_positions for this step",
    )

    def __post_init__(self) -> None:
        if len(self.layer) != len(self.keep_ratio):
            raise ValueError(
                f"layer has {len(self.layer)} stages {self.layer} but keep_ratio has {len(self.keep_ratio)} "
                f"{self.keep_ratio}; give one ratio per layer"
            )
        if any(b <= a for a, b in zip(self.layer, self.layer[1:])):
            raise ValueError(f"layer={self.layer} must strictly increase")
        if any(b > a for a, b in zip(self.keep_ratio, self.keep_ratio[1:])):
            raise ValueError(f"keep_ratio={self.keep_ratio} must not increase (tokens dropped stay dropped)")


class PyramidDrop(PruningStrategy):
    """Drop image tokens in stages: before each layer of a schedule, keep those the last prompt token attends to most.

    Before layer ``K_s`` the image tokens kept are ``keep_ratio[s]`` of those entering the first stage: a
    pyramid of shrinking image spans.

    Follows ``Cooperx521/PyramidDrop`` at ``6444f304aee4b7edcb022839fb9e8cd07859704a``,
    ``llava/model/modeling_llama_pdrop.py`` L1219-1240 (``rank_layer = layer_idx + 1 in layer_list``) and
    L1291-1465 (``pdrop_rank_drop``; the query at L1350-1353), with ``image_token_ratio_list.insert(0, 1.0)`` in
    ``llava/eval/model_vqa_loader.py`` L94-96:

    1. at stage ``s``, layer ``K_s``'s input norm, ``q_proj``/``k_proj`` and RoPE run on the states
       entering ``K_s``; the query is the last instruction token (the last prompt token, inference path);
    2. its softmax attention over every key (causal mask), averaged over heads, read on the image span;
    3. keep the top ``int(n_0 * keep_ratio[s])`` image tokens, in sequence order; text is never dropped;
    4. the survivors' positions are renumbered contiguously.

    A schedule: ``layer`` and ``keep_ratio`` are tuples, one entry per stage, written in parentheses in
    a spec (``pyramiddrop(layer=(2, 3), keep_ratio=(0.5, 0.25))``; brackets would be a sweep). The
    adapter calls :meth:`plan` before each ``K_s``; ``ctx.layer`` says which stage it is.

    Budget: counts are image tokens per sample. The defaults are the reference's LLaVA-1.5-7B (32 layers)
    schedule; a smaller model needs its own (the embedded model has 4 layers: ``layer=(1, 2, 3)``).

    The reference's computation, and the switches (default = the reference's choice):

    ==================  ==============================================  ===========================
    what                reference                                       switch
    ==================  ==============================================  ===========================
    scoring q/k         layer K_s's own input norm, q/k proj, RoPE      ``scores=own|previous``
                        on the states entering K_s (L1320-1342)
    query               the last instruction token (L1389-1392)         ``query=last|question|all_text``
    positions           renumbered 0..len-1 after each stage            ``positions=compact|keep``
                        (L1445-1446)
    ==================  ==============================================  ===========================

    Deviations: while decoding, the reference's later layers continue at the unpruned length (its
    position ids come from layer 0's cache); ``compact`` here continues right after the last kept
    position (docs/adapters.md). The count at a later stage is taken from the image tokens present,
    ``floor(n_s * r_s / r_{s-1})``: the reference's ``int(n_0 * r_s)`` whenever ``n_0 * r_{s-1}`` is whole
    (576 with 0.5, 0.25, 0.125), and batch-safe after a vision stage changed ``n_0`` per sample. At
    least one image token survives every stage. Per sample, on left-padded batches (the reference
    needs right padding).

    Diagnostics: ``scores`` ``[B, L]``, ``keep_count`` ``[B]`` (the adapter prefixes each stage's with
    ``pyramiddrop@K``).
    """

    name = "pyramiddrop"
    stage = Stage.LLM
    Params = PyramidDropParams

    def positions(self) -> Positions:
        return self.params.positions

    def reads_layer_attention(self) -> bool:
        return self.params.scores == "own"

    def plan(self, ctx: LLMContext) -> LLMPlan:
        p = self.params
        if ctx.layer not in p.layer:
            raise StrategyContractError(f"pyramiddrop scheduled at layers {p.layer} was called at layer {ctx.layer}")
        stage = p.layer.index(ctx.layer)
        # the fraction of the tokens entering this stage that survive it
        ratio = p.keep_ratio[stage] / (p.keep_ratio[stage - 1] if stage else 1.0)
        image = ctx.role_mask(TokenRole.IMAGE)
        n = image.sum(dim=1)
        counts = torch.floor(n.double() * ratio + 1e-9).long()
        counts = torch.minimum(torch.clamp(counts, min=1), n)
        if p.scores == "own":
            if ctx.layer_attention is None:
                raise StrategyContractError(
                    "pyramiddrop(scores=own) needs the adapter's LLMContext.layer_attention (layer K's own q/k); "
                    "this context has none: use scores=previous"
                )
            ctx = replace(ctx, attention=ctx.layer_attention())
        scores = received(ctx, p.query)
        keep = keep_top(scores, counts, image) | ~image
        return LLMPlan(keep=keep, diagnostics={"scores": scores, "keep_count": counts})
