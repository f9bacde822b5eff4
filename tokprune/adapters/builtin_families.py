"""The built-in model families plugin (entry point ``builtin_families`` in group ``tokprune``): LLaVA-1.5,
LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, SmolVLM (and Idefics3), Gemma 3. Until 0.x it was called ``llava``; that name in ``TOKPRUNE_PLUGINS`` /
``TOKPRUNE_BLOCK_PLUGINS`` still selects it, with a warning."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl


@hookimpl
def register_adapters(register: Callable[..., None]) -> None:
    """Register the built-in HF family adapters (imported lazily: they pull in transformers)."""
    from .gemma3 import Gemma3Adapter
    from .llava import LlavaAdapter
    from .llava_next import LlavaNextAdapter
    from .qwen2_5_vl import Qwen2_5_VLAdapter
    from .qwen3_vl import Qwen3VLAdapter
    from .smolvlm import SmolVLMAdapter

    register(LlavaAdapter)
    register(LlavaNextAdapter)
    register(Qwen2_5_VLAdapter)
    register(Qwen3VLAdapter)
    register(SmolVLMAdapter)
    register(Gemma3Adapter)
