"""tokprune's built-in strategies, registered through the ``tokprune`` entry-point group like any plugin.

One module per strategy, named after its registry name; shared logic lives in the private modules
(``_vision``: CLS scores; ``_llm``: query sets) and in the public ``tokprune.scoring`` (how to cut a
score curve, diversity and DPP selection, pivots). The catalogue with algorithms, parameters,
references and deviations is ``docs/strategies.md``.
"""

from __future__ import annotations

from collections.abc import Callable

from tokprune import hookimpl

from .cdpruner import CDPruner
from .cls_knee import ClsKnee
from .dart import Dart
from .divprune import DivPrune
from .downsample import Downsample
from .evs import EVS
from .fastv import FastV
from .prumerge import PruMerge
from .prumerge_plus import PruMergePlus
from .pyramiddrop import PyramidDrop
from .random import Random
from .text_interact import TextInteract
from .topk import TopK
from .vidcom2 import VidCom2
from .vispruner import VisPruner

__all__ = [
    "BUILTINS",
    "CDPruner",
    "ClsKnee",
    "Dart",
    "DivPrune",
    "Downsample",
    "EVS",
    "FastV",
    "PruMerge",
    "PruMergePlus",
    "PyramidDrop",
    "Random",
    "TextInteract",
    "TopK",
    "VidCom2",
    "VisPruner",
]

BUILTINS = (
    ClsKnee,
    TextInteract,
    PruMerge,
    PruMergePlus,
    FastV,
    TopK,
    Random,
    Dart,
    DivPrune,
    PyramidDrop,
    VisPruner,
    CDPruner,
    Downsample,
    EVS,
    VidCom2,
)


@hookimpl
def register_strategies(register: Callable[..., None]) -> None:
    for cls in BUILTINS:
        register(cls)
