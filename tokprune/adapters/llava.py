"""The LLaVA-1.5 family: HF ``LlavaForConditionalGeneration`` (CLIP tower, Llama language model).

The tower is CLIP with CLS at index 0 (:class:`~tokprune.adapters.clip.ClipTower`): features from one
``vision_feature_layer`` without CLS, every image ``N = (image_size / patch_size)^2`` tokens on one raster;
the projector runs on what the vision stage keeps (and its extra tokens) only; positions are 1-D.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._tiny import VOCAB, TinyCase, fixed_size_inputs, random_model
from .clip import ClipTower, call_vision_layer, clip_mismatch, tiny_llava_config, vision_transformer
from .family import EncodedImages, Family, FamilyParts, ForwardOptions
from .features import ImageFeatures

__all__ = ["LlavaAdapter", "call_vision_layer", "output_class", "tiny_llava", "tiny_llava_config", "vision_transformer"]


def output_class() -> type:
    """The output dataclass of ``LlavaModel.forward``."""
    from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

    return LlavaModelOutputWithPast


class LlavaAdapter(Family):
    """HF ``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama language model."""

    name = "llava"

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        return clip_mismatch(model, "LlavaForConditionalGeneration", ("LlamaModel",))

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
        model, make_inputs = tiny_llava(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)

    def parts(self) -> FamilyParts:
        self.clip = ClipTower(self.model)
        return self.clip.parts(output_class(), text=True)

    def check_pipeline(self) -> None:
        self.clip.check_pipeline(self.pipeline.vision, self.name)

    def encode_images(self, pixel_values: Tensor, options: ForwardOptions) -> EncodedImages:
        layer = self.clip.feature_layer(options, self.name)
        states = self.clip.states(pixel_values)
        features = states[layer][:, 1:]  # CLS at index 0 is not fed to the projector
        side = self.clip.side
        return EncodedImages(features, grid=(side, side) if side * side == features.shape[1] else None, states=states)

    def project(self, features: Tensor) -> Tensor:
        return self.clip.project(features)

    def patch_cells(self, features: ImageFeatures, options: ForwardOptions) -> Tensor | None:
        return self.clip.raster_cells(features.keep)


def tiny_llava(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, **sizes: int | float
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny LLaVA in eval mode, and its ``make_inputs`` (:func:`~._tiny.fixed_size_inputs`)."""
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(attn_implementation=attn_implementation, **sizes)
    model = random_model(LlavaForConditionalGeneration, config, seed, attn_implementation, dtype)
    size = config.vision_config.image_size
    return model, fixed_size_inputs(config.image_seq_length, (3, size, size), dtype)
