"""Video inputs for the tiny Qwen2.5-VL, Qwen3-VL and Qwen3.5 models (and LLaVA-OneVision's:
:func:`onevision_video_inputs`), built directly as tensors (no video processor).

A sample is a list of visual items, each ``("image", (1, h, w))`` or ``("video", (t, h, w))`` in patches
(``t`` temporal patch groups of ``temporal_patch_size = 2`` frames each: ``pixel_values_videos`` holds
``t * h * w`` flattened 3-D patches, as the processor makes them). The prompt is the tiny layout::

    <s> USER : <item> [SEP <item> ...] <question words> ASSISTANT :

An image is ``h*w/4`` image placeholders; a video ``t*h*w/4`` video placeholders in one run on
Qwen2.5-VL, and one run per frame after a timestamp token on Qwen3-VL and Qwen3.5 (their processors write
``<t>`` before each frame, and their ``get_rope_index`` splits a video's grid into frames that way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..adapters._tiny import VOCAB, left_padded
from ..adapters.llava_onevision import ONEVISION_IMAGE_SIZES, image_tokens, tower_passes

__all__ = ["TIMESTAMP", "VIDEO_GRIDS", "Item", "default_items", "onevision_video_inputs", "video_inputs"]

#: Video grids (t, h, w) in patches: 3 frames of 6 tokens, 2 of 8, 4 of 4, 1 of 6 (a one-frame video).
VIDEO_GRIDS: tuple[tuple[int, int, int], ...] = ((3, 4, 6), (2, 8, 4), (4, 4, 4), (1, 4, 6))
#: The token the Qwen3-VL prompts put before each frame (a timestamp in the real processor).
TIMESTAMP = VOCAB.first_word + 1

Item = tuple[str, tuple[int, int, int]]


def default_items(seed: int, kinds: str = "v") -> list[Item]:
    """Items of one sample from a kind string (``"v"``: one video, ``"iv"``: an image then a video...), grids
    drawn from ``seed`` so that samples of one batch differ."""
    image_grids = ((1, 4, 6), (1, 8, 4), (1, 4, 4), (1, 6, 8))
    out: list[Item] = []
    for k, kind in enumerate(kinds):
        grids = VIDEO_GRIDS if kind == "v" else image_grids
        out.append(("video" if kind == "v" else "image", grids[(seed + k) % len(grids)]))
    return out


def video_inputs(
    model: Any,
    samples: Sequence[Sequence[Item]],
    question_lengths: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    second_per_grid: float = 1.0,
) -> dict[str, Tensor]:
    """Keyword inputs of a tiny Qwen-VL ``model`` for one left-padded sample per entry of ``samples``.

    Sample ``i`` draws its pixels and words from ``seeds[i]`` (default ``i``), so it equals the same
    sample alone. Keys: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and, where the batch
    has them, ``pixel_values`` + ``image_grid_thw``, ``pixel_values_videos`` + ``video_grid_thw`` (and,
    on Qwen2.5-VL, ``second_per_grid_ts``: ``second_per_grid`` per video).
    """
    config = model.config
    vcfg = config.vision_config
    merge = vcfg.spatial_merge_size**2
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    per_frame_runs = config.model_type in ("qwen3_vl", "qwen3_5", "qwen3_5_moe")
    seeds = list(range(len(samples))) if seeds is None else list(seeds)
    question_lengths = [4] * len(samples) if question_lengths is None else list(question_lengths)
    rows: list[list[int]] = []
    pixels: dict[str, list[Tensor]] = {"image": [], "video": []}
    grids: dict[str, list[Tensor]] = {"image": [], "video": []}
    for items, q, s in zip(samples, question_lengths, seeds):
        gen = torch.Generator().manual_seed(s * 7919 + q)
        blocks: list[int] = []
        for k, (kind, (t, h, w)) in enumerate(items):
            blocks += [VOCAB.first_word] if k else []
            per = h * w // merge
            if kind == "image":
                blocks += [VOCAB.image] * (t * per)
            elif per_frame_runs:
                for _ in range(t):
                    blocks += [TIMESTAMP] + [config.video_token_id] * per
            else:
                blocks += [config.video_token_id] * (t * per)
            pixels[kind].append(torch.randn(t * h * w, patch_dim, generator=gen))
            grids[kind].append(torch.tensor([t, h, w]))
        words = torch.randint(VOCAB.first_word + 2, VOCAB.size - 3, (q,), generator=gen).tolist()
        rows.append([VOCAB.bos, VOCAB.user, VOCAB.colon, *blocks, *words, *VOCAB.assistant_marker])
    padded = left_padded(rows)
    ids = padded["input_ids"]
    types = (ids == VOCAB.image).int() + 2 * (ids == config.video_token_id).int()
    out = {**padded, "mm_token_type_ids": types}
    dtype = next(model.parameters()).dtype
    if pixels["image"]:
        out["pixel_values"] = torch.cat(pixels["image"]).to(dtype)
        out["image_grid_thw"] = torch.stack(grids["image"])
    if pixels["video"]:
        out["pixel_values_videos"] = torch.cat(pixels["video"]).to(dtype)
        out["video_grid_thw"] = torch.stack(grids["video"])
        if not per_frame_runs:
            out["second_per_grid_ts"] = torch.full((len(grids["video"]),), second_per_grid)
    return out


def onevision_video_inputs(
    model: Any,
    kinds: Sequence[str],
    question_lengths: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    frames: int = 3,
) -> dict[str, Tensor]:
    """Inputs of a tiny LLaVA-OneVision ``model`` (:func:`~tokprune.adapters.llava_onevision.tiny_llava_onevision`) for one left-padded sample per
    entry of ``kinds``: its items in prompt order (``"v"``: a video of ``frames`` frames, ``"i"``: an image, its
    size drawn from its sample's seed and place), separated by one word. Sample ``i`` draws from ``seeds[i]``
    (default ``i``), so it equals the same sample alone. Every image is tiled (no ``batch_num_images``)."""
    config, side = model.config, model.config.vision_config.image_size
    per_frame = model.model.apply_pooling(torch.zeros(1, (side // config.vision_config.patch_size) ** 2, 1)).shape[1]
    seeds = list(range(len(kinds))) if seeds is None else list(seeds)
    question_lengths = [4] * len(kinds) if question_lengths is None else list(question_lengths)
    rows, images, sizes, videos = [], [], [], []
    for items, q, s in zip(kinds, question_lengths, seeds):
        gen = torch.Generator().manual_seed(s * 7919 + q)
        blocks: list[int] = []
        for k, kind in enumerate(items):
            blocks += [VOCAB.first_word] if k else []
            if kind == "v":
                blocks += [config.video_token_id] * (frames * per_frame + 1)
                videos.append(torch.randn(frames, 3, side, side, generator=gen))
                continue
            size = torch.tensor([ONEVISION_IMAGE_SIZES[(s + k) % len(ONEVISION_IMAGE_SIZES)]])
            blocks += [VOCAB.image] * image_tokens(model.model, size, None, config.vision_aspect_ratio)[0]
            images.append(torch.randn(tower_passes(config, size, None)[0], 3, side, side, generator=gen))
            sizes.append(size[0])
        words = torch.randint(VOCAB.first_word + 1, VOCAB.size - 1, (q,), generator=gen).tolist()
        rows.append([VOCAB.bos, VOCAB.user, VOCAB.colon, *blocks, *words, *VOCAB.assistant_marker])
    out = left_padded(rows)
    dtype = next(model.parameters()).dtype
    if images:
        most = max(p.shape[0] for p in images)
        pixel_values = torch.zeros(len(images), most, 3, side, side)
        for i, p in enumerate(images):
            pixel_values[i, : p.shape[0]] = p
        out.update(pixel_values=pixel_values.to(dtype), image_sizes=torch.stack(sizes))
    if videos:
        out["pixel_values_videos"] = torch.stack(videos).to(dtype)
    return out
