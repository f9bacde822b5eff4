"""Typed strategy parameters: declare them as a frozen dataclass with :func:`param` fields.

A parameter annotated ``tuple[X, ...]`` is a *schedule* (one value per step, e.g. PyramidDrop's layers);
the spec grammar writes it in parentheses, ``layer=(8, 16, 24)``, so it never reads as a sweep (brackets).

The dataclass is the single source of truth for the spec grammar, ``describe()``, the CLI and the
ablation configs. Values are validated on construction: unknown names, wrong types and out-of-range
values raise :class:`~tokprune.errors.StrategyParamError` naming the strategy, the parameter, the bad
value and what is allowed. Nothing is clamped silently.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from .errors import PluginError, StrategyParamError, did_you_mean

__all__ = ["NoParams", "ParamInfo", "build_params", "format_value", "param", "param_infos"]

_BOUNDS = ("ge", "gt", "le", "lt")


def param(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with a one-line doc and optional inclusive (ge/le) or exclusive (gt/lt) bounds."""
    meta = {"doc": doc, **{k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class NoParams:
    """For strategies without parameters."""


@dataclass(frozen=True)
class ParamInfo:
    """What ``describe()`` reports about one parameter."""

    name: str
    type: str
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    bounds: tuple[tuple[str, float], ...] = ()

    def constraint(self) -> str:
        """Human-readable allowed values, e.g. ``"one of: last, question"`` or ``"> 0, <= 1"``."""
        if self.choices is not None:
            return "one of: " + ", ".join(format_value(c) for c in self.choices)
        ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        return ", ".join(f"{ops[k]} {format_value(v)}" for k, v in self.bounds)


def _hints(params_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(params_cls)


def _schedule_item(tp: Any) -> Any:
    """``X`` for a schedule annotation ``tuple[X, ...]``, else None."""
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        raise PluginError(f"unsupported tuple annotation {tp!r}: schedules are tuple[X, ...]")
    return None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    item = _schedule_item(tp)
    if item is not None:
        return f"({_type_name(item)}, ...)"
    if origin is Literal:
        return "{" + ", ".join(format_value(a) for a in get_args(tp)) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _choices(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (Union, types.UnionType):
        for arg in get_args(tp):
            if get_origin(arg) is Literal:
                return get_args(arg)
    return None


def param_infos(params_cls: type) -> list[ParamInfo]:
    """Describe every field of a Params dataclass, in declaration order."""
    hints = _hints(params_cls)
    infos = []
    for f in dataclasses.fields(params_cls):
        tp = hints[f.name]
        bounds = tuple((k, f.metadata[k]) for k in _BOUNDS if k in f.metadata)
        infos.append(ParamInfo(f.name, _type_name(tp), f.default, f.metadata.get("doc", ""), _choices(tp), bounds))
    return infos


class _Reject(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Convert ``value`` to annotation ``tp`` or raise :class:`_Reject`. Lossy conversions are rejected."""
    origin = get_origin(tp)
    item = _schedule_item(tp)
    if item is not None:
        # a schedule: a tuple (spec ``(a, b)``) of items; one plain value is a schedule of one step
        values = value if isinstance(value, tuple) else (value,)
        if not values:
            raise _Reject
        return tuple(_coerce(v, item) for v in values)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        # Try exact-type members first so 3 stays an int in ``int | float``.
        for arg in sorted(args, key=lambda a: 0 if isinstance(value, a if isinstance(a, type) else ()) else 1):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Reject:
                continue
        raise _Reject
    if origin is Literal:
        # ``True == 1``: compare type and value so a bool never matches an int choice.
        for choice in get_args(tp):
            if type(choice) is type(value) and choice == value:
                return choice
        raise _Reject
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Reject
    if tp is int:
        if isinstance(value, bool):
            raise _Reject
        if isinstance(value, int):
            return value
        raise _Reject
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Reject
        if isinstance(value, float) and math.isnan(value):
            raise _Reject
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Reject
    if tp is Any:
        return value
    raise PluginError(f"unsupported parameter annotation {tp!r}: use bool, int, float, str, Literal or X | None")


def _check_bounds(owner: str, f: dataclasses.Field, value: Any) -> None:
    if isinstance(value, tuple):  # a schedule: every step obeys the bounds
        for item in value:
            _check_bounds(owner, f, item)
        return
    if value is None or isinstance(value, (bool, str)):
        return
    ops = {"ge": (">=", value.__ge__), "gt": (">", value.__gt__), "le": ("<=", value.__le__), "lt": ("<", value.__lt__)}
    bounds = [(k, f.metadata[k]) for k in _BOUNDS if k in f.metadata]
    for key, bound in bounds:
        symbol, holds = ops[key]
        if holds(bound) is not True:
            allowed = ", ".join(f"{ops[k][0]} {format_value(b)}" for k, b in bounds)
            raise StrategyParamError(
                f"{owner}.{f.name} must be {symbol} {format_value(bound)}, got {format_value(value)}"
                f" (allowed: {allowed})"
            )


def param_type(params_cls: type, key: str) -> str:
    """The type name ``describe()`` shows for parameter ``key``."""
    return next(i.type for i in param_infos(params_cls) if i.name == key)


def _valid_list(params_cls: type) -> str:
    return ", ".join(f"{i.name}={format_value(i.default)}" for i in param_infos(params_cls))


def build_params(owner: str, params_cls: type, base: Any = None, overrides: dict[str, Any] | None = None) -> Any:
    """Instantiate ``params_cls`` from ``base`` (an instance, a mapping or None) plus ``overrides``.

    Raises :class:`StrategyParamError` for unknown names, wrong types and out-of-range values.
    """
    values: dict[str, Any] = {}
    if base is None:
        pass
    elif isinstance(base, params_cls):
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(params_cls)}
    elif isinstance(base, dict):
        values = dict(base)
    else:
        raise StrategyParamError(
            f"{owner}: parameters must be a {params_cls.__name__} or a mapping, got {type(base).__name__}"
        )
    values.update(overrides or {})
    hints = _hints(params_cls)
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    for key, value in values.items():
        if key not in fields:
            valid = _valid_list(params_cls) or "(none)"
            raise StrategyParamError(f"{owner}: unknown parameter {key!r}.{did_you_mean(key, fields)} Valid: {valid}")
        if isinstance(value, list):
            raise StrategyParamError(
                f"{owner}.{key} got a list {format_value(value)}; lists are sweeps: expand them "
                "with tokprune.spec.expand_sweeps() or in an ablation config (a schedule is a tuple: "
                f"{format_value(tuple(value))})"
            )
        try:
            values[key] = _coerce(value, hints[key])
        except _Reject:
            if isinstance(value, tuple) and _schedule_item(hints[key]) is None:
                raise StrategyParamError(
                    f"{owner}.{key} got a schedule {format_value(value)}, but {key} takes one {param_type(params_cls, key)}"
                ) from None
            info = next(i for i in param_infos(params_cls) if i.name == key)
            allowed = info.constraint() or info.type
            raise StrategyParamError(
                f"{owner}.{key} must be {info.type}, got {format_value(value)} ({type(value).__name__})"
                + (f"; allowed: {allowed}" if info.choices is not None else "")
                + (
                    did_you_mean(value, [str(c) for c in info.choices])
                    if info.choices and isinstance(value, str)
                    else ""
                )
            ) from None
        _check_bounds(owner, fields[key], values[key])
    try:
        return params_cls(**values)
    except (ValueError, TypeError) as exc:
        raise StrategyParamError(f"{owner}: {exc}") from None


_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_RESERVED_WORDS = {"true", "false", "none", "null", "True", "False", "None"}


def format_value(value: Any) -> str:
    """Canonical spec literal for a parameter value (parses back to the same value)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if _BARE.match(value) and value not in _RESERVED_WORDS:
            return value
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):  # a schedule: parentheses, never brackets (brackets are sweeps)
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return repr(value)
