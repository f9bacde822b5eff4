"""The ``tokprune`` command: ``list``, ``describe NAME``, ``adapters``, ``plugins`` and ``run`` (ablation studies)."""

from __future__ import annotations

import argparse
import io
import os
import sys
import traceback
from collections.abc import Sequence

from . import _plugins, strategies
from .errors import TokpruneError


def _cmd_list(args: argparse.Namespace) -> int:
    names = strategies.available(args.pattern)
    if not names:
        if not strategies.available():
            print(
                f"no strategies are registered: check {_plugins.LOAD_ENV}={os.environ.get(_plugins.LOAD_ENV)!r} "
                f"and {_plugins.BLOCK_ENV}={os.environ.get(_plugins.BLOCK_ENV)!r}, or reinstall tokprune",
                file=sys.stderr,
            )
        else:
            print(f"no strategies match {args.pattern!r}; registered: {', '.join(strategies.available())}", file=sys.stderr)
        return 1
    rows = []
    for name in names:
        info = strategies.describe(name)
        source = info.source
        origin = f"{source.name} ({source.distribution} {source.version})" if source.distribution else source.name
        rows.append((name, info.stage.value, origin, info.summary))
    header = ("name", "stage", "source", "summary")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    print(strategies.describe(args.name))
    return 0


def _cmd_adapters(args: argparse.Namespace) -> int:
    """The registered model families, and whether each works with the installed transformers."""
    from . import hf_compat as hf
    from .adapters import registered_adapters

    found = registered_adapters()
    if not found:
        print(f"no adapters are registered: check {_plugins.LOAD_ENV}/{_plugins.BLOCK_ENV}, or reinstall tokprune")
        return 1
    installed = hf.transformers_version()
    rows = []
    for cls, source in found:
        minimum = cls.min_transformers or hf.TESTED_MIN
        # "tested": the installed release is in the range CI tests (hf_compat.TESTED_RANGE, pyproject's cap)
        works = "yes, tested" if hf.in_tested_range() else f"yes, untested ({installed})"
        status = f">= {minimum}: " + (f"no ({installed} installed)" if hf.older_than(minimum) else works)
        origin = f"{source.name} ({source.distribution} {source.version})" if source.distribution else source.name
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append((cls.name, origin, status, ",".join(cls.budget_scopes), summary))
    header = ("name", "source", "transformers", "budget_scope", "model")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _registrations(hook: str) -> dict[str, list[str]]:
    """Plugin name -> names of what its ``hook`` registered, read without validation, so a clash or a
    broken registration still shows who registered what."""
    found: dict[str, list[str]] = {}

    def register_for(plugin: str):  # noqa: ANN202 - internal closure factory
        def register(obj: object, *_: object, **__: object) -> None:
            label = getattr(obj, "name", None) or getattr(obj, "__qualname__", None) or repr(obj)
            found.setdefault(plugin, []).append(str(label))

        return register

    _plugins.call_per_plugin(hook, register_for)
    return found


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import registry

    loaded = _plugins.loaded_plugins()
    if not loaded:
        print(f"no plugins loaded (check {_plugins.LOAD_ENV}/{_plugins.BLOCK_ENV}, or reinstall: pip install -e .)")
        return 1
    registered = {hook: _registrations(hook) for hook in ("register_strategies", "register_adapters")}
    owners: dict[str, list[str]] = {}
    for plugin, names in registered["register_strategies"].items():
        for name in names:
            owners.setdefault(name, []).append(plugin)
    for source in loaded:
        version = f"{source.distribution} {source.version}" if source.distribution else "in-process"
        print(f"{source.name}  ({version})")
        names = sorted(registered["register_strategies"].get(source.name, []))
        marked = [
            f"{n} (clash: also {', '.join(p for p in owners[n] if p != source.name)})" if len(owners[n]) > 1 else n
            for n in names
        ]
        print(f"  strategies: {', '.join(marked) if marked else '-'}")
        adapters = sorted(registered["register_adapters"].get(source.name, []))
        print(f"  adapters: {', '.join(adapters) if adapters else '-'}")
    registry()  # a clash raises StrategyNameClash here: reported by main() with the fix, exit status 2
    return 0


def _cmd_run(argv: Sequence[str]) -> int:
    from .ablation.cli import main as run_main

    return run_main(list(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokprune",
        description=__doc__,
        epilog=f"--debug (anywhere on the command line) or {DEBUG_ENV}=1: show the traceback of every error.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="registered strategies with stage and source")
    p_list.add_argument("pattern", nargs="?", default="*", help="fnmatch filter, e.g. 'cls_*'")
    p_list.set_defaults(func=_cmd_list)
    p_desc = sub.add_parser("describe", help="one strategy's parameters, stage and source")
    p_desc.add_argument("name")
    p_desc.set_defaults(func=_cmd_describe)
    p_adapt = sub.add_parser("adapters", help="registered model families and whether the installed transformers runs them")
    p_adapt.set_defaults(func=_cmd_adapters)
    p_plug = sub.add_parser("plugins", help="loaded plugins, their versions and what each registered")
    p_plug.set_defaults(func=_cmd_plugins)
    sub.add_parser("run", help="run an ablation study (tokprune run --help)", add_help=False)
    return parser


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "run":
        return _cmd_run(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Expected failures (config, data, model loading, output: every :class:`TokpruneError`)
    end in one line and exit status 2; anything else is a bug, shown as one line with how to see its
    traceback (``--debug`` or ``TOKPRUNE_DEBUG=1``), exit status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _tolerant_streams()
    try:
        return _dispatch(argv)
    except TokpruneError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()  # the reader went away (`| head`): nothing left to say
        return 141
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            print(
                f"internal error: {type(exc).__name__}: {exc}\n"
                f"(a bug in tokprune or a plugin: rerun with --debug or {DEBUG_ENV}=1 to see the traceback, "
                "and please report it)",
                file=sys.stderr,
            )
        return 1


#: Set (to anything but 0) to print the traceback of every error, like ``--debug``.
DEBUG_ENV = "TOKPRUNE_DEBUG"


def _tolerant_streams() -> None:
    """On a stdout/stderr that cannot encode every character (``PYTHONIOENCODING=ascii``, a C locale),
    print what it cannot as ``?`` instead of failing after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if isinstance(stream, io.TextIOWrapper) and not encoding.startswith("utf"):
            stream.reconfigure(errors="replace")


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


if __name__ == "__main__":
    sys.exit(main())
