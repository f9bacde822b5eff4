"""The built-in model families plugin (entry point ``builtin_families`` in group ``tokprune``): Gemma 3,
InternVL, LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, Qwen3.5 (and its MoE variant),
SmolVLM (and Idefics3). Until 0.x it was called ``llava``; that name in ``TOKPRUNE_PLUGINS`` /
``TOKPRUNE_BLOCK_PLUGINS`` still selects it, with a warning."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl


@hookimpl
def register_adapters(register: Callable[..., None]) -> None:
    """Register the built-in HF family adapters (imported lazily: they pull in transformers), in alphabetical
    order: `tokprune plugins` lists a plugin's adapters sorted."""
    from .gemma3 import Gemma3Adapter
    from .internvl import InternVLAdapter
    from .llava import LlavaAdapter
    from .llava_next import LlavaNextAdapter
    from .llava_onevision import LlavaOnevisionAdapter
    from .qwen2_5_vl import Qwen2_5_VLAdapter
    from .qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter
    from .qwen3_vl import Qwen3VLAdapter
    from .smolvlm import SmolVLMAdapter

    register(Gemma3Adapter)
    register(InternVLAdapter)
    register(LlavaAdapter)
    register(LlavaNextAdapter)
    register(LlavaOnevisionAdapter)
    register(Qwen2_5_VLAdapter)
    register(Qwen3_5Adapter)
    register(Qwen3_5MoeAdapter)
    register(Qwen3VLAdapter)
    register(SmolVLMAdapter)
