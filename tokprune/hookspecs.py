"""The plugin contract: every hook tokprune calls, and the markers plugins use.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, found through the
``tokprune`` entry-point group. Each hook hands the plugin a ``register`` callback, so tokprune owns
validation, name clashes and attribution. Implementations may accept fewer arguments than the spec
(pluggy's opt-in arguments), so hooks can grow without breaking plugins.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "tokprune"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate a plugin's hook implementations with this marker (re-exported as ``tokprune.hookimpl``).
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_strategies(register: Callable[..., None]) -> None:
    """Register pruning strategies.

    Called once per plugin whenever the registry is (re)built, i.e. on the first lookup after the set
    of loaded plugins changed. Call ``register(StrategyClass)`` for each
    :class:`tokprune.PruningStrategy` subclass; its ``name`` must be unique across all plugins, or the
    lookup fails with :class:`tokprune.errors.StrategyNameClash` naming both plugins.
    """


@hookspec
def register_adapters(register: Callable[..., None]) -> None:
    """Register model adapters.

    Called once per plugin whenever the adapter registry is (re)built. Call ``register(FamilyClass)`` for
    each model family, a :class:`tokprune.adapters.Family` subclass (the public family protocol,
    docs/adapters.md "Adding a family"; any :class:`tokprune.adapters.ModelAdapter` subclass is accepted);
    its ``name`` (``[a-z][a-z0-9_]*``) must be
    unique across all plugins (else :class:`tokprune.errors.AdapterNameClash` naming both). ``patch``
    picks the one adapter whose ``matches(model)`` is true; several matching is an
    :class:`tokprune.errors.AmbiguousModelError` naming them.
    """


def _hook_names() -> list[str]:
    return [name for name, obj in globals().items() if callable(obj) and hasattr(obj, f"{PROJECT}_spec")]


HOOK_NAMES: list[str] = _hook_names()
"""Names of every hook in this contract (the plugin docs are tested against this list)."""
