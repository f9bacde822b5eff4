"""Per-sample pruning statistics of one prefill: kept counts per stage and layer, budgets, FLOPs.

A patched model's handle exposes the :class:`PruneStats` of its last ``forward``/``generate`` call
(the prefill; decoding steps do not overwrite it) as ``handle.stats``.

FLOP model, per transformer layer over ``n`` tokens of width ``d`` (multiply-accumulates)::

    C(n) = 2 n d^2 + 2 n d d_kv + 2 n^2 d + k n d m

q/o projections (``2nd^2``), k/v projections to the key-value width ``d_kv`` (``d`` without grouped-query
attention), attention scores and mixing (``2n^2d``), and the MLP's ``k`` matrices of width ``m``, read from
the model: ``k = 3`` for a gated (SwiGLU) MLP such as Llama's or Qwen's (gate, up, down), ``k = 2`` for
CLIP's. FastV's formula (restated by FEATHER, arXiv 2412.13180), ``4nd^2 + 2n^2d + 2ndm``, is the special
case ``d_kv = d, k = 2``. Where the query width ``d_q`` (heads x head_dim) is not ``d`` (Gemma 3), ``d_q``
replaces one ``d`` in the q/o and attention terms: ``2 n d d_q + 2 n d d_kv + 2 n^2 d_q + k n d m``. FastV's is kept as a second, labelled figure (``flops_fastv_*``, LLM layers only, as
the papers count) so numbers compare with theirs. The prefill cost of one sample is the sum of ``C(n_l)``
over the LLM layers (``n_l`` = non-padding tokens layer ``l`` processed), plus the vision tower (``C`` over
its ``1+N`` tokens, at its widths and MLP shape, for each encoder layer, per image) and the projector
(``n_p (c d + d^2)`` for the ``n_p`` projected tokens, ``c`` = vision width: the kept ones and extra tokens,
or every token where the strategy projected them all to choose, as DivPrune and CDPruner do by default,
whose kept rows are then taken from that projection). Unpruned: every LLM layer sees the whole prompt and
the projector all ``N`` patches of every tower pass.

Qwen2.5-VL's tower (:class:`WindowedTower`) is counted per image from its patch grid, because its
attention is not one span over the image: most blocks attend within windows of ``w x w`` merged tokens
(``w = window_size / (merge * patch)``, 4 for Qwen2.5-VL: 8 x 8 patches, the last row and column of
windows cut short by the image's edge), a few (``fullatt_block_indexes``) over the whole frame. Per image
of ``t x h x w`` patches (``P = t h w``), ``k_v`` MLP matrices (3: Qwen's tower MLP is gated)::

    L_v P (4 c^2 + k_v c m_v)                         qkv and output projections, MLP, every block
    + 2 c t (F (h w)^2 + (L_v - F) s^4 S(h / s) S(w / s))   attention: F full blocks, the rest windowed
    + (P / s^2) ((s^2 c)^2 + s^2 c d)                  the patch merger (an MLP over s x s patches)

with ``s`` the merge size and ``S(x) = floor(x / w) w^2 + (x mod w)^2`` (sum of squared window sides
along one axis; a window of ``r x q`` merged tokens holds ``r q s^2`` patches). The merger runs before
the vision stage prunes, so it is part of the tower (the same pruned or not) and the projector term is 0.
Patch-embedding convolutions are not counted in either tower (under 0.3% of a block stack).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import InputError, UnsupportedModelError
from .keptmap import KeptMap

__all__ = ["FlopModel", "PruneStats", "WindowedTower", "kv_width", "layer_flops", "mlp_matrices"]


def layer_flops(
    n: Tensor, d: int, m: int, mlp_matrices: int = 2, kv_dim: int | None = None, q_dim: int | None = None
) -> Tensor:
    """Per-layer cost ``2n d d_q + 2nd d_kv + 2n^2 d_q + k n d m`` for token counts ``n`` (any shape), fp64.

    The defaults (``k = 2``, ``d_kv = d_q = d``) give FastV's ``4nd^2 + 2n^2d + 2ndm``.
    """
    n = n.to(torch.float64)
    kv = d if kv_dim is None else kv_dim
    q = d if q_dim is None else q_dim
    return 2 * n * d * q + 2 * n * d * kv + 2 * n * n * q + mlp_matrices * n * d * m


def mlp_matrices(mlp: torch.nn.Module) -> int:
    """Number of weight matrices of a transformer MLP block (its direct ``nn.Linear`` children): 3 for a
    gated MLP (gate, up, down), 2 for a plain one (fc1, fc2)."""
    count = sum(isinstance(child, torch.nn.Linear) for child in mlp.children())
    if count not in (2, 3):
        raise UnsupportedModelError(
            f"cannot read the MLP shape of {type(mlp).__name__}: {count} linear layers, expected 2 or 3"
        )
    return count


def kv_width(config: Any) -> int | None:
    """Key/value projection width ``num_key_value_heads * head_dim`` of an HF text config (grouped-query
    attention), or None when the config does not say (then ``d``)."""
    kv_heads = getattr(config, "num_key_value_heads", None)
    if kv_heads is None:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(kv_heads) * int(head_dim)


@dataclass(frozen=True)
class FlopModel:
    """Widths the FLOP count needs: LLM (``d``, ``m``, MLP matrices, key-value width), vision tower (``c``,
    ``mv``, layers, tokens). The defaults of ``mlp_matrices`` and ``kv_dim`` are FastV's formula."""

    d: int
    m: int
    c: int
    mv: int
    vision_layers: int
    vision_tokens: int  # 1 + N (CLS and patches) for a CLIP tower
    mlp_matrices: int = 2  # LLM MLP: 3 for SwiGLU (Llama, Qwen), 2 for a plain MLP
    kv_dim: int | None = None  # LLM key/value projection width (num_kv_heads * head_dim); None = d
    q_dim: int | None = None  # LLM query width (num_heads * head_dim) where it is not d (Gemma 3); None = d
    vision_mlp_matrices: int = 2  # CLIP: fc1, fc2
    #: MACs per token the projector maps after the vision stage; None: ``c d + d^2`` (LLaVA's two-layer
    #: MLP); 0 where the projection runs before pruning and is counted with the tower (Qwen's merger)
    projector_macs: int | None = None

    def vision(self, images: Tensor) -> Tensor:
        """Tower cost for ``images`` (long ``[B]``, images per sample), fp64 ``[B]``."""
        tokens = torch.tensor(self.vision_tokens)
        per_image = self.vision_layers * layer_flops(tokens, self.c, self.mv, self.vision_mlp_matrices)
        return images.to(torch.float64) * per_image

    def projector(self, projected: Tensor) -> Tensor:
        """Projector cost for ``projected`` tokens per sample (long ``[B]``), fp64 ``[B]``."""
        per_token = self.c * self.d + self.d * self.d if self.projector_macs is None else self.projector_macs
        return projected.to(torch.float64) * per_token

    def llm(self, layer_tokens: Tensor) -> Tensor:
        """LLM cost from tokens per layer (long ``[B, T]``), fp64 ``[B]``."""
        return layer_flops(layer_tokens, self.d, self.m, self.mlp_matrices, self.kv_dim, self.q_dim).sum(dim=-1)

    def llm_fastv(self, layer_tokens: Tensor) -> Tensor:
        """FastV's formula over the LLM layers only (``4nd^2 + 2n^2d + 2ndm``), fp64 ``[B]``: the figure
        papers report, for comparison."""
        return layer_flops(layer_tokens, self.d, self.m).sum(dim=-1)


def _window_squares(x: Tensor, window: int) -> Tensor:
    """Sum of squared window sides along one axis of ``x`` merged tokens (long, any shape), fp64."""
    x = x.to(torch.float64)
    return torch.div(x, window, rounding_mode="floor") * window**2 + torch.remainder(x, window) ** 2


@dataclass(frozen=True)
class WindowedTower:
    """A Qwen2.5-VL-style tower: ``depth`` blocks of width ``c`` (MLP width ``mv``, ``mlp_matrices``
    matrices), ``full_blocks`` of them with full attention and the others within windows of ``window x
    window`` merged tokens, then a patch merger of ``merge x merge`` patches to width ``out``. The module
    docstring has the formula."""

    c: int
    mv: int
    depth: int
    full_blocks: int
    window: int  # merged tokens per window side
    merge: int
    out: int
    mlp_matrices: int = 3  # Qwen2.5-VL's tower MLP: gate, up, down
    mergers: int = 1  # Qwen3-VL: the final merger plus one per DeepStack layer, all over every patch

    def __post_init__(self) -> None:
        if not 0 <= self.full_blocks <= self.depth or self.window < 1 or self.merge < 1 or self.mergers < 1:
            raise InputError(
                f"need 0 <= full_blocks <= depth, window >= 1, merge >= 1, mergers >= 1; got "
                f"full_blocks={self.full_blocks}, depth={self.depth}, window={self.window}, merge={self.merge}, "
                f"mergers={self.mergers}"
            )

    @classmethod
    def of(cls, vision_config: Any, mlp: torch.nn.Module) -> WindowedTower:
        """From an HF Qwen2.5-VL or Qwen3-VL vision config.

        Qwen2.5-VL: windows except in ``fullatt_block_indexes`` (indexes past ``depth`` do not exist).
        Qwen3-VL: no windows (no ``fullatt_block_indexes``: every block is full) and a merger per
        ``deepstack_visual_indexes`` entry besides the final one.
        """
        v = vision_config
        windowed = getattr(v, "fullatt_block_indexes", None) is not None
        return cls(
            c=v.hidden_size,
            mv=v.intermediate_size,
            depth=v.depth,
            full_blocks=sum(0 <= i < v.depth for i in v.fullatt_block_indexes) if windowed else v.depth,
            window=v.window_size // v.spatial_merge_size // v.patch_size if windowed else 1,
            merge=v.spatial_merge_size,
            out=v.out_hidden_size,
            mlp_matrices=mlp_matrices(mlp),
            mergers=1 + len(getattr(v, "deepstack_visual_indexes", None) or ()),
        )

    def flops(self, grid_thw: Tensor) -> Tensor:
        """Tower and merger cost of each image, from its patch grid (long ``[I, 3]``: t, h, w), fp64 ``[I]``."""
        t, h, w = grid_thw.to(torch.float64).unbind(-1)
        c, s = self.c, self.merge
        patches = t * h * w
        linear = self.depth * patches * (4 * c * c + self.mlp_matrices * c * self.mv)
        full = t * (h * w) ** 2
        windowed = (
            t
            * s**4
            * _window_squares(grid_thw[..., 1] // s, self.window)
            * _window_squares(grid_thw[..., 2] // s, self.window)
        )
        attention = 2 * c * (self.full_blocks * full + (self.depth - self.full_blocks) * windowed)
        merger = self.mergers * patches / s**2 * ((s * s * c) ** 2 + s * s * c * self.out)
        return linear + attention + merger


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
    #: The FLOP model behind ``flops_*`` (gives FastV's formula as a second figure); None: not reported.
    flop_model: FlopModel | None = None
    #: long ``[B]``: visual tokens the sample's images bring unpruned (``images * visual_total`` when
    #: every image has ``visual_total`` tokens; the sum of its images' own counts when they differ).
    visual_unpruned: Tensor | None = None
    #: Per image (all ``[I]``, images in prompt order): its sample, its unpruned token count, and the
    #: tokens it brings into the LLM after the vision stage (extra tokens included).
    image_sample: Tensor | None = None
    image_tokens: Tensor | None = None
    image_kept: Tensor | None = None
    #: Which patches each stage kept, as cells of each image's patch grid (:class:`tokprune.keptmap.KeptMap`);
    #: None for a prefill without images.
    kept: KeptMap | None = None
    #: long ``[I]``: frames of each item (temporal patch groups of 2 video frames on Qwen; 1 for an image),
    #: where the family has frames (Qwen2.5-VL, Qwen3-VL); None otherwise.
    image_frames: Tensor | None = None
    #: bool ``[I]``: which items are videos; None where the family takes no video.
    image_video: Tensor | None = None
    #: long ``[I, T]``: tokens of each frame the vision stage kept (0 past an item's own frames); None
    #: where the family has no frames.
    frame_kept: Tensor | None = None

    @property
    def flops_fastv_ratio(self) -> Tensor | None:
        """fp64 ``[B]``: pruned / unpruned LLM FLOPs by FastV's formula (LLM layers only), or None."""
        if self.flop_model is None:
            return None
        full = self.seq_len[:, None].expand_as(self.layer_tokens)
        return self.flop_model.llm_fastv(self.layer_tokens) / self.flop_model.llm_fastv(full)

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
            fastv = self.flops_fastv_ratio
            if fastv is not None:
                rec["flops_fastv_ratio"] = float(fastv[i])
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
