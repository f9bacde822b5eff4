"""The Qwen3.5 family: HF ``Qwen3_5ForConditionalGeneration``, Qwen3-VL's tower without DeepStack, and a
language model that mixes full-attention layers with linear-attention (Gated DeltaNet) layers.

What Qwen2.5-VL's adapter does holds for the vision side (:mod:`.qwen2_5_vl`: pruning after the merger,
per image, no CLS, the model's own 3-D M-RoPE positions kept by the survivors, videos through the same
tower). What differs is the language model, which the core drives through the per-layer hooks
(:meth:`~tokprune.adapters.Family.layer_attention` and ``layer_mask``):

* **linear-attention layers** (``config.text_config.layer_types[i] == "linear_attention"``) carry no
  per-token KV cache but a recurrent state (a short causal convolution's last inputs and the delta rule's
  state matrix). A token dropped before layer ``K`` is dropped before the recurrent states of layers
  ``K..`` see it: those states are computed from the survivors alone, in their order, which is what a
  pruned sequence means for a recurrence (as survivors' keys are all that later full-attention layers
  cache). Layers before ``K`` saw every token, in their states as in their KV cache. Decoding continues
  those states (cache == recompute: the recompute runs the survivors and the generated tokens through the
  same layers);
* those layers take the 2-D padding mask (transformers zeroes padded positions before the convolution and
  the recurrence, so leading padding leaves the state at zero: batch == solo), none for a one-token step;
* an LLM-stage cut before layer ``K`` reads the softmax attention of layer ``K - 1`` (FastV's scores, DART's
  keys, ...), and of layer ``K`` itself for a step reading its own layer (``pyramiddrop(scores=own)``);
  a linear-attention layer has no attention matrix to read, so the core refuses at ``patch()`` a cut whose
  scoring layer is one, naming the layers that can host it (``K - 1`` full attention: with Qwen3.5's
  three linear layers per full one, ``K = 4, 8, 12, ...``);
* the full-attention layers gate their output (``q_proj`` gives the query and a gate per head) and rotate
  only a part of each head (``partial_rotary_factor``): both read by the shared helpers (hf_compat).

The mixture-of-experts variant (``Qwen3_5MoeForConditionalGeneration``, :class:`Qwen3_5MoeAdapter`) is the
same code path with its own MLP cost (router, routed experts, shared expert).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InputError
from ..stats import FlopModel, kv_width, mlp_matrices
from ._tiny import VOCAB, TinyCase
from .family import FamilyParts
from .qwen2_5_vl import Qwen2_5_VLAdapter, _qwen_model, _qwen_text_config, _qwen_token_ids

__all__ = ["LINEAR", "Qwen3_5Adapter", "Qwen3_5Flops", "Qwen3_5MoeAdapter", "output_class", "tiny_qwen3_5"]

#: The ``layer_types`` entry (and :meth:`Qwen3_5Adapter.layer_attention` kind) of a Gated DeltaNet layer.
LINEAR = "linear_attention"
MODULE = "transformers.models.qwen3_5.modeling_qwen3_5"
MOE_MODULE = "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe"


# -- transformers contact points -----------------------------------------------------------------------


def output_class(module: str = MODULE, model_class: str = "Qwen3_5Model") -> type:
    """The output dataclass ``Qwen3_5Model.forward`` (or the MoE variant's) returns. The dense one's annotation
    names ``BaseModelOutputWithPast`` (no image field) while it returns the multimodal output its module
    imports: that one, where it has the image field (refused at ``patch()`` otherwise, by
    :func:`~tokprune.hf_compat.check_model`)."""
    import importlib

    declared = hf.declared_output(module, model_class)
    returned = getattr(importlib.import_module(module), "MultimodalBaseModelOutputWithPast", None)
    if isinstance(returned, type) and not ({"image_outputs", "image_hidden_states"} & hf.field_names(declared)):
        return returned
    return declared


def layer_types(language_model: nn.Module) -> list[str]:
    """Each decoder layer's kind (``"linear_attention"`` / ``"full_attention"``), checked against its modules:
    refused at ``patch()`` when the config and the layers disagree (another release's layout)."""
    kinds = list(getattr(language_model.config, "layer_types", None) or [])
    layers = language_model.layers
    module = {LINEAR: "linear_attn", "full_attention": "self_attn"}
    if len(kinds) != len(layers) or any(
        kind not in module or not isinstance(getattr(layer, module[kind], None), nn.Module)
        for kind, layer in zip(kinds, layers)
    ):
        raise hf.refuse(
            "Qwen3.5 decoder layers with linear_attn (layer_types 'linear_attention') or self_attn "
            "('full_attention') modules",
            f"layer_types: {kinds}",
        )
    return kinds


@dataclass(frozen=True)
class Qwen3_5Flops(FlopModel):
    """The FLOP model of Qwen3.5's language model, per layer as its kind computes it (multiply-accumulates).

    Full attention over ``n`` tokens (``a = heads * head_dim``, ``d_kv`` the key/value width; ``q_proj`` gives
    the query and its gate, so it is ``2a`` wide)::

        2 n d a + 2 n d d_kv + n a d + 2 n^2 a + k n d m

    Gated DeltaNet (``h_k`` key heads of width ``k``, ``h_v`` value heads of width ``v``, ``c = 2 h_k k + h_v v``
    convolved channels, kernel ``w``)::

        n d (c + h_v v + 2 h_v) + n h_v v d          in_proj_qkv, in_proj_z, in_proj_a/b, out_proj
        + c w (n + w - 1)                            the depthwise causal convolution (its padded output)
        + h_v u (2 C^2 k + C^2 v + 3 C k v)          the chunked delta rule's products
        + h_v u C (C - 1) / 2 (k + v)                its two unit-triangular solves per chunk
        + n M                                        the MLP

    with the delta rule run as transformers' torch path runs it (``torch_chunk_gated_delta_rule``): the
    sequence zero-padded to ``u = ceil(n / C)`` chunks of ``C = 64``; per chunk and value head ``k_beta k^T``
    and ``q k^T`` (``C^2 k`` each), the intra-chunk output ``C^2 v``, the state read twice and written once
    (``3 C k v``), and the solves (forward substitution). The flash-linear-attention kernels, where
    installed, compute the same products in another order.

    ``M``, the MLP per token: ``k d m`` (dense: gate, up, down); the mixture-of-experts variant's
    ``E d + K 3 d m_e + 3 d m_s + d`` (the router over ``E`` experts, the ``K`` routed experts, the shared
    expert and its gate), in ``mlp_per_token``.
    """

    layer_kinds: tuple[str, ...] = ()
    heads_dim: int = 0  #: a: num_attention_heads * head_dim
    key_heads: int = 0
    key_dim: int = 0
    value_heads: int = 0
    value_dim: int = 0
    conv_kernel: int = 4
    chunk: int = 64
    mlp_per_token: int | None = None  #: M where the MLP is not dense (None: ``mlp_matrices * d * m``)

    def mlp(self, n: Tensor) -> Tensor:
        """The MLP over ``n`` tokens (fp64 ``n``)."""
        return n * (self.mlp_matrices * self.d * self.m if self.mlp_per_token is None else self.mlp_per_token)

    def full_layer(self, n: Tensor) -> Tensor:
        """One full-attention layer over ``n`` tokens (any shape), fp64."""
        n = n.to(torch.float64)
        a, d = self.heads_dim, self.d
        kv = d if self.kv_dim is None else self.kv_dim
        return 2 * n * d * a + 2 * n * d * kv + n * a * d + 2 * n * n * a + self.mlp(n)

    def delta_rule(self, n: Tensor) -> Tensor:
        """The chunked gated delta rule's matrix products over ``n`` tokens, fp64 (triangular solves apart)."""
        c, k, v = self.chunk, self.key_dim, self.value_dim
        chunks = torch.ceil(n.to(torch.float64) / c)
        return self.value_heads * chunks * (2 * c * c * k + c * c * v + 3 * c * k * v)

    def triangular_solves(self, n: Tensor) -> Tensor:
        """The delta rule's two unit-triangular solves per chunk over ``n`` tokens, fp64."""
        c = self.chunk
        chunks = torch.ceil(n.to(torch.float64) / c)
        return self.value_heads * chunks * c * (c - 1) / 2 * (self.key_dim + self.value_dim)

    def linear_layer(self, n: Tensor) -> Tensor:
        """One Gated DeltaNet layer over ``n`` tokens (any shape), fp64."""
        n = n.to(torch.float64)
        d = self.d
        qk, vv = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        channels = 2 * qk + vv
        projections = n * d * (channels + vv + 2 * self.value_heads) + n * vv * d
        conv = channels * self.conv_kernel * (n + self.conv_kernel - 1)
        return projections + conv + self.delta_rule(n) + self.triangular_solves(n) + self.mlp(n)

    def llm(self, layer_tokens: Tensor) -> Tensor:
        """LLM cost from tokens per layer (long ``[B, T]``), each layer as its kind computes it, fp64 ``[B]``."""
        per_layer = [
            (self.linear_layer if kind == LINEAR else self.full_layer)(layer_tokens[..., i])
            for i, kind in enumerate(self.layer_kinds)
        ]
        return torch.stack(per_layer, dim=-1).sum(dim=-1)


class Qwen3_5Adapter(Qwen2_5_VLAdapter):
    """HF ``Qwen3_5ForConditionalGeneration``: Qwen3-VL's tower (no DeepStack), full and linear-attention layers."""

    name = "qwen3_5"
    label = "Qwen3.5"
    model_class = "Qwen3_5ForConditionalGeneration"
    min_transformers = "5.24.0"  # the release verified (the contract and tests/test_adapter_qwen3_5.py)

    #: the module and class of the inner model, whose forward's output class the core returns
    inner_model: ClassVar[tuple[str, str]] = (MODULE, "Qwen3_5Model")

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
        model, make_inputs = tiny_qwen3_5(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker, llm_layer=2)

    def parts(self) -> FamilyParts:
        #: each decoder layer's kind (``layer_types``), what :meth:`layer_attention` answers
        self.layer_kinds = tuple(layer_types(self.model.model.language_model))
        return replace(super().parts(), output_class=output_class(*self.inner_model))

    def flop_model(self, language_model: nn.Module) -> Qwen3_5Flops:
        lm, cfg, vcfg = language_model, language_model.config, self.config.vision_config
        linear = next(layer.linear_attn for layer in lm.layers if hasattr(layer, "linear_attn"))
        attn = next(layer.self_attn for layer in lm.layers if hasattr(layer, "self_attn"))
        m, per_token = self.mlp_widths(lm)
        return Qwen3_5Flops(
            d=cfg.hidden_size,
            m=m,
            c=vcfg.hidden_size,
            mv=vcfg.intermediate_size,
            vision_layers=0,  # the tower is counted per image (self.tower_flops)
            vision_tokens=0,
            mlp_matrices=3,  # gate, up, down (every expert too)
            kv_dim=kv_width(cfg),
            projector_macs=0,
            layer_kinds=self.layer_kinds,
            heads_dim=cfg.num_attention_heads * attn.head_dim,
            key_heads=linear.num_k_heads,
            key_dim=linear.head_k_dim,
            value_heads=linear.num_v_heads,
            value_dim=linear.head_v_dim,
            conv_kernel=linear.conv_kernel_size,
            mlp_per_token=per_token,
        )

    def mlp_widths(self, language_model: nn.Module) -> tuple[int, int | None]:
        """The MLP's width ``m`` (FastV's figure) and its MACs per token where it is not dense (None)."""
        if mlp_matrices(language_model.layers[0].mlp) != 3:
            raise hf.refuse(f"a gated MLP (gate, up, down) in {self.label}'s decoder layers")
        return language_model.config.intermediate_size, None

    def video_features(self, pixel_values_videos: Tensor, grid: Tensor) -> hf.BaseModelOutputWithPooling:
        # Qwen3.5's get_video_features calls self.get_image_features, our patched attribute: the class's own
        return type(self.inner).get_image_features(self.inner, pixel_values_videos, grid, return_dict=True)

    # -- per-layer attention -----------------------------------------------------------------------------

    def layer_attention(self, layer: int) -> str:
        return self.layer_kinds[layer]

    def layer_mask(
        self, kind: str, valid: Tensor, query_len: int, dtype: torch.dtype, all_valid: bool
    ) -> Tensor | None:
        """Full attention: the causal + padding mask. Linear attention: the 2-D padding mask of the queries
        (bool ``[B, Q]``), which the layer multiplies into its input; None where nothing is padding or for a
        one-token step (transformers' ``create_recurrent_attention_mask``)."""
        if kind != LINEAR:
            return super().layer_mask(kind, valid, query_len, dtype, all_valid)
        if all_valid or query_len == 1:
            return None
        # a prefill's padding leads each row (the core packs the kept tokens to the right): zeroed, it leaves
        # the states at zero; padding after the history is refused by check_later_turn
        return valid[:, -query_len:]

    def check_later_turn(self, new_valid: Tensor) -> None:
        """Refuse padding among a later turn's new tokens (after each sample's history): a linear layer zeroes a
        padded input, but its recurrent state still decays over it and its convolution window moves, so the
        sample would not get its solo result (transformers' own forward has the same limit)."""
        padded = ~new_valid.all(dim=1)
        if bool(padded.any()):
            raise InputError(
                f"padding after real tokens in this later turn's new tokens (sample {int(padded.nonzero()[0, 0])}): "
                f"{self.label}'s linear-attention layers would step their recurrent state over it (zeroed, but "
                "decaying the state and shifting the convolution window), so samples would not get their solo "
                "results; continue conversations whose later turns differ in length one per batch (or give every "
                "sample's later turn the same length)"
            )


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """HF ``Qwen3_5MoeForConditionalGeneration``: Qwen3.5 with a sparse mixture-of-experts MLP in every layer."""

    name = "qwen3_5_moe"
    label = "Qwen3.5-MoE"
    model_class = "Qwen3_5MoeForConditionalGeneration"
    inner_model = (MOE_MODULE, "Qwen3_5MoeModel")

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
        model, make_inputs = tiny_qwen3_5(seed=seed, attn_implementation=attn_implementation, experts=4)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker, llm_layer=2)

    def mlp_widths(self, language_model: nn.Module) -> tuple[int, int | None]:
        """Per token: the router, ``num_experts_per_tok`` routed experts, the shared expert and its gate
        (each token runs only its routed experts; padding positions are routed too, and not counted)."""
        cfg, block = language_model.config, language_model.layers[0].mlp
        if not all(hasattr(block, part) for part in ("gate", "experts", "shared_expert", "shared_expert_gate")):
            raise hf.refuse(f"{type(block).__name__} with gate, experts, shared_expert and shared_expert_gate")
        d, k = cfg.hidden_size, cfg.num_experts_per_tok
        routed, shared = cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        return k * routed + shared, cfg.num_experts * d + k * 3 * d * routed + 3 * d * shared + d


# -- the tiny case -----------------------------------------------------------------------------------------


#: The tiny model's layers: linear attention before the probes' cut (layer 0) and after it (layer 3), full
#: attention at 1 (their scoring layer, K - 1 = 1) and 2 (a cut reading its own layer too: pyramiddrop's).
TINY_LAYER_TYPES: tuple[str, ...] = (LINEAR, "full_attention", "full_attention", LINEAR)


def tiny_qwen3_5(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    experts: int = 0,
    **text: Any,
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny ``Qwen3_5ForConditionalGeneration``: Qwen3-VL's tower without DeepStack, a
    four-layer language model of :data:`TINY_LAYER_TYPES` (gated full attention with q/k norms and half of
    each head rotated by interleaved M-RoPE; Gated DeltaNet with 2 key and 4 value heads), and the inputs
    of :func:`~tokprune.adapters.qwen2_5_vl.tiny_qwen2_5_vl`. ``experts``: the mixture-of-experts variant
    (``Qwen3_5MoeForConditionalGeneration``) with that many experts, two routed per token and a shared one.
    ``text``: text-config overrides."""
    import transformers

    text_config = _qwen_text_config(
        head_dim=16,
        num_hidden_layers=len(TINY_LAYER_TYPES),
        layer_types=list(TINY_LAYER_TYPES),
        linear_conv_kernel_dim=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    text_config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
        "partial_rotary_factor": 0.5,
    }
    if experts:
        text_config.update(
            num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
        )
    text_config.update(text)
    kind = "Qwen3_5Moe" if experts else "Qwen3_5"
    config = getattr(transformers, f"{kind}Config")(
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
            "in_channels": 3,
            "initializer_range": 0.08,
        },
        text_config=text_config,
        **_qwen_token_ids(),
    )
    model_cls = getattr(transformers, f"{kind}ForConditionalGeneration")
    model, make_inputs = _qwen_model(model_cls, config, seed, attn_implementation, dtype)
    lm = model.model.language_model
    with torch.no_grad():
        # a trained checkpoint's padding row is not zero: padding then reaches a linear layer unless masked
        gen = torch.Generator().manual_seed(seed)
        lm.embed_tokens.weight[VOCAB.pad] = torch.randn(lm.config.hidden_size, generator=gen).to(dtype)
        # slow decays (HF draws A in 0.01..16): a state remembers the whole tiny prompt
        for layer in lm.layers:
            if hasattr(layer, "linear_attn"):
                heads = layer.linear_attn.A_log.shape[0]
                layer.linear_attn.A_log.copy_(torch.linspace(0.02, 0.2, heads).log())
    return model, make_inputs
