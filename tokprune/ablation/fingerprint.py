"""Fingerprints of what a run reads, for its identity on resume: the dataset's contents and the model's
checkpoint files.

A recorded run is reused only when its key matches, and the key hashes these fingerprints: a dataset
file whose answers changed (same path, same row count) or an image replaced under the same name is a
different run, not a stale one. Both are content fingerprints: touching or copying a file changes
nothing, reformatting a JSONL file changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["WEIGHT_PATTERNS", "checkpoint_fingerprint", "content_digest", "image_digest", "samples_fingerprint"]

#: Weight files of a checkpoint (what ``from_pretrained`` reads), besides ``config.json``.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
#: How much of each weight file the model fingerprint reads: ``_CHUNKS`` windows of ``_CHUNK`` bytes
#: spread evenly over the file (the whole file when it is smaller), so a 15 GB checkpoint costs 1 MB.
_CHUNK = 1 << 16
_CHUNKS = 16


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def image_digest(image: Any) -> str:
    """Digest of an in-memory PIL image's mode, size and pixels (the embedded benchmark's images)."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:16]


def samples_fingerprint(samples: Iterable[Any]) -> str:
    """Digest of every question, answer, type and image digest of ``samples`` (``EvalSample``), in order."""
    h = hashlib.sha256()
    for s in samples:
        record = [s.question_id, s.question, list(s.answers), s.qtype, s.image_digest]
        h.update(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()[:16]


def _file_sample(path: Path) -> bytes:
    size = path.stat().st_size
    with path.open("rb") as fh:
        if size <= _CHUNK * _CHUNKS:
            return fh.read()
        parts = []
        for i in range(_CHUNKS):
            fh.seek((size - _CHUNK) * i // (_CHUNKS - 1))
            parts.append(fh.read(_CHUNK))
        return b"".join(parts)


def checkpoint_fingerprint(root: str | Path) -> str:
    """Digest of ``config.json`` and of each weight file's name, size and sampled contents.

    Weights rewritten at the same size (a fine-tune, a re-quantisation) change the sampled windows;
    the windows include each file's header (safetensors: tensor names, shapes and offsets).
    """
    root = Path(root)
    config = root / "config.json"
    h = hashlib.sha256(config.read_bytes() if config.is_file() else b"")
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in root.glob(pattern) if f.is_file()})
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        h.update(hashlib.sha256(_file_sample(f)).digest())
    return h.hexdigest()[:16]
