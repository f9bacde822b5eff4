"""Builders for the tiny LLaVA: word-level tokenizer, processor, configs (llava-hf format)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tokprune.data import world

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# Same template shape as llava-hf/llava-1.5-7b-hf: role prefix, images first, then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """Every word the world can produce, after the special tokens (fixed order: ids are stable)."""
    words = [
        "user", "assistant", ":", "?", ",",
        "what", "color", "is", "the", "how", "many", "are", "there", "objects", "a",
        "on", "left", "or", "right", "at", "top", "bottom", "yes", "no",
        *world.SIZES, *world.COLORS, *world.SHAPES, *(s + "s" for s in world.SHAPES), *world.NUMBERS,
        *world.CAPTION_REQUEST.split(),
    ]
    return ordered_vocabulary(SPECIAL_TOKENS, words)


def ordered_vocabulary(special: Sequence[str], words: Sequence[str]) -> list[str]:
    """``special`` then ``words``, each once, in first-seen order (the order fixes the ids)."""
    return list(dict.fromkeys([*special, *words]))


def word_level_tokenizer(
    vocabulary: Sequence[str], special: Sequence[str], extra_special_tokens: dict[str, str], model_max_length: int,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``vocabulary``: lower-cased words and punctuation, ``<s>`` prepended,
    left padding; ``special`` are never split or lower-cased (the embedded models' tokenizers)."""
    vocab = {w: i for i, w in enumerate(vocabulary)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=extra_special_tokens,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **({"chat_template": chat_template} if chat_template is not None else {}),
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded LLaVA's tokenizer (:func:`word_level_tokenizer`; ``<image>`` its image token)."""
    return word_level_tokenizer(vocabulary(), SPECIAL_TOKENS, {"image_token": "<image>"}, model_max_length=256)


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """``LlavaProcessor`` expanding ``<image>`` to exactly ``world.NUM_PATCHES`` tokens."""
    tokenizer = tokenizer or build_tokenizer()
    size = world.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        do_center_crop=False,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=world.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


@dataclass
class Sizes:
    """Architecture sizes of both towers and the language model."""

    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    projection_dim: int = 128


SMOKE_SIZES = Sizes(32, 3, 2, 32, 1, 2, 32, 1, 2, 16)


def vision_config(sizes: Sizes) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=4 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=world.IMAGE_SIZE,
        patch_size=world.PATCH_SIZE,
        projection_dim=sizes.projection_dim,
        hidden_act="quick_gelu",
    )


def caption_text_config(sizes: Sizes, tokenizer: PreTrainedTokenizerFast) -> CLIPTextConfig:
    """The contrastive text tower (training only; it is not shipped)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.text_hidden,
        intermediate_size=4 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        max_position_embeddings=64,
        projection_dim=sizes.projection_dim,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def llava_config(sizes: Sizes, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.lm_hidden,
        intermediate_size=int(8 / 3 * sizes.lm_hidden),
        num_hidden_layers=sizes.lm_layers,
        num_attention_heads=sizes.lm_heads,
        num_key_value_heads=sizes.lm_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision_config(sizes),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=world.NUM_PATCHES,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy, short: every answer is one word plus ``</s>``."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
