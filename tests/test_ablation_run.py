"""The ablation runner end to end on a tiny random LLaVA (embedded processor, 4 LLM layers): outputs,
budget matching, resume after a crash / SIGTERM / torn line, torchrun == single process, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults._kit import cli_pausing, wait_for

from tokprune.ablation import runner
from tokprune.ablation.config import load_config
from tokprune.ablation.results import load_results

pytest.importorskip("transformers")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A random-weight LLaVA in the embedded model's format, saved like a real checkpoint."""
    from transformers import LlavaForConditionalGeneration

    from tokprune.models import build

    out = tmp_path_factory.mktemp("tiny-llava")
    torch.manual_seed(0)
    tok = build.build_tokenizer()
    sizes = build.Sizes(vision_hidden=32, vision_layers=3, vision_heads=2, text_hidden=32, text_layers=1,
                        text_heads=2, lm_hidden=32, lm_layers=4, lm_heads=2, projection_dim=16)
    model = LlavaForConditionalGeneration(build.llava_config(sizes, tok))
    model.generation_config = build.generation_config(tok)
    model.save_pretrained(out)
    build.build_processor(tok).save_pretrained(out)
    return str(out)


def _cfg(model: str, out: Path, *extra: str):
    """A small study without the budget sweep and random seeds (tests that want them override these)."""
    base = [f"model={model}", f"output_dir={out}", "limit=6", "batch_size=4", "device=cpu", "budget.targets=[]", "sweep={}"]
    return load_config(None, [*base, *extra])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_main_job_shape_outputs_and_matching(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path, "strategies=[topk, cls_knee+text_interact, fastv, prumerge]",
               "match_budget.reference=cls_knee+text_interact")
    outcome = runner.run_ablation(cfg, progress=False, echo=None)
    rows = outcome.rows
    assert [(r["label"].split("(")[0], r["role"]) for r in rows] == [
        ("none", "baseline"), ("cls_knee+text_interact", "reference"), ("topk", "matched"),
        ("fastv", "matched"), ("prumerge", "unmatched"),
    ]
    ref_kept = rows[1]["metrics"]["visual_kept_mean"]
    for row in rows[2:4]:  # fixed budgets matched to the reference's measured mean
        assert f"keep={max(1, round(ref_kept))}" in row["spec"]
        assert row["metrics"]["visual_kept_mean"] == max(1, round(ref_kept))
    base = rows[0]["metrics"]
    assert base["visual_kept_mean"] == base["visual_total"] == 144 and base["flops_rel"] == pytest.approx(1.0)
    assert base["agreement"] == 1.0
    for row in rows:
        m = row["metrics"]
        assert m["n"] == 6 and len(row["predictions"]) == 6
        assert set(m["accuracy_by_type"]) == {"color", "count", "exist", "position"}
        assert m["prefill_ms"] > 0 and m["peak_mem_mb"] > 0 and 0 <= m["agreement"] <= 1
        if row["role"] != "baseline":
            assert row["versions"]["plugins"]["builtin"]["distribution"] == "tokprune"
        assert row["versions"]["adapter"]["name"] and row["versions"]["torch"] == torch.__version__
        assert {"torch", "transformers", "tokprune"} <= set(row["versions"])
        assert row["config"]["model"] == tiny_model and row["resolved"]["spec"] == row["spec"]
    assert all(rows[i]["metrics"]["flops_rel"] < 1 for i in range(1, 5))
    on_disk = _lines(tmp_path / "results.jsonl")
    assert [r["key"] for r in on_disk] == [r["key"] for r in rows]
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[2].startswith("| `none` | - | 144.0 (100.0%)") and md[4].startswith(f"| `{rows[2]['label']}` |")
    assert (tmp_path / "summary.csv").read_text().splitlines()[1].startswith("none,none,")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "model:" in (tmp_path / "config.yaml").read_text()

    # Same command again: every run is found, nothing is appended.
    again = runner.run_ablation(cfg, progress=False, echo=None)
    assert again.skipped == 5 and len(_lines(tmp_path / "results.jsonl")) == 5
    assert [r["predictions"] for r in again.rows] == [r["predictions"] for r in rows]


def test_budget_sweep_calibrates_each_knob_then_resumes(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path, "strategies=[topk, random, prumerge]", "budget.targets=[0.1, 0.3]",
               "calibration.limit=4", "sweep.random.seed=[0, 1]")
    rows = runner.run_ablation(cfg, progress=False, echo=None).rows
    assert [(r["label"], r["target"]) for r in rows[:5]] == [
        ("none", None), ("topk(keep=14)", 0.1), ("topk(keep=43)", 0.3),
        ("random(seed=0, keep=14)", 0.1), ("random(seed=0, keep=43)", 0.3),
    ]
    assert [r["label"].split("(")[0] for r in rows[5:]] == ["random", "random", "prumerge", "prumerge"]
    for row in rows[1:]:
        cal, m = row["calibration"], row["metrics"]
        assert cal["axis"] == "equiv_tokens" and cal["target"] == row["target"]
        assert cal["reachable"] == (abs(cal["budget"] - row["target"]) <= 0.01)
        if row["label"].startswith(("topk", "random")):  # vision-stage keep: the same budget on any split
            assert cal["reachable"]
            assert m["visual_layer_avg"] / m["visual_total"] == pytest.approx(cal["budget"])
    prumerge = [r for r in rows if r["label"].startswith("prumerge")]
    factors = [float(r["label"].split("iqr_factor=")[1].rstrip(")")) for r in prumerge]
    assert factors[0] > factors[1]  # a smaller fence keeps more outliers: more tokens for the larger target
    cache = (tmp_path / "calibration.json").read_text()

    again = runner.run_ablation(cfg, progress=False, echo=None)
    assert again.skipped == len(rows) and [r["label"] for r in again.rows] == [r["label"] for r in rows]
    assert (tmp_path / "calibration.json").read_text() == cache  # nothing measured again


def test_targets_out_of_reach_share_one_run_and_say_so(tiny_model, tmp_path):
    # FastV at K=2 keeps every image token in 2 of the 4 LLM layers: never below 50% equivalent tokens.
    cfg = _cfg(tiny_model, tmp_path, "strategies=[fastv]", "budget.targets=[0.1, 0.2]", "calibration.limit=2",
               "plot=false")
    outcome = runner.run_ablation(cfg, progress=False, echo=None)
    rows = outcome.rows
    assert [(r["label"], r["target"]) for r in rows] == [("none", None), ("fastv(keep=1)", 0.1), ("fastv(keep=1)", 0.2)]
    assert [r["calibration"]["reachable"] for r in rows[1:]] == [False, False]
    assert rows[1]["metrics"]["equiv_frac"] > 0.5
    assert outcome.reused == 1 and len(load_results(tmp_path / "results.jsonl")) == 2
    md = (tmp_path / "summary.md").read_text()
    assert "| 10% (not reached) |" in md and "| 20% (not reached) |" in md
    assert "### At each budget" not in md  # nothing reached a target: nothing to compare


def test_crash_mid_sweep_then_resume(tiny_model, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model, tmp_path, "strategies=[topk(keep=[4,8,16,32])]", "match_budget.reference=null")
    real, calls = runner._execute, []

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_execute", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        runner.run_ablation(cfg, progress=False, echo=None)
    first = (tmp_path / "results.jsonl").read_bytes()
    assert len(first.splitlines()) == 2  # baseline, keep=4; keep=8 was in progress

    monkeypatch.setattr(runner, "_execute", real)
    outcome = runner.run_ablation(cfg, progress=False, echo=None)
    assert outcome.skipped == 2
    data = (tmp_path / "results.jsonl").read_bytes()
    assert data.startswith(first)  # finished rows untouched
    rows = _lines(tmp_path / "results.jsonl")
    assert [r["label"] for r in rows] == ["none", "topk(keep=4)", "topk(keep=8)", "topk(keep=16)", "topk(keep=32)"]
    assert len({r["key"] for r in rows}) == 5


def test_torn_last_line_is_redone(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path, "strategies=[random(keep=8)]", "limit=3")
    runner.run_ablation(cfg, progress=False, echo=None)
    path = tmp_path / "results.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # a kill in the middle of writing the second row
    with pytest.warns(UserWarning, match="truncated"):
        outcome = runner.run_ablation(cfg, progress=False, echo=None)
    assert outcome.skipped == 1
    assert [r["label"] for r in _lines(path)] == ["none", "random(keep=8)"]


def test_changed_config_is_a_new_run(tiny_model, tmp_path):
    runner.run_ablation(_cfg(tiny_model, tmp_path, "strategies=[none]", "limit=2"), progress=False, echo=None)
    out = runner.run_ablation(_cfg(tiny_model, tmp_path, "strategies=[none]", "limit=2", "max_new_tokens=2"),
                              progress=False, echo=None)
    assert out.skipped == 0 and len(load_results(tmp_path / "results.jsonl")) == 2
    # The table shows this study's rows only.
    assert (tmp_path / "summary.md").read_text().count("`none`") == 1


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tokprune", "run", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_mid_sweep_then_rerun(tiny_model, tmp_path):
    args = [f"model={tiny_model}", f"output_dir={tmp_path}", "limit=8", "batch_size=2", "device=cpu",
            "strategies=[topk(keep=[2,4,6,8,10,12,14,16])]", "match_budget.reference=null", "plot=false", "--quiet",
            "budget.targets=[]"]
    paused = tmp_path / "paused"
    proc = subprocess.Popen(cli_pausing(paused, 2, *args), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    results = tmp_path / "results.jsonl"
    wait_for(paused, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun the command to resume" in err
    done = load_results(results)
    assert len(done) == 2
    rerun = _cli(*args)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    rows = load_results(results)
    assert len(rows) == 9 and len({r["key"] for r in rows}) == 9
    assert [r["key"] for r in rows[: len(done)]] == [r["key"] for r in done]
    assert f"({len(done)} already recorded)" in out


def test_torchrun_two_ranks_equals_single_process(tiny_model, tmp_path):
    common = [f"model={tiny_model}", "limit=7", "batch_size=2", "device=cpu", "plot=false", "--quiet", "budget.targets=[]", "sweep={}",
              "strategies=[cls_knee+text_interact, fastv(keep=20), random(keep=10)]", "match_budget.reference=null"]
    single = _cli(*common, f"output_dir={tmp_path / 'single'}")
    out, err = single.communicate(timeout=300)
    assert single.returncode == 0, err
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tokprune", "run", *common, f"output_dir={tmp_path / 'ddp'}"]
    ddp = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = load_results(tmp_path / "single" / "results.jsonl"), load_results(tmp_path / "ddp" / "results.jsonl")
    assert [r["key"] for r in a] == [r["key"] for r in b]  # world size is not part of a run's identity
    assert [r["env"]["world_size"] for r in b] == [2] * 4
    fields = ("question_id", "prediction", "score", "visual_kept", "tokens_layer_avg", "flops_pruned")
    for ra, rb in zip(a, b):
        assert [[p[f] for f in fields] for p in ra["predictions"]] == [[p[f] for f in fields] for p in rb["predictions"]]
        for key in ("accuracy", "agreement", "visual_kept_mean", "flops_rel", "accuracy_by_type"):
            assert ra["metrics"][key] == rb["metrics"][key]


def test_jsonl_dataset_yesno_end_to_end(tiny_model, tmp_path):
    from tokprune import data

    rows = []
    for i, s in enumerate(data.benchmark(n=8)):
        if s.qtype == "exist":
            s.image.save(tmp_path / f"{i}.png")
            rows.append({"question_id": s.question_id, "image": f"{i}.png", "text": s.question, "label": s.answer})
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tiny_model, tmp_path / "out", "dataset.name=jsonl", f"dataset.path={tmp_path / 'pope.jsonl'}",
               "strategies=[topk(keep=8)]")
    outcome = runner.run_ablation(cfg, progress=False, echo=None)
    m = outcome.rows[1]["metrics"]
    assert outcome.rows[1]["env"]["scorer"] == "yesno" and {"f1", "precision", "recall"} <= set(m)
    assert "f1" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dataset.name=jsonl", "dataset.path=/nonexistent/q.jsonl"], "dataset file not found: '/nonexistent/q.jsonl'"),
        (["strategies=[fastv, topkk]"], "unknown strategy 'topkk'"),
        (["model=/nonexistent/model"], "model '/nonexistent/model' is neither a local directory"),
        (["batch_sise=3"], "Did you mean 'batch_size'?"),
        (["nope.yaml"], "config file not found: 'nope.yaml'"),
        (["strategies=[fastv(layer=9)]"], "layer"),
        # the runner passes the budget scope to patch(): LLaVA-1.5 has no tiles, refused before any run
        (["budget_scope=tile", "strategies=[topk(keep=8)]"], "budget_scope='tile' is not available on llava"),
    ],
)
def test_cli_errors_are_clear(tiny_model, tmp_path, capsys, args, message):
    from tokprune.cli import main

    if "model=" not in " ".join(args) and args[0] != "nope.yaml":
        args = [*args, f"model={tiny_model}"]
    assert main(["run", *args, f"output_dir={tmp_path}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "tokprune", "run", "--help"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0 and "dotlist" in out.stdout and "torchrun" in out.stdout


def test_quiet_prints_table_only_and_output_dir_is_locked(tiny_model, tmp_path, capsys):
    import fcntl

    from tokprune.cli import main

    args = ["run", f"model={tiny_model}", f"output_dir={tmp_path}", "limit=2", "strategies=[none]", "plot=false"]
    assert main([*args, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("| run |") and "`none`" in out and "1 runs (0 already recorded)" in out
    assert "runs:" not in err and "[none] acc" not in out + err
    with (tmp_path / ".lock").open("w") as held:  # another invocation is running on this folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main([*args, "--quiet"]) == 2
    assert "another 'tokprune run' is writing to" in capsys.readouterr().err


def _embedded_installed() -> bool:
    from tokprune import models

    return (models.path("tiny-llava-shapes") / "config.json").is_file()


@pytest.mark.skipif(not _embedded_installed(), reason="the embedded checkpoint is not in this checkout yet")
def test_embedded_model_smoke(tmp_path):
    """The main job's defaults on the shipped model, cut to a few questions: the trained model answers
    far above chance, and pruning keeps some of it."""
    cfg = load_config(None, [f"output_dir={tmp_path}", "limit=24", "strategies=[cls_knee+text_interact, topk]",
                             "budget.targets=[0.14]", "calibration.limit=8"])
    rows = runner.run_ablation(cfg, progress=False, echo=None).rows
    assert [r["role"] for r in rows] == ["baseline", "swept", "swept"]
    assert rows[0]["metrics"]["accuracy"] >= 0.4  # a random-weight model scores about 0.02
    assert rows[1]["metrics"]["visual_kept_mean"] < rows[0]["metrics"]["visual_kept_mean"]
    assert rows[2]["label"] == "topk(keep=20)" and rows[2]["calibration"]["reachable"]
    assert (tmp_path / "curves.png").is_file()


def test_unwritable_output_dir_and_full_disk_are_clear_and_resumable(tiny_model, tmp_path, monkeypatch, capsys):
    from tokprune.ablation import results as results_module
    from tokprune.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    base = [f"model={tiny_model}", "limit=2", "device=cpu", "plot=false", "budget.targets=[]", "sweep={}", "--quiet"]
    assert main(["run", *base, f"output_dir={blocker / 'out'}", "strategies=[none]"]) == 2
    assert "cannot write to output_dir=" in capsys.readouterr().err

    out = tmp_path / "out"
    args = ["run", *base, f"output_dir={out}", "strategies=[topk(keep=[4, 8])]"]
    real = results_module.append_result
    calls = []

    def full_after_two(path, row):
        calls.append(row["label"])
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        real(path, row)

    monkeypatch.setattr(runner, "append_result", full_after_two)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot record run 'topk(keep=8)'" in err and "No space left on device" in err and "rerun" in err
    monkeypatch.setattr(runner, "append_result", real)
    assert len(load_results(out / "results.jsonl")) == 2
    assert main(args) == 0
    assert "(2 already recorded)" in capsys.readouterr().out
