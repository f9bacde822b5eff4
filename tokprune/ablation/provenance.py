"""Where a run's numbers came from: the adapter that patched the model (and its plugin), and the versions of
the stack and of every plugin that provided a strategy. Recorded in every results row."""

from __future__ import annotations

import platform
from typing import Any

import torch

__all__ = ["adapter_source", "versions"]


def adapter_source(model: Any) -> dict[str, Any] | None:
    """The adapter that patches ``model`` (or would) and the plugin it came from."""
    from ..adapters import adapter_registry, handle_of, pick_adapter
    from ..errors import UnsupportedModelError

    handle = handle_of(model)
    try:
        cls = type(handle) if handle is not None else pick_adapter(model)
    except UnsupportedModelError:
        return None
    for info in adapter_registry().values():
        if info.cls is cls:
            src = info.source
            return {"name": cls.name, "plugin": src.name, "distribution": src.distribution, "version": src.version}
    return {"name": cls.name, "plugin": None, "distribution": None, "version": None}


def versions(pipeline: Any) -> dict[str, Any]:
    """Versions of the stack and of every plugin that provided a strategy of ``pipeline``."""
    from importlib.metadata import version

    import transformers

    from ..registry import registry

    table = registry()
    plugins = {}
    for step in pipeline:
        src = table[step.name].source
        plugins[src.name] = {"distribution": src.distribution, "version": src.version, "strategies": []}
    for step in pipeline:
        plugins[table[step.name].source.name]["strategies"].append(step.name)
    return {
        "tokprune": version("tokprune"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "plugins": plugins,
    }
