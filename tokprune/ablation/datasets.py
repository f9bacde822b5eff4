"""Evaluation datasets and their scorers.

* ``shapes``: the embedded synthetic benchmark (:func:`tokprune.data.benchmark`), scored per question type.
* ``clips``: the embedded video benchmark (:func:`tokprune.data.clips.clip_benchmark`), or with ``path`` a
  JSONL file of clips (``{"question_id", "video": [frame image paths], "question", "answer", "qtype"}``, as
  :func:`tokprune.data.clips.export_clips` writes); its samples build their own model inputs (``Dataset.inputs``).
* ``jsonl``: a local file in the LLaVA evaluation format, one JSON object per line::

      {"question_id": 1, "image": "val/0001.jpg", "text": "Is there a dog?", "label": "yes"}
      {"question_id": "q2", "image": "0002.png", "question": "What colour?", "answers": ["red", "red", "dark red"]}

  ``question`` or ``text``; ``answer`` (a string), ``answers`` (strings, or VQAv2-style ``{"answer": ...}``
  dicts) or ``label`` (POPE); optional ``qtype``/``question_type``/``category`` for per-type accuracy.
  ``image`` resolves against ``image_folder`` when given, else against the JSONL file's folder.

Scorers: ``exact`` (normalised exact match against any answer), ``vqa`` (min(#matching answers / 3, 1)),
``yesno`` (POPE: accuracy plus precision/recall/F1 of "yes" with scikit-learn) and ``shapes``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import TokpruneError
from .config import DatasetConfig

__all__ = [
    "Dataset",
    "DatasetError",
    "EvalSample",
    "Scorer",
    "get_scorer",
    "load_dataset",
    "load_jsonl",
]


class DatasetError(TokpruneError, ValueError):
    """A dataset file that is missing or has a bad row (the message names the file and line)."""


@dataclass
class EvalSample:
    """One question. ``image`` is a PIL image or a path opened when the sample's batch runs."""

    question_id: str
    image: Any
    question: str
    answers: tuple[str, ...]
    qtype: str | None = None
    source: Any = None  # the original object (a shapes Sample), for scorers that need it
    image_digest: str | None = None  # of the image's bytes (or pixels): part of the dataset's fingerprint

    def load_image(self) -> Any:
        if isinstance(self.image, (str, Path)):
            from PIL import Image

            try:
                with Image.open(self.image) as im:
                    return im.convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                # It decoded when the dataset loaded: the file changed (or went away) since.
                raise DatasetError(
                    f"image {str(self.image)!r} of question {self.question_id!r} cannot be decoded "
                    f"({type(exc).__name__}: {exc}); it changed since the dataset was loaded: restore it and rerun "
                    "the command (finished runs are kept)"
                ) from None
        return self.image


InputBuilder = Callable[[Any, Sequence[EvalSample], Sequence[str]], dict[str, Any]]
"""``(tokenizer, samples, questions) -> model inputs``: a dataset whose samples are not one image each
(clips) builds its batches itself instead of through the model's processor."""


@dataclass
class Dataset:
    name: str
    samples: list[EvalSample]
    scorer: Scorer
    skipped: list[str] = field(default_factory=list)  # "line N: reason" for each skipped row
    inputs: InputBuilder | None = None

    @property
    def fingerprint(self) -> str:
        """Digest of the questions, answers and images of the samples: part of every run's identity, so a
        changed file (same path, same row count) is a new run, never a stale one."""
        from .fingerprint import samples_fingerprint

        return samples_fingerprint(self.samples)


# ----------------------------------------------------------------------------------------------- scorers

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_vqa(text: str) -> str:
    """Lower-case, drop punctuation and articles, number words to digits (a simplified VQA normaliser)."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def yes_no(text: str) -> str:
    """POPE's rule (LLaVA's eval_pope.py): an answer whose first sentence contains the word 'no' or 'not'
    is "no", otherwise "yes" (here case-insensitive; the reference misses "NO" and "Not")."""
    words = _PUNCT.sub(" ", text.split(".")[0].lower()).split()
    return "no" if ("no" in words or "not" in words) else "yes"


@dataclass(frozen=True)
class Scorer:
    """``normalize`` maps a prediction to its canonical answer (agreement compares these);
    ``score`` gives 0..1 per sample; ``extra`` computes dataset-level metrics from all predictions."""

    name: str
    normalize: Callable[[str, EvalSample], str]
    score: Callable[[str, EvalSample], float]
    extra: Callable[[Sequence[str], Sequence[EvalSample]], dict[str, float]] | None = None


def _exact_score(prediction: str, sample: EvalSample) -> float:
    pred = normalize_vqa(prediction)
    return float(any(pred == normalize_vqa(a) for a in sample.answers))


def _vqa_score(prediction: str, sample: EvalSample) -> float:
    pred = normalize_vqa(prediction)
    matches = sum(pred == normalize_vqa(a) for a in sample.answers)
    return min(matches / 3.0, 1.0)


def _yesno_score(prediction: str, sample: EvalSample) -> float:
    return float(yes_no(prediction) == normalize_vqa(sample.answers[0]))


def _yesno_extra(predictions: Sequence[str], samples: Sequence[EvalSample]) -> dict[str, float]:
    from sklearn.metrics import f1_score, precision_score, recall_score

    y_true = [normalize_vqa(s.answers[0]) == "yes" for s in samples]
    y_pred = [yes_no(p) == "yes" for p in predictions]
    return {
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "yes_ratio": sum(y_pred) / max(len(y_pred), 1),
    }


def _shapes_normalize(prediction: str, sample: EvalSample) -> str:
    from tokprune.data import normalize_answer

    return normalize_answer(prediction, sample.qtype or "")


def _shapes_score(prediction: str, sample: EvalSample) -> float:
    return float(_shapes_normalize(prediction, sample) == sample.answers[0])


SCORERS: dict[str, Scorer] = {
    "exact": Scorer("exact", lambda p, s: normalize_vqa(p), _exact_score),
    "vqa": Scorer("vqa", lambda p, s: normalize_vqa(p), _vqa_score),
    "yesno": Scorer("yesno", lambda p, s: yes_no(p), _yesno_score, _yesno_extra),
    "shapes": Scorer("shapes", _shapes_normalize, _shapes_score),
}


def get_scorer(name: str, samples: Sequence[EvalSample] = ()) -> Scorer:
    """A scorer by name; ``auto`` picks yesno when every answer is yes/no, vqa when rows carry several
    answers, else exact."""
    if name != "auto":
        return SCORERS[name]
    if samples and all(len(s.answers) == 1 and normalize_vqa(s.answers[0]) in ("yes", "no") for s in samples):
        return SCORERS["yesno"]
    if any(len(s.answers) > 1 for s in samples):
        return SCORERS["vqa"]
    return SCORERS["exact"]


# ----------------------------------------------------------------------------------------------- loaders


def _shapes(cfg: DatasetConfig, limit: int | None) -> Dataset:
    from tokprune import data

    if limit is None:
        raise DatasetError("the shapes benchmark has no end (its generator is unlimited): set limit=N")
    n = limit
    from .fingerprint import image_digest

    samples = [
        EvalSample(s.question_id, s.image, s.question, (s.answer,), s.qtype, source=s, image_digest=image_digest(s.image))
        for s in data.benchmark(split=cfg.split, n=n)
    ]
    return Dataset(f"shapes-{cfg.split}", samples, SCORERS["shapes"])


def _answers_of(row: dict[str, Any]) -> tuple[str, ...]:
    for key in ("answers", "answer", "label"):
        if key not in row:
            continue
        value = row[key]
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and value:
            out = [v["answer"] if isinstance(v, dict) and "answer" in v else v for v in value]
            if all(isinstance(v, str) for v in out):
                return tuple(out)
        raise ValueError(f"{key!r} must be a string or a non-empty list of strings / {{answer: ...}} dicts, got {value!r}")
    raise ValueError("no answer: expected one of 'answers', 'answer', 'label'")


def _check_image(path: Path) -> str:
    """Decode the whole image once, so that a file that is not an image, a truncated or corrupt one, or a
    decompression bomb is a bad row at load time instead of a crash in the middle of a batch; returns
    the digest of its bytes (for the dataset's fingerprint)."""
    import io

    from PIL import Image

    from .fingerprint import content_digest

    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{str(path)!r} is a decompression bomb, refused ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable image ({type(exc).__name__}: {exc})") from None
    return content_digest(data)


def _json_row(line: str, required: tuple[str, ...], needs: str) -> dict[str, Any]:
    """One JSON-lines row as a dict holding ``required``; a ValueError saying what is wrong (``needs``: what a row
    must hold) otherwise."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in required if k not in row]
    if missing:
        raise ValueError(f"missing key(s) {missing}; {needs}")
    return row


def _parse_row(line: str, image_root: Path) -> EvalSample:
    row = _json_row(line, ("question_id", "image"), "a row needs question_id, image, question (or text) and an answer")
    question = row.get("question", row.get("text"))
    if not isinstance(question, str):
        raise ValueError("missing key 'question' (or 'text') with the question string")
    answers = _answers_of(row)
    image = Path(str(row["image"]))
    image = image if image.is_absolute() else image_root / image
    if not image.is_file():
        raise FileNotFoundError(f"image not found: {str(image)!r}")
    digest = _check_image(image)
    qtype = row.get("qtype", row.get("question_type", row.get("category")))
    qtype = None if qtype is None else str(qtype)
    return EvalSample(str(row["question_id"]), image, question, answers, qtype, image_digest=digest)


def _row_failure(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 (byte {exc.object[exc.start]:#04x} at column {exc.start + 1}); save the file as UTF-8"
    if isinstance(exc, RecursionError):
        return "not a JSON row this loader can read (nested too deeply)"
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def load_jsonl(
    path: str | Path, image_folder: str | Path | None = None, skip_bad_rows: bool = False, limit: int | None = None,
    parse_row: Callable[[str, Path], EvalSample] | None = None,
) -> tuple[list[EvalSample], list[str]]:
    """Rows of a LLaVA-format JSONL file as samples, and ``"line N: reason"`` for each skipped row.

    A bad row (invalid JSON, missing keys, missing image, duplicate question id) raises
    :class:`DatasetError` naming the file and line, unless ``skip_bad_rows``: then it is counted and
    reported, never silently dropped. Blank lines are allowed. ``parse_row`` reads one line (default: a
    LLaVA-format image row).
    """
    parse_row = parse_row or _parse_row
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {str(path)!r} (dataset.path)")
    root = Path(image_folder) if image_folder is not None else path.parent
    if image_folder is not None and not root.is_dir():
        raise DatasetError(f"image folder not found: {str(root)!r} (dataset.image_folder)")
    samples: list[EvalSample] = []
    skipped: list[str] = []
    seen: set[str] = set()
    # Bytes, decoded row by row: a row that is not UTF-8 is a bad row naming its line, not a crash.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if limit is not None and len(samples) >= limit:
                break
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte order mark is not a row
                sample = parse_row(line, root)
                if sample.question_id in seen:
                    raise ValueError(f"duplicate question_id {sample.question_id!r}")
            except Exception as exc:  # noqa: BLE001 - every per-row failure is a bad row (named, counted)
                reason = _row_failure(exc)
                if not skip_bad_rows:
                    raise DatasetError(
                        f"{path}:{lineno}: {reason} (set dataset.skip_bad_rows=true to skip and count such rows)"
                    ) from None
                skipped.append(f"line {lineno}: {reason}")
                continue
            seen.add(sample.question_id)
            samples.append(sample)
    if not samples:
        raise DatasetError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return samples, skipped


def _clip_sample(clip: Any) -> EvalSample:
    from .fingerprint import content_digest

    digest = content_digest(b"".join(f"{im.mode}:{im.size}".encode() + im.tobytes() for im in clip.frames))
    return EvalSample(clip.question_id, None, clip.question, (clip.answer,), clip.qtype, source=clip, image_digest=digest)


def _parse_clip_row(line: str, root: Path) -> EvalSample:
    """One clip row: every frame must decode and the clip must be one the clip world's model takes."""
    import torch
    from PIL import Image

    from tokprune.data import clips

    row = _json_row(
        line, ("question_id", "video", "question"), "a clip row needs question_id, video (frame paths), question, answer"
    )
    video = row["video"]
    if not isinstance(video, list) or not video:
        raise ValueError(f"empty clip: 'video' must be a non-empty list of frame image paths, got {video!r}")
    frames = []
    for name in video:
        path = Path(str(name)) if Path(str(name)).is_absolute() else root / str(name)
        if not path.is_file():
            raise FileNotFoundError(f"frame not found: {str(path)!r}")
        _check_image(path)
        with Image.open(path) as im:
            frames.append(im.convert("RGB"))
    clip = clips.Clip(str(row["question_id"]), frames, row["question"], _answers_of(row)[0], str(row.get("qtype")),
                      # which tokens hold shapes is unknown for a file's clips
                      object_mask=torch.zeros(len(frames), clips.TOKENS_PER_FRAME, dtype=torch.bool))
    clips.check_clip(clip)
    return _clip_sample(clip)


def clip_inputs(tokenizer: Any, samples: Sequence[EvalSample], questions: Sequence[str]) -> dict[str, Any]:
    """The Qwen2.5-VL batch of clip samples (:func:`tokprune.models.build_qwen.model_inputs`), questions as given."""
    from tokprune.models.build_qwen import model_inputs

    return model_inputs(tokenizer, [replace(s.source, question=q) for s, q in zip(samples, questions)])


def _clips(cfg: DatasetConfig, limit: int | None) -> Dataset:
    if cfg.path is not None:
        samples, skipped = load_jsonl(cfg.path, cfg.image_folder, cfg.skip_bad_rows, limit, _parse_clip_row)
        return Dataset(Path(cfg.path).stem, samples, SCORERS["shapes"], skipped, inputs=clip_inputs)
    if limit is None:
        raise DatasetError("the clip benchmark has no end (its generator is unlimited): set limit=N")
    from tokprune.data import clips

    samples = [_clip_sample(c) for c in clips.clip_benchmark(cfg.split, limit)]
    return Dataset(f"clips-{cfg.split}", samples, SCORERS["shapes"], inputs=clip_inputs)


def load_dataset(cfg: DatasetConfig, limit: int | None = None) -> Dataset:
    """The dataset a config names, cut to its first ``limit`` questions."""
    if cfg.name == "shapes":
        return _shapes(cfg, limit)
    if cfg.name == "clips":
        return _clips(cfg, limit)
    samples, skipped = load_jsonl(cfg.path, cfg.image_folder, cfg.skip_bad_rows, limit)  # type: ignore[arg-type]
    return Dataset(Path(cfg.path).stem, samples, get_scorer(cfg.scorer, samples), skipped)  # type: ignore[arg-type]
