"""``generate()`` on a patched model: the modes it supports, checked before anything runs, and the
``num_return_sequences`` expansion (:class:`GenerateChecks`, mixed into the pruned decoder)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import Tensor

from .. import hf_compat as hf
from ..errors import UnsupportedModelError
from .call import _ACTIVE, CallState, GenerateCall

__all__ = ["SUPPORTED_MODES", "GenerateChecks"]

SUPPORTED_MODES = ("greedy_search", "sample")


def _expand_return_sequences(
    arguments: dict, extra: dict, copies: int, per_item: dict[str, Tensor] | None = None
) -> tuple[tuple, dict]:
    """``generate`` arguments for ``num_return_sequences = copies``, expanded here instead of by ``generate``.

    ``generate`` encodes the images once and then splits the encoder output per prompt by matching its
    token counts to the prompts' ``<image>`` placeholders, which pruned features no longer match. So
    every batch tensor is repeated here exactly as ``generate`` would (``repeat_interleave`` on dim 0:
    ``[A, B] -> [A, A, B, B]``) and the call asks for one sequence per (repeated) prompt. The sequences,
    their order and the sampling RNG draws are those of the unpruned call's layout; the cost is that the
    vision tower runs once per returned sequence instead of once per prompt.
    """

    def expand(value: Any) -> Any:
        return value.repeat_interleave(copies, dim=0) if isinstance(value, Tensor) else value

    named = {k: expand(v) for k, v in arguments.items()}
    named.update((k, expand(v)) for k, v in extra.items())
    named.update(per_item or {})  # tensors with a row per image or video, expanded by the family
    if named.get("generation_config") is not None:
        # generate() warns on a config object plus generation keywords: change a copy of the object.
        named["generation_config"] = copy.deepcopy(named["generation_config"])
        named["generation_config"].num_return_sequences = 1
        named.pop("num_return_sequences", None)
    else:
        named["num_return_sequences"] = 1  # a keyword wins over the model's default config
    return (), named


class GenerateChecks:
    """The ``generate`` wrapper and its checks (a part of :class:`~tokprune.adapters.decoder.PrunedDecoderAdapter`)."""

    def _outer_generate(self) -> GenerateCall | None:
        """The ``generate`` call this forward runs inside, if any (set by :meth:`_generate_call`)."""
        outer = _ACTIVE.get()
        return outer.generate if outer is not None and outer.adapter is self else None

    # -- generate -----------------------------------------------------------------------------------

    def _generate_call(self, original: Any, args: tuple, kwargs: dict) -> Any:
        bound = inspect.signature(original).bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = arguments.pop("kwargs", {})
        config, model_kwargs = hf.generation_config(self.model, arguments.get("generation_config"), extra)
        self._check_generation(config, arguments, model_kwargs)
        inputs = arguments.get("inputs")
        input_ids = inputs if inputs is not None else model_kwargs.get("input_ids")
        if input_ids is None:
            raise UnsupportedModelError(
                "a patched model's generate() needs input_ids (tokprune finds the image in them)"
            )
        use_cache = config.use_cache if config.use_cache is not None else True
        copies = config.num_return_sequences or 1
        if copies > 1:
            per_item = self._expand_items({**arguments, **extra, "input_ids": input_ids}, copies)
            args, kwargs = _expand_return_sequences(arguments, extra, copies, per_item)
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
        call = CallState(
            self, GenerateCall(prompt_len=int(input_ids.shape[1]), use_cache=bool(use_cache), options=tensors)
        )
        if self.text_encoder is not None:  # the patched get_image_features has no input_ids: keep the prompts
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else input_ids))
            mask = kwargs.get("attention_mask")
            call.generate.prompt = (ids, torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())
        with self._active(call):
            return original(*args, **kwargs)

    def _expand_items(self, inputs: dict[str, Any], copies: int) -> dict[str, Tensor]:
        """The family's inputs with one row per image or video (not per prompt), expanded for
        ``num_return_sequences = copies``: each prompt's items repeated ``copies`` times in a row, as the
        repeated prompts need them. Default: none (LLaVA's ``pixel_values`` have a row per image = per prompt)."""
        return {}

    def _check_generation(self, config: Any, arguments: dict, model_kwargs: dict) -> None:
        def unsupported(what: str) -> UnsupportedModelError:
            return UnsupportedModelError(
                f"{what} is not supported on a pruned model (tokprune prunes once at prefill and supports greedy "
                "decoding or sampling, with a DynamicCache or no cache); "
                "call handle.remove() to run it unpruned"
            )

        mode = config.get_generation_mode(arguments.get("assistant_model"))
        if str(mode.value) not in SUPPORTED_MODES:
            raise unsupported(f"generation mode {mode.value!r} (num_beams={config.num_beams})")
        if arguments.get("custom_generate") is not None:
            raise unsupported("custom_generate")
        if config.cache_implementation not in (None, "dynamic"):
            raise unsupported(f"cache_implementation={config.cache_implementation!r}")
        if getattr(config, "prefill_chunk_size", None) is not None:
            raise unsupported("chunked prefill (prefill_chunk_size)")
        if config.output_attentions or config.output_hidden_states:
            raise unsupported("output_attentions/output_hidden_states")
        cache = hf.cache_from_kwargs(model_kwargs)
        if cache is not None:
            self._check_cache(cache)
            if cache.get_seq_length() > 0:
                raise unsupported("continuing from a non-empty cache (past_key_values)")

    @staticmethod
    def _check_cache(cache: Any) -> None:
        if not hf.is_dynamic_cache(cache):
            raise UnsupportedModelError(
                f"{type(cache).__name__} is not supported on a pruned model: pruned layers hold fewer positions, "
                "which needs a DynamicCache (static, quantized and offloaded caches are not supported)"
            )
