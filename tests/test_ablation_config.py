"""Ablation configs: loading, overrides, error texts, run planning (sweeps, baseline, budget matching)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tokprune.ablation.config import AblationConfig, ConfigError, load_config, to_container
from tokprune.ablation.plan import matched_value, plan_runs, resolve_matched
from tokprune.errors import SpecSyntaxError, StrategyParamError, UnknownStrategyError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The older matched-budget mechanism, without the budget sweep.
MATCH = ["match_budget.reference=cls_knee+text_interact", "budget.targets=[]", "sweep={}"]


def test_default_yaml_equals_schema_defaults():
    # `tokprune run` with no file uses the dataclass defaults; the shipped YAML must say the same.
    assert to_container(load_config(CONFIGS / "default.yaml")) == to_container(AblationConfig())


@pytest.mark.parametrize("name", ["default.yaml", "sweep_fastv.yaml", "llava15_7b_gpu.yaml"])
def test_shipped_configs_load_and_plan(name):
    cfg = load_config(CONFIGS / name)
    assert plan_runs(cfg)[0].role == "baseline"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("batchsize=8", ["unknown config key 'batchsize'", "Did you mean 'batch_size'?", "Valid keys:"]),
        ("positions.visoin=keep", ["'positions.visoin'", "Did you mean 'positions.vision'?", "vision, llm"]),
        ("dataset.nmae=jsonl", ["'dataset.nmae'", "Did you mean 'dataset.name'?"]),
        ("batch_size=abc", ["bad value for config key 'batch_size'", "abc"]),
        ("dtype=float33", ["'dtype'", "Did you mean 'float32'?", "Valid: auto, float32, bfloat16, float16"]),
        ("positions.llm=compat", ["'positions.llm'", "Did you mean 'compact'?", "keep, compact"]),
        ("budget_scope=tiles", ["'budget_scope'", "Did you mean 'tile'?", "Valid: image, tile, frame"]),
        ("dataset.name=json", ["'dataset.name'", "shapes, jsonl"]),
        ("device=tpu", ["'device'", "auto, cpu, cuda, cuda:N"]),
        ("batch_size=0", ["'batch_size' must be >= 1"]),
        ("limit=0", ["'limit' must be >= 1 or null"]),
        ("dataset.name=jsonl", ["needs dataset.path"]),
        ("batch_size", ["not key=value"]),
    ],
)
def test_bad_config_errors_name_key_and_choices(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for part in expected:
        assert part in str(info.value)


def test_budget_scopes_are_the_adapters_own():
    from tokprune.ablation.config import BUDGET_SCOPES
    from tokprune.adapters import BUDGET_SCOPES as ADAPTER_SCOPES

    assert BUDGET_SCOPES == ADAPTER_SCOPES
    assert load_config(None, ["budget_scope=tile"]).budget_scope == "tile"


def test_bad_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("batch_size: 4\nmax_new_token: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'max_new_token' \(.*x.yaml\)\. Did you mean 'max_new_tokens'"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: 'nope.yaml'"):
        load_config("nope.yaml")


def test_unknown_strategy_names_entry_and_suggests():
    cfg = load_config(None, ["strategies=[topk, cls_kne]"])
    with pytest.raises(UnknownStrategyError) as info:
        plan_runs(cfg)
    assert "strategies[1]" in str(info.value) and "Did you mean 'cls_knee'?" in str(info.value)


def test_bad_param_and_syntax_errors_surface_with_location():
    with pytest.raises(StrategyParamError, match=r"strategies\[0\]"):
        plan_runs(load_config(None, ["strategies=topk(kep=3)"]))
    with pytest.raises(SpecSyntaxError, match=r"strategies\[0\]"):
        plan_runs(load_config(None, ["strategies=topk(keep=3"]))
    with pytest.raises(UnknownStrategyError, match="sweep.fastvv"):
        plan_runs(load_config(None, ["strategies=[fastv]", "sweep.fastvv.layer=[2,3]"]))


def test_strategies_override_keeps_commas_inside_specs():
    cfg = load_config(None, ["strategies=[fastv(layer=2, keep_ratio=0.5), cls_knee+text_interact]"])
    assert cfg.strategies == ["fastv(layer=2, keep_ratio=0.5)", "cls_knee+text_interact"]
    assert load_config(None, ["strategies=fastv(layer=[2,3])"]).strategies == ["fastv(layer=[2,3])"]


def test_inline_sweep_expands_to_grid_in_row_major_order():
    cfg = load_config(None, ["strategies=fastv(layer=[2,3], keep_ratio=[0.25,0.5])", "match_budget.reference=null"])
    runs = plan_runs(cfg)
    assert [r.label for r in runs] == [
        "none",
        "fastv(layer=2, keep_ratio=0.25)",
        "fastv(layer=2, keep_ratio=0.5)",
        "fastv(layer=3, keep_ratio=0.25)",
        "fastv(layer=3, keep_ratio=0.5)",
    ]
    assert all(r.budget == "fixed (as written)" for r in runs[1:])


def test_sweep_block_and_dict_entries():
    cfg = OmegaConf.structured(AblationConfig)
    cfg.strategies = [[{"name": "cls_knee"}, {"name": "text_interact", "layer": 2}], {"name": "topk", "keep": [8, 16]}]
    cfg.sweep = {"cls_knee": {"sensitivity": [1.0, 2.0]}}
    cfg.match_budget.reference = None
    cfg.budget.targets = []
    labels = [r.label for r in plan_runs(OmegaConf.to_object(cfg))]
    assert labels == [
        "none",
        "cls_knee(sensitivity=1.0)+text_interact(layer=2)",
        "cls_knee(sensitivity=2.0)+text_interact(layer=2)",
        "topk(keep=8)",
        "topk(keep=16)",
    ]


def test_plan_baseline_first_reference_second_and_dedupe():
    cfg = load_config(None, ["strategies=[topk, fastv, none, cls_knee+text_interact, topk]", *MATCH])
    runs = plan_runs(cfg)
    assert [(r.label, r.role) for r in runs] == [
        ("none", "baseline"),
        ("cls_knee+text_interact", "reference"),
        ("topk", "matched"),
        ("fastv", "matched"),
    ]


def test_reference_added_when_a_run_needs_it_and_explicit_budgets_are_kept():
    runs = plan_runs(load_config(None, ["strategies=[topk, random(keep=5)]", *MATCH]))
    assert [(r.label, r.role) for r in runs] == [
        ("none", "baseline"),
        ("cls_knee+text_interact", "reference"),
        ("topk", "matched"),
        ("random(keep=5)", "unmatched"),
    ]


def test_matching_fills_count_or_ratio():
    assert matched_value("keep", 31.6, 144) == 32
    assert matched_value("keep_ratio", 36, 144) == 0.25
    run = next(r for r in plan_runs(load_config(None, ["strategies=[fastv(layer=3)]", *MATCH])) if r.role == "matched")
    done = resolve_matched(run, 20.4, 144)
    assert done.label == "fastv(layer=3, keep=20)"
    assert done.budget == "matched fastv.keep=20"
    assert "keep=20" in done.spec and "layer=3" in done.spec


def test_match_budget_params_are_checked_up_front():
    with pytest.raises(ConfigError, match="'topk' has no parameter 'kep'; valid: .*keep"):
        plan_runs(load_config(None, ["match_budget.params.topk=kep"]))
    with pytest.raises(UnknownStrategyError, match="match_budget.params.topkk"):
        plan_runs(load_config(None, ["match_budget.params.topkk=keep"]))


def test_vision_positions_default_to_each_methods_reference_choice():
    # Faithful by default (issue 26): the runner passes None, so divprune & co. renumber as their code does.
    from tokprune.ablation.config import AblationConfig, vision_positions_arg

    assert AblationConfig().positions.vision == "method"
    assert vision_positions_arg("method") is None
    assert vision_positions_arg("keep") == "keep"
