"""The contract suite over every registered strategy, and proof that it catches broken strategies."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from tokprune import (
    LLMContext,
    LLMPlan,
    PruningStrategy,
    Signal,
    Stage,
    TokenRole,
    VisionContext,
    VisionPlan,
    param,
    scoring,
    strategies,
)
from tokprune.testing.contract import CHECKS, ContractFailure, check_strategy, contract_cases

# Parameter variants of the built-ins beyond their defaults. min_keep=1 variants matter: with the default
# min_keep=16 the small fabricated inputs are mostly clamped, which would hide a broken cut.
VARIANTS: dict[str, list[str]] = {
    "cls_knee": [
        "cls_knee(min_keep=1)",
        "cls_knee(min_keep=1, cut=chord, score=cls_attn_mean)",
        "cls_knee(min_keep=1, cut=iqr, score=cls_sim, layer=-2)",
        "cls_knee(min_keep=1, cut=lof, max_keep=20)",
        "cls_knee(min_keep=2, online=true, sensitivity=0.5, fallback=min)",
        "cls_knee(min_keep=1, fallback=all, layer=3)",
    ],
    "text_interact": [
        "text_interact(min_keep=1)",
        "text_interact(min_keep=1, query=last, cut=chord)",
        "text_interact(min_keep=1, query=all_text, candidates=image, cut=iqr)",
        "text_interact(min_keep=1, cut=lof, lof_neighbors=4, fallback=min)",
        "text_interact(min_keep=1, min_keep_ratio=0.2, max_keep_ratio=0.5, layer=5)",
        "text_interact(min_keep=2, max_keep=6, fallback=fixed, fallback_keep=3)",
    ],
    "prumerge": ["prumerge(iqr_factor=0.5, k_neighbors=4)", "prumerge(min_keep=8, layer=-2, score=cls_attn_mean)"],
    "prumerge_plus": ["prumerge_plus(iqr_factor=0.5, score=cls_sim)", "prumerge_plus(min_keep=30)"],
    "fastv": ["fastv(keep=3)", "fastv(query=question, keep_ratio=0.25)", "fastv(query=all_text, layer=4)"],
    "topk": ["topk(keep=10, score=cls_sim)", "topk(keep_ratio=1.0)", "topk(keep_ratio=0.1, score=cls_attn_mean)"],
    "random": ["random(keep=5, seed=3)", "random(keep_ratio=0.5, seed=12345)"],
    "downsample": ["downsample(keep=9)", "downsample(keep=7)", "downsample(keep_ratio=0.5)"],
    "divprune": ["divprune(keep=7)", "divprune(keep_ratio=0.5)", "divprune(keep_ratio=1.0)"],
    "vispruner": [
        "vispruner(keep=9)",
        "vispruner(keep_ratio=0.5, important_ratio=0.0, step=3)",
        "vispruner(keep=5, important_ratio=1.0, layer=-1)",
    ],
    "cdpruner": ["cdpruner(keep=6)", "cdpruner(relevance=uniform, keep_ratio=0.5)", "cdpruner(theta=0.5, layer=3)"],
    "dart": [
        "dart(keep=5)",
        "dart(keep_ratio=0.5, pivot_image=1, pivot_text=0)",
        "dart(pivot_order=norm, layer=4, merge=true)",
        "dart(keep=3, merge=true, pivot_text=2)",
    ],
    "evs": ["evs(keep=20)", "evs(keep=3)", "evs(keep_ratio=0.5)", "evs(keep_ratio=1.0)"],
    "vidcom2": [
        "vidcom2(keep=20)",
        "vidcom2(keep_ratio=0.5, reconcile=true)",
        "vidcom2(keep_ratio=0.1, low_var_ratio=1.0, temperature=0.5)",
    ],
    "pyramiddrop": [
        "pyramiddrop(layer=(2, 3, 5), keep_ratio=(0.5, 0.25, 0.125))",
        "pyramiddrop(layer=(2), keep_ratio=(0.3), query=question)",
        "pyramiddrop(layer=(1, 4), keep_ratio=(0.6, 0.6), query=all_text)",
    ],
}


def _specs() -> list[str]:
    # every registered strategy (built-in or plugin) with its defaults, plus the built-ins' variants
    specs = []
    for name in strategies.available():
        specs.append(name)
        specs.extend(VARIANTS.get(name, []))
    return specs


CASES = contract_cases(_specs())


@pytest.mark.parametrize(("strategy", "check"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_contract(strategy, check):
    CHECKS[check](strategy)


def test_every_builtin_has_variants():
    builtin = {n for n in strategies.available() if strategies.describe(n).source.name == "builtin"}
    assert builtin <= set(VARIANTS), f"add contract variants for {sorted(builtin - set(VARIANTS))}"


# ---------------------------------------------------------------------------------------------
# Deliberately broken strategies: each must fail the check named in its test.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KeepParams:
    keep: int = param(4, "tokens kept", ge=1)


class PooledStats(PruningStrategy):
    """Keeps tokens above a *batch-pooled* quantile (PruMerge's reference IQR pools like this)."""

    name = "broken_pooled"
    stage = Stage.VISION

    def requires(self):
        return frozenset({Signal("qk", -1)})

    def plan(self, ctx: VisionContext) -> VisionPlan:
        scores = ctx.signals.cls_attention(-1)
        keep = scores > scores.flatten().quantile(0.8)  # over the whole batch: wrong
        keep[:, 0] = True
        return VisionPlan(keep=keep)


class FirstSampleScores(PruningStrategy):
    """FastV's reference bug: ranks every sample by batch item 0's attention row."""

    name = "broken_first_sample"
    stage = Stage.LLM

    @dataclass(frozen=True)
    class Params:
        layer: int = param(2, "decoder layer", ge=1)

    def plan(self, ctx: LLMContext) -> LLMPlan:
        scores = ctx.attention.received(ctx.role_mask(TokenRole.PROTECTED))[:1].expand_as(ctx.roles)
        image = ctx.role_mask(TokenRole.IMAGE)
        keep = scoring.topk_mask(scores.masked_fill(~image, float("-inf")), 3) & image
        return LLMPlan(keep=keep | ~image)


class DropsQuestion(PruningStrategy):
    """Drops question text without declaring ``drops_text``: the interface would silently force it back on,
    so only a check of the raw plan catches it."""

    name = "broken_drops_question"
    stage = Stage.LLM

    @dataclass(frozen=True)
    class Params:
        layer: int = param(2, "decoder layer", ge=1)

    def plan(self, ctx: LLMContext) -> LLMPlan:
        return LLMPlan(keep=~ctx.role_mask(TokenRole.QUESTION))


class InfiniteMerge(PruningStrategy):
    """Returns merged hidden states divided by a count that can be zero."""

    name = "broken_infinite_merge"
    stage = Stage.LLM

    @dataclass(frozen=True)
    class Params:
        layer: int = param(2, "decoder layer", ge=1)

    def plan(self, ctx: LLMContext) -> LLMPlan:
        zero = torch.zeros((), dtype=ctx.hidden.dtype)
        return LLMPlan(keep=torch.ones_like(ctx.valid), hidden=ctx.hidden / zero)


class EmptyMask(PruningStrategy):
    name = "broken_empty"
    stage = Stage.VISION

    def plan(self, ctx: VisionContext) -> VisionPlan:
        return VisionPlan(keep=torch.zeros(ctx.features.shape[:2], dtype=torch.bool))


class UndeclaredRead(PruningStrategy):
    name = "broken_undeclared"
    stage = Stage.VISION
    Params = _KeepParams

    def plan(self, ctx: VisionContext) -> VisionPlan:
        scores = ctx.signals.cls_attention(-1)  # requires() says nothing
        return VisionPlan(keep=scoring.topk_mask(scores, self.params.keep))


class Unseeded(PruningStrategy):
    name = "broken_unseeded"
    stage = Stage.VISION
    Params = _KeepParams

    def plan(self, ctx: VisionContext) -> VisionPlan:
        return VisionPlan(keep=scoring.topk_mask(torch.rand(ctx.features.shape[:2]), self.params.keep))


class NaNOnConstant(PruningStrategy):
    """Standardises features without an epsilon: NaN when every feature is equal."""

    name = "broken_nan"
    stage = Stage.VISION

    def plan(self, ctx: VisionContext) -> VisionPlan:
        x = ctx.features.float()
        z = ((x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)).to(ctx.features.dtype)
        return VisionPlan(keep=torch.ones(x.shape[:2], dtype=torch.bool), features=z)


class IgnoresMinKeep(PruningStrategy):
    name = "broken_min_keep"
    stage = Stage.VISION

    @dataclass(frozen=True)
    class Params:
        min_keep: int = param(8, "lower bound", ge=1)

    def plan(self, ctx: VisionContext) -> VisionPlan:
        keep = torch.zeros(ctx.features.shape[:2], dtype=torch.bool)
        keep[:, 0] = True
        return VisionPlan(keep=keep)


class WrongDtype(PruningStrategy):
    """Returns merged features in fp32 whatever the input dtype."""

    name = "broken_dtype"
    stage = Stage.VISION

    def plan(self, ctx: VisionContext) -> VisionPlan:
        keep = torch.ones(ctx.features.shape[:2], dtype=torch.bool)
        return VisionPlan(keep=keep, features=ctx.features.float() * 1.0)


@pytest.mark.parametrize(
    ("strategy", "check"),
    [
        (PooledStats(), "batch_invariant"),
        (FirstSampleScores(), "batch_invariant"),
        (EmptyMask(), "valid_plan"),
        (UndeclaredRead(), "requires"),
        (Unseeded(), "deterministic"),
        (NaNOnConstant(), "degenerate"),
        (IgnoresMinKeep(), "bounds"),
        (WrongDtype(), "dtypes"),
        (DropsQuestion(), "roles"),
        (InfiniteMerge(), "valid_plan"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_broken_strategy_fails_its_check(strategy, check):
    with pytest.raises(ContractFailure, match=check.split("[")[0]):
        CHECKS[check](strategy)
    with pytest.raises(ContractFailure):
        check_strategy(strategy)


def test_check_strategy_accepts_specs_and_reports_every_failure():
    check_strategy("topk(keep=4)+fastv(keep=2)")  # a pipeline: every step is checked
    with pytest.raises(ContractFailure) as info:
        check_strategy(EmptyMask)
    message = str(info.value)
    assert "broken_empty: valid_plan" in message and "broken_empty: dtypes" in message


def test_check_strategy_rejects_unknown_check_names():
    with pytest.raises(ValueError, match="available"):
        check_strategy("topk", checks=["nope"])


def test_roles_check_sees_what_the_interface_would_hide():
    from tokprune.testing.contract import make_batch

    strategy = DropsQuestion()
    batch = make_batch(strategy)
    enforced = strategy(batch.context())  # __call__ forces QUESTION back on and counts it
    assert not ((batch.roles == TokenRole.QUESTION) & ~enforced.keep).any()
    assert int(enforced.diagnostics["forced_kept"].sum()) == int((batch.roles == TokenRole.QUESTION).sum()) > 0
    with pytest.raises(ContractFailure, match="dropped .* QUESTION positions; broken_drops_question may drop only"):
        CHECKS["roles"](strategy)


def test_one_rule_set_for_droppable_roles():
    from tokprune import droppable_roles, kept_roles

    text = strategies.describe("text_interact")
    assert droppable_roles(text.cls) == {TokenRole.IMAGE, TokenRole.QUESTION}
    assert kept_roles(text.cls) == {TokenRole.PADDING, TokenRole.TEMPLATE, TokenRole.PROTECTED}
    assert "may drop: image, question text" in str(text)
    assert droppable_roles(strategies.describe("fastv").cls) == {TokenRole.IMAGE}


# Vision strategies cutting per image (ragged_vision), with variants whose cut the small inputs do not clamp.
PER_IMAGE = [
    "cls_knee(min_keep=1)",
    "cls_knee(min_keep=1, cut=iqr)",
    "cls_knee(min_keep=1, cut=lof, max_keep=20)",
    "prumerge(iqr_factor=0.5, k_neighbors=4)",
    "prumerge(score=cls_sim, min_keep=5)",
    "prumerge_plus(iqr_factor=0.5, k_neighbors=4)",
    "prumerge_plus(score=cls_attn_mean)",
    "vispruner(keep=9)",
    "vispruner(keep_ratio=0.5, important_ratio=0.25, step=3)",
    "cdpruner(keep=6)",
    "cdpruner(relevance=uniform, keep_ratio=0.5, theta=0.5)",
]


def _blind_to_lengths(strategy: PruningStrategy) -> PruningStrategy:
    """``strategy`` planning as if every row were full: it reads padding as tokens of the image."""
    base = type(strategy)

    class Blind(base):  # type: ignore[valid-type, misc]
        name = f"blind_{base.name}"

        def plan(self, ctx: VisionContext) -> VisionPlan:
            return super().plan(replace(ctx, lengths=None))

    return Blind(strategy.params)


@pytest.mark.parametrize("spec", PER_IMAGE)
def test_per_image_strategies_pass_the_ragged_check_and_a_length_blind_copy_fails_it(spec):
    (strategy,) = strategies.get(spec)
    assert strategy.ragged_vision
    CHECKS["ragged"](strategy)
    with pytest.raises(ContractFailure, match="ragged"):
        CHECKS["ragged"](_blind_to_lengths(strategy))
