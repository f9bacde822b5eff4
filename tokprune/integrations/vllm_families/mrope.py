"""M-RoPE positions of pruned media in vLLM's Qwen families: the unpruned prompt's rule for the text, each
kept row at its own offset on its placeholder. Tensors and the runner's feature records only (no vLLM import).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def recompute_on_placeholders(
    config: Any, input_ids: Any, multimodal_embeddings: Sequence[Tensor], positions: Tensor, start: int
) -> tuple[list[Tensor], Tensor, int]:
    """The Qwen families' ``recompute_mrope_positions``: each media row (its offsets in its last 4 columns,
    stripped here) on its placeholder, text as :meth:`get_mrope_input_positions` left it."""
    rows = [mm[:, :-4] for mm in multimodal_embeddings]
    offsets = [mm[:, -4:-1].long() for mm in multimodal_embeddings]
    ids = input_ids if isinstance(input_ids, Tensor) else torch.tensor(input_ids)
    media = (ids == config.image_token_id) | (ids == config.video_token_id)
    placed = place_media_positions(media.to(positions.device), offsets, positions, start)
    return rows, placed, int(placed.max() + 1 - placed.shape[1])


def place_media_positions(media: Tensor, offsets: Sequence[Tensor], positions: Tensor, start: int) -> Tensor:
    """M-RoPE positions long ``[3, N]`` with the media rows of one prefill chunk placed.

    ``media``: bool ``[N]``, the prompt's image and video placeholders; ``offsets``: each item's (part of
    the chunk) rows' ``(t, h, w)`` offsets long ``[R_i, 3]``, items in prompt order, filling the chunk's
    placeholders from token ``start`` on in order; ``positions``: the prompt's positions, text already
    final. A row's position is its offset plus the position after the text token before its run.
    """
    out = positions.clone()
    rows = torch.cat(list(offsets)) if len(offsets) else positions.new_zeros(0, 3)
    if rows.shape[0] == 0:
        return out
    index = torch.arange(media.numel(), device=media.device)
    slots = index[media & (index >= start)][: rows.shape[0]]  # the chunk's placeholders, in order
    run_start = media & ~torch.cat([media.new_zeros(1), media[:-1]])
    last_start = torch.cummax(torch.where(run_start, index, 0), dim=0).values  # each token's run start
    base = out[0, (last_start[slots] - 1).clamp_min(0)] + 1
    out[:, slots] = (rows.to(out) + base[:, None]).T
    return out


def unpruned_positions(
    stock: Callable[[list[int], list[Any]], tuple[Tensor, int]],
    input_tokens: list[int],
    mm_features: list[Any],
    full_runs: Callable[[Any], list[int]],
    media_ids: Sequence[int],
) -> tuple[Tensor, int]:
    """M-RoPE positions of a prompt whose media runs were shortened: the stock rule on the unpruned prompt (each
    placeholder run of a feature, tokens in ``media_ids``, grown back to its length in ``full_runs(feature)``:
    an image one run, a Qwen3-VL video one per frame), then each run cut to its kept length. Text keeps its
    unpruned positions; a run's positions are provisional (the runner replaces them with the kept tokens' own:
    the family's ``recompute_mrope_positions``, :func:`place_media_positions`)."""
    import dataclasses

    tokens, features, cut, shift = list(input_tokens), [], [], 0
    for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
        offset, length = feature.mm_position.offset + shift, feature.mm_position.length
        grown, at, runs = 0, offset, iter(full_runs(feature))
        while at < offset + length + grown:
            if tokens[at] not in media_ids:
                at += 1
                continue
            end = at
            while end < len(tokens) and tokens[end] == tokens[at]:
                end += 1
            missing = next(runs) - (end - at)
            if missing > 0:
                tokens[end:end] = [tokens[at]] * missing
                cut.append((end, missing))
                grown += missing
            at = end + max(missing, 0)
        place = dataclasses.replace(feature.mm_position, offset=offset, length=length + grown, is_embed=None)
        features.append(dataclasses.replace(feature, mm_position=place))
        shift += grown
    positions, _ = stock(tokens, features)
    keep = torch.ones(positions.shape[1], dtype=torch.bool)
    for start, count in cut:
        keep[start : start + count] = False
    positions = positions[:, keep]
    return positions, int(positions.max() + 1 - len(input_tokens))
