"""The built-in adapter plugin (entry point ``llava`` in group ``tokprune``)."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl


@hookimpl
def register_adapters(register: Callable[..., None]) -> None:
    """Register the HF LLaVA-1.5 and LLaVA-NeXT adapters (imported lazily: they pull in transformers)."""
    from .llava import LlavaAdapter
    from .llava_next import LlavaNextAdapter

    register(LlavaAdapter)
    register(LlavaNextAdapter)
