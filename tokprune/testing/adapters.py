"""The adapter contract: checks every registered model adapter (built-in or plugin) must pass.

Like timm's one forward test over ``list_models()``, tests/ parametrises these checks over
:func:`tokprune.adapters.registered_adapters`. Each adapter brings its own tiny random model through
:meth:`~tokprune.adapters.ModelAdapter.tiny` (a :class:`TinyCase`: a model built from a config and
``make_inputs`` for ragged batches); an adapter without one is reported, not silently passed. A plugin
adapter can run the whole contract, mutation tests included, in one call (it need not be registered)::

    from tokprune.testing.adapters import check_adapter
    def test_my_adapter():
        check_adapter(MyAdapter)

or parametrise over the checks (each ``check(MyAdapter)``) to see them apart::

    from tokprune.testing.adapters import CHECKS
    @pytest.mark.parametrize("check", CHECKS.values(), ids=CHECKS.keys())
    def test_my_adapter(check):
        check(MyAdapter)

What is checked (:data:`CHECKS`; each raises ``AssertionError`` naming what broke):

* ``tokens``: what the decoder layers receive is what the stock model's receive at the kept slots: the
  rows at image positions are the projected rows the vision plan chose, in order, one strategy row per
  image (two images per sample), with the family's positions; the LLM step sees the kept rows' roles
  and keeps its plan's rows; fp32 and bf16, two calls in a row (:mod:`tokprune.testing.tokens`). Its
  mutation tests (:mod:`tokprune.testing.mutants`) show it rejects wrong adapters;
* ``keep_all``: a pipeline keeping everything at both stages gives the stock logits (``1e-5``);
* ``remove_restores``: after ``remove()`` no instance attribute or hook is left and the logits are
  bit-identical to before patching;
* ``batch_solo``: ragged keep counts at both stages (a different count per sample): each sample of a
  left-padded ragged batch gives its solo logits (``1e-4``) and greedy tokens;
* ``cache``: greedy ``generate`` with the cache == recomputing without it, for every registered
  strategy the adapter accepts on its tower (:func:`cache_equivalence` for one strategy);
* ``sdpa_eager``: the same model under sdpa and eager attention selects the same tokens at both stages;
* ``stats``: the counts add up (layer 0 sees the prompt minus what the vision stage dropped, each LLM
  step's count is what the next layers see, visual <= all, FLOPs pruned <= unpruned, equal when all kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters._tiny import TinyCase
from ..errors import MissingCapabilityError, StrategyParamError
from ..pipeline import Pipeline
from ..strategy import LLMContext, LLMPlan, VisionContext, VisionPlan
from .equivalence import ProbeLastRow, ProbeVisionNorm, ProbeVisionTopK

__all__ = ["CHECKS", "TinyCase", "cache_equivalence", "check_adapter", "contract_specs", "tiny_case"]

#: Question lengths of the ragged batch (different lengths: left padding differs per row).
LENGTHS: tuple[int, ...] = (5, 2, 8)


def tiny_case(adapter: type, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
    """The adapter's tiny case; ``AssertionError`` when the adapter offers none (the contract needs one)."""
    case = adapter.tiny(seed=seed, attn_implementation=attn_implementation)
    if case is None:
        raise AssertionError(
            f"adapter {adapter.name!r} provides no tiny model (ModelAdapter.tiny): the adapter contract cannot run"
        )
    if not adapter.matches(case.model):
        raise AssertionError(
            f"adapter {adapter.name!r} does not match its own tiny model: {adapter.mismatch(case.model)}"
        )
    return replace(case, adapter=adapter)


class _RecordLastRow(ProbeLastRow):
    """:class:`ProbeLastRow` that reports its keep mask (``diagnostics["keep"]``) for comparisons."""

    def plan(self, ctx: LLMContext) -> LLMPlan:
        plan = super().plan(ctx)
        return replace(plan, diagnostics={**plan.diagnostics, "keep": plan.keep})


class _RecordVisionTopK(ProbeVisionTopK):
    """:class:`ProbeVisionTopK` that reports its keep mask (``diagnostics["keep"]``)."""

    def plan(self, ctx: VisionContext) -> VisionPlan:
        plan = super().plan(ctx)
        return replace(plan, diagnostics={**plan.diagnostics, "keep": plan.keep})


class _RecordVisionNorm(ProbeVisionNorm):
    """:class:`ProbeVisionNorm` that reports its keep mask (``diagnostics["keep"]``)."""

    def plan(self, ctx: VisionContext) -> VisionPlan:
        plan = super().plan(ctx)
        return replace(plan, diagnostics={**plan.diagnostics, "keep": plan.keep})


def _vision_probe(case: TinyCase, **params: Any) -> list[Any]:
    """The CLS probe where the tower has a CLS token, else the CLS-free one; none for an adapter without a
    vision stage (it refuses both at patch(); the checks then cover the LLM stage)."""
    for probe in (_RecordVisionTopK(**params), _RecordVisionNorm(**params)):
        try:
            _patch(case.model, Pipeline([probe]), case).remove()
        except MissingCapabilityError:
            continue
        return [probe]
    return []


def _ragged(case: TinyCase) -> Pipeline:
    """Both stages (where the adapter has a vision stage), a different keep count per sample at each."""
    return Pipeline([*_vision_probe(case, ragged=True, extra=1), _RecordLastRow(layer=case.llm_layer, ragged=True)])


def _patch(model: nn.Module, spec: Any, case: TinyCase, **options: Any) -> Any:
    import tokprune

    options.setdefault("adapter", case.adapter)
    return tokprune.patch(model, spec, question_end=case.question_end, **options)


def _logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    # Position ids from the mask (as generate builds them), so padding does not shift positions.
    position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**inputs, position_ids=position_ids).logits.float()


def _greedy(model: nn.Module, inputs: dict[str, Tensor], case: TinyCase, **kwargs: Any) -> Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=case.pad_token_id, **kwargs)
    return out[:, inputs["input_ids"].shape[1] :]


def _footprint(model: nn.Module) -> tuple[list[tuple[str, str]], int]:
    """Instance attributes shadowing methods of every module, and the number of forward hooks."""
    shadowed = [
        (name, attr)
        for name, module in [("", model), *model.named_modules()]
        for attr, value in vars(module).items()
        if callable(value) and not isinstance(value, nn.Module) and hasattr(type(module), attr)
    ]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return shadowed, hooks


# -- the checks ----------------------------------------------------------------------------------------


def check_keep_all(adapter: type) -> None:
    case = tiny_case(adapter)
    inputs = case.make_inputs(LENGTHS)
    reference = _logits(case.model, inputs)
    spec = Pipeline([*_vision_probe(case, keep_ratio=1.0), ProbeLastRow(layer=case.llm_layer, keep_ratio=1.0)])
    for keep_all in (spec, "none"):
        with _patch(case.model, keep_all, case):
            patched = _logits(case.model, inputs)
        valid = inputs["attention_mask"].bool()
        err = (patched - reference)[valid].abs().max().item()
        assert err <= 1e-5, f"{adapter.name}: {keep_all} keeps everything but differs from the stock model by {err:.3g}"


def check_remove_restores(adapter: type) -> None:
    case = tiny_case(adapter)
    inputs = case.make_inputs(LENGTHS)
    before, footprint = _logits(case.model, inputs), _footprint(case.model)
    handle = _patch(case.model, _ragged(case), case)
    try:
        assert _footprint(case.model) != footprint, f"{adapter.name}: patch() changed nothing on the model"
        pruned = _logits(case.model, inputs)
    finally:
        handle.remove()
    assert _footprint(case.model) == footprint, f"{adapter.name}: remove() left {_footprint(case.model)} != {footprint}"
    assert torch.equal(_logits(case.model, inputs), before), f"{adapter.name}: logits after remove() differ"
    assert not torch.allclose(pruned[:, -1], before[:, -1]), f"{adapter.name}: the ragged pipeline changed nothing"


def check_batch_solo(adapter: type, atol: float = 1e-4, **options: Any) -> None:
    """``options`` go to ``patch`` (e.g. ``budget_scope="tile"``)."""
    case = tiny_case(adapter)
    batch = case.make_inputs(LENGTHS)
    pipeline = _ragged(case)
    with _patch(case.model, pipeline, case, **options) as run:
        logits, tokens = _logits(case.model, batch)[:, -1], _greedy(case.model, batch, case)
        stats = run.stats
        assert stats is not None
        for i, q in enumerate(LENGTHS):
            solo = case.make_inputs([q], seeds=[i])
            err = (_logits(case.model, solo)[0, -1] - logits[i]).abs().max().item()
            assert err <= atol, f"{adapter.name}: sample {i} logits differ from its solo run by {err:.3g} > {atol}"
            solo_tokens = _greedy(case.model, solo, case)
            assert torch.equal(solo_tokens[0], tokens[i]), (
                f"{adapter.name}: sample {i} greedy tokens {tokens[i].tolist()} != solo {solo_tokens[0].tolist()}"
            )
    # The check only means something if the counts really differ per sample at both stages.
    if pipeline.vision is not None:
        assert len(set(stats.visual_kept.tolist())) > 1, f"{adapter.name}: vision-stage counts are not ragged"
    dropped = stats.seq_len - stats.llm_kept[case.llm_layer]
    assert len(set(dropped.tolist())) > 1, f"{adapter.name}: LLM-stage counts are not ragged"


def contract_specs() -> list[str]:
    """Every registered strategy, with a schedule that fits the tiny models' shallow decoders."""
    import tokprune

    shallow = {"pyramiddrop": "pyramiddrop(layer=(1, 2, 3), keep_ratio=(0.5, 0.25, 0.125))"}
    return [shallow.get(name, name) for name in tokprune.strategies.available()]


def cache_equivalence(adapter: type, spec: Any, **options: Any) -> Tensor | None:
    """Greedy generation with the cache == without it for ``spec``; None when the adapter refuses ``spec``.

    A refusal must come at ``patch()`` (:class:`~tokprune.errors.MissingCapabilityError`, or a layer
    out of this model's range), never during a forward. ``options`` go to ``patch``.
    """
    case = tiny_case(adapter)
    inputs = case.make_inputs(LENGTHS)
    try:
        handle = _patch(case.model, spec, case, **options)
    except (MissingCapabilityError, StrategyParamError):
        return None
    with handle:
        cached = _greedy(case.model, inputs, case, use_cache=True)
        uncached = _greedy(case.model, inputs, case, use_cache=False)
    assert torch.equal(cached, uncached), (
        f"{adapter.name} {spec!r}: cached and uncached greedy generation differ:\n"
        f"cache:    {cached.tolist()}\nno cache: {uncached.tolist()}"
    )
    return cached


def check_cache(adapter: type) -> None:
    accepted = [spec for spec in contract_specs() if cache_equivalence(adapter, spec) is not None]
    assert accepted, f"{adapter.name}: refused every registered strategy"


def check_sdpa_eager(adapter: type) -> None:
    selections = []
    for impl in ("sdpa", "eager"):
        case = tiny_case(adapter, attn_implementation=impl)
        with _patch(case.model, _ragged(case), case) as run:
            _logits(case.model, case.make_inputs(LENGTHS))
        assert run.stats is not None
        selections.append({k: v for k, v in run.stats.diagnostics.items() if k.endswith(".keep")})
    sdpa, eager = selections
    assert sdpa.keys() == eager.keys() and sdpa, f"{adapter.name}: missing keep masks {sorted(sdpa)}"
    for key in sdpa:
        assert torch.equal(sdpa[key], eager[key]), f"{adapter.name}: sdpa and eager select different tokens ({key})"


def check_stats(adapter: type) -> None:
    case = tiny_case(adapter)
    inputs = case.make_inputs(LENGTHS)
    k = case.llm_layer
    with _patch(case.model, _ragged(case), case) as run:
        _logits(case.model, inputs)
    s = run.stats
    assert s is not None
    assert s.visual_unpruned is not None and s.image_sample is not None and s.image_kept is not None
    unpruned_visual = s.visual_unpruned
    per_sample = torch.zeros_like(s.visual_kept).index_add_(0, s.image_sample, s.image_kept)
    assert torch.equal(per_sample, s.visual_kept), "per-image kept counts do not add up to the sample's"
    assert torch.equal(torch.bincount(s.image_sample, minlength=len(LENGTHS)), s.images), "images per sample"
    assert torch.equal(s.seq_len, inputs["attention_mask"].sum(dim=1)), "seq_len is not the prompt length"
    assert torch.equal(s.layer_tokens[:, 0], s.seq_len - unpruned_visual + s.visual_kept), "layer 0 count"
    assert torch.equal(s.layer_visual[:, 0], s.visual_kept), "visual tokens entering the LLM"
    assert torch.equal(s.layer_tokens[:, k], s.llm_kept[k]), "tokens after the LLM step"
    assert torch.equal(s.layer_tokens[:, :k], s.layer_tokens[:, :1].expand(-1, k)), "layers before the step"
    assert bool((s.layer_tokens[:, k:] == s.llm_kept[k][:, None]).all()), "layers after the step"
    assert bool((s.layer_visual <= s.layer_tokens).all()) and bool((s.layer_tokens[:, k] < s.layer_tokens[:, 0]).all())
    assert bool((s.flops_pruned < s.flops_unpruned).all()), "pruning must lower the FLOP count"
    with _patch(case.model, "none", case) as run:
        _logits(case.model, inputs)
    assert run.stats is not None and torch.equal(run.stats.flops_pruned, run.stats.flops_unpruned)
    assert torch.equal(run.stats.layer_visual[:, 0], unpruned_visual), "keep-all must see every image token"


def check_tokens(adapter: type) -> None:
    """The LLM receives exactly the projected rows the plans kept, at the family's positions
    (:mod:`tokprune.testing.tokens`)."""
    from .tokens import check_tokens as check

    check(adapter)


#: Every check of the adapter contract, by name.
CHECKS: dict[str, Callable[[type], None]] = {
    "tokens": check_tokens,
    "keep_all": check_keep_all,
    "remove_restores": check_remove_restores,
    "batch_solo": check_batch_solo,
    "cache": check_cache,
    "sdpa_eager": check_sdpa_eager,
    "stats": check_stats,
}


def check_adapter(adapter: type, checks: Sequence[str] | None = None, mutants: bool = True) -> None:
    """The whole adapter contract on ``adapter`` in one call (registered or not): every check of
    :data:`CHECKS` (or those named in ``checks``), then, with ``mutants``, that the ``tokens`` check
    rejects every deliberately wrong variant of it (:mod:`tokprune.testing.mutants`).

    Raises ``AssertionError`` naming the first check that failed."""
    from .mutants import check_mutants

    for name in checks or list(CHECKS):
        if name not in CHECKS:
            raise KeyError(f"unknown adapter check {name!r}; available: {', '.join(CHECKS)}")
        CHECKS[name](adapter)
    if mutants:
        check_mutants(adapter)
