"""What a wheel of tokprune carries: every module and data file of the source tree.

An editable install (``pip install -e .``, every CI leg but ``v``) imports straight from the tree; only a wheel
(``pip install tokprune`` from an index, or ``pip install .``) applies pyproject's package list. A subpackage
missing from that list passes every test of an editable install and fails a user's:
``tokprune.integrations.vllm_families`` was missing, so the vLLM plugin of a wheel install broke at its first
import. These tests read the list the wheel is built from, in every leg, without building one.
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info < (3, 11):
    pytest.skip("tomllib arrived in Python 3.11", allow_module_level=True)
import tomllib  # noqa: E402


def setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def source_dir(package: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools takes ``package`` from (``package-dir`` maps a top-level name to a folder)."""
    top, *rest = package.split(".")
    return ROOT.joinpath(package_dir.get(top, top), *rest)


def python_packages(folder: Path) -> set[Path]:
    """Every folder under ``folder`` (itself included) that holds a module, outside caches."""
    return {path.parent for path in folder.rglob("*.py") if "__pycache__" not in path.parts}


def test_every_folder_with_modules_is_a_declared_package():
    table = setuptools_table()
    declared = {source_dir(name, table.get("package-dir", {})) for name in table["packages"]}
    in_tree = python_packages(ROOT / "tokprune") | python_packages(ROOT / "strategies")
    missing = sorted(str(path.relative_to(ROOT)) for path in in_tree - declared)
    assert not missing, (
        f"folders with modules that a wheel would leave out (add them to pyproject's packages): {missing}"
    )
    absent = sorted(str(path.relative_to(ROOT)) for path in declared - in_tree)
    assert not absent, f"pyproject declares packages with no modules: {absent}"


def test_every_data_file_is_matched_by_package_data():
    """The shipped checkpoint and its tokenizer, templates and model card must travel in the wheel too."""
    table = setuptools_table()
    package_dir, patterns = table.get("package-dir", {}), table.get("package-data", {})
    folders = {source_dir(name, package_dir): name for name in table["packages"]}
    unmatched = []
    for top in ("tokprune", "strategies"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_dir() or path.suffix in {".py", ".pyc"} or "__pycache__" in path.parts:
                continue
            owner = next(parent for parent in path.parents if parent in folders)  # the package it ships with
            relative = path.relative_to(owner).as_posix()
            globs = patterns.get(folders[owner], [])
            if not any(fnmatch.fnmatch(relative, g) or fnmatch.fnmatch(relative, g.removeprefix("**/")) for g in globs):
                unmatched.append(str(path.relative_to(ROOT)))
    assert not unmatched, f"data files no package-data pattern ships: {unmatched}"
