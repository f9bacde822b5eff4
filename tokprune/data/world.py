"""The shapes world: a deterministic synthetic visual-QA generator.

Scenes hold a few coloured shapes of two sizes, aligned to the vision patch grid, on a plain, lightly
noisy background whose shade is random per scene and independent of every answer, so only object
patches carry information. Each scene comes with its object patch mask (one bool per vision patch,
raster order), which lets callers measure how well an attention map finds the objects.

Everything derives from integer seeds: sample ``i`` of ``generate_samples(n, seed)`` is a pure
function of ``(seed, i)``, so any split is reproducible without files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 96
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE
NUM_PATCHES = GRID * GRID

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
# Sizes are side lengths in pixels: exactly 2 and 3 patches wide (objects sit on the patch grid), so
# every shape spans several patches and its outline (not just its colour) is visible to a patch embedding.
SIZES: dict[str, int] = {"small": 16, "large": 24}
NUMBERS = ("zero", "one", "two", "three", "four", "five")
POSITIONS = ("left", "right", "top", "bottom")
QUESTION_TYPES = ("color", "count", "exist", "position")

MIN_OBJECTS, MAX_OBJECTS = 1, 5
# Position questions are asked only about objects whose centre is this far from the midline, so the
# answer is never ambiguous.
POSITION_MARGIN = 10
NOISE_STD = 6.0
CAPTION_REQUEST = "describe the scene"
"""The training-only request whose answer is the scene's ``caption`` (LLaVA's captioning data, scaled down)."""
BENCHMARK_SEEDS = {"test": 2_000_000_011, "val": 2_000_000_003}
"""Seeds of the held-out splits. Training draws its seeds from [0, 1_000_000_000)."""


@dataclass(frozen=True)
class SceneObject:
    """One rendered shape; ``x0, y0`` is the top-left corner of its bounding box in pixels."""

    color: str
    shape: str
    size: str
    x0: int
    y0: int

    @property
    def side(self) -> int:
        return SIZES[self.size]

    @property
    def center(self) -> tuple[float, float]:
        half = self.side / 2
        return (self.x0 + half, self.y0 + half)

    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Sample:
    """One visual-QA item.

    ``object_mask`` is a ``torch.bool`` tensor of shape ``[NUM_PATCHES]`` (raster order over the
    ``GRID x GRID`` patch grid), true where a patch contains any object pixel.
    """

    question_id: str
    image: Image.Image
    question: str
    answer: str
    qtype: str
    object_mask: torch.Tensor
    objects: list[SceneObject] = field(default_factory=list)
    caption: str = ""
    dialogue: list[tuple[str, str, str]] = field(default_factory=list)
    """``(question, answer, qtype)`` turns about this scene; one turn, the sample's own, unless built by
    ``make_dialogue``."""


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean pixel mask ``[side, side]`` of a shape filling its bounding box."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        r = side / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    if shape == "triangle":
        # Apex at top centre, base along the bottom edge.
        return np.abs(xx - side / 2) <= yy / 2
    raise ValueError(f"unknown shape {shape!r}")


def _place_objects(rng: np.random.Generator) -> list[SceneObject]:
    """Sample non-overlapping objects with unique (colour, shape) pairs, aligned to the patch grid.

    Grid alignment makes an object's patches exactly the tokens that carry it: no patch mixes two
    objects or holds a sliver of one, so each object patch shows a fixed part of its shape (a
    circle's quarter, a triangle's flank) that a patch embedding can read. At least one empty patch
    separates objects so shapes of the same colour never merge.
    """
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    combos = [(c, s) for c in COLORS for s in SHAPES]
    picks = rng.choice(len(combos), size=n, replace=False)
    occupied = np.zeros((GRID + 2, GRID + 2), dtype=bool)  # one cell of margin for the 1-cell gap
    objects: list[SceneObject] = []
    for k in picks:
        color, shape = combos[int(k)]
        size = "small" if rng.random() < 0.5 else "large"
        cells = SIZES[size] // PATCH_SIZE
        for _ in range(100):
            cx, cy = (int(v) for v in rng.integers(0, GRID - cells + 1, size=2))
            if not occupied[cy:cy + cells + 2, cx:cx + cells + 2].any():
                break
        else:
            continue
        occupied[cy + 1:cy + cells + 1, cx + 1:cx + cells + 1] = True
        objects.append(SceneObject(color, shape, size, cx * PATCH_SIZE, cy * PATCH_SIZE))
    return objects


def render_scene(objects: list[SceneObject], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene.

    Returns ``(image, pixel_mask)``: ``uint8 [H, W, 3]`` and ``bool [H, W]`` (true on object pixels).
    """
    shade = rng.uniform(90, 170)
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), shade, dtype=np.float32)
    pixel_mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for obj in objects:
        m = _shape_mask(obj.shape, obj.side)
        region = img[obj.y0:obj.y0 + obj.side, obj.x0:obj.x0 + obj.side]
        region[m] = np.asarray(COLORS[obj.color], dtype=np.float32)
        pixel_mask[obj.y0:obj.y0 + obj.side, obj.x0:obj.x0 + obj.side] |= m
    img += rng.normal(0.0, NOISE_STD, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8), pixel_mask


def patch_mask(pixel_mask: np.ndarray, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """Pool a pixel mask ``[H, W]`` to a patch mask ``[(H/p)*(W/p)]`` (raster order): any object pixel."""
    h, w = pixel_mask.shape
    pooled = pixel_mask.reshape(h // patch_size, patch_size, w // patch_size, patch_size).any(axis=(1, 3))
    return torch.from_numpy(pooled.reshape(-1).copy())


def caption(objects: list[SceneObject]) -> str:
    """A full scene description, used as contrastive text: objects in raster order of their centres."""
    parts = []
    for obj in sorted(objects, key=lambda o: (o.center[1] // 32, o.center[0])):
        cx, cy = obj.center
        v = "top" if cy < IMAGE_SIZE / 2 else "bottom"
        h = "left" if cx < IMAGE_SIZE / 2 else "right"
        parts.append(f"{obj.size} {obj.color} {obj.shape} {v} {h}")
    return " , ".join(parts)


def _plural(shape: str) -> str:
    return shape + "s"


def _ask_color(objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, str] | None:
    unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    if not unique:
        return None
    obj = unique[int(rng.integers(len(unique)))]
    return f"what color is the {obj.shape} ?", obj.color


def _ask_count(objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, str]:
    # Pick the answer first (uniform over 0..3, 4+ when available) so counts are not dominated by "one".
    candidates: dict[int, list[tuple[str, str]]] = {}
    for s in SHAPES:
        candidates.setdefault(sum(o.shape == s for o in objects), []).append(("shape", s))
    for c in COLORS:
        candidates.setdefault(sum(o.color == c for o in objects), []).append(("color", c))
    counts = sorted(candidates)
    n = counts[int(rng.integers(len(counts)))]
    kind, word = candidates[n][int(rng.integers(len(candidates[n])))]
    if kind == "shape":
        return f"how many {_plural(word)} are there ?", NUMBERS[n]
    return f"how many {word} objects are there ?", NUMBERS[n]


def _ask_exist(objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, str]:
    present = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        color, shape = sorted(present)[int(rng.integers(len(present)))]
        return f"is there a {color} {shape} ?", "yes"
    # Prefer hard negatives that share a colour or a shape with the scene: they need binding.
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    hard = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    pool = hard if hard and rng.random() < 0.8 else absent
    color, shape = pool[int(rng.integers(len(pool)))]
    return f"is there a {color} {shape} ?", "no"


def _ask_position(objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, str] | None:
    options = []
    for o in objects:
        cx, cy = o.center
        if abs(cx - IMAGE_SIZE / 2) >= POSITION_MARGIN:
            options.append((f"is the {o.name()} on the left or the right ?", "left" if cx < IMAGE_SIZE / 2
                            else "right"))
        if abs(cy - IMAGE_SIZE / 2) >= POSITION_MARGIN:
            options.append((f"is the {o.name()} at the top or the bottom ?", "top" if cy < IMAGE_SIZE / 2
                            else "bottom"))
    if not options:
        return None
    return options[int(rng.integers(len(options)))]


_ASKERS = {"color": _ask_color, "count": _ask_count, "exist": _ask_exist, "position": _ask_position}


def _render_sample(question_id: str, objects: list[SceneObject], dialogue: list[tuple[str, str, str]],
                   rng: np.random.Generator) -> Sample:
    """Render the scene (the last draws from ``rng``) and wrap it with its turns; the first turn is the
    sample's own question."""
    image, pixel_mask = render_scene(objects, rng)
    question, answer, qtype = dialogue[0]
    return Sample(
        question_id=question_id,
        image=Image.fromarray(image, mode="RGB"),
        question=question,
        answer=answer,
        qtype=qtype,
        object_mask=patch_mask(pixel_mask),
        objects=objects,
        caption=caption(objects),
        dialogue=dialogue,
    )


def make_sample(seed: int, index: int, qtype: str) -> Sample:
    """Sample ``index`` of stream ``seed``: a scene and one question of type ``qtype``.

    Scenes that cannot host a ``qtype`` question (e.g. no shape is unique for a colour question)
    are redrawn from the same stream, so the result stays a pure function of the arguments.
    """
    rng = np.random.default_rng([seed, index])
    while True:
        objects = _place_objects(rng)
        qa = _ASKERS[qtype](objects, rng)
        if qa is not None:
            break
    return _render_sample(f"s{seed}-{index}", objects, [(*qa, qtype)], rng)


def make_dialogue(seed: int, index: int, turns: int, describe: bool = False) -> Sample:
    """A scene with up to ``turns`` distinct questions about it, as in LLaVA's multi-turn training data.

    Question types rotate from ``index``; a type the scene cannot host is skipped. The sample's own
    ``question``/``answer``/``qtype`` are the first turn; ``dialogue`` holds them all. Training uses
    these to get several supervised answers out of one pass over the image tokens. ``describe`` appends
    a last turn, ``CAPTION_REQUEST`` answered by the full caption (qtype ``"caption"``): the only answer
    that names shapes, and last so that no question turn can read its answer from it.
    """
    if turns < 1:
        raise ValueError(f"turns must be >= 1 (questions per conversation), got {turns}")
    rng = np.random.default_rng([seed, index, turns])
    objects = _place_objects(rng)
    dialogue: list[tuple[str, str, str]] = []
    for t in range(4 * turns):
        qtype = QUESTION_TYPES[(index + t) % len(QUESTION_TYPES)]
        qa = _ASKERS[qtype](objects, rng)
        if qa is not None and all(qa[0] != q for q, _, _ in dialogue):
            dialogue.append((*qa, qtype))
        if len(dialogue) == turns:
            break
    if describe:
        dialogue.append((CAPTION_REQUEST, caption(objects), "caption"))
    return _render_sample(f"d{seed}-{index}", objects, dialogue, rng)


def generate_samples(n: int, seed: int, qtypes: tuple[str, ...] = QUESTION_TYPES, start: int = 0) -> list[Sample]:
    """``n`` samples of stream ``seed`` (indices ``start .. start+n-1``), question types in rotation."""
    for q in qtypes:
        if q not in _ASKERS:
            raise ValueError(f"unknown question type {q!r}; valid: {QUESTION_TYPES}")
    return [make_sample(seed, i, qtypes[i % len(qtypes)]) for i in range(start, start + n)]


def benchmark(split: str = "test", n: int = 500) -> list[Sample]:
    """The held-out benchmark: ``n`` samples, balanced over question types, from seeds training never sees."""
    if split not in BENCHMARK_SEEDS:
        raise KeyError(f"unknown split {split!r}; valid: {sorted(BENCHMARK_SEEDS)}")
    return generate_samples(n, BENCHMARK_SEEDS[split])


_DIGITS = {str(i): w for i, w in enumerate(NUMBERS)}


def normalize_answer(prediction: str, qtype: str) -> str:
    """First word of ``prediction``, lower-cased, punctuation stripped; digits become number words."""
    words = "".join(ch if ch.isalnum() else " " for ch in prediction.lower()).split()
    if not words:
        return ""
    return _DIGITS.get(words[0], words[0]) if qtype == "count" else words[0]


def score_answer(prediction: str, sample: Sample) -> bool:
    """Whether a free-form ``prediction`` answers ``sample`` correctly (per-type normalisation)."""
    return normalize_answer(prediction, sample.qtype) == sample.answer


def build_prompt(question: str) -> str:
    """The LLaVA-1.5 prompt: the image placeholder before the question."""
    return f"USER: <image>\n{question} ASSISTANT:"
