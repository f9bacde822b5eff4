"""Sequence assembly: kept image features scattered into their placeholders, extra tokens inserted after
their image, the rest dropped, and the stages' position modes (:class:`Assembly`, mixed into the pruned
decoder), with the pure helpers it applies."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError
from ..strategy import TokenRole
from ._seq import Seq, compact_positions, scatter_rows
from .features import ImageFeatures

__all__ = ["Assembly"]


class Assembly:
    """Assembly of one prefill's sequence (a part of :class:`~tokprune.adapters.decoder.PrunedDecoderAdapter`)."""

    def _vision_assembly(
        self,
        input_ids: Tensor,
        embeds: Tensor,
        valid: Tensor,
        pos: Tensor,
        roles: Tensor,
        prompt_n: int,
        features: ImageFeatures | None,
    ) -> tuple[Seq, Tensor]:
        """Scatter kept image features into their placeholders, insert extra tokens, drop the rest.

        Images fill the placeholder runs in order, image ``i`` taking the next ``token_counts[i]``
        placeholders (their counts may differ). Returns the packed sequence and, per image, the sample
        it belongs to (long ``[I]``; empty without images).
        """
        b, n = input_ids.shape
        device = input_ids.device
        idx = torch.arange(n, device=device)
        src = idx[None, :].expand(b, n)
        prompt = idx[None, :].expand(b, n) < prompt_n
        # A generated token equal to the image id (no-cache decoding) is text, not a placeholder.
        image = (input_ids == self._image_token_id) & prompt
        keep = valid.clone()
        # Every input check, and the sizes the layout needs (the packed width, the extra-token slots),
        # read in a single sync. The checks stay: a right-padded batch or a feature/placeholder mismatch
        # would otherwise give silently wrong output.
        right_padded = ~valid[:, -1].all()
        if features is None:
            bad_padding, has_image, width = torch.stack(
                [right_padded.long(), image.any().long(), valid.sum(dim=1).max() if b else right_padded.long()]
            ).tolist()
            _check_left_padded(bad_padding)
            if has_image:
                raise InputError("the prompt has image tokens but no pixel_values or image features were given")
            seq = Seq(embeds, valid, pos, roles, src, prompt, torch.full_like(src, -1))
            return seq.gather(keep, width), torch.zeros(0, dtype=torch.long, device=device)
        counts = features.token_counts
        flat = image.flatten()
        rank = flat.long().cumsum(0)  # placeholders up to and including each position
        ends = counts.cumsum(0)
        # flat index of each image's last placeholder: the first position whose rank reaches its end
        # (clamped so that a mismatch, raised below, cannot index out of range first)
        last = torch.searchsorted(rank, ends).clamp_max(flat.numel() - 1)
        image_sample = last // n
        per_sample = torch.zeros(b, dtype=torch.long, device=device).index_add_(
            0, image_sample, torch.ones_like(image_sample)
        )
        # each placeholder's image and index within it, from its rank: keep[image, index] (no boolean indexing)
        img = torch.searchsorted(ends, rank - 1, right=True).clamp_max(counts.numel() - 1)
        within = (rank - 1 - (ends - counts)[img]).clamp(0, features.keep.shape[1] - 1)
        slot_keep = (flat & features.keep[img, within]).view(b, n)
        keep &= ~image | slot_keep
        e = features.extra_counts
        if isinstance(e, Tensor):  # a different number of extra tokens per image: summed per sample
            packed = keep.sum(dim=1) + torch.zeros_like(per_sample).index_add_(0, image_sample, e)
        else:
            packed = keep.sum(dim=1) + e * per_sample  # tokens of each sample after the assembly
        # An image's placeholders are one run: features spanning two runs (text between them) are several
        # images read as one (a per-sample output taken for a per-image one), refused rather than merged. A
        # video's may be several (Qwen3-VL puts a timestamp before each frame).
        first = torch.searchsorted(rank, ends - counts + 1).clamp_max(flat.numel() - 1)
        split = last - first + 1 != counts
        if features.videos is not None:
            split &= ~features.videos
        bad_padding, tokens, total, most, width, spanning = torch.stack(
            [
                right_padded.long(),
                flat.sum(),
                counts.sum(),
                *(torch.stack([per_sample, packed]).amax(dim=1) if b else [flat.sum()] * 2),
                split.sum(),
            ]
        ).tolist()
        _check_left_padded(bad_padding)
        if tokens != total:
            raise InputError(
                f"Image features and image tokens do not match: tokens: {tokens}, "
                f"features: {total} ({counts.numel()} images of {counts.tolist()} tokens)"
            )
        if spanning:
            raise InputError(
                f"{spanning} of {counts.numel()} images ({counts.tolist()} tokens) span placeholder runs with text "
                "between them: the image features are not one row per image (a family reading a per-sample "
                "output as per-image merges a sample's images; see Family.stock_features)"
            )
        embeds = embeds.masked_scatter(slot_keep[..., None], features.kept.to(embeds.dtype))
        # each kept placeholder's row in features.kept: both are in row-major placeholder order
        feature = torch.where(slot_keep, slot_keep.flatten().cumsum(0).view(b, n) - 1, -1)
        seq = Seq(embeds, valid, pos, roles, src, prompt, feature)
        if features.extra is None:
            return seq.gather(keep, width), image_sample
        extra_seq, extra_key = _extra_tokens(
            last, (b, n), pos, features.extra.to(embeds.dtype), most, features.extra_valid
        )
        # Put each image's extra tokens right after its block, then pack as usual.
        key = torch.cat([idx[None, :].expand(b, n).double(), extra_key], dim=1)
        order = torch.sort(key, dim=1, stable=True).indices
        joined = Seq.cat([seq, extra_seq]).take(order)
        joined_keep = torch.take_along_dim(torch.cat([keep, extra_seq.valid], dim=1), order, dim=1)
        return joined.gather(joined_keep, width), image_sample

    def _stage_positions(self, seq: Seq, mode: str, shift: Tensor, full_count: Tensor) -> tuple[Seq, Tensor]:
        """Apply a stage's position mode; returns the sequence and its decoding offset (long ``[B]``).

        ``keep``: positions unchanged, offset inherited. ``compact``: renumbered contiguously; decoding
        continues right after the last kept position, i.e. at the caller's position minus the number
        of tokens dropped so far (``full_count`` = unpruned non-padding length).
        """
        if mode == "keep":
            return seq, shift
        pos = compact_positions(seq.pos, seq.valid)
        return seq.with_positions(pos), full_count - seq.valid.sum(dim=1)


def _from_start(pos: Tensor, valid: Tensor) -> Tensor:
    """Position ids minus each sample's first valid one (``[B, L]`` or ``[B, L, R]``), 0 at padding."""
    big = torch.iinfo(pos.dtype).max
    mask = valid.view(*valid.shape, *[1] * (pos.dim() - 2))
    first = torch.where(mask, pos, torch.full_like(pos, big)).amin(dim=1, keepdim=True)
    return torch.where(mask, pos - first, torch.zeros_like(pos))


def _check_left_padded(right_padded: bool) -> None:
    if right_padded:
        raise InputError(
            "right-padded batch: tokprune needs left padding (tokenizer.padding_side='left'), so that every "
            "sample's last prompt token is in the last column"
        )


def _extra_tokens(
    end: Tensor, shape: tuple[int, int], pos: Tensor, extra: Tensor, most_images: int, extra_valid: Tensor | None = None
) -> tuple[Seq, Tensor]:
    """Extra tokens of each image placed right after its block: ``(Seq [B, M, D], order key [B, M])``.

    ``end`` (long ``[I]``) is the flat index in the ``[B, n]`` sequence of each image's last placeholder.
    In ``keep`` mode the extra tokens share that placeholder's position id. ``most_images``: the most
    images of one sample (read by the caller with its checks, so no sync here). ``extra_valid`` (bool
    ``[I, E]``): the real extra tokens of each image; the others get invalid slots, dropped by the packing.
    """
    b, n = shape
    num_images, e, d = extra.shape
    device = end.device
    img_b, img_l = end // n, end % n
    first_of_sample = torch.searchsorted(img_b, img_b)
    rank = torch.arange(num_images, device=device) - first_of_sample
    m = e * most_images
    slots = rank[:, None] * e + torch.arange(e, device=device)[None, :]
    rows = img_b[:, None].expand(-1, e)
    hidden = extra.new_zeros(b, m, d)
    hidden[rows, slots] = extra
    valid = torch.zeros(b, m, dtype=torch.bool, device=device)
    valid[rows, slots] = True if extra_valid is None else extra_valid
    key = torch.full((b, m), -1.0, dtype=torch.float64, device=device)
    key[rows, slots] = img_l[:, None].double() + (torch.arange(e, device=device)[None, :] + 1.0) / (e + 1)
    rest = pos.shape[2:]  # () for 1-D positions, (R,) for multi-axis ones (M-RoPE)
    extra_pos = torch.zeros(b, m, *rest, dtype=torch.long, device=device)
    extra_pos[rows, slots] = pos[img_b, img_l][:, None].expand(-1, e, *rest)
    seq = Seq(
        hidden=hidden,
        valid=valid,
        pos=extra_pos,
        roles=torch.full((b, m), int(TokenRole.IMAGE), dtype=torch.long, device=device),
        src=torch.full((b, m), -1, dtype=torch.long, device=device),
        prompt=valid.clone(),
        feature=torch.full((b, m), -1, dtype=torch.long, device=device),  # made by the strategy: no patch row
    )
    return seq, key


def _scatter_back(hidden: Tensor, seq: Seq, n: int) -> Tensor:
    """The packed final hidden states at their original positions ``[B, n, D]``; dropped ones are zero."""
    return scatter_rows(hidden, seq.src, seq.valid & (seq.src >= 0), n)
