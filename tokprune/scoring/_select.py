"""Keep masks with per-row counts, and ragged gather/scatter between masks and padded batches."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ._validate import check_bool, check_choice, check_tensor

PAD_SIDES = ("right", "left")
PAD_INDEX: int = -1
"""Original-position index reported for padding slots by :func:`ragged_gather`."""


def counts_from_mask(keep: Tensor) -> Tensor:
    """bool ``[B, N]`` -> long ``[B]`` number of kept tokens per row."""
    check_tensor("keep", keep, 2, "[B, N]")
    check_bool("keep", keep)
    return keep.sum(dim=1)


def topk_mask(scores: Tensor, k: Tensor | int, force: Tensor | None = None) -> Tensor:
    """Keep the ``k[b]`` highest scores of each row (a different k per row is allowed).

    Ties are broken deterministically: the lower index wins (stable descending sort). ``force`` positions
    are kept **in addition to** the top-k, not counted within k; a forced position that is also in the
    top-k is kept once, so a row keeps between ``k`` and ``k + force.sum()`` tokens.

    Args:
        scores: ``[B, N]`` scores (any real dtype).
        k: int or long ``[B]`` (or 0-d) counts, clamped to ``[0, N]``.
        force: optional bool ``[B, N]`` always-kept positions.

    Returns:
        bool ``[B, N]``.
    """
    check_tensor("scores", scores, 2, "[B, N]")
    b, n = scores.shape
    k_t = torch.as_tensor(k, device=scores.device)
    if k_t.dtype.is_floating_point or k_t.dtype == torch.bool or k_t.dim() > 1:
        raise InputError(f"k must be an int or an integer tensor [B={b}], got {k_t.dtype} shape {tuple(k_t.shape)}")
    if k_t.dim() == 1 and k_t.shape[0] != b:
        raise InputError(f"k must have shape [B={b}], got {tuple(k_t.shape)}")
    k_t = k_t.long().clamp(0, n).expand(b)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=scores.device).expand(b, n))
    keep = ranks < k_t[:, None]
    if force is not None:
        check_bool("force", force)
        if tuple(force.shape) != (b, n):
            raise InputError(f"force must have shape [B={b}, N={n}], got {tuple(force.shape)}")
        keep = keep | force
    return keep


def ragged_gather(
    x: Tensor, keep: Tensor, pad_value: float = 0.0, pad_side: str = "right"
) -> tuple[Tensor, Tensor, Tensor]:
    """Pack the kept tokens of each row into a padded batch, preserving their original order.

    Args:
        x: ``[B, N, ...]`` tensor.
        keep: bool ``[B, N]``.
        pad_value: value of the padding slots.
        pad_side: ``"right"`` (padding at the end) or ``"left"`` (at the start, as the LLM side pads).

    Returns:
        ``(gathered [B, Kmax, ...], valid bool [B, Kmax], index long [B, Kmax])`` where ``Kmax`` is the
        largest kept count and ``index`` holds the original positions, ``PAD_INDEX`` (-1) at padding.
        Reading ``Kmax`` synchronises with the device once.
    """
    check_tensor("keep", keep, 2, "[B, N]")
    check_bool("keep", keep)
    check_choice("pad_side", pad_side, PAD_SIDES)
    if not isinstance(x, Tensor) or x.dim() < 2 or tuple(x.shape[:2]) != tuple(keep.shape):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"x must have shape [B, N, ...] matching keep {tuple(keep.shape)}, got {shape}")
    b, n = keep.shape
    counts = keep.sum(dim=1)
    kmax = int(counts.max()) if b else 0
    # slot of each kept token = its rank among the kept ones (+ left offset); dropped tokens write to a
    # spare column kmax that is cut off afterwards, which keeps the scatter branch-free
    slot = keep.long().cumsum(dim=1) - 1
    if pad_side == "left":
        slot = slot + (kmax - counts)[:, None]
    slot = torch.where(keep, slot, torch.full_like(slot, kmax))
    index = torch.full((b, kmax + 1), PAD_INDEX, dtype=torch.long, device=keep.device)
    index.scatter_(1, slot, torch.arange(n, device=keep.device).expand(b, n))
    index = index[:, :kmax]
    valid = index >= 0
    feat_shape = x.shape[2:]
    gidx = index.clamp_min(0).view(b, kmax, *([1] * len(feat_shape))).expand(b, kmax, *feat_shape)
    gathered = x.gather(1, gidx)
    pad = valid.view(b, kmax, *([1] * len(feat_shape)))
    gathered = torch.where(pad, gathered, torch.full((), pad_value, dtype=x.dtype, device=x.device))
    return gathered, valid, index


def ragged_scatter(values: Tensor, index: Tensor, valid: Tensor, size: int, fill_value: float = 0.0) -> Tensor:
    """Inverse of :func:`ragged_gather`: put packed rows back at their original positions.

    Args:
        values: ``[B, K, ...]`` packed rows.
        index: long ``[B, K]`` original positions (ignored where ``valid`` is False).
        valid: bool ``[B, K]``.
        size: N, the length of the output rows.
        fill_value: value at positions no valid slot maps to.

    Returns:
        ``[B, size, ...]`` in ``values.dtype``.
    """
    check_tensor("index", index, 2, "[B, K]")
    check_tensor("valid", valid, 2, "[B, K]")
    check_bool("valid", valid)
    if not isinstance(values, Tensor) or values.dim() < 2 or tuple(values.shape[:2]) != tuple(index.shape):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise InputError(f"values must have shape [B, K, ...] matching index {tuple(index.shape)}, got {shape}")
    if tuple(valid.shape) != tuple(index.shape):
        raise InputError(f"valid must have shape {tuple(index.shape)}, got {tuple(valid.shape)}")
    b, k = index.shape
    feat_shape = values.shape[2:]
    # invalid slots write into a spare position `size` that is cut off afterwards
    target = torch.where(valid, index.long(), torch.full_like(index, size, dtype=torch.long))
    out = torch.full((b, size + 1, *feat_shape), fill_value, dtype=values.dtype, device=values.device)
    tidx = target.view(b, k, *([1] * len(feat_shape))).expand(b, k, *feat_shape)
    out.scatter_(1, tidx, values)
    return out[:, :size]
