"""Tiny LLaVA models built from configs with random weights, and inputs for them (no hub, no files).

``model, make_inputs = tiny_llava()`` gives a ``LlavaForConditionalGeneration`` in the llava-hf
LLaVA-1.5 layout (CLIP tower, ``vision_feature_layer=-2``, ``default`` selection, Llama LM with
grouped-query heads) and a function building left-padded batches in the LLaVA prompt layout::

    <s> USER : <image>*N <question words> ASSISTANT :

Token ids: see :class:`TinyVocab`. Weights are drawn with a larger init scale than HF's default so
that attention and logits are far from uniform (greedy decisions have real margins).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import CLIPVisionConfig

from ..adapters._tiny import VOCAB, TinyVocab, fixed_size_inputs, left_padded, prompt_ids, random_model
from ..adapters.llava import tiny_llava, tiny_llava_config
from ..adapters.llava_next import NEXT_IMAGE_SIZES, tiny_llava_next
from ..adapters.qwen2_5_vl import QWEN_GRIDS, tiny_qwen2_5_vl
from ..adapters.qwen3_vl import QWEN3_DEEPSTACK, tiny_qwen3_vl

__all__ = [
    "NEXT_IMAGE_SIZES",
    "QWEN3_DEEPSTACK",
    "QWEN_GRIDS",
    "VOCAB",
    "ClipCapture",
    "TinyVocab",
    "clip_context",
    "fixed_size_inputs",
    "left_padded",
    "prompt_ids",
    "random_model",
    "run_clip",
    "tiny_clip",
    "tiny_llava",
    "tiny_llava_config",
    "tiny_llava_next",
    "tiny_qwen2_5_vl",
    "tiny_qwen3_vl",
    "tiny_text_encoder",
]


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


# -- a tiny CLIP text tower, for instruction-conditioned strategies (CDPruner's relevance=text) ----------


def tiny_text_encoder(seed: int = 0, *, vision_hidden: int = 32, width: int = 32, segment: int = 16) -> Any:
    """A :class:`tokprune.text_encoder.ClipTextEncoder` with random weights: a ``CLIPTextModelWithProjection``
    whose segments are ``segment`` tokens (short, so that long questions span several, as the reference
    splits at 77), a word-level tokenizer over the tiny vocabulary's words (``w7`` ... ``w95``, with BOS and
    EOS) and a ``vision_hidden -> width`` visual projection. ``decode`` spells tiny-LLaVA ids as those words.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    from ..text_encoder import ClipTextEncoder

    words = [f"w{i}" for i in range(VOCAB.size)]
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, "<eos>": 3, **{w: 4 + i for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=segment,
        projection_dim=width,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=3,  # not 2: CLIP pools at the first EOS (2 selects the legacy argmax pooling)
    )
    torch.manual_seed(seed)
    text_model = CLIPTextModelWithProjection(config).eval()
    projection = torch.nn.Linear(vision_hidden, width, bias=False).eval()
    return ClipTextEncoder(text_model, tokenizer, projection, decode=lambda ids: " ".join(f"w{i}" for i in ids))
