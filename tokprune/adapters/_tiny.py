"""What a family's tiny test case is made of: the shared vocabulary and prompt layout, a seeded random model
builder, and :class:`TinyCase` (what :meth:`~tokprune.adapters.ModelAdapter.tiny` returns).

Production code (each family's ``tiny()``) builds on this module; the test kit
(:mod:`tokprune.testing.models`, :mod:`tokprune.testing.adapters`) re-exports it, never the other way round.
Weights are drawn with a larger init scale than HF's default so that attention and logits are far from
uniform (greedy decisions have real margins).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["VOCAB", "TinyCase", "TinyVocab", "fixed_size_inputs", "left_padded", "prompt_ids", "random_model"]


@dataclass(frozen=True)
class TinyVocab:
    """Token ids of the tiny models."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    image: int = 3
    user: int = 4
    colon: int = 5
    assistant: int = 6
    first_word: int = 7  #: question words are drawn from first_word..size-1
    size: int = 96

    @property
    def assistant_marker(self) -> list[int]:
        """``ASSISTANT :``: pass as ``question_end`` to ``tokprune.patch``."""
        return [self.assistant, self.colon]


VOCAB = TinyVocab()


@dataclass
class TinyCase:
    """A tiny random model of one family and inputs for it (what an adapter's ``tiny()`` returns).

    ``make_inputs(question_lengths, seeds=None)`` returns the model's keyword inputs for one
    left-padded sample per question length; sample ``i`` drawn from ``seeds[i]`` (default ``i``) equals
    that row of a batch built with the same seed. ``question_end`` is passed to ``patch`` (or None when
    the adapter finds the roles itself); ``pad_token_id`` to ``generate``; ``llm_layer`` is a decoder
    layer the LLM-stage probes may prune before (the models are shallow).
    """

    model: nn.Module
    make_inputs: Callable[..., dict[str, Tensor]]
    pad_token_id: int
    question_end: Sequence[int] | None = None
    llm_layer: int = 2
    #: Placeholder rows no plan drops (LLaVA-NeXT's row newlines): given an image's stock rows ``[P, D]``
    #: (what the unpatched LLM receives at its placeholders), bool ``[P]``; None: every placeholder is a
    #: strategy token (the ``tokens`` check, :mod:`tokprune.testing.tokens`).
    fixed_image_rows: Callable[[Tensor], Tensor] | None = None
    #: The adapter class the checks patch with (set by :func:`tiny_case`; None: the registered match).
    adapter: type | None = None


def random_model(model_cls: type, config: Any, seed: int, attn_implementation: str, dtype: torch.dtype) -> Any:
    """``model_cls(config)`` with weights drawn from ``seed``, in ``dtype`` and eval mode, greedy 6-token
    generation by default; ``attn_implementation`` set on the config and its text and vision parts."""
    for cfg in (config, config.text_config, config.vision_config):
        cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=6, pad_token_id=VOCAB.pad, bos_token_id=VOCAB.bos, eos_token_id=None
    )
    return model


def prompt_ids(image_tokens: Sequence[int], words: Sequence[int]) -> list[int]:
    """``<s> USER : <image>*n_1 [SEP <image>*n_2 ...] <words> ASSISTANT :``: one placeholder run per image,
    consecutive images separated by one word token so that each run is its own."""
    blocks: list[int] = []
    for i, n in enumerate(image_tokens):
        blocks += ([VOCAB.first_word] if i else []) + [VOCAB.image] * n
    return [VOCAB.bos, VOCAB.user, VOCAB.colon, *blocks, *words, *VOCAB.assistant_marker]


def left_padded(rows: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, W]`` of token rows, left-padded to the longest."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), VOCAB.pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def fixed_size_inputs(
    tokens_per_image: int, pixel_shape: Sequence[int], dtype: torch.dtype = torch.float32, per_sample: bool = False
) -> Callable[..., dict[str, Tensor]]:
    """``make_inputs`` of a family whose images all bring ``tokens_per_image`` placeholders (LLaVA-1.5, SmolVLM).

    ``make_inputs(question_lengths=(5, 3), seeds=None, images=1)`` returns ``input_ids``,
    ``attention_mask`` (left padding) and ``pixel_values`` (``[B*images, *pixel_shape]``, or
    ``[B, images, *pixel_shape]`` with ``per_sample``) for one sample per question length, each with
    ``images`` images (0: text only; several: separated by one word, :func:`prompt_ids`); sample ``i`` is
    drawn from ``seeds[i]`` (default ``i``), so ``make_inputs([q], seeds=[s])`` built alone equals the row
    of a batch that has ``q`` and ``s`` at that index.
    """

    def make_inputs(
        question_lengths: Sequence[int] = (5, 3), seeds: Sequence[int] | None = None, images: int = 1
    ) -> dict[str, Tensor]:
        seeds = list(range(len(question_lengths))) if seeds is None else list(seeds)
        rows, pixels = [], []
        for q, s in zip(question_lengths, seeds):
            gen = torch.Generator().manual_seed(s * 1009 + q)
            words = torch.randint(VOCAB.first_word, VOCAB.size, (q,), generator=gen).tolist()
            rows.append(prompt_ids([tokens_per_image] * int(images), words))
            pixels += [torch.randn(*pixel_shape, generator=gen) for _ in range(int(images))]
        out = left_padded(rows)
        if images:
            stacked = torch.stack(pixels).to(dtype)
            out["pixel_values"] = stacked.view(len(rows), int(images), *pixel_shape) if per_sample else stacked
        return out

    return make_inputs
