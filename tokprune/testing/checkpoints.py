"""Tiny random-weight checkpoints saved to a folder with a trained tokenizer and processor beside them.

A serving engine (vLLM) loads a model from files, so the in-memory models of :mod:`tokprune.testing.models`
are not enough: these builders write ``config.json``, safetensors weights, a small byte-level BPE tokenizer
trained on a fixed corpus, the chat template and the processor config, which both ``transformers``
(``from_pretrained``) and vLLM read. No hub, no download; widths satisfy vLLM's CPU attention (head size 32).

``save_tiny_qwen2_5_vl(path)`` and ``save_tiny_llava(path)`` return the path. The embedded
``tokprune.models.path("tiny-llava-shapes")`` is the trained LLaVA-1.5 counterpart. The other families' own
tiny models, saved for transformers' loaders: :mod:`tokprune.testing.family_checkpoints`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = [
    "QWEN_SPECIALS",
    "save_tiny_llava",
    "save_tiny_llava_next",
    "save_tiny_qwen2_5_vl",
    "save_tiny_qwen3_vl",
    "save_tiny_smolvlm",
    "train_bpe_tokenizer",
]

#: Qwen2.5-VL's special tokens, in the order they get ids (after the trained vocabulary's bytes).
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_CORPUS = (
    "describe the image. what color is the square? how many circles are there? is the red shape on the left? "
    "the picture shows a small blue triangle above a large green circle and a yellow square on the right. "
    "answer with one word. yes no left right top bottom one two three four five six seven eight nine ten. "
    "system user assistant you are a helpful assistant. what is in the picture? count the objects. "
)

# Qwen2-VL's chat template, shortened: images and videos become vision-start/pad/end, text as is.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe_tokenizer(specials: tuple[str, ...], vocab_size: int = 320, named: dict[str, str] | None = None) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a fixed English corpus, ``specials`` added;
    ``named``: specials a processor reads as tokenizer attributes (``{"image_token": "<image>"}``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **({"extra_special_tokens": named} if named else {}))


def _save_weights(model: Any, path: Path, seed: int, scale: float) -> None:
    """Draw every weight from ``seed`` (normal, std ``scale``; norms stay 1) and save the model in fp32."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("ln.weight")):
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(path)


def save_tiny_qwen2_5_vl(
    path: str | Path,
    seed: int = 0,
    *,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    patch_size: int = 4,
    max_pixels: int = 64 * 64,
) -> Path:
    """Save a tiny random ``Qwen2_5_VLForConditionalGeneration`` with tokenizer and processor to ``path``.

    Vision: patch 4, 2x2 merger, depth 2 (window then full attention); a 32x32 image is 8x8 patches,
    16 LLM tokens. Text: 2 layers, width 128, 4 heads of 32 (2 KV heads), M-RoPE sections (4, 6, 6).
    ``text`` / ``vision`` override config entries (``benchmarks/bench_serve.py`` builds 3B widths this
    way); ``patch_size`` and ``max_pixels`` set the tower's patch and the processor's largest image.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = train_bpe_tokenizer(QWEN_SPECIALS)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.eos_token = "<|im_end|>"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    vocab = len(tokenizer)
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 128,
            "patch_size": patch_size,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 16,
            "fullatt_block_indexes": [1],
            "in_channels": 3,
            **(vision or {}),
        },
        text_config={
            "vocab_size": vocab,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
            **(text or {}),
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _save_weights(model, path, seed, scale=0.08)
    size = {"shortest_edge": (4 * patch_size) ** 2, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2, size=size)
    video_size = {**size, "longest_edge": 4 * max_pixels}
    _save_processor(path, Qwen2_5_VLProcessor, image_processor, tokenizer, "qwen2_vl", patch_size, video_size)
    return path


def _save_processor(
    path: Path, processor_cls: type, image_processor: Any, tokenizer: Any, video: str, patch: int, video_size: dict
) -> None:
    """A Qwen-VL processor saved to ``path``; without its video processor where torchvision does not import
    (transformers' video processors need it): images and text then, as :func:`tokprune.loading.load_processor`
    loads it there."""
    from ..loading import images_only_processor, torchvision_imports

    if not torchvision_imports():
        images_only_processor(processor_cls, image_processor, tokenizer, QWEN_CHAT_TEMPLATE).save_pretrained(path)
        return
    import importlib

    module = importlib.import_module(f"transformers.models.{video}.video_processing_{video}")
    video_cls = getattr(module, "Qwen2VLVideoProcessor" if video == "qwen2_vl" else "Qwen3VLVideoProcessor")
    # the size as a plain dict: older releases keep image_processor.size as a SizeDict, not a mapping
    video_processor = video_cls(patch_size=patch, merge_size=2, temporal_patch_size=2, size=video_size)
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(path)


def save_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random LLaVA-1.5 (CLIP tower with CLS, ``vision_feature_layer=-2``, Llama) to ``path``,
    with the embedded model's word-level tokenizer and ``LlavaProcessor`` (32x32 images, 16 patches)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from ..models import build

    path = Path(path)
    tokenizer = build.build_tokenizer()
    processor = build.build_processor(tokenizer)
    processor.image_processor.size = {"height": 32, "width": 32}
    processor.image_processor.crop_size = {"height": 32, "width": 32}
    processor.patch_size = 8
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=64,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _save_weights(model, path, seed, scale=0.08)
    processor.save_pretrained(path)
    return path


def save_tiny_qwen3_vl(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``Qwen3VLForConditionalGeneration`` with tokenizer and processor to ``path``.

    Vision: patch 4, 2x2 merger, depth 3 with DeepStack mergers after layers 0, 1, 2 (learned position
    embeddings of a 4x4 grid, interpolated); a 32x32 image is 16 LLM tokens. Text: 2 Qwen3 layers, width 128,
    4 heads of 32 (2 KV heads), interleaved M-RoPE sections (6, 5, 5).
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = train_bpe_tokenizer(QWEN_SPECIALS)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.eos_token = "<|im_end|>"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen3VLConfig(
        vision_config={
            "depth": 3,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": 128,
            "patch_size": 4,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0, 1, 2],
            "in_channels": 3,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    _save_weights(model, path, seed, scale=0.08)
    size = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    _save_processor(path, Qwen3VLProcessor, image_processor, tokenizer, "qwen3_vl", 4, {**size, "longest_edge": 4 * 64 * 64})
    return path


#: SmolVLM's special tokens (its processor reads ``<fake_token_around_image>``, ``<global-img>``, ``<image>``).
SMOLVLM_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<global-img>",
    "<image>",
)
# SmolVLM's chat template, shortened: "User:<image>question<end_of_utterance>\nAssistant:".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def save_tiny_smolvlm(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``SmolVLMForConditionalGeneration`` with tokenizer and processor to ``path``: SigLIP
    32 px / 4 px patches, pixel shuffle by 2 (16 tokens per image), 2 Llama layers of width 64; the processor
    resizes every image to 32 x 32 and does not split it (``do_image_splitting=False``, what the family prunes)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    path = Path(path)
    tokenizer = train_bpe_tokenizer(SMOLVLM_SPECIALS)
    tokenizer.pad_token, tokenizer.eos_token = "<|endoftext|>", "<end_of_utterance>"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SMOLVLM_SPECIALS}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 4}  # fmt: skip
    text = {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
            "pad_token_id": ids["<|endoftext|>"], "bos_token_id": ids["<|im_start|>"],
            "eos_token_id": ids["<end_of_utterance>"], "tie_word_embeddings": False}  # fmt: skip
    config = SmolVLMConfig(
        vision_config=vision, text_config=text, image_token_id=ids["<image>"], scale_factor=2,
        tie_word_embeddings=False, pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config).eval()
    _save_weights(model, path, seed, scale=0.08)
    image_processor = SmolVLMImageProcessorPil(
        do_resize=True, size={"longest_edge": 32}, do_image_splitting=False, max_image_size={"longest_edge": 32}
    )
    from ..loading import images_only_processor, torchvision_imports

    if torchvision_imports():
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        processor = SmolVLMProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(),
            image_seq_len=16, chat_template=SMOLVLM_CHAT_TEMPLATE,
        )  # fmt: skip
    else:
        processor = images_only_processor(
            SmolVLMProcessor, image_processor, tokenizer, SMOLVLM_CHAT_TEMPLATE, image_seq_len=16
        )
    processor.save_pretrained(path)
    return path


def save_tiny_llava_next(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random LLaVA-NeXT (AnyRes over 16-px tiles of 2 x 2 CLIP patches with CLS, grids 16 x 32,
    32 x 16 and 32 x 32; 2 Llama layers) to ``path``, with a BPE tokenizer, LLaVA-1.5's chat template and
    ``LlavaNextProcessor``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )  # fmt: skip
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from ..models.build import CHAT_TEMPLATE

    path = Path(path)
    tokenizer = train_bpe_tokenizer(("<unk>", "<s>", "</s>", "<pad>", "<image>"))
    tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token = "<pad>", "<s>", "</s>"
    image = tokenizer.convert_tokens_to_ids("<image>")
    grid = [[16, 32], [32, 16], [32, 32]]
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=64, hidden_act="quick_gelu")  # fmt: skip
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=image, image_grid_pinpoints=grid,
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    _save_weights(model, path, seed, scale=0.08)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=grid
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(path)
    return path
