"""Fault class 1, config values: NaN, inf, negative, wrong types, interpolation errors, ``~``, empty
strings, huge values and the output folder holding the user's own config. Each bad value is refused
before anything loads, by an error that names the key, the value and the valid range or the fix."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tokprune.ablation.config import ConfigError, load_config
from tokprune.ablation.plan import plan_runs
from tokprune.errors import TokpruneError

# (overrides, regexes joined by .* that the message must each match: the key, the bad value, the range or fix)
BAD_VALUES = [
    (["budget.tolerance=nan"], r"budget\.tolerance.*nan.*\(0, 1\)"),
    (["budget.tolerance=inf"], r"budget\.tolerance.*inf.*\(0, 1\)"),
    (["budget.tolerance=-0.1"], r"budget\.tolerance.*-0\.1.*\(0, 1\)"),
    (["budget.tolerance=0"], r"budget\.tolerance.*0.*\(0, 1\)"),
    (["budget.max_steps=-3"], r"budget\.max_steps.*-3.*\[0, 64\]"),
    (["budget.max_steps=1000000"], r"budget\.max_steps.*1000000.*\[0, 64\]"),
    (["budget.targets=[nan]"], r"budget\.targets.*nan.*\(0, 1\]"),
    (["budget.targets=[inf]"], r"budget\.targets.*inf.*\(0, 1\]"),
    (["budget.targets=[-0.5]"], r"budget\.targets.*-0\.5.*\(0, 1\]"),
    (["budget.ranges.iqr_factor=[1,inf]"], r"budget\.ranges\.iqr_factor.*inf.*finite"),
    (["budget.ranges.iqr_factor=[nan,2]"], r"budget\.ranges\.iqr_factor.*nan.*finite"),
    (["batch_size=0"], r"batch_size.*>= 1.*0"),
    (["batch_size=-4"], r"batch_size.*>= 1.*-4"),
    (["max_new_tokens=0"], r"max_new_tokens.*>= 1.*0"),
    (["limit=0"], r"limit.*>= 1.*0"),
    (["limit=-5"], r"limit.*>= 1.*-5"),
    (["calibration.limit=-1"], r"calibration\.limit.*>= 1.*-1"),
    (["seed=-1"], r"seed.*-1.*\[0, 2\*\*63\)"),
    (["seed=99999999999999999999999"], r"seed.*99999999999999999999999.*\[0, 2\*\*63\)"),
    (["limit=abc"], r"limit.*'abc'.*Integer"),
    (["batch_size=1.5"], r"batch_size.*1\.5.*Integer"),
    (["budget.tolerance=abc"], r"budget\.tolerance.*'abc'.*Float"),
    (["dtype=float64"], r"'float64'.*dtype.*Valid: auto, float32, bfloat16, float16"),
    (["budget.axis=tokens"], r"'tokens'.*budget\.axis.*Valid: equiv_tokens"),
    (["strategies=[topk(keep_ratio=nan)]"], r"topk\.keep_ratio.*nan"),
    (["strategies=[prumerge(iqr_factor=-inf)]"], r"prumerge\.iqr_factor must be > 0, got -inf"),
    (["limit=100000000"], r"limit=100000000.*shapes.*in memory.*limit <= 100000"),
    (["calibration.limit=100000000"], r"calibration\.limit=100000000.*shapes.*limit <= 100000"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_the_key_the_value_and_the_range(overrides, message):
    with pytest.raises(TokpruneError) as info:
        plan_runs(load_config(None, overrides))
    for part in message.split(".*"):  # in any order
        assert re.search(part, str(info.value)), (part, str(info.value))


INTERPOLATIONS = [
    (["output_dir=${nope}"], r"output_dir.*\$\{nope\}|output_dir.*'nope'"),
    (["model=${oc.env:TOKPRUNE_FAULTS_UNSET}"], r"model.*TOKPRUNE_FAULTS_UNSET"),
    (["output_dir=runs/${model"], r"output_dir"),
]


@pytest.mark.parametrize(("overrides", "message"), INTERPOLATIONS, ids=[o[0] for o, _ in INTERPOLATIONS])
def test_an_interpolation_that_cannot_resolve_is_a_config_error(overrides, message):
    os.environ.pop("TOKPRUNE_FAULTS_UNSET", None)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "interpolation" in str(info.value).lower() or "malformed" in str(info.value).lower()


def test_an_interpolation_in_a_config_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: ${missing_key}/x\n")
    with pytest.raises(ConfigError, match=r"interpolation in config key 'output_dir' \(.*c\.yaml\).*missing_key"):
        load_config(path)


@pytest.mark.parametrize("key", ["output_dir", "model", "dtype", "device", "dataset.scorer"])
def test_an_empty_string_in_a_file_is_refused(tmp_path, key):
    path = tmp_path / "c.yaml"
    head, _, leaf = key.rpartition(".")
    path.write_text(f"{head}:\n  {leaf}: ''\n" if head else f"{leaf}: ''\n")
    with pytest.raises(ConfigError, match=rf"(?s)(?=.*{key.replace('.', '[.]')}).*''"):
        plan_runs(load_config(path))


@pytest.mark.parametrize("key", ["output_dir", "dataset.path", "dataset.image_folder", "calibration.path"])
def test_tilde_is_expanded_in_paths(key):
    extra = ["dataset.name=jsonl"] if key != "output_dir" else []
    if key != "dataset.path" and extra:
        extra.append("dataset.path=~/q.jsonl")
    cfg = load_config(None, [*extra, f"{key}=~/tokprune-faults/x"])
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == str(Path.home() / "tokprune-faults" / "x")


def test_output_dir_holding_the_users_own_config_is_not_overwritten(tmp_path, monkeypatch):
    """``tokprune run exp/config.yaml output_dir=exp``: the user's file (comments and all) stays as it is."""
    from tokprune.ablation import runner

    exp = tmp_path / "exp"
    exp.mkdir()
    mine = (
        "# my study: keep this comment\nstrategies: [topk]\nlimit: 2\nbudget:\n  targets: []\nsweep: {}\nplot: false\n"
    )
    (exp / "config.yaml").write_text(mine)
    cfg = load_config(exp / "config.yaml", [f"output_dir={exp}", "device=cpu"])
    monkeypatch.setattr(runner, "open_session", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(TokpruneError, match=r"config\.yaml.*not written by tokprune.*output_dir"):
        runner.run_ablation(cfg, progress=False, echo=None)
    assert (exp / "config.yaml").read_text() == mine


def test_a_config_written_by_an_earlier_run_is_rewritten(tmp_path, study):
    """The resolved config tokprune itself wrote (this version, or an older one without the header but
    holding exactly this study's config) is refreshed on resume: nothing of it is lost."""
    study(tmp_path)
    ours = (tmp_path / "config.yaml").read_text()
    assert ours.startswith("# tokprune run:") and "limit: 2" in ours
    (tmp_path / "config.yaml").write_text(ours.split("\n", 1)[1])  # an older version's copy: no header
    study(tmp_path)
    assert (tmp_path / "config.yaml").read_text() == ours
    study(tmp_path, "max_new_tokens=2")  # tokprune's own copy follows the study
    assert "max_new_tokens: 2" in (tmp_path / "config.yaml").read_text()


def test_a_printed_config_with_other_values_is_not_overwritten(tmp_path, study, monkeypatch):
    """``tokprune run --print-config > exp/config.yaml``, then a run there with other overrides: the file
    is plain omegaconf YAML, but not this study's config, so it is the user's."""
    from tokprune.ablation import runner
    from tokprune.ablation.config import to_yaml

    printed = to_yaml(load_config(None, ["limit=3"]))
    (tmp_path / "config.yaml").write_text(printed)
    monkeypatch.setattr(runner, "open_session", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(TokpruneError, match=r"not written by tokprune.*delete that file if an earlier tokprune run"):
        study(tmp_path)
    assert (tmp_path / "config.yaml").read_text() == printed


def test_output_dir_empty_string_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"output_dir"):
        load_config(None, ["output_dir=''"])


def test_model_that_is_an_empty_folder_says_what_is_missing(tmp_path):
    from tokprune.ablation.loading import resolve_model_path

    with pytest.raises(ConfigError, match=r"config\.json.*model="):
        resolve_model_path(str(tmp_path))
