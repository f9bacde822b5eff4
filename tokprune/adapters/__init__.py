"""Model surgery for HF transformers: reversible, per-instance patches that apply pruning pipelines.

``handle = tokprune.patch(model, "cls_knee+text_interact")`` picks the registered adapter whose
``matches(model)`` is true (adapters arrive through the ``register_adapters`` plugin hook, the built-in
families through the ``builtin_families`` plugin; two matching one model is an error), validates everything,
then patches this instance only. ``handle.remove()`` (or ``tokprune.unpatch(model)``) restores it;
``with tokprune.pruned(model, spec) as run:`` does both. After each call ``handle.stats`` holds the
:class:`~tokprune.stats.PruneStats` of the prefill.

A model family is a :class:`Family` subclass (the public protocol, :mod:`.family`; docs/adapters.md,
"Adding a family"): :class:`FamilyParts`, :class:`EncodedImages`, :class:`TowerSignals` and
:class:`ImageFeatures` are its types. They import transformers, so they load on first use.
"""

from typing import Any

from ._base import BUDGET_SCOPES, ModelAdapter, PatchState, handle_of, patch, pruned, unpatch
from ._registry import AdapterInfo, adapter_registry, describe_adapter, pick_adapter, registered_adapters
from ._tiny import TinyCase

__all__ = [
    "BUDGET_SCOPES",
    "AdapterInfo",
    "EncodedImages",
    "Family",
    "FamilyParts",
    "ForwardOptions",
    "ImageFeatures",
    "LayerKeys",
    "ModelAdapter",
    "PatchState",
    "TinyCase",
    "TowerSignals",
    "adapter_registry",
    "describe_adapter",
    "handle_of",
    "pick_adapter",
    "projected_count",
    "patch",
    "pruned",
    "registered_adapters",
    "unpatch",
]

_FAMILY = {"EncodedImages", "Family", "FamilyParts", "ForwardOptions", "LayerKeys", "TowerSignals", "projected_count"}


def __getattr__(name: str) -> Any:
    # The family protocol pulls in transformers (hf_compat); keep ``import tokprune.adapters`` light.
    if name in _FAMILY:
        from . import family

        return getattr(family, name)
    if name == "ImageFeatures":
        from .features import ImageFeatures

        return ImageFeatures
    raise AttributeError(f"module 'tokprune.adapters' has no attribute {name!r}")
