"""The family-agnostic pruned decoder: what every model family shares once its images are encoded.

A family adapter (``llava.py``) subclasses :class:`PrunedDecoderAdapter` and supplies only what its family
knows: how to run the tower and capture its signals (:meth:`~PrunedDecoderAdapter._vision`), which
token id marks an image and how many tokens each image brings, the FLOP model of its tower, and the
output class of its model. Everything else lives here and is tested once:

* ``generate()`` checks (greedy or sampling, a dynamic cache, one sequence per prompt);
* sequence assembly: kept image features scattered into their placeholders, extra tokens inserted
  after their image, token roles, position modes;
* the decoder loop: layers ``0..K-1`` see every token, ``K..`` only the kept ones; each run of layers
  between two pruning points (a *segment*) keeps its own padding mask and position offset in a
  session attached (weakly) to the cache, so decoding builds a mask sized to each segment's cache;
* stats and FLOPs.

Per-call state. One :class:`CallState` per ``forward`` (and one per ``generate``, which its forwards
inherit) is passed down explicitly. The only ambient piece is a :class:`contextvars.ContextVar` that
names the active call, because two things happen outside our call chain: the q/k forward hooks fire
inside the layers, and ``generate`` calls our forward through transformers. A context variable is per
thread (and per asyncio task), so two concurrent calls on one patched model never share state.

KV cache. Pruning happens once, at prefill. Without a cache (``use_cache=False``) ``generate`` re-runs
the whole sequence each step; the decision is then made on the prompt positions only (the prompt
length comes from the ``generate`` call) and the generated positions are always kept. By causality the
prompt positions' hidden states, q and k are those of the prefill, so both modes take the same decision
and generate the same tokens.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import functools
import inspect
import weakref
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InputError, InternalError, MissingCapabilityError, StrategyParamError, UnsupportedModelError
from ..pipeline import Pipeline
from ..stats import FlopModel, PruneStats
from ..strategy import LLMAttention, LLMContext, PruningStrategy, TokenRole
from ._base import BudgetScope, ModelAdapter, Positions
from ._seq import Seq, add_feature_rows, compact_positions, packed_width, scatter_rows, token_roles
from .roles import resolve_marker

__all__ = ["CallState", "GenerateCall", "PrunedDecoderAdapter", "PrunedImageFeatures", "VisionOut"]

SUPPORTED_ATTENTION = ("sdpa", "eager")
SUPPORTED_MODES = ("greedy_search", "sample")

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
class VisionOut:
    """A family's encoded images, in the one form the assembly consumes."""

    kept: Tensor  #: ``[S, D]`` projected kept tokens of every image, image-major raster order
    keep: Tensor  #: bool ``[I, N]``: which of each image's tokens are kept (padded rows: False past its length)
    extra: Tensor | None  #: ``[I, E, D]`` projected extra tokens (inserted after each image), or None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: long ``[I]``: each image's own token count when images differ in size; None: ``N`` each.
    lengths: Tensor | None = None
    #: long ``[I]``: tower passes each image cost (AnyRes: its tiles); None: one each.
    tower_runs: Tensor | None = None
    # Optional family features are keyword-only: two branches once each appended one positionally.
    _: KW_ONLY
    #: DeepStack (Qwen3-VL): one ``[S, D]`` per decoder layer ``i`` (rows aligned with ``kept``), added to
    #: the kept image tokens' hidden states after layer ``i``, wherever they are by then; None: no additions.
    deepstack: list[Tensor] | None = None
    #: bool ``[I, E]``: which extra tokens of each image are real (images bringing different counts,
    #: e.g. one set per AnyRes tile); None: all ``E`` of every image.
    extra_valid: Tensor | None = None
    #: fp64 ``[I]``: each image's tower FLOPs where the family counts them itself (Qwen2.5-VL's windowed
    #: tower, :class:`~tokprune.stats.WindowedTower`); None: ``FlopModel.vision`` over ``tower_runs``.
    tower_flops: Tensor | None = None
    #: long ``[I]``: tokens of each image the projector mapped, where not every token entering the LLM
    #: was (LLaVA-NeXT's row newlines are a learned vector); None: ``kept_counts``.
    projected: Tensor | None = None

    @classmethod
    def unpruned(cls, per_image: Sequence[Tensor]) -> VisionOut:
        """Unpruned features (one ``[N_i, D]`` per image) keeping everything, rows padded to the longest."""
        kept = torch.cat(list(per_image))
        lengths = torch.tensor([p.shape[0] for p in per_image], dtype=torch.long, device=kept.device)
        keep = torch.arange(int(lengths.max()), device=kept.device)[None, :] < lengths[:, None]
        return cls(kept=kept, keep=keep, extra=None, lengths=lengths)

    @property
    def token_counts(self) -> Tensor:
        """long ``[I]``: unpruned tokens of each image."""
        if self.lengths is not None:
            return self.lengths
        return torch.full((self.keep.shape[0],), self.keep.shape[1], dtype=torch.long, device=self.keep.device)

    @property
    def kept_counts(self) -> Tensor:
        """long ``[I]``: tokens of each image entering the LLM (kept + extra)."""
        return self.keep.sum(dim=1) + self.extra_counts

    @property
    def extra_counts(self) -> Tensor | int:
        """Extra tokens of each image: long ``[I]`` when they differ (``extra_valid``), else one int."""
        if self.extra is None:
            return 0
        if self.extra_valid is not None:
            return self.extra_valid.sum(dim=1)
        return self.extra.shape[1]


@dataclass
class PrunedImageFeatures(hf.BaseModelOutputWithPooling):
    """``get_image_features`` output of a patched model (what ``generate`` pre-encodes and passes back).

    ``pooler_output`` is a list with one ``[n_i + E, D]`` tensor per image: its kept tokens in order,
    then its ``E`` extra tokens. ``keep`` (bool ``[I, N]``) says which tokens they are, ``lengths``
    (long ``[I]`` or None) how many each image has, ``tower_runs`` its tower passes, ``tower_flops`` their
    cost where the family counts it, ``projected`` the tokens its projector mapped.
    """

    keep: Tensor | None = None
    num_extra: int | None = None
    diagnostics: dict[str, Any] | None = None
    lengths: Tensor | None = None
    tower_runs: Tensor | None = None
    tower_flops: Tensor | None = None
    projected: Tensor | None = None
    #: the flat kept tokens and the extra ones as the adapter made them, so that passing these
    #: features back (``generate``) rebuilds the :class:`VisionOut` without reading counts again
    kept: Tensor | None = None
    extra: Tensor | None = None
    deepstack: list[Tensor] | None = None
    extra_valid: Tensor | None = None

    @classmethod
    def of(cls, out: VisionOut) -> PrunedImageFeatures:
        # The one sync left here: HF's contract is a list of per-image tensors, whose sizes live on the device.
        per_image = list(out.kept.split(out.keep.sum(dim=1).tolist()))
        if out.extra is not None and out.extra_valid is not None:
            per_image = [torch.cat([p, e[v]]) for p, e, v in zip(per_image, out.extra, out.extra_valid)]
        elif out.extra is not None:
            per_image = [torch.cat([p, e]) for p, e in zip(per_image, out.extra)]
        num_extra = 0 if out.extra is None else int(out.extra.shape[1])
        return cls(
            pooler_output=per_image,
            keep=out.keep,
            num_extra=num_extra,
            diagnostics=out.diagnostics,
            lengths=out.lengths,
            tower_runs=out.tower_runs,
            tower_flops=out.tower_flops,
            projected=out.projected,
            kept=out.kept,
            extra=out.extra,
            deepstack=out.deepstack,
            extra_valid=out.extra_valid,
        )

    def vision_out(self) -> VisionOut:
        if self.keep is None:
            raise InputError(
                "these image features carry no keep mask; pass the PrunedImageFeatures get_image_features returned, "
                "unchanged (or pixel_values)"
            )
        if self.kept is not None:
            diagnostics = dict(self.diagnostics or {})
            return VisionOut(self.kept, self.keep, self.extra, diagnostics, **self._optional())
        if self.extra_valid is not None:
            raise InputError(
                "image features with a different number of extra tokens per image must carry their kept and extra "
                "tensors (pass the PrunedImageFeatures get_image_features returned, unchanged)"
            )
        per_image, keep, e = list(self.pooler_output), self.keep, self.num_extra or 0
        counts = keep.sum(dim=1).tolist()
        kept = torch.cat([p[:c] for p, c in zip(per_image, counts)])
        extra = torch.stack([p[c:] for p, c in zip(per_image, counts)]) if e else None
        diagnostics = dict(self.diagnostics or {})
        return VisionOut(kept, keep, extra, diagnostics, **self._optional())

    def _optional(self) -> dict[str, Any]:
        names = ("lengths", "tower_runs", "tower_flops", "projected", "deepstack", "extra_valid")
        return {name: getattr(self, name) for name in names}


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


def _expand_return_sequences(arguments: dict, extra: dict, copies: int) -> tuple[tuple, dict]:
    """``generate`` arguments for ``num_return_sequences = copies``, expanded here instead of by ``generate``.

    ``generate`` encodes the images once and then splits the encoder output per prompt by matching its
    token counts to the prompts' ``<image>`` placeholders, which pruned features no longer match. So
    every batch tensor is repeated here exactly as ``generate`` would (``repeat_interleave`` on dim 0:
    ``[A, B] -> [A, A, B, B]``) and the call asks for one sequence per (repeated) prompt. The sequences,
    their order and the sampling RNG draws are those of the unpruned call's layout; the cost is that the
    vision tower runs once per returned sequence instead of once per prompt.
    """

    def expand(value: Any) -> Any:
        return value.repeat_interleave(copies, dim=0) if isinstance(value, Tensor) else value

    named = {k: expand(v) for k, v in arguments.items()}
    named.update((k, expand(v)) for k, v in extra.items())
    if named.get("generation_config") is not None:
        # generate() warns on a config object plus generation keywords: change a copy of the object.
        named["generation_config"] = copy.deepcopy(named["generation_config"])
        named["generation_config"].num_return_sequences = 1
        named.pop("num_return_sequences", None)
    else:
        named["num_return_sequences"] = 1  # a keyword wins over the model's default config
    return (), named


class PrunedDecoderAdapter(ModelAdapter):
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
        if self.variable_image_tokens and step is not None and not step.ragged_vision:
            from ..registry import available, describe

            ragged = [name for name in available(stage="vision") if describe(name).cls.ragged_vision]
            raise MissingCapabilityError(
                f"{step.short_spec()} cuts images of one fixed size, but {self.name} images differ in token count "
                f"(ragged vision contexts); vision strategies that cut per image: {', '.join(ragged)}"
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
    def _vision(self, call: CallState, pixel_values: Tensor | None, encoded: Any, options: dict) -> tuple[Any, VisionOut | None]:
        """Encode this call's images: ``(encoder output for the model output, VisionOut or None)``.

        ``encoded`` is what ``generate`` pre-encoded (``mm_encoder_outputs["image"]``) or None;
        ``options`` the forward's remaining keywords (the family pops its own, e.g. ``image_sizes``).
        """

    @abc.abstractmethod
    def _install_family(self) -> None:
        """Patch the family's own entry points (image features, tower hooks) into ``self._state``."""

    # -- positions (1-D by default; a family with multi-axis RoPE overrides these four) ----------------

    #: False for families whose positions are not 1-D (M-RoPE): ``compact`` renumbering is refused.
    one_d_positions: ClassVar[bool] = True

    def _positions(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, options: dict) -> Tensor:
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

    def _outer_generate(self) -> GenerateCall | None:
        """The ``generate`` call this forward runs inside, if any (set by :meth:`_generate_call`)."""
        outer = _ACTIVE.get()
        return outer.generate if outer is not None and outer.adapter is self else None

    # -- generate -----------------------------------------------------------------------------------

    def _generate_call(self, original: Any, args: tuple, kwargs: dict) -> Any:
        bound = inspect.signature(original).bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = arguments.pop("kwargs", {})
        config, model_kwargs = hf.generation_config(self.model, arguments.get("generation_config"), extra)
        self._check_generation(config, arguments, model_kwargs)
        inputs = arguments.get("inputs")
        input_ids = inputs if inputs is not None else model_kwargs.get("input_ids")
        if input_ids is None:
            raise UnsupportedModelError(
                "a patched model's generate() needs input_ids (tokprune finds the image in them)"
            )
        use_cache = config.use_cache if config.use_cache is not None else True
        copies = config.num_return_sequences or 1
        if copies > 1:
            args, kwargs = _expand_return_sequences(arguments, extra, copies)
        call = CallState(self, GenerateCall(prompt_len=int(input_ids.shape[1]), use_cache=bool(use_cache)))
        if self.text_encoder is not None:  # the patched get_image_features has no input_ids: keep the prompts
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else input_ids))
            mask = kwargs.get("attention_mask")
            call.generate.prompt = (ids, torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())
        with self._active(call):
            return original(*args, **kwargs)

    def _check_generation(self, config: Any, arguments: dict, model_kwargs: dict) -> None:
        def unsupported(what: str) -> UnsupportedModelError:
            return UnsupportedModelError(
                f"{what} is not supported on a pruned model (tokprune prunes once at prefill and supports greedy "
                "decoding or sampling, with a DynamicCache or no cache); "
                "call handle.remove() to run it unpruned"
            )

        mode = config.get_generation_mode(arguments.get("assistant_model"))
        if str(mode.value) not in SUPPORTED_MODES:
            raise unsupported(f"generation mode {mode.value!r} (num_beams={config.num_beams})")
        if arguments.get("custom_generate") is not None:
            raise unsupported("custom_generate")
        if config.cache_implementation not in (None, "dynamic"):
            raise unsupported(f"cache_implementation={config.cache_implementation!r}")
        if getattr(config, "prefill_chunk_size", None) is not None:
            raise unsupported("chunked prefill (prefill_chunk_size)")
        if config.output_attentions or config.output_hidden_states:
            raise unsupported("output_attentions/output_hidden_states")
        cache = hf.cache_from_kwargs(model_kwargs)
        if cache is not None:
            self._check_cache(cache)
            if cache.get_seq_length() > 0:
                raise unsupported("continuing from a non-empty cache (past_key_values)")

    @staticmethod
    def _check_cache(cache: Any) -> None:
        if not hf.is_dynamic_cache(cache):
            raise UnsupportedModelError(
                f"{type(cache).__name__} is not supported on a pruned model: pruned layers hold fewer positions, "
                "which needs a DynamicCache (static, quantized and offloaded caches are not supported)"
            )

    # -- the replaced forward -------------------------------------------------------------------------

    def _forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        with self._active(CallState(self, self._outer_generate())) as call:
            return self._forward_call(
                call, input_ids, pixel_values, attention_mask, position_ids, inputs_embeds, mm_encoder_outputs, kwargs
            )

    def _forward_call(
        self,
        call: CallState,
        input_ids: Tensor | None,
        pixel_values: Tensor | None,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        mm_encoder_outputs: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> Any:
        # The cache arrives as cache= (transformers >= 5.24) or past_key_values= (older): take either, and
        # never let it fall through **kwargs unread (each decoding step would then run as a fresh prefill).
        past = hf.pop_cache(kwargs)
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise UnsupportedModelError(
                "output_attentions/output_hidden_states are not supported on a pruned model (the layers see "
                "different sequences); call handle.remove() to inspect the unpruned model"
            )
        if input_ids is None or inputs_embeds is not None:
            raise UnsupportedModelError(
                "a patched model needs input_ids and no inputs_embeds (tokprune finds the image and the question "
                "in the token ids)"
            )
        pre_encoded = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None and pre_encoded is not None:
            raise InputError("pass either pixel_values or mm_encoder_outputs (pre-encoded images), not both")
        return_dict = kwargs.get("return_dict", True)
        use_cache = kwargs.get("use_cache")
        use_cache = self._lm.config.use_cache if use_cache is None else use_cache
        cache = past
        if cache is not None:
            self._check_cache(cache)
        encoded = None
        if cache is not None and cache.get_seq_length() > 0:
            hidden = self._decode(input_ids, attention_mask, position_ids, cache)
        else:
            if use_cache and cache is None:
                cache = hf.new_dynamic_cache(self._lm.config)
            if self.text_encoder is not None:
                prompt_n = input_ids.shape[1] - _generated_count(call.generate, input_ids.shape[1])
                valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
                call.prompt = (input_ids[:, :prompt_n], valid[:, :prompt_n])
            encoded, features = self._vision(call, pixel_values, pre_encoded, kwargs)
            pos = self._positions(input_ids, attention_mask, position_ids, kwargs)
            hidden = self._prefill(call, input_ids, attention_mask, pos, cache if use_cache else None, features)
        out = hf.model_output(
            self._output_class, last_hidden_state=hidden, cache=cache if use_cache else past, image_features=encoded
        )
        return out if return_dict else out.to_tuple()

    # -- prefill ------------------------------------------------------------------------------------

    def _prefill(
        self,
        call: CallState,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        cache: Any,
        features: VisionOut | None,
    ) -> Tensor:
        """Run the prompt (and, without a cache, the tokens generated so far); returns ``[B, L, D]``."""
        b, n = input_ids.shape
        device = input_ids.device
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        # (the right-padding check is read with the other input checks, in one sync: _vision_assembly)
        marker = self._marker
        if marker is not None and len(marker) > 0:
            if device not in self._marker_ids:
                self._marker_ids[device] = torch.as_tensor(list(marker), dtype=torch.long, device=device)
            marker = self._marker_ids[device]
        pos = position_ids  # [B, n] or [B, n, R] (the family's positions, see _positions)
        generated = _generated_count(call.generate, n)
        prompt_n = n - generated
        roles, marker_found = token_roles(
            input_ids[:, :prompt_n], valid[:, :prompt_n], self._image_token_id, marker
        )
        roles = torch.cat([roles, torch.full((b, generated), int(TokenRole.PROTECTED), device=device)], dim=1)
        embeds = self._lm.embed_tokens(input_ids)
        seq, image_sample = self._vision_assembly(input_ids, embeds, valid, pos, roles, prompt_n, features)
        seq, shift = self._stage_positions(
            seq, self._vision_mode(), torch.zeros(b, dtype=torch.long, device=device), valid.sum(dim=1)
        )
        segments = [_Segment(0, seq.valid, shift, bool(seq.valid.all()))]
        visual_kept = ((seq.roles == TokenRole.IMAGE) & seq.valid).sum(dim=1)
        num_layers = len(self._lm.layers)
        layer_tokens = torch.zeros(b, num_layers, dtype=torch.long, device=device)
        layer_visual = torch.zeros_like(layer_tokens)
        llm_kept: dict[int, Tensor] = {}
        diagnostics: dict[str, Any] = dict(features.diagnostics) if features is not None else {}
        if self._marker is not None:
            diagnostics["roles.marker_found"] = marker_found
        seq_valid_count = valid.sum(dim=1)
        deepstack = features.deepstack if features is not None else None

        call.capture = {}
        try:
            embeddings, mask = self._segment_inputs(seq, segments[0].all_valid)
            for i, layer in enumerate(self._lm.layers):
                if i in self._llm_steps:
                    seq, step_diag, full = self._llm_step(call, self._llm_steps[i], i, seq, embeddings, generated)
                    diagnostics.update(step_diag)
                    mode = self._llm_steps[i].positions() or self.llm_positions  # a method's own choice wins
                    seq, shift = self._stage_positions(seq, mode, segments[-1].shift, seq_valid_count)
                    segments.append(_Segment(i, seq.valid, shift, full))
                    llm_kept[i] = (seq.valid & seq.prompt).sum(dim=1)
                    embeddings, mask = self._segment_inputs(seq, segments[-1].all_valid)
                layer_tokens[:, i] = (seq.valid & seq.prompt).sum(dim=1)
                layer_visual[:, i] = ((seq.roles == TokenRole.IMAGE) & seq.valid).sum(dim=1)
                seq.hidden = hf.call_decoder_layer(
                    layer, seq.hidden, mask=mask, position_ids=self._text_positions(seq.pos), position_embeddings=embeddings, cache=cache
                )
                if deepstack is not None and i < len(deepstack):
                    seq.hidden = add_feature_rows(seq.hidden, seq.feature, seq.valid, deepstack[i])
        finally:
            call.capture = None
        hidden = self._lm.norm(seq.hidden)
        if cache is not None:
            self._sessions[cache] = _Session(segments=segments, seen=n, batch=b)
        if call.generate is None or not call.generate.prefilled:
            seq_len = valid[:, :prompt_n].sum(dim=1)
            self._record(
                self._stats(seq_len, visual_kept, llm_kept, layer_tokens, layer_visual, image_sample, features, diagnostics)
            )
            if call.generate is not None:
                call.generate.prefilled = True
        return _scatter_back(hidden, seq, n)

    def _vision_assembly(
        self,
        input_ids: Tensor,
        embeds: Tensor,
        valid: Tensor,
        pos: Tensor,
        roles: Tensor,
        prompt_n: int,
        features: VisionOut | None,
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
        bad_padding, tokens, total, most, width = torch.stack(
            [right_padded.long(), flat.sum(), counts.sum(), *(torch.stack([per_sample, packed]).amax(dim=1) if b else [flat.sum()] * 2)]
        ).tolist()
        _check_left_padded(bad_padding)
        if tokens != total:
            raise InputError(
                f"Image features and image tokens do not match: tokens: {tokens}, "
                f"features: {total} ({counts.numel()} images of {counts.tolist()} tokens)"
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

    def _segment_inputs(self, seq: Seq, all_valid: bool) -> tuple[tuple[Tensor, Tensor], Any]:
        """RoPE cos/sin for the segment's positions and its causal + padding mask (prefill: no cached keys)."""
        embeddings = self._rotary(seq.hidden, seq.pos)
        mask = hf.attention_mask(seq.valid, seq.valid.shape[1], seq.hidden.dtype, self._attn_impl, all_valid)
        return embeddings, mask

    # -- LLM stage ----------------------------------------------------------------------------------

    def _llm_step(
        self,
        call: CallState,
        step: PruningStrategy,
        k: int,
        seq: Seq,
        embeddings: tuple[Tensor, Tensor],
        generated: int,
    ) -> tuple[Seq, dict[str, Any], bool]:
        """Decide with layer K-1's q/k on the prompt positions; keep generated ones; gather.

        Also returns whether the gathered rows are all full (no padding), read with the gather's width.
        """
        if call.capture is None:
            raise InternalError(f"the LLM step at layer {k} ran outside a prefill's capture window")
        attn = self._lm.layers[k - 1].self_attn
        b, n, _ = seq.hidden.shape
        q = call.capture.pop(("llm", k - 1, "q")).view(b, n, -1, attn.head_dim).transpose(1, 2)
        raw_key = call.capture.pop(("llm", k - 1, "k")).view(b, n, -1, attn.head_dim).transpose(1, 2)
        cos, sin = embeddings
        q, key = hf.apply_rope(q, raw_key, cos, sin)
        p = n - generated  # generated tokens are the last columns of every row
        hidden, valid = seq.hidden[:, :p], seq.valid[:, :p]

        def keys_from_start() -> Tensor:  # RoPE at each sample's positions minus its first (as run alone)
            start_cos, start_sin = self._rotary(hidden, _from_start(seq.pos[:, :p], valid))
            return hf.apply_rope(raw_key[:, :, :p], raw_key[:, :, :p], start_cos, start_sin)[1]

        def layer_attention() -> LLMAttention:  # layer K's own norm, q/k and RoPE on the states entering it
            own_q, own_k = hf.layer_qk(self._lm.layers[k], hidden)
            own_q, own_k = hf.apply_rope(own_q, own_k, cos[:, :p], sin[:, :p])
            return LLMAttention(own_q, own_k, valid, scale=self._lm.layers[k].self_attn.scaling)

        ctx = LLMContext(
            layer=k,
            roles=seq.roles[:, :p],
            hidden=hidden,
            attention=LLMAttention(q[:, :, :p], key[:, :, :p], valid, attn.scaling, keys_from_start),
            position_ids=self._text_positions(seq.pos)[:, :p],
            final_norm=self._lm.norm,
            layer_attention=layer_attention,
        )
        plan = step(ctx)
        keep = seq.valid.clone()
        keep[:, :p] &= plan.keep
        if plan.hidden is not None:  # merged states for the kept prompt positions, applied before the gather
            merged = torch.where(plan.keep[..., None], plan.hidden, seq.hidden[:, :p])
            seq = replace(seq, hidden=torch.cat([merged, seq.hidden[:, p:]], dim=1))
        # a schedule reports each of its layers under its own prefix (``pyramiddrop@8.keep_count``)
        prefix = step.name if len(step.llm_layers) == 1 else f"{step.name}@{k}"
        diagnostics = {f"{prefix}.{name}": value for name, value in plan.diagnostics.items()}
        keep &= seq.valid
        width, full = packed_width(keep)
        return seq.gather(keep, width), diagnostics, full

    # -- decoding with the pruned cache -------------------------------------------------------------

    def _decode(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, cache: Any
    ) -> Tensor:
        """New tokens against the pruned cache: each segment gets a mask sized to its own cache."""
        session = self._sessions.get(cache)
        if session is None:
            raise UnsupportedModelError(
                "past_key_values was not filled by this patched model's prefill; run the prompt through the "
                "patched model first (or pass an empty cache)"
            )
        b, q = input_ids.shape
        if b != session.batch:
            raise UnsupportedModelError(f"batch size changed from {session.batch} to {b} while decoding")
        device = input_ids.device
        new_valid = torch.ones(b, q, dtype=torch.bool, device=device)
        if attention_mask is not None:
            new_valid = attention_mask[:, -q:].bool()
        position_ids = self._decode_positions(position_ids, session.seen, b, q, device)
        hidden = self._lm.embed_tokens(input_ids)
        starts = {seg.start: seg for seg in session.segments}
        # Whether the new tokens are all valid: one read per step, and only while some segment's mask
        # could still be dropped (a segment with padding needs its mask anyway).
        new_all = attention_mask is None or (
            any(seg.all_valid for seg in session.segments) and bool(new_valid.all())
        )
        for i, layer in enumerate(self._lm.layers):
            if i in starts:
                seg = starts[i]
                seg.mask = torch.cat([seg.mask, new_valid], dim=1)
                seg.all_valid = seg.all_valid and new_all
                pos = position_ids - seg.shift.view(-1, *[1] * (position_ids.dim() - 1))
                embeddings = self._rotary(hidden, pos)
                mask = hf.attention_mask(seg.mask, q, hidden.dtype, self._attn_impl, seg.all_valid)
            hidden = hf.call_decoder_layer(
                layer, hidden, mask=mask, position_ids=self._text_positions(pos), position_embeddings=embeddings, cache=cache
            )
        session.seen += q
        return self._lm.norm(hidden)

    # -- stats --------------------------------------------------------------------------------------

    def _stats(
        self,
        seq_len: Tensor,
        visual_kept: Tensor,
        llm_kept: dict[int, Tensor],
        layer_tokens: Tensor,
        layer_visual: Tensor,
        image_sample: Tensor,
        features: VisionOut | None,
        diagnostics: dict[str, Any],
    ) -> PruneStats:
        """Counts and FLOPs per sample, and per image (``image_sample`` long ``[I]``: each image's sample)."""
        fm = self._flops
        b, num_layers = layer_tokens.shape
        # index_add_, not bincount: CUDA's bincount reads the largest value on the host
        images = torch.zeros(b, dtype=torch.long, device=image_sample.device).index_add_(
            0, image_sample, torch.ones_like(image_sample)
        )
        runs = images
        if features is not None and features.tower_runs is not None:
            runs = torch.zeros_like(images).index_add_(0, image_sample, features.tower_runs.to(images.dtype))
        image_tokens = features.token_counts if features is not None else image_sample.new_zeros(0)
        image_kept = features.kept_counts if features is not None else image_sample.new_zeros(0)
        visual_unpruned = torch.zeros_like(seq_len).index_add_(0, image_sample, image_tokens.to(seq_len.dtype))
        # Unpruned, the projector maps every tower pass's N patches (LLaVA-NeXT's stock packing projects
        # each tile whole, then unpads); Qwen2.5-VL (N = 0 here) counts its merger with the tower.
        full_projected = runs * self._tokens_per_image if self._tokens_per_image else visual_unpruned
        projected = full_projected
        if self.pipeline.vision is not None:
            projected = visual_kept
            if features is not None and features.projected is not None:
                mapped = features.projected.to(visual_kept)
                projected = torch.zeros_like(visual_kept).index_add_(0, image_sample, mapped)
        tower = fm.vision(runs)
        if features is not None and features.tower_flops is not None:
            tower = torch.zeros_like(tower).index_add_(0, image_sample, features.tower_flops.to(tower))
        unpruned = fm.llm(seq_len[:, None].expand(-1, num_layers)) + tower + fm.projector(full_projected)
        pruned = fm.llm(layer_tokens) + tower + fm.projector(projected)
        named = {
            "visual_kept": visual_kept,
            "seq_len": seq_len,
            "layer_tokens": layer_tokens,
            "layer_visual": layer_visual,
            "flops_pruned": pruned,
            "flops_unpruned": unpruned,
            "images": images,
            "visual_unpruned": visual_unpruned,
            "image_sample": image_sample,
            "image_tokens": image_tokens,
            "image_kept": image_kept,
        }
        named.update((("llm", k), v) for k, v in llm_kept.items())
        named.update((("diag", k), v) for k, v in diagnostics.items() if isinstance(v, Tensor))
        cpu = _to_host(named)
        image_tokens = cpu["image_tokens"]
        return PruneStats(
            # the largest image's count when images differ (LLaVA-1.5: every image's N)
            visual_total=int(image_tokens.max()) if image_tokens.numel() else self._tokens_per_image,
            visual_kept=cpu["visual_kept"],
            llm_kept={k: cpu[("llm", k)] for k in llm_kept},
            seq_len=cpu["seq_len"],
            layer_tokens=cpu["layer_tokens"],
            layer_visual=cpu["layer_visual"],
            flops_pruned=cpu["flops_pruned"],
            flops_unpruned=cpu["flops_unpruned"],
            images=cpu["images"],
            diagnostics={k: cpu[("diag", k)] if isinstance(v, Tensor) else v for k, v in diagnostics.items()},
            visual_unpruned=cpu["visual_unpruned"],
            image_sample=cpu["image_sample"],
            image_tokens=image_tokens,
            image_kept=cpu["image_kept"],
            flop_model=fm,
        )


def _to_host(tensors: dict[Any, Tensor]) -> dict[Any, Tensor]:
    """Every tensor copied to the CPU with one transfer per dtype (each copy waits for the device).

    Tensors already on the CPU are only detached; the others are flattened, joined per dtype, copied
    once and cut back into their shapes.
    """
    out: dict[Any, Tensor] = {}
    groups: dict[tuple[torch.device, torch.dtype], list[Any]] = {}
    for key, value in tensors.items():
        value = value.detach()
        if value.device.type == "cpu":
            out[key] = value
        else:
            groups.setdefault((value.device, value.dtype), []).append(key)
    for keys in groups.values():
        parts = [tensors[k].detach() for k in keys]
        flat = torch.cat([p.reshape(-1) for p in parts]).cpu()
        for key, part, piece in zip(keys, parts, flat.split([p.numel() for p in parts])):
            out[key] = piece.view(part.shape)
    return out


def _from_start(pos: Tensor, valid: Tensor) -> Tensor:
    """Position ids minus each sample's first valid one (``[B, L]`` or ``[B, L, R]``), 0 at padding."""
    big = torch.iinfo(pos.dtype).max
    mask = valid.view(*valid.shape, *[1] * (pos.dim() - 2))
    first = torch.where(mask, pos, torch.full_like(pos, big)).amin(dim=1, keepdim=True)
    return torch.where(mask, pos - first, torch.zeros_like(pos))


def _generated_count(generate: GenerateCall | None, n: int) -> int:
    """Tokens at the end of the sequence that ``generate`` (without a cache) produced, not the prompt."""
    if generate is None or generate.use_cache or n <= generate.prompt_len:
        return 0
    return n - generate.prompt_len


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
