"""Fault classes 5 and 6, the environment (ASCII-only stdout, an unwritable home, low memory, a closed
pipe) and errors that are tokprune's: every expected failure of ``tokprune run`` (config, data, model
loading, output) is one line naming the problem and the fix, exit status 2; a real bug keeps its
traceback behind ``--debug`` or ``TOKPRUNE_DEBUG=1``."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pytest
from faults._kit import ENV, SMALL, cli, qa_rows, write_rows

from tokprune import cli as top
from tokprune.ablation import runner


def _main(capsys, *args: str) -> tuple[int, str, str]:
    code = top.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ----------------------------------------------------------------------------------------- environment


class _AsciiStdout(io.TextIOWrapper):
    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="ascii")


def test_ascii_only_stdout_prints_the_table(tmp_path, study, monkeypatch, capsys):
    """``PYTHONIOENCODING=ascii``: every run finished; printing the table must not die on the delta sign."""
    study(tmp_path)
    fake = _AsciiStdout()
    monkeypatch.setattr(sys, "stdout", fake)
    code = top.main(["run", *SMALL, "strategies=[topk]", f"output_dir={tmp_path}", "--quiet"])
    fake.flush()
    text = fake.buffer.getvalue().decode("ascii")
    assert code == 0 and "| `topk` |" in text and "acc" in text
    assert "2 runs (2 already recorded)" in text


def test_a_closed_stdout_pipe_is_quiet(tmp_path, study, monkeypatch, capsys):
    """``tokprune run ... | head -1``: the reader went away; no traceback, the runs are recorded."""
    study(tmp_path)

    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    code = top.main(["run", *SMALL, "strategies=[topk]", f"output_dir={tmp_path}", "--quiet"])
    err = capsys.readouterr().err
    assert code in (0, 141) and "Traceback" not in err


def test_an_unwritable_home_still_runs(tmp_path):
    """HOME is a file (caches and config folders under it cannot be created): the study still runs."""
    home = tmp_path / "home"
    home.write_text("not a folder")
    env = {**ENV, "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"), "MPLCONFIGDIR": str(home / "mpl")}
    env.pop("HF_HOME", None)
    proc = subprocess.run(
        cli(*SMALL, "strategies=[]", f"output_dir={tmp_path / 'out'}", "--quiet"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| `none` |" in proc.stdout and "Traceback" not in proc.stderr


def test_out_of_memory_loading_the_model_is_one_line(tmp_path, monkeypatch, capsys):
    def oom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(runner, "load_model", oom)
    code, _, err = _main(capsys, "run", *SMALL, f"output_dir={tmp_path}", "--quiet")
    _one_line_error(code, err, "out of memory", "batch_size")


def test_out_of_memory_during_a_run_is_one_line(tmp_path, study, monkeypatch, capsys):
    import torch

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    study(tmp_path / "warm")  # the embedded model is loaded (and cached) before the fault
    monkeypatch.setattr(runner.Session, "_generate", oom)
    code, _, err = _main(capsys, "run", *SMALL, "strategies=[topk]", f"output_dir={tmp_path / 'out'}", "--quiet")
    _one_line_error(code, err, "out of memory", "batch_size (now 2)")


# --------------------------------------------------------------------------------- errors are tokprune's


def test_a_config_error_is_one_line_with_exit_2(tmp_path, capsys):
    code, _, err = _main(capsys, "run", *SMALL, "strategies=[]", f"output_dir={tmp_path}", "budget.tolerance=nan")
    _one_line_error(code, err, "budget.tolerance", "nan")


def test_an_interpolation_error_is_one_line_with_exit_2(capsys):
    code, _, err = _main(capsys, "run", "output_dir=${nope}")
    _one_line_error(code, err, "output_dir", "nope")


def test_a_data_error_is_one_line_with_exit_2(tmp_path, capsys):
    path = write_rows(tmp_path, qa_rows(1))
    path.write_bytes(path.read_bytes() + b'{"question_id": 7}\n')
    code, _, err = _main(
        capsys, "run", *SMALL, "dataset.name=jsonl", f"dataset.path={path}", f"output_dir={tmp_path / 'o'}"
    )
    _one_line_error(code, err, "q.jsonl:2", "skip_bad_rows")


def _checkpoint(tmp_path, drop: tuple[str, ...] = (), cut: bool = False):
    from tokprune import models

    out = tmp_path / "ckpt"
    shutil.copytree(models.path("tiny-llava-shapes"), out)
    for name in drop:
        (out / name).unlink()
    if cut:
        data = (out / "model.safetensors").read_bytes()
        (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize(
    ("drop", "cut", "needle"),
    [
        ((), True, "model.safetensors"),
        (("tokenizer.json", "tokenizer_config.json", "processor_config.json"), False, "processor"),
        (("model.safetensors",), False, "weights"),
        (("config.json",), False, "config.json"),
    ],
    ids=["truncated_safetensors", "no_processor_files", "no_weights", "no_config_json"],
)
def test_a_broken_checkpoint_is_one_line_with_exit_2(tmp_path, capsys, drop, cut, needle):
    model = _checkpoint(tmp_path, drop, cut)
    code, _, err = _main(capsys, "run", *SMALL, f"model={model}", f"output_dir={tmp_path / 'o'}", "-q")
    _one_line_error(code, err, str(model), needle)


def test_an_output_error_is_one_line_with_exit_2(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    code, _, err = _main(capsys, "run", *SMALL, f"output_dir={tmp_path / 'taken'}", "-q")
    _one_line_error(code, err, "output_dir", "writable folder")


def test_a_garbage_config_file_is_one_line_with_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00strategies: [")
    code, _, err = _main(capsys, "run", str(path))
    assert code == 2 and "c.yaml" in err and "Traceback" not in err


def _bug(*a, **k):
    raise ZeroDivisionError("a real bug")


def test_a_real_bug_hides_its_traceback_and_says_how_to_see_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_ablation", _bug)
    monkeypatch.delenv("TOKPRUNE_DEBUG", raising=False)
    code, _, err = _main(capsys, "run", *SMALL, f"output_dir={tmp_path}")
    assert code == 1 and "ZeroDivisionError: a real bug" in err
    assert "--debug" in err and "TOKPRUNE_DEBUG=1" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["flag_first", "flag_last", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys, how):
    monkeypatch.setattr(runner, "run_ablation", _bug)
    args = ["run", *SMALL, f"output_dir={tmp_path}"]
    if how == "flag_first":
        args = ["--debug", *args]
    elif how == "flag_last":
        args = [*args, "--debug"]
    else:
        monkeypatch.setenv("TOKPRUNE_DEBUG", "1")
    code, _, err = _main(capsys, *args)
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err


def test_debug_shows_the_traceback_of_an_expected_error_too(tmp_path, capsys):
    code, _, err = _main(
        capsys, "--debug", "run", *SMALL, "strategies=[]", f"output_dir={tmp_path}", "budget.tolerance=nan"
    )
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_a_plain_command_error_is_one_line(capsys):
    code, _, err = _main(capsys, "describe", "topkk")
    _one_line_error(code, err, "topkk", "topk")
