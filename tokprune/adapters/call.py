"""Per-call state and KV-cache sessions of a patched model.

One :class:`CallState` per ``forward`` (and one per ``generate``, which its forwards inherit) is passed
down explicitly. The only ambient piece is :data:`_ACTIVE`, a :class:`contextvars.ContextVar` naming the
active call, because two things happen outside our call chain: the q/k forward hooks fire inside the
layers, and ``generate`` calls our forward through transformers. A context variable is per thread (and
per asyncio task), so two concurrent calls on one patched model never share state.

A prefill leaves a :class:`_Session` (one :class:`_Segment` per run of layers between two pruning points)
attached weakly to its cache, so decoding builds a mask sized to each segment's cache.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from .decoder import PrunedDecoderAdapter

__all__ = ["CallState", "CaptureKey", "GenerateCall"]

#: Capture key: ``(stage "vision" | "llm", layer, "q" | "k")``.
CaptureKey = tuple[str, int, str]


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


@dataclass
class _Session:
    """Bookkeeping one prefill leaves for decoding with its cache."""

    segments: list[_Segment]
    seen: int  #: unpruned sequence length so far (for ``position_ids=None``, HF's arange convention)
    batch: int


def _generated_count(generate: GenerateCall | None, n: int) -> int:
    """Tokens at the end of the sequence that ``generate`` (without a cache) produced, not the prompt."""
    if generate is None or generate.use_cache or n <= generate.prompt_len:
        return 0
    return n - generate.prompt_len
