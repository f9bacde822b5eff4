"""A checkpoint folder of any registered family: its model, its processor and its chat prompt.

What the study runner (``tokprune run``) and the lmms-eval wrapper share, so that a family joins both by
being registered: the model through ``AutoModelForImageTextToText`` (refused, naming the registered
families, when no family understands it), the processor through ``AutoProcessor``, and the prompt through
the processor's chat template in transformers' message format (images, then the text), so each family's
own placeholders and turn markers come from its files, never from code here.

A processor with a video processor (Qwen2.5-VL, Qwen3-VL, SmolVLM) cannot be built where torchvision does
not import (transformers' video processors need it; PyPI's torchvision is a CUDA build a CPU torch cannot
load): :func:`load_processor` then builds the same processor class without its video processor: its own code
turns images and text into inputs (the video processor is read only for videos), videos are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UnsupportedModelError

__all__ = [
    "chat_prompt",
    "check_family",
    "images_only_processor",
    "load_model",
    "load_processor",
    "registered_families",
    "torchvision_imports",
]


def registered_families() -> str:
    """The registered families, one ``name (what it takes)`` each, for error messages."""
    from .adapters import adapter_registry

    return "; ".join(
        f"{name} ({info.summary.rstrip('.').replace('``', '')})" for name, info in adapter_registry().items()
    )


def check_family(model: Any, source: str) -> None:
    """Refuse ``model`` (loaded from ``source``) when no registered family understands it, naming the families."""
    from .adapters import pick_adapter

    try:
        pick_adapter(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(
            f"{source} holds a {type(model).__name__}, which no registered family prunes ({exc}). "
            f"The families that work: {registered_families()}"
        ) from None


def load_model(source: str | Path, **options: Any) -> Any:
    """``AutoModelForImageTextToText.from_pretrained(source, **options)``, in eval mode, checked by
    :func:`check_family`; a checkpoint that is no image-text model gets the same error."""
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(source, **options)
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise UnsupportedModelError(
            f"{source} is not an image-text-to-text checkpoint ({str(exc).splitlines()[0]}). "
            f"The families that work: {registered_families()}"
        ) from None
    check_family(model, str(source))
    return model.eval()


def _without_video(processor_cls: type) -> type:
    """``processor_cls`` without the ``video_processor`` attribute: transformers checks, saves and loads
    each attribute, and without torchvision the video processor's class is a placeholder that fails all three."""

    class ImagesOnly(processor_cls):  # type: ignore[misc, valid-type]
        video_processor = None

        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in super().get_attributes() if a != "video_processor"]

        def __call__(self, *args: Any, videos: Any = None, **kwargs: Any) -> Any:
            if videos is not None:
                raise UnsupportedModelError(
                    f"this {processor_cls.__name__} was loaded without its video processor, because torchvision does "
                    "not import here (transformers' video processors need it): it takes images and text only; "
                    "install a torchvision that imports beside this torch for videos (docs/index.md)"
                )
            return super().__call__(*args, **kwargs)

        def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
            # Text only: some processors' own rendering reads the video processor (SmolVLM's frame count).
            if kwargs.get("tokenize"):
                raise NotImplementedError(
                    f"{processor_cls.__name__} without its video processor renders chat text only (tokenize=False); "
                    "call the processor on the text and images"
                )
            kwargs = {k: v for k, v in kwargs.items() if k in ("add_generation_prompt", "continue_final_message")}
            template = chat_template or self.chat_template
            return self.tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False, **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_cls.__name__
    return ImagesOnly


def torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a CUDA build that fails beside a CPU torch
        return False
    return True


def images_only_processor(
    processor_cls: type, image_processor: Any, tokenizer: Any, chat_template: str | None, **options: Any
) -> Any:
    """``processor_cls`` without its video processor (images and text only), e.g. to save a tiny checkpoint;
    ``options`` are the processor's own (``image_seq_len``...)."""
    cls = _without_video(processor_cls)
    return cls(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template,
        **options,
    )  # fmt: skip


def _saved_options(source: str | Path, processor_cls: type) -> dict[str, Any]:
    """The processor's own settings saved in ``processor_config.json`` (``image_seq_len``...), those its
    ``__init__`` takes."""
    import inspect
    import json

    file = Path(source) / "processor_config.json"
    saved = json.loads(file.read_text()) if file.is_file() else {}
    takes = set(inspect.signature(processor_cls.__init__).parameters) - {"self", "image_processor", "tokenizer",
                                                                        "video_processor", "chat_template"}  # fmt: skip
    return {k: v for k, v in saved.items() if k in takes}


def load_processor(source: str | Path, **options: Any) -> Any:
    """``AutoProcessor.from_pretrained(source, **options)``; where torchvision does not import and the family's
    processor has a video processor, the same processor class without it (images and text only)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    if torchvision_imports():
        return AutoProcessor.from_pretrained(source, **options)
    model_type = AutoConfig.from_pretrained(source, **options).model_type
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    import transformers

    processor_cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if processor_cls is None or "video_processor" not in processor_cls.get_attributes():
        return AutoProcessor.from_pretrained(source, **options)
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    template = getattr(tokenizer, "chat_template", None)
    template_file = Path(source) / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text()
    image_processor = AutoImageProcessor.from_pretrained(source, **options)
    options = _saved_options(source, processor_cls)
    return images_only_processor(processor_cls, image_processor, tokenizer, template, **options)


def chat_prompt(processor: Any, text: str, images: int = 1, *, chat_template: str | None = None) -> str:
    """One user turn, ``images`` images then ``text``, rendered by the processor's chat template (or
    ``chat_template``) with the generation prompt: each family's placeholders come from its own template.
    Without any template: LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``."""
    template = chat_template or getattr(processor, "chat_template", None)
    if not template:
        return "USER: " + "<image>\n" * images + f"{text} ASSISTANT:"
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(images)]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]
    # Rendered by the tokenizer with the processor's template: the same text, and a processor built without
    # its video processor (see load_processor) cannot render (SmolVLM's reads the video processor's frames).
    owner = getattr(processor, "tokenizer", processor)
    return owner.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
