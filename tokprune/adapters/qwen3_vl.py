"""The Qwen3-VL family: HF ``Qwen3VLForConditionalGeneration``, Qwen2.5-VL's adapter plus DeepStack.

Everything Qwen2.5-VL's adapter does holds here (:mod:`.qwen2_5_vl`: pruning after the merger, per
image, no CLS, 3-D positions from the model's own ``get_rope_index``, kept by the survivors, the
model's own rotary embedding, which interleaves the three axes in Qwen3-VL). What differs:

* **DeepStack**: the tower also returns merged features of some intermediate vision layers, one
  ``[N_i, D]`` per image and layer ``j``; the stock LLM adds layer ``j``'s to the hidden states of the
  image tokens after decoder layer ``j``. Here each is gathered with the vision stage's keep mask (the
  rows of the kept tokens, in the order of ``ImageFeatures.kept``), and the shared decoder adds row ``r``
  to whichever position holds image row ``r`` at that layer (:func:`~tokprune.adapters._seq.add_feature_rows`),
  so an LLM-stage step before a DeepStack layer leaves the additions on the surviving image tokens.
  Extra tokens a strategy inserts come from no patch and get none; merged features (``plan.features``)
  keep their own token's DeepStack rows;
* the text layers normalise q and k per head before RoPE (Qwen3): LLM-stage scores read the normed
  q/k (:func:`~tokprune.hf_compat.qk_norms`, shared).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ._tiny import VOCAB, TinyCase
from .family import FamilyParts
from .qwen2_5_vl import Qwen2_5_VLAdapter, _qwen_model, _qwen_text_config, _qwen_token_ids

__all__ = ["QWEN3_DEEPSTACK", "Qwen3VLAdapter", "check_deepstack", "output_class", "tiny_qwen3_vl"]


def _per_image_rows(per_layer: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Stock ``deepstack_features`` (per layer: one ``[N_i, D]`` per image) as one padded ``[I, L, D]`` per layer."""
    return [torch.nn.utils.rnn.pad_sequence(list(images), batch_first=True) for images in per_layer]


# -- transformers contact points (feature-detected; refused at patch() with the tested range) -----------


def output_class() -> type:
    """The output dataclass of ``Qwen3VLModel.forward``."""
    return hf.declared_output("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLModel")


def check_deepstack(inner: nn.Module) -> None:
    """Refuse at ``patch()`` time when ``get_image_features`` does not declare an output with
    ``deepstack_features`` (Qwen3-VL's per-layer DeepStack features, which the adapter gathers)."""
    import sys

    fn = getattr(type(inner), "get_image_features", None)
    # annotations resolve in the module that defines the method (a subclass may live elsewhere)
    returned = hf.returned_dataclasses(fn, sys.modules[fn.__module__]) if fn is not None else []
    if not any("deepstack_features" in hf.field_names(t) for t in returned):
        raise hf.refuse(f"{type(inner).__name__}.get_image_features returning an output with deepstack_features")


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """HF ``Qwen3VLForConditionalGeneration``: Qwen2.5-VL's adapter with DeepStack additions."""

    name = "qwen3_vl"
    label = "Qwen3-VL"
    model_class = "Qwen3VLForConditionalGeneration"
    min_transformers = "5.24.0"  # the release verified (the contract and tests/test_adapter_qwen3_vl.py)

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
        model, make_inputs = tiny_qwen3_vl(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)

    def parts(self) -> FamilyParts:
        parts = super().parts()
        check_deepstack(self.inner)
        return replace(parts, output_class=output_class())

    def video_features(self, pixel_values_videos: Tensor, grid: Tensor) -> hf.BaseModelOutputWithPooling:
        # Qwen3-VL's get_video_features calls self.get_image_features, which is our patched attribute: call
        # the class's image path directly (the same tower and mergers, per frame)
        return type(self.inner).get_image_features(self.inner, pixel_values_videos, grid, return_dict=True)

    def deepstack_rows(self, encoded: hf.BaseModelOutputWithPooling, padded: bool) -> list[Tensor] | None:
        """Per DeepStack layer: ``[I, L, D]`` padded like the merged tokens (gathered with the plan's keep mask on
        the same layout, so rows align with the kept ones), or the items' rows joined, ``[S, D]`` (``padded=False``)."""
        if padded:
            return _per_image_rows(encoded.deepstack_features)
        return [torch.cat(list(images)) for images in encoded.deepstack_features]


# -- the tiny case -----------------------------------------------------------------------------------------


#: Vision layers whose outputs the tiny Qwen3-VL adds after decoder layers 0, 1, 2 (DeepStack): the
#: LLM-stage probes prune before layer 2, so one addition lands after a pruning point.
QWEN3_DEEPSTACK: tuple[int, ...] = (0, 1, 2)


def tiny_qwen3_vl(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny ``Qwen3VLForConditionalGeneration`` (full-attention ViT with learned position
    embeddings, 2x2 patch merger, DeepStack mergers after vision layers :data:`QWEN3_DEEPSTACK`, Qwen3
    text layers with q/k norms, interleaved M-RoPE) and the inputs of :func:`tiny_qwen2_5_vl`.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        vision_config={
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 4,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": list(QWEN3_DEEPSTACK),
            "in_channels": 3,
            "initializer_range": 0.08,
        },
        text_config=_qwen_text_config(head_dim=16),
        **_qwen_token_ids(),
    )
    return _qwen_model(Qwen3VLForConditionalGeneration, config, seed, attn_implementation, dtype)
