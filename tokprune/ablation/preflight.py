"""Checks a study makes before its first run, so that a fault is found in a second, not after an hour of
work: the output can take the results (writable, enough free space, no user file in the way), the
checkpoint is complete, and every question is one the model's processor can take.

Each check raises an error of tokprune naming the file or the row and the fix; the runner calls them
in order (output, checkpoint, model loading, questions).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import TokpruneError
from .datasets import Dataset, DatasetError
from .fingerprint import WEIGHT_PATTERNS

__all__ = [
    "CONFIG_HEADER",
    "ModelLoadError",
    "OutputError",
    "check_checkpoint",
    "check_output",
    "loading_model",
    "screen_questions",
    "write_config",
]

#: First line of the ``config.yaml`` tokprune writes into ``output_dir``: how it recognises its own copy.
CONFIG_HEADER = "# tokprune run: the resolved config of this study (rewritten by every run; edit a copy elsewhere)\n"
#: Bytes a study's results need, per run and per question (a prediction with its per-sample numbers),
#: plus the report and plot: an estimate with room to spare.
_PER_RUN, _PER_QUESTION, _REPORT = 16 << 10, 1 << 10, 4 << 20


class OutputError(TokpruneError, OSError):
    """The output folder cannot be written (permissions, a full disk, a user's file in the way)."""


class ModelLoadError(TokpruneError, OSError):
    """The checkpoint cannot be loaded: a missing or damaged file."""


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ----------------------------------------------------------------------------------------------- output


def check_output(out_dir: Path, results_file: str, runs: int, questions: int | None) -> None:
    """The results file is a writable file (when it exists) and the disk has room for ``runs`` runs."""
    path = out_dir / results_file
    if path.is_dir():
        raise OutputError(f"{str(path)!r} is a folder, not a results file; move it away or choose another output_dir")
    if path.exists():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            raise OutputError(
                f"cannot append to {str(path)!r} ({exc.strerror or exc}); nothing has run yet: fix its permissions "
                "(chmod u+w) or choose another output_dir"
            ) from None
    need = _REPORT + runs * (_PER_RUN + _PER_QUESTION * (questions or 1000))
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise OutputError(
            f"only {_human(free)} free on the disk of output_dir={str(out_dir)!r}; this study of {runs} runs needs "
            f"about {_human(need)} for its results and report: free space or choose another output_dir"
        )


def write_config(path: Path, text: str) -> None:
    """Write the resolved config ``text`` to ``path``, refusing to replace a file tokprune did not write (the
    user's own config, when ``output_dir`` is the folder it lives in).

    tokprune's copy starts with :data:`CONFIG_HEADER`. A file without it is replaced only when it already
    holds exactly ``text`` (an older version's copy of this same study): then nothing of it is lost.
    """
    try:
        if path.exists():
            existing = path.read_text(encoding="utf-8", errors="replace")
            if not (existing.startswith(CONFIG_HEADER) or existing == text):
                raise OutputError(
                    f"{str(path)!r} was not written by tokprune (your own config?) and is left as it is; choose "
                    f"another output_dir (e.g. output_dir={str(path.parent / 'run')}), or delete that file if an "
                    "earlier tokprune run wrote it"
                )
        path.write_text(CONFIG_HEADER + text, encoding="utf-8")
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(
            f"cannot write {str(path)!r} ({exc.strerror or exc}); choose a writable folder, e.g. output_dir=runs/mine"
        ) from None


# ------------------------------------------------------------------------------------------ checkpoint


def _check_safetensors(path: Path) -> None:
    """The header's tensors end exactly at the file's end: a cut (or overwritten) file is found by name."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
        except (ValueError, UnicodeDecodeError):
            header = None
    ends = [t["data_offsets"][1] for k, t in (header or {}).items() if k != "__metadata__" and isinstance(t, dict)]
    if header is None or 8 + n + max(ends, default=0) != size:
        raise ModelLoadError(
            f"weights file {str(path)!r} is truncated or damaged ({size} bytes; its header "
            f"{'cannot be read' if header is None else f'needs {8 + n + max(ends, default=0)}'}); "
            "copy or download the checkpoint again"
        )


def check_checkpoint(root: str | Path) -> None:
    """A local checkpoint folder has weights, and its safetensors files are whole."""
    root = Path(root)
    weights = [f for pattern in WEIGHT_PATTERNS for f in root.glob(pattern) if f.is_file()]
    if not weights:
        raise ModelLoadError(
            f"model={str(root)!r} has no weights (*.safetensors or *.bin next to config.json); copy the whole checkpoint"
        )
    for f in weights:
        if f.suffix == ".safetensors":
            _check_safetensors(f)


@contextlib.contextmanager
def loading_model(path: str) -> Iterator[None]:
    """Turn a failure inside ``from_pretrained`` into one line naming the checkpoint and the fix (running
    out of memory is left to the caller, which knows the batch size)."""
    import torch

    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, TokpruneError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, safetensors errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        what = "processor" if _is_processor_failure(exc) else "model"
        fix = (
            "it needs its processor files (tokenizer.json or tokenizer.model, tokenizer_config.json, "
            "processor_config.json or preprocessor_config.json)"
            if what == "processor"
            else "check that it is a complete HF checkpoint (config.json and its weights) of a supported family "
            "(tokprune adapters)"
        )
        raise ModelLoadError(
            f"cannot load the {what} at model={path!r} ({type(exc).__name__}: {first}); {fix}"
        ) from None


def _is_processor_failure(exc: BaseException) -> bool:
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return any(("processing_" in f or "tokenization" in f or "image_processing" in f) for f in frames) or any(
        word in str(exc).lower() for word in ("tokenizer", "processor")
    )


# -------------------------------------------------------------------------------------------- questions


def _markers(processor: Any) -> list[str]:
    """Text the processor reads as part of its template: the tokenizer's special tokens and the image marker."""
    tok = getattr(processor, "tokenizer", processor)
    found = set(getattr(tok, "all_special_tokens", []) or [])
    for attr in ("image_token", "video_token"):
        value = getattr(processor, attr, None) or getattr(tok, attr, None)
        if isinstance(value, str):
            found.add(value)
    return sorted((m for m in found if m and m.strip()), key=len, reverse=True)


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _prompt_lengths(processor: Any, samples: list[Any], questions: list[str]) -> list[int]:
    """Tokens of each sample's prompt with its image and template: the processor measures one sample whole
    (image tokens and template), the tokenizer counts every question (batched); ``[]`` without samples.
    On families whose image token count depends on the image's size this is an estimate."""
    if not samples:
        return []
    from .loading import build_prompts  # the prompts the runner builds, measured the same way

    tok = getattr(processor, "tokenizer", processor)
    counts = [len(ids) for ids in tok(questions, add_special_tokens=False)["input_ids"]]
    whole = processor(
        text=build_prompts(processor, questions[:1]), images=[[samples[0].load_image()]], return_tensors="pt"
    )
    base = int(whole["input_ids"].shape[1]) - counts[0]
    return [base + c for c in counts]


def screen_questions(dataset: Dataset, processor: Any, model: Any, prompt_suffix: str, skip_bad_rows: bool) -> None:
    """Refuse (or, with ``skip_bad_rows``, skip and count) questions the model's processor cannot take: one
    holding a marker of its template (``<image>``, ``</s>``, ...), which the processor would read as part of
    the prompt, and one whose prompt is longer than the model's positions. Edits ``dataset`` in place."""
    markers = _markers(processor)
    reasons: dict[int, str] = {}
    for i, sample in enumerate(dataset.samples):
        marker = next((m for m in markers if m in sample.question), None)
        if marker is not None:
            reasons[i] = (
                f"question {sample.question_id!r} contains {marker!r}, a marker of the model's template that the "
                "processor would read as part of the prompt; remove it from the question"
            )
    limit = _max_positions(model)
    if limit is not None:
        clean = [i for i in range(len(dataset.samples)) if i not in reasons]
        samples = [dataset.samples[i] for i in clean]
        questions = [s.question + prompt_suffix for s in samples]
        if dataset.inputs is not None and samples:  # a dataset that builds its own inputs measures them
            tok = processor.tokenizer
            base = int(dataset.inputs(tok, samples[:1], questions[:1])["input_ids"].shape[1])
            counts = [len(ids) for ids in tok(questions, add_special_tokens=False)["input_ids"]]
            lengths = [base - counts[0] + c for c in counts]
        else:
            lengths = _prompt_lengths(processor, samples, questions)
        for i, n in zip(clean, lengths):
            if n > limit:
                reasons[i] = (
                    f"question {dataset.samples[i].question_id!r} makes a prompt of {n} tokens with its image and "
                    f"template, past the model's {limit} positions (max_position_embeddings); shorten it"
                )
    for i in sorted(reasons):
        if not skip_bad_rows:
            raise DatasetError(
                f"{dataset.name}: {reasons[i]}, or set dataset.skip_bad_rows=true to skip and count such rows"
            )
        dataset.skipped.append(reasons[i])
    if reasons and len(reasons) == len(dataset.samples):
        raise DatasetError(f"{dataset.name}: no usable rows ({len(dataset.skipped)} skipped)")
    dataset.samples[:] = [s for i, s in enumerate(dataset.samples) if i not in reasons]
