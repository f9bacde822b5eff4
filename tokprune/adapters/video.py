"""Video in the shared decoder: pure helpers a family that takes video (Qwen2.5-VL, Qwen3-VL) applies.

A video reaches the LLM as one run of placeholder tokens (Qwen3-VL: one run per frame, timestamps between),
``t x h x w`` merged tokens frame-major, where ``t`` counts *temporal patch groups*: the tower's 3-D patches
span ``temporal_patch_size`` (2) video frames, so a "frame" here is one such group. The shared decoder sees
a prompt's images and videos as one list of visual items in prompt order (:func:`item_order`); budgets
count per item (``budget_scope="image"``: per image, per video) or per frame (``"frame"``: each frame of a
video its own strategy row, :func:`frame_rows` and :func:`rows_to_items`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["expand_items", "expand_visual_inputs", "frame_rows", "item_order", "rows_to_items"]


def item_order(input_ids: Tensor, prompt: Tensor, kinds: Sequence[tuple[str, int, Tensor]]) -> Tensor:
    """The prompt order of the visual items of several kinds (images, videos), checked against the prompt.

    Args:
        input_ids: long ``[B, n]``.
        prompt: bool ``[B, n]``: the prompt positions (generated tokens are never placeholders).
        kinds: ``(name, placeholder id, token counts long [K])`` per kind, each kind's items in their
            own order (the order the model fills them: ``get_placeholder_mask`` + ``masked_scatter``).

    Returns:
        long ``[sum K]``: joined item ``k`` is item ``order[k]`` of the kinds' concatenation, so that item
        ``k`` takes the ``k``-th run of placeholders of any kind. One sync (the counts check).
    """
    starts, checks = [], []
    for _, token, counts in kinds:
        mask = ((input_ids == token) & prompt).flatten()
        rank = mask.long().cumsum(0)  # placeholders of this kind up to and including each position
        first = counts.cumsum(0) - counts + 1  # each item's first placeholder, by rank
        starts.append(torch.searchsorted(rank, first))  # flat index of it in the prompt
        checks += [mask.sum(), counts.sum()]
    found = torch.stack(checks).tolist() if checks else []
    for (name, _, counts), tokens, total in zip(kinds, found[0::2], found[1::2]):
        if tokens != total:
            raise InputError(
                f"{name.capitalize()} features and {name} tokens do not match: tokens: {tokens}, features: {total} "
                f"({counts.numel()} {name}s of {counts.tolist()} tokens)"
            )
    flat = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long, device=input_ids.device)
    return torch.sort(flat, stable=True).indices


def frame_rows(per_item: Sequence[Tensor], frames: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
    """Each item's tokens (``[t_i * F_i, D]``, frame-major) cut into its ``t_i`` frames, one row per frame.

    Returns ``(rows, row_item long [R], row_offset long [R])``: the ``R = sum t_i`` frame rows (each
    ``[F_i, D]``, items in order, frames in order), the item of each row and the index of the row's first
    token in its item.
    """
    counts = frames.tolist()  # the frames of each item decide how many rows follow: one read
    rows: list[Tensor] = []
    for tokens, t in zip(per_item, counts):  # items (not tokens): each split is a view
        rows += list(tokens.split(tokens.shape[0] // t))
    device = frames.device
    row_item = torch.repeat_interleave(torch.arange(len(counts), device=device), frames)
    per_frame = torch.tensor([p.shape[0] // t for p, t in zip(per_item, counts)], device=device)
    first_row = frames.cumsum(0) - frames
    row_offset = (torch.arange(row_item.numel(), device=device) - first_row[row_item]) * per_frame[row_item]
    return rows, row_item, row_offset


def rows_to_items(keep: Tensor, row_item: Tensor, row_offset: Tensor, items: int, width: int) -> Tensor:
    """A keep mask over frame rows (bool ``[R, L]``) back on the items: bool ``[items, width]``.

    Row ``r``'s column ``j`` is token ``row_offset[r] + j`` of item ``row_item[r]``; padding columns of a
    row (False in ``keep``) land in a spare column that is cut off, so the scatter needs no branch.
    """
    r, n = keep.shape
    column = row_offset[:, None] + torch.arange(n, device=keep.device)[None, :]
    column = torch.where(keep, column, width)
    out = torch.zeros(items, width + 1, dtype=torch.bool, device=keep.device)
    out[row_item[:, None].expand(r, n), column] = keep
    return out[:, :width]


def expand_items(item_tokens: Tensor, prompt_tokens: Tensor, patches: Tensor, copies: int) -> tuple[Tensor, Tensor]:
    """Which items and which flattened patch rows ``generate(num_return_sequences=copies)`` needs, in order.

    Args:
        item_tokens: long ``[I]``: placeholders of each item (its tokens for the LLM), items in prompt order.
        prompt_tokens: long ``[B]``: placeholders of this kind in each prompt.
        patches: long ``[I]``: rows of each item in the flattened pixel tensor (``t * h * w``).

    Returns:
        ``(items long [I * copies], rows long [sum patches * copies])``: prompt ``b``'s items ``copies`` times
        in a row (the repeated prompts ``b, b, ...`` are consecutive), and their pixel rows.
    """
    count = item_tokens.numel()
    first = item_tokens.cumsum(0) - item_tokens  # placeholders before each item
    sample = torch.searchsorted(prompt_tokens.cumsum(0), first, right=True)
    repeated = torch.arange(count, device=item_tokens.device).repeat(copies)
    copy = torch.arange(copies, device=item_tokens.device).repeat_interleave(count)
    items = repeated[torch.argsort((sample[repeated] * copies + copy) * count + repeated)]
    starts = patches.cumsum(0) - patches
    sizes = patches[items]
    within = torch.arange(int(sizes.sum()), device=patches.device) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    return items, torch.repeat_interleave(starts[items], sizes) + within


def expand_visual_inputs(
    inputs: dict[str, Any], kinds: Sequence[tuple[int, str, str, tuple[str, ...]]], merge: int, copies: int
) -> dict[str, Tensor]:
    """A Qwen-style family's per-item inputs expanded for ``num_return_sequences = copies`` (:func:`expand_items`).

    ``kinds``: ``(placeholder id, pixels key, grid key, other per-item keys)`` per kind; ``merge``: patches
    per LLM token. Returns the expanded tensors of the kinds ``inputs`` has (pixels and grid both given).
    """
    ids = inputs["input_ids"]
    out: dict[str, Tensor] = {}
    for token, pixels_key, grid_key, extra in kinds:
        pixels, grid = inputs.get(pixels_key), inputs.get(grid_key)
        if pixels is None or grid is None:
            continue
        patches = grid.prod(dim=-1)
        items, rows = expand_items(patches // merge, (ids == token).sum(dim=1).to(patches.device), patches, copies)
        out[pixels_key], out[grid_key] = pixels[rows.to(pixels.device)], grid[items]
        out.update((k, inputs[k][items.to(inputs[k].device)]) for k in extra if inputs.get(k) is not None)
    return out
