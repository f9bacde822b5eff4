"""tokprune: visual-token pruning for LLaVA-family multimodal LLMs.

One line to prune (``tokprune.patch(model, "cls_knee+text_interact")``), one registry of strategies
(``tokprune.strategies``), one set of batched scoring primitives (``tokprune.scoring``).
"""

from __future__ import annotations

from typing import Any

from . import errors, strategies
from .hookspecs import hookimpl
from .params import NoParams, param
from .pipeline import Pipeline
from .strategy import (
    FrameLayout,
    LLMAttention,
    LLMContext,
    LLMPlan,
    PruningStrategy,
    Signal,
    Stage,
    TextCondition,
    TokenRole,
    VisionContext,
    VisionPlan,
    VisionSignals,
    droppable_roles,
    kept_roles,
)

__all__ = [
    "FrameLayout",
    "LLMAttention",
    "LLMContext",
    "LLMPlan",
    "NoParams",
    "Pipeline",
    "PruningStrategy",
    "Signal",
    "Stage",
    "TextCondition",
    "TokenRole",
    "VisionContext",
    "VisionPlan",
    "VisionSignals",
    "__version__",
    "droppable_roles",
    "errors",
    "hookimpl",
    "kept_roles",
    "param",
    "patch",
    "pruned",
    "strategies",
    "unpatch",
]

_LAZY = {"patch", "unpatch", "pruned"}


def __getattr__(name: str) -> Any:
    # Model surgery pulls in transformers; keep ``import tokprune`` light for strategy authors.
    if name in _LAZY:
        from . import adapters

        return getattr(adapters, name)
    if name == "__version__":
        from importlib.metadata import version

        return version("tokprune")
    raise AttributeError(f"module 'tokprune' has no attribute {name!r}")
