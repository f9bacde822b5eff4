"""tokprune.models: models shipped with tokprune, resolvable by name.

``path("tiny-llava-shapes")`` returns the directory of a complete llava-hf checkpoint that loads with
``AutoProcessor.from_pretrained`` and ``LlavaForConditionalGeneration.from_pretrained``, offline.
``path("tiny-qwen2.5-vl-clips")``: a ``Qwen2_5_VLForConditionalGeneration`` trained on clips of the same world
(``AutoTokenizer`` + :func:`tokprune.models.build_qwen.model_inputs`; see its MODEL_CARD.md).
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

MODELS: dict[str, str] = {
    "tiny-llava-shapes": "tiny-llava-shapes",
    "tiny-qwen2.5-vl-clips": "tiny-qwen2.5-vl-clips",
}
"""Shipped model names -> checkpoint directory (relative to this package)."""

DEFAULT_MODEL = "tiny-llava-shapes"


class UnknownModelError(KeyError):
    """Raised for a model name tokprune does not ship."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def names() -> list[str]:
    """Names of the shipped models."""
    return sorted(MODELS)


def path(name: str = DEFAULT_MODEL) -> Path:
    """Directory of the shipped checkpoint ``name``.

    Raises ``UnknownModelError`` (a ``KeyError``) naming the valid names for an unknown ``name``.
    """
    if name not in MODELS:
        raise UnknownModelError(f"unknown tokprune model {name!r}; shipped models: {', '.join(names())}")
    return _HERE / MODELS[name]


__all__ = ["DEFAULT_MODEL", "MODELS", "UnknownModelError", "names", "path"]
