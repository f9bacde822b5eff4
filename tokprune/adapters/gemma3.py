"""The Gemma 3 family: HF ``Gemma3ForConditionalGeneration``: a SigLIP tower without CLS, a projector that
average-pools the patches (``mm_tokens_per_image`` per image, 256 in the released checkpoints) then maps each
token (RMSNorm + linear), and a Gemma 3 language model whose layers differ:

* ``layer_types`` alternates ``sliding_attention`` layers (a key at most ``sliding_window - 1`` positions
  back) and ``full_attention`` ones, each kind with its own RoPE base (:meth:`Gemma3Adapter.layer_rotary`);
* the tokens of one image attend to each other both ways (HF: ``AND(window, OR(causal, same image))`` on a
  sliding layer, ``OR(causal, same image)`` on a full one), the images read from the caller's
  ``token_type_ids`` as transformers reads them (without them the model, and tokprune, is causal only);
  an image's kept tokens stay one block after any cut (:meth:`Gemma3Adapter.attention_groups`);
* windows are measured in position ids, so survivors keeping their positions (the default) keep the model's
  window over the original sequence; under ``compact`` positions the window is over the renumbered one.

The vision stage chooses among the pooled tokens (``[I, N, C]``, one raster per image) before the projector's
per-token norm and linear map (:meth:`Gemma3Adapter.project`). Refused at ``patch()``: CLS-reading vision
steps (no CLS), a vision step on a processor with ``do_pan_and_scan=True`` (its crops are extra tower passes a
budget would count as images), and configurations this file does not handle (``use_bidirectional_attention``,
attention logit soft-capping under an LLM-stage step: :meth:`Gemma3Adapter.llm_cut_refusal`). An LLM-stage cut may
sit before any layer: its scores read the scoring layer's own mask (its window, its image blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import hf_compat as hf
from ..errors import InputError, MissingCapabilityError, UnsupportedModelError
from ..keptmap import raster_cells
from ..stats import FlopModel, kv_width, mlp_matrices
from ._tiny import VOCAB, TinyCase, left_padded, prompt_ids, random_model
from .clip import class_names
from .family import EncodedImages, Family, FamilyParts, ForwardOptions, LayerKeys, TowerSignals
from .features import ImageFeatures

__all__ = ["Gemma3Adapter", "image_blocks", "layer_mask", "pan_and_scan", "tiny_gemma3"]

SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer_types


# -- transformers contact points: the model's modules are read in Gemma3Adapter.parts / encode_images / project


def pan_and_scan(model: nn.Module) -> bool:
    """Whether the image processor saved with ``model`` crops images (``do_pan_and_scan``; False without one)."""
    return bool(getattr(hf.model_image_processor(model), "do_pan_and_scan", False))


def image_blocks(token_type_ids: Tensor) -> Tensor:
    """Each position's image block as transformers numbers them: one per run of ``token_type_ids == 1``, -1
    elsewhere; long ``[B, n]`` from ``[B, n]``."""
    image = token_type_ids == 1
    starts = image & ~F.pad(image, (1, 0))[:, :-1]
    return torch.where(image, starts.long().cumsum(dim=1) - 1, -1)


def layer_mask(keys: LayerKeys, window: int | None, dtype: torch.dtype, implementation: str) -> Tensor | None:
    """A Gemma 3 layer's mask ``[B, 1, Q, C]``: key ``j`` is seen by query ``i`` (the last ``Q`` keys) when it is
    not padding and (at or before it, or in the same image block), and on a sliding layer when it lies less
    than ``window`` positions before it (later keys of the block included). Boolean (sdpa) or additive (eager);
    None where only causality applies (sdpa's own kernel)."""
    if window is None and keys.groups is None:
        return hf.attention_mask(keys.valid, keys.query_len, dtype, implementation, keys.all_valid)
    c, q = keys.valid.shape[1], keys.query_len
    index = torch.arange(c, device=keys.valid.device)
    allowed = (index[None, :] <= index[c - q :, None])[None]  # [1, Q, C]: causal in cache order
    if keys.groups is not None:
        query_group = keys.groups[:, c - q :, None]
        allowed = allowed | ((query_group == keys.groups[:, None, :]) & (query_group >= 0))
    if window is not None:
        allowed = allowed & (keys.positions[:, None, :] > keys.positions[:, c - q :, None] - window)
    allowed = (allowed & keys.valid[:, None, :])[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min)


class Gemma3Adapter(Family):
    """HF ``Gemma3ForConditionalGeneration``: SigLIP, pooled projector, sliding and full layers, image blocks."""

    name = "gemma3"
    min_transformers = "5.24.0"

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        if "Gemma3ForConditionalGeneration" not in class_names(model):
            return f"expected Gemma3ForConditionalGeneration, got {type(model).__name__}"
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, name) for name in ("vision_tower", "multi_modal_projector", "language_model")):
            return f"expected vision_tower, multi_modal_projector and language_model in {type(inner).__name__}"
        return ""

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
        model, make_inputs = tiny_gemma3(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)

    def parts(self) -> FamilyParts:
        self.inner = self.model.model
        lm, vision = self.inner.language_model, self.model.config.vision_config
        text = lm.config
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                f"this {self.name} language model attends bidirectionally everywhere (use_bidirectional_attention="
                "True, an encoder such as EmbeddingGemma); tokprune prunes the causal Gemma 3 (use_bidirectional_"
                "attention=False)"
            )
        self.kinds = list(text.layer_types)
        self.window = text.sliding_window  # None: the sliding layers see every earlier key
        self.attention = hf.attention_implementation(text)  # sdpa (boolean masks) or eager (additive)
        self.softcap = text.attn_logit_softcapping
        projector = self.inner.multi_modal_projector
        self.side = int(projector.tokens_per_side)
        patches = int(projector.patches_per_image) ** 2
        flops = FlopModel(
            d=text.hidden_size,
            m=text.intermediate_size,
            c=vision.hidden_size,
            mv=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            vision_tokens=patches,  # no CLS
            mlp_matrices=mlp_matrices(lm.layers[0].mlp),
            kv_dim=kv_width(text),
            q_dim=text.num_attention_heads * text.head_dim,  # 2048 for a 2560-wide 4B: not the width
            projector_macs=vision.hidden_size * text.hidden_size,  # the linear map per kept token
        )
        return FamilyParts(
            inner=self.inner,
            language_model=lm,
            image_token_id=self.model.config.image_token_id,
            tokens_per_image=self.side * self.side,
            flops=flops,
            output_class=hf.declared_output("transformers.models.gemma3.modeling_gemma3", "Gemma3Model"),
            tower=TowerSignals(heads=vision.num_attention_heads, cls=False, depth=vision.num_hidden_layers),
        )

    def check_pipeline(self) -> None:
        if pan_and_scan(self.model):
            raise MissingCapabilityError(
                f"{self.pipeline.vision.short_spec()} budgets each image, but the processor saved with this "
                f"{self.name} model crops images (do_pan_and_scan=True): each crop is its own tower pass and "
                "image block, so a budget would count crops as images; load the processor with "
                "do_pan_and_scan=False (one pass per image), or prune in the LLM stage only"
            )

    # -- the vision stage ----------------------------------------------------------------------------------

    def encode_images(self, pixel_values: Tensor, options: ForwardOptions) -> EncodedImages:
        """The tower on each image, then the projector's average pool: ``[I, side^2, C]``, one raster each."""
        projector = self.inner.multi_modal_projector
        hidden = self.inner.vision_tower(pixel_values=pixel_values.to(self.inner.dtype)).last_hidden_state
        i, _, c = hidden.shape
        grid = hidden.transpose(1, 2).reshape(i, c, projector.patches_per_image, projector.patches_per_image)
        pooled = projector.avg_pool(grid.contiguous()).flatten(2).transpose(1, 2)
        return EncodedImages(pooled, grid=(self.side, self.side))

    def project(self, features: Tensor) -> Tensor:
        projector = self.inner.multi_modal_projector
        return torch.matmul(projector.mm_soft_emb_norm(features), projector.mm_input_projection_weight).type_as(
            features
        )

    def repeat_item_inputs(self, inputs: ForwardOptions, copies: int) -> dict[str, Tensor]:
        """``pixel_values`` has a row per image: each prompt's images ``copies`` times in a row."""
        pixels, ids = inputs.get("pixel_values"), inputs.get("input_ids")
        if not isinstance(pixels, Tensor) or not isinstance(ids, Tensor):
            return {}
        counts = (ids == self.model.config.image_token_id).sum(dim=1) // (self.side * self.side)  # images per prompt
        starts = (counts.cumsum(0) - counts).repeat_interleave(copies)
        counts = counts.repeat_interleave(copies)
        first = (counts.cumsum(0) - counts).repeat_interleave(counts)
        rows = starts.repeat_interleave(counts) + torch.arange(int(counts.sum()), device=counts.device) - first
        return {"pixel_values": pixels[rows.to(pixels.device)]}

    def patch_cells(self, features: ImageFeatures, options: ForwardOptions) -> Tensor | None:
        return raster_cells(features.keep.shape[0], self.side, self.side)

    # -- per-layer attention ---------------------------------------------------------------------------------

    def layer_attention(self, layer: int) -> str:
        return self.kinds[layer]

    def layer_rotary(self, kind: str, hidden: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return self.model_parts.language_model.rotary_emb(hidden, pos, kind)

    def layer_mask_from(self, kind: str, keys: LayerKeys, dtype: torch.dtype) -> Tensor | None:
        return layer_mask(keys, self.window if kind == SLIDING else None, dtype, self.attention)

    def attention_groups(self, input_ids: Tensor, options: Mapping[str, object]) -> Tensor | None:
        """The image blocks of the caller's ``token_type_ids`` (generated tokens past them are text)."""
        types = options.get("token_type_ids")
        if not isinstance(types, Tensor):
            return None
        if types.shape[0] != input_ids.shape[0] or types.shape[1] > input_ids.shape[1]:
            raise InputError(
                f"token_type_ids {tuple(types.shape)} do not match input_ids {tuple(input_ids.shape)} (one per token)"
            )
        return image_blocks(F.pad(types.to(input_ids.device), (0, input_ids.shape[1] - types.shape[1])))

    def llm_cut_refusal(self, layer: int) -> str:
        if self.softcap is not None:
            return f"its attention soft-caps its logits (attn_logit_softcapping={self.softcap}), which no score applies"
        return ""  # the scores see what the layer's own mask lets it see (window, image blocks): every layer hosts


def tiny_gemma3(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny ``Gemma3ForConditionalGeneration``: SigLIP 32 px / 4 px patches pooled to 16 tokens
    per image, a 6-layer Gemma 3 alternating sliding (window 8) and full layers, queries wider than the hidden size
    (4 heads of 24 for 64, as the 4B's 8 x 256 for 2560); and ``make_inputs`` (``make_inputs(question_lengths,
    seeds=None, images=None)``: ``images`` per sample, None: 1 or 2 drawn from the sample's seed and length;
    ``pixel_values`` ``[images, 3, 32, 32]``; ``token_type_ids`` as the processor returns them)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 4, "vision_use_head": False}  # fmt: skip
    text = {"vocab_size": VOCAB.size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "query_pre_attn_scalar": 24,
            "sliding_window": 8, "layer_types": [SLIDING, FULL] * 3, "max_position_embeddings": 512,
            "final_logit_softcapping": 30.0, "pad_token_id": VOCAB.pad, "bos_token_id": VOCAB.bos,
            "eos_token_id": VOCAB.eos, "initializer_range": 0.08}  # fmt: skip
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=VOCAB.image,
        boi_token_index=VOCAB.size - 2, eoi_token_index=VOCAB.size - 1, initializer_range=0.08,
    )  # fmt: skip
    model = random_model(Gemma3ForConditionalGeneration, config, seed, attn_implementation, dtype)
    # HF starts the projector's map at zero and the Gemma norms (1 + weight) and the tower's final LayerNorm at
    # the identity: every image token would be alike. Draw them, as a trained model has them.
    gen = torch.Generator().manual_seed(seed)
    inner = model.model
    with torch.no_grad():
        for param in (inner.multi_modal_projector.mm_input_projection_weight,):
            param.copy_(0.3 * torch.randn(param.shape, generator=gen))
        for param in (inner.multi_modal_projector.mm_soft_emb_norm.weight, inner.vision_tower.post_layernorm.bias):
            param.copy_(0.5 * torch.randn(param.shape, generator=gen))
        norm = inner.vision_tower.post_layernorm.weight
        norm.copy_(1.0 + 0.5 * torch.randn(norm.shape, generator=gen))
    return model, _inputs(16, (3, 32, 32), dtype)


def _inputs(tokens: int, pixel_shape: Sequence[int], dtype: torch.dtype) -> Callable[..., dict[str, Tensor]]:
    def make_inputs(
        question_lengths: Sequence[int] = (5, 3), seeds: Sequence[int] | None = None, images: int | None = None
    ) -> dict[str, Tensor]:
        seeds = list(range(len(question_lengths))) if seeds is None else list(seeds)
        rows, pixels = [], []
        for q, s in zip(question_lengths, seeds):
            gen = torch.Generator().manual_seed(s * 1009 + q)
            count = 1 + (s + q) % 2 if images is None else int(images)  # ragged: a sample's own choice
            words = torch.randint(VOCAB.first_word, VOCAB.size, (q,), generator=gen).tolist()
            rows.append(prompt_ids([tokens] * count, words))
            pixels += [torch.randn(*pixel_shape, generator=gen) for _ in range(count)]
        out = left_padded(rows)
        out["token_type_ids"] = (out["input_ids"] == VOCAB.image).long()
        if pixels:
            out["pixel_values"] = torch.stack(pixels).to(dtype)
        return out

    return make_inputs
