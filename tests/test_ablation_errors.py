"""Bad inputs found by trying the runner: each gives an error naming the value and the fix (issue 11)."""

from __future__ import annotations

import json
import sys

import pytest

from tokprune.ablation.config import ConfigError, load_config
from tokprune.ablation.datasets import DatasetError, load_jsonl
from tokprune.ablation.plan import plan_runs
from tokprune.ablation.report import PlotUnavailableError, check_plotting
from tokprune.ablation.results import ROW_KEYS, ResultsError, append_result, load_results


def test_jsonl_path_without_dataset_name_is_not_silently_ignored():
    with pytest.raises(ConfigError, match=r"dataset.path='x.jsonl' is set but dataset.name='shapes'.*dataset.name=jsonl"):
        load_config(None, ["dataset.path=x.jsonl"])


def test_shapes_without_limit_says_the_benchmark_has_no_end():
    with pytest.raises(ConfigError, match="limit=null.*set limit=N"):
        load_config(None, ["limit=null"])


def test_a_file_that_is_not_an_image_is_a_bad_row_at_load(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_text("not an image")
    rows = [{"question_id": i, "image": name, "text": "q?", "answer": "a"} for i, name in enumerate(["ok.png", "bad.png"])]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=r"q.jsonl:2: .*bad.png' is not a readable image.*skip_bad_rows=true"):
        load_jsonl(path)
    samples, skipped = load_jsonl(path, skip_bad_rows=True)
    assert [s.question_id for s in samples] == ["0"] and "not a readable image" in skipped[0]


def test_an_integer_past_int64_fails_at_planning():
    cfg = load_config(None, ["strategies=[topk(keep=99999999999999999999999)]"])
    with pytest.raises(ConfigError, match=r"strategies\[0\]: topk.keep=99999999999999999999999 does not fit.*keep_ratio"):
        plan_runs(cfg)


def test_none_inside_a_pipeline_says_what_to_write():
    with pytest.raises(ConfigError, match=r"combines 'none' .*write 'cls_knee' for the pipeline"):
        plan_runs(load_config(None, ["strategies=[none+cls_knee]"]))


def test_print_config_checks_the_specs(capsys):
    from tokprune.ablation.cli import main

    with pytest.raises(Exception, match="topkk"):
        main(["strategies=[topkk]", "--print-config"])
    assert capsys.readouterr().out == ""
    assert main(["strategies=[topk]", "--print-config"]) == 0
    assert "strategies:\n- topk" in capsys.readouterr().out


def test_top_level_yaml_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- topk\n- fastv\n")
    with pytest.raises(ConfigError, match=r"c.yaml: a config must be a mapping of keys .*got a list"):
        load_config(path)


def test_results_row_with_the_wrong_schema(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a", "label": "x", "spec": "x", "role": "baseline", "metrics": {}, "predictions": []}\n'
                    '{"run": "something else"}\n')
    with pytest.raises(ResultsError, match=r"results.jsonl:2: not a results row .*missing 'key'.*another output_dir"):
        load_results(path, required=ROW_KEYS)


def test_a_full_disk_leaves_whole_rows(tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "results.jsonl"
    append_result(path, {"key": "a"})
    before = path.read_text()
    real_write = os.write

    def half_then_full(fd, data):  # half the line lands, then the disk is full
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space"):
        append_result(path, {"key": "b", "pad": "x" * 1000})
    monkeypatch.undo()
    assert path.read_text() == before and before.startswith('{"key":"a",')


def test_plot_without_matplotlib_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailableError, match=r"pip install 'tokprune\[plot\]', or set plot=false"):
        check_plotting()


def test_a_signal_turned_into_a_library_error_still_exits_as_interrupted(tmp_path, monkeypatch, capsys):
    """SIGTERM raises KeyboardInterrupt wherever the run is; omegaconf, for one, re-raises it as its own
    error. The command must still exit 130 with the resume hint, not crash with exit 1."""
    import signal as signal_module

    from tokprune.ablation import cli, runner

    def interrupted_inside_a_library(cfg, **kwargs):
        try:
            cli._terminate(signal_module.SIGTERM, None)
        except KeyboardInterrupt as exc:
            raise ValueError("ConfigKeyError-like wrapper") from exc

    monkeypatch.setattr(runner, "run_ablation", interrupted_inside_a_library)
    monkeypatch.setattr(cli, "_TERMINATED", [])
    monkeypatch.setattr(signal_module, "signal", lambda *a: None)  # leave the test process's handlers alone
    code = cli.main(["baseline=true", "strategies=[]", f"output_dir={tmp_path}", "plot=false"])
    assert code == 130
    assert "rerun the command to resume" in capsys.readouterr().err

    def plain_bug(cfg, **kwargs):
        raise ValueError("a real bug")

    monkeypatch.setattr(runner, "run_ablation", plain_bug)
    monkeypatch.setattr(cli, "_TERMINATED", [])
    with pytest.raises(ValueError, match="a real bug"):  # without a signal, errors are never swallowed
        cli.main(["baseline=true", "strategies=[]", f"output_dir={tmp_path}", "plot=false"])


def test_engine_vllm_without_vllm_is_one_line_naming_the_recipe(tmp_path, monkeypatch, capsys):
    """Refused before any work (no output folder), exit 2, one line naming the install recipe."""
    from tokprune.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    out = tmp_path / "study"
    code = main(["run", f"output_dir={out}", "limit=2", "engine=vllm", "budget.targets=[]", "sweep={}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert len(err.splitlines()) == 1, err
    assert "engine=vllm needs vLLM" in err and "requirements/vllm-cpu.sh" in err and "docs/serving.md" in err


def test_engine_is_a_checked_choice():
    with pytest.raises(ConfigError, match=r"'vlm' for config key 'engine'.*Did you mean 'vllm'.*transformers, vllm"):
        load_config(None, ["engine=vlm"])
