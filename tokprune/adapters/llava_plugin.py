"""The built-in adapter plugin (entry point ``llava`` in group ``tokprune``)."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl


@hookimpl
def register_adapters(register: Callable[..., None]) -> None:
    """Register the HF LLaVA adapter (imported lazily: it pulls in transformers)."""
    from .llava import LlavaAdapter

    register(LlavaAdapter)
