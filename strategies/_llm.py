"""LLM-stage helpers shared by ``text_interact`` and ``fastv``: which rows ask, which tokens are scored."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from tokprune import LLMContext, TokenRole, scoring

__all__ = ["QUERY_SETS", "QuerySet", "last_token_mask", "query_mask", "query_similarity", "received"]

QuerySet = Literal["question", "last", "all_text"]
QUERY_SETS: tuple[str, ...] = ("question", "last", "all_text")


def last_token_mask(ctx: LLMContext) -> Tensor:
    """bool ``[B, L]``: the last non-padding position of each sample (the last prompt token)."""
    valid = ctx.valid
    pos = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    last = torch.where(valid, pos, torch.full_like(pos, -1)).amax(dim=1, keepdim=True)
    return (pos == last) & valid


def query_mask(ctx: LLMContext, which: QuerySet) -> Tensor:
    """bool ``[B, L]`` query rows: ``question`` = QUESTION + PROTECTED, ``last`` = the last prompt token,
    ``all_text`` = every non-image, non-padding token (TEMPLATE, QUESTION, PROTECTED).
    """
    if which == "question":
        return ctx.role_mask(TokenRole.QUESTION, TokenRole.PROTECTED)
    if which == "last":
        return last_token_mask(ctx)
    if which == "all_text":
        return ctx.role_mask(TokenRole.TEMPLATE, TokenRole.QUESTION, TokenRole.PROTECTED)
    raise ValueError(f"query set {which!r} is not one of {list(QUERY_SETS)}")


def received(ctx: LLMContext, which: QuerySet) -> Tensor:
    """fp32 ``[B, L]`` head-mean attention each position receives from the ``which`` rows of layer K-1,
    averaged over the queries that can see it (causal normalisation); positions no query sees score 0.
    """
    scores = ctx.attention.received(query_mask(ctx, which)).float()
    return torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)


def query_similarity(ctx: LLMContext, which: QuerySet) -> Tensor:
    """fp32 ``[B, L]`` cosine similarity of each position's hidden state entering layer K to the mean
    hidden state of the ``which`` rows (no attention weights needed, so no causal bias to correct)."""
    return scoring.query_cosine_similarity(ctx.hidden, query_mask(ctx, which)).float()
