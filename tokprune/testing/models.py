"""Tiny LLaVA models built from configs with random weights, and inputs for them (no hub, no files).

``model, make_inputs = tiny_llava()`` gives a ``LlavaForConditionalGeneration`` in the llava-hf
LLaVA-1.5 layout (CLIP tower, ``vision_feature_layer=-2``, ``default`` selection, Llama LM with
grouped-query heads) and a function building left-padded batches in the LLaVA prompt layout::

    <s> USER : <image>*N <question words> ASSISTANT :

Token ids: see :class:`TinyVocab`. Weights are drawn with a larger init scale than HF's default so
that attention and logits are far from uniform (greedy decisions have real margins).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

__all__ = [
    "ClipCapture",
    "TinyVocab",
    "VOCAB",
    "clip_context",
    "run_clip",
    "tiny_clip",
    "tiny_llava",
    "tiny_llava_config",
    "tiny_llava_next",
    "tiny_qwen2_5_vl",
    "tiny_qwen3_vl",
]


@dataclass(frozen=True)
class TinyVocab:
    """Token ids of the tiny models."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    image: int = 3
    user: int = 4
    colon: int = 5
    assistant: int = 6
    first_word: int = 7  #: question words are drawn from first_word..size-1
    size: int = 96

    @property
    def assistant_marker(self) -> list[int]:
        """``ASSISTANT :``: pass as ``question_end`` to ``tokprune.patch``."""
        return [self.assistant, self.colon]


VOCAB = TinyVocab()


def tiny_llava_config(
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
) -> LlavaConfig:
    """The config of :func:`tiny_llava` (LLaVA-1.5 layout, tiny widths)."""
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
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCAB.image,
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def _random_model(model_cls: Any, config: Any, seed: int, attn_implementation: str, dtype: torch.dtype) -> Any:
    """``model_cls(config)`` with weights drawn from ``seed``, in ``dtype`` and eval mode, greedy 6-token
    generation by default; ``attn_implementation`` set on the config and its text and vision parts."""
    for cfg in (config, config.text_config, config.vision_config):
        cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=6, pad_token_id=VOCAB.pad, bos_token_id=VOCAB.bos, eos_token_id=None
    )
    return model


def _prompt(image_tokens: Sequence[int], words: Sequence[int]) -> list[int]:
    """``<s> USER : <image>*n_1 [SEP <image>*n_2 ...] <words> ASSISTANT :``: one placeholder run per image,
    consecutive images separated by one word token so that each run is its own."""
    blocks: list[int] = []
    for i, n in enumerate(image_tokens):
        blocks += ([VOCAB.first_word] if i else []) + [VOCAB.image] * n
    return [VOCAB.bos, VOCAB.user, VOCAB.colon, *blocks, *words, *VOCAB.assistant_marker]


def _left_padded(rows: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, W]`` of token rows, left-padded to the longest."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), VOCAB.pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tiny_llava(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    **sizes: int | float,
) -> tuple[LlavaForConditionalGeneration, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny LLaVA in eval mode, and ``make_inputs`` for it.

    ``make_inputs(question_lengths=(5, 3), seeds=None, images=1)`` returns ``input_ids``,
    ``attention_mask`` (left padding) and ``pixel_values`` for one sample per question length, each with
    ``images`` images (0: text only; several: separated by one word, :func:`_prompt`); sample
    ``i`` is drawn from ``seeds[i]`` (default ``i``), so ``make_inputs([q], seeds=[s])`` built alone
    equals the row of a batch that has ``q`` and ``s`` at that index.
    """
    config = tiny_llava_config(attn_implementation=attn_implementation, **sizes)
    model = _random_model(LlavaForConditionalGeneration, config, seed, attn_implementation, dtype)
    num_patches = config.image_seq_length
    image_size = config.vision_config.image_size

    def make_inputs(
        question_lengths: Sequence[int] = (5, 3), seeds: Sequence[int] | None = None, images: int = 1
    ) -> dict[str, Tensor]:
        seeds = list(range(len(question_lengths))) if seeds is None else list(seeds)
        rows, pixels = [], []
        for q, s in zip(question_lengths, seeds):
            gen = torch.Generator().manual_seed(s * 1009 + q)
            words = torch.randint(VOCAB.first_word, VOCAB.size, (q,), generator=gen).tolist()
            rows.append(_prompt([num_patches] * int(images), words))
            pixels += [torch.randn(3, image_size, image_size, generator=gen) for _ in range(int(images))]
        out = _left_padded(rows)
        if images:
            out["pixel_values"] = torch.stack(pixels).to(dtype)
        return out

    return model, make_inputs


#: Image sizes (h, w) the tiny LLaVA-NeXT inputs draw from: 1x2, 2x1 and 2x2 tiles, unpadded differently.
NEXT_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((14, 30), (30, 12), (32, 32), (20, 26))


def tiny_llava_next(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[Any, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny ``LlavaNextForConditionalGeneration`` (AnyRes, 16-px tiles of 16 patches) and
    ``make_inputs`` like :func:`tiny_llava`'s; sample ``i`` also draws its image size from its seed, so
    images of one batch bring different numbers of tokens (base + tiles + newlines).
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from .. import hf_compat as hf

    base = tiny_llava_config(attn_implementation=attn_implementation, image_size=16)
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=VOCAB.image,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = _random_model(LlavaNextForConditionalGeneration, config, seed, attn_implementation, dtype)
    side, n = 16, 16

    def make_inputs(
        question_lengths: Sequence[int] = (5, 3), seeds: Sequence[int] | None = None, images: int = 1
    ) -> dict[str, Tensor]:
        seeds = list(range(len(question_lengths))) if seeds is None else list(seeds)
        rows, pixels, sizes = [], [], []
        for q, s in zip(question_lengths, seeds):
            gen = torch.Generator().manual_seed(s * 1009 + q)
            counts = []
            for k in range(images):  # image k of sample s: the size after its previous image's
                size = torch.tensor([NEXT_IMAGE_SIZES[(s + k) % len(NEXT_IMAGE_SIZES)]])
                tiles = hf.anyres_tiles(config, size)
                counts.append(int(hf.anyres_layout(model.model, tiles, n, size, "default")[0].numel()))
                sizes.append(size[0])
                pixels.append(tiles[0])
            words = torch.randint(VOCAB.first_word, VOCAB.size, (q,), generator=gen).tolist()
            rows.append(_prompt(counts, words))
            for k in range(images):
                pixels[-images + k] = torch.randn(pixels[-images + k], 3, side, side, generator=gen)
        most = max(p.shape[0] for p in pixels)  # the processor pads every image to the most tiles
        pixel_values = torch.zeros(len(pixels), most, 3, side, side)
        for i, p in enumerate(pixels):
            pixel_values[i, : p.shape[0]] = p
        return {**_left_padded(rows), "pixel_values": pixel_values.to(dtype), "image_sizes": torch.stack(sizes)}

    return model, make_inputs


#: Image grids (t, h, w) in patches the tiny Qwen2.5-VL inputs draw from: 6, 8, 4 and 12 LLM tokens.
QWEN_GRIDS: tuple[tuple[int, int, int], ...] = ((1, 4, 6), (1, 8, 4), (1, 4, 4), (1, 6, 8))


def _qwen_token_ids() -> dict[str, int]:
    return {
        "image_token_id": VOCAB.image,
        "video_token_id": VOCAB.size - 1,
        "vision_start_token_id": VOCAB.size - 3,
        "vision_end_token_id": VOCAB.size - 2,
    }


def _qwen_text_config(**extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB.size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "initializer_range": 0.08,
        "bos_token_id": VOCAB.bos,
        "eos_token_id": VOCAB.eos,
        "pad_token_id": VOCAB.pad,
        **extra,
    }


def _qwen_model(
    model_cls: Any, config: Any, seed: int, attn_implementation: str, dtype: torch.dtype
) -> tuple[Any, Callable[..., dict[str, Tensor]]]:
    """Build a Qwen-VL model from ``config`` and the ``make_inputs`` of :func:`tiny_qwen2_5_vl`."""
    model = _random_model(model_cls, config, seed, attn_implementation, dtype)
    vcfg = config.vision_config
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2

    def make_inputs(
        question_lengths: Sequence[int] = (5, 3), seeds: Sequence[int] | None = None, images: int = 1
    ) -> dict[str, Tensor]:
        seeds = list(range(len(question_lengths))) if seeds is None else list(seeds)
        rows, pixels, grids = [], [], []
        for q, s in zip(question_lengths, seeds):
            gen = torch.Generator().manual_seed(s * 1009 + q)
            own = [torch.tensor(QWEN_GRIDS[(s + k) % len(QWEN_GRIDS)]) for k in range(images)]
            words = torch.randint(VOCAB.first_word, VOCAB.size - 3, (q,), generator=gen).tolist()
            rows.append(_prompt([int(g.prod()) // vcfg.spatial_merge_size**2 for g in own], words))
            pixels += [torch.randn(int(g.prod()), patch_dim, generator=gen) for g in own]
            grids += own
        padded = _left_padded(rows)
        input_ids = padded["input_ids"]
        return {
            **padded,
            "pixel_values": torch.cat(pixels).to(dtype),
            "image_grid_thw": torch.stack(grids),
            "mm_token_type_ids": (input_ids == VOCAB.image).int(),
        }

    return model, make_inputs


def tiny_qwen2_5_vl(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[Any, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny ``Qwen2_5_VLForConditionalGeneration`` (window attention, 2x2 patch merger,
    M-RoPE) and ``make_inputs`` like :func:`tiny_llava`'s; sample ``i`` draws its image grid from its
    seed, so images of one batch bring different numbers of tokens.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 4,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 16,
            "fullatt_block_indexes": [1],
            "in_channels": 3,
            "initializer_range": 0.08,
        },
        text_config=_qwen_text_config(),
        **_qwen_token_ids(),
        bos_token_id=VOCAB.bos,
        eos_token_id=VOCAB.eos,
        pad_token_id=VOCAB.pad,
    )
    return _qwen_model(Qwen2_5_VLForConditionalGeneration, config, seed, attn_implementation, dtype)


#: Vision layers whose outputs the tiny Qwen3-VL adds after decoder layers 0, 1, 2 (DeepStack): the
#: LLM-stage probes prune before layer 2, so one addition lands after a pruning point.
QWEN3_DEEPSTACK: tuple[int, ...] = (0, 1, 2)


def tiny_qwen3_vl(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[Any, Callable[..., dict[str, Tensor]]]:
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


# -- a bare CLIP tower, for testing vision-stage strategies against reference computations ---------------


def tiny_clip(seed: int = 0, *, layers: int = 6, heads: int = 4, width: int = 32, grid: int = 4) -> Any:
    """A random ``CLIPVisionModel`` with eager attention (``grid x grid`` patches of 4 px, plus CLS).

    q/k weights are scaled up so attention is peaked: at HF's init the softmax is near-linear and every
    way of mixing heads ranks tokens alike, which would let a wrong head reduction pass a test.
    """
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=4 * grid,
        patch_size=4,
        attn_implementation="eager",  # references read eager attention weights
    )
    model = CLIPVisionModel(config).eval()
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


class ClipCapture(dict):
    """q/k projections keyed ``("q" | "k", layer)``, each ``[B, 1+N, C]``, plus the tower's shape."""

    def __init__(self, num_layers: int, num_heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_layers, self.num_heads, self.grid = num_layers, num_heads, grid


def run_clip(model: Any, pixels: Tensor) -> tuple[Any, ClipCapture]:
    """One eager forward: the outputs (``attentions``, ``hidden_states``) and every layer's q/k."""
    config = model.config
    side = config.image_size // config.patch_size
    captured = ClipCapture(config.num_hidden_layers, config.num_attention_heads, (side, side))
    hooks = []
    for i, layer in enumerate(model.encoder.layers):
        for kind in ("q", "k"):
            proj = getattr(layer.self_attn, f"{kind}_proj")
            hooks.append(proj.register_forward_hook(lambda _m, _i, out, key=(kind, i): captured.__setitem__(key, out)))
    try:
        with torch.no_grad():
            outputs = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, captured


def clip_context(strategy: Any, outputs: Any, captured: ClipCapture) -> Any:
    """The :class:`~tokprune.VisionContext` an adapter would build from this forward for ``strategy``.

    Features are LLaVA-1.5's (``hidden_states[-2]`` without CLS); only the signals the strategy declares
    are readable, as in a patched model.
    """
    from tokprune import VisionContext, VisionSignals

    def fetch(signal: Any) -> Any:
        if signal.kind == "qk":
            return captured[("q", signal.layer)], captured[("k", signal.layer)]
        return outputs.hidden_states[signal.layer]

    declared = frozenset(s.resolve(captured.num_layers) for s in strategy.requires())
    signals = VisionSignals(fetch, captured.num_layers, captured.num_heads, declared=declared)
    return VisionContext(features=outputs.hidden_states[-2][:, 1:], signals=signals, grid=captured.grid)
