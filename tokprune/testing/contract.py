"""The strategy contract: checks every registered strategy (built-in or plugin) must pass, on random inputs.

Run all of them on your own strategy::

    from tokprune.testing.contract import check_strategy
    check_strategy("my_strategy(keep=8)")      # a spec, an instance or a class; raises ContractFailure

or parametrise pytest over the individual checks (each raises :class:`ContractFailure`, an
``AssertionError``, naming what broke)::

    @pytest.mark.parametrize("check", CHECKS.values(), ids=CHECKS.keys())
    def test_contract(check):
        check(MyStrategy())

What is checked (:data:`CHECKS`):

* ``valid_plan``: the plan has the right type, mask shape and dtype, ``[B, ...]`` diagnostics, finite
  merged/extra features (LLM stage: finite merged hidden states in the context's dtype), and at least
  one kept token per sample;
* ``roles``: LLM stage: the raw ``plan()`` (before the interface forces protected roles back on) drops
  nothing outside :func:`~tokprune.strategy.droppable_roles` (image; question text with ``drops_text``;
  template with ``drops_template``), at every layer of its schedule;
* ``bounds``: strategies with ``min_keep``/``max_keep``/``keep`` parameters keep a count within them
  (capped at the candidate count; the candidates are ``diagnostics["candidates"]`` when the strategy
  reports them, else every patch / every droppable position);
* ``deterministic``: two calls on identical inputs give identical plans;
* ``batch_invariant``: every sample alone selects what it selects inside a batch of 4 (LLM stage: with a
  different left padding per sample; compared on the real positions);
* ``ragged``: vision strategies declaring ``ragged_vision``: with images of different sizes (padded
  rows, ``ctx.lengths``) padding is never kept and each image selects what it selects alone;
* ``dtypes``: fp32, bf16 and fp16 inputs all give valid plans without NaN;
* ``degenerate``: constant features and signals, and tiny inputs (1 to 3 patches / image tokens), give
  valid plans without NaN;
* ``requires``: ``requires()`` returns :class:`Signal` s and covers every encoder signal ``plan`` reads
  (the fabricated :class:`VisionSignals` only hold the declared ones, so any undeclared read fails).

The building blocks (:class:`VisionBatch`, :class:`LLMBatch` and :func:`make_batch`, from
:mod:`tokprune.testing.batches`; :func:`run`) are public so plugin authors
can write their own checks on the same fabricated inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from tokprune.errors import StrategyContractError
from tokprune.strategy import (
    LLMPlan,
    PruningStrategy,
    Signal,
    Stage,
    TokenRole,
    VisionPlan,
    droppable_roles,
    kept_roles,
)

from .batches import Batch, LLMBatch, VisionBatch, make_batch

__all__ = [
    "CHECKS",
    "DTYPES",
    "ContractFailure",
    "LLMBatch",
    "VisionBatch",
    "check_strategy",
    "contract_cases",
    "make_batch",
    "resolve",
    "run",
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ContractFailure(AssertionError):
    """A strategy broke the contract; the message names the strategy, the check and what broke."""


# --------------------------------------------------------------------------------------------------
# Running and comparing
# --------------------------------------------------------------------------------------------------


def _fail(strategy: PruningStrategy, check: str, message: str) -> ContractFailure:
    return ContractFailure(f"{strategy.spec()}: {check}: {message}")


def run(strategy: PruningStrategy, batch: Batch, check: str = "run") -> VisionPlan | LLMPlan:
    """``strategy(batch.context())`` with interface errors turned into :class:`ContractFailure`."""
    try:
        return strategy(batch.context())
    except StrategyContractError as exc:
        raise _fail(strategy, check, str(exc)) from exc


def _vision_outputs(plan: VisionPlan) -> Iterator[tuple[str, Tensor]]:
    if plan.features is not None:
        yield "features", plan.features
    if plan.extra is not None:
        # only the real extra tokens reach the LLM (``extra_valid``); a single row's are compared as ``[1, E', C]``
        if plan.extra_valid is None:
            yield "extra", plan.extra
        elif plan.extra.shape[0] == 1:
            yield "extra", plan.extra[:, plan.extra_valid[0]]
        else:
            yield "extra", plan.extra[plan.extra_valid]


def _has_extra(plan: VisionPlan) -> bool:
    """Whether any extra token of ``plan`` reaches the LLM (none: ``extra`` None, empty or all invalid)."""
    if plan.extra is None:
        return False
    return bool(plan.extra_valid.any()) if plan.extra_valid is not None else plan.extra.shape[1] > 0


def _check_plan(strategy: PruningStrategy, batch: Batch, plan: VisionPlan | LLMPlan, check: str) -> None:
    """Type, shapes, dtypes, finiteness, diagnostics and a non-empty keep set."""
    b = batch.batch_size
    expected = VisionPlan if strategy.stage is Stage.VISION else LLMPlan
    if not isinstance(plan, expected):
        raise _fail(strategy, check, f"returned {type(plan).__name__}, expected {expected.__name__}")
    shape = tuple(batch.features.shape[:2]) if isinstance(batch, VisionBatch) else tuple(batch.roles.shape)
    if plan.keep.dtype != torch.bool or tuple(plan.keep.shape) != shape:
        raise _fail(strategy, check, f"keep is {plan.keep.dtype} {tuple(plan.keep.shape)}, expected bool {shape}")
    if isinstance(plan, VisionPlan):
        for name, t in _vision_outputs(plan):
            if not torch.isfinite(t).all():
                raise _fail(strategy, check, f"{name} has NaN/inf entries")
            if t.dtype != batch.features.dtype:
                raise _fail(strategy, check, f"{name} is {t.dtype}, features are {batch.features.dtype}")
    else:
        if plan.hidden is not None:
            if not torch.isfinite(plan.hidden).all():
                raise _fail(strategy, check, "merged hidden states have NaN/inf entries")
            if plan.hidden.dtype != batch.hidden.dtype:
                raise _fail(strategy, check, f"hidden is {plan.hidden.dtype}, the context's is {batch.hidden.dtype}")
        kept_real = (plan.keep & (batch.roles != TokenRole.PADDING)).sum(dim=1)
        if (kept_real == 0).any():
            raise _fail(
                strategy, check, f"kept no real position in samples {(kept_real == 0).nonzero().flatten().tolist()}"
            )
    empty = (plan.keep.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise _fail(strategy, check, f"kept nothing in samples {empty}")
    for key, value in plan.diagnostics.items():
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] != b:
            raise _fail(strategy, check, f"diagnostics[{key!r}] has leading size {value.shape[0]}, expected B={b}")


def _same_plan(strategy: PruningStrategy, a: Any, b: Any, check: str, what: str, exact: bool) -> None:
    if not torch.equal(a.keep, b.keep):
        rows = (a.keep != b.keep).any(dim=-1).nonzero().flatten().tolist()
        raise _fail(strategy, check, f"{what}: keep masks differ (rows {rows})")
    if isinstance(a, VisionPlan):
        for (name, x), (_, y) in zip(_vision_outputs(a), _vision_outputs(b)):
            same = torch.equal(x, y) if exact else torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5)
            if not same:
                raise _fail(strategy, check, f"{what}: {name} differ")
        if (a.features is None) != (b.features is None) or _has_extra(a) != _has_extra(b):
            raise _fail(strategy, check, f"{what}: one plan has merged/extra features, the other not")
    elif (a.hidden is None) != (b.hidden is None):
        raise _fail(strategy, check, f"{what}: one plan has merged hidden states, the other not")
    elif a.hidden is not None:
        # compared where it is read: at kept positions
        x, y = a.hidden[a.keep], b.hidden[b.keep]
        same = torch.equal(x, y) if exact else torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5)
        if not same:
            raise _fail(strategy, check, f"{what}: merged hidden states differ")


def _slice_plan(plan: Any, i: int, start: int = 0) -> Any:
    if isinstance(plan, VisionPlan):
        return VisionPlan(
            keep=plan.keep[i : i + 1],
            features=None if plan.features is None else plan.features[i : i + 1],
            extra=None if plan.extra is None else plan.extra[i : i + 1],
            extra_valid=None if plan.extra_valid is None else plan.extra_valid[i : i + 1],
        )
    hidden = None if plan.hidden is None else plan.hidden[i : i + 1, start:]
    return LLMPlan(keep=plan.keep[i : i + 1, start:], hidden=hidden)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def check_valid_plan(strategy: PruningStrategy) -> None:
    """Valid types, shapes, dtypes, finite outputs, ``[B, ...]`` diagnostics, at least one kept token
    (LLM stage: at every layer of the strategy's schedule)."""
    batch = make_batch(strategy)
    _check_plan(strategy, batch, run(strategy, batch, "valid_plan"), "valid_plan")
    for layer in strategy.llm_layers[1:]:
        later = dataclasses.replace(batch, layer=layer)
        _check_plan(strategy, later, run(strategy, later, f"valid_plan[layer={layer}]"), f"valid_plan[layer={layer}]")


def check_roles(strategy: PruningStrategy) -> None:
    """LLM stage: the *raw* plan (``plan()``, before ``__call__`` forces protected roles back on) drops
    only roles in :func:`~tokprune.strategy.droppable_roles`, at every layer of the strategy."""
    if strategy.stage is not Stage.LLM:
        return
    for layer in strategy.llm_layers:
        batch = dataclasses.replace(make_batch(strategy), layer=layer)
        with torch.no_grad():
            raw = strategy.plan(batch.context())
        if not isinstance(raw, LLMPlan) or tuple(raw.keep.shape) != tuple(batch.roles.shape):
            raise _fail(strategy, "roles", f"plan() returned {type(raw).__name__}, not an LLMPlan of the roles' shape")
        for role in sorted(kept_roles(strategy)):
            dropped = ((batch.roles == role) & ~raw.keep).sum().item()
            if dropped:
                raise _fail(
                    strategy,
                    "roles",
                    f"plan() at layer {layer} dropped {dropped} {role.name} positions; "
                    f"{strategy.name} may drop only {sorted(r.name for r in droppable_roles(strategy))}",
                )


def _candidates(strategy: PruningStrategy, batch: Batch, plan: Any) -> Tensor:
    given = plan.diagnostics.get("candidates")
    if isinstance(given, Tensor):
        return given.bool()
    if isinstance(batch, VisionBatch):
        return torch.ones_like(plan.keep)
    return torch.isin(batch.roles, torch.tensor([int(r) for r in sorted(droppable_roles(strategy))]))


def check_bounds(strategy: PruningStrategy) -> None:
    """Kept counts respect ``min_keep``/``max_keep``/``keep`` (each capped at the candidate count)."""
    names = {f.name for f in dataclasses.fields(strategy.params)}
    if not names & {"min_keep", "max_keep", "keep"}:
        return
    for size in (None, 2):
        batch = make_batch(strategy) if size is None else make_batch(strategy, size=size)
        plan = run(strategy, batch, "bounds")
        cand = _candidates(strategy, batch, plan)
        n = cand.sum(dim=1)
        kept = (plan.keep & cand).sum(dim=1)
        p = strategy.params
        if "min_keep" in names and (kept < torch.clamp(n, max=p.min_keep)).any():
            raise _fail(strategy, "bounds", f"kept {kept.tolist()} of {n.tolist()} candidates < min_keep={p.min_keep}")
        if "max_keep" in names and p.max_keep is not None and (kept > p.max_keep).any():
            raise _fail(strategy, "bounds", f"kept {kept.tolist()} candidates > max_keep={p.max_keep}")
        # a method whose rule keeps a floor whatever the budget (EVS: the first frame) reports it as keep_floor
        floor = plan.diagnostics.get("keep_floor", torch.zeros_like(n))
        wanted = torch.maximum(torch.clamp(n, max=p.keep), floor) if "keep" in names and p.keep is not None else None
        if wanted is not None and not torch.equal(kept, wanted):
            raise _fail(strategy, "bounds", f"kept {kept.tolist()} of {n.tolist()} candidates, keep={p.keep}")


def check_deterministic(strategy: PruningStrategy) -> None:
    """Two calls on identical (freshly built) inputs give identical plans."""
    first = run(strategy, make_batch(strategy), "deterministic")
    second = run(strategy, make_batch(strategy), "deterministic")
    _same_plan(strategy, first, second, "deterministic", "two calls", exact=True)


def check_batch_invariant(strategy: PruningStrategy) -> None:
    """Each sample alone selects what it selects in a batch of 4 (LLM: different padding per sample)."""
    for seed in (0, 1):
        batch = make_batch(strategy, seed=seed)
        plan = run(strategy, batch, "batch_invariant")
        for i in range(batch.batch_size):
            solo = run(strategy, batch.sample(i), "batch_invariant")
            start = batch.padding[i] if isinstance(batch, LLMBatch) else 0
            _same_plan(
                strategy, _slice_plan(plan, i, start), solo, "batch_invariant", f"sample {i} (seed {seed})", exact=False
            )


def check_ragged(strategy: PruningStrategy) -> None:
    """Vision strategies with ``ragged_vision``: in a batch of images of different sizes (padded rows
    with ``ctx.lengths``), padding is never kept and each image selects what it selects alone."""
    if strategy.stage is not Stage.VISION or not strategy.ragged_vision:
        return
    for seed in (0, 1):
        full = make_batch(strategy, seed=seed)
        n = full.features.shape[1]
        batch = full.ragged((n, n - 5, n // 2, 3))
        plan = run(strategy, batch, "ragged")  # the interface refuses plans keeping padding
        assert batch.lengths is not None
        for i, length in enumerate(batch.lengths):
            solo = run(strategy, batch.sample(i), "ragged")
            row = _slice_plan(plan, i)
            cropped = VisionPlan(
                keep=row.keep[:, :length],
                features=None if row.features is None else row.features[:, :length],
                extra=row.extra,
                extra_valid=row.extra_valid,
            )
            _same_plan(strategy, cropped, solo, "ragged", f"image {i} of {length} patches (seed {seed})", exact=False)


def check_dtypes(strategy: PruningStrategy) -> None:
    """fp32, bf16 and fp16 inputs give valid plans without NaN."""
    for dtype in DTYPES:
        batch = make_batch(strategy, dtype=dtype)
        _check_plan(strategy, batch, run(strategy, batch, f"dtypes[{dtype}]"), f"dtypes[{dtype}]")


def check_degenerate(strategy: PruningStrategy) -> None:
    """Constant inputs and tiny inputs (1-3 patches or image tokens) give valid plans without NaN."""
    cases: list[tuple[str, dict[str, Any]]] = [("constant", {"constant": True})]
    cases += [(f"size={n}", {"size": n}) for n in (1, 2, 3)]
    cases += [(f"constant size={n}", {"size": n, "constant": True}) for n in (1, 2, 3)]
    for label, kwargs in cases:
        for dtype in (torch.float32, torch.float16):
            batch = make_batch(strategy, dtype=dtype, **kwargs)
            check = f"degenerate[{label}, {dtype}]"
            _check_plan(strategy, batch, run(strategy, batch, check), check)


def check_requires(strategy: PruningStrategy) -> None:
    """``requires()`` is a set of :class:`Signal` and covers everything ``plan`` reads."""
    declared = strategy.requires()
    if not isinstance(declared, (set, frozenset)) or not all(isinstance(s, Signal) for s in declared):
        raise _fail(strategy, "requires", f"requires() must return a frozenset of Signal, got {declared!r}")
    if strategy.stage is Stage.LLM:
        return
    try:
        strategy(make_batch(strategy).context())
    except StrategyContractError as exc:
        raise _fail(strategy, "requires", f"reads an undeclared signal: {exc}") from exc


CHECKS: dict[str, Callable[[PruningStrategy], None]] = {
    "valid_plan": check_valid_plan,
    "roles": check_roles,
    "bounds": check_bounds,
    "deterministic": check_deterministic,
    "batch_invariant": check_batch_invariant,
    "ragged": check_ragged,
    "dtypes": check_dtypes,
    "degenerate": check_degenerate,
    "requires": check_requires,
}
"""Every contract check by name; each takes a strategy instance and raises :class:`ContractFailure`."""


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def resolve(strategy_or_spec: Any) -> list[PruningStrategy]:
    """Strategy instances from an instance, a :class:`PruningStrategy` subclass (default params), a
    pipeline, or a spec accepted by ``tokprune.strategies.get``."""
    if isinstance(strategy_or_spec, PruningStrategy):
        return [strategy_or_spec]
    if isinstance(strategy_or_spec, type) and issubclass(strategy_or_spec, PruningStrategy):
        return [strategy_or_spec()]
    from tokprune import strategies

    return list(strategies.get(strategy_or_spec))


def check_strategy(strategy_or_spec: Any, checks: list[str] | None = None) -> None:
    """Run every contract check (or the named ``checks``) on each strategy of ``strategy_or_spec``.

    Raises:
        ContractFailure: listing every failed check of every strategy.
    """
    names = list(CHECKS) if checks is None else checks
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown contract checks {unknown}; available: {list(CHECKS)}")
    failures = []
    for strategy in resolve(strategy_or_spec):
        for name in names:
            try:
                CHECKS[name](strategy)
            except ContractFailure as exc:
                failures.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - a crash is a contract failure too, reported with its type
                failures.append(f"{strategy.spec()}: {name}: raised {type(exc).__name__}: {exc}")
    if failures:
        raise ContractFailure(f"{len(failures)} contract check(s) failed:\n" + "\n".join(failures))


def contract_cases(specs: list[Any]) -> list[tuple[str, PruningStrategy, str]]:
    """``(id, strategy, check name)`` for every strategy of ``specs`` and every check, for
    ``pytest.mark.parametrize``."""
    cases = []
    for spec in specs:
        for strategy in resolve(spec):
            for name in CHECKS:
                cases.append((f"{strategy.spec()}-{name}", strategy, name))
    return cases
