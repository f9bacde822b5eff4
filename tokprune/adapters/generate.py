"""``generate()`` on a patched model: the modes it supports, checked before anything runs, the
``num_return_sequences`` expansion and a later turn of a conversation continuing a pruned cache
(:class:`GenerateChecks`, mixed into the pruned decoder)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import Tensor

from .. import hf_compat as hf
from ..errors import InputError, UnsupportedModelError
from .call import (
    _ACTIVE,
    IMAGE_INPUTS,
    CallState,
    GenerateCall,
    _Session,
    check_no_visual_tokens,
    check_same_images,
)

__all__ = ["SUPPORTED_MODES", "GenerateChecks"]

SUPPORTED_MODES = ("greedy_search", "sample")
#: Keywords generate() slices along the sequence with ``input_ids`` (cut to the new tokens with them).
SEQUENCE_INPUTS = ("token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")


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
        cache = hf.cache_from_kwargs(model_kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            if not use_cache or copies > 1:
                raise UnsupportedModelError(
                    "continuing a pruned cache (a later turn) needs use_cache=True and num_return_sequences=1 "
                    f"(got use_cache={use_cache}, num_return_sequences={copies})"
                )
            return self._continue_conversation(original, {**arguments, **extra}, input_ids, self._session(cache))
        if copies > 1:
            per_item = self.repeat_item_inputs({**arguments, **extra, "input_ids": input_ids}, copies)
            args, kwargs = _expand_return_sequences(arguments, extra, copies, per_item)
        tensors = {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
        call = CallState(
            self, GenerateCall(prompt_len=int(input_ids.shape[1]), use_cache=bool(use_cache), options=tensors)
        )
        # the patched get_image_features has no input_ids: keep the prompts (text encoder, placeholder_runs)
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else input_ids))
        mask = kwargs.get("attention_mask")
        call.generate.prompt = (ids, torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())
        with self._active(call):
            return original(*args, **kwargs)

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

    def _continue_conversation(self, original: Any, named: dict, input_ids: Tensor, session: _Session) -> Any:
        """A later turn of a conversation: ``generate`` on a cache a pruned prefill filled (docs/concepts.md).

        The cache is continued as it is: the new tokens attend to the first turn's kept tokens, and nothing
        is pruned again (a strategy that reads the question read the first turn's). ``input_ids`` is the
        whole conversation (the cached tokens, as the last ``generate`` returned them, then the new ones) or,
        HF's other form, only the new tokens with an ``attention_mask`` covering both. A pruned cache holds
        fewer positions than the tokens it stands for, so generate()'s own bookkeeping (the cached length is
        ``cache.get_seq_length()``) would re-run part of the history: the new tokens are cut here from the
        session's unpruned length, and the history is put back in front of the returned sequences.
        """
        key = "inputs" if named.get("inputs") is not None else "input_ids"
        mask = named.get("attention_mask")
        b, n = input_ids.shape
        seen = session.seen
        held, held_valid = (t.to(input_ids.device) for t in session.held())  # generate() may run ids elsewhere
        if b != session.batch:
            raise InputError(f"the cache holds {session.batch} conversations, input_ids has {b} rows")
        if mask is not None and mask.shape[1] == seen + n:  # only the new tokens; the mask covers the history too
            history, new = None, input_ids
            if not torch.equal(mask[:, :seen].bool().to(held_valid.device), held_valid):
                raise InputError("attention_mask's first columns differ from the padding of the tokens the cache holds")
        elif mask is None or mask.shape[1] == n:  # the whole conversation
            if n <= seen:
                raise InputError(
                    f"input_ids has {n} tokens, but the pruned cache already holds {seen}: pass the whole conversation "
                    "(the sequences the last generate() returned, then the new turn's tokens), or only the new tokens "
                    f"with an attention_mask of {seen} + new columns"
                )
            history, new = input_ids[:, :seen], input_ids[:, seen:]
            same = (history == held) | ~held_valid
            if mask is not None:
                same &= mask[:, :seen].bool().to(held_valid.device) == held_valid
            if not bool(same.all()):
                row, col = (~same).nonzero()[0].tolist()
                raise InputError(
                    f"the conversation's first {seen} tokens must be the ones the pruned cache holds (the sequences "
                    f"the last generate() returned, with their padding), but sample {row} differs at column {col} "
                    f"(cache: {int(held[row, col])}, given: {int(history[row, col])}); re-tokenizing the history "
                    "changes it: append the new turn's tokens to the returned sequences instead"
                )
            if mask is None:  # generate() derives the positions from the mask: it must cover the history
                mask = torch.cat([held_valid.long(), torch.ones_like(new)], dim=1)
        else:
            raise InputError(
                f"attention_mask has {mask.shape[1]} columns and input_ids {n}; continuing a pruned cache of {seen} "
                f"tokens takes the whole conversation (mask and ids of equal width) or only the new tokens (a mask "
                f"of {seen} + new columns)"
            )
        check_no_visual_tokens(new, self.visual_placeholders())
        check_same_images(session, named)
        named = {k: v for k, v in named.items() if k not in IMAGE_INPUTS}  # already in the cache, pruned
        for name in SEQUENCE_INPUTS:  # (Qwen's positions read the image tokens in them at the pruned length)
            value = named.get(name)
            if isinstance(value, Tensor) and value.shape[-1] > new.shape[1]:
                named[name] = value[..., -new.shape[1] :]
        named[key] = new
        named["attention_mask"] = mask
        tensors = {k: v for k, v in named.items() if isinstance(v, Tensor)}
        call = CallState(
            self, GenerateCall(prompt_len=int(new.shape[1]), use_cache=True, prefilled=True, options=tensors)
        )
        with self._active(call):
            out = original(**named)
        if history is None:
            return out
        if isinstance(out, Tensor):
            return torch.cat([history, out], dim=1)
        out.sequences = torch.cat([history, out.sequences], dim=1)
        return out

    @staticmethod
    def _check_cache(cache: Any) -> None:
        if not hf.is_dynamic_cache(cache):
            raise UnsupportedModelError(
                f"{type(cache).__name__} is not supported on a pruned model: pruned layers hold fewer positions, "
                "which needs a DynamicCache (static, quantized and offloaded caches are not supported)"
            )
