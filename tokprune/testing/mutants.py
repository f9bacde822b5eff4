"""Deliberately wrong adapters: the adapter contract must reject every one of them, on every family.

A contract suite is only as good as the wrong implementations it rejects. Each mutant here takes a
family's adapter class and returns a subclass with one bug of a kind an adapter can really have; the
``tokens`` check (:mod:`tokprune.testing.tokens`) must fail on each, while passing the family itself::

    from tokprune.testing.mutants import MUTANTS, check_mutants
    check_mutants(MyAdapter)        # AssertionError naming any mutant the contract let through

The mutants reach into the core every family runs on (:class:`~tokprune.adapters.decoder.PrunedDecoderAdapter`,
the base of :class:`tokprune.adapters.Family`; these are tokprune's own internals, not the family protocol),
so they apply to any family built on it:

* ``wrong_rows``: the adapter feeds the LLM the first ``k`` tokens of each image, not the ``k`` the plan chose;
* ``llm_wrong_rows``: the same at the LLM stage: the first ``k`` image rows survive, not the plan's ``k``;
* ``ignored_compact``: ``vision_positions="compact"`` accepted and ignored (1-D families only);
* ``shifted_rows``: the kept rows reach the LLM one row late (each placeholder gets its neighbour's row);
* ``swapped_roles``: image and question roles swapped in what the LLM strategies see;
* ``unpruned_positions``: the packed rows get the positions of the unpruned prompt's last columns, not
  their own;
* ``stale_state``: the first call's encoded images are kept on the adapter and reused by later calls;
* ``merged_images``: the strategy sees one row per sample (its images joined), as a per-sample
  ``pooler_output`` read as per-image would give.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..strategy import LLMContext, LLMPlan, PruningStrategy, TokenRole, VisionContext, VisionPlan, VisionSignals
from .tokens import IMAGES_PER_SAMPLE

__all__ = ["COMPACT_MUTANTS", "MUTANTS", "VISION_MUTANTS", "applies", "check_mutants", "mutant"]


def _changed(step: PruningStrategy, change: Callable[..., Any]) -> PruningStrategy:
    """A copy of ``step`` (same parameters and attributes) whose call is ``change(run, ctx)``, ``run`` the original."""
    original = type(step)

    class Changed(original):  # type: ignore[misc, valid-type]
        def __call__(self, ctx: Any) -> Any:
            return change(lambda c: original.__call__(self, c), ctx)

    changed = object.__new__(Changed)
    changed.__dict__.update(step.__dict__)
    return changed


def _wrap_vision_step(
    adapter: type, name: str, change: Callable[[Callable[[VisionContext], VisionPlan], VisionContext], VisionPlan]
) -> type:
    """A subclass of ``adapter`` whose vision step is ``change(step, ctx)`` instead of ``step(ctx)``."""
    from ..pipeline import Pipeline

    class Mutant(adapter):  # type: ignore[misc, valid-type]
        def __init__(self, model: Any, pipeline: Any, **options: Any) -> None:
            super().__init__(model, pipeline, **options)
            step = self.pipeline.vision
            if step is not None:
                changed = _changed(step, change)
                self.pipeline = Pipeline([changed if s is step else s for s in self.pipeline])

    return Mutant


def _llm_first_k(adapter: type) -> type:
    """The LLM step keeps as many image rows as its plan, but the first ones."""

    def first_k(run: Callable[[LLMContext], LLMPlan], ctx: LLMContext) -> LLMPlan:
        plan = run(ctx)
        image = ctx.role_mask(TokenRole.IMAGE)
        count = (plan.keep & image).sum(dim=1, keepdim=True)
        rank = image.long().cumsum(dim=1)
        return replace(plan, keep=(plan.keep & ~image) | (image & (rank <= count)))

    class Mutant(adapter):  # type: ignore[misc, valid-type]
        def _llm_step(self, call: Any, step: PruningStrategy, *args: Any) -> Any:
            return super()._llm_step(call, _changed(step, first_k), *args)

    return Mutant


def _first_k(run: Callable[[VisionContext], VisionPlan], ctx: VisionContext) -> VisionPlan:
    plan = run(ctx)
    count = plan.keep.sum(dim=1, keepdim=True)
    first = torch.arange(plan.keep.shape[1], device=plan.keep.device)[None, :] < count
    return replace(plan, keep=first & ctx.token_valid)


def _merged(run: Callable[[VisionContext], VisionPlan], ctx: VisionContext) -> VisionPlan:
    """Rows ``g*m .. g*m+m-1`` (one sample's ``m`` images) joined into one row, then split back."""
    m = IMAGES_PER_SAMPLE
    counts, valid = ctx.token_counts, ctx.token_valid
    groups = ctx.batch_size // m
    tokens = [ctx.features[i][valid[i]] for i in range(ctx.batch_size)]
    joined = [torch.cat(tokens[g * m : (g + 1) * m]) for g in range(groups)]
    features = torch.nn.utils.rnn.pad_sequence(joined, batch_first=True)
    lengths = torch.tensor([j.shape[0] for j in joined], device=features.device)

    def fetch(signal: Any) -> Any:
        raise AssertionError(f"the merged mutant provides no {signal}")

    signals = VisionSignals(fetch, ctx.signals.num_layers, ctx.signals.num_heads, declared=frozenset(), lengths=lengths)
    plan = run(VisionContext(features=features, signals=signals, lengths=lengths))
    keep = torch.zeros_like(valid)
    for g in range(groups):
        start = 0
        for i in range(g * m, (g + 1) * m):
            n = int(counts[i])
            keep[i, :n] = plan.keep[g, start : start + n]
            start += n
    return VisionPlan(keep=keep)


def _shifted_rows(adapter: type) -> type:
    class Mutant(adapter):  # type: ignore[misc, valid-type]
        def _vision(self, call: Any, pixel_values: Any, encoded: Any, options: dict) -> Any:
            encoder_out, out = super()._vision(call, pixel_values, encoded, options)
            if out is not None:
                out.kept = torch.roll(out.kept, 1, dims=0)
            return encoder_out, out

    return Mutant


def _stale_state(adapter: type) -> type:
    class Mutant(adapter):  # type: ignore[misc, valid-type]
        def _vision(self, call: Any, pixel_values: Any, encoded: Any, options: dict) -> Any:
            fresh = super()._vision(call, pixel_values, encoded, options)  # the strategy runs every call
            return self.__dict__.setdefault("_mutant_first", fresh)

    return Mutant


def _swapped_roles(adapter: type) -> type:
    class Mutant(adapter):  # type: ignore[misc, valid-type]
        def _vision_assembly(self, *args: Any, **kwargs: Any) -> Any:
            seq, image_sample = super()._vision_assembly(*args, **kwargs)
            image, question = seq.roles == TokenRole.IMAGE, seq.roles == TokenRole.QUESTION
            roles = torch.where(image, int(TokenRole.QUESTION), torch.where(question, int(TokenRole.IMAGE), seq.roles))
            return replace(seq, roles=roles), image_sample

    return Mutant


def _ignored_compact(adapter: type) -> type:
    """``vision_positions="compact"`` accepted, then ignored: the kept rows keep their original positions."""

    class Mutant(adapter):  # type: ignore[misc, valid-type]
        def _stage_positions(self, seq: Any, mode: str, shift: Tensor, full_count: Tensor) -> Any:
            return seq, shift

    return Mutant


def _unpruned_positions(adapter: type) -> type:
    class Mutant(adapter):  # type: ignore[misc, valid-type]
        def _vision_assembly(self, input_ids: Tensor, embeds: Tensor, valid: Tensor, pos: Tensor, *rest: Any) -> Any:
            seq, image_sample = super()._vision_assembly(input_ids, embeds, valid, pos, *rest)
            width = seq.pos.shape[1]
            return seq.with_positions(pos[:, pos.shape[1] - width :]), image_sample

    return Mutant


#: Each mutant by name: ``adapter class -> wrong subclass``.
MUTANTS: dict[str, Callable[[type], type]] = {
    "wrong_rows": lambda adapter: _wrap_vision_step(adapter, "wrong_rows", _first_k),
    "shifted_rows": _shifted_rows,
    "swapped_roles": _swapped_roles,
    "unpruned_positions": _unpruned_positions,
    "stale_state": _stale_state,
    "merged_images": lambda adapter: _wrap_vision_step(adapter, "merged_images", _merged),
    "llm_wrong_rows": _llm_first_k,
    "ignored_compact": _ignored_compact,
}


#: The mutants that only change what a vision-stage step does (no-ops on an adapter without one).
VISION_MUTANTS = frozenset({"wrong_rows", "merged_images"})
#: The mutants that only change compact renumbering (no-ops where ``patch`` refuses it: M-RoPE families).
COMPACT_MUTANTS = frozenset({"ignored_compact"})


def applies(adapter: type, name: str) -> bool:
    """Whether mutant ``name`` changes anything on ``adapter`` (a vision stage, compact positions)."""
    from .tokens import accepts_compact, has_vision_stage

    if name in VISION_MUTANTS:
        return has_vision_stage(adapter)
    if name in COMPACT_MUTANTS:
        return accepts_compact(adapter)
    return True


def mutant(adapter: type, name: str) -> type:
    """The mutant ``name`` of ``adapter`` (a subclass with the same ``name`` and tiny case)."""
    if name not in MUTANTS:
        raise KeyError(f"unknown mutant {name!r}; available: {', '.join(MUTANTS)}")
    cls = MUTANTS[name](adapter)
    cls.__name__ = cls.__qualname__ = f"{adapter.__name__}_{name}"
    return cls


def check_mutants(adapter: type, names: list[str] | None = None) -> None:
    """Every mutant of ``adapter`` fails the ``tokens`` check; ``AssertionError`` naming those that pass."""
    from .tokens import check_tokens

    escaped = []
    for name in names or list(MUTANTS):
        if not applies(adapter, name):
            continue  # nothing to get wrong: the adapter refuses what the mutant changes
        try:
            check_tokens(mutant(adapter, name))
        except AssertionError:
            continue
        escaped.append(name)
    if escaped:
        raise AssertionError(f"{adapter.name}: the tokens check let these wrong adapters through: {', '.join(escaped)}")
