"""Model surgery for HF transformers: reversible, per-instance patches that apply pruning pipelines.

``handle = tokprune.patch(model, "cls_knee+text_interact")`` picks the registered adapter whose
``matches(model)`` is true (adapters arrive through the ``register_adapters`` plugin hook, the built-in
families through the ``builtin_families`` plugin; two matching one model is an error), validates everything, then patches this instance only. ``handle.remove()`` (or
``tokprune.unpatch(model)``) restores it; ``with tokprune.pruned(model, spec) as run:`` does both.
After each call ``handle.stats`` holds the :class:`~tokprune.stats.PruneStats` of the prefill.
"""

from ._base import BUDGET_SCOPES, ModelAdapter, PatchState, handle_of, patch, pruned, unpatch
from ._registry import AdapterInfo, adapter_registry, describe_adapter, pick_adapter, registered_adapters
from ._tiny import TinyCase

__all__ = [
    "BUDGET_SCOPES",
    "AdapterInfo",
    "ModelAdapter",
    "PatchState",
    "TinyCase",
    "adapter_registry",
    "describe_adapter",
    "handle_of",
    "pick_adapter",
    "patch",
    "pruned",
    "registered_adapters",
    "unpatch",
]
