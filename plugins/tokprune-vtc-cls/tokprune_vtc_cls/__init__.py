"""VTC-CLS for tokprune: keep the patches the CLS token attends to most, summed over encoder layers.

Wang, Sun, Chen, Lin, Han, Ding, "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"
(arXiv 2412.05819). Reference code: ``THU-MIG/VTC-CLS`` @ ``e41ac9b4``,
``llava/model/multimodal_encoder/clip_encoder.py::cls_token_only`` and ``llava/model/llava_arch.py::encode_images``.

A third-party plugin: it uses only tokprune's public API and arrives through the ``tokprune``
entry-point group (``pip install ./plugins/tokprune-vtc-cls``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from tokprune import PruningStrategy, Signal, Stage, VisionContext, VisionPlan, VisionSignals, hookimpl, param, scoring

__all__ = ["VtcCls", "register_strategies", "summed_cls_attention"]
__version__ = "0.1.0"

#: The last layer of the sum: LLaVA-1.5's feature layer (the reference sums ``attentions[start:-1]``).
LAST_LAYER = -2


def summed_cls_attention(signals: VisionSignals, layers: range) -> Tensor:
    """Head-mean CLS attention over the patches, summed over encoder ``layers``: fp32 ``[B, N]``.

    Each layer's row is ``softmax(q_cls · kᵀ / sqrt(D))`` per head over all ``1+N`` keys (CLS column in
    the denominator, dropped from the output), averaged over heads, as the reference reads
    ``attentions[l].mean(dim=heads)[0, 1:]``.
    """
    total = signals.cls_attention(layers[0], heads="mean")
    for layer in layers[1:]:  # a handful of layers; each term is already batched over B and N
        total = total + signals.cls_attention(layer, heads="mean")
    return total


class VtcCls(PruningStrategy):
    """VTC-CLS: keep the ``keep`` patches with the highest CLS attention summed over encoder layers.

    Steps (reference ``cls_token_only`` and ``encode_images``):

    1. For every encoder layer from ``start_layer`` to -2 (the reference's ``attentions[start_layer:-1]``:
       layers 16..22 of CLIP-L's 24 by default), take the CLS row of the head-mean attention over the
       patch columns, ``[B, N]``.
    2. Sum over those layers ("can be modified to operate min or max", says the reference; we sum).
    3. Keep the top ``keep`` patches of the projector's input features, in raster order; drop the rest
       (no merge, no extra token).

    Deviations from the reference:

    * Batched: every sample gets its own top-k (the reference ``squeeze(0)``-s a batch of one).
    * Attention is computed from the encoder's q/k projections (no ``output_attentions``, so it runs
      under sdpa); the values equal the eager attention weights' CLS row.
    * ``start_layer`` counts from the end of the encoder (-8 is layer 16 of 24, the reference's
      ``--layer 16``), so one value means the same depth on any tower and the layers to capture are
      known before the model is seen. Non-negative indices are rejected.
    * Ties in the summed score go to the lower patch index (the reference's ``topk`` leaves them
      unspecified). ``keep`` larger than the number of patches keeps them all, recorded in the
      diagnostics as ``keep_clamped``.
    * Images of different sizes (``ctx.lengths``, e.g. LLaVA-NeXT): ``keep`` counts each image's own
      tokens (capped at them); padding is never kept and each image keeps what it keeps alone.
    """

    name = "vtc_cls"
    stage = Stage.VISION
    ragged_vision = True

    @dataclass(frozen=True)
    class Params:
        keep: int = param(36, "patches kept per sample (the reference's --token_num, default 36)", ge=1)
        start_layer: int = param(
            -8,
            "first encoder layer of the sum, counted from the end (-8 = layer 16 of CLIP-L's 24, the "
            "reference's --layer 16); the sum runs to layer -2",
            le=LAST_LAYER,
        )

    def layers(self) -> range:
        """Encoder layers (negative indices) whose CLS attention is summed: ``start_layer .. -2``."""
        return range(self.params.start_layer, LAST_LAYER + 1)

    def requires(self) -> frozenset[Signal]:
        return frozenset(Signal("qk", layer) for layer in self.layers())

    def plan(self, ctx: VisionContext) -> VisionPlan:
        scores = summed_cls_attention(ctx.signals, self.layers())  # [B, N]
        b = scores.shape[0]
        if ctx.lengths is None:
            keep = scoring.topk_mask(scores, self.params.keep)  # raster order is implicit in a mask
            clamped = keep.new_full((b,), self.params.keep > ctx.num_patches)
        else:  # images of different sizes: the top ``keep`` of each image's own tokens
            n = ctx.token_counts
            keep = scoring.keep_top(scores, scoring.fixed_counts(n, self.params.keep, 1.0), ctx.token_valid)
            clamped = self.params.keep > n
        return VisionPlan(keep=keep, diagnostics={"scores": scores, "kept": keep.sum(dim=1), "keep_clamped": clamped})


@hookimpl
def register_strategies(register: Callable[..., None]) -> None:
    register(VtcCls)
