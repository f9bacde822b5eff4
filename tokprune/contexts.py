"""The contexts a strategy reads and the plans it returns: what crosses the :class:`~tokprune.strategy.PruningStrategy`
interface (re-exported there, where extenders import them from).

* vision stage: :class:`Signal` (an encoder signal to capture), :class:`VisionSignals` (computed on first use),
  :class:`TextCondition`, :class:`FrameLayout`, :class:`VisionContext` in, :class:`VisionPlan` out;
* LLM stage: :class:`TokenRole` of each position, :class:`LLMAttention` rows, :class:`LLMContext` in,
  :class:`LLMPlan` out.

Data and the pure computations on it (signals, attention rows); the interface, its validation and the
roles a strategy may drop live in :mod:`tokprune.strategy`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import StrategyContractError, StrategyParamError

__all__ = [
    "FrameLayout",
    "LLMAttention",
    "LLMContext",
    "LLMPlan",
    "Signal",
    "TextCondition",
    "TokenRole",
    "VisionContext",
    "VisionPlan",
    "VisionSignals",
]


class TokenRole(enum.IntEnum):
    """Role of each sequence position at the LLM stage (``LLMContext.roles``)."""

    PADDING = 0  #: left padding, or ragged padding after an earlier pruning step; never dropped
    IMAGE = 1  #: a visual token (projected patch, merged token or extra global token)
    QUESTION = 2  #: the user's question text; dropped only by strategies with ``drops_text``
    TEMPLATE = 3  #: system prompt, BOS, role markers; dropped only by strategies with ``drops_template``
    PROTECTED = 4  #: never dropped (the last prompt token, whose logits start generation)


@dataclass(frozen=True)
class Signal:
    """An encoder signal a vision-stage strategy needs the adapter to capture.

    ``kind="qk"``: the q and k projections (``[B, 1+N, C]``, before any internal scaling) of encoder
    layer ``layer`` (0-based, negative counts from the end: -1 is the last layer).
    ``kind="hidden"``: ``hidden_states[layer]`` in HF's convention (0 = embeddings, -1 = last layer's
    output, -2 = the penultimate output LLaVA-1.5 feeds the projector), ``[B, 1+N, C]``.
    """

    kind: Literal["qk", "hidden"]
    layer: int

    def resolve(self, num_layers: int) -> Signal:
        """The same signal with a non-negative layer index for an encoder of ``num_layers`` layers."""
        size = num_layers if self.kind == "qk" else num_layers + 1
        index = self.layer + size if self.layer < 0 else self.layer
        if not 0 <= index < size:
            valid = f"{-size}..{size - 1}"
            raise StrategyParamError(
                f"encoder {self.kind} layer {self.layer} is out of range for {num_layers} layers (valid: {valid})"
            )
        return Signal(self.kind, index)


class VisionSignals:
    """Lazily computed, cached encoder signals for one batch.

    ``fetch(signal)`` returns the raw tensor(s) for a *resolved* :class:`Signal` (``(q, k)`` for
    ``"qk"``, the hidden states for ``"hidden"``). Derived scores are computed once and cached; they
    are fp32 whatever the encoder dtype. ``declared`` (resolved signals) guards against strategies
    reading signals they did not list in ``requires()``, which the adapter would not have captured.
    """

    def __init__(
        self,
        fetch: Callable[[Signal], Any],
        num_layers: int,
        num_heads: int,
        declared: frozenset[Signal] | None = None,
        cls_index: int = 0,
        lengths: Tensor | None = None,
        groups: Tensor | None = None,
    ) -> None:
        self._fetch = fetch
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.cls_index = cls_index
        #: long ``[B]``: patches of each image in a ragged batch (raw signals are ``[B, 1+N_max, C]``,
        #: padded after them); derived scores give padding no attention mass. None: every row full.
        #: With ``groups``: tokens of each row.
        self.lengths = lengths
        #: long ``[N, G]``: the tower patches (indices among the ``P`` patches, CLS excluded) that make each
        #: of the ``N`` tokens the strategy chooses among, where the family merges patches before the
        #: strategy (InternVL's pixel shuffle: ``G = 4``); None: token ``j`` is patch ``j``. :meth:`qk` stays
        #: per patch (``[B, 1+P, C]``); the rest is per token: a token's CLS attention is the mass on its
        #: patches (summed after the softmax over all patches), its key (:meth:`patch_keys`) the mean of
        #: theirs, its hidden state (:meth:`hidden`, hence :meth:`cls_similarity`) theirs joined.
        self.groups = groups
        self._declared = declared
        self._cache: dict[tuple, Tensor] = {}

    def _raw(self, signal: Signal) -> Any:
        resolved = signal.resolve(self.num_layers)
        if self._declared is not None and resolved not in self._declared:
            raise StrategyContractError(
                f"a strategy read {resolved} without declaring it in requires(); declared: "
                f"{sorted(self._declared, key=lambda s: (s.kind, s.layer))}"
            )
        key = ("raw", resolved)
        if key not in self._cache:
            self._cache[key] = self._fetch(resolved)
        return self._cache[key]

    def qk(self, layer: int = -1) -> tuple[Tensor, Tensor]:
        """q and k projections of encoder ``layer``, each ``[B, 1+N, C]`` (CLS included)."""
        return self._raw(Signal("qk", layer))

    def hidden(self, layer: int = -2) -> Tensor:
        """``hidden_states[layer]`` of the encoder, ``[B, 1+N, C]`` (CLS included).

        With ``groups``, in the strategy's token space: each token its patches' states joined (``[B, 1+N,
        G*C]``, the pixel shuffle's own layout, so the feature layer's row is the token's feature), the CLS
        state repeated ``G`` times to the same width."""
        raw = self._raw(Signal("hidden", layer))
        if self.groups is None:
            return raw
        key = ("hidden_tokens", Signal("hidden", layer).resolve(self.num_layers))
        if key not in self._cache:
            at = self.cls_index % raw.shape[1]
            patches = torch.cat([raw[:, :at], raw[:, at + 1 :]], dim=1)
            tokens = patches[:, self.groups].flatten(2)  # [B, N, G*C]
            cls = raw[:, at : at + 1].repeat(1, 1, self.groups.shape[1])
            self._cache[key] = torch.cat([tokens[:, :at], cls, tokens[:, at:]], dim=1)
        return self._cache[key]

    def cls_attention(self, layer: int = -1, heads: Literal["single", "mean"] = "single") -> Tensor:
        """CLS-row attention over the patches of encoder ``layer`` from its q/k, fp32 ``[B, N]``.

        ``heads="single"`` is PruMerge's single-head surrogate over the full width;
        ``heads="mean"`` splits into the encoder's heads and averages their softmax rows.
        """
        from . import scoring

        if heads not in ("single", "mean"):
            raise StrategyParamError(f"heads must be one of: single, mean; got {heads!r}")
        key = ("cls_attention", Signal("qk", layer).resolve(self.num_layers), heads)
        if key not in self._cache:
            q, k = self.qk(layer)
            n_heads = 1 if heads == "single" else self.num_heads
            valid = self._patch_valid(q.shape[1], q.device)
            scores = scoring.cls_attention(q, k, num_heads=n_heads, cls_index=self.cls_index, key_valid=valid)
            self._cache[key] = self._per_token(scores, summed=True)
        return self._cache[key]

    def cls_similarity(self, layer: int = -2) -> Tensor:
        """Cosine similarity of the CLS hidden state to each patch at ``hidden_states[layer]``, ``[B, N]``."""
        from . import scoring

        key = ("cls_similarity", Signal("hidden", layer).resolve(self.num_layers))
        if key not in self._cache:
            self._cache[key] = scoring.cls_cosine_similarity(self.hidden(layer), cls_index=self.cls_index)
        return self._cache[key]

    def patch_keys(self, layer: int = -1) -> Tensor:
        """Keys of the patch tokens (CLS removed) of encoder ``layer``, ``[B, N, C]`` (with ``groups``: the
        mean key of each token's patches)."""
        _, k = self.qk(layer)
        return self._per_token(torch.cat([k[:, : self.cls_index], k[:, self.cls_index + 1 :]], dim=1), summed=False)

    def _patch_valid(self, width: int, device: torch.device) -> Tensor | None:
        """bool ``[B, 1+P]`` (``width = 1+P``): the CLS and the patches of each row's own tokens; None: all."""
        if self.lengths is None:
            return None
        if self.groups is None:  # the tail of the row is padding
            return torch.arange(width, device=device)[None, :] <= self.lengths[:, None]
        tokens = torch.arange(self.groups.shape[0], device=device)[None, :] < self.lengths[:, None]  # [B, N]
        valid = torch.ones(tokens.shape[0], width, dtype=torch.bool, device=device)
        patches = valid[:, 1:].clone()
        patches[:, self.groups] = tokens[:, :, None].expand(-1, -1, self.groups.shape[1])
        return torch.cat([valid[:, :1], patches], dim=1)

    def _per_token(self, per_patch: Tensor, summed: bool) -> Tensor:
        """``[B, P]`` or ``[B, P, C]`` per patch -> per token (``groups``): summed or averaged over its patches."""
        if self.groups is None:
            return per_patch
        grouped = per_patch[:, self.groups]  # [B, N, G(, C)]
        return grouped.sum(dim=2) if summed else grouped.mean(dim=2)


@dataclass(frozen=True)
class TextCondition:
    """The instruction of each image, embedded with a CLIP text model beside the image's patches
    (``VisionContext.text``, for instruction-conditioned strategies such as CDPruner)."""

    #: ``[B, N, E]``: each patch in the joint image-text space (the tower's post-layernorm and the CLIP
    #: visual projection applied to ``features``).
    patches: Tensor
    #: ``[B, M, E]``: the CLIP text embeddings of the image's question, one per 77-token segment.
    text: Tensor
    #: bool ``[B, M]``: which segments are real (questions of different lengths).
    text_valid: Tensor
    #: What produced them, for the stats' diagnostics (e.g. the text model's class).
    source: str = "clip"


@dataclass(frozen=True)
class FrameLayout:
    """How each row of a vision context splits into frames (``VisionContext.frames``, video inputs).

    A "frame" is one frame of the LLM's tokens: on Qwen2.5-VL and Qwen3-VL a temporal patch group (the
    tower's 3-D patches span ``temporal_patch_size = 2`` video frames), so a 16-frame clip has 8. Row
    ``b`` holds ``counts[b]`` frames of ``rows[b] * cols[b]`` tokens each, frame-major, each frame in
    raster order: token ``j`` is frame ``j // tokens_per_frame[b]``. An image is a row of one frame.
    """

    #: long ``[B]``: frames of each row.
    counts: Tensor
    #: long ``[B, 2]``: ``(rows, cols)`` of each row's frames on the merged token grid.
    grid: Tensor

    @property
    def tokens_per_frame(self) -> Tensor:
        """long ``[B]``: ``rows * cols``."""
        return self.grid[:, 0] * self.grid[:, 1]

    def frame_of(self, num_tokens: int) -> Tensor:
        """long ``[B, num_tokens]``: the frame of each token position, -1 past the row's own tokens."""
        j = torch.arange(num_tokens, device=self.counts.device)[None, :]
        per = self.tokens_per_frame[:, None].clamp_min(1)
        frame = torch.div(j, per, rounding_mode="floor")
        return torch.where(frame < self.counts[:, None], frame, -1)


@dataclass(frozen=True)
class VisionContext:
    """Input of a vision-stage strategy for one batch."""

    #: Patch features the projector would receive (CLS excluded), ``[B, N, C]``.
    features: Tensor
    #: Encoder signals, computed on first use.
    signals: VisionSignals
    #: Patch grid ``(rows, cols)`` of the raster order, when the tower has one (``rows * cols == N``).
    grid: tuple[int, int] | None = None
    #: long ``[B]``: real tokens of each image when images differ in size (AnyRes tiles, dynamic
    #: resolution): row ``b`` holds them in ``[:lengths[b]]``, the rest is padding that must not be kept.
    #: None: every row is full (``N`` tokens each). Only strategies with ``ragged_vision`` receive it.
    lengths: Tensor | None = None
    #: The family's projector as a per-token map ``[B, N, C] -> [B, N, D]`` into the LLM's input space;
    #: None: ``features`` already are the tokens the LLM receives (Qwen's merger runs before pruning).
    project: Callable[[Tensor], Tensor] | None = None
    #: Each image's instruction embedded for strategies whose :meth:`PruningStrategy.reads_instruction`
    #: is true, where the patch was given a text encoder; None otherwise (the strategy's stand-in runs).
    text: TextCondition | None = None
    #: The frame structure of each row where the rows are videos (or, with ``budget_scope="frame"``,
    #: single frames); None where the family gives none (images of families without video). Strategies
    #: with ``temporal`` read it; the others cut each row as one image.
    frames: FrameLayout | None = None

    def projected(self) -> Tensor:
        """The tokens the LLM would receive, ``[B, N, D]``: ``project(features)`` (``features`` without a
        projector). Methods whose reference selects after the projector (DivPrune, CDPruner) read these.

        Projected once per context: the family then takes the kept rows from this projection instead of
        projecting them again (:meth:`projected_rows`), as those references do, and the FLOP model counts
        the projector on every token, which is what such a method costs."""
        if self.project is None:
            return self.features
        memo = self.__dict__.get("projected_memo")
        if memo is None:
            memo = self.project(self.features)
            object.__setattr__(self, "projected_memo", memo)  # a frozen context; the memo is its own result
        return memo

    def projected_rows(self) -> Tensor | None:
        """``[B, N, D]``: :meth:`projected`, where the strategy computed it (else None: the family projects the
        kept rows only, and only they are counted)."""
        return self.__dict__.get("projected_memo") if self.project is not None else None

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def num_patches(self) -> int:
        return self.features.shape[1]

    @property
    def token_counts(self) -> Tensor:
        """long ``[B]``: each image's own token count (``N`` for every row when ``lengths`` is None)."""
        if self.lengths is not None:
            return self.lengths
        return torch.full((self.batch_size,), self.num_patches, dtype=torch.long, device=self.features.device)

    @property
    def token_valid(self) -> Tensor:
        """bool ``[B, N]``: True at each image's real tokens (all True when ``lengths`` is None)."""
        index = torch.arange(self.num_patches, device=self.features.device)
        return index[None, :] < self.token_counts[:, None]


@dataclass(frozen=True)
class VisionPlan:
    """Output of a vision-stage strategy. Kept tokens stay in raster order."""

    #: ``bool [B, N]``, True = keep. Counts may differ per sample; at least one per sample.
    keep: Tensor
    #: Replacement features ``[B, N, C]`` (merging strategies), read at kept positions; None = unchanged.
    features: Tensor | None = None
    #: Extra tokens ``[B, E, C]`` appended after the kept ones (e.g. PruMerge's global token).
    extra: Tensor | None = None
    #: bool ``[B, E]``: which extra tokens of each row are real, when the rows of one batch bring
    #: different counts (images of different sizes: VisionZip's contextual tokens of an image smaller
    #: than the budget). Only the real ones reach the LLM, in order. None: all ``E`` of every row.
    extra_valid: Tensor | None = None
    #: Scores, knee index, fallbacks taken... Tensors are per sample (first dim B).
    diagnostics: dict[str, Any] = field(default_factory=dict)


class LLMAttention:
    """Attention rows of decoder layer ``K-1`` computed from its q/k on demand (works under sdpa).

    ``q [B, H, L, D]`` and ``k [B, Hkv, L, D]`` have RoPE applied; ``key_padding_mask [B, L]`` is True
    for real tokens. Causal masking is applied (or the layer's own ``layer_mask`` where the adapter gives one:
    sliding windows, bidirectional blocks); grouped-query heads are expanded.
    """

    #: bool ``[B, L, L]``: which keys each query of this layer sees, where the layer's mask is not causal +
    #: padding (a sliding window, bidirectional image blocks: Gemma 3); None: causal + padding.
    layer_mask: Tensor | None = None

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        key_padding_mask: Tensor,
        scale: float | None = None,
        keys_from_start: Callable[[], Tensor] | None = None,
        layer_mask: Tensor | None = None,
    ) -> None:
        self.q, self.k, self.key_padding_mask, self.scale = q, k, key_padding_mask, scale
        self.layer_mask = layer_mask
        self._keys_from_start = keys_from_start
        self._solo_keys: Tensor | None = None

    def keys_from_start(self) -> Tensor:
        """Keys ``[B, Hkv, L, D]`` rotated at each sample's positions counted from its first token (its
        position ids minus its first one): the keys the sample has when it runs alone, unpadded.

        Attention scores depend on position differences only, but the *norms* of RoPE-rotated keys
        change when every position shifts by the same amount (left padding without ``position_ids``
        shifts them): a strategy ranking keys by a norm (DART's pivots) reads these so that a padded
        batch ranks as each sample alone does. ``k`` itself where the adapter offers no re-rotation.
        """
        if self._keys_from_start is None:
            return self.k
        if self._solo_keys is None:
            self._solo_keys = self._keys_from_start()
        return self._solo_keys

    def rows(self, query_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attention probabilities of the positions selected by ``query_mask`` (bool ``[B, L]``).

        Returns ``(probs [B, H, Q, L] fp32, query_index long [B, Q], query_valid bool [B, Q])`` where
        ``Q`` is the largest number of queries in any sample; invalid rows have index -1 and zero probs.
        """
        from . import scoring

        query_index, query_valid = _mask_to_index(query_mask & self.key_padding_mask)
        probs = scoring.query_attention(
            self.q,
            self.k,
            query_index,
            key_padding_mask=self.key_padding_mask,
            causal=True,
            scale=self.scale,
            key_mask=self._key_mask(query_index),
        )
        return probs, query_index, query_valid

    def _key_mask(self, query_index: Tensor) -> Tensor | None:
        """The layer mask's rows of the queries at ``query_index`` (long ``[B, Q]``, -1 padding), ``[B, Q, L]``."""
        if self.layer_mask is None:
            return None
        rows = torch.arange(query_index.shape[0], device=query_index.device)[:, None]
        return self.layer_mask[rows, query_index.clamp_min(0)] & (query_index >= 0)[..., None]

    def received(self, query_mask: Tensor) -> Tensor:
        """Head-mean attention each position receives from the selected queries, fp32 ``[B, L]``.

        Averaged over the queries that can see the position (causal normalisation), so early tokens
        are not favoured merely for being visible to more queries.
        """
        from . import scoring

        probs, query_index, query_valid = self.rows(query_mask)
        return scoring.attention_received(
            probs, query_valid, query_index, causal=True, key_mask=self._key_mask(query_index)
        )


def _mask_to_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of True entries per row, left-aligned: ``(index [B, Q] with -1 padding, valid [B, Q])``."""
    counts = mask.sum(dim=1)
    width = max(int(counts.max().item()) if mask.numel() else 0, 1)
    # A stable sort of "not selected" brings selected positions to the front in their original order.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.full_like(order, -1)), valid


@dataclass(frozen=True)
class LLMContext:
    """Input of an LLM-stage strategy at decoder layer ``layer`` for one batch (sequence length L)."""

    #: K: the pruning happens before decoder layer K.
    layer: int
    #: :class:`TokenRole` of every position, long ``[B, L]``.
    roles: Tensor
    #: Hidden states entering layer K (output of layer K-1), ``[B, L, D]``.
    hidden: Tensor
    #: Attention rows of layer K-1 from its q/k.
    attention: LLMAttention
    #: Position ids of the current positions, long ``[B, L]``.
    position_ids: Tensor | None = None
    #: The language model's final norm (``norm(h)``, weights included, what the LM head reads), for
    #: strategies whose reference compares normalised states (DART); None: the identity.
    final_norm: Callable[[Tensor], Tensor] | None = None
    #: Attention rows of layer K *itself*, computed on call from layer K's input norm, q/k projections
    #: (and q/k norms) and RoPE applied to ``hidden`` (PyramidDrop's scores); None where the adapter
    #: offers none.
    layer_attention: Callable[[], LLMAttention] | None = None

    def normed_hidden(self) -> Tensor:
        """``final_norm(hidden)`` ``[B, L, D]`` (``hidden`` where no norm is given)."""
        return self.hidden if self.final_norm is None else self.final_norm(self.hidden)

    def role_mask(self, *roles: TokenRole) -> Tensor:
        """bool ``[B, L]``: positions whose role is one of ``roles``."""
        wanted = torch.tensor([int(r) for r in roles], device=self.roles.device)
        return torch.isin(self.roles, wanted)

    @property
    def valid(self) -> Tensor:
        """bool ``[B, L]``: not padding."""
        return self.roles != TokenRole.PADDING


@dataclass(frozen=True)
class LLMPlan:
    """Output of an LLM-stage strategy."""

    #: ``bool [B, L]``, True = keep for layers >= K. Protected positions are forced on by the base class.
    keep: Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: Replacement hidden states ``[B, L, D]`` entering layer K (merging strategies, e.g. dropped tokens
    #: folded into their nearest kept one), read at kept positions by the adapter before it gathers them;
    #: None = unchanged. Layers ``< K`` (and their cache) saw the unmerged states.
    hidden: Tensor | None = None
