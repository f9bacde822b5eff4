"""The LLaVA-1.5 family: HF ``LlavaForConditionalGeneration`` (CLIP tower, Llama language model).

Everything shared by the families (generate() checks, assembly, the pruned decoder loop with its KV-cache
sessions, stats) is in :mod:`.decoder`. This file knows only LLaVA-1.5:

* the tower: CLIP with CLS at index 0; features from one ``vision_feature_layer`` without CLS
  (``vision_feature_select_strategy="default"``), q/k captured by hooks on the encoder layers a
  strategy reads; every image brings the same ``N = (image_size / patch_size)^2`` tokens;
* the projector runs on what the vision stage keeps (and its extra tokens) only;
* positions are 1-D and the decoder layers are Llama's (through :mod:`tokprune.hf_compat`).

What the patch changes, on this instance only: ``model.model.forward`` (the core's), ``model.generate``
(the core's checks), ``model.model.get_image_features`` (only with a vision-stage step, so that
``generate``'s pre-encoding prunes too; it keeps the original signature, which ``generate`` inspects),
and forward hooks on the q/k projections the strategies read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InputError, InternalError, MissingCapabilityError
from ..keptmap import raster_cells
from ..pipeline import Pipeline
from ..stats import FlopModel, kv_width, mlp_matrices
from ..strategy import Signal, TextCondition, VisionContext, VisionSignals
from ..text_encoder import image_questions
from ._tiny import VOCAB, TinyCase, left_padded, prompt_ids, random_model
from .decoder import CallState, PrunedDecoderAdapter, PrunedImageFeatures, VisionOut

__all__ = [
    "LlavaAdapter",
    "PrunedImageFeatures",
    "call_vision_layer",
    "output_class",
    "tiny_llava",
    "tiny_llava_config",
    "vision_transformer",
]

#: Keywords of ``LlavaModel.forward`` that concern the tower (popped from the forward's options).
_VISION_OPTIONS = ("vision_feature_layer", "vision_feature_select_strategy", "image_sizes")


def _class_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


# -- transformers contact points (feature-detected; refused at patch() with the tested range) -----------


def output_class() -> type:
    """The output dataclass of ``LlavaModel.forward``."""
    from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

    return LlavaModelOutputWithPast


def vision_transformer(tower: nn.Module) -> nn.Module:
    """The module of a CLIP-style tower that holds ``embeddings``, ``pre_layrnorm`` and ``encoder.layers``.

    ``CLIPVisionModel`` nests it as ``vision_model`` in some releases and is it in others.
    """
    for candidate in (tower, getattr(tower, "vision_model", None)):
        if candidate is not None and all(
            hasattr(candidate, name) for name in ("embeddings", "pre_layrnorm", "encoder")
        ):
            return candidate
    raise hf.refuse(f"a CLIP vision tower ({type(tower).__name__}) with embeddings, pre_layrnorm and encoder.layers")


def call_vision_layer(layer: nn.Module, hidden: Tensor) -> Tensor:
    """One encoder layer of a CLIP tower without a mask: ``[I, T, C] -> [I, T, C]``."""
    params = hf.parameters(type(layer).forward)
    extra = {"causal_attention_mask": None} if "causal_attention_mask" in params else {}
    out = layer(hidden, None, **extra)
    return out[0] if isinstance(out, tuple) else out


def _llm_strategies() -> str:
    """The registered LLM-stage strategies, for refusals of a vision step."""
    from ..registry import available

    return ", ".join(available(stage="llm")) or "none registered"


class LlavaAdapter(PrunedDecoderAdapter):
    """HF ``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama language model."""

    name = "llava"

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        if "LlavaForConditionalGeneration" not in _class_names(model):
            return f"expected a LlavaForConditionalGeneration, got {type(model).__name__}"
        inner = getattr(model, "model", None)
        tower = getattr(inner, "vision_tower", None)
        if "CLIPVisionModel" not in _class_names(tower):
            return f"expected a CLIPVisionModel vision tower, got {type(tower).__name__}"
        lm = getattr(inner, "language_model", None)
        if "LlamaModel" not in _class_names(lm):
            return f"expected a LlamaModel language model, got {type(lm).__name__}"
        return ""

    def __init__(self, model: nn.Module, pipeline: Pipeline, **options: Any) -> None:
        super().__init__(model, pipeline, **options)  # options: see tokprune.patch
        self._inner = model.model
        self._tower = self._inner.vision_tower
        self._lm = self._inner.language_model
        self._config = model.config
        self._output_class = self._family_output_class()
        self._check_features()
        self._vit = vision_transformer(self._tower)
        self._image_token_id = self._config.image_token_id
        self._init_decoder()
        self._signals = self._check_vision()
        tower_cfg = self._tower.config
        self._tokens_per_image = (tower_cfg.image_size // tower_cfg.patch_size) ** 2  # per tower pass
        self._flops = FlopModel(
            d=self._lm.config.hidden_size,
            m=self._lm.config.intermediate_size,
            c=tower_cfg.hidden_size,
            mv=tower_cfg.intermediate_size,
            vision_layers=tower_cfg.num_hidden_layers,
            vision_tokens=1 + self._tokens_per_image,  # per tower pass
            mlp_matrices=mlp_matrices(self._lm.layers[0].mlp),
            kv_dim=kv_width(self._lm.config),
        )

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> Any:

        model, make_inputs = tiny_llava(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)

    @staticmethod
    def _family_output_class() -> type:
        return output_class()

    def _check_features(self) -> None:
        """Refuse (before anything is touched) what the installed transformers lacks for this family."""
        hf.check_model(self._lm, self._output_class)
        vision_transformer(self._tower)

    def _check_vision(self) -> frozenset[Signal]:
        step = self.pipeline.vision
        if step is None:
            return frozenset()
        layer = self._config.vision_feature_layer
        if not isinstance(layer, int):
            raise MissingCapabilityError(
                f"{step.short_spec()} needs one vision feature layer, but this {self.name} model has "
                f"vision_feature_layer={layer!r}; tokprune supports the LLaVA-1.5 layout (a single int, e.g. -2); "
                f"LLM-stage strategies work on it: {_llm_strategies()}"
            )
        select = self._config.vision_feature_select_strategy
        if select != "default":
            raise MissingCapabilityError(
                f"{step.short_spec()} runs in vision feature space with the CLS token at index 0, but this {self.name} "
                f"model uses vision_feature_select_strategy={select!r} (CLS fed to the projector); only 'default' "
                f"(CLS dropped, LLaVA-1.5) is supported; LLM-stage strategies work on it: {_llm_strategies()}"
            )
        self._check_cls(getattr(self._vit.embeddings, "class_embedding", None) is not None)
        encoder = self.text_encoder
        if step.reads_instruction() and encoder is not None and encoder.decode is None:
            if hf.model_tokenizer(self.model) is None:
                raise MissingCapabilityError(
                    f"{step.short_spec()} reads the question through the text encoder, which needs it as text, and this "
                    "model has no tokenizer saved with it; give ClipTextEncoder(..., decode=your_tokenizer.decode)"
                )
        num_layers = self._tower.config.num_hidden_layers
        return frozenset(s.resolve(num_layers) for s in self.pipeline.requires())

    def _install_family(self) -> None:
        if self.pipeline.vision is None:
            return
        original = self._inner.get_image_features

        @functools.wraps(original)  # generate() reads the signature through __wrapped__
        def get_image_features(*args: Any, **kwargs: Any) -> PrunedImageFeatures:
            return self._image_features(*args, **kwargs)

        self._state.set_attribute(self._inner, "get_image_features", get_image_features)
        self._hook_encoder_signals(self._vit.encoder.layers)

    def patch_cells(self, features: VisionOut, options: dict[str, Tensor]) -> Tensor | None:
        """One tower pass per image: its ``side x side`` raster (:func:`tokprune.keptmap.raster_cells`)."""
        cfg = self._tower.config
        side = cfg.image_size // cfg.patch_size
        if features.keep.shape[1] != side * side:
            return None
        return raster_cells(features.keep.shape[0], side, side)

    # -- the vision stage -----------------------------------------------------------------------------

    def _instruction(self, call: CallState, features: Tensor) -> TextCondition | None:
        """Each image's question through the CLIP text tower given to ``patch()`` (None without one)."""
        prompt = call.prompts()
        if self.text_encoder is None or prompt is None:
            return None
        decode = self.text_encoder.decode or self._decode_question
        texts, image_text = image_questions(*prompt, self._image_token_id, self._tokens_per_image, self._marker, decode)
        return self.text_encoder.condition(features, self._vit.post_layernorm, texts, image_text)

    def _decode_question(self, ids: list[int]) -> str:
        tokenizer = hf.model_tokenizer(self.model)
        if tokenizer is None:
            raise MissingCapabilityError(
                "the text encoder needs the question as text, and this model has no tokenizer saved with it; "
                "give ClipTextEncoder(..., decode=your_tokenizer.decode)"
            )
        return tokenizer.decode(ids, skip_special_tokens=True)

    def _project(self, features: Tensor) -> Tensor:
        """The projector per token, ``[B, N, C] -> [B, N, D]`` (``VisionContext.project``)."""
        return self._inner.multi_modal_projector(features)

    def _vision(
        self, call: CallState, pixel_values: Tensor | None, encoded: Any, options: dict
    ) -> tuple[Any, VisionOut | None]:
        layer, select, image_sizes = (options.pop(name, None) for name in _VISION_OPTIONS)
        if encoded is not None:  # pre-encoded by generate() through get_image_features
            return self._pre_encoded(encoded)
        if pixel_values is None:
            return None, None
        if self.pipeline.vision is None:  # the unpatched tower and projector, as transformers runs them
            encoded = self._inner.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=layer,
                vision_feature_select_strategy=select,
                image_sizes=image_sizes,
                return_dict=True,
            )
            return encoded, VisionOut.unpruned(encoded.pooler_output)
        out = self._run_vision(call, pixel_values, layer, select, image_sizes)
        return PrunedImageFeatures.of(out), out

    def _image_features(
        self,
        pixel_values: Tensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: Tensor | None = None,
        **kwargs: Any,
    ) -> PrunedImageFeatures:
        """The patched ``get_image_features``: tower, strategy, projector on what is kept."""
        with self._active(CallState(self, self._outer_generate())) as call:
            out = self._run_vision(
                call, pixel_values, vision_feature_layer, vision_feature_select_strategy, image_sizes
            )
        return PrunedImageFeatures.of(out)

    def _run_vision(
        self, call: CallState, pixel_values: Tensor, layer: Any, select: Any, image_sizes: Any
    ) -> VisionOut:
        layer = self._config.vision_feature_layer if layer is None else layer
        select = self._config.vision_feature_select_strategy if select is None else select
        if not isinstance(layer, int) or select != "default":
            raise InputError(
                f"vision-stage pruning needs one int vision_feature_layer and the 'default' select strategy; "
                f"got vision_feature_layer={layer!r}, vision_feature_select_strategy={select!r}"
            )
        if image_sizes is not None:
            raise InputError(f"image_sizes (per-image resolutions) is not supported on a pruned {self.name} model")
        step = self.pipeline.vision
        if step is None:
            raise InternalError("the vision stage ran without a vision step")
        hidden, captured = self._run_tower(call, pixel_values)
        cfg = self._tower.config
        signals = self._vision_signals(hidden, captured)
        features = hidden[layer][:, 1:]  # CLS at index 0 is not fed to the projector
        side = cfg.image_size // cfg.patch_size
        grid = (side, side) if side * side == features.shape[1] else None
        text = self._instruction(call, features) if step.reads_instruction() else None
        plan = step(VisionContext(features=features, signals=signals, grid=grid, project=self._project, text=text))
        chosen = plan.features if plan.features is not None else features
        projector = self._inner.multi_modal_projector
        kept = projector(chosen[plan.keep])
        extra = projector(plan.extra) if plan.extra is not None and plan.extra.shape[1] > 0 else None
        diagnostics = {f"{step.name}.{k}": v for k, v in plan.diagnostics.items()}
        extra_valid = plan.extra_valid if extra is not None else None
        return VisionOut(kept=kept, keep=plan.keep, extra=extra, diagnostics=diagnostics, extra_valid=extra_valid)

    def _run_tower(self, call: CallState, pixel_values: Tensor) -> tuple[list[Tensor], dict]:
        """Each tower pass's hidden states, embeddings first (``depth + 1`` of ``[T, 1+N, C]``, CLS at 0),
        and the q/k the encoder hooks captured during these passes."""
        vit = self._vit
        x = vit.pre_layrnorm(vit.embeddings(pixel_values.to(vit.embeddings.patch_embedding.weight.dtype)))
        hidden = [x]
        call.capture = {}
        try:
            for encoder_layer in vit.encoder.layers:
                x = call_vision_layer(encoder_layer, x)
                hidden.append(x)
            return hidden, call.capture
        finally:
            call.capture = None

    def _vision_signals(
        self,
        hidden: list[Tensor],
        captured: dict,
        rows: Callable[[Tensor], Tensor] = lambda t: t,
        lengths: Tensor | None = None,
    ) -> VisionSignals:
        """The strategy's signals from :meth:`_run_tower`'s outputs, each laid out in the strategy's rows
        by ``rows`` (``[T, 1+N, C]`` per pass -> ``[R, 1+L, C]``; LLaVA-1.5: a pass is a row)."""

        def fetch(signal: Signal) -> Any:
            if signal.kind == "qk":
                return rows(captured[("vision", signal.layer, "q")]), rows(captured[("vision", signal.layer, "k")])
            return rows(hidden[signal.layer])

        cfg = self._tower.config
        return VisionSignals(
            fetch, cfg.num_hidden_layers, cfg.num_attention_heads, declared=self._signals, lengths=lengths
        )


# -- the tiny case (the adapter contract's model: built from a config, random weights, no download) -------


def tiny_llava_config(
    *,
    attn_implementation: str = "sdpa",
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 8,
    vision_heads: int = 2,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    init_scale: float = 0.08,
) -> Any:
    """The config of :func:`tiny_llava` (LLaVA-1.5 layout, tiny widths)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
        initializer_range=init_scale,
    )
    text = LlamaConfig(
        vocab_size=VOCAB.size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=VOCAB.pad,
        bos_token_id=VOCAB.bos,
        eos_token_id=VOCAB.eos,
        tie_word_embeddings=False,
        initializer_range=init_scale,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCAB.image,
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def tiny_llava(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    **sizes: int | float,
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny LLaVA in eval mode, and ``make_inputs`` for it.

    ``make_inputs(question_lengths=(5, 3), seeds=None, images=1)`` returns ``input_ids``,
    ``attention_mask`` (left padding) and ``pixel_values`` for one sample per question length, each with
    ``images`` images (0: text only; several: separated by one word, :func:`~tokprune.adapters._tiny.prompt_ids`); sample
    ``i`` is drawn from ``seeds[i]`` (default ``i``), so ``make_inputs([q], seeds=[s])`` built alone
    equals the row of a batch that has ``q`` and ``s`` at that index.
    """
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(attn_implementation=attn_implementation, **sizes)
    model = random_model(LlavaForConditionalGeneration, config, seed, attn_implementation, dtype)
    num_patches = config.image_seq_length
    image_size = config.vision_config.image_size

    def make_inputs(
        question_lengths: Sequence[int] = (5, 3), seeds: Sequence[int] | None = None, images: int = 1
    ) -> dict[str, Tensor]:
        seeds = list(range(len(question_lengths))) if seeds is None else list(seeds)
        rows, pixels = [], []
        for q, s in zip(question_lengths, seeds):
            gen = torch.Generator().manual_seed(s * 1009 + q)
            words = torch.randint(VOCAB.first_word, VOCAB.size, (q,), generator=gen).tolist()
            rows.append(prompt_ids([num_patches] * int(images), words))
            pixels += [torch.randn(3, image_size, image_size, generator=gen) for _ in range(int(images))]
        out = left_padded(rows)
        if images:
            out["pixel_values"] = torch.stack(pixels).to(dtype)
        return out

    return model, make_inputs
