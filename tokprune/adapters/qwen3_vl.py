"""The Qwen3-VL family: HF ``Qwen3VLForConditionalGeneration``, Qwen2.5-VL's adapter plus DeepStack.

Everything Qwen2.5-VL's adapter does holds here (:mod:`.qwen2_5_vl`: pruning after the merger, per
image, no CLS, 3-D positions from the model's own ``get_rope_index``, kept by the survivors, the
model's own rotary embedding, which interleaves the three axes in Qwen3-VL). What differs:

* **DeepStack**: the tower also returns merged features of some intermediate vision layers, one
  ``[N_i, D]`` per image and layer ``j``; the stock LLM adds layer ``j``'s to the hidden states of the
  image tokens after decoder layer ``j``. Here each is gathered with the vision stage's keep mask (the
  rows of the kept tokens, in the order of ``VisionOut.kept``), and the shared decoder adds row ``r``
  to whichever position holds image row ``r`` at that layer (:func:`~tokprune.adapters._seq.add_feature_rows`),
  so an LLM-stage step before a DeepStack layer leaves the additions on the surviving image tokens.
  Extra tokens a strategy inserts come from no patch and get none; merged features (``plan.features``)
  keep their own token's DeepStack rows;
* the text layers normalise q and k per head before RoPE (Qwen3): LLM-stage scores read the normed
  q/k (:func:`~tokprune.hf_compat.qk_modules`, shared).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import hf_compat as hf
from .decoder import CallState, VisionOut
from .qwen2_5_vl import Qwen2_5_VLAdapter

__all__ = ["Qwen3VLAdapter"]


def _per_image_rows(per_layer: Any) -> list[Tensor]:
    """Stock ``deepstack_features`` (per layer: one ``[N_i, D]`` per image) as one padded ``[I, L, D]`` per layer."""
    return [torch.nn.utils.rnn.pad_sequence(list(images), batch_first=True) for images in per_layer]


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """HF ``Qwen3VLForConditionalGeneration``: Qwen2.5-VL's adapter with DeepStack additions."""

    name = "qwen3_vl"
    label = "Qwen3-VL"
    model_class = "Qwen3VLForConditionalGeneration"
    min_transformers = "5.24.0"  # the release verified (the contract and tests/test_adapter_qwen3_vl.py)

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> Any:
        from ..testing.adapters import TinyCase
        from ..testing.models import VOCAB, tiny_qwen3_vl

        model, make_inputs = tiny_qwen3_vl(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)

    @staticmethod
    def _family_output_class() -> type:
        return hf.qwen3_vl_output_class()

    def _check_features(self) -> None:
        super()._check_features()
        hf.check_deepstack(self._inner)

    def _unpruned(self, encoded: Any) -> VisionOut:
        out = super()._unpruned(encoded)
        out.deepstack = [torch.cat(list(images)) for images in encoded.deepstack_features]
        return out

    def _prune(self, call: CallState, encoded: Any, grid: Tensor) -> VisionOut:
        out = super()._prune(call, encoded, grid)
        # the same keep mask on the same padded [I, L] layout as the merged tokens: rows align with out.kept
        out.deepstack = [rows[out.keep] for rows in _per_image_rows(encoded.deepstack_features)]
        return out
