"""The family-agnostic pruned decoder: what every model family shares once its images are encoded.

A family (:class:`tokprune.adapters.Family`, :mod:`.family`) says only what its model knows: its pieces
(:class:`~tokprune.adapters.FamilyParts`), how to run its tower, its projector, its positions. Everything
else is shared and tested once, in modules a reader can hold in their head:

* :mod:`.call`: per-call state (:class:`CallState`) and the KV-cache sessions;
* :mod:`.features`: the encoded images (:class:`~tokprune.adapters.ImageFeatures`);
* :mod:`.generate`: ``generate()`` checks (greedy or sampling, a dynamic cache, one sequence per prompt);
* :mod:`.assembly`: kept image features scattered into their placeholders, extra tokens inserted
  after their image, token roles, position modes;
* :mod:`.loop`: the forward, the prefill loop with its LLM-stage steps, decoding with the pruned cache;
* :mod:`.stats`: counts and FLOPs;
* :mod:`.checks`: the patch-time refusals (a step the family cannot run, a layer it cannot host).

This module holds the class that joins them: the vision stage (the family's
tower, the strategy, the family's projector), pre-encoded features, the per-layer attention defaults and
the patches and hooks it installs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import MissingCapabilityError, StrategyParamError, UnsupportedModelError
from ..pipeline import Pipeline
from ..strategy import Signal, TextCondition, VisionContext, VisionSignals
from ._base import BudgetScope, ModelAdapter, Positions
from .assembly import Assembly
from .call import _ACTIVE, CallState, CaptureKey, GenerateCall, LayerKeys, _Session
from .checks import PatchChecks
from .features import ImageFeatures, PrunedImageFeatures, VisionOut
from .generate import SUPPORTED_MODES, GenerateChecks
from .items import VisualItems
from .loop import DecoderLoop
from .roles import resolve_marker
from .stats import StatsRecorder, _to_host

if TYPE_CHECKING:
    from .family import EncodedImages, FamilyParts

__all__ = ["CallState", "GenerateCall", "PrunedDecoderAdapter", "PrunedImageFeatures", "VisionOut"]

SUPPORTED_ATTENTION = ("sdpa", "eager")


class PrunedDecoderAdapter(
    VisualItems, DecoderLoop, Assembly, GenerateChecks, StatsRecorder, PatchChecks, ModelAdapter
):
    """The core every family runs on; a family subclasses :class:`tokprune.adapters.Family`, which declares
    what it provides (``parts``, ``encode_images``, ``project``, ``positions``...). Nothing here is for a
    family to call or set, except the public attributes listed in :mod:`.family`."""

    #: True for families whose images differ in token count (AnyRes tiles, dynamic resolution): their
    #: vision contexts carry ``lengths``, so only vision strategies declaring ``ragged_vision`` can run.
    variable_image_tokens: ClassVar[bool] = False
    #: False for families whose positions are not 1-D (M-RoPE): ``compact`` renumbering is refused.
    one_d_positions: ClassVar[bool] = True
    has_vision_stage: ClassVar[bool] = False

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
        parts: FamilyParts = self.parts()
        #: What the family's ``parts()`` returned (the model's pieces the core drives).
        self.model_parts = parts
        self._inner, self._lm = parts.inner, parts.language_model
        self._image_token_id, self._tokens_per_image = parts.image_token_id, parts.tokens_per_image
        self._flops, self._output_class = parts.flops, parts.output_class
        hf.check_model(self._lm, self._output_class, image_field=parts.image_field)
        self._init_decoder()
        self._signals = self._check_vision_stage(parts)

    # -- patch-time validation ----------------------------------------------------------------------------

    def _init_decoder(self) -> None:
        """Validate the language-model side; nothing is touched yet."""
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

    # -- the vision stage ---------------------------------------------------------------------------------

    def _vision(
        self, call: CallState, pixel_values: Tensor | None, encoded: Any, options: dict
    ) -> tuple[Any, ImageFeatures | None]:
        """This call's images: ``(encoder output for the model output, ImageFeatures or None)``.

        ``encoded`` is what ``generate`` pre-encoded (``mm_encoder_outputs["image"]``) or None;
        ``options`` the forward's remaining keywords.
        """
        self.check_inputs(pixel_values, options)
        if encoded is not None:  # pre-encoded by generate() through get_image_features
            return self._pre_encoded(encoded, options)
        if pixel_values is None or pixel_values.shape[0] == 0:
            return None, None
        if self.pipeline.vision is None:  # the unpatched tower and projector, as transformers runs them
            stock = self._stock_encode(pixel_values, options)
            return stock, self.stock_features(stock, options)
        features = self._vision_stage(call, pixel_values, options)
        return features.for_generate(), features

    def _stock_encode(
        self, pixel_values: Tensor, options: Mapping[str, object], entry: str = "get_image_features"
    ) -> Any:
        """The model's own feature entry point (``get_image_features``, ``get_video_features``) with the options
        it declares; the pixels go to its first parameter."""
        fn = getattr(self._inner, entry)
        params = [
            name
            for name, p in hf.parameters(fn).items()
            if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        ]
        named = {k: v for k, v in options.items() if k in params[1:] and k != "return_dict"}
        return fn(**{params[0]: pixel_values}, **named, return_dict=True)

    def _vision_stage(
        self, call: CallState, pixel_values: Tensor, options: Mapping[str, object], video: bool = False
    ) -> ImageFeatures:
        """The family's tower (its q/k captured), the vision step on its rows, the family's placement."""
        step = self.pipeline.vision
        call.capture = {}
        try:
            images = self.encode_videos(pixel_values, options) if video else self.encode_images(pixel_values, options)
            captured = call.capture
        finally:
            call.capture = None
        images.qk = {(layer, kind): t for (stage, layer, kind), t in captured.items() if stage == "vision"}
        text = self._instruction(call, images.features) if step.reads_instruction() else None
        ctx = VisionContext(
            features=images.features,
            signals=self.tower_signals(images, images.rows, images.lengths),
            grid=images.grid,
            lengths=images.lengths,
            project=self.project,
            text=text,
        )
        plan = self.plan_images(step, images, ctx)
        if images.projected_rows is None:  # a family planning on rows of its own (per tile) leaves it unset
            images.projected_rows = ctx.projected_rows()
        features = self.place_plan(images, plan)
        # a prompt's videos report apart from its images (one step runs on both)
        prefix = f"video.{step.name}" if images.video else step.name
        features.diagnostics = {f"{prefix}.{k}": v for k, v in plan.diagnostics.items()}
        return features

    def tower_signals(
        self, images: EncodedImages, rows: Callable[[Tensor], Tensor] | None, lengths: Tensor | None
    ) -> VisionSignals:
        """The tower's signals for strategy rows ``rows`` (per pass ``[T, 1+N, C]`` -> per row ``[R, 1+L, C]``;
        None: a pass is a row) from ``images.states`` and the captured ``images.qk`` (for a family's own
        :meth:`~tokprune.adapters.Family.plan_images`, e.g. per tile)."""
        layout = rows if rows is not None else (lambda t: t)

        def fetch(signal: Signal) -> Any:
            if signal.kind == "qk" and (signal.layer, "q") in images.qk:
                return layout(images.qk[(signal.layer, "q")]), layout(images.qk[(signal.layer, "k")])
            if signal.kind == "hidden" and len(images.states) > signal.layer:
                return layout(images.states[signal.layer])
            raise UnsupportedModelError(f"the {self.name} tower provides no {signal}")

        tower = self.model_parts.tower
        return VisionSignals(
            fetch, tower.num_layers, tower.heads, declared=self._signals, lengths=lengths, groups=images.groups
        )

    def placeholder_runs(self) -> Tensor | None:
        """long ``[R]``: the lengths of the image placeholder runs of this call's prompts, in prompt order (sample
        after sample), for a family whose inputs do not say which tower passes make one image (InternVL's
        tiles, each image one run); None outside a call whose prompts the core knows (``get_image_features``
        called directly). One device sync."""
        call = _ACTIVE.get()
        prompts = call.prompts() if call is not None and call.adapter is self else None
        if prompts is None:
            return None
        ids, valid = prompts
        image = (ids == self._image_token_id) & valid.to(ids.device)
        start = image & ~torch.nn.functional.pad(image[:, :-1], (1, 0))  # first placeholder of each run
        run = start.flatten().long().cumsum(0) - 1  # each position's run (in row-major prompt order)
        count = int(start.sum())
        return torch.zeros(count, dtype=torch.long, device=ids.device).index_add_(
            0, run[image.flatten()], torch.ones_like(run[image.flatten()])
        )

    def _instruction(self, call: CallState, features: Tensor) -> TextCondition | None:
        """Each image's question through the CLIP text tower given to ``patch()`` (None without one, or where
        the family names no tower norm to compare in)."""
        prompt = call.prompts()
        norm = self.model_parts.text_norm
        if self.text_encoder is None or prompt is None or norm is None:
            return None
        from ..text_encoder import image_questions

        decode = self.text_encoder.decode or self._decode_question
        texts, image_text = image_questions(*prompt, self._image_token_id, self._tokens_per_image, self._marker, decode)
        return self.text_encoder.condition(features, norm, texts, image_text)

    def _decode_question(self, ids: list[int]) -> str:
        tokenizer = hf.model_tokenizer(self.model)
        if tokenizer is None:
            raise MissingCapabilityError(
                "the text encoder needs the question as text, and this model has no tokenizer saved with it; "
                "give ClipTextEncoder(..., decode=your_tokenizer.decode)"
            )
        return tokenizer.decode(ids, skip_special_tokens=True)

    def _pre_encoded(
        self, encoded: Any, options: Mapping[str, object], video: bool = False
    ) -> tuple[Any, ImageFeatures]:
        """Image (or video) features ``generate()`` encoded before the forward: ours (pruned) or, without a
        vision step, the stock ones; stock features under a vision step would skip the pruning, so they are
        refused."""
        if isinstance(encoded, ImageFeatures):
            return encoded, encoded.vision_out()
        if self.pipeline.vision is not None:
            raise UnsupportedModelError(
                "these image features were not computed by the patched model; pass pixel_values instead"
            )
        return encoded, (self.stock_video_features if video else self.stock_features)(encoded, options)

    # -- per-layer attention: asked of the family for every decoder layer ---------------------------------

    def layer_attention(self, layer: int) -> str:
        """The attention kind of decoder ``layer`` (0-based). Layers of one kind share, within a segment, the
        rotary embedding :meth:`layer_rotary` and the mask :meth:`layer_mask` build for that kind.

        By default every layer is ``"causal"`` (one RoPE, one causal + padding mask). A family whose layers
        differ returns a kind per layer and builds each kind's mask and rotary (Qwen3.5: ``"linear_attention"``
        layers take a 2-D padding mask; sliding-window, global or bidirectional layers their own).
        """
        return "causal"

    def layer_rotary(self, kind: str, hidden: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE ``(cos, sin)`` for the layers of ``kind`` at positions ``pos`` (``hidden`` gives dtype and device)."""
        return self.rotary(hidden, pos)

    def layer_mask(
        self, kind: str, valid: Tensor, query_len: int, dtype: torch.dtype, all_valid: bool
    ) -> Tensor | None:
        """The attention mask of the layers of ``kind``: ``valid`` (bool ``[B, C]``) the cached keys, ``query_len``
        the new queries (the last ones), ``all_valid`` whether no key is padding (the mask may then be None)."""
        return hf.attention_mask(valid, query_len, dtype, self._attn_impl, all_valid)

    def check_later_turn(self, new_valid: Tensor) -> None:
        """Refuse a later turn of a conversation before anything runs: ``new_valid`` (bool ``[B, q]``, ``q > 1``)
        says which of the new tokens after the cached ones are not padding. Default: none (attention masks
        the padding); a family whose layers cannot skip padding placed after the history refuses it here."""

    def layer_mask_from(self, kind: str, keys: LayerKeys, dtype: torch.dtype) -> Tensor | None:
        """The attention mask of the layers of ``kind`` from all the core knows of their keys (validity,
        positions, bidirectional groups: :class:`~tokprune.adapters.call.LayerKeys`), ``[B, 1, Q, C]`` or None.
        The core calls this one; the default reads validity only, through :meth:`layer_mask`. A family whose
        masks depend on positions or groups (Gemma 3's sliding windows and image blocks) overrides it.

        The mask covers every key the segment holds; where the cache returns fewer to a layer (a sliding-window
        cache layer keeps only its last ``window - 1``), the core keeps the mask's last columns."""
        return self.layer_mask(kind, keys.valid, keys.query_len, dtype, keys.all_valid)

    def attention_groups(self, input_ids: Tensor, options: Mapping[str, object]) -> Tensor | None:
        """Bidirectional groups of a prefill's tokens, long ``[B, n]`` (-1: none; tokens of one group attend to
        each other both ways, e.g. one image's tokens in Gemma 3), from the caller's ``input_ids`` and keyword
        inputs; they follow the survivors of every cut into :class:`~tokprune.adapters.call.LayerKeys`.
        Default: None (causal only)."""
        return None

    def llm_cut_refusal(self, layer: int) -> str:
        """Why an LLM-stage step cannot prune before decoder ``layer`` (scoring with layer ``layer - 1``) on this
        model, in a few words; "" when it can (the default, every layer). The core refuses such a step at
        ``patch()``, naming the layers that can host one."""
        return ""

    def _vision_mode(self) -> str:
        """The vision stage's position mode: the caller's ``vision_positions``, else the vision step's
        reference choice where positions are 1-D (M-RoPE survivors keep their 3-D positions), else keep."""
        if self.vision_positions is not None:
            return self.vision_positions
        step = self.pipeline.vision
        own = step.positions() if step is not None else None
        return own if own is not None and self.one_d_positions else "keep"

    # -- install ------------------------------------------------------------------------------------

    def _install(self) -> None:
        self._state.set_attribute(self._inner, "forward", self._forward)
        original_generate = self.model.generate

        @functools.wraps(original_generate)
        def generate(*args: Any, **kwargs: Any) -> Any:
            return self._generate_call(original_generate, args, kwargs)

        self._state.set_attribute(self.model, "generate", generate)
        if self.pipeline.vision is not None:
            self._patch_entry("get_image_features", video=False)
            if self.model_parts.video_token_id is not None:
                self._patch_entry("get_video_features", video=True)
            self._hook_encoder_signals(self.model_parts.tower.layers, self.model_parts.tower.attention)
        for k in self._llm_steps:
            q, key = hf.qk_modules(self._lm.layers[k - 1].self_attn)
            self._hook(q, ("llm", k - 1, "q"))
            self._hook(key, ("llm", k - 1, "k"))

    def _patch_entry(self, entry: str, video: bool) -> None:
        """``entry`` (``get_image_features``, ``get_video_features``) runs the vision stage, so that
        ``generate``'s pre-encoding prunes too; it keeps the original's signature (``generate`` routes its
        keywords by it, through ``__wrapped__``); the pixels are its first parameter."""
        original = getattr(self._inner, entry)
        signature = inspect.signature(original)
        pixels = next(iter(signature.parameters))

        @functools.wraps(original)
        def features(*args: Any, **kwargs: Any) -> ImageFeatures:
            bound = signature.bind_partial(*args, **kwargs)
            options: dict[str, object] = {}
            for name, value in bound.arguments.items():
                kind = signature.parameters[name].kind
                if kind == inspect.Parameter.VAR_KEYWORD:
                    options.update(value)
                elif kind != inspect.Parameter.VAR_POSITIONAL:
                    options[name] = value
            pixel_values = options.pop(pixels)
            with self._active(CallState(self, self._outer_generate())) as call:
                return self._vision_stage(call, pixel_values, options, video).for_generate()

        self._state.set_attribute(self._inner, entry, features)

    def _hook_encoder_signals(self, encoder_layers: Sequence[nn.Module], attention: str = "self_attn") -> None:
        """Record q/k of the encoder layers whose signals the vision step declared (``self._signals``), at the
        modules whose outputs the layer attends with (``hf.qk_modules``: after the q/k norms where it has them)."""
        for signal in self._signals:
            if signal.kind == "qk":
                q, k = hf.qk_modules(getattr(encoder_layers[signal.layer], attention))
                self._hook(q, ("vision", signal.layer, "q"))
                self._hook(k, ("vision", signal.layer, "k"))

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
