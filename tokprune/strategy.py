"""The :class:`PruningStrategy` interface and the contexts and plans that cross it.

A strategy *decides*; an adapter *applies*. Strategies never touch a model: they receive a context
(tensors plus lazily computed signals) and return a plan (boolean keep masks, optional merged
features, diagnostics). Two stages exist:

* ``Stage.VISION``: after the vision encoder, before the projector. Context: patch features
  ``[B, N, C]`` and :class:`VisionSignals` (CLS attention, CLS similarity, patch keys, computed from
  the encoder's q/k or hidden states on first use). Plan: :class:`VisionPlan`.
* ``Stage.LLM``: between decoder layers, with FastV's convention for ``layer=K``: layers ``0..K-1``
  see every token, layers ``K`` and after see only the kept ones. A strategy whose ``layer`` is a
  schedule (``tuple[int, ...]``, e.g. PyramidDrop) is called once before each of its layers. Context: token roles, hidden states
  entering layer K and :class:`LLMAttention` rows computed from the q/k of layer ``K-1``. Plan:
  :class:`LLMPlan`, a keep mask over sequence positions (and, for merging strategies, the merged
  hidden states of the kept positions).
"""

from __future__ import annotations

import abc
import enum
import re
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .contexts import (
    FrameLayout,
    LLMAttention,
    LLMContext,
    LLMPlan,
    Signal,
    TextCondition,
    TokenRole,
    VisionContext,
    VisionPlan,
    VisionSignals,
)
from .errors import PluginError, StrategyContractError
from .params import NoParams, build_params, format_value, param_infos

__all__ = [
    "LLMAttention",
    "LLMContext",
    "LLMPlan",
    "PruningStrategy",
    "Signal",
    "Stage",
    "TextCondition",
    "TokenRole",
    "VisionContext",
    "VisionPlan",
    "VisionSignals",
    "FrameLayout",
    "droppable_roles",
    "kept_roles",
]

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*\Z")
RESERVED_NAMES = frozenset({"none"})

class Stage(str, enum.Enum):
    """Where a strategy runs."""

    VISION = "vision"
    LLM = "llm"

    def __str__(self) -> str:
        return self.value


def droppable_roles(strategy: PruningStrategy | type[PruningStrategy]) -> frozenset[TokenRole]:
    """The :class:`TokenRole` s an LLM-stage strategy (class or instance) may drop: the one rule set.

    ``IMAGE`` always; ``QUESTION`` with ``drops_text``; ``TEMPLATE`` with ``drops_template``. ``PADDING``
    and ``PROTECTED`` never. The interface enforces it on every plan, the registry lists it and the
    contract suite checks raw plans against it.
    """
    roles = {TokenRole.IMAGE}
    if strategy.drops_text:
        roles.add(TokenRole.QUESTION)
    if strategy.drops_template:
        roles.add(TokenRole.TEMPLATE)
    return frozenset(roles)


def kept_roles(strategy: PruningStrategy | type[PruningStrategy]) -> frozenset[TokenRole]:
    """The roles an LLM-stage strategy must keep: every role :func:`droppable_roles` does not list."""
    return frozenset(TokenRole) - droppable_roles(strategy)


class PruningStrategy(abc.ABC):
    """One pruning step. Subclass, set the class attributes and implement :meth:`plan`.

    Class attributes:
        name: registry name, ``[a-z][a-z0-9_]*``.
        stage: :class:`Stage` where it runs.
        Params: a frozen dataclass of :func:`tokprune.params.param` fields (LLM stage: needs ``layer``).
        drops_text: LLM stage only; may drop ``QUESTION`` positions.
        drops_template: LLM stage only; may drop ``TEMPLATE`` positions.
        ragged_vision: vision stage only; plans honour ``ctx.lengths`` (images of different sizes,
            padded rows), cutting each image within its own tokens. Adapters whose towers give
            variable-size images refuse vision strategies without it at ``patch()``.
        temporal: vision stage only; the plan reads ``ctx.frames`` and cuts across the frames of a
            video (EVS, VidCom2). Adapters run such a step on videos only (images in the same prompt
            pass whole, as vLLM's ``--video-pruning-rate`` leaves them), refuse it on families without
            video and under ``budget_scope="frame"``.
    """

    name: ClassVar[str]
    stage: ClassVar[Stage]
    Params: ClassVar[type] = NoParams
    drops_text: ClassVar[bool] = False
    drops_template: ClassVar[bool] = False
    ragged_vision: ClassVar[bool] = False
    temporal: ClassVar[bool] = False

    def __init__(self, params: Any = None, /, **overrides: Any) -> None:
        self.params = build_params(self.name, type(self).Params, params, overrides)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # intermediate base classes are allowed
            return
        problems = _class_problems(cls)
        if problems:
            raise PluginError(f"{cls.__module__}.{cls.__qualname__}: " + "; ".join(problems))

    # -- what subclasses implement -------------------------------------------------------------

    def requires(self) -> frozenset[Signal]:
        """Encoder signals this configuration reads (vision stage). Default: none."""
        return frozenset()

    def reads_instruction(self) -> bool:
        """True when this configuration reads the instruction at the vision stage (``VisionContext.text``,
        e.g. CDPruner's CLIP text relevance): the adapter then embeds each image's question, where the
        patch was given a text encoder. Default: False."""
        return False

    def reads_layer_attention(self) -> bool:
        """True when this configuration (LLM stage) scores with layer K's own attention
        (``LLMContext.layer_attention``, PyramidDrop's ``scores=own``) besides layer K-1's: a model whose
        layer K has no softmax attention (a linear-attention layer) cannot host its cut, refused at
        ``patch()``. Default: False."""
        return False

    def positions(self) -> Literal["keep", "compact"] | None:
        """The position mode of this step's survivors when the method's reference fixes one: a vision
        step whose code shortens the image block before the LLM (``compact``), used where the caller
        leaves ``vision_positions`` unset; an LLM step's own choice (PyramidDrop renumbers), which wins
        over ``llm_positions``. None: the adapter's option. Default: None."""
        return None

    def video_counts(self, token_counts: Tensor, frames: FrameLayout) -> Tensor | None:
        """long ``[B]``: tokens :meth:`plan` keeps of each video row (``token_counts`` long ``[B]``, laid out as
        ``frames``), where this configuration fixes the count before seeing the features; None where the
        features decide it. A serving engine sizes a video's placeholders from it before encoding
        (:mod:`tokprune.serving`). Temporal strategies implement it; default: None."""
        return None

    @abc.abstractmethod
    def plan(self, ctx: Any) -> Any:
        """Decide: a :class:`VisionPlan` for a :class:`VisionContext`, an :class:`LLMPlan` for an LLM one."""

    # -- what callers use ------------------------------------------------------------------------

    @property
    def llm_layers(self) -> tuple[int, ...]:
        """Every decoder layer K an LLM-stage strategy prunes before, increasing (one, or its schedule's);
        ``()`` for vision-stage ones. The adapter calls :meth:`plan` once per layer, ``ctx.layer`` says which."""
        if self.stage is not Stage.LLM:
            return ()
        value = self.params.layer
        return tuple(int(v) for v in value) if isinstance(value, tuple) else (int(value),)

    @property
    def layer(self) -> int | None:
        """The first decoder layer K for LLM-stage strategies, None for vision-stage ones."""
        return self.llm_layers[0] if self.stage is Stage.LLM else None

    def __call__(self, ctx: Any) -> Any:
        """Run :meth:`plan` without autograd, then check (and for LLM plans, enforce) the contract."""
        with torch.no_grad():
            plan = self.plan(ctx)
        if self.stage is Stage.VISION:
            return _checked_vision_plan(self.name, plan, ctx)
        return _checked_llm_plan(self, plan, ctx)

    def short_spec(self) -> str:
        """The spec with only the parameters that differ from their defaults: ``fastv(layer=3)``, ``topk``
        (what error messages name; :meth:`spec` spells out every parameter)."""
        default = self.Params()
        args = ", ".join(
            f"{f.name}={format_value(getattr(self.params, f.name))}"
            for f in param_infos(self.Params)
            if getattr(self.params, f.name) != getattr(default, f.name)
        )
        return f"{self.name}({args})" if args else self.name

    def spec(self) -> str:
        """Canonical spec with every parameter spelled out: ``name(p1=v1, p2=v2)``."""
        args = ", ".join(f"{f.name}={format_value(getattr(self.params, f.name))}" for f in param_infos(self.Params))
        return f"{self.name}({args})" if args else self.name

    def __str__(self) -> str:
        return self.spec()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec()}>"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params == self.params  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.params))


def _class_problems(cls: type[PruningStrategy]) -> list[str]:
    import dataclasses

    problems = []
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in RESERVED_NAMES:
        problems.append(f"name must match [a-z][a-z0-9_]* and not be reserved ({sorted(RESERVED_NAMES)}), got {name!r}")
    if not isinstance(getattr(cls, "stage", None), Stage):
        problems.append(f"stage must be Stage.VISION or Stage.LLM, got {getattr(cls, 'stage', None)!r}")
    params_cls = getattr(cls, "Params", None)
    if not (isinstance(params_cls, type) and dataclasses.is_dataclass(params_cls)):
        problems.append("Params must be a dataclass")
    else:
        missing = [
            f.name
            for f in dataclasses.fields(params_cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            problems.append(f"every parameter needs a default; missing for {missing}")
        if getattr(cls, "stage", None) is Stage.LLM and "layer" not in {f.name for f in dataclasses.fields(params_cls)}:
            problems.append(
                "LLM-stage strategies need an int 'layer' parameter (prune before that decoder layer), or a "
                "tuple[int, ...] one (a schedule of layers)"
            )
    return problems


def _checked_vision_plan(name: str, plan: Any, ctx: VisionContext) -> VisionPlan:
    if not isinstance(plan, VisionPlan):
        raise StrategyContractError(f"{name!r} returned {type(plan).__name__}, expected VisionPlan")
    b, n, c = ctx.features.shape
    keep = plan.keep
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (b, n):
        shape = tuple(keep.shape) if isinstance(keep, Tensor) else type(keep).__name__
        dtype = keep.dtype if isinstance(keep, Tensor) else None
        raise StrategyContractError(f"{name!r} returned keep of shape {shape} dtype {dtype}; expected bool {(b, n)}")
    empty = (keep.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise StrategyContractError(f"{name!r} kept no visual token for samples {empty}; keep at least one")
    if ctx.lengths is not None:
        padded = (keep & ~ctx.token_valid).any(dim=1).nonzero().flatten().tolist()
        if padded:
            raise StrategyContractError(
                f"{name!r} kept padding positions of images {padded} (beyond ctx.lengths); cut within each image"
            )
    if plan.features is not None and tuple(plan.features.shape) != (b, n, c):
        raise StrategyContractError(f"{name!r} returned features {tuple(plan.features.shape)}; expected {(b, n, c)}")
    if plan.extra is not None and (plan.extra.dim() != 3 or plan.extra.shape[0] != b or plan.extra.shape[2] != c):
        raise StrategyContractError(f"{name!r} returned extra {tuple(plan.extra.shape)}; expected (B={b}, E, C={c})")
    if plan.extra_valid is not None:
        e = None if plan.extra is None else plan.extra.shape[1]
        valid = plan.extra_valid
        if e is None or valid.dtype != torch.bool or tuple(valid.shape) != (b, e):
            raise StrategyContractError(
                f"{name!r} returned extra_valid {valid.dtype} {tuple(valid.shape)}; expected bool (B={b}, E={e}) "
                "alongside extra"
            )
    return plan


def _checked_llm_plan(strategy: PruningStrategy, plan: Any, ctx: LLMContext) -> LLMPlan:
    name = strategy.name
    if not isinstance(plan, LLMPlan):
        raise StrategyContractError(f"{name!r} returned {type(plan).__name__}, expected LLMPlan")
    keep = plan.keep
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != ctx.roles.shape:
        shape = tuple(keep.shape) if isinstance(keep, Tensor) else type(keep).__name__
        raise StrategyContractError(f"{name!r} returned keep {shape}; expected bool {tuple(ctx.roles.shape)}")
    hidden = plan.hidden
    if hidden is not None and (
        not isinstance(hidden, Tensor) or hidden.shape != ctx.hidden.shape or hidden.dtype != ctx.hidden.dtype
    ):
        shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise StrategyContractError(
            f"{name!r} returned hidden {shape} {getattr(hidden, 'dtype', '')}; expected {tuple(ctx.hidden.shape)} "
            f"{ctx.hidden.dtype} (the context's hidden states)"
        )
    forced = ctx.role_mask(*sorted(kept_roles(strategy)))
    overridden = (forced & ~keep).sum(dim=1)
    diagnostics = dict(plan.diagnostics)
    diagnostics["forced_kept"] = overridden
    return LLMPlan(keep=keep | forced, diagnostics=diagnostics, hidden=hidden)
