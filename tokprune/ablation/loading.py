"""A study's model: its device, its checkpoint (an embedded model or a local folder, never a download) and that
checkpoint's fingerprint, the model and processor of any registered family, and the prompts a study sends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TokpruneError
from .config import EMBEDDED_MODEL, AblationConfig, ConfigError
from .distributed import Dist

__all__ = [
    "TokenizerOnly",
    "build_prompts",
    "load_model",
    "model_fingerprint",
    "resolve_device",
    "resolve_model_path",
]


def resolve_device(device: str, dist: Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but CUDA is not available; use device=cpu (or auto)")
        if device == "cuda":
            return torch.device("cuda", dist.local_rank if dist.active else torch.cuda.current_device())
    return torch.device(device)


def resolve_model_path(name: str) -> str:
    """An embedded model's directory, or a local directory as given; never a download."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model={name!r} is a folder without config.json, so not a HF checkpoint; use model=<the folder "
                f"holding config.json, the weights and the processor files> or model={EMBEDDED_MODEL}"
            )
        return str(path)
    try:
        from tokprune import models

        embedded = models.path(name)
    except (ImportError, AttributeError, KeyError) as exc:
        raise ConfigError(
            f"model {name!r} is neither a local directory nor an embedded model ({exc}); "
            f"use model=<path to an HF checkpoint of a registered family (tokprune adapters)> or model={EMBEDDED_MODEL}"
        ) from None
    if not (embedded / "config.json").is_file():
        raise ConfigError(f"embedded model {name!r} is not installed at {str(embedded)!r}; reinstall tokprune")
    return str(embedded)


def model_fingerprint(name: str) -> str:
    """Hash of the checkpoint's config and weight files (sizes and sampled contents): a different model at
    the same path is a different run (resume must not reuse its results)."""
    from .fingerprint import checkpoint_fingerprint

    return checkpoint_fingerprint(resolve_model_path(name))


@dataclass
class TokenizerOnly:
    """The processor of a study whose dataset builds its own model inputs (``dataset.name=clips``): the
    checkpoint's tokenizer. Qwen2.5-VL's full processor needs a video processor, and transformers' video
    processors need torchvision, which a CPU stack may not be able to import."""

    tokenizer: Any
    chat_template: str | None = None

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TokpruneError("this study's dataset builds its own inputs (Dataset.inputs); the tokenizer is no processor")


def load_model(cfg: AblationConfig, device: torch.device) -> tuple[Any, Any]:
    """The checkpoint at ``model=`` of any registered family, and its processor (:mod:`tokprune.loading`)."""
    from transformers import AutoTokenizer

    from .. import loading
    from ..errors import UnsupportedModelError

    path = resolve_model_path(cfg.model)
    dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    try:  # the model first: a checkpoint no family prunes is refused before its processor is read
        model = loading.load_model(path, dtype=dtype, attn_implementation=cfg.attn_implementation)
    except UnsupportedModelError as exc:
        raise ConfigError(f"model={cfg.model!r}: {exc}") from None
    own_inputs = cfg.dataset.name == "clips"  # see datasets.clip_inputs
    processor = TokenizerOnly(AutoTokenizer.from_pretrained(path)) if own_inputs else loading.load_processor(path)
    # Decoder-only batched generation needs left padding (llava-hf's default is right for training).
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


def build_prompts(processor: Any, questions: Sequence[str]) -> list[str]:
    """One image then the question, through the processor's chat template (each family's own placeholders);
    LLaVA-1.5's ``USER: <image>\n... ASSISTANT:`` when the processor has none."""
    from ..loading import chat_prompt

    return [chat_prompt(processor, q, 1) for q in questions]
