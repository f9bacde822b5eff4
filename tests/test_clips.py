"""The clip world (determinism, exact answer balance, held-out seeds, questions that need time), its
Qwen2.5-VL pixel layout against transformers' image processor, and the clip benchmark loader (bad clips
skipped with ``skip_bad_rows``, counted, never silent)."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tokprune.ablation.config import DatasetConfig
from tokprune.ablation.datasets import DatasetError, load_dataset
from tokprune.data import clips, world
from tokprune.models import build_qwen, train_video


def _same(a: clips.Clip, b: clips.Clip) -> bool:
    return (a.question, a.answer, a.qtype, a.tracks) == (b.question, b.answer, b.qtype, b.tracks) and all(
        x.tobytes() == y.tobytes() for x, y in zip(a.frames, b.frames)
    )


def test_clips_are_a_pure_function_of_seed_index_and_type():
    for q in clips.VIDEO_QUESTION_TYPES:
        assert _same(clips.make_clip(7, 3, q), clips.make_clip(7, 3, q))
    first = clips.generate_clips(8, 5)
    assert all(_same(a, b) for a, b in zip(first, clips.generate_clips(8, 5)))
    # A later window of the stream is the same clips as the corresponding part of a longer one.
    assert all(_same(a, b) for a, b in zip(clips.generate_clips(4, 5, start=4), first[4:]))
    assert not _same(clips.make_clip(7, 3, "motion"), clips.make_clip(8, 3, "motion"))


def test_answers_are_exactly_balanced_per_type():
    options = {"motion": clips.DIRECTIONS, "appear": world.SHAPES, "frames": world.NUMBERS[1:1 + clips.FRAMES],
               "change": tuple(world.COLORS)}
    n_cycle = 4 * 3 * 4 * 5  # every type sees whole cycles of its answers
    bench = clips.clip_benchmark("val", n_cycle)
    for q, opts in options.items():
        counts = Counter(c.answer for c in bench if c.qtype == q)
        assert set(counts) == set(opts), (q, counts)
        assert len(set(counts.values())) == 1, (q, counts)
    images = Counter((s.qtype, s.answer) for s in (clips.image_sample(0, i) for i in range(20)))
    assert images[("exist", "yes")] == images[("exist", "no")] == 5
    assert {a for q, a in images if q == "color"} == set(world.COLORS)


def test_held_out_seeds_are_never_training_seeds():
    assert min(clips.BENCHMARK_SEEDS.values()) > 1_000_000_000
    assert set(clips.BENCHMARK_SEEDS.values()).isdisjoint(world.BENCHMARK_SEEDS.values())
    # Training streams are seed*10 + stream for seeds below 1e8.
    for stream in (train_video.CLIP_STREAM, train_video.IMAGE_STREAM):
        assert 0 * 10 + stream < 1_000_000_000
    test_ids = {c.question_id for c in clips.clip_benchmark("test", 16)}
    train_ids = {c.question_id for c in train_video.batch(train_video.parse_args(["--out", "x"]), 0)}
    assert test_ids.isdisjoint(train_ids)
    with pytest.raises(KeyError, match="unknown split 'train'; valid: \\['test', 'val'\\]"):
        clips.clip_benchmark("train")


def _visible(clip: clips.Clip, shape: str) -> list[bool]:
    return [any(tr.shape == shape and tr.cells[t] is not None for tr in clip.tracks) for t in range(clips.FRAMES)]


def test_every_question_needs_more_than_the_first_frame():
    for c in clips.clip_benchmark("test", 80):
        if c.qtype == "motion":
            mover = c.tracks[0]
            (r0, c0), (r1, c1) = mover.cells[0], mover.cells[-1]
            assert {(0, -1): "left", (0, 1): "right", (-1, 0): "up", (1, 0): "down"}[
                (int(np.sign(r1 - r0)), int(np.sign(c1 - c0)))] == c.answer
        elif c.qtype == "appear":
            assert not _visible(c, c.answer)[0] and _visible(c, c.answer)[-1]
            others = [tr for tr in c.tracks if tr.shape != c.answer]
            first_seen = {tr.shape: next(t for t, x in enumerate(tr.cells) if x) for tr in c.tracks}
            assert all(first_seen[o.shape] < first_seen[c.answer] for o in others)
        elif c.qtype == "frames":
            shape = c.question.split()[-2]
            assert sum(_visible(c, shape)) == world.NUMBERS.index(c.answer)
        else:
            target = c.tracks[0]
            assert target.colors[0] != c.answer == target.colors[-1]
        # The token mask is what the frames show: one token per visible shape per frame.
        visible = sum(tr.cells[t] is not None for tr in c.tracks for t in range(clips.FRAMES))
        assert int(c.object_mask.sum()) == visible


def test_patch_layout_equals_transformers_qwen2vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=clips.FRAME_SIZE**2, max_pixels=clips.FRAME_SIZE**2, patch_size=14,
                                    temporal_patch_size=2, merge_size=2)
    sample = clips.image_sample(1, 0)
    ref = proc(images=[sample.frames[0]], return_tensors="pt")
    pixels, grid = clips.clip_pixels(sample)
    assert grid.tolist() == ref["image_grid_thw"][0].tolist() == [1, 8, 8]
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=1e-5, rtol=0)
    # A clip: one temporal slice per frame, each slice the frame's image layout.
    clip = clips.make_clip(0, 0, "motion")
    video, vgrid = clips.clip_pixels(clip)
    assert vgrid.tolist() == [clips.FRAMES, 8, 8]
    per = 64
    for t, frame in enumerate(clip.frames):
        torch.testing.assert_close(video[t * per:(t + 1) * per], proc(images=[frame], return_tensors="pt")["pixel_values"],
                                   atol=1e-5, rtol=0)


def test_model_inputs_match_the_processor_contract():
    tok = build_qwen.build_tokenizer()
    batch = [clips.make_clip(0, 0, "motion"), clips.image_sample(0, 1), clips.make_clip(0, 1, "appear")]
    inp = build_qwen.model_inputs(tok, batch)
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert (inp["input_ids"] == video_id).sum(1).tolist() == [clips.TOKENS_PER_CLIP, 0, clips.TOKENS_PER_CLIP]
    assert (inp["input_ids"] == image_id).sum(1).tolist() == [0, clips.TOKENS_PER_FRAME, 0]
    assert inp["video_grid_thw"].tolist() == [[4, 8, 8]] * 2 and inp["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert inp["mm_token_type_ids"].max() == 2 and tok.unk_token_id not in inp["input_ids"].tolist()
    assert inp["attention_mask"][1, 0] == 0  # left padding


def _export(tmp_path, n=6):
    path = clips.export_clips(clips.clip_benchmark("test", n), tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return path, rows


def _cfg(path, skip):
    return DatasetConfig(name="clips", path=str(path), skip_bad_rows=skip)


def test_clip_file_round_trips_the_embedded_benchmark(tmp_path):
    path, _ = _export(tmp_path)
    loaded = load_dataset(_cfg(path, False))
    embedded = load_dataset(DatasetConfig(name="clips"), 6)
    assert loaded.skipped == [] and loaded.inputs is not None
    assert [s.image_digest for s in loaded.samples] == [s.image_digest for s in embedded.samples]
    tok = build_qwen.build_tokenizer()
    a = loaded.inputs(tok, loaded.samples, [s.question for s in loaded.samples])
    b = embedded.inputs(tok, embedded.samples, [s.question for s in embedded.samples])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda row, d: {**row, "video": []}, "empty clip"),
        (lambda row, d: {**row, "video": row["video"][:2]}, "has 2 frames; the clip world has 4"),
        (lambda row, d: (d / row["video"][1]).write_bytes(b"not a png") and row, "is not a readable image"),
        (lambda row, d: (Image.new("RGB", (50, 50)).save(d / row["video"][0]) or row), "frame 0 is (50, 50)"),
        (lambda row, d: {**row, "video": [*row["video"][:3], "gone.png"]}, "frame not found"),
    ],
)
def test_a_bad_clip_is_an_error_or_skipped_and_counted(tmp_path, edit, reason):
    path, rows = _export(tmp_path)
    rows[2] = edit(rows[2], tmp_path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=rf"clips\.jsonl:3: .*{re.escape(reason[:20])}.*skip_bad_rows=true"):
        load_dataset(_cfg(path, False))
    ds = load_dataset(_cfg(path, True))
    assert len(ds.samples) == 5 and len(ds.skipped) == 1
    assert ds.skipped[0].startswith("line 3: ") and reason[:20] in ds.skipped[0]
    assert rows[2]["question_id"] not in {s.question_id for s in ds.samples}


def test_follow_up_answers_agree_with_the_generators():
    # Derived from the tracks alone, every clip's own question gets the answer its generator chose.
    for c in clips.clip_benchmark("val", 80):
        derived = {q: a for q, a, _ in clips.follow_ups(c, include_own=True)}
        assert derived.get(c.question) == c.answer, (c.question, c.answer, derived)
        assert c.question not in {q for q, _, _ in clips.follow_ups(c)}
