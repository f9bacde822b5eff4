"""The plugin manager: loads the ``tokprune`` entry-point group, honouring the load/block env vars.

``TOKPRUNE_PLUGINS``        comma-separated allow-list of plugin names (entry-point names or
                            distribution names). Set but empty: load no plugin at all, not even the
                            built-ins (they arrive through the same entry-point group).
``TOKPRUNE_BLOCK_PLUGINS``  comma-separated block-list, applied after the allow-list.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from dataclasses import dataclass

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "tokprune"
LOAD_ENV = "TOKPRUNE_PLUGINS"
BLOCK_ENV = "TOKPRUNE_BLOCK_PLUGINS"

pm = pluggy.PluginManager(hookspecs.PROJECT)
pm.add_hookspecs(hookspecs)


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin came from, for error messages, ``tokprune plugins`` and results files."""

    name: str
    distribution: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        if self.distribution:
            return f"{self.name!r} ({self.distribution} {self.version})"
        return repr(self.name)


_sources: dict[str, PluginSource] = {}
_loaded_key: tuple[str | None, str | None] | None = None


#: Former plugin names -> current ones: still honoured in the env vars, with a warning (timm's habit).
RENAMED: dict[str, str] = {"llava": "builtin_families"}


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    names = {item.strip() for item in raw.split(",") if item.strip()}
    for old in sorted(names & RENAMED.keys()):
        warnings.warn(
            f"{var}: the plugin {old!r} is now called {RENAMED[old]!r}; write {RENAMED[old]!r}",
            FutureWarning,
            stacklevel=3,
        )
        names = (names - {old}) | {RENAMED[old]}
    return names


def _entry_points() -> list[tuple[md.EntryPoint, md.Distribution | None]]:
    found = []
    for dist in md.distributions():
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                found.append((ep, dist))
    # Deterministic order regardless of sys.path order: registry build order must not change results.
    return sorted(found, key=lambda pair: pair[0].name)


def load_plugins() -> None:
    """Load (once per env-var setting) every allowed plugin in the ``tokprune`` entry-point group."""
    global _loaded_key
    key = (os.environ.get(LOAD_ENV), os.environ.get(BLOCK_ENV))
    if _loaded_key == key:
        return
    allow, block = _env_list(LOAD_ENV), _env_list(BLOCK_ENV) or set()
    # Changing the env vars between calls (tests do) must unload what is no longer allowed.
    for name in [n for n in list(_sources) if _sources[n].distribution is not None]:
        plugin = pm.get_plugin(name)
        if plugin is not None:
            pm.unregister(plugin, name=name)
        del _sources[name]
    seen: set[str] = set()
    for ep, dist in _entry_points():
        dist_name = dist.metadata["Name"] if dist is not None else None
        if ep.name in seen:  # the same distribution visible twice on sys.path
            continue
        names = {ep.name, dist_name or ""}
        if allow is not None and not names & allow:
            continue
        if names & block:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        pm.register(ep.load(), name=ep.name)
        seen.add(ep.name)
        _sources[ep.name] = PluginSource(ep.name, dist_name, dist.version if dist is not None else None)
    pm.check_pending()
    _loaded_key = key


def source_of(plugin_name: str) -> PluginSource:
    """Provenance of a registered plugin (entry-point plugins carry their distribution and version)."""
    return _sources.get(plugin_name, PluginSource(plugin_name))


def loaded_plugins() -> list[PluginSource]:
    """Every plugin currently registered with the manager, entry-point or in-process."""
    load_plugins()
    return [source_of(name) for name, _ in sorted(pm.list_name_plugin(), key=lambda p: p[0])]


def call_per_plugin(hook_name: str, register_for: object) -> None:
    """Call ``hook_name`` on each plugin separately so every registration is attributed to its plugin.

    ``register_for(plugin_name)`` returns the ``register`` callback handed to that plugin.
    """
    load_plugins()
    caller = getattr(pm.hook, hook_name)
    for impl in sorted(caller.get_hookimpls(), key=lambda i: i.plugin_name):
        kwargs = {"register": register_for(impl.plugin_name)}  # type: ignore[operator]
        impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})


def plugins_key() -> tuple[tuple[str, object], ...]:
    """Changes whenever a plugin is registered or unregistered (registry caches key on it).

    The plugin objects themselves are in the key, compared by identity: a cache holding the key keeps
    them alive, so a plugin registered later under the same name can never pass for an unregistered
    one (an ``id()`` alone can be reused once the old module is garbage collected).
    """
    load_plugins()
    return tuple(sorted(((name, plugin) for name, plugin in pm.list_name_plugin()), key=lambda item: item[0]))
