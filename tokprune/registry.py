"""The strategy registry, built from the ``register_strategies`` hook of every loaded plugin."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _plugins
from .errors import PluginError, StrategyNameClash, StrategyParamError, UnknownStrategyError, did_you_mean
from .params import ParamInfo, format_value, param_infos
from .pipeline import Pipeline
from .spec import parse_spec
from .strategy import PruningStrategy, Stage, TokenRole, droppable_roles

__all__ = ["StrategyInfo", "available", "describe", "get", "registry"]


@dataclass(frozen=True)
class StrategyInfo:
    """Everything known about one registered strategy."""

    name: str
    cls: type[PruningStrategy]
    stage: Stage
    params: tuple[ParamInfo, ...]
    doc: str
    source: _plugins.PluginSource

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def __str__(self) -> str:
        lines = [
            f"{self.name}  (stage: {self.stage.value}; from plugin {self.source})",
            f"  {self.summary}",
        ]
        if self.cls.stage is Stage.LLM:
            names = {TokenRole.IMAGE: "image", TokenRole.QUESTION: "question text", TokenRole.TEMPLATE: "template"}
            dropped = [names[r] for r in sorted(droppable_roles(self.cls))]
            lines.append(f"  may drop: {', '.join(dropped)}")
        lines.append("  parameters:" if self.params else "  parameters: none")
        for p in self.params:
            constraint = p.constraint()
            extra = f"; {constraint}" if constraint and p.choices is None else ""
            lines.append(f"    {p.name}: {p.type} = {format_value(p.default)}{extra}  -- {p.doc}")
        return "\n".join(lines)


_cache: tuple[tuple[tuple[str, object], ...], dict[str, StrategyInfo]] | None = None


def _validate(cls: Any, plugin: str) -> None:
    if not (inspect.isclass(cls) and issubclass(cls, PruningStrategy)):
        raise PluginError(f"plugin {plugin!r} registered {cls!r}, which is not a PruningStrategy subclass")
    if inspect.isabstract(cls):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        raise PluginError(f"plugin {plugin!r} registered abstract {cls.__qualname__} (implement: {missing})")
    if "name" not in vars(cls) and not hasattr(cls, "name"):
        raise PluginError(f"plugin {plugin!r} registered {cls.__qualname__} without a 'name'")


def _same_plugins(a: tuple[tuple[str, object], ...], b: tuple[tuple[str, object], ...]) -> bool:
    return len(a) == len(b) and all(na == nb and pa is pb for (na, pa), (nb, pb) in zip(a, b))


def registry() -> dict[str, StrategyInfo]:
    """Name -> :class:`StrategyInfo` for every strategy of every loaded plugin (rebuilt when plugins change)."""
    global _cache
    key = _plugins.plugins_key()
    if _cache is not None and _same_plugins(_cache[0], key):
        return _cache[1]
    table: dict[str, StrategyInfo] = {}

    def register_for(plugin: str):  # noqa: ANN202 - internal closure factory
        def register(cls: type[PruningStrategy]) -> None:
            _validate(cls, plugin)
            source = _plugins.source_of(plugin)
            if cls.name in table:
                other = table[cls.name].source
                raise StrategyNameClash(
                    f"strategy {cls.name!r} is registered by plugin {other} and by plugin {source}; "
                    f"uninstall one or block it with {_plugins.BLOCK_ENV}={other.name} "
                    f"(or {_plugins.BLOCK_ENV}={source.name})"
                )
            table[cls.name] = StrategyInfo(
                cls.name, cls, cls.stage, tuple(param_infos(cls.Params)), inspect.getdoc(cls) or "", source
            )

        return register

    _plugins.call_per_plugin("register_strategies", register_for)
    _cache = (key, table)
    return table


def available(pattern: str = "*", stage: Stage | str | None = None) -> list[str]:
    """Sorted names of registered strategies matching the fnmatch ``pattern`` (and ``stage``)."""
    wanted = Stage(stage) if stage is not None else None
    return sorted(
        name
        for name, info in registry().items()
        if fnmatch.fnmatchcase(name, pattern) and (wanted is None or info.stage is wanted)
    )


def _unknown(name: str, spec: str | None = None) -> UnknownStrategyError:
    table = registry()
    where = f" in {spec!r}" if spec and spec != name else ""
    if not table:
        return UnknownStrategyError(
            f"unknown strategy {name!r}{where}: no strategies are registered; reinstall tokprune "
            f"(pip install -e .) or check {_plugins.LOAD_ENV}/{_plugins.BLOCK_ENV}"
        )
    listing = ", ".join(f"{n} ({table[n].source.name})" for n in sorted(table))
    return UnknownStrategyError(f"unknown strategy {name!r}{where}.{did_you_mean(name, table)} Registered: {listing}")


def describe(name: str) -> StrategyInfo:
    """Stage, parameters (defaults, types, docs), source plugin and version of one strategy."""
    table = registry()
    if name not in table:
        raise _unknown(name)
    return table[name]


def _instantiate(name: str, params: Mapping[str, Any], spec: str | None = None) -> PruningStrategy:
    table = registry()
    if name not in table:
        raise _unknown(name, spec)
    return table[name].cls(dict(params))


def _terms_from(spec: Any) -> list[tuple[str, dict[str, Any]]]:
    """Normalise every accepted spec form to ``[(name, params), ...]``."""
    try:  # omegaconf nodes (DictConfig/ListConfig) become plain containers
        from omegaconf import OmegaConf

        if OmegaConf.is_config(spec):
            spec = OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(spec, str):
        if spec.strip() == "none":
            return []
        return [(t.name, t.params) for t in parse_spec(spec)]
    if isinstance(spec, PruningStrategy):
        return [(spec.name, _params_dict(spec))]
    if isinstance(spec, Pipeline):
        return [(s.name, _params_dict(s)) for s in spec]
    if isinstance(spec, Mapping):
        spec = [spec]
    if isinstance(spec, Sequence):
        out: list[tuple[str, dict[str, Any]]] = []
        for i, item in enumerate(spec):
            if isinstance(item, (str, PruningStrategy, Pipeline)):
                out.extend(_terms_from(item))
            elif isinstance(item, Mapping):
                if "name" not in item:
                    raise StrategyParamError(
                        f"pipeline entry {i} {dict(item)!r} has no 'name' key; write {{name: <strategy>, <param>: ...}}"
                    )
                params = {k: v for k, v in item.items() if k != "name"}
                out.append((str(item["name"]), params))
            else:
                raise StrategyParamError(
                    f"pipeline entry {i} must be a spec string or a {{name: ..., <param>: ...}} mapping, "
                    f"got {type(item).__name__}"
                )
        return out
    raise StrategyParamError(
        f"a spec must be a string, a mapping, a list of mappings, a PruningStrategy or a Pipeline; got {type(spec).__name__}"
    )


def _params_dict(strategy: PruningStrategy) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(strategy.params)


def get(spec: Any, /, **overrides: Any) -> Pipeline:
    """Build a validated :class:`Pipeline` from a spec.

    ``spec`` is a string (``"cls_knee+text_interact"``, ``"fastv(layer=2, keep_ratio=0.5)"``, ``"none"``),
    a ``{name: ..., <param>: ...}`` mapping, a list of those (plain or omegaconf), a strategy or a pipeline.

    ``overrides`` set parameters after the spec's own: ``get("fastv", layer=3)``. With several terms, key
    them by strategy name (``get("cls_knee+fastv", fastv={"layer": 3})``) or use a parameter name only
    one term has.
    """
    text = spec if isinstance(spec, str) else None
    terms = _terms_from(spec)
    table = registry()
    for name, _ in terms:
        if name not in table:
            raise _unknown(name, text)
    seen: set[str] = set()
    for name, _ in terms:
        if name in seen:
            raise StrategyParamError(f"strategy {name!r} appears twice in {text or spec!r}; use it once per pipeline")
        seen.add(name)
    terms = [(name, dict(params)) for name, params in terms]
    names = [name for name, _ in terms]
    for key, value in overrides.items():
        if key in names and isinstance(value, Mapping):
            terms[names.index(key)][1].update(value)
            continue
        owners = [i for i, (name, _) in enumerate(terms) if key in {p.name for p in table[name].params}]
        if len(owners) == 1 or (len(terms) == 1 and not owners):
            # A single term gets unknown keys too, so the error names the strategy and its valid params.
            terms[owners[0] if owners else 0][1][key] = value
        elif not owners:
            raise StrategyParamError(
                f"override {key!r} matches no parameter of {', '.join(names) or 'the empty pipeline'}; "
                f"key per-strategy overrides by name, e.g. {names[0] if names else 'fastv'}={{...}}"
            )
        else:
            raise StrategyParamError(
                f"override {key!r} is ambiguous: {', '.join(names[i] for i in owners)} all have it; "
                f"write e.g. {names[owners[0]]}={{{key!r}: {value!r}}}"
            )
    return Pipeline([_instantiate(name, params, text) for name, params in terms])
