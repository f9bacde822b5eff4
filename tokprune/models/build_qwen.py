"""Builders for the tiny Qwen2.5-VL of the clip world: word-level tokenizer, config, model inputs.

The model is a stock ``Qwen2_5_VLForConditionalGeneration`` (tiny widths, Qwen2.5-VL's patch 14,
temporal patch 2, 2x2 merge). Inputs are built here rather than by ``Qwen2_5_VLProcessor``: that processor
needs a video processor, and transformers' video processors need torchvision, which this CPU stack cannot
import (PyPI's torchvision is a CUDA build). :func:`model_inputs` gives exactly what the processor would:
``input_ids`` with each ``<|video_pad|>``/``<|image_pad|>`` repeated once per merged token between
``<|vision_start|>`` and ``<|vision_end|>``, ``pixel_values_videos``/``video_grid_thw`` (and the image
pair) in Qwen's patch layout (:func:`tokprune.data.clips.patchify`), ``second_per_grid_ts`` and
``mm_token_type_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig

from tokprune.data import clips, world
from tokprune.models.build import ordered_vocabulary, word_level_tokenizer

if TYPE_CHECKING:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>")
VIDEO_FPS = 2.0
"""Frames per second the clips are declared at: each clip frame is shown for one second, as two raw
frames, so ``second_per_grid_ts = TEMPORAL_PATCH / VIDEO_FPS = 1``."""

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>\n' }}"
    "{% elif content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>\n' }}"
    "{% else %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """Every word the clip world can produce, after the special tokens (fixed order: ids are stable)."""
    words = [
        "user", "assistant", ":", "?", ",",
        "which", "way", "did", "the", "move", "shape", "appeared", "last", "how", "many", "frames", "show",
        "a", "what", "color", "become", "is", "there", "yes", "no",
        *clips.DIRECTIONS, *world.COLORS, *world.SHAPES, *world.NUMBERS,
    ]
    return ordered_vocabulary(SPECIAL_TOKENS, words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The clip model's tokenizer (:func:`~tokprune.models.build.word_level_tokenizer`, with Qwen's vision
    tokens special)."""
    extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
             "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
    return word_level_tokenizer(vocabulary(), SPECIAL_TOKENS, extra, model_max_length=512, chat_template=CHAT_TEMPLATE)


@dataclass
class Sizes:
    """Widths of the vision tower and the language model."""

    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 2
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4


SMOKE_SIZES = Sizes(32, 2, 2, 32, 1, 2)


def qwen_config(sizes: Sizes, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = sizes.lm_hidden // sizes.lm_heads
    # M-RoPE splits the rotary half-dimension into (t, h, w) sections; Qwen2.5-VL's [16, 24, 24] of 64, scaled.
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    return Qwen2_5_VLConfig(
        vision_config={
            "depth": sizes.vision_layers,
            "hidden_size": sizes.vision_hidden,
            "intermediate_size": 2 * sizes.vision_hidden,
            "num_heads": sizes.vision_heads,
            "out_hidden_size": sizes.lm_hidden,
            "patch_size": clips.PATCH,
            "temporal_patch_size": clips.TEMPORAL_PATCH,
            "spatial_merge_size": clips.MERGE,
            "window_size": clips.FRAME_SIZE,
            "fullatt_block_indexes": [sizes.vision_layers - 1],
            "tokens_per_second": 2,
            "in_channels": 3,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": sizes.lm_hidden,
            "intermediate_size": 3 * sizes.lm_hidden,
            "num_hidden_layers": sizes.lm_layers,
            "num_attention_heads": sizes.lm_heads,
            "num_key_value_heads": sizes.lm_heads,
            "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen's image processor (PIL backend, no torchvision) at the world's frame size: shipped as
    ``preprocessor_config.json`` so ``AutoImageProcessor`` loads it; it gives exactly
    :func:`tokprune.data.clips.clip_pixels` for a frame (tested). Videos have no torchvision-free processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    side = clips.FRAME_SIZE
    return Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=clips.PATCH,
                                    temporal_patch_size=clips.TEMPORAL_PATCH, merge_size=clips.MERGE,
                                    image_mean=list(clips.IMAGE_MEAN), image_std=list(clips.IMAGE_STD))


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy, short: every answer is one word plus ``</s>``."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_prompt(question: str, video: bool = True, tokens: int = clips.TOKENS_PER_CLIP) -> str:
    """The prompt with its placeholder already expanded to ``tokens`` pad tokens (what the processor does)."""
    pad = "<|video_pad|>" if video else "<|image_pad|>"
    return f"USER: <|vision_start|>{pad * tokens}<|vision_end|>\n{question} ASSISTANT:"


def model_inputs(tokenizer: PreTrainedTokenizerFast, samples: Sequence[clips.Clip],
                 suffixes: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """A left-padded batch of clips and/or images, as ``Qwen2_5_VLProcessor`` would build it.

    ``suffixes``: text appended to each prompt (training appends the answer and ``</s>``). Returns
    ``input_ids``/``attention_mask`` ``[B, L]``, ``mm_token_type_ids`` ``[B, L]`` (1 image, 2 video),
    ``pixel_values_videos`` ``[P, 1176]`` + ``video_grid_thw`` ``[V, 3]`` + ``second_per_grid_ts`` ``[V]``
    when the batch has clips, ``pixel_values`` + ``image_grid_thw`` when it has images.
    """
    merge = clips.MERGE**2
    texts, vids, imgs = [], [], []
    for k, s in enumerate(samples):
        clips.check_clip(s)
        pixels, grid = clips.clip_pixels(s)
        (vids if s.is_video else imgs).append((pixels, grid))
        texts.append(build_prompt(s.question, s.is_video, int(grid.prod()) // merge)
                     + (suffixes[k] if suffixes is not None else ""))
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    video_id, image_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<|video_pad|>", "<|image_pad|>"))
    ids = enc["input_ids"]
    out = {
        "input_ids": ids,
        "attention_mask": enc["attention_mask"],
        "mm_token_type_ids": (ids == image_id).int() + 2 * (ids == video_id).int(),
    }
    if vids:
        out["pixel_values_videos"] = torch.cat([p for p, _ in vids])
        out["video_grid_thw"] = torch.stack([g for _, g in vids])
        out["second_per_grid_ts"] = torch.full((len(vids),), clips.TEMPORAL_PATCH / VIDEO_FPS)
    if imgs:
        out["pixel_values"] = torch.cat([p for p, _ in imgs])
        out["image_grid_thw"] = torch.stack([g for _, g in imgs])
    return out
