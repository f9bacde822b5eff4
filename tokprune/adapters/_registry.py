"""The adapter registry, built from the ``register_adapters`` hook of every loaded plugin.

Held to the strategy registry's standard (:mod:`tokprune.registry`): names follow ``[a-z][a-z0-9_]*``;
a name registered twice is an error naming both plugins; a model two registered families both claim is
an error naming both (never the first in plugin order); every family records the plugin it came from.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .. import _plugins
from ..errors import AdapterNameClash, AmbiguousModelError, PluginError, UnsupportedModelError, did_you_mean
from ..strategy import NAME_PATTERN
from ._base import _WRAPPERS, ModelAdapter

__all__ = ["AdapterInfo", "adapter_registry", "describe_adapter", "pick_adapter", "registered_adapters"]


@dataclass(frozen=True)
class AdapterInfo:
    """One registered model family: its adapter class and the plugin that registered it."""

    name: str
    cls: type[ModelAdapter]
    source: _plugins.PluginSource

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


_cache: tuple[tuple[tuple[str, object], ...], dict[str, AdapterInfo]] | None = None


def _validate(cls: object, plugin: str) -> type[ModelAdapter]:
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise PluginError(f"plugin {plugin!r} registered {cls!r}, which is not a ModelAdapter subclass")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise PluginError(
            f"plugin {plugin!r} registered the abstract adapter {cls.__qualname__} (implement: {missing})"
        )
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise PluginError(
            f"plugin {plugin!r} registered the adapter {cls.__qualname__} with name {name!r}; an adapter name "
            "must match [a-z][a-z0-9_]* (e.g. 'llava_next')"
        )
    return cls


def adapter_registry() -> dict[str, AdapterInfo]:
    """Name -> :class:`AdapterInfo` for every adapter of every loaded plugin, in registration order
    (plugin name, then the order each plugin registers); rebuilt when the loaded plugins change."""
    global _cache
    key = _plugins.plugins_key()
    if _cache is not None and len(_cache[0]) == len(key) and all(a == b for a, b in zip(_cache[0], key)):
        return _cache[1]
    table: dict[str, AdapterInfo] = {}

    def register_for(plugin: str) -> Callable[[type[ModelAdapter]], None]:
        def register(cls: type[ModelAdapter]) -> None:
            cls = _validate(cls, plugin)
            source = _plugins.source_of(plugin)
            if cls.name in table:
                other = table[cls.name]
                raise AdapterNameClash(
                    f"adapter {cls.name!r} is registered by plugin {other.source} ({other.cls.__qualname__}) and by "
                    f"plugin {source} ({cls.__qualname__}); uninstall one or block it with "
                    f"{_plugins.BLOCK_ENV}={other.source.name} (or {_plugins.BLOCK_ENV}={source.name})"
                )
            table[cls.name] = AdapterInfo(cls.name, cls, source)

        return register

    _plugins.call_per_plugin("register_adapters", register_for)
    _cache = (key, table)
    return table


def registered_adapters() -> list[tuple[type[ModelAdapter], _plugins.PluginSource]]:
    """Adapter classes registered by every loaded plugin, in registration order, with their source."""
    return [(info.cls, info.source) for info in adapter_registry().values()]


def describe_adapter(name: str) -> AdapterInfo:
    """The registered family ``name``; :class:`~tokprune.errors.UnsupportedModelError` naming the valid ones."""
    table = adapter_registry()
    if name not in table:
        listing = ", ".join(f"{n} ({info.source.name})" for n, info in table.items()) or "none"
        raise UnsupportedModelError(f"unknown adapter {name!r}.{did_you_mean(name, table)} Registered: {listing}")
    return table[name]


def pick_adapter(model: nn.Module) -> type[ModelAdapter]:
    """The one registered adapter whose ``matches(model)`` is true.

    Raises :class:`~tokprune.errors.UnsupportedModelError` when none does (with each family's reason) and
    :class:`~tokprune.errors.AmbiguousModelError` when several do, naming them and their plugins.
    """
    table = adapter_registry()
    if not table:
        raise UnsupportedModelError(
            f"no model adapter is registered, so {type(model).__name__} cannot be patched; "
            f"reinstall tokprune (pip install -e .) or check {_plugins.LOAD_ENV}/{_plugins.BLOCK_ENV}"
        )
    matching = [info for info in table.values() if info.cls.matches(model)]
    if len(matching) == 1:
        return matching[0].cls
    if matching:
        names = " and ".join(f"{info.name!r} (plugin {info.source})" for info in matching)
        raise AmbiguousModelError(
            f"{type(model).__name__} is matched by the adapters {names}; make their matches() exclusive, block one "
            f"plugin with {_plugins.BLOCK_ENV}, or choose with tokprune.patch(model, spec, adapter=...)"
        )
    reasons = "; ".join(f"{info.name} ({info.source.name}): {info.cls.mismatch(model)}" for info in table.values())
    inner = _WRAPPERS.get(type(model).__name__)
    if inner is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is a wrapper around the model; patch the model inside it "
            f"(tokprune.patch(wrapped.{inner}, ...)), before wrapping it if you can ({reasons})"
        )
    raise UnsupportedModelError(f"no registered adapter understands {type(model).__name__}: {reasons}")
