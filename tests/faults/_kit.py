"""Shared pieces of the fault-injection suite (issue 23): a JSONL dataset writer, images good and bad,
and a study runner that loads the embedded model once per session.

Each case injects one fault and asserts what a user should get: a clear error naming the bad value and
the fix, or a correct result with nothing lost. In-process unless the fault is a process-level one
(signals, the environment a process starts with).
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MPLBACKEND": "Agg",
}
#: A study small enough for a test: two questions, one pruned run, no budget sweep, no plot.
SMALL = ("limit=2", "batch_size=2", "device=cpu", "budget.targets=[]", "sweep={}", "plot=false")


def cli(*args: str) -> list[str]:
    """``python -m tokprune run ARGS`` as a subprocess argv."""
    return [sys.executable, "-m", "tokprune", "run", *args]


def cli_pausing(flag: Path, after: int, *args: str) -> list[str]:
    """``tokprune run ARGS`` as a subprocess argv that, once its ``after``-th run is recorded, creates
    ``flag`` and waits there (two minutes) for the test's signal.

    A study small enough for a test can finish between two polls of its results file on a fast machine;
    waiting at a known point makes "a signal mid-study" the same on every machine.
    """
    script = (
        "import pathlib, sys, time\n"
        "from tokprune.ablation import runner\n"
        "from tokprune.cli import main\n"
        "append, recorded = runner.append_result, []\n"
        "def append_then_wait(path, row):\n"
        "    append(path, row)\n"
        "    recorded.append(row)\n"
        f"    if len(recorded) == {int(after)}:\n"
        f"        pathlib.Path({str(flag)!r}).touch()\n"
        "        time.sleep(120)\n"
        "runner.append_result = append_then_wait\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return [sys.executable, "-c", script, "run", *args]


def wait_for(flag: Path, proc: Any, timeout: float = 120.0) -> None:
    """Wait until ``flag`` exists; fail with the process's stderr if it ends or the time runs out first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not flag.exists():
        time.sleep(0.02)
    if not flag.exists():
        proc.kill()
        pytest.fail(f"the study never reached its pause point: {proc.communicate(timeout=60)[1][-3000:]}")


# ------------------------------------------------------------------------------------------------ images


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 24) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size: int = 48, seed: int = 0) -> bytes:
    """A JPEG with real content (noise), so that cutting it loses pixel data, not just padding."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG header claiming ``width x height`` pixels (10 gigapixels: a decompression bomb) and one
    small IDAT: Pillow refuses it on open, before decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------------------------- datasets


def write_rows(folder: Path, rows: list[dict[str, Any]], name: str = "q.jsonl") -> Path:
    """A JSONL file of ``rows``; rows without an ``image`` get a fresh good PNG each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        if "image" not in row:
            (folder / f"img{i}.png").write_bytes(png_bytes((40 * i % 255, 90, 160)))
            row["image"] = f"img{i}.png"
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int = 2, answer: str = "red") -> list[dict[str, Any]]:
    return [{"question_id": f"q{i}", "question": "What color is the square?", "answer": answer} for i in range(n)]


# ---------------------------------------------------------------------------------------------- studies

_LOADED: dict[str, Any] = {}


@pytest.fixture
def study(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """``study(out_dir, *overrides)`` runs a small study in-process on the embedded model and returns its
    :class:`~tokprune.ablation.runner.RunOutcome`. The embedded model is loaded once per session (only
    for the embedded model: any other ``model=`` loads for real)."""
    from tokprune.ablation import runner
    from tokprune.ablation.config import EMBEDDED_MODEL, load_config

    real = runner.load_model

    def cached(cfg: Any, device: Any) -> Any:
        if cfg.model != EMBEDDED_MODEL:
            return real(cfg, device)
        if "embedded" not in _LOADED:
            _LOADED["embedded"] = real(cfg, device)
        return _LOADED["embedded"]

    monkeypatch.setattr(runner, "load_model", cached)

    def run(out_dir: Path, *overrides: str, echo: Any = None) -> Any:
        cfg = load_config(None, [*SMALL, "strategies=[topk]", f"output_dir={out_dir}", *overrides])
        return runner.run_ablation(cfg, progress=False, echo=echo)

    return run


def results(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
