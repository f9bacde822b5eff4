"""The family-agnostic pruned decoder: what every model family shares once its images are encoded.

A family adapter (``llava.py``) subclasses :class:`PrunedDecoderAdapter` and supplies only what its family
knows: how to run the tower and capture its signals (:meth:`~PrunedDecoderAdapter._vision`), which
token id marks an image and how many tokens each image brings, the FLOP model of its tower, and the
output class of its model. Everything else is shared and tested once, in modules a reader can hold in
their head:

* :mod:`.call`: per-call state (:class:`CallState`) and the KV-cache sessions;
* :mod:`.features`: the encoded images (:class:`VisionOut`, :class:`PrunedImageFeatures`);
* :mod:`.generate`: ``generate()`` checks (greedy or sampling, a dynamic cache, one sequence per prompt);
* :mod:`.assembly`: kept image features scattered into their placeholders, extra tokens inserted
  after their image, token roles, position modes;
* :mod:`.loop`: the forward, the prefill loop with its LLM-stage steps, decoding with the pruned cache;
* :mod:`.stats`: counts and FLOPs.

This module holds the class that joins them, its patch-time validation, the family's part (abstract),
the position defaults (1-D), the per-layer attention questions and the hooks it installs.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import MissingCapabilityError, StrategyParamError, UnsupportedModelError
from ..pipeline import Pipeline
from ..stats import FlopModel
from ..strategy import PruningStrategy
from ._base import BudgetScope, ModelAdapter, Positions
from .assembly import Assembly
from .call import _ACTIVE, CallState, CaptureKey, GenerateCall, _Session
from .features import PrunedImageFeatures, VisionOut
from .generate import SUPPORTED_MODES, GenerateChecks
from .loop import DecoderLoop
from .roles import resolve_marker
from .stats import StatsRecorder, _to_host

__all__ = ["CallState", "GenerateCall", "PrunedDecoderAdapter", "PrunedImageFeatures", "VisionOut"]

SUPPORTED_ATTENTION = ("sdpa", "eager")


class PrunedDecoderAdapter(DecoderLoop, Assembly, GenerateChecks, StatsRecorder, ModelAdapter):
    """The shared part of every family adapter (see the module docstring).

    A family's ``__init__`` sets the attributes below, then calls :meth:`_init_decoder`; it implements
    :meth:`_vision` and :meth:`_install_family`. Attributes a family sets:

    * ``_inner``: the module whose ``forward`` is replaced (``LlavaModel``: embeds, tower, LM);
    * ``_lm``: the language model (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``);
    * ``_image_token_id``: the placeholder id of image tokens in ``input_ids``;
    * ``_tokens_per_image``: tokens one unpruned image brings (``N``);
    * ``_flops``: the :class:`~tokprune.stats.FlopModel` of the model;
    * ``_output_class``: the dataclass the replaced forward returns.
    """

    #: True for families whose images differ in token count (AnyRes tiles, dynamic resolution): their
    #: vision contexts carry ``lengths``, so only vision strategies declaring ``ragged_vision`` can run.
    variable_image_tokens: ClassVar[bool] = False

    _inner: nn.Module
    _lm: nn.Module
    _image_token_id: int
    _tokens_per_image: int
    _flops: FlopModel
    _output_class: type

    def __init__(
        self,
        model: nn.Module,
        pipeline: Pipeline,
        *,
        vision_positions: Positions | None = None,
        llm_positions: Positions = "keep",
        question_end: Sequence[int] | Any | None = None,
        budget_scope: BudgetScope = "image",
        text_encoder: Any = None,
    ) -> None:
        super().__init__(
            model,
            pipeline,
            vision_positions=vision_positions,
            llm_positions=llm_positions,
            question_end=question_end,
            budget_scope=budget_scope,
            text_encoder=text_encoder,
        )
        self._marker = resolve_marker(question_end, model)
        self._marker_ids: dict[torch.device, Tensor] = {}  # the marker as a tensor per device, built once
        self._sessions: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()

    def _init_decoder(self) -> None:
        """Validate the language-model side (after the family set ``_lm``); nothing is touched yet."""
        self._attn_impl = hf.attention_implementation(self._lm.config)
        if self._attn_impl not in SUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"the language model uses attn_implementation={self._attn_impl!r}; tokprune's {self.name} adapter "
                f"supports {', '.join(SUPPORTED_ATTENTION)} (load the model with attn_implementation='sdpa')"
            )
        self._llm_steps = self._check_llm_layers()
        own = [step.spec() for step in self.pipeline.llm if step.positions() == "compact"]
        if not self.one_d_positions and own:
            raise StrategyParamError(
                f"{', '.join(own)} renumber their survivors' 1-D positions contiguously (their reference's choice), "
                f"but {self.name} uses multi-axis (M-RoPE) positions; pass positions=keep to them"
            )
        if not self.one_d_positions and "compact" in (self.vision_positions, self.llm_positions):
            raise StrategyParamError(
                f"compact positions renumber 1-D position ids, but {self.name} uses multi-axis (M-RoPE) positions; "
                "use vision_positions='keep' and llm_positions='keep' (survivors keep their 3-D positions)"
            )
        step = self.pipeline.vision
        if step is not None and step.temporal:
            self._check_temporal(step)
        if self.variable_image_tokens and step is not None and not step.ragged_vision:
            from ..registry import available, describe

            video = "frame" in self.budget_scopes  # temporal steps run only where there is video
            ragged = [
                name
                for name in available(stage="vision")
                if describe(name).cls.ragged_vision and (video or not describe(name).cls.temporal)
            ]
            raise MissingCapabilityError(
                f"{step.short_spec()} cuts images of one fixed size, but {self.name} images differ in token count "
                f"(ragged vision contexts); vision strategies that cut per image: {', '.join(ragged)}"
            )

    def _check_temporal(self, step: PruningStrategy) -> None:
        """Refuse a temporal vision step (it cuts across a video's frames) where there are no frames to cut
        across: on a family without video, and under ``budget_scope="frame"`` (every row one frame)."""
        from ._base import _families_with

        if "frame" not in self.budget_scopes:
            raise MissingCapabilityError(
                f"{step.short_spec()} prunes across the frames of a video, and {self.name} takes no video"
                f"{_families_with('frame')}"
            )
        if self.budget_scope == "frame":
            raise StrategyParamError(
                f"{step.short_spec()} sets its own budget across the frames of each video, so budget_scope='frame' "
                "(one budget per frame) does not apply to it; use budget_scope='image' (the default: per video)"
            )

    def _check_cls(self, tower_has_cls: bool) -> None:
        """Refuse a vision step reading CLS signals on a tower without a CLS token, naming what works.

        Every encoder signal (:class:`~tokprune.strategy.Signal` ``qk`` / ``hidden``) is read relative to
        the CLS token (its attention row, its similarity), so a tower without one provides none of them.
        """
        step = self.pipeline.vision
        if tower_has_cls or step is None or not step.requires():
            return
        from ..registry import available, describe

        working = []
        for name in available(stage="vision"):
            cls = describe(name).cls
            if cls.temporal and "frame" not in self.budget_scopes:
                continue  # refused here anyway: this family takes no video
            if not cls().requires() and (cls.ragged_vision or not self.variable_image_tokens):
                working.append(name)
        signals = ", ".join(f"{s.kind}@{s.layer}" for s in sorted(step.requires(), key=lambda s: (s.kind, s.layer)))
        raise MissingCapabilityError(
            f"{step.short_spec()} reads the CLS token's signals ({signals}), and the {self.name} vision tower has no CLS "
            f"token; vision strategies that read no CLS signal: {', '.join(working) or 'none registered'} (some "
            "strategies have a CLS-free parameter value, e.g. cdpruner(relevance=uniform): see tokprune describe NAME)"
        )

    def _check_llm_layers(self) -> dict[int, PruningStrategy]:
        num_layers = len(self._lm.layers)
        steps = {}
        for step in self.pipeline.llm:
            for k in step.llm_layers:  # a schedule (e.g. PyramidDrop) is one step at each of its layers
                if not 1 <= k <= num_layers - 1:
                    raise StrategyParamError(
                        f"{step.short_spec()} prunes before decoder layer {k}, but this {self.name} language model has "
                        f"{num_layers} layers: layer must be in 1..{num_layers - 1} (layer K-1 provides the scores)"
                    )
                steps[k] = step
        return steps

    # -- the family's part ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _vision(
        self, call: CallState, pixel_values: Tensor | None, encoded: Any, options: dict
    ) -> tuple[Any, VisionOut | None]:
        """Encode this call's images: ``(encoder output for the model output, VisionOut or None)``.

        ``encoded`` is what ``generate`` pre-encoded (``mm_encoder_outputs["image"]``) or None;
        ``options`` the forward's remaining keywords (the family pops its own, e.g. ``image_sizes``).
        """

    @abc.abstractmethod
    def _install_family(self) -> None:
        """Patch the family's own entry points (image features, tower hooks) into ``self._state``."""

    def patch_cells(self, features: VisionOut, options: dict[str, Tensor]) -> Tensor | None:
        """Each image token's cell on its image's patch grid, long ``[I, N, 4]`` ``(tile, frame, row, col)``
        (:mod:`tokprune.keptmap`), from the encoded images and the forward's keywords (``image_sizes``,
        ``image_grid_thw``...); None: the family gives no grid (kept maps then hold token indices only)."""
        return None

    # -- positions (1-D by default; a family with multi-axis RoPE overrides these four) ----------------

    #: False for families whose positions are not 1-D (M-RoPE): ``compact`` renumbering is refused.
    one_d_positions: ClassVar[bool] = True

    def _positions(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, options: dict
    ) -> Tensor:
        """Prefill position ids, long ``[B, n]`` (or ``[B, n, R]``): the caller's, else ``arange`` (HF's default)."""
        b, n = input_ids.shape
        pos = torch.arange(n, device=input_ids.device)[None, :] if position_ids is None else position_ids
        return pos.expand(b, n).long()

    def _decode_positions(self, position_ids: Tensor | None, seen: int, b: int, q: int, device: torch.device) -> Tensor:
        """Position ids of ``q`` new tokens after ``seen`` (unpruned) ones, long ``[B, q]`` (or ``[B, q, R]``)."""
        if position_ids is None:
            position_ids = torch.arange(seen, seen + q, device=device)[None, :]
        return position_ids.expand(b, q).long()

    def _rotary(self, hidden: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE ``(cos, sin)`` ``[B, L, head_dim]`` for positions ``pos``."""
        return hf.rotary_embeddings(self._lm, hidden, pos)

    def _vision_mode(self) -> str:
        """The vision stage's position mode: the caller's ``vision_positions``, else the vision step's
        reference choice where positions are 1-D (M-RoPE survivors keep their 3-D positions), else keep."""
        if self.vision_positions is not None:
            return self.vision_positions
        step = self.pipeline.vision
        own = step.positions() if step is not None else None
        return own if own is not None and self.one_d_positions else "keep"

    def _text_positions(self, pos: Tensor) -> Tensor:
        """The 1-D position ids ``[B, L]`` a decoder layer and ``LLMContext.position_ids`` get."""
        return pos

    # -- per-layer attention: asked of the family for every decoder layer ---------------------------------

    def layer_attention(self, layer: int) -> str:
        """The attention kind of decoder ``layer`` (0-based). Layers of one kind share, within a segment, the
        rotary embedding :meth:`layer_rotary` and the mask :meth:`layer_mask` build for that kind.

        Every built-in family returns ``"causal"`` for every layer (one RoPE, one causal + padding mask). A
        family whose layers differ (Gemma 3's sliding-window and global layers with their own RoPE,
        bidirectional image blocks) returns a kind per layer and builds each kind's mask and rotary.
        """
        return "causal"

    def layer_rotary(self, kind: str, hidden: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE ``(cos, sin)`` for the layers of ``kind`` at positions ``pos`` (``hidden`` gives dtype and device)."""
        return self._rotary(hidden, pos)

    def layer_mask(self, kind: str, valid: Tensor, query_len: int, dtype: torch.dtype, all_valid: bool) -> Any:
        """The attention mask of the layers of ``kind``: ``valid`` (bool ``[B, C]``) the cached keys, ``query_len``
        the new queries (the last ones), ``all_valid`` whether no key is padding (the mask may then be None)."""
        return hf.attention_mask(valid, query_len, dtype, self._attn_impl, all_valid)

    # -- install ------------------------------------------------------------------------------------

    def _install(self) -> None:
        self._state.set_attribute(self._inner, "forward", self._forward)
        original_generate = self.model.generate

        @functools.wraps(original_generate)
        def generate(*args: Any, **kwargs: Any) -> Any:
            return self._generate_call(original_generate, args, kwargs)

        self._state.set_attribute(self.model, "generate", generate)
        self._install_family()
        for k in self._llm_steps:
            q, key = hf.qk_modules(self._lm.layers[k - 1].self_attn)
            self._hook(q, ("llm", k - 1, "q"))
            self._hook(key, ("llm", k - 1, "k"))

    def _hook_encoder_signals(self, encoder_layers: Sequence[nn.Module]) -> None:
        """Record q/k of the encoder layers whose signals the vision step declared (``self._signals``)."""
        for signal in self._signals:
            if signal.kind == "qk":
                attn = encoder_layers[signal.layer].self_attn
                self._hook(attn.q_proj, ("vision", signal.layer, "q"))
                self._hook(attn.k_proj, ("vision", signal.layer, "k"))

    def _pre_encoded(self, encoded: Any) -> tuple[Any, VisionOut]:
        """Image features ``generate()`` encoded before the forward: ours (pruned) or, without a vision
        step, the stock ones; stock features under a vision step would skip the pruning, so they are refused."""
        if isinstance(encoded, PrunedImageFeatures):
            return encoded, encoded.vision_out()
        if self.pipeline.vision is not None:
            raise UnsupportedModelError(
                "these image features were not computed by the patched model; pass pixel_values instead"
            )
        return encoded, self._unpruned(encoded)

    def _unpruned(self, encoded: Any) -> VisionOut:
        """The stock encoder output (``pooler_output``: one ``[N_i, D]`` per image) as a keep-all :class:`VisionOut`."""
        return VisionOut.unpruned(encoded.pooler_output)

    def _hook(self, module: nn.Module, key: CaptureKey) -> None:
        def store(_module: nn.Module, _args: Any, output: Tensor) -> None:
            # Hooks stay registered while patched but only record inside this adapter's capture window.
            call = _ACTIVE.get()
            if call is not None and call.adapter is self and call.capture is not None:
                call.capture[key] = output

        self._state.add_hook(module.register_forward_hook(store))

    @contextlib.contextmanager
    def _active(self, call: CallState) -> Iterator[CallState]:
        """Make ``call`` the one this thread's hooks record into, for the block (nests, restores)."""
        token = _ACTIVE.set(call)
        try:
            yield call
        finally:
            _ACTIVE.reset(token)


__all__ += ["SUPPORTED_MODES", "_to_host"]  # re-exported: callers written before the split import them here
