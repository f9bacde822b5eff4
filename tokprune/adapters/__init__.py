"""Model surgery for HF transformers: reversible, per-instance patches that apply pruning pipelines.

``handle = tokprune.patch(model, "cls_knee+text_interact")`` picks the first registered adapter whose
``matches(model)`` is true (adapters arrive through the ``register_adapters`` plugin hook; LLaVA is
built in), validates everything, then patches this instance only. ``handle.remove()`` (or
``tokprune.unpatch(model)``) restores it; ``with tokprune.pruned(model, spec) as run:`` does both.
After each call ``handle.stats`` holds the :class:`~tokprune.stats.PruneStats` of the prefill.
"""

from ._base import BUDGET_SCOPES, ModelAdapter, PatchState, handle_of, patch, pruned, registered_adapters, unpatch

__all__ = [
    "BUDGET_SCOPES",
    "ModelAdapter",
    "PatchState",
    "handle_of",
    "patch",
    "pruned",
    "registered_adapters",
    "unpatch",
]
