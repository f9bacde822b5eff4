"""The adapter registry to the strategy registry's standard: names validated, clashes and ambiguous matches
refused naming both parties, every family attributed to its plugin; the built-in plugin named for what it
holds. Families are taken from the registry, never from a list."""

from __future__ import annotations

import contextlib
import types
import warnings

import pytest
from _families import FAMILY_PARAMS

import tokprune
from tokprune import _plugins, cli, hookimpl
from tokprune.adapters import adapter_registry, describe_adapter, pick_adapter, registered_adapters
from tokprune.errors import AdapterNameClash, AmbiguousModelError, PluginError, TokpruneError, UnsupportedModelError
from tokprune.testing.adapters import tiny_case

FAMILIES = [cls for cls, _ in registered_adapters()]


@contextlib.contextmanager
def adapters_plugin(name, *classes):
    """A throw-away plugin registering ``classes`` through ``register_adapters`` (always unregistered)."""
    module = types.ModuleType(name)

    @hookimpl
    def register_adapters(register):
        for cls in classes:
            register(cls)

    module.register_adapters = register_adapters
    _plugins.pm.register(module, name=name)
    try:
        yield module
    finally:
        _plugins.pm.unregister(module, name=name)


def test_the_builtin_families_come_from_the_plugin_named_for_them():
    assert FAMILIES
    assert {source.name for _, source in registered_adapters()} == {"builtin_families"}
    for cls in FAMILIES:
        info = describe_adapter(cls.name)
        assert info.cls is cls and info.source.name == "builtin_families" and info.summary


@pytest.mark.parametrize("family", FAMILIES, ids=[cls.name for cls in FAMILIES])
def test_a_second_adapter_with_a_family_name_is_refused_naming_both_plugins(family):
    impostor = type("Impostor", (family,), {})
    with adapters_plugin("impostor_plugin", impostor):
        with pytest.raises(AdapterNameClash) as err:
            adapter_registry()
    text = str(err.value)
    assert f"adapter {family.name!r}" in text and "'builtin_families'" in text and "'impostor_plugin'" in text
    assert "TOKPRUNE_BLOCK_PLUGINS=" in text and isinstance(err.value, ValueError)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_two_adapters_matching_one_model_are_refused_naming_both(family):
    rival = type("Rival", (family,), {"name": f"{family.name}_rival"})
    case = tiny_case(family)
    with adapters_plugin("rival_plugin", rival):
        with pytest.raises(AmbiguousModelError) as err:
            tokprune.patch(case.model, "none")
        assert pick_adapter is not None
    text = str(err.value)
    assert (
        f"{family.name!r} (plugin 'builtin_families'" in text
        and f"'{family.name}_rival' (plugin 'rival_plugin')" in text
    )
    assert "adapter=" in text and isinstance(err.value, UnsupportedModelError)
    assert tokprune.adapters.handle_of(case.model) is None  # nothing was touched
    # the caller may choose: patch(adapter=...) takes the named class
    with adapters_plugin("rival_plugin", rival), tokprune.pruned(case.model, "none", adapter=rival) as run:
        assert type(run) is rival


@pytest.mark.parametrize(
    ("name", "problem"),
    [("Bad-Name", "must match [a-z][a-z0-9_]*"), ("", "must match"), (None, "must match"), ("9lives", "must match")],
)
def test_adapter_names_follow_the_strategy_grammar(name, problem):
    family = FAMILIES[0]
    bad = type("Bad", (family,), {"name": name})
    with adapters_plugin("bad_plugin", bad), pytest.raises(PluginError) as err:
        adapter_registry()
    assert problem in str(err.value) and "'bad_plugin'" in str(err.value) and isinstance(err.value, TypeError)


def test_registering_something_that_is_not_an_adapter_names_the_plugin():
    with adapters_plugin("odd_plugin", object), pytest.raises(PluginError, match="plugin 'odd_plugin' registered"):
        adapter_registry()


def test_patch_with_an_adapter_that_does_not_match_refuses_before_touching_the_model():
    first, second = FAMILIES[0], FAMILIES[-1]
    case = tiny_case(first)
    if second.matches(case.model):
        pytest.skip("only one registered family")
    with pytest.raises(UnsupportedModelError, match=f"adapter {second.name!r} does not understand"):
        tokprune.patch(case.model, "none", adapter=second)
    with pytest.raises(UnsupportedModelError, match="is not a ModelAdapter subclass"):
        tokprune.patch(case.model, "none", adapter=object)
    assert tokprune.adapters.handle_of(case.model) is None


def test_unknown_adapter_name_lists_the_registered_ones():
    with pytest.raises(UnsupportedModelError) as err:
        describe_adapter(FAMILIES[0].name + "x")
    assert f"{FAMILIES[0].name} (builtin_families)" in str(err.value) and isinstance(err.value, TokpruneError)


def test_the_former_plugin_name_still_selects_it_with_a_warning(monkeypatch):
    monkeypatch.setenv(_plugins.BLOCK_ENV, "llava")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert registered_adapters() == []
        assert any("now called 'builtin_families'" in str(w.message) for w in caught)
    finally:
        monkeypatch.delenv(_plugins.BLOCK_ENV)
        _plugins.load_plugins()


def test_tokprune_adapters_lists_the_providing_plugin(capsys, monkeypatch):
    monkeypatch.delenv(_plugins.LOAD_ENV, raising=False)
    assert cli.main(["adapters"]) == 0
    out = capsys.readouterr().out
    for cls in FAMILIES:
        line = next(line for line in out.splitlines() if line.startswith(f"{cls.name} "))
        assert "builtin_families" in line
