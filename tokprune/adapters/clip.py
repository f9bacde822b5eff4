"""What the LLaVA families share: a CLIP vision tower (CLS at index 0) feeding a projector, and its tiny config.

:class:`ClipTower` holds the transformers contact points of a ``LlavaModel``-shaped model (``vision_tower``,
``language_model``, ``vision_feature_layer``, ``vision_feature_select_strategy``): it runs the tower layer
by layer (the hidden states are the ``hidden`` signals; the core's hooks on the encoder layers capture
``qk``), builds the family's :class:`~tokprune.adapters.FamilyParts` and FLOP model, and refuses the
layouts a vision step cannot run on. LLaVA-1.5 (``llava.py``) and LLaVA-NeXT (``llava_next.py``) use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InputError, MissingCapabilityError
from ..keptmap import raster_cells
from ..stats import FlopModel, kv_width, mlp_matrices
from ..strategy import PruningStrategy
from ._tiny import VOCAB
from .family import FamilyParts, TowerSignals

__all__ = [
    "ClipTower",
    "call_vision_layer",
    "class_names",
    "clip_mismatch",
    "tiny_clip_llama",
    "tiny_llava_config",
    "vision_transformer",
]


def class_names(obj: object) -> set[str]:
    """The class names in ``obj``'s MRO (matching by name needs no transformers import)."""
    return {c.__name__ for c in type(obj).__mro__}


def clip_mismatch(model: nn.Module, model_class: str, language_models: Iterable[str]) -> str:
    """Why ``model`` is not a ``model_class`` with a CLIP tower and one of ``language_models`` ("" if it is)."""
    if model_class not in class_names(model):
        return f"expected a {model_class}, got {type(model).__name__}"
    inner = getattr(model, "model", None)
    tower = getattr(inner, "vision_tower", None)
    if "CLIPVisionModel" not in class_names(tower):
        return f"expected a CLIPVisionModel vision tower, got {type(tower).__name__}"
    lm = getattr(inner, "language_model", None)
    names = tuple(language_models)
    if not class_names(lm) & set(names):
        expected = f"a {names[0]}" if len(names) == 1 else f"a language model among {', '.join(names)}"
        return f"expected {expected}{' language model' if len(names) == 1 else ''}, got {type(lm).__name__}"
    return ""


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
    from ..registry import available

    return ", ".join(available(stage="llm")) or "none registered"


class ClipTower:
    """The CLIP tower and projector of a ``LlavaModel``-shaped ``model`` (refuses, at construction, a tower
    without the pieces it runs)."""

    def __init__(self, model: nn.Module) -> None:
        self.inner = model.model
        self.config = model.config
        self.tower = self.inner.vision_tower
        self.vit = vision_transformer(self.tower)
        cfg = self.tower.config
        self.side = cfg.image_size // cfg.patch_size  #: patches per side of one tower pass
        self.tokens = self.side**2  #: patch tokens of one tower pass (CLS excluded)

    def parts(self, output_class: type, *, text: bool) -> FamilyParts:
        """The family's parts; ``text``: the tower's final norm is offered to a CLIP text tower."""
        lm, cfg = self.inner.language_model, self.tower.config
        flops = FlopModel(
            d=lm.config.hidden_size,
            m=lm.config.intermediate_size,
            c=cfg.hidden_size,
            mv=cfg.intermediate_size,
            vision_layers=cfg.num_hidden_layers,
            vision_tokens=1 + self.tokens,  # per tower pass
            mlp_matrices=mlp_matrices(lm.layers[0].mlp),
            kv_dim=kv_width(lm.config),
        )
        has_cls = getattr(self.vit.embeddings, "class_embedding", None) is not None
        return FamilyParts(
            inner=self.inner,
            language_model=lm,
            image_token_id=self.config.image_token_id,
            tokens_per_image=self.tokens,
            flops=flops,
            output_class=output_class,
            tower=TowerSignals(self.vit.encoder.layers, cfg.num_attention_heads, has_cls, cfg.num_hidden_layers),
            text_norm=self.vit.post_layernorm if text else None,
        )

    def check_pipeline(self, step: PruningStrategy, family: str) -> None:
        """A vision step needs one feature layer and CLS dropped before the projector (LLaVA-1.5's layout)."""
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise MissingCapabilityError(
                f"{step.short_spec()} needs one vision feature layer, but this {family} model has "
                f"vision_feature_layer={layer!r}; tokprune supports the LLaVA-1.5 layout (a single int, e.g. -2); "
                f"LLM-stage strategies work on it: {_llm_strategies()}"
            )
        select = self.config.vision_feature_select_strategy
        if select != "default":
            raise MissingCapabilityError(
                f"{step.short_spec()} runs in vision feature space with the CLS token at index 0, but this {family} "
                f"model uses vision_feature_select_strategy={select!r} (CLS fed to the projector); only 'default' "
                f"(CLS dropped, LLaVA-1.5) is supported; LLM-stage strategies work on it: {_llm_strategies()}"
            )

    def feature_layer(self, options: Mapping[str, object], family: str) -> int:
        """The call's feature layer (its ``vision_feature_layer``, else the config's), refusing a call that
        asks for another layout than :meth:`check_pipeline` accepted."""
        layer = options.get("vision_feature_layer")
        select = options.get("vision_feature_select_strategy")
        layer = self.config.vision_feature_layer if layer is None else layer
        select = self.config.vision_feature_select_strategy if select is None else select
        if not isinstance(layer, int) or select != "default":
            raise InputError(
                f"vision-stage pruning needs one int vision_feature_layer and the 'default' select strategy; "
                f"got vision_feature_layer={layer!r}, vision_feature_select_strategy={select!r}"
            )
        if options.get("image_sizes") is not None:
            raise InputError(f"image_sizes (per-image resolutions) is not supported on a pruned {family} model")
        return layer

    def states(self, pixel_values: Tensor) -> list[Tensor]:
        """Each tower pass's hidden states, embeddings first (``depth + 1`` of ``[T, 1+N, C]``, CLS at 0)."""
        vit = self.vit
        x = vit.pre_layrnorm(vit.embeddings(pixel_values.to(vit.embeddings.patch_embedding.weight.dtype)))
        hidden = [x]
        for encoder_layer in vit.encoder.layers:
            x = call_vision_layer(encoder_layer, x)
            hidden.append(x)
        return hidden

    def project(self, features: Tensor) -> Tensor:
        """The projector per token, ``[..., C] -> [..., D]``."""
        return self.inner.multi_modal_projector(features)

    def raster_cells(self, keep: Tensor) -> Tensor | None:
        """One tower pass per image (``keep`` ``[I, N]``): its ``side x side`` raster
        (:func:`tokprune.keptmap.raster_cells`); None when the rows are not one pass each."""
        side = self.side
        return raster_cells(keep.shape[0], side, side) if keep.shape[1] == side * side else None


def tiny_clip_llama(
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
) -> tuple[object, object]:
    """``(CLIPVisionConfig, LlamaConfig)`` of the tiny LLaVA models: tiny widths, the tiny vocabulary
    (``attn_implementation`` is set on the composite config by the caller)."""
    from transformers import CLIPVisionConfig, LlamaConfig

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
    return vision, text


def tiny_llava_config(*, attn_implementation: str = "sdpa", **sizes: int | float) -> object:
    """The config of :func:`tiny_llava` (LLaVA-1.5 layout; ``sizes``: see :func:`tiny_clip_llama`)."""
    from transformers import LlavaConfig

    vision, text = tiny_clip_llama(**sizes)
    tokens = (vision.image_size // vision.patch_size) ** 2
    # LLaVA-1.5's layout is LlavaConfig's default: a gelu projector on layer -2, CLS dropped ("default")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB.image, image_seq_length=tokens)
    for cfg in (config, config.text_config, config.vision_config):
        cfg._attn_implementation = attn_implementation
    return config
