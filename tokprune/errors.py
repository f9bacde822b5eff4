"""Error classes. Each subclasses the builtin a caller would naturally catch (KeyError, ValueError, ...).

Messages are part of the API: they name the bad value, the valid choices and, where there is one, the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "AdapterNameClash",
    "AlreadyPatchedError",
    "AmbiguousModelError",
    "InputError",
    "InternalError",
    "MissingCapabilityError",
    "PluginError",
    "SpecSyntaxError",
    "StageOrderError",
    "StrategyContractError",
    "StrategyNameClash",
    "StrategyParamError",
    "TokpruneError",
    "UnknownStrategyError",
    "UnsupportedModelError",
    "did_you_mean",
]


class TokpruneError(Exception):
    """Base class of every error tokprune raises on purpose."""

    def __str__(self) -> str:
        # KeyError.__str__ would quote the message; every subclass should read as plain text.
        return str(self.args[0]) if self.args else ""


class UnknownStrategyError(TokpruneError, KeyError):
    """A spec names a strategy no loaded plugin registered."""


class SpecSyntaxError(TokpruneError, ValueError):
    """A spec string does not follow the grammar; the message points at the character."""


class StrategyParamError(TokpruneError, ValueError):
    """Unknown parameter, wrong type or out-of-range value."""


class StageOrderError(TokpruneError, ValueError):
    """Terms of a pipeline are in an order that cannot run (vision after LLM, LLM layers not increasing)."""


class StrategyNameClash(TokpruneError, ValueError):
    """Two plugins registered the same strategy name."""


class AdapterNameClash(TokpruneError, ValueError):
    """Two plugins registered the same adapter (model family) name."""


class PluginError(TokpruneError, TypeError):
    """An object of the wrong kind handed to tokprune: a plugin registered something its hook does not take
    (wrong class, abstract, bad name), or a ``patch()`` option got the wrong type (``text_encoder``)."""


class StrategyContractError(TokpruneError, RuntimeError):
    """A strategy returned a plan that breaks the interface contract (shape, dtype, empty keep set)."""


class MissingCapabilityError(TokpruneError, RuntimeError):
    """The model cannot provide a signal the pipeline needs (e.g. CLS attention on a tower without CLS)."""


class UnsupportedModelError(TokpruneError, TypeError):
    """No registered adapter understands this model, or a generation mode is not supported.

    Not for bad inputs to a model tokprune does support (a right-padded batch, features that do not fit the
    placeholders): those are :class:`InputError`.
    """


class InputError(TokpruneError, ValueError):
    """An input tokprune cannot run on: a right-padded batch, image features that do not match the image
    placeholders, a missing companion tensor (``image_sizes``, ``image_grid_thw``), a tensor of the wrong
    shape given to a scoring primitive. The message names the value and what is expected."""


class AlreadyPatchedError(TokpruneError, RuntimeError):
    """``patch`` on a model that is already patched; the message names the active pipeline and the fix."""


class InternalError(TokpruneError, RuntimeError):
    """An invariant of tokprune itself broke (a bug to report, never a user error); replaces ``assert``,
    which ``python -O`` removes."""


class AmbiguousModelError(UnsupportedModelError):
    """Several registered adapters match one model; the message names them and their plugins."""


def did_you_mean(bad: str, choices: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest choice, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(bad, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
