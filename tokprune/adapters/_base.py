"""The :class:`ModelAdapter` base class, the per-instance patch state and the patch/unpatch API."""

from __future__ import annotations

import abc
import contextlib
import copy
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from ..errors import AlreadyPatchedError, StrategyParamError, TokpruneError, UnsupportedModelError
from ..pipeline import Pipeline
from ..stats import PruneStats

__all__ = [
    "BUDGET_SCOPES",
    "ModelAdapter",
    "PatchState",
    "PatchedModelPickleError",
    "patch",
    "pruned",
    "unpatch",
]

Positions = Literal["keep", "compact"]
POSITION_MODES: tuple[str, ...] = ("keep", "compact")
BudgetScope = Literal["image", "tile", "frame"]
#: What a vision-stage budget counts (docs/adapters.md, "Budgets on tiled images" and "Video"): ``image``
#: one strategy row per image or video (base view and tiles pooled; every frame of a video pooled),
#: ``tile`` one row per tower pass of a tiled image, ``frame`` one row per frame of a video.
BUDGET_SCOPES: tuple[str, ...] = ("image", "tile", "frame")

_MISSING = object()


class PatchedModelPickleError(TokpruneError, TypeError):
    """A patched model was pickled (``pickle``, ``torch.save``): the patch is code bound to this instance."""


@dataclass
class PatchState:
    """Everything one patch changed on one model instance, undone in reverse order by :meth:`undo`.

    Only instance attributes and hooks are touched: the classes (and every other instance) stay as
    they were, so two models in one process can be patched differently or not at all.
    """

    #: ``(object, attribute, previous instance value or _MISSING)``.
    attributes: list[tuple[Any, str, Any]] = field(default_factory=list)
    #: Removable hook handles (``register_forward_hook`` results).
    hooks: list[Any] = field(default_factory=list)

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute (shadowing the class's method), remembering what was there."""
        previous = obj.__dict__.get(name, _MISSING)
        self.attributes.append((obj, name, previous))
        # Straight into __dict__: an instance attribute shadows the class's method for this object only.
        obj.__dict__[name] = value

    def add_hook(self, handle: Any) -> None:
        self.hooks.append(handle)

    def undo(self) -> None:
        """Undo every change, even when one step fails (the first failure is raised after the rest)."""
        failure: BaseException | None = None
        for handle in reversed(self.hooks):
            try:
                handle.remove()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the model is restored
                failure = failure or exc
        for obj, name, previous in reversed(self.attributes):
            if previous is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous
        self.hooks.clear()
        self.attributes.clear()
        if failure is not None:
            raise failure


class ModelAdapter(abc.ABC):
    """Applies a :class:`~tokprune.Pipeline` to one model instance. The object :func:`patch` returns.

    Subclasses set ``name``, implement :meth:`matches` (is this a model I understand?), optionally
    :meth:`mismatch` (why not, for the error message), validate in ``__init__`` (everything that can
    fail must fail there, before the model is touched) and implement :meth:`_install`, recording every
    change in ``self._state``. Register them from a plugin's ``register_adapters(register)`` hook.

    Public attributes: ``model``, ``pipeline``, ``stats`` (the :class:`~tokprune.stats.PruneStats` of
    the last prefill, or None), ``history`` (every prefill's stats when ``keep_history`` is true).
    """

    name: ClassVar[str]
    #: The oldest transformers release this family passes the adapter contract on (None: the project's
    #: own minimum, ``tokprune.hf_compat.TESTED_MIN``). Below it the contract suite skips the family;
    #: ``patch()`` still refuses on a missing feature, by detection.
    min_transformers: ClassVar[str | None] = None
    #: The ``budget_scope`` values this family honours (tiled families add ``"tile"``, families that take
    #: video add ``"frame"``: it is how the shared code knows a family takes video).
    budget_scopes: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(
        self,
        model: nn.Module,
        pipeline: Pipeline,
        *,
        vision_positions: Positions | None = None,
        llm_positions: Positions = "keep",
        question_end: Sequence[int] | Any | None = None,
        budget_scope: BudgetScope = "image",
        text_encoder: Any = None,
    ) -> None:
        from ..text_encoder import resolve_text_encoder

        #: The CLIP text tower instruction-conditioned vision steps read (``relevance=text``), or None.
        self.text_encoder = resolve_text_encoder(text_encoder)
        for option, value in (("vision_positions", vision_positions), ("llm_positions", llm_positions)):
            if value not in POSITION_MODES and not (option == "vision_positions" and value is None):
                raise StrategyParamError(f"{option} must be one of: {', '.join(POSITION_MODES)}; got {value!r}")
        if budget_scope not in BUDGET_SCOPES:
            raise StrategyParamError(f"budget_scope must be one of: {', '.join(BUDGET_SCOPES)}; got {budget_scope!r}")
        if budget_scope not in self.budget_scopes:
            why = "it takes no video" if budget_scope == "frame" else "its images are not tiled"
            raise StrategyParamError(
                f"budget_scope={budget_scope!r} is not available on {self.name}: {why}; "
                f"valid here: {', '.join(self.budget_scopes)}{_families_with(budget_scope)}"
            )
        self.budget_scope = budget_scope
        self.model = model
        self.pipeline = pipeline
        self.vision_positions = vision_positions
        self.llm_positions = llm_positions
        self.stats: PruneStats | None = None
        self.keep_history = False
        self.history: list[PruneStats] = []
        self._state = PatchState()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter understands ``model``: by default, when :meth:`mismatch` finds nothing."""
        return cls.mismatch(model) == ""

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        """Why :meth:`matches` is false, in one line (for the error message); "" when it matches.

        Override this (or :meth:`matches` itself) in every adapter: the default matches nothing.
        """
        return f"not a model {cls.name!r} understands"

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> Any:
        """A tiny random model this adapter matches, for the adapter contract (:mod:`tokprune.testing.adapters`).

        Returns a :class:`tokprune.adapters.TinyCase` (model built from a config, no download,
        and ``make_inputs`` for ragged batches), or None when the adapter offers none (the contract
        suite then reports it as failing).
        """
        return None

    @abc.abstractmethod
    def _install(self) -> None:
        """Patch the instance; record every change in ``self._state``."""

    def _record(self, stats: PruneStats) -> None:
        self.stats = stats
        if self.keep_history:
            self.history.append(stats)

    @property
    def active(self) -> bool:
        """True while this handle's patch is on the model."""
        return _PATCHED.get(self.model) is self

    def remove(self) -> None:
        """Undo the patch: the model behaves exactly as before. Calling it again does nothing."""
        with _LOCK:
            if not self.active:
                return
            try:
                self._state.undo()
            finally:
                _PATCHED.pop(self.model, None)

    def __enter__(self) -> ModelAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<{type(self).__name__} {str(self.pipeline)!r} on {type(self.model).__name__} ({state})>"


def _families_with(scope: str) -> str:
    """``"; families with video: a, b"`` (the registered adapters honouring ``scope``), for error messages."""
    from ._registry import adapter_registry

    names = [name for name, info in adapter_registry().items() if scope in info.cls.budget_scopes]
    what = {"frame": "video", "tile": "tiled images"}.get(scope, scope)
    return f"; families with {what}: {', '.join(names)}" if names else ""


# model -> its active handle. Weak keys: patching never keeps a model alive.
_PATCHED: weakref.WeakKeyDictionary[nn.Module, ModelAdapter] = weakref.WeakKeyDictionary()
# Patching and removing are check-then-act on _PATCHED and the model's attributes: two threads patching
# one model must not both pass the check (the loser gets the "already patched" error).
_LOCK = threading.RLock()
#: Wrappers another library puts around a model, and the attribute holding the model inside.
_WRAPPERS = {
    "OptimizedModule": "_orig_mod",
    "DataParallel": "module",
    "DistributedDataParallel": "module",
    "PeftModel": "base_model.model",
    "PeftModelForCausalLM": "base_model.model",
}


def patch(
    model: nn.Module,
    spec: Any,
    *,
    vision_positions: Positions | None = None,
    llm_positions: Positions = "keep",
    question_end: Sequence[int] | Any | None = None,
    budget_scope: BudgetScope = "image",
    text_encoder: Any = None,
    adapter: type[ModelAdapter] | None = None,
) -> ModelAdapter:
    """Prune ``model`` (this instance only) with the pipeline ``spec``; returns the handle.

    ``spec`` is anything :func:`tokprune.strategies.get` accepts (a string, a list of
    ``{name: ..., <param>: ...}`` dicts, a strategy, a :class:`~tokprune.Pipeline`). ``vision_positions``
    and ``llm_positions`` choose, per stage, whether kept tokens keep their original position ids
    (``"keep"``) or are renumbered contiguously (``"compact"``). ``vision_positions=None`` (the default)
    takes the vision step's reference choice (:meth:`~tokprune.PruningStrategy.positions`: ``compact`` for
    the methods whose code shortens the image block before the LLM, DivPrune, CDPruner, VisPruner,
    PruMerge(+)), ``keep`` for a step without one and on families with multi-axis positions;
    ``llm_positions`` defaults to ``keep`` (FastV's and DART's), an LLM step's own choice
    (``pyramiddrop(positions=compact)``) winning. Token roles come from the model's own chat template: the template text after the
    question (LLaVA-1.5's ``ASSISTANT:``) is protected by default, read from the tokenizer saved with the
    model (:mod:`tokprune.adapters.roles`). ``question_end`` overrides it: a token-id sequence (the
    assistant marker) or a tokenizer/processor whose chat template to read (without one: the ids of
    ``"ASSISTANT:"``); with neither, the question runs to the last prompt token. ``budget_scope`` says
    what a vision-stage budget counts on tiled images (LLaVA-NeXT's AnyRes): ``"image"`` (the default)
    one strategy row per image, base view and tiles pooled; ``"tile"`` one row per tile and base view,
    as VisionZip's and VisionPruner's LLaVA-NeXT code do; families without tiles accept only
    ``"image"``. ``text_encoder`` (a :class:`tokprune.text_encoder.ClipTextEncoder` or the path of a saved
    CLIP model) is the CLIP text tower instruction-conditioned vision steps read (``cdpruner``'s
    ``relevance=text``); without one they run their documented stand-in. ``adapter`` names the adapter
    class to use instead of the registered one that matches (a family in development, or the contract's
    mutants); it must match ``model``. Everything is validated before the model is touched; ``handle.remove()`` (or :func:`unpatch`) restores it exactly.
    """
    from ..registry import get

    options = {
        "vision_positions": vision_positions,
        "llm_positions": llm_positions,
        "question_end": question_end,
        "budget_scope": budget_scope,
        # only when given: an adapter written before this option (a plugin's) keeps working without it
        **({"text_encoder": text_encoder} if text_encoder is not None else {}),
    }
    with _LOCK:
        if model in _PATCHED:
            raise AlreadyPatchedError(
                f"{type(model).__name__} is already patched with {str(_PATCHED[model].pipeline)!r}; "
                "call handle.remove() (or tokprune.unpatch(model)) before patching it again"
            )
        pipeline = spec if isinstance(spec, Pipeline) else get(spec)
        adapter_cls = _adapter_for(model, adapter)
        handle = adapter_cls(model, pipeline, **options)
        _install(handle, options)
        _PATCHED[model] = handle
    return handle


def _adapter_for(model: nn.Module, adapter: type[ModelAdapter] | None) -> type[ModelAdapter]:
    """The registered adapter that matches ``model``, or ``adapter`` when given (and matching)."""
    if adapter is None:
        from ._registry import pick_adapter

        return pick_adapter(model)
    if not (isinstance(adapter, type) and issubclass(adapter, ModelAdapter)):
        raise UnsupportedModelError(f"adapter={adapter!r} is not a ModelAdapter subclass")
    if not adapter.matches(model):
        raise UnsupportedModelError(
            f"adapter {adapter.name!r} does not understand {type(model).__name__}: {adapter.mismatch(model)}"
        )
    return adapter


def _install(handle: ModelAdapter, options: dict[str, Any]) -> None:
    """Install ``handle``'s patch, and the two hooks that keep copies honest: a deep copy of the patched
    model is patched on its own with the same pipeline (its own handle, ``handle_of(copy)``), and
    pickling it (``pickle``, ``torch.save``) is refused, as the patch is code, not state."""
    model = handle.model

    def deepcopy(memo: dict[int, Any]) -> nn.Module:
        with _LOCK:
            handle._state.undo()  # copy the model as it is unpatched, then put the patch back
            try:
                clone = copy.deepcopy(model, memo)
            finally:
                _install(handle, options)
            patch(clone, handle.pipeline, adapter=type(handle), **options)
        return clone

    def reduce_ex(protocol: int) -> Any:
        raise PatchedModelPickleError(
            f"{type(model).__name__} is patched by tokprune ({str(handle.pipeline)!r}) and cannot be pickled: "
            "save model.state_dict() instead, or call handle.remove() (tokprune.unpatch(model)) first and patch "
            "again after loading; copy.deepcopy(model) gives a patched copy"
        )

    try:
        handle._install()
        handle._state.set_attribute(model, "__deepcopy__", deepcopy)
        handle._state.set_attribute(model, "__reduce_ex__", reduce_ex)
    except BaseException:
        handle._state.undo()
        raise


def unpatch(model: nn.Module) -> None:
    """Remove the patch from ``model`` (no-op when it is not patched)."""
    with _LOCK:
        handle = _PATCHED.get(model)
        if handle is not None:
            handle.remove()


def handle_of(model: nn.Module) -> ModelAdapter | None:
    """The active handle of ``model``, or None."""
    return _PATCHED.get(model)


@contextlib.contextmanager
def pruned(model: nn.Module, spec: Any, **options: Any) -> Iterator[ModelAdapter]:
    """``with tokprune.pruned(model, spec) as run:`` patch for the block; ``run`` is the handle."""
    handle = patch(model, spec, **options)
    try:
        yield handle
    finally:
        handle.remove()
