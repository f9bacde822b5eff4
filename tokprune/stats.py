"""Per-sample pruning statistics of one prefill: kept counts per stage and layer, budgets, FLOPs.

A patched model's handle exposes the :class:`PruneStats` of its last ``forward``/``generate`` call
(the prefill; decoding steps do not overwrite it) as ``handle.stats``.

FLOP model (FastV's, restated by FEATHER, arXiv 2412.13180) for one transformer layer over ``n`` tokens
of width ``d`` with MLP width ``m``::

    C(n) = 4 n d^2 + 2 n^2 d + 2 n d m

(q/k/v/o projections, attention scores and mixing, MLP; multiply-accumulates, FastV's convention; we keep
its two-matrix MLP term for comparability although Llama's gated MLP has three matrices). The prefill cost
of one sample is the sum of ``C(n_l)`` over the LLM layers (``n_l`` = non-padding tokens layer ``l``
processed), plus the vision tower (``C`` over its ``1+N`` tokens, width and MLP width, for each encoder
layer, per image) and the projector (``n_p (c d + d^2)`` for the ``n_p`` projected tokens, ``c`` = vision
width). Unpruned: every LLM layer sees the whole prompt and the projector all ``N`` patches per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["FlopModel", "PruneStats", "layer_flops"]


def layer_flops(n: Tensor, d: int, m: int) -> Tensor:
    """FastV's per-layer cost ``4nd^2 + 2n^2d + 2ndm`` for token counts ``n`` (any shape), fp64."""
    n = n.to(torch.float64)
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


@dataclass(frozen=True)
class FlopModel:
    """Widths the FLOP count needs: LLM (``d``, ``m``), vision tower (``c``, ``mv``, layers, tokens)."""

    d: int
    m: int
    c: int
    mv: int
    vision_layers: int
    vision_tokens: int  # 1 + N (CLS and patches) for a CLIP tower

    def vision(self, images: Tensor) -> Tensor:
        """Tower cost for ``images`` (long ``[B]``, images per sample), fp64 ``[B]``."""
        per_image = self.vision_layers * layer_flops(torch.tensor(self.vision_tokens), self.c, self.mv)
        return images.to(torch.float64) * per_image

    def projector(self, projected: Tensor) -> Tensor:
        """Projector cost for ``projected`` tokens per sample (long ``[B]``), fp64 ``[B]``."""
        return projected.to(torch.float64) * (self.c * self.d + self.d * self.d)

    def llm(self, layer_tokens: Tensor) -> Tensor:
        """LLM cost from tokens per layer (long ``[B, T]``), fp64 ``[B]``."""
        return layer_flops(layer_tokens, self.d, self.m).sum(dim=-1)


@dataclass
class PruneStats:
    """What one prefill kept, per sample (every tensor's first dim is the batch ``B``).

    ``visual_kept`` counts visual tokens entering the LLM (kept patches plus extra tokens such as
    PruMerge's global one); ``llm_kept[K]`` the non-padding positions left after the LLM step at layer
    ``K``; ``layer_tokens[:, l]`` the non-padding tokens decoder layer ``l`` processed at prefill;
    ``layer_visual`` the visual ones among them.
    """

    #: Tokens per image before pruning (``N``; the largest image's when images differ, see ``image_tokens``).
    visual_total: int
    #: long ``[B]``: visual tokens entering the LLM after the vision stage (extra tokens included).
    visual_kept: Tensor
    #: layer K -> long ``[B]``: non-padding positions kept after the LLM step at layer K.
    llm_kept: dict[int, Tensor]
    #: long ``[B]``: non-padding prompt length without pruning.
    seq_len: Tensor
    #: long ``[B, num_llm_layers]``: non-padding tokens each decoder layer processed at prefill.
    layer_tokens: Tensor
    #: long ``[B, num_llm_layers]``: visual tokens among them.
    layer_visual: Tensor
    #: fp64 ``[B]``: theoretical prefill FLOPs with pruning (see the module docstring).
    flops_pruned: Tensor
    #: fp64 ``[B]``: the same without pruning.
    flops_unpruned: Tensor
    #: long ``[B]``: images per sample.
    images: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    #: ``"<strategy>.<key>"`` -> value, from the strategies' plans (knee index, fallback flags...).
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: long ``[B]``: visual tokens the sample's images bring unpruned (``images * visual_total`` when
    #: every image has ``visual_total`` tokens; the sum of its images' own counts when they differ).
    visual_unpruned: Tensor | None = None
    #: Per image (all ``[I]``, images in prompt order): its sample, its unpruned token count, and the
    #: tokens it brings into the LLM after the vision stage (extra tokens included).
    image_sample: Tensor | None = None
    image_tokens: Tensor | None = None
    image_kept: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.seq_len.shape[0])

    @property
    def tokens_layer_avg(self) -> Tensor:
        """fp32 ``[B]``: tokens per LLM layer, averaged over layers (SparseVLM-style budget)."""
        return self.layer_tokens.float().mean(dim=1)

    @property
    def visual_layer_avg(self) -> Tensor:
        """fp32 ``[B]``: visual tokens per LLM layer, averaged over layers."""
        return self.layer_visual.float().mean(dim=1)

    @property
    def flops_ratio(self) -> Tensor:
        """fp64 ``[B]``: pruned / unpruned prefill FLOPs."""
        return self.flops_pruned / self.flops_unpruned

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-able dict per sample (per-sample diagnostics included, others as lists/scalars)."""
        records = []
        for i in range(self.batch_size):
            rec: dict[str, Any] = {
                "visual_total": self.visual_total,
                "visual_kept": int(self.visual_kept[i]),
                "seq_len": int(self.seq_len[i]),
                "tokens_layer_avg": float(self.tokens_layer_avg[i]),
                "visual_layer_avg": float(self.visual_layer_avg[i]),
                "flops_pruned": float(self.flops_pruned[i]),
                "flops_unpruned": float(self.flops_unpruned[i]),
                "flops_ratio": float(self.flops_ratio[i]),
            }
            for layer, kept in sorted(self.llm_kept.items()):
                rec[f"llm_kept_{layer}"] = int(kept[i])
            for key, value in self.diagnostics.items():
                rec[key] = _jsonable(value, i, self.batch_size)
            records.append(rec)
        return records


def _jsonable(value: Any, i: int, batch: int) -> Any:
    """Sample ``i`` of a per-sample tensor; other values made JSON-friendly as they are."""
    if isinstance(value, Tensor):
        if value.dim() >= 1 and value.shape[0] == batch:
            value = value[i]
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, i, batch) for v in value]
    return repr(value)
