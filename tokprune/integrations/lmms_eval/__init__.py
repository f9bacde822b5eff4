"""lmms-eval model ``tokprune_llava``: evaluate any tokprune pipeline on a checkpoint of any registered family
(``tokprune adapters``: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL, SmolVLM, and any a plugin registers), batched.
The name stays ``tokprune_llava`` (lmms-eval's registry and users' commands know it).

::

    pip install "tokprune[lmms]"
    lmms-eval --model tokprune_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=cls_knee+text_interact \\
        --tasks pope --batch_size 8

How lmms-eval finds it: lmms-eval 0.7 loads model manifests from the ``lmms_eval.models`` entry-point
group; tokprune declares ``tokprune_llava = "tokprune.integrations.lmms_eval:lmms_eval_manifest"`` there,
and the manifest points at :data:`CLASS_PATH`. Where entry points are not read (older lmms-eval), run it
through this module instead, which registers the model and then hands over to lmms-eval's own CLI::

    python -m tokprune.integrations.lmms_eval --model tokprune_llava --model_args ... --tasks ...

lmms-eval is optional: this module imports without it. :class:`TokpruneLlava` is built on first access
as a subclass of lmms-eval's ``lmms`` base class when lmms-eval is installed, and is the plain
:class:`TokpruneLlavaCore` otherwise; both answer lmms-eval's request objects, or any object with an
``args`` tuple (see :class:`Request`).

Model arguments (``--model_args k=v,...``): see :class:`TokpruneLlavaCore`. A spec with commas inside
parentheses must be quoted, because lmms-eval splits ``--model_args`` on commas outside quotes:
``--model_args 'pretrained=PATH,strategy="fastv(layer=2, keep_ratio=0.5)"'``.
"""

from __future__ import annotations

from typing import Any

from .cli import LmmsEvalFailedError, main
from .model import (
    BUDGET_FIELDS,
    CLASS_PATH,
    DTYPES,
    MODEL_NAME,
    Request,
    TokpruneLlavaCore,
    lmms_eval_manifest,
    register_with_lmms_eval,
    tokprune_llava_class,
)
from .task import write_shapes_task

__all__ = [
    "BUDGET_FIELDS",
    "CLASS_PATH",
    "DTYPES",
    "LmmsEvalFailedError",
    "MODEL_NAME",
    "Request",
    "TokpruneLlava",  # noqa: F822 - built on first access by the module __getattr__
    "TokpruneLlavaCore",
    "lmms_eval_manifest",
    "main",
    "register_with_lmms_eval",
    "tokprune_llava_class",
    "write_shapes_task",
]


def __getattr__(name: str) -> Any:
    # Built on first access: importing this package must not import lmms-eval (and torch with it).
    if name == "TokpruneLlava":
        return tokprune_llava_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
