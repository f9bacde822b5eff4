"""Clips in the shapes world: a few frames in which shapes move, appear or change colour.

A clip is ``FRAMES`` frames of ``FRAME_SIZE`` pixels on a plain, lightly noisy background (one random
shade per clip, fresh noise per frame). Shapes sit on a ``CELLS x CELLS`` grid of ``CELL``-pixel cells,
one shape per cell, and a cell is exactly one language-model token of a Qwen2.5-VL vision tower with
14-pixel patches and a 2x2 merge (a shape shows one quarter of itself in each of its 4 patches).

Questions need time and have one-word, balanced answers (the answer is drawn first, the clip built
around it):

* ``motion``: "which way did the red square move ?" (left/right/up/down): one shape moves one cell at
  one to three of the frame changes, always the same way; the others stand still.
* ``appear``: "which shape appeared last ?" (circle/square/triangle): two or three shapes of different
  kinds appear at different frames and stay.
* ``frames``: "how many frames show a circle ?" (one..four): the shape is visible in that many frames.
* ``change``: "what color did the square become ?" (a colour): a shape changes colour once.

Single frames of the same world serve as images (``image_sample``, types ``color`` and ``exist``), so a
model can be trained on both. Everything is a pure function of integer seeds; the held-out splits use
``BENCHMARK_SEEDS`` (above 1e9, training draws below). ``video_inputs``/``image_inputs`` turn frames into
the ``pixel_values_videos``/``video_grid_thw`` (and image) tensors of Qwen2.5-VL, laid out exactly as its
processor does: the transformers video processor needs torchvision, which this CPU stack cannot import.

Each temporal patch of Qwen2.5-VL covers two frames; a clip frame is one *time step* shown in both
(``TEMPORAL_PATCH`` identical frames, fresh noise), i.e. a clip sampled at twice the rate its shapes
change, so one temporal slice of the video grid is one clip frame and ``budget_scope="frame"`` budgets
what the questions count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokprune.data.world import COLORS, NOISE_STD, NUMBERS, SHAPES, _shape_mask

FRAMES = 4
PATCH = 14
MERGE = 2
TEMPORAL_PATCH = 2
CELL = PATCH * MERGE
CELLS = 4
FRAME_SIZE = CELL * CELLS
TOKENS_PER_FRAME = CELLS * CELLS
"""Language-model tokens per clip frame (and per image)."""
TOKENS_PER_CLIP = FRAMES * TOKENS_PER_FRAME
SHAPE_SIDE = 22
"""Pixels; centred in its 28-pixel cell, so every patch of the cell shows a part of the shape."""
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
"""Qwen2.5-VL's normalisation (the OpenAI CLIP constants its image processor defaults to)."""

DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
VIDEO_QUESTION_TYPES = ("motion", "appear", "frames", "change")
IMAGE_QUESTION_TYPES = ("color", "exist")
BENCHMARK_SEEDS = {"test": 2_000_000_101, "val": 2_000_000_107}
"""Seeds of the held-out clip splits. Training draws its seeds from [0, 1_000_000_000)."""


@dataclass(frozen=True)
class Track:
    """One shape through the clip: per frame its ``(row, col)`` cell and colour, or ``None`` if absent."""

    shape: str
    cells: tuple[tuple[int, int] | None, ...]
    colors: tuple[str, ...]


@dataclass
class Clip:
    """One video question. ``frames`` are ``FRAMES`` RGB images; ``object_mask`` is ``bool [FRAMES,
    TOKENS_PER_FRAME]`` (raster order over the cell grid), true where a frame's token holds a shape."""

    question_id: str
    frames: list[Image.Image]
    question: str
    answer: str
    qtype: str
    object_mask: torch.Tensor
    tracks: list[Track] = field(default_factory=list)
    is_video: bool = True
    """False for a single frame asked as an image (``image_sample``)."""


def _free_cells(rng: np.random.Generator, n: int, taken: set[tuple[int, int]]) -> list[tuple[int, int]]:
    free = [(r, c) for r in range(CELLS) for c in range(CELLS) if (r, c) not in taken]
    picks = rng.choice(len(free), size=n, replace=False)
    return [free[int(i)] for i in picks]


def _distractors(rng: np.random.Generator, n: int, taken: set[tuple[int, int]],
                 used: set[tuple[str, str]], shapes: tuple[str, ...] = SHAPES) -> list[Track]:
    """``n`` static shapes present in every frame, colour-shape pairs unique in the clip."""
    tracks = []
    for cell in _free_cells(rng, n, taken):
        pairs = [(c, s) for c in COLORS for s in shapes if (c, s) not in used]
        color, shape = pairs[int(rng.integers(len(pairs)))]
        used.add((color, shape))
        taken.add(cell)
        tracks.append(Track(shape, (cell,) * FRAMES, (color,) * FRAMES))
    return tracks


def _motion(rng: np.random.Generator, pick: int) -> tuple[list[Track], str, str]:
    direction = DIRECTIONS[pick % len(DIRECTIONS)]
    dr, dc = _STEP[direction]
    moves = int(rng.integers(1, FRAMES))
    when = sorted(int(t) for t in rng.choice(np.arange(1, FRAMES), size=moves, replace=False))
    # Start where ``moves`` steps stay on the grid.
    rows = range(CELLS) if dr == 0 else (range(CELLS - moves) if dr > 0 else range(moves, CELLS))
    cols = range(CELLS) if dc == 0 else (range(CELLS - moves) if dc > 0 else range(moves, CELLS))
    r, c = int(rng.choice(list(rows))), int(rng.choice(list(cols)))
    cells = []
    for t in range(FRAMES):
        if t in when:
            r, c = r + dr, c + dc
        cells.append((r, c))
    color, shape = list(COLORS)[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
    mover = Track(shape, tuple(cells), (color,) * FRAMES)
    others = _distractors(rng, int(rng.integers(0, 3)), set(cells), {(color, shape)})
    return [mover, *others], f"which way did the {color} {shape} move ?", direction


def _appear(rng: np.random.Generator, pick: int) -> tuple[list[Track], str, str]:
    answer = SHAPES[pick % len(SHAPES)]
    n = int(rng.integers(2, len(SHAPES) + 1))
    kinds = [answer, *[SHAPES[int(i)] for i in rng.permutation([k for k in range(3) if SHAPES[k] != answer])]][:n]
    last = int(rng.integers(1, FRAMES))
    starts = [last, *[int(rng.integers(0, last)) for _ in kinds[1:]]]
    tracks = []
    for shape, start, cell in zip(kinds, starts, _free_cells(rng, n, set())):
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        tracks.append(Track(shape, tuple(cell if t >= start else None for t in range(FRAMES)), (color,) * FRAMES))
    return tracks, "which shape appeared last ?", answer


def _frames(rng: np.random.Generator, pick: int) -> tuple[list[Track], str, str]:
    n = 1 + pick % FRAMES
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    shown = set(int(t) for t in rng.choice(FRAMES, size=n, replace=False))
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    cell = _free_cells(rng, 1, set())[0]
    target = Track(shape, tuple(cell if t in shown else None for t in range(FRAMES)), (color,) * FRAMES)
    others = _distractors(rng, int(rng.integers(0, 3)), {cell}, {(color, shape)},
                          tuple(s for s in SHAPES if s != shape))
    return [target, *others], f"how many frames show a {shape} ?", NUMBERS[n]


def _change(rng: np.random.Generator, pick: int) -> tuple[list[Track], str, str]:
    answer = list(COLORS)[pick % len(COLORS)]
    first = [c for c in COLORS if c != answer][int(rng.integers(len(COLORS) - 1))]
    at = int(rng.integers(1, FRAMES))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    cell = _free_cells(rng, 1, set())[0]
    target = Track(shape, (cell,) * FRAMES, tuple(first if t < at else answer for t in range(FRAMES)))
    others = _distractors(rng, int(rng.integers(0, 3)), {cell}, {(first, shape), (answer, shape)},
                          tuple(s for s in SHAPES if s != shape))
    return [target, *others], f"what color did the {shape} become ?", answer


_VIDEO_ASKERS = {"motion": _motion, "appear": _appear, "frames": _frames, "change": _change}


def render_frame(tracks: list[Track], t: int, shade: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``t``: ``uint8 [FRAME_SIZE, FRAME_SIZE, 3]`` and the token mask ``bool [TOKENS_PER_FRAME]``."""
    img = np.full((FRAME_SIZE, FRAME_SIZE, 3), shade, dtype=np.float32)
    mask = np.zeros((CELLS, CELLS), dtype=bool)
    off = (CELL - SHAPE_SIDE) // 2
    for tr in tracks:
        cell = tr.cells[t]
        if cell is None:
            continue
        r, c = cell
        y0, x0 = r * CELL + off, c * CELL + off
        region = img[y0:y0 + SHAPE_SIDE, x0:x0 + SHAPE_SIDE]
        region[_shape_mask(tr.shape, SHAPE_SIDE)] = np.asarray(COLORS[tr.colors[t]], dtype=np.float32)
        mask[r, c] = True
    img += rng.normal(0.0, NOISE_STD, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8), mask.reshape(-1)


def _render_clip(question_id: str, tracks: list[Track], question: str, answer: str, qtype: str,
                 rng: np.random.Generator) -> Clip:
    shade = rng.uniform(90, 170)
    frames, masks = [], []
    for t in range(FRAMES):
        img, m = render_frame(tracks, t, shade, rng)
        frames.append(Image.fromarray(img, mode="RGB"))
        masks.append(torch.from_numpy(m.copy()))
    return Clip(question_id, frames, question, answer, qtype, torch.stack(masks), tracks)


def make_clip(seed: int, index: int, qtype: str) -> Clip:
    """Clip ``index`` of stream ``seed`` with one question of type ``qtype`` (a pure function of the three).

    The answer is option ``index // len(VIDEO_QUESTION_TYPES)`` of the type's answers (in rotation), so
    ``generate_clips``'s default rotation balances every type's answers exactly over whole cycles.
    """
    if qtype not in _VIDEO_ASKERS:
        raise ValueError(f"unknown video question type {qtype!r}; valid: {VIDEO_QUESTION_TYPES}")
    rng = np.random.default_rng([seed, index, 7])
    tracks, question, answer = _VIDEO_ASKERS[qtype](rng, index // len(VIDEO_QUESTION_TYPES))
    return _render_clip(f"v{seed}-{index}", tracks, question, answer, qtype, rng)


def generate_clips(n: int, seed: int, qtypes: tuple[str, ...] = VIDEO_QUESTION_TYPES, start: int = 0) -> list[Clip]:
    """``n`` clips of stream ``seed`` (indices ``start .. start+n-1``), question types in rotation."""
    for q in qtypes:
        if q not in _VIDEO_ASKERS:
            raise ValueError(f"unknown video question type {q!r}; valid: {VIDEO_QUESTION_TYPES}")
    return [make_clip(seed, i, qtypes[i % len(qtypes)]) for i in range(start, start + n)]


def clip_benchmark(split: str = "test", n: int = 200) -> list[Clip]:
    """The held-out clip benchmark: ``n`` clips, question types balanced, from seeds training never sees."""
    if split not in BENCHMARK_SEEDS:
        raise KeyError(f"unknown split {split!r}; valid: {sorted(BENCHMARK_SEEDS)}")
    return generate_clips(n, BENCHMARK_SEEDS[split])


def follow_ups(clip: Clip, include_own: bool = False) -> list[tuple[str, str, str]]:
    """Every other question a clip answers, ``(question, answer, qtype)``, derived from its tracks.

    Training asks some of them after the clip's own question (LLaVA's multi-turn data: several supervised
    answers per pass over the video tokens). ``frames`` for every shape shown; ``change`` (its colour in the
    last frame) for every shape that occurs once and is visible at the end; ``motion`` for a shape that moved
    along one axis; ``appear`` when shapes of different kinds appear at distinct frames, the last one unique.
    The clip's own question is left out (``include_own=True`` keeps it: its derived answer is the clip's).
    """
    out = []
    for shape in SHAPES:
        shown = [any(tr.shape == shape and tr.cells[t] is not None for tr in clip.tracks) for t in range(FRAMES)]
        if any(shown):
            out.append((f"how many frames show a {shape} ?", NUMBERS[sum(shown)], "frames"))
        own = [tr for tr in clip.tracks if tr.shape == shape]
        if len(own) == 1 and own[0].cells[-1] is not None:
            out.append((f"what color did the {shape} become ?", own[0].colors[-1], "change"))
    for tr in clip.tracks:
        first, last = tr.cells[0], tr.cells[-1]
        if first is not None and last is not None and first != last:
            dr, dc = last[0] - first[0], last[1] - first[1]
            if dr == 0 or dc == 0:
                step = (int(np.sign(dr)), int(np.sign(dc)))
                direction = next(d for d, v in _STEP.items() if v == step)
                out.append((f"which way did the {tr.colors[0]} {tr.shape} move ?", direction, "motion"))
    starts = [next((t for t, c in enumerate(tr.cells) if c is not None), FRAMES) for tr in clip.tracks]
    kinds = [tr.shape for tr in clip.tracks]
    if len(set(kinds)) == len(kinds) > 1 and starts.count(max(starts)) == 1 and 0 < max(starts) < FRAMES:
        out.append(("which shape appeared last ?", kinds[starts.index(max(starts))], "appear"))
    return [q for q in out if include_own or q[0] != clip.question]


def image_sample(seed: int, index: int) -> Clip:
    """A single frame of the world (``frames`` has one image) with a ``color`` or ``exist`` question.

    Training uses these beside the clips so the tower learns what a shape is from still frames too.
    """
    rng = np.random.default_rng([seed, index, 11])
    qtype = IMAGE_QUESTION_TYPES[index % len(IMAGE_QUESTION_TYPES)]
    pick = index // len(IMAGE_QUESTION_TYPES)
    if qtype == "color":
        answer, shape = list(COLORS)[pick % len(COLORS)], SHAPES[int(rng.integers(len(SHAPES)))]
        cell = _free_cells(rng, 1, set())[0]
        tracks = [Track(shape, (cell,) * FRAMES, (answer,) * FRAMES)]
        tracks += _distractors(rng, int(rng.integers(0, 3)), {cell}, {(answer, shape)},
                               tuple(s for s in SHAPES if s != shape))
        question = f"what color is the {shape} ?"
    else:
        used: set[tuple[str, str]] = set()
        tracks = _distractors(rng, int(rng.integers(1, 4)), set(), used)
        if pick % 2 == 0:
            tr = tracks[int(rng.integers(len(tracks)))]
            question, answer = f"is there a {tr.colors[0]} {tr.shape} ?", "yes"
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in used]
            color, shape = absent[int(rng.integers(len(absent)))]
            question, answer = f"is there a {color} {shape} ?", "no"
    shade = rng.uniform(90, 170)
    img, m = render_frame(tracks, 0, shade, rng)
    return Clip(f"i{seed}-{index}", [Image.fromarray(img, mode="RGB")], question, answer, qtype,
                torch.from_numpy(m.copy())[None], tracks, is_video=False)


# -- Qwen2.5-VL pixel layout ---------------------------------------------------------------------------------


def patchify(frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's flattened patches of a stack of frames.

    ``frames``: ``uint8 [F, H, W, 3]`` with ``F`` a multiple of ``TEMPORAL_PATCH`` and ``H, W`` multiples
    of ``CELL``. Returns ``pixel_values`` ``float32 [t*h*w, 3*TEMPORAL_PATCH*PATCH*PATCH]`` (patches in
    Qwen's order: each 2x2 merge group contiguous, groups in raster order, temporal slices outermost) and
    the grid ``long [3]`` ``(t, h, w)`` in patches. The same layout as ``Qwen2VLImageProcessor`` and the
    video processor (rescale, normalise with ``IMAGE_MEAN``/``IMAGE_STD``, no resize).
    """
    f, h, w, _ = frames.shape
    x = (frames.astype(np.float32) / 255.0 - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    x = x.transpose(0, 3, 1, 2)  # [F, C, H, W]
    gt, gh, gw = f // TEMPORAL_PATCH, h // PATCH, w // PATCH
    x = x.reshape(gt, TEMPORAL_PATCH, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = x.reshape(gt * gh * gw, 3 * TEMPORAL_PATCH * PATCH * PATCH)
    return torch.from_numpy(np.ascontiguousarray(flat)), torch.tensor([gt, gh, gw])


def clip_pixels(clip: Clip) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values [len(frames) * 4 * TOKENS_PER_FRAME, 1176], grid_thw [3])`` of a clip or image:
    each frame repeated ``TEMPORAL_PATCH`` times, so one temporal slice is one clip frame (see the module
    docstring) and an image is one slice, as Qwen's image processor pads a still image."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in clip.frames])
    return patchify(np.repeat(arr, TEMPORAL_PATCH, axis=0))


def check_clip(clip: Clip) -> None:
    """Raise ``ValueError`` naming what is wrong with a clip that cannot be fed to the model (no frames,
    frames of another size or mode, a frame count that is not ``FRAMES``)."""
    if not clip.frames:
        raise ValueError(f"clip {clip.question_id!r} has no frames")
    if clip.is_video and len(clip.frames) != FRAMES:
        raise ValueError(f"clip {clip.question_id!r} has {len(clip.frames)} frames; the clip world has {FRAMES}")
    for k, im in enumerate(clip.frames):
        if not isinstance(im, Image.Image) or im.size != (FRAME_SIZE, FRAME_SIZE):
            size = getattr(im, "size", type(im).__name__)
            raise ValueError(f"clip {clip.question_id!r} frame {k} is {size}, not a {FRAME_SIZE}x{FRAME_SIZE} image")


def export_clips(samples: list[Clip], folder: str | Path) -> Path:
    """Write ``samples`` as a clip benchmark file: ``folder/clips.jsonl`` and one PNG per frame.

    Each row is ``{"question_id", "video": [frame paths relative to the file], "question", "answer",
    "qtype"}``, the format ``dataset.name=clips`` with ``dataset.path`` reads. Returns the JSONL path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        names = []
        for k, im in enumerate(s.frames):
            name = f"{s.question_id}-{k}.png"
            im.save(folder / name)
            names.append(name)
        rows.append({"question_id": s.question_id, "video": names, "question": s.question, "answer": s.answer,
                     "qtype": s.qtype})
    out = folder / "clips.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out
