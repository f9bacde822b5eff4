"""The append-only results file: one JSON line per finished run.

A row is written with a single ``write`` of the whole line, then flushed and fsynced before the next run
starts, so a killed sweep loses at most the run in progress. A kill during that one write can leave a
truncated last line; :func:`load_results` cuts it off (the run is simply redone). A bad line anywhere
else is not something a kill produces, so it is an error naming the line rather than a silent repair.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import TokpruneError

__all__ = ["ResultsError", "append_result", "load_results", "row_digest", "run_key"]


class ResultsError(TokpruneError, ValueError):
    """The results file is damaged somewhere other than a truncated last line."""


def run_key(resolved: dict[str, Any]) -> str:
    """Stable id of a run's resolved config: rerunning skips a run whose key is already recorded."""
    blob = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def row_digest(row: dict[str, Any]) -> str:
    """Digest of a row's contents (without its ``digest``), written with it: a row edited by hand afterwards
    no longer matches, and is refused rather than reported as measured."""
    body = {k: v for k, v in row.items() if k != "digest"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def append_result(path: str | Path, row: dict[str, Any]) -> None:
    """Append one row durably (one write, flush, fsync), with its :func:`row_digest`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Round-trip first, so the digest is of exactly what a reader will parse (tuples become lists, ...).
    row = json.loads(json.dumps(row, default=_jsonable))
    row = {**row, "digest": row_digest(row)}
    line = (json.dumps(row, separators=(",", ":"), default=_jsonable) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = os.fstat(fd).st_size
    try:
        view = memoryview(line)
        while view:  # os.write may write less than asked on some filesystems
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:
        # A full disk (or quota) mid-line: cut the partial line so the file stays a list of whole rows.
        # Should the cut fail too, load_results drops a truncated last line anyway.
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def load_results(path: str | Path, repair: bool = True, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every complete row; a truncated last line (a kill mid-write) is dropped, and cut from the file
    when ``repair``, so the next append starts on a fresh line. A row lacking a ``required`` key (the
    runner passes :data:`ROW_KEYS`) is an error naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    good_end = 0
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        last = i == len(lines) - 1
        if last and raw == b"":
            break  # the file ends with a newline: nothing after it
        try:
            row = json.loads(raw) if raw.strip() else None
        except json.JSONDecodeError:
            row = _BAD
        if row is _BAD or (last and row is not None):
            # A row without its newline is incomplete even if it parses: the write was cut short.
            if last:
                warnings.warn(
                    f"{path}: dropping a truncated last line ({len(raw)} bytes, from an interrupted run); "
                    "that run will be redone",
                    stacklevel=2,
                )
                if repair:
                    with path.open("r+b") as fh:
                        fh.truncate(good_end)
                break
            raise ResultsError(f"{path}:{i + 1}: not a valid JSON row; fix or delete that line")
        if row is not None:
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise ResultsError(
                    f"{path}:{i + 1}: not a results row of tokprune run (missing {', '.join(map(repr, missing))}); "
                    "the file was written by something else or an incompatible version: move it away, or use another "
                    "output_dir"
                )
            if isinstance(row, dict) and "digest" in row and row["digest"] != row_digest(row):
                raise ResultsError(
                    f"{path}:{i + 1}: this row was edited after it was written (its digest no longer matches its "
                    "contents), so its numbers are not the measured ones; delete that line to redo the run, or restore it"
                )
            rows.append(row)
        good_end += len(raw) + 1
    return rows


_BAD = object()
#: Keys every row needs for resume and the report.
ROW_KEYS = ("key", "label", "spec", "role", "metrics", "predictions")
