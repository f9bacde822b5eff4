"""Per-call state and KV-cache sessions of a patched model.

One :class:`CallState` per ``forward`` (and one per ``generate``, which its forwards inherit) is passed
down explicitly. The only ambient piece is :data:`_ACTIVE`, a :class:`contextvars.ContextVar` naming the
active call, because two things happen outside our call chain: the q/k forward hooks fire inside the
layers, and ``generate`` calls our forward through transformers. A context variable is per thread (and
per asyncio task), so two concurrent calls on one patched model never share state.

A prefill leaves a :class:`_Session` (one :class:`_Segment` per run of layers between two pruning points)
attached weakly to its cache, so decoding builds a mask sized to each segment's cache. The session also
holds what a later turn of a conversation is checked against (docs/concepts.md, "Conversations"): the
unpruned tokens the cache stands for (a pruned cache is shorter than them, so ``cache.get_seq_length()``
cannot tell where the new tokens start), the position of the last one, and the prefill's image inputs.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import InputError, InternalError, UnsupportedModelError

if TYPE_CHECKING:
    from .decoder import PrunedDecoderAdapter

__all__ = [
    "IMAGE_INPUTS",
    "CallState",
    "CaptureKey",
    "GenerateCall",
    "LayerKeys",
    "check_mask_width",
    "check_no_visual_tokens",
    "check_positions_follow",
    "check_same_images",
]

#: Keyword inputs that carry a prompt's images (every family's spelling). A later turn on a pruned cache
#: may repeat them (a processor run on the whole conversation returns them again) but must not change them.
IMAGE_INPUTS = (
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "batch_num_images",  # LLaVA-OneVision: how many images each prompt brings
)

#: Capture key: ``(stage "vision" | "llm", layer, "q" | "k")``.
CaptureKey = tuple[str, int, str]


@dataclass(frozen=True)
class LayerKeys:
    """What the core knows of the keys a decoder layer attends to, for the family's mask
    (:meth:`~tokprune.adapters.Family.layer_mask_from`): the keys a segment's cache holds (cached and new, in
    cache order), the queries being the last ``query_len`` of them."""

    valid: Tensor  #: bool ``[B, C]``: not padding
    #: long ``[B, C]``: each key's 1-D text position, what RoPE sees (survivors keep their original ones under
    #: ``positions=keep``; renumbered under ``compact``)
    positions: Tensor
    query_len: int  #: the queries: the last ``query_len`` keys
    all_valid: bool  #: whether no key is padding (a mask may then be None)
    #: long ``[B, C]``: each key's bidirectional group (:meth:`~tokprune.adapters.Family.attention_groups`:
    #: the image it belongs to), -1 for none; None: the family names no groups, or no query is in one (decoding)
    groups: Tensor | None = None


@dataclass
class GenerateCall:
    """What one ``generate`` call tells the forwards it makes."""

    prompt_len: int
    use_cache: bool
    prefilled: bool = False  #: stats are recorded once, at the first forward (the prefill)
    #: the prompts ``(input_ids, valid)`` ``[B, L]``, for a vision step that reads the instruction
    prompt: tuple[Tensor, Tensor] | None = None
    #: the call's keyword tensors (``image_sizes``, ``image_grid_thw``...): generate() does not pass them all on
    #: to the prefill once it has encoded the images, and the family's patch grid needs them
    options: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class CallState:
    """The state of one call on a patched model; created by the call and passed down explicitly."""

    adapter: PrunedDecoderAdapter
    generate: GenerateCall | None = None
    #: q/k projections the hooks store, only while a tower or a prefill loop runs (None otherwise).
    capture: dict[CaptureKey, Tensor] | None = None
    #: this forward's prompts ``(input_ids, valid)`` ``[B, L]`` (None: those of ``generate``, if any)
    prompt: tuple[Tensor, Tensor] | None = None
    #: the caller's own ``input_ids`` and visual inputs where the family rewrote them before the shared forward
    #: (Qwen-VL's videos become pre-encoded images): what a later turn of the conversation is checked against
    caller_inputs: dict[str, Tensor] = field(default_factory=dict)

    def prompts(self) -> tuple[Tensor, Tensor] | None:
        """The prompts this call's images belong to (the instruction-conditioned vision steps' input)."""
        return self.prompt if self.prompt is not None else (self.generate.prompt if self.generate else None)


#: The call whose hooks may record (see the module docstring for why this one piece is ambient).
_ACTIVE: ContextVar[CallState | None] = ContextVar("tokprune_active_call", default=None)


@dataclass
class _Segment:
    """Decoder layers ``start..`` up to the next segment: one cache length, one position offset."""

    start: int
    mask: Tensor  #: bool ``[B, C]``: validity of each cached position (grows while decoding)
    shift: Tensor  #: long ``[B]``: subtracted from the caller's position ids (compact positions)
    #: ``mask.all()``, decided once at prefill and kept up to date while decoding, so that the decode
    #: steps do not read it back from the device per segment
    all_valid: bool = False
    #: long ``[B, C]``: the 1-D text position of each cached position (grows while decoding), for a family
    #: whose masks depend on positions (sliding windows: :class:`LayerKeys`)
    positions: Tensor | None = None


@dataclass
class _Session:
    """Bookkeeping one prefill leaves for decoding with its cache, and for a later turn continuing it."""

    segments: list[_Segment]
    seen: int  #: unpruned sequence length so far (for ``position_ids=None``, HF's arange convention)
    batch: int
    #: the token ids the cache stands for, unpruned, as chunks ``[B, n_i]`` (the prefill's, then each decoding
    #: step's; joined when a later turn reads them, so that a decoding step does not copy the history)
    tokens: list[Tensor] = field(default_factory=list)
    valid: list[Tensor] = field(default_factory=list)  #: bool chunks beside ``tokens``: not padding
    last_position: Tensor | None = None  #: long ``[B]``: the caller's text position of the last token
    #: the prefill's image inputs (:data:`IMAGE_INPUTS`), by reference: a later turn's must be equal
    images: dict[str, Tensor] = field(default_factory=dict)

    def extend(self, input_ids: Tensor, valid: Tensor, text_positions: Tensor) -> None:
        """Record ``q`` more tokens held by the cache: ids long ``[B, q]``, bool ``[B, q]``, positions ``[B, q]``."""
        self.tokens.append(input_ids)
        self.valid.append(valid)
        self.last_position = text_positions[:, -1]
        self.seen += input_ids.shape[1]

    def copy(self) -> _Session:
        """An independent session for a copy of the cache (the tensors are never changed in place: shared)."""
        segments = [replace(s) for s in self.segments]
        return replace(
            self, segments=segments, tokens=list(self.tokens), valid=list(self.valid), images=dict(self.images)
        )

    def held(self) -> tuple[Tensor, Tensor]:
        """The unpruned token ids and validity the cache stands for, long and bool ``[B, seen]``."""
        if len(self.tokens) > 1:
            self.tokens, self.valid = [torch.cat(self.tokens, dim=1)], [torch.cat(self.valid, dim=1)]
        return self.tokens[0], self.valid[0]


def _generated_count(generate: GenerateCall | None, n: int) -> int:
    """Tokens at the end of the sequence that ``generate`` (without a cache) produced, not the prompt."""
    if generate is None or generate.use_cache or n <= generate.prompt_len:
        return 0
    return n - generate.prompt_len


def check_same_images(session: _Session, given: dict[str, Any]) -> None:
    """Refuse a later turn whose image inputs differ from those the cache was filled with.

    A processor run on the whole conversation returns the images again; they are already in the cache
    (pruned), so they are checked and not used. Pre-encoded features cannot be compared: refused.
    """
    if given.get("mm_encoder_outputs") is not None:
        raise InputError(
            "pre-encoded image features (mm_encoder_outputs) with a non-empty pruned cache: the images are already "
            "in the cache; pass the conversation's pixel_values (they are checked) or none"
        )
    if given.get("pixel_values") is None and given.get("pixel_values_videos") is None:
        return  # a decoding step (generate passes grids, never pixels, after the prefill): nothing to compare
    for name in IMAGE_INPUTS:
        value = given.get(name)
        if value is None:
            continue
        held = session.images.get(name)
        if held is value:
            continue
        if held is None or held.shape != value.shape or not torch.equal(held, value.to(held.device, held.dtype)):
            raise InputError(
                f"{name} differs from the one this pruned cache was filled with (cached: "
                f"{None if held is None else tuple(held.shape)}, given: {tuple(value.shape)}): a later turn continues "
                "the first turn's kept image tokens, so its images must be the same; for another image start a new "
                "conversation (an empty cache)"
            )


def check_no_visual_tokens(new_ids: Tensor, placeholders: list[int]) -> None:
    """Refuse image or video placeholders (``placeholders``) among a later turn's new tokens (long ``[B, q]``)."""
    if bool(torch.isin(new_ids, torch.tensor(placeholders, device=new_ids.device)).any()):
        raise UnsupportedModelError(
            "the new turn brings an image or a video: a later turn on a pruned cache continues the first turn's "
            "kept visual tokens and cannot add any; put every image and video in the first turn, or run the "
            "whole conversation with an empty cache (a fresh prefill prunes all of them)"
        )


def check_mask_width(session: _Session, attention_mask: Tensor | None, q: int) -> None:
    """Refuse an ``attention_mask`` that does not cover the cached tokens (unpruned) and ``q`` new ones."""
    if attention_mask is not None and attention_mask.shape[1] != session.seen + q:
        raise InputError(
            f"attention_mask has {attention_mask.shape[1]} columns, but this pruned cache stands for "
            f"{session.seen} tokens (unpruned) and input_ids brings {q} new ones: the mask must cover both "
            f"({session.seen + q} columns); pass only the tokens after the cached ones as input_ids"
        )


def check_positions_follow(session: _Session, text_positions: Tensor, new_valid: Tensor) -> None:
    """Refuse new tokens whose first valid position (long ``[B, q]``) is not the cached last one plus one.

    The caller's positions (``generate``'s come from the attention mask; Qwen's add the M-RoPE offset the
    model kept from its last prompt) must continue the cached sequence; anything else would run silently
    shifted. One host read per later turn, none per decoding step.
    """
    if session.last_position is None:
        raise InternalError("a pruned cache's session has no last position")
    first = new_valid.long().argmax(dim=1)  # the first valid new column of each sample
    got = text_positions.gather(1, first[:, None])[:, 0]
    want = session.last_position.to(got.device) + 1
    bad = (got != want) & new_valid.any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise InputError(
            f"the new tokens of sample {i} start at position {int(got[i])}, but the cached sequence ends at "
            f"position {int(want[i]) - 1}: positions must continue the cache (pass position_ids that do, or none; "
            "on Qwen-VL, a generate() on another prompt in between replaces the model's M-RoPE offset)"
        )
