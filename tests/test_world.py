"""The shapes world: determinism, masks that match the pixels, answers that match the scenes."""

from collections import Counter

import numpy as np
import pytest
import torch

from tokprune import data
from tokprune.data import world


def _same(a: data.Sample, b: data.Sample) -> bool:
    return (
        a.question_id == b.question_id
        and a.question == b.question
        and a.answer == b.answer
        and a.qtype == b.qtype
        and np.array_equal(np.asarray(a.image), np.asarray(b.image))
        and torch.equal(a.object_mask, b.object_mask)
    )


def test_deterministic_for_a_seed():
    a, b = data.generate_samples(12, seed=7), data.generate_samples(12, seed=7)
    assert all(_same(x, y) for x, y in zip(a, b))


def test_sample_is_a_function_of_seed_and_index():
    whole = data.generate_samples(10, seed=3)
    tail = data.generate_samples(4, seed=3, start=6)
    assert all(_same(x, y) for x, y in zip(whole[6:], tail))


def test_different_seeds_differ():
    a, b = data.generate_samples(8, seed=1), data.generate_samples(8, seed=2)
    assert sum(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b)) == 0
    assert [x.question for x in a] != [y.question for y in b]


def test_sample_fields():
    s = data.generate_samples(1, seed=0)[0]
    assert s.image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) and s.image.mode == "RGB"
    assert s.object_mask.dtype == torch.bool and s.object_mask.shape == (world.NUM_PATCHES,)
    assert s.qtype in data.QUESTION_TYPES and s.answer and s.question.endswith("?")


def _object_pixels(obj: world.SceneObject) -> np.ndarray:
    m = np.zeros((world.IMAGE_SIZE, world.IMAGE_SIZE), dtype=bool)
    m[obj.y0:obj.y0 + obj.side, obj.x0:obj.x0 + obj.side] = world._shape_mask(obj.shape, obj.side)
    return m


@pytest.mark.parametrize("seed", [0, 11])
def test_object_mask_matches_rendered_pixels(seed):
    for s in data.generate_samples(20, seed=seed):
        img = np.asarray(s.image).astype(np.float32)
        union = np.zeros(img.shape[:2], dtype=bool)
        for obj in s.objects:
            px = _object_pixels(obj)
            union |= px
            # Object pixels carry the object's colour (up to the light noise).
            mean = img[px].mean(axis=0)
            assert np.abs(mean - np.asarray(world.COLORS[obj.color])).max() < 6
        # Background pixels are one grey shade plus noise: no information.
        bg = img[~union]
        assert bg.std(axis=0).max() < 3 * world.NOISE_STD
        assert np.abs(bg.mean(axis=0) - bg.mean()).max() < 2
        p = world.PATCH_SIZE
        expected = union.reshape(world.GRID, p, world.GRID, p).any(axis=(1, 3)).reshape(-1)
        assert np.array_equal(s.object_mask.numpy(), expected)
        assert s.object_mask.any() and not s.object_mask.all()


def _true_answer(s: data.Sample) -> str:
    """Recompute the answer from the scene's objects by parsing the templated question."""
    words = s.question.split()
    objs = s.objects
    if s.qtype == "color":
        shape = words[-2]
        (obj,) = [o for o in objs if o.shape == shape]
        return obj.color
    if s.qtype == "count":
        what = words[2]
        n = sum(o.shape + "s" == what or o.color == what for o in objs)
        return world.NUMBERS[n]
    if s.qtype == "exist":
        color, shape = words[3], words[4]
        return "yes" if any(o.color == color and o.shape == shape for o in objs) else "no"
    color, shape = words[2], words[3]
    (obj,) = [o for o in objs if o.color == color and o.shape == shape]
    cx, cy = obj.center
    mid = world.IMAGE_SIZE / 2
    if "left" in words:
        assert abs(cx - mid) >= world.POSITION_MARGIN
        return "left" if cx < mid else "right"
    assert abs(cy - mid) >= world.POSITION_MARGIN
    return "top" if cy < mid else "bottom"


def test_answers_follow_from_the_scene():
    for s in data.generate_samples(200, seed=5):
        assert s.answer == _true_answer(s), s.question


def test_question_types_rotate_and_existence_is_balanced():
    samples = data.generate_samples(400, seed=9)
    assert Counter(s.qtype for s in samples) == {q: 100 for q in data.QUESTION_TYPES}
    exist = Counter(s.answer for s in samples if s.qtype == "exist")
    assert 40 <= exist["yes"] <= 60
    for q in data.QUESTION_TYPES:
        answers = Counter(s.answer for s in samples if s.qtype == q)
        assert len(answers) >= 2 and max(answers.values()) <= 60, (q, answers)


def test_benchmark_is_held_out_and_reproducible():
    bench = data.benchmark("test", n=40)
    assert len(bench) == 40
    assert all(_same(x, y) for x, y in zip(bench, data.benchmark("test", n=40)))
    assert all(seed >= 1_000_000_000 for seed in world.BENCHMARK_SEEDS.values())
    val = data.benchmark("val", n=40)
    assert not any(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(bench, val))
    with pytest.raises(KeyError, match="val"):
        data.benchmark("nope")


def test_score_answer_normalises_per_type():
    s = next(x for x in data.generate_samples(8, seed=0) if x.qtype == "count")
    digit = str(world.NUMBERS.index(s.answer))
    assert data.score_answer(s.answer, s)
    assert data.score_answer(f" {s.answer.capitalize()}.", s)
    assert data.score_answer(digit, s)
    assert not data.score_answer("many", s)
    assert not data.score_answer("", s)
    e = next(x for x in data.generate_samples(8, seed=0) if x.qtype == "exist")
    other = "no" if e.answer == "yes" else "yes"
    assert data.score_answer(e.answer.upper(), e) and not data.score_answer(other, e)
    # Only the first word counts: hedging over several answers is wrong.
    assert not data.score_answer(f"{other} {e.answer}", e)


def test_prompt_puts_the_image_before_the_question():
    assert data.build_prompt("what color is the circle ?") == "USER: <image>\nwhat color is the circle ? ASSISTANT:"


def test_objects_sit_on_the_patch_grid_with_a_gap():
    # Each object patch then belongs to exactly one object, and the mask lies inside the boxes' cells.
    p = world.PATCH_SIZE
    for s in data.generate_samples(100, seed=13):
        cells = np.zeros((world.GRID, world.GRID), dtype=int)
        for obj in s.objects:
            assert obj.x0 % p == 0 and obj.y0 % p == 0 and obj.side % p == 0
            x, y, n = obj.x0 // p, obj.y0 // p, obj.side // p
            assert x + n <= world.GRID and y + n <= world.GRID
            grown = np.zeros_like(cells)
            grown[max(y - 1, 0):y + n + 1, max(x - 1, 0):x + n + 1] = 1
            assert not (cells & grown).any(), "objects touch or overlap"
            cells[y:y + n, x:x + n] = 1
        mask = s.object_mask.numpy().reshape(world.GRID, world.GRID)
        assert not (mask & ~cells.astype(bool)).any()
        # Only a triangle's top corners can be empty cells of its box.
        assert (cells.sum() - mask.sum()) <= 2 * sum(o.shape == "triangle" for o in s.objects)


def test_dialogue_asks_distinct_questions_about_one_scene():
    a, b = world.make_dialogue(4, 17, turns=5), world.make_dialogue(4, 17, turns=5)
    assert [t for t in a.dialogue] == [t for t in b.dialogue]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    for s in [world.make_dialogue(4, i, turns=5) for i in range(40)]:
        questions = [q for q, _, _ in s.dialogue]
        assert 1 <= len(questions) <= 5 and len(set(questions)) == len(questions)
        assert (s.question, s.answer, s.qtype) == s.dialogue[0]
        for q, a_, qtype in s.dialogue:
            turn = data.Sample(s.question_id, s.image, q, a_, qtype, s.object_mask, s.objects)
            assert a_ == _true_answer(turn), q
    single = data.generate_samples(1, seed=0)[0]
    assert single.dialogue == [(single.question, single.answer, single.qtype)]
