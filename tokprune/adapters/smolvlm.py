"""The SmolVLM family: HF ``SmolVLMForConditionalGeneration`` and ``Idefics3ForConditionalGeneration`` (one
code path): a SigLIP tower without CLS, a pixel-shuffle connector, a Llama language model.

The family written in docs/adapters.md ("Adding a family"), step by step:

* ``pixel_values`` is ``[B, images, 3, H, W]``, all-zero images being padding (the model drops them); each
  real image is one tower pass and brings ``N = (image_size / patch_size)^2 / scale_factor^2`` placeholders;
* the vision stage sees each image's tokens after the pixel shuffle (``[I, N, C * scale_factor^2]``, one
  raster of ``side / scale_factor`` per side) and the projector (``modality_projection``) runs on the kept ones;
* the model's own ``get_image_features`` returns **one entry per sample** (its images joined):
  :meth:`SmolVLMAdapter.stock_features` cuts it back into images of ``N`` tokens, so images are never merged;
* the tower has no CLS token: strategies reading CLS signals are refused at ``patch()``, naming those that work;
* image splitting (``do_image_splitting=True`` in the processor saved with the model) makes one image
  several tower passes; tokprune would count budgets per sub-image, so it is refused at ``patch()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InternalError, MissingCapabilityError
from ..keptmap import raster_cells
from ..stats import FlopModel, kv_width, mlp_matrices
from ._tiny import VOCAB, TinyCase, fixed_size_inputs, random_model
from .clip import class_names
from .family import EncodedImages, Family, FamilyParts, ForwardOptions, TowerSignals
from .features import ImageFeatures

__all__ = ["MODEL_CLASSES", "SmolVLMAdapter", "image_splitting", "output_class", "tiny_smolvlm"]

#: The HF classes of this family (Idefics3 is SmolVLM's parent, with the same modules and image features).
MODEL_CLASSES = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")


# -- transformers contact points -------------------------------------------------------------------------


def output_class(model: nn.Module) -> type:
    """The output dataclass of the model's inner ``forward`` (``SmolVLMModel`` or ``Idefics3Model``)."""
    if "SmolVLMForConditionalGeneration" in class_names(model):
        return hf.declared_output("transformers.models.smolvlm.modeling_smolvlm", "SmolVLMModel")
    return hf.declared_output("transformers.models.idefics3.modeling_idefics3", "Idefics3Model")


def image_splitting(model: nn.Module) -> bool:
    """Whether the image processor saved with ``model`` splits images into sub-images (False without one)."""
    processor = hf.model_image_processor(model)
    return bool(getattr(processor, "do_image_splitting", False))


class SmolVLMAdapter(Family):
    """HF ``SmolVLMForConditionalGeneration`` / ``Idefics3ForConditionalGeneration``: SigLIP, pixel shuffle, Llama."""

    name = "smolvlm"

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        if not class_names(model) & set(MODEL_CLASSES):
            return f"expected one of {', '.join(MODEL_CLASSES)}, got {type(model).__name__}"
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, name) for name in ("vision_model", "connector", "text_model")):
            return f"expected vision_model, connector and text_model in {type(inner).__name__}"
        return ""

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
        model, make_inputs = tiny_smolvlm(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)

    def parts(self) -> FamilyParts:
        self.inner = self.model.model
        self.scale = int(self.inner.connector.scale_factor)
        vision, lm = self.model.config.vision_config, self.inner.text_model
        patches = (vision.image_size // vision.patch_size) ** 2
        self.tokens = patches // self.scale**2  # placeholders of one image (one tower pass)
        flops = FlopModel(
            d=lm.config.hidden_size,
            m=lm.config.intermediate_size,
            c=vision.hidden_size,
            mv=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            vision_tokens=patches,  # no CLS
            mlp_matrices=mlp_matrices(lm.layers[0].mlp),
            kv_dim=kv_width(lm.config),
            projector_macs=vision.hidden_size * self.scale**2 * lm.config.hidden_size,  # one linear map
        )
        return FamilyParts(
            inner=self.inner,
            language_model=lm,
            image_token_id=self.model.config.image_token_id,
            tokens_per_image=self.tokens,
            flops=flops,
            output_class=output_class(self.model),
            tower=TowerSignals(heads=vision.num_attention_heads, cls=False, depth=vision.num_hidden_layers),
        )

    def check_pipeline(self) -> None:
        if image_splitting(self.model):
            raise MissingCapabilityError(
                f"{self.pipeline.vision.short_spec()} budgets each image, but the processor saved with this "
                f"{self.name} model splits images into sub-images (do_image_splitting=True), each its own tower "
                "pass; load the processor with do_image_splitting=False (one pass per image), or prune in the LLM "
                "stage only"
            )

    def encode_images(self, pixel_values: Tensor, options: ForwardOptions) -> EncodedImages:
        """The tower on each real image (padding images dropped, as the model does), then the pixel shuffle."""
        b, n = pixel_values.shape[:2]
        flat = pixel_values.to(self.inner.dtype).view(b * n, *pixel_values.shape[2:])
        real = (flat != 0).flatten(1).any(dim=1)
        mask = options.get("pixel_attention_mask")
        if isinstance(mask, Tensor):
            mask = mask.view(b * n, *mask.shape[2:])[real]
        else:
            mask = torch.ones(int(real.sum()), *flat.shape[2:], dtype=torch.bool, device=flat.device)
        size = self.model.config.vision_config.patch_size
        patches = mask.unfold(1, size, size).unfold(2, size, size).sum(dim=(-1, -2)) > 0
        hidden = self.inner.vision_model(pixel_values=flat[real], patch_attention_mask=patches).last_hidden_state
        features = self.inner.connector.pixel_shuffle(hidden, self.scale)  # [I, N, C * scale^2]
        side = int(round(self.tokens**0.5))
        return EncodedImages(features, grid=(side, side) if side * side == self.tokens else None)

    def project(self, features: Tensor) -> Tensor:
        return self.inner.connector.modality_projection(features)

    def stock_features(self, encoded: hf.BaseModelOutputWithPooling, options: ForwardOptions) -> ImageFeatures:
        """``pooler_output`` holds one ``[images_b * N, D]`` per sample: cut into one ``[N, D]`` per image."""
        joined = torch.cat(list(encoded.pooler_output))
        if joined.shape[0] % self.tokens:
            raise InternalError(f"{joined.shape[0]} image features are not whole images of {self.tokens} tokens")
        return ImageFeatures.unpruned(joined.split(self.tokens))

    def patch_cells(self, features: ImageFeatures, options: ForwardOptions) -> Tensor | None:
        side = int(round(self.tokens**0.5))
        return raster_cells(features.keep.shape[0], side, side) if side * side == features.keep.shape[1] else None


def tiny_smolvlm(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, idefics3: bool = False
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny ``SmolVLMForConditionalGeneration`` (``Idefics3ForConditionalGeneration`` with
    ``idefics3``): SigLIP 32 px / 4 px patches, pixel shuffle by 2 (16 tokens per image), Llama; and
    ``make_inputs`` (:func:`~._tiny.fixed_size_inputs`, ``pixel_values`` ``[B, images, 3, 32, 32]``)."""
    import transformers

    prefix = "Idefics3" if idefics3 else "SmolVLM"
    config_cls, model_cls = (getattr(transformers, prefix + suffix) for suffix in ("Config", "ForConditionalGeneration"))

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 4, "initializer_range": 0.08}  # fmt: skip
    text = {"model_type": "llama", "vocab_size": VOCAB.size, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "pad_token_id": VOCAB.pad, "bos_token_id": VOCAB.bos,
            "eos_token_id": VOCAB.eos, "initializer_range": 0.08}  # fmt: skip
    config = config_cls(vision_config=vision, text_config=text, image_token_id=VOCAB.image, scale_factor=2)
    model = random_model(model_cls, config, seed, attn_implementation, dtype)
    # HF initialises the tower's final LayerNorm to the identity, so every shuffled token would have the same
    # norm (a tie a norm-ranking strategy breaks by rounding): draw its affine part, as a trained model has one.
    norm, gen = model.model.vision_model.post_layernorm, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * torch.randn(norm.weight.shape, generator=gen))
        norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=gen))
    return model, fixed_size_inputs(model.model.image_seq_len, (3, 32, 32), dtype, per_sample=True)
