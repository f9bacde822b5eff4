"""Tiny saved checkpoints of the families' own tiny models, for transformers' loaders (``tokprune run``, the
lmms-eval wrapper): a family file's ``tiny_*`` model (its config and weights, :mod:`tokprune.adapters`) fitted to
a byte-level BPE tokenizer of :mod:`tokprune.testing.checkpoints`, saved with the family's processor and a
shortened chat template. No hub, no download. Their widths are the tiny models' (heads of 16 or 24), not
vLLM's CPU attention's: for the vLLM savers see :mod:`tokprune.testing.checkpoints`.

Each ``save_tiny_<family>(path, seed=0)`` returns the path. A processor with a video processor is saved
without it where torchvision does not import, as :func:`tokprune.loading.load_processor` loads it there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoints import QWEN_SPECIALS, _save_processor, train_bpe_tokenizer

__all__ = [
    "GEMMA3_CHAT_TEMPLATE",
    "INTERNVL_CHAT_TEMPLATE",
    "ONEVISION_CHAT_TEMPLATE",
    "save_tiny_gemma3",
    "save_tiny_internvl",
    "save_tiny_llava_onevision",
    "save_tiny_qwen3_5",
    "save_tiny_qwen3_5_moe",
]


def _fit_tokenizer(model: Any, tokenizer: Any, seed: int, **token_ids: int) -> Any:
    """A family's tiny model (its ``tiny_*`` config and weights, :mod:`tokprune.adapters`) made to read
    ``tokenizer``: its embedding and output rows resized to the tokenizer's vocabulary (new rows drawn from
    ``seed``), the config's ``token_ids`` (``image_token_id``...) and text ids set to the tokenizer's specials,
    greedy generation that stops at the tokenizer's end token."""
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    bos = pad if tokenizer.bos_token_id is None else tokenizer.bos_token_id
    text = model.config.get_text_config()
    text.pad_token_id, text.bos_token_id, text.eos_token_id = pad, bos, eos
    for key, value in token_ids.items():
        setattr(model.config, key, value)
    model.generation_config = GenerationConfig(do_sample=False, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    return model


def _qwen_tokenizer() -> tuple[Any, dict[str, int]]:
    """The Qwen-VL families' BPE tokenizer and its vision token ids, as their configs name them."""
    tokenizer = train_bpe_tokenizer(QWEN_SPECIALS)
    tokenizer.pad_token, tokenizer.eos_token = "<|endoftext|>", "<|im_end|>"
    names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}  # fmt: skip
    return tokenizer, {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def save_tiny_qwen3_5(path: str | Path, seed: int = 0, experts: int = 0) -> Path:
    """Save :func:`~tokprune.adapters.qwen3_5.tiny_qwen3_5` (``Qwen3_5ForConditionalGeneration``: linear and
    gated full attention layers; with ``experts``, the mixture-of-experts variant) with a BPE tokenizer and
    Qwen3-VL's processor (patch 4, 2x2 merger: a 32x32 image is 16 LLM tokens) to ``path``."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ..adapters.qwen3_5 import tiny_qwen3_5

    path = Path(path)
    tokenizer, ids = _qwen_tokenizer()
    model, _ = tiny_qwen3_5(seed, experts=experts)
    _fit_tokenizer(model, tokenizer, seed, **ids).save_pretrained(path)
    patch = model.config.vision_config.patch_size
    size = {"shortest_edge": (4 * patch) ** 2, "longest_edge": 64 * 64}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2, size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    video_size = {**size, "longest_edge": 4 * 64 * 64}
    _save_processor(path, Qwen3VLProcessor, image_processor, tokenizer, "qwen3_vl", patch, video_size)
    return path


def save_tiny_qwen3_5_moe(path: str | Path, seed: int = 0) -> Path:
    """:func:`save_tiny_qwen3_5` with 4 experts (two routed a token, and a shared one), as the family's tiny model:
    ``Qwen3_5MoeForConditionalGeneration``."""
    return save_tiny_qwen3_5(path, seed, experts=4)


#: LLaVA-OneVision's special tokens (Qwen2's turn markers, its processor's ``<image>`` and ``<video>``).
ONEVISION_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
# LLaVA-OneVision's chat template, shortened: "<|im_start|>user\n<image>\nquestion<|im_end|>\n<|im_start|>assistant\n".
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_llava_onevision(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`~tokprune.adapters.llava_onevision.tiny_llava_onevision` (SigLIP 16 px tiles of 4 px patches,
    AnyRes grids up to 2x2 with ``anyres_max_2``, Qwen2) with a BPE tokenizer, a shortened OneVision chat template
    and ``LlavaOnevisionProcessor`` (images-only where torchvision does not import) to ``path``."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from ..adapters.llava_onevision import tiny_llava_onevision

    path = Path(path)
    tokenizer = train_bpe_tokenizer(ONEVISION_SPECIALS)
    tokenizer.pad_token, tokenizer.eos_token = "<|endoftext|>", "<|im_end|>"
    model, _ = tiny_llava_onevision(seed)
    ids = {"image_token_index": "<image>", "video_token_index": "<video>"}
    _fit_tokenizer(model, tokenizer, seed, **{k: tokenizer.convert_tokens_to_ids(t) for k, t in ids.items()})
    model.save_pretrained(path)
    config = model.config
    side, patch = config.vision_config.image_size, config.vision_config.patch_size
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side}, image_grid_pinpoints=config.image_grid_pinpoints
    )
    options = {"num_image_tokens": (side // patch) ** 2, "vision_aspect_ratio": config.vision_aspect_ratio,
               "vision_feature_select_strategy": config.vision_feature_select_strategy}  # fmt: skip
    saved = (path, config.model_type, LlavaOnevisionProcessor, image_processor, tokenizer, ONEVISION_CHAT_TEMPLATE)
    _save_with_video(*saved, **options)
    return path


def _save_with_video(
    path: Path, model_type: str, processor_cls: type, image_processor: Any, tokenizer: Any, template: str, **opts: Any
) -> None:
    """``processor_cls`` saved to ``path`` with ``model_type``'s default video processor, or without one where
    torchvision does not import (images and text, as :func:`tokprune.loading.load_processor` loads it there)."""
    from ..loading import images_only_processor, torchvision_imports

    if not torchvision_imports():
        images_only_processor(processor_cls, image_processor, tokenizer, template, **opts).save_pretrained(path)
        return
    from transformers.models.auto import video_processing_auto as auto

    # the family's own video processor with its defaults: nothing a tiny image study reads
    video_cls = auto.video_processor_class_from_name(auto.VIDEO_PROCESSOR_MAPPING_NAMES[model_type]["torchvision"])
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_cls(),
        chat_template=template, **opts,
    )  # fmt: skip
    processor.save_pretrained(path)


#: Gemma 3's special tokens; its processor reads the image ones as tokenizer attributes.
GEMMA3_SPECIALS = ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>")  # fmt: skip
# Gemma 3's chat template, shortened: "<bos><start_of_turn>user\n<start_of_image>question<end_of_turn>\n
# <start_of_turn>model\n" (the processor expands <start_of_image> to the image's soft tokens).
GEMMA3_CHAT_TEMPLATE = (
    "<bos>{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<start_of_image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def save_tiny_gemma3(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`~tokprune.adapters.gemma3.tiny_gemma3` (SigLIP 32 px / 4 px patches pooled to 16 tokens, sliding
    and full Gemma 3 layers) with a BPE tokenizer, a shortened Gemma 3 chat template and ``Gemma3Processor``
    (every image resized to 32 x 32, no pan and scan) to ``path``."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from ..adapters.gemma3 import tiny_gemma3

    path = Path(path)
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = train_bpe_tokenizer(GEMMA3_SPECIALS, named=named)
    tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token = "<pad>", "<bos>", "<end_of_turn>"
    model, _ = tiny_gemma3(seed)
    ids = {"image_token_index": named["image_token"], "boi_token_index": named["boi_token"],
           "eoi_token_index": named["eoi_token"]}  # fmt: skip
    _fit_tokenizer(model, tokenizer, seed, **{k: tokenizer.convert_tokens_to_ids(t) for k, t in ids.items()})
    model.save_pretrained(path)
    side = model.config.vision_config.image_size
    image_processor = Gemma3ImageProcessorPil(
        size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=model.config.mm_tokens_per_image,
    )  # fmt: skip
    processor.save_pretrained(path)
    return path


#: InternVL's special tokens (Qwen2's turn markers; its processor reads the image and video ones as attributes).
INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}  # fmt: skip
# InternVL's chat template, shortened: "<|im_start|>user\n<IMG_CONTEXT>\nquestion<|im_end|>\n<|im_start|>assistant\n"
# (the processor expands <IMG_CONTEXT> to <img>, the image's tokens, </img>).
INTERNVL_CHAT_TEMPLATE = ONEVISION_CHAT_TEMPLATE.replace("<image>", "<IMG_CONTEXT>")


def save_tiny_internvl(path: str | Path, seed: int = 0) -> Path:
    """Save :func:`~tokprune.adapters.internvl.tiny_internvl` (InternViT 32 px / 4 px patches, pixel shuffle to 16
    tokens a tile, Qwen2) with a BPE tokenizer, a shortened InternVL chat template and ``InternVLProcessor`` (32 px
    tiles, up to 4 and a thumbnail an image; images-only where torchvision does not import) to ``path``."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from ..adapters.internvl import tiny_internvl

    path = Path(path)
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_NAMED.values())
    tokenizer = train_bpe_tokenizer(specials, named=INTERNVL_NAMED)
    tokenizer.pad_token, tokenizer.eos_token = "<|endoftext|>", "<|im_end|>"
    model, _ = tiny_internvl(seed)
    _fit_tokenizer(model, tokenizer, seed, image_token_id=tokenizer.context_image_token_id)
    model.save_pretrained(path)
    config = model.config
    height, width = config.vision_config.image_size  # InternViT's config keeps (height, width)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": height, "width": width}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    saved = (path, config.model_type, InternVLProcessor, image_processor, tokenizer, INTERNVL_CHAT_TEMPLATE)
    _save_with_video(*saved, image_seq_length=config.image_seq_length)
    return path
