"""Toy strategies and plugin helpers for the core tests (no dependency on the built-ins)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from tokprune import LLMPlan, PruningStrategy, Stage, VisionPlan, hookimpl, param
from tokprune._plugins import pm


class ToyTop(PruningStrategy):
    """Keep the first ``keep`` patches (a toy vision strategy)."""

    name = "toy_top"
    stage = Stage.VISION

    @dataclass(frozen=True)
    class Params:
        keep: int = param(4, "patches kept", ge=1)
        ratio: float | None = param(None, "fraction kept instead of keep", gt=0, le=1)
        mode: Literal["first", "last"] = param("first", "which end to keep")
        label: str = param("x", "free text")
        flag: bool = param(False, "a switch")

    def plan(self, ctx):  # noqa: ANN001, ANN201
        n = ctx.features.shape[1]
        keep = torch.zeros(ctx.features.shape[:2], dtype=torch.bool)
        k = min(self.params.keep, n)
        if self.params.mode == "first":
            keep[:, :k] = True
        else:
            keep[:, n - k :] = True
        return VisionPlan(keep=keep)


class ToyLLM(PruningStrategy):
    """Drop every image token but the first (a toy LLM strategy)."""

    name = "toy_llm"
    stage = Stage.LLM

    @dataclass(frozen=True)
    class Params:
        layer: int = param(2, "prune before this decoder layer", ge=1)
        keep_ratio: float = param(0.5, "image tokens kept", gt=0, le=1)

    def plan(self, ctx):  # noqa: ANN001, ANN201
        return LLMPlan(keep=torch.zeros_like(ctx.roles, dtype=torch.bool))


def plugin_module(name: str, *classes: type) -> types.ModuleType:
    """A module object that registers ``classes`` through the real hook, like an installed plugin."""
    module = types.ModuleType(name)

    @hookimpl
    def register_strategies(register):  # noqa: ANN001, ANN202
        for cls in classes:
            register(cls)

    module.register_strategies = register_strategies
    return module


@contextlib.contextmanager
def registered(name: str, *classes: type) -> Iterator[types.ModuleType]:
    """Register a throw-away plugin for the duration of a ``with`` block (always unregistered)."""
    module = plugin_module(name, *classes)
    pm.register(module, name=name)
    try:
        yield module
    finally:
        pm.unregister(module, name=name)
