"""tokprune's built-in strategies, registered through the ``tokprune`` entry-point group like any plugin.

One module per strategy, named after its registry name; shared logic lives in the private modules
(``_vision``: CLS scores; ``_llm``: query sets) and in the public ``tokprune.scoring`` (how to cut a
score curve, diversity and DPP selection, pivots). The catalogue with algorithms, parameters,
references and deviations is ``docs/strategies.md``.
"""

from __future__ import annotations

from collections.abc import Callable

from tokprune import hookimpl

from .cls_knee import ClsKnee
from .fastv import FastV
from .prumerge import PruMerge
from .prumerge_plus import PruMergePlus
from .random import Random
from .text_interact import TextInteract
from .topk import TopK

__all__ = ["BUILTINS", "ClsKnee", "FastV", "PruMerge", "PruMergePlus", "Random", "TextInteract", "TopK"]

BUILTINS = (ClsKnee, TextInteract, PruMerge, PruMergePlus, FastV, TopK, Random)


@hookimpl
def register_strategies(register: Callable[..., None]) -> None:
    for cls in BUILTINS:
        register(cls)
