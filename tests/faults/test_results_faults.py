"""Fault class 3, results and resume: files changed between runs, read-only, missing or full results,
foreign and hand-edited rows, garbage caches, and signals mid-run (SIGINT, SIGTERM, SIGKILL).

A resumed study reuses a recorded run only when nothing that changes its numbers changed (the dataset's
contents included); an output that cannot take the results is refused before the first run; a signal
loses at most the run in progress."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faults._kit import ENV, SMALL, cli_pausing, png_bytes, qa_rows, results, wait_for, write_rows

from tokprune.ablation import runner
from tokprune.ablation.results import ResultsError
from tokprune.errors import TokpruneError


def _jsonl(tmp_path, answer="zzz"):
    return write_rows(tmp_path / "data", qa_rows(2, answer))


def test_changed_answers_same_path_same_rows_are_not_stale(tmp_path, study):
    """The issue's case: every answer changed, same path and row count; the table must show the new accuracy."""
    path = _jsonl(tmp_path)
    data = ("dataset.name=jsonl", f"dataset.path={path}")
    first = study(tmp_path / "out", *data)
    assert first.rows[0]["metrics"]["accuracy"] == 0.0
    predictions = [p["prediction"] for p in first.rows[0]["predictions"]]
    rows = [{**r, "answer": p or "-"} for r, p in zip(qa_rows(2), predictions)]
    for i, r in enumerate(rows):
        r["image"] = f"img{i}.png"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second = study(tmp_path / "out", *data)
    assert second.skipped == 0
    assert second.rows[0]["metrics"]["accuracy"] == 1.0


def test_a_changed_image_reruns(tmp_path, study):
    path = _jsonl(tmp_path)
    data = ("dataset.name=jsonl", f"dataset.path={path}")
    study(tmp_path / "out", *data)
    (path.parent / "img1.png").write_bytes(png_bytes((0, 255, 0)))
    assert study(tmp_path / "out", *data).skipped == 0


def test_an_unchanged_dataset_resumes(tmp_path, study):
    path = _jsonl(tmp_path)
    data = ("dataset.name=jsonl", f"dataset.path={path}")
    study(tmp_path / "out", *data)
    os.utime(path)  # touched, not changed
    again = study(tmp_path / "out", *data)
    assert again.skipped == 2 and len(results(tmp_path / "out")) == 2


def test_model_weights_changed_at_the_same_size_rerun(tmp_path, study):
    from safetensors.torch import load_file, save_file

    from tokprune import models

    model = tmp_path / "model"
    shutil.copytree(models.path("tiny-llava-shapes"), model)
    study(tmp_path / "out", f"model={model}", "strategies=[]")
    weights = load_file(model / "model.safetensors")
    size = (model / "model.safetensors").stat().st_size
    save_file(
        {k: v * 1.01 if v.is_floating_point() else v for k, v in weights.items()},
        model / "model.safetensors",
        metadata={"format": "pt"},
    )
    assert (model / "model.safetensors").stat().st_size == size
    assert study(tmp_path / "out", f"model={model}", "strategies=[]").skipped == 0


def _deny_results(monkeypatch, out: Path) -> None:
    """Make results.jsonl refuse writes (EACCES), as a read-only file does for a non-root user."""
    real = os.open
    target = str(out / "results.jsonl")

    def guarded(path, flags, *args, **kwargs):
        if str(path) == target and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded)


def test_a_read_only_results_file_is_found_before_the_first_run(tmp_path, study, monkeypatch):
    study(tmp_path)
    _deny_results(monkeypatch, tmp_path)
    monkeypatch.setattr(runner, "_execute", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(runner.OutputError, match=r"results\.jsonl.*Permission denied.*(output_dir|permissions)"):
        study(tmp_path, "strategies=[topk, fastv]")


def test_too_little_free_space_is_found_before_the_first_run(tmp_path, study, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 4096))
    monkeypatch.setattr(runner, "open_session", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(
        runner.OutputError, match=r"only 4\.0 KB free.*needs about.*free space or choose another output_dir"
    ):
        study(tmp_path)


def test_a_full_disk_mid_study_keeps_the_recorded_runs(tmp_path, study, monkeypatch):
    from tokprune.ablation import results as results_module

    real = results_module.append_result
    calls = []

    def full_after_first(path, row):
        calls.append(row["label"])
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, row)

    monkeypatch.setattr(runner, "append_result", full_after_first)
    with pytest.raises(runner.OutputError, match=r"No space left.*rerun the command to resume"):
        study(tmp_path)
    assert [r["label"] for r in results(tmp_path)] == ["none"]
    monkeypatch.setattr(runner, "append_result", real)
    assert study(tmp_path).skipped == 1


def test_a_missing_results_file_reruns_everything(tmp_path, study):
    study(tmp_path)
    (tmp_path / "results.jsonl").unlink()
    again = study(tmp_path)
    assert again.skipped == 0 and len(results(tmp_path)) == 2


def test_results_file_that_is_a_folder(tmp_path, study, monkeypatch):
    (tmp_path / "results.jsonl").mkdir()
    monkeypatch.setattr(runner, "open_session", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(TokpruneError, match=r"results\.jsonl.*(folder|directory)"):
        study(tmp_path)


def test_output_dir_that_is_a_file(tmp_path, study):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(runner.OutputError, match=r"output_dir=.*out.*writable folder"):
        study(tmp_path / "out")
    assert (tmp_path / "out").read_text() == "mine"


def test_foreign_rows_are_refused_naming_the_line(tmp_path, study):
    (tmp_path / "results.jsonl").write_text('{"epoch": 1, "loss": 0.3}\n')
    with pytest.raises(ResultsError, match=r"results\.jsonl:1: not a results row.*another output_dir"):
        study(tmp_path)
    assert (tmp_path / "results.jsonl").read_text() == '{"epoch": 1, "loss": 0.3}\n'


def test_a_hand_edited_row_is_refused_naming_the_line(tmp_path, study):
    """A row whose numbers were changed by hand is not reported as if measured."""
    study(tmp_path)
    path = tmp_path / "results.jsonl"
    rows = results(tmp_path)
    rows[1]["metrics"]["accuracy"] = 0.99
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ResultsError, match=r"results\.jsonl:2: .*edited.*delete that line"):
        study(tmp_path)


def test_a_hand_broken_line_in_the_middle_is_refused(tmp_path, study):
    study(tmp_path)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0][:-5] + "\n" + lines[1] + "\n")
    with pytest.raises(ResultsError, match=r"results\.jsonl:1: not a valid JSON row"):
        study(tmp_path)


def test_a_torn_last_line_is_redone(tmp_path, study):
    study(tmp_path)
    path = tmp_path / "results.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 50])
    with pytest.warns(UserWarning, match="truncated last line"):
        again = study(tmp_path)
    assert again.skipped == 1 and len(results(tmp_path)) == 2


@pytest.mark.parametrize("garbage", [b"\xff\xfe garbage", b"[1, 2, 3]", b'{"x": "not a cache"}', b"{"], ids=repr)
def test_a_garbage_calibration_cache_is_measured_again(tmp_path, study, garbage):
    (tmp_path / "calibration.json").write_bytes(garbage)
    outcome = study(tmp_path, "budget.targets=[0.5]", "strategies=[topk]", "calibration.limit=2")
    assert [r["role"] for r in outcome.rows] == ["baseline", "swept"]
    assert isinstance(json.loads((tmp_path / "calibration.json").read_text()), dict)


# ------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_ctrl_c_or_sigterm_mid_run_exits_130_and_loses_only_that_run(tmp_path, study, monkeypatch, capsys, sig):
    """The signal arrives in the middle of the second run (in this process, at a known point, through the
    handlers ``tokprune run`` really has: Python's for SIGINT, the command's own for SIGTERM)."""
    from tokprune import cli as top

    study(tmp_path / "warm")  # the embedded model is loaded and cached
    real = runner.Session._generate

    def interrupted(self, samples, timer):
        if (tmp_path / "results.jsonl").exists() and len(results(tmp_path)) == 1:
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler runs here
        return real(self, samples, timer)

    monkeypatch.setattr(runner.Session, "_generate", interrupted)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = top.main(["run", *SMALL, "strategies=[topk, fastv]", f"output_dir={tmp_path}", "--quiet"])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err
    assert code == 130 and "rerun the command to resume" in err and "Traceback" not in err, err
    assert [r["label"] for r in results(tmp_path)] == ["none"]
    monkeypatch.setattr(runner.Session, "_generate", real)
    outcome = study(tmp_path, "strategies=[topk, fastv]")
    assert outcome.skipped == 1 and [r["label"] for r in results(tmp_path)] == ["none", "topk", "fastv"]


def test_sigkill_mid_study_loses_only_the_run_in_progress(tmp_path, study):
    """A study of three runs in a subprocess, killed once its first run is recorded; the rerun resumes."""
    paused = tmp_path / "paused"
    proc = subprocess.Popen(
        cli_pausing(paused, 1, *SMALL, "strategies=[topk, fastv]", "batch_size=1", f"output_dir={tmp_path}", "--quiet"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(paused, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = results(tmp_path)  # every line whole
    assert len(done) == 1
    outcome = study(tmp_path, "strategies=[topk, fastv]", "batch_size=1")
    assert outcome.skipped == len(done) and len(results(tmp_path)) == 3
