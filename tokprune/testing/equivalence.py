"""Equivalence checks for a pruning pipeline inside a patched tiny LLaVA. Run them on your strategies.

* :func:`check_cache_equivalence`: greedy ``generate`` with the KV cache == without it, token for token.
* :func:`check_batch_equivalence`: each sample of a left-padded ragged batch == that sample alone
  (last-token logits within ``atol``, greedy tokens identical).
* :func:`check_keep_all_identity`: a pipeline that keeps everything == the unpatched model.

Each takes a spec (string, dicts, strategy or pipeline) and builds its own tiny model with
:func:`tokprune.testing.models.tiny_llava`; they raise ``AssertionError`` with the details. A plugin's
test can parametrise them over its strategies::

    @pytest.mark.parametrize("name", ["my_strategy"])
    def test_my_strategy_cache(name):
        check_cache_equivalence(name)

The probe strategies below (``probe_*``) are tiny reference strategies that need no scoring
primitives; the adapter tests use them and they show what a strategy sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..params import param
from ..scoring import fixed_counts, keep_top
from ..strategy import LLMContext, LLMPlan, PruningStrategy, Signal, Stage, TokenRole, VisionContext, VisionPlan
from .models import VOCAB, tiny_llava

__all__ = [
    "CALL_FORMS",
    "DEFAULT_LENGTHS",
    "WIDE_LENGTHS",
    "ProbeLastRow",
    "ProbeVisionNorm",
    "ProbeVisionTopK",
    "check_batch_equivalence",
    "check_cache_equivalence",
    "check_keep_all_identity",
    "generate_pair",
    "last_row_attention",
]

#: Question lengths of the default ragged batch (different lengths: left padding differs per row).
DEFAULT_LENGTHS: tuple[int, ...] = (5, 2, 8)
#: Question lengths whose left-padding amounts (27, 16, 0) differ pairwise by more than 2 pi, the period of
#: RoPE's fastest-turning pair: a position shift then changes what a shift-sensitive computation reads.
WIDE_LENGTHS: tuple[int, ...] = (3, 14, 30)
#: How a caller runs a patched model: ``generate``; ``model(...)`` with position ids from the mask (as
#: ``generate`` builds them, padding does not shift positions); ``model(...)`` without position ids (HF's
#: ``arange``: left padding shifts every position of a sample by its padding amount).
CALL_FORMS: tuple[str, ...] = ("generate", "forward_positions", "forward")


def last_row_attention(ctx: LLMContext) -> Tensor:
    """Head-mean attention of each sample's last position over all positions, fp32 ``[B, L]`` (FastV).

    Computed directly from ``ctx.attention.q``/``k`` (RoPE applied, GQA expanded, padding masked).
    """
    att = ctx.attention
    q, k = att.q.float(), att.k.float()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    scale = att.scale if att.scale is not None else q.shape[-1] ** -0.5
    logits = torch.einsum("bhd,bhld->bhl", q[:, :, -1], k) * scale
    logits = logits.masked_fill(~att.key_padding_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def _probe_budget(scores: Tensor, candidates: Tensor, keep_ratio: float, ragged: bool) -> Tensor:
    """long ``[B]``: ``keep_ratio`` of each row's candidates, or with ``ragged`` the candidates scoring above
    their row's mean (a count that differs per row even for equal lengths, to exercise ragged plans).

    ``scores`` float ``[B, L]``, ``candidates`` bool ``[B, L]``.
    """
    n = candidates.sum(dim=1)
    if not ragged:
        return fixed_counts(n, None, keep_ratio)
    mean = scores.masked_fill(~candidates, 0).sum(dim=1, keepdim=True) / n.clamp(min=1)[:, None]
    return ((scores > mean) & candidates).sum(dim=1).clamp(min=1)


def _mean_of_dropped(features: Tensor, keep: Tensor, valid: Tensor, extra: int) -> Tensor | None:
    """``[B, extra, C]`` copies of the mean of each image's dropped tokens (None when ``extra`` is 0)."""
    if not extra:
        return None
    dropped = (~keep & valid).float()[..., None]
    mean = (features * dropped).sum(1) / dropped.sum(1).clamp(min=1)
    return mean[:, None, :].repeat(1, extra, 1).to(features.dtype)


@dataclass(frozen=True)
class _LastRowParams:
    layer: int = param(2, "prune before this decoder layer", ge=1)
    keep_ratio: float = param(0.5, "fraction of each sample's image tokens kept", gt=0, le=1)
    ragged: bool = param(False, "keep the image tokens scoring above their mean instead (a count per sample)")


class ProbeLastRow(PruningStrategy):
    """FastV's rule from q/k: keep the image tokens the last prompt token attends to most."""

    name = "probe_last_row"
    stage = Stage.LLM
    Params = _LastRowParams

    def plan(self, ctx: LLMContext) -> LLMPlan:
        scores = last_row_attention(ctx)
        image = ctx.role_mask(TokenRole.IMAGE)
        budget = _probe_budget(scores, image, self.params.keep_ratio, self.params.ragged)
        keep = ~image | keep_top(scores, budget, image)
        return LLMPlan(keep=keep, diagnostics={"budget": budget})


@dataclass(frozen=True)
class _VisionTopKParams:
    keep_ratio: float = param(0.5, "fraction of patches kept", gt=0, le=1)
    ragged: bool = param(False, "keep the patches scoring above their mean instead (a count per sample)")
    extra: int = param(0, "extra tokens appended per image (mean of the dropped patches)", ge=0)
    merge: bool = param(False, "replace kept features by themselves + 0.5 * mean of all patches")


class ProbeVisionTopK(PruningStrategy):
    """Keep the patches the CLS token attends to most (one head over the full width, last encoder layer).

    Cuts each image within its own tokens (``ctx.lengths``) when images differ in size.
    """

    name = "probe_vision_topk"
    stage = Stage.VISION
    ragged_vision = True
    Params = _VisionTopKParams

    def requires(self) -> frozenset[Signal]:
        return frozenset({Signal("qk", -1)})

    def plan(self, ctx: VisionContext) -> VisionPlan:
        q, _ = ctx.signals.qk(-1)
        keys = ctx.signals.patch_keys(-1).float()  # per token (a family merging patches: their mean key)
        valid, n = ctx.token_valid, ctx.token_counts
        scores = torch.einsum("bc,bnc->bn", q[:, 0].float(), keys) / q.shape[-1] ** 0.5
        budget = _probe_budget(scores, valid, self.params.keep_ratio, self.params.ragged)
        keep = keep_top(scores, budget, valid)
        features = None
        if self.params.merge:
            mean_all = (ctx.features * valid[..., None]).sum(1, keepdim=True) / n[:, None, None]
            features = ctx.features + 0.5 * mean_all
        extra = _mean_of_dropped(ctx.features, keep, valid, self.params.extra)
        return VisionPlan(keep=keep, features=features, extra=extra, diagnostics={"budget": budget})


@dataclass(frozen=True)
class _VisionNormParams:
    keep_ratio: float = param(0.5, "fraction of each image's tokens kept", gt=0, le=1)
    ragged: bool = param(False, "keep the tokens whose norm is above their image's mean instead")
    extra: int = param(0, "extra tokens appended per image (mean of the dropped tokens)", ge=0)


class ProbeVisionNorm(PruningStrategy):
    """Keep each image's tokens of largest feature norm: a vision probe reading no CLS signal.

    For towers without a CLS token (the adapter contract falls back to it there); cuts per image.
    """

    name = "probe_vision_norm"
    stage = Stage.VISION
    ragged_vision = True
    Params = _VisionNormParams

    def plan(self, ctx: VisionContext) -> VisionPlan:
        valid = ctx.token_valid
        scores = ctx.features.float().norm(dim=-1)
        budget = _probe_budget(scores, valid, self.params.keep_ratio, self.params.ragged)
        keep = keep_top(scores, budget, valid)
        extra = _mean_of_dropped(ctx.features, keep, valid, self.params.extra)
        return VisionPlan(keep=keep, extra=extra, diagnostics={"budget": budget})


def generate_pair(model: Any, inputs: dict[str, Tensor], max_new_tokens: int = 6) -> tuple[Tensor, Tensor]:
    """Greedy sequences with the cache and without it (``use_cache=False``)."""
    common = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": VOCAB.pad}
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **common)
        uncached = model.generate(**inputs, use_cache=False, **common)
    return cached, uncached


def check_cache_equivalence(
    spec: Any,
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    max_new_tokens: int = 6,
    seed: int = 0,
    **patch_options: Any,
) -> Tensor:
    """Greedy generation with the KV cache equals generation without it, token for token; returns the tokens."""
    import tokprune

    model, make_inputs = tiny_llava(seed=seed)
    inputs = make_inputs(lengths)
    with tokprune.pruned(model, spec, question_end=VOCAB.assistant_marker, **patch_options):
        cached, uncached = generate_pair(model, inputs, max_new_tokens)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(cached[:, :prompt_len], inputs["input_ids"]), "the returned sequences must begin with the prompt"
    if not torch.equal(cached, uncached):
        raise AssertionError(
            f"{spec!r}: cached and uncached greedy generation differ:\n"
            f"cache:    {cached[:, prompt_len:].tolist()}\nno cache: {uncached[:, prompt_len:].tolist()}"
        )
    return cached


def _last_logits(model: Any, inputs: dict[str, Tensor], positions: bool = True) -> Tensor:
    """Last-position logits of ``model(...)``; ``positions``: with position ids from the mask (as generate
    builds them, so padding does not shift positions), else none (HF's ``arange``)."""
    extra = {}
    if positions:
        extra["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**inputs, **extra).logits[:, -1].float()


def check_batch_equivalence(
    spec: Any,
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    atol: float = 1e-4,
    max_new_tokens: int = 4,
    seed: int = 0,
    call_forms: Sequence[str] = CALL_FORMS,
    text_encoder: Any = None,
    **patch_options: Any,
) -> None:
    """Every sample of a left-padded ragged batch gives the logits and greedy tokens it gives alone, in
    every call form of ``call_forms`` (:data:`CALL_FORMS`): ``model(...)`` logits within ``atol``,
    ``generate`` tokens identical. ``text_encoder`` goes to ``patch`` (a callable ``model -> encoder``
    builds it for the tiny model)."""
    import tokprune

    unknown = sorted(set(call_forms) - set(CALL_FORMS))
    if unknown:
        raise ValueError(f"unknown call forms {unknown}; valid: {', '.join(CALL_FORMS)}")
    model, make_inputs = tiny_llava(seed=seed)
    if callable(text_encoder):
        text_encoder = text_encoder(model)
    batch = make_inputs(lengths)
    common = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": VOCAB.pad}
    options = dict(patch_options, question_end=VOCAB.assistant_marker)
    if text_encoder is not None:
        options["text_encoder"] = text_encoder

    def run(inputs: dict[str, Tensor], form: str) -> Tensor:
        if form == "generate":
            with torch.no_grad():
                return model.generate(**inputs, **common)[:, inputs["input_ids"].shape[1] :]
        return _last_logits(model, inputs, positions=form == "forward_positions")

    with tokprune.pruned(model, spec, **options):
        for form in call_forms:
            together = run(batch, form)
            for i, q in enumerate(lengths):
                alone = run(make_inputs([q], seeds=[i]), form)[0]
                if form == "generate" and not torch.equal(alone, together[i]):
                    raise AssertionError(
                        f"{spec!r} ({form}): sample {i} greedy tokens {together[i].tolist()} != solo {alone.tolist()}"
                    )
                err = (alone - together[i]).abs().max().item() if form != "generate" else 0.0
                if err > atol:
                    raise AssertionError(
                        f"{spec!r} ({form}): sample {i} logits differ from its solo run by {err:.3g} > {atol}"
                    )


def check_keep_all_identity(spec: Any, *, atol: float = 1e-5, seed: int = 0, **patch_options: Any) -> None:
    """A pipeline that keeps every token gives the unpatched logits, and so does the model after remove()."""
    import tokprune

    model, make_inputs = tiny_llava(seed=seed)
    inputs = make_inputs(DEFAULT_LENGTHS)
    with torch.no_grad():
        reference = model(**inputs).logits
        handle = tokprune.patch(model, spec, **patch_options)
        try:
            patched = model(**inputs).logits
        finally:
            handle.remove()
        restored = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    err = (patched - reference)[valid].abs().max().item()
    if err > atol:
        raise AssertionError(f"{spec!r} keeps everything but its logits differ from the unpatched model by {err:.3g}")
    if not torch.equal(restored, reference):
        raise AssertionError("after remove() the model's logits differ from before patching")
