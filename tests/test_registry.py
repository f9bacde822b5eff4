"""Registry, params, pipeline composition and plugin loading, with toy plugins (no built-ins needed)."""

from __future__ import annotations

import importlib.metadata as md
import types

import pytest
import torch
from _fakes import ToyLLM, ToyTop, registered

from tokprune import LLMPlan, PruningStrategy, Stage, TokenRole, _plugins, hookimpl, param, strategies
from tokprune.errors import (
    StageOrderError,
    StrategyNameClash,
    StrategyParamError,
    TokpruneError,
    UnknownStrategyError,
)
from tokprune.pipeline import Pipeline


@pytest.fixture
def toys():
    with registered("toys", ToyTop, ToyLLM) as module:
        yield module


def test_get_builds_a_pipeline_whose_str_parses_back(toys):
    pipe = strategies.get("toy_top(keep=8)+toy_llm(layer=3)")
    assert isinstance(pipe, Pipeline)
    assert [s.name for s in pipe] == ["toy_top", "toy_llm"]
    assert pipe[0].params.keep == 8 and pipe[1].layer == 3
    text = str(pipe)
    # Canonical: every parameter spelled out, in declaration order.
    assert text == (
        "toy_top(keep=8, ratio=none, mode=first, label=x, flag=false)+toy_llm(layer=3, keep_ratio=0.5)"
    )
    assert strategies.get(text) == pipe
    assert strategies.get(text) != strategies.get("toy_top(keep=9)+toy_llm(layer=3)")


def test_dict_and_omegaconf_forms_equal_the_string(toys):
    from omegaconf import OmegaConf

    expected = strategies.get("toy_top(keep=8)+toy_llm(layer=3)")
    as_dicts = [{"name": "toy_top", "keep": 8}, {"name": "toy_llm", "layer": 3}]
    assert strategies.get(as_dicts) == expected
    assert strategies.get(OmegaConf.create(as_dicts)) == expected
    assert strategies.get(expected.to_config()) == expected
    assert strategies.get(expected) == expected


def test_overrides_single_and_by_name(toys):
    assert strategies.get("toy_llm", layer=5)[0].layer == 5
    pipe = strategies.get("toy_top+toy_llm", toy_llm={"layer": 4}, keep=2)
    assert pipe[1].layer == 4 and pipe[0].params.keep == 2
    with pytest.raises(StrategyParamError, match="matches no parameter"):
        strategies.get("toy_top+toy_llm", nonsense=1)


def test_none_is_the_empty_pipeline():
    pipe = strategies.get("none")
    assert len(pipe) == 0 and str(pipe) == "none"
    assert strategies.get(str(pipe)) == pipe


@pytest.mark.parametrize(
    ("spec", "error", "fragments"),
    [
        ("toy_tpo", UnknownStrategyError, ["unknown strategy 'toy_tpo'", "Did you mean 'toy_top'?", "toy_llm (toys)"]),
        ("toy_top(kep=3)", StrategyParamError, ["unknown parameter 'kep'", "Did you mean 'keep'?", "keep=4"]),
        ("toy_top(keep=0)", StrategyParamError, ["toy_top.keep must be >= 1, got 0"]),
        ("toy_top(keep=2.5)", StrategyParamError, ["toy_top.keep must be int, got 2.5"]),
        ("toy_top(keep=true)", StrategyParamError, ["toy_top.keep must be int, got true"]),
        ("toy_top(ratio=1.5)", StrategyParamError, ["toy_top.ratio must be <= 1, got 1.5"]),
        ("toy_top(mode=frist)", StrategyParamError, ["one of: first, last", "Did you mean 'first'?"]),
        ("toy_top(flag=1)", StrategyParamError, ["toy_top.flag must be bool, got 1"]),
        ("toy_top(keep=[1, 2])", StrategyParamError, ["lists are sweeps"]),
        ("toy_llm+toy_top", StageOrderError, ["comes after 'toy_llm'", "write 'toy_top+toy_llm'"]),
        ("toy_top+toy_top", StrategyParamError, ["appears twice"]),
    ],
)
def test_errors_name_the_bad_value_and_the_choices(toys, spec, error, fragments):
    with pytest.raises(error) as info:
        strategies.get(spec)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_params_accept_int_for_float_but_nothing_lossy(toys):
    assert strategies.get("toy_top(ratio=1)")[0].params.ratio == 1.0
    assert isinstance(strategies.get("toy_top(ratio=1)")[0].params.ratio, float)


def test_llm_layers_must_increase():
    class Other(ToyLLM):
        name = "toy_llm2"

    with registered("toys2", ToyLLM, Other):
        strategies.get("toy_llm(layer=2)+toy_llm2(layer=3)")
        with pytest.raises(StageOrderError, match="strictly increasing"):
            strategies.get("toy_llm(layer=3)+toy_llm2(layer=3)")
        with pytest.raises(StageOrderError, match="LLM layers out of order"):
            strategies.get("toy_llm(layer=4)+toy_llm2(layer=2)")


def test_at_most_one_vision_step():
    class Other(ToyTop):
        name = "toy_top2"

    with registered("toys2", ToyTop, Other):
        with pytest.raises(StageOrderError, match="at most one"):
            strategies.get("toy_top+toy_top2")


def test_describe_reports_stage_params_and_source(toys):
    info = strategies.describe("toy_top")
    assert info.stage is Stage.VISION
    assert info.source.name == "toys"
    assert [p.name for p in info.params] == ["keep", "ratio", "mode", "label", "flag"]
    keep = info.params[0]
    assert (keep.type, keep.default, keep.doc) == ("int", 4, "patches kept")
    text = str(info)
    assert "stage: vision" in text and "keep: int = 4; >= 1  -- patches kept" in text
    with pytest.raises(UnknownStrategyError, match="Did you mean 'toy_top'"):
        strategies.describe("toy_tp")


def test_available_filters(toys):
    assert {"toy_top", "toy_llm"} <= set(strategies.available())
    assert "toy_top" in strategies.available("toy_*", stage="vision")
    assert "toy_llm" not in strategies.available("toy_*", stage="vision")


def test_clash_names_both_plugins(toys):
    with registered("rival", ToyTop):
        with pytest.raises(StrategyNameClash) as info:
            strategies.available()
    message = str(info.value)
    assert "'toy_top'" in message and "'toys'" in message and "'rival'" in message
    assert "TOKPRUNE_BLOCK_PLUGINS" in message


def test_register_rejects_non_strategies():
    class NotAStrategy:
        name = "x"

    with registered("bad", NotAStrategy):
        with pytest.raises(TypeError, match="plugin 'bad' registered .* not a PruningStrategy"):
            strategies.available()


def test_class_definition_is_validated():
    with pytest.raises(TypeError, match="name must match"):

        class BadName(PruningStrategy):
            name = "Bad-Name"
            stage = Stage.VISION

            def plan(self, ctx):
                return None

    with pytest.raises(TypeError, match="need an int 'layer' parameter"):

        class NoLayer(PruningStrategy):
            name = "no_layer"
            stage = Stage.LLM

            def plan(self, ctx):
                return None


def test_errors_subclass_builtins_and_print_plainly(toys):
    with pytest.raises(KeyError) as info:
        strategies.get("nope")
    assert isinstance(info.value, TokpruneError)
    assert str(info.value).startswith("unknown strategy 'nope'")  # no KeyError quoting


def test_llm_plan_forces_protected_roles(toys):
    """The base class keeps padding, protected, template and question positions for a strategy that
    declares no text dropping, even when the strategy's own mask drops them."""
    from tokprune import LLMAttention, LLMContext

    roles = torch.tensor([[0, 3, 1, 1, 2, 4], [3, 1, 1, 1, 2, 4]])
    ctx = LLMContext(
        layer=2,
        roles=roles,
        hidden=torch.zeros(2, 6, 4),
        attention=LLMAttention(torch.zeros(2, 1, 6, 4), torch.zeros(2, 1, 6, 4), roles != 0),
    )
    plan = strategies.get("toy_llm")[0](ctx)
    assert plan.keep.tolist() == (roles != TokenRole.IMAGE).tolist()
    assert plan.diagnostics["forced_kept"].tolist() == [4, 3]

    class DropsText(ToyLLM):
        name = "toy_drops_text"
        drops_text = True

    plan = DropsText()(ctx)
    assert plan.keep.tolist() == ((roles != TokenRole.IMAGE) & (roles != TokenRole.QUESTION)).tolist()


def test_contract_errors_for_bad_plans(toys):
    from tokprune import VisionContext, VisionSignals
    from tokprune.errors import StrategyContractError

    class Empty(ToyTop):
        name = "toy_empty"

        def plan(self, ctx):
            from tokprune import VisionPlan

            return VisionPlan(keep=torch.zeros(ctx.features.shape[:2], dtype=torch.bool))

    ctx = VisionContext(torch.zeros(2, 5, 3), VisionSignals(lambda s: None, num_layers=2, num_heads=1))
    with pytest.raises(StrategyContractError, match=r"kept no visual token for samples \[0, 1\]"):
        Empty()(ctx)
    assert ToyTop(keep=2)(ctx).keep.sum(1).tolist() == [2, 2]


def test_undeclared_signal_reads_fail():
    from tokprune import Signal, VisionSignals
    from tokprune.errors import StrategyContractError

    signals = VisionSignals(lambda s: torch.zeros(1, 3, 4), num_layers=4, num_heads=1,
                            declared=frozenset({Signal("hidden", 3)}))
    assert signals.hidden(-2).shape == (1, 3, 4)  # -2 resolves to 3 for a 4-layer encoder
    with pytest.raises(StrategyContractError, match="without declaring it"):
        signals.hidden(-1)
    with pytest.raises(StrategyParamError, match="out of range for 4 layers"):
        signals.qk(7)


# -- plugin loading through entry points --------------------------------------------------------


class _FakeDist:
    def __init__(self, name: str, version: str, eps: list[md.EntryPoint]) -> None:
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = eps


@pytest.fixture
def fake_entry_points(monkeypatch):
    """Two fake installed distributions exposing plugins in the ``tokprune`` group."""
    modules = {
        "fake_plugin_a": _module_with(ToyTop),
        "fake_plugin_b": _module_with(ToyLLM),
    }
    import sys

    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    dists = [
        _FakeDist("tokprune-a", "1.2.3", [md.EntryPoint("a", "fake_plugin_a", "tokprune")]),
        _FakeDist("tokprune-b", "0.0.1", [md.EntryPoint("b", "fake_plugin_b", "tokprune")]),
    ]
    monkeypatch.setattr(md, "distributions", lambda: iter(dists))
    monkeypatch.setenv(_plugins.LOAD_ENV, "a,tokprune-b")
    _plugins.load_plugins()
    yield
    monkeypatch.delenv(_plugins.LOAD_ENV)
    monkeypatch.undo()
    _plugins.load_plugins()


def _module_with(*classes):
    module = types.ModuleType("m")

    @hookimpl
    def register_strategies(register):
        for cls in classes:
            register(cls)

    module.register_strategies = register_strategies
    return module


def test_entry_points_load_with_versions(fake_entry_points):
    assert strategies.available() == ["toy_llm", "toy_top"]  # the allow-list excludes the built-ins
    info = strategies.describe("toy_top")
    assert (info.source.name, info.source.distribution, info.source.version) == ("a", "tokprune-a", "1.2.3")


def test_block_list_and_empty_allow_list(fake_entry_points, monkeypatch):
    monkeypatch.setenv(_plugins.BLOCK_ENV, "b")
    assert strategies.available() == ["toy_top"]
    monkeypatch.setenv(_plugins.LOAD_ENV, "")
    assert strategies.available() == []
    with pytest.raises(UnknownStrategyError, match="no strategies are registered"):
        strategies.get("toy_top")


def test_builtins_arrive_through_the_entry_point_group():
    eps = [ep for ep in md.entry_points(group="tokprune") if ep.name == "builtin"]
    assert eps and eps[0].value == "tokprune_strategies"
    assert _plugins.pm.get_plugin("builtin") is not None


def test_strategy_equality_and_hash(toys):
    a, b = ToyTop(keep=3), ToyTop({"keep": 3})
    assert a == b and hash(a) == hash(b) and a != ToyTop(keep=4)
    assert repr(a).startswith("<ToyTop toy_top(keep=3")


def test_llm_plan_must_match_roles_shape(toys):
    from tokprune import LLMAttention, LLMContext
    from tokprune.errors import StrategyContractError

    class Wrong(ToyLLM):
        name = "toy_wrong"

        def plan(self, ctx):
            return LLMPlan(keep=torch.ones(1, 3, dtype=torch.bool))

    roles = torch.ones(2, 4, dtype=torch.long)
    ctx = LLMContext(2, roles, torch.zeros(2, 4, 2), LLMAttention(torch.zeros(2, 1, 4, 2), torch.zeros(2, 1, 4, 2), roles > 0))
    with pytest.raises(StrategyContractError, match="expected bool"):
        Wrong()(ctx)
    _ = param  # imported for plugin authors; keep the public import exercised


def test_re_registering_a_plugin_name_never_serves_the_old_table():
    # Same plugin name, new module each time: the registry must see the new classes even when the old
    # module's memory (and so its id()) is reused, which once made this flaky.
    import gc

    for i in range(20):
        class Numbered(ToyTop):
            name = f"toy_numbered_{i}"

        with registered("toys_cycle", Numbered):
            assert f"toy_numbered_{i}" in strategies.available()
            assert f"toy_numbered_{i - 1}" not in strategies.available()
        gc.collect()
