"""The plugin author's kit: docs/plugins.md is complete and its minimal plugin works exactly as written."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import inspect
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from tokprune import cli, hookspecs, strategies
from tokprune._plugins import BLOCK_ENV, LOAD_ENV, pm
from tokprune.errors import StrategyNameClash
from tokprune.testing.contract import check_strategy

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PLUGINS_MD = DOCS / "plugins.md"
FENCE = re.compile(r"^```(\w+)[ \t]+file=(\S+)\n(.*?)^```$", re.S | re.M)


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a markdown text."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/plugins.md has no '## {heading}' section"
    return match.group(1)


def doc_files() -> dict[str, str]:
    """Files of the minimal plugin, extracted verbatim from the fenced blocks marked ``file=NAME``."""
    return {name: body for _, name, body in FENCE.findall(PLUGINS_MD.read_text())}


# -- the hook reference -----------------------------------------------------------------------------


def hook_signature(name: str) -> str:
    params = inspect.signature(getattr(hookspecs, name)).parameters
    return f"{name}({', '.join(params)})"


@pytest.mark.parametrize("hook", hookspecs.HOOK_NAMES)
def test_every_hook_is_documented_with_its_signature_and_when_it_is_called(hook):
    reference = section(PLUGINS_MD.read_text(), "Hook reference")
    entry = re.search(rf"^### `{re.escape(hook_signature(hook))}`\n(.*?)(?=^### |\Z)", reference, re.S | re.M)
    assert entry, f"docs/plugins.md documents no '### `{hook_signature(hook)}`' under '## Hook reference'"
    assert "When it is called" in entry.group(1), f"docs/plugins.md: {hook} does not say when it is called"


def test_no_documented_hook_is_stale():
    reference = section(PLUGINS_MD.read_text(), "Hook reference")
    documented = re.findall(r"^### `(\w+)\(", reference, re.M)
    assert documented and set(documented) <= set(hookspecs.HOOK_NAMES), f"stale hooks: {documented}"


def test_the_hook_list_is_the_contract():
    assert set(hookspecs.HOOK_NAMES) == {"register_strategies", "register_adapters"}


# -- the minimal plugin, verbatim ------------------------------------------------------------------


def test_the_minimal_plugin_is_two_short_files():
    files = doc_files()
    assert sorted(files) == ["pyproject.toml", "tokprune_strided.py"]
    lines = sum(1 for body in files.values() for line in body.splitlines() if line.strip())
    assert lines <= 30, f"the minimal plugin has {lines} non-blank lines; keep it under about 30"


def test_the_minimal_plugins_pyproject_declares_the_entry_point():
    project = tomllib.loads(doc_files()["pyproject.toml"])["project"]
    assert project["entry-points"]["tokprune"] == {"strided": "tokprune_strided"}
    assert "tokprune" in project["dependencies"]


def load_doc_module(tmp_path: Path) -> types.ModuleType:
    for name, body in doc_files().items():
        (tmp_path / name).write_text(body)
    spec = importlib.util.spec_from_file_location("tokprune_strided", tmp_path / "tokprune_strided.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def registered(module: types.ModuleType, name: str):
    pm.register(module, name=name)
    try:
        yield module
    finally:
        pm.unregister(module, name=name)


@pytest.fixture
def strided(tmp_path):
    """The docs' plugin module, registered in-process under its entry-point name for one test."""
    with registered(load_doc_module(tmp_path), "strided") as module:
        yield module


def test_the_minimal_plugin_registers_and_passes_the_contract_suite(strided):
    assert "strided" in strategies.available()
    info = strategies.describe("strided")
    assert info.source.name == "strided"
    assert info.summary.startswith("Keep every ``step``-th patch")
    assert str(strategies.get("strided(step=2)+fastv")).startswith("strided(step=2)+fastv(")
    check_strategy("strided")
    check_strategy("strided(step=1)")
    check_strategy("strided(step=1000)")


def test_the_docs_testing_example_runs_as_written(strided):
    block = re.search(r"## Testing your plugin.*?```python\n(.*?)^```", PLUGINS_MD.read_text(), re.S | re.M)
    namespace: dict = {}
    exec(compile(block.group(1), "docs/plugins.md", "exec"), namespace)  # noqa: S102 - our own docs
    namespace["test_contract_all_at_once"]()
    for _, strategy, check in namespace["contract_cases"](namespace["SPECS"]):
        namespace["test_contract"](strategy, check)
    for spec in ["strided(step=2)", "strided(step=3)+fastv(layer=2, keep_ratio=0.5)"]:
        namespace["test_inside_a_patched_model"](spec)


@pytest.mark.slow
def test_the_minimal_plugin_builds_a_wheel_with_the_entry_point(tmp_path):
    for name, body in doc_files().items():
        (tmp_path / name).write_text(body)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if result.returncode and "No module named" in result.stderr:
        pytest.skip(f"no build backend in this environment: {result.stderr.strip()[-200:]}")
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("tokprune_strided-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "tokprune_strided.py" in names
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "[tokprune]\nstrided = tokprune_strided" in entry_points


# -- tokprune plugins -----------------------------------------------------------------------------


def test_tokprune_plugins_lists_versions_and_registrations(strided, capsys, monkeypatch):
    monkeypatch.delenv(LOAD_ENV, raising=False)
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    version = md.version("tokprune")
    assert re.search(rf"^builtin  \(tokprune {re.escape(version)}\)\n  strategies: .*\bfastv\b", out, re.M)
    from tokprune.adapters import registered_adapters

    families = ", ".join(sorted(cls.name for cls, source in registered_adapters() if source.name == "builtin_families"))
    assert families and re.search(
        rf"^builtin_families  \(tokprune .*\)\n  strategies: -\n  adapters: {families}$", out, re.M
    )
    assert re.search(r"^strided  \(in-process\)\n  strategies: strided\n  adapters: -$", out, re.M)
    for dist, plugin in [("tokprune-visionzip", "visionzip"), ("tokprune-vtc-cls", "vtc_cls")]:
        with contextlib.suppress(md.PackageNotFoundError):
            assert f"{plugin}  ({dist} {md.version(dist)})\n  strategies: {plugin}\n" in out


def test_tokprune_plugins_shows_a_clash_then_reports_it(strided, tmp_path, capsys):
    (tmp_path / "twin").mkdir()
    twin = load_doc_module(tmp_path / "twin")  # a second copy registering the same strategy name
    with registered(twin, "strided_twin"):
        with pytest.raises(StrategyNameClash):
            strategies.available()
        assert cli.main(["plugins"]) == 2
    captured = capsys.readouterr()
    assert "strategies: strided (clash: also strided_twin)" in captured.out
    assert "uninstall one or block it with TOKPRUNE_BLOCK_PLUGINS=" in captured.err


def test_tokprune_plugins_with_an_empty_allow_list(capsys, monkeypatch):
    monkeypatch.setenv(LOAD_ENV, "")
    assert cli.main(["plugins"]) == 1
    assert "no plugins loaded" in capsys.readouterr().out


def test_tokprune_adapters_says_which_families_the_installed_transformers_runs(capsys, monkeypatch):
    from tokprune import hf_compat as hf
    from tokprune.adapters import registered_adapters

    monkeypatch.delenv(LOAD_ENV, raising=False)
    assert cli.main(["adapters"]) == 0
    out = capsys.readouterr().out
    for cls, _ in registered_adapters():
        minimum = cls.min_transformers or hf.TESTED_MIN
        works = "no" if hf.older_than(minimum) else "yes"
        line = next(line for line in out.splitlines() if line.startswith(f"{cls.name} "))
        assert f">= {minimum}: {works}" in line, line
        assert ",".join(cls.budget_scopes) in line
    assert re.search(r"^llava_next .* image,tile ", out, re.M)
    # a family whose minimum is above the installed release is reported as not runnable, naming the release
    from tokprune.adapters.qwen2_5_vl import Qwen2_5_VLAdapter

    monkeypatch.setattr(hf, "transformers_version", lambda: hf.TESTED_MIN)
    assert cli.main(["adapters"]) == 0
    out = capsys.readouterr().out
    qwen_min, floor = re.escape(Qwen2_5_VLAdapter.min_transformers), re.escape(hf.TESTED_MIN)
    assert re.search(rf"^qwen2_5_vl .*>= {qwen_min}: no \({floor} installed\)", out, re.M)
    assert re.search(rf"^llava .*>= {floor}: yes", out, re.M)


def test_tokprune_adapters_with_an_empty_allow_list(capsys, monkeypatch):
    monkeypatch.setenv(LOAD_ENV, "")
    assert cli.main(["adapters"]) == 1
    assert "no adapters are registered" in capsys.readouterr().out


# -- the example plugins in this repository are documented ----------------------------------------


def repo_plugins() -> list[tuple[Path, str, str]]:
    """``(folder, distribution, entry-point name)`` of every plugin package under plugins/."""
    found = []
    for pyproject in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        for ep_name in project.get("entry-points", {}).get("tokprune", {}):
            found.append((pyproject.parent, project["name"], ep_name))
    return found


@pytest.mark.parametrize(("folder", "dist", "plugin"), repo_plugins(), ids=[p[1] for p in repo_plugins()])
def test_each_repo_plugin_documents_its_strategies_and_params(folder, dist, plugin):
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed (pip install ./plugins/{folder.name})")
    readme = (folder / "README.md").read_text()
    names = [n for n in strategies.available() if strategies.describe(n).source.name == plugin]
    assert names, f"{dist} is installed but registered no strategy under plugin {plugin!r}"
    for name in names:
        assert f"`{name}`" in readme, f"{folder.name}/README.md does not name strategy `{name}`"
        for p in strategies.describe(name).params:
            assert f"`{p.name}`" in readme, f"{folder.name}/README.md does not document `{name}`'s `{p.name}`"
    assert f"plugins/{folder.name}" in PLUGINS_MD.read_text(), f"docs/plugins.md does not point to {folder.name}"


# -- the newcomer's docs: index, troubleshooting, links ---------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MY_DOCS = ["index.md", "plugins.md", "troubleshooting.md"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # headings in code are not headings
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_the_readme_leads_to_the_index_and_the_index_to_every_topic():
    assert "(docs/index.md)" in (ROOT / "README.md").read_text()
    index = (DOCS / "index.md").read_text()
    for page in [
        "concepts.md",
        "strategies.md",
        "reference-method.md",
        "adapters.md",
        "model.md",
        "ablation.md",
        "plugins.md",
        "benchmarks.md",
        "troubleshooting.md",
    ]:
        assert f"]({page}" in index, f"docs/index.md does not link {page}"


def test_troubleshooting_covers_the_known_failure_modes():
    headings = " | ".join(re.findall(r"^## (.+)$", (DOCS / "troubleshooting.md").read_text(), re.M)).lower()
    for topic in ["no knee", "strategy and model mismatch", "cache", "memory", "plugin clashes", "offline"]:
        assert topic in headings, f"docs/troubleshooting.md has no section on {topic!r}"


@pytest.mark.parametrize("page", MY_DOCS)
def test_relative_links_resolve(page):
    source = DOCS / page
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", source.read_text(), flags=re.S | re.M))
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        file, _, anchor = target.partition("#")
        resolved = (source.parent / file).resolve() if file else source
        assert resolved.exists(), f"docs/{page} links {target!r}, which does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"docs/{page} links {target!r}: no such heading"
