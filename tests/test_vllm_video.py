"""tokprune's video strategies inside a real vLLM engine (CPU, in-process, offline) on Qwen2.5-VL videos.

Skipped where vLLM is not installed (docs/serving.md: the CPU recipe; CI leg ``v``). One engine: the tiny
random Qwen2.5-VL saved with its tokenizer, processor and video processor. A request's
``mm_processor_kwargs={"tokprune": "evs(keep_ratio=0.5)"}`` sizes its video's placeholders to the kept count
and the model keeps the chosen rows at their unpruned (t, h, w) positions; kept rows, prompt length,
first-token log-probs and greedy tokens equal ``tokprune.patch`` on the transformers model. The suite
rejects a plugin that keeps the wrong rows of a video and one that shifts the kept rows' frames.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (docs/serving.md: the CPU recipe)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: recorders see it

from _vllm_kit import assert_same_logprobs, first_logprobs, recorded_keeps  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

import tokprune  # noqa: E402
from tokprune.testing.checkpoints import save_tiny_qwen2_5_vl  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

VIDEO_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what moves in the video?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
IMAGE_AND_VIDEO = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
    "what moves in the video?<|im_end|>\n<|im_start|>assistant\n"
)
# 8 fps: a temporal patch group (2 frames) spans 0.25 s, one M-RoPE time step at the tiny config's
# tokens_per_second=4. Where a group spans more than one step, stock vLLM 0.32 and transformers 5.19 already
# disagree without tokprune: the text after a video starts at max(time) + 1 in vLLM (the 4.x reference rule)
# and at the video's start + max(t, h, w) in transformers (measured: first-token log-probs 0.08 apart).
FPS = 8.0
GREEDY = vllm.SamplingParams(max_tokens=4, temperature=0.0, logprobs=5)


def _video(seed: int, frames: int = 8, height: int = 16, width: int = 32, still: int = 0) -> np.ndarray:
    """uint8 ``[F, H, W, 3]``; the first ``still`` frames repeat frame 0 (EVS's dissimilarity is 0 there)."""
    pixels = (np.random.RandomState(seed).rand(frames, height, width, 3) * 255).astype("uint8")
    pixels[1:still] = pixels[0]
    return pixels


def _metadata(video: np.ndarray) -> dict:
    n = len(video)
    return {"fps": FPS, "total_num_frames": n, "frames_indices": list(range(n)), "duration": n / FPS}


def _request(prompt, video, spec=None, image=None):
    data = {"video": (video, _metadata(video))}
    if image is not None:
        data["image"] = image
    request = {"prompt": prompt, "multi_modal_data": data}
    if spec is not None:
        request["mm_processor_kwargs"] = {"tokprune": spec}
    return request




@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl_video"))


def _engine(path, **options):
    """An in-process engine on a tiny checkpoint taking an image and a video per prompt."""
    return vllm.LLM(
        model=str(path),
        max_model_len=512,
        max_num_seqs=8,
        limit_mm_per_prompt={"image": 1, "video": 1},
        dtype="float32",
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=256 << 20,
        gpu_memory_utilization=0.05,
        enable_prefix_caching=False,  # a mutated rerun must not reuse the unmutated run's KV cache
        **options,
    )


@pytest.fixture(scope="module")
def qwen(qwen_path):
    llm = _engine(qwen_path)
    yield llm
    del llm


def _transformers(path):
    """The same checkpoint on transformers (what tokprune.patch runs on) and its processor."""
    processor = AutoProcessor.from_pretrained(path)
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(), processor


@pytest.fixture(scope="module")
def qwen_hf(qwen_path):
    return _transformers(qwen_path)


def _hf_inputs(processor, prompt, video, image=None):
    return processor(
        text=[prompt],
        videos=[video],
        images=[image] if image is not None else None,
        video_metadata=[_metadata(video)],
        do_sample_frames=False,
        return_tensors="pt",
    )


def _hf_run(model, processor, prompt, video, spec, image=None, budget_scope="image"):
    """Greedy tokens, first-token top-5 log-probs and the unpruned prompt length of ``tokprune.patch``."""
    inputs = _hf_inputs(processor, prompt, video, image)
    context = tokprune.pruned(model, spec, budget_scope=budget_scope) if spec else contextlib.nullcontext()
    with context, torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=GREEDY.max_tokens, do_sample=False)
    top = torch.log_softmax(logits.double(), -1).topk(5)
    length = inputs["input_ids"].shape[1]
    return out[0, length:].tolist(), dict(zip(top.indices.tolist(), top.values.tolist())), length


SPECS = ["evs(keep_ratio=0.5)", "evs(keep=20)", "vidcom2(keep_ratio=0.4, reconcile=true)", "divprune(keep_ratio=0.5)"]


@pytest.mark.parametrize("spec", SPECS)
def test_a_pruned_video_equals_the_transformers_path(qwen, qwen_hf, spec):
    video = _video(1, still=4)  # 4 frames of 8 tokens; frames 0 and 1 the same: EVS empties frame 1
    name = spec.split("(")[0]
    with recorded_keeps(name) as keeps:
        (out,) = qwen.generate([_request(VIDEO_PROMPT, video, spec)], GREEDY)
        want_tokens, want_logprobs, unpruned = _hf_run(*qwen_hf, VIDEO_PROMPT, video, spec)
    vllm_keep, hf_keep = keeps[0], keeps[1]  # vLLM ran first; the HF forward and generate follow
    assert torch.equal(vllm_keep.cpu(), hf_keep.cpu())
    assert len(out.prompt_token_ids) == unpruned - 32 + int(hf_keep.sum())  # shrinks by exactly the pruned
    assert int(hf_keep.sum()) < 32
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


@pytest.mark.parametrize(("spec", "per_frame"), [("divprune(keep_ratio=0.5)", 4), ("divprune(keep=3)", 3)])
def test_a_video_budgeted_per_frame_equals_the_transformers_path(qwen, qwen_hf, spec, per_frame):
    # mm_processor_kwargs={"tokprune": spec, "tokprune_budget_scope": "frame"}: each of the 4 frames (8 tokens)
    # is a strategy row with its own budget, as tokprune.patch(..., budget_scope="frame")
    video = _video(30)
    request = _request(VIDEO_PROMPT, video, spec)
    request["mm_processor_kwargs"]["tokprune_budget_scope"] = "frame"
    with recorded_keeps("divprune") as keeps:
        (out,) = qwen.generate([request], GREEDY)
        want_tokens, want_logprobs, unpruned = _hf_run(*qwen_hf, VIDEO_PROMPT, video, spec, budget_scope="frame")
    vllm_keep, hf_keep = keeps[0], keeps[1]
    assert vllm_keep.shape[0] == 4 and torch.equal(vllm_keep.cpu(), hf_keep.cpu())  # one row per frame, the same
    assert (hf_keep.sum(dim=1) == per_frame).all()
    assert len(out.prompt_token_ids) == unpruned - 32 + 4 * per_frame
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)
    # the same spec per video keeps another layout (3 tokens in all, not 3 per frame): the scope is honoured
    if spec == "divprune(keep=3)":
        (whole,) = qwen.generate([_request(VIDEO_PROMPT, video, spec)], GREEDY)
        assert len(whole.prompt_token_ids) == unpruned - 32 + 3


def test_an_unpruned_video_equals_stock_transformers(qwen, qwen_hf):
    video = _video(2)
    (out,) = qwen.generate([_request(VIDEO_PROMPT, video)], GREEDY)
    want_tokens, want_logprobs, unpruned = _hf_run(*qwen_hf, VIDEO_PROMPT, video, None)
    assert len(out.prompt_token_ids) == unpruned
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_evs_leaves_the_image_of_the_prompt_whole(qwen, qwen_hf):
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(3).rand(16, 16, 3) * 255).astype("uint8"))  # 4 tokens
    video = _video(4, still=3)
    spec = "evs(keep_ratio=0.5)"
    (out,) = qwen.generate([_request(IMAGE_AND_VIDEO, video, spec, image)], GREEDY)
    want_tokens, want_logprobs, unpruned = _hf_run(*qwen_hf, IMAGE_AND_VIDEO, video, spec, image)
    assert len(out.prompt_token_ids) == unpruned - 16  # the video's 32 tokens to 16, the image whole
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_requests_in_one_batch_use_their_own_specs(qwen):
    video = _video(5, still=2)
    specs = [None, "evs(keep_ratio=0.25)", "evs(keep=12)", "divprune(keep=5)"]
    batch = qwen.generate([_request(VIDEO_PROMPT, video, s) for s in specs], GREEDY)
    full = len(batch[0].prompt_token_ids)
    assert [full - len(o.prompt_token_ids) for o in batch] == [0, 32 - 8, 32 - 12, 32 - 5]
    for spec, together in zip(specs, batch):  # batch == solo; the cached video is never reused across specs
        (solo,) = qwen.generate([_request(VIDEO_PROMPT, video, spec)], GREEDY)
        assert list(solo.outputs[0].token_ids) == list(together.outputs[0].token_ids)


def _first_rows(model, embeds, grids, factors, specs):
    out = type(model)._prune_videos(model, embeds, grids, factors, specs)
    return [torch.cat([e[: o.shape[0]], o[:, -4:]], dim=1) for e, o in zip(embeds, out)]  # wrong rows kept


def _next_frame(model, embeds, grids, factors, specs):
    out = type(model)._prune_videos(model, embeds, grids, factors, specs)
    for o in out:
        o[:, -4] += 1  # wrong: every kept token one frame (time step) later
    return out


@pytest.mark.parametrize("wrong", [_first_rows, _next_frame], ids=["wrong-rows", "next-frame"])
def test_the_equality_suite_rejects_wrong_variants(qwen, qwen_hf, wrong):
    # a video of its own per mutant: vLLM's encoder cache serves a video's rows again to the same spec, so a
    # second mutant on the first one's video would be judged on the first one's rows
    video = _video(6 if wrong is _first_rows else 16, still=3)
    spec = "evs(keep_ratio=0.5)"
    _, want_logprobs, _ = _hf_run(*qwen_hf, VIDEO_PROMPT, video, spec)

    def install(model):
        model._prune_videos = lambda *args: wrong(model, *args)

    qwen.apply_model(install)
    try:
        (out,) = qwen.generate([_request(VIDEO_PROMPT, video, spec)], GREEDY)
    finally:
        qwen.apply_model(lambda model: model.__dict__.pop("_prune_videos", None))
    with pytest.raises(AssertionError):
        assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_the_equality_suite_rejects_vllms_own_position_recompute(qwen, qwen_hf):
    """vLLM 0.32's ``recompute_mrope_positions`` (what the plugin used before) places the video of an
    image-then-video prompt on the image's placeholders; the mixed-prompt equality catches it."""
    from PIL import Image
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    image = Image.fromarray((np.random.RandomState(10).rand(16, 16, 3) * 255).astype("uint8"))
    video = _video(11, still=3)
    spec = "evs(keep_ratio=0.5)"
    _, want_logprobs, _ = _hf_run(*qwen_hf, IMAGE_AND_VIDEO, video, spec, image)

    def install(model):
        stock = Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions
        model.recompute_mrope_positions = lambda *args, **kwargs: stock(model, *args, **kwargs)

    qwen.apply_model(install)
    try:
        (out,) = qwen.generate([_request(IMAGE_AND_VIDEO, video, spec, image)], GREEDY)
    finally:
        qwen.apply_model(lambda model: model.__dict__.pop("recompute_mrope_positions", None))
    with pytest.raises(AssertionError):
        assert_same_logprobs(first_logprobs(out), want_logprobs)


BAD = [
    ("fastv", ["stage=llm", "evs", "divprune"]),
    ("vidcom2(keep_ratio=0.5)", ["features decide", "reconcile=true", "evs"]),
    ("evs(keep_ratio=0)", ["keep_ratio", "evs"]),
]


@pytest.mark.parametrize(("spec", "fragments"), BAD, ids=[b[0] for b in BAD])
def test_a_spec_that_cannot_run_fails_its_request_only(qwen, spec, fragments):
    engine = qwen.llm_engine
    engine.add_request("good-1", _request(VIDEO_PROMPT, _video(7), "evs(keep=10)"), GREEDY)
    with pytest.raises(ValueError) as info:
        engine.add_request("bad", _request(VIDEO_PROMPT, _video(8), spec), GREEDY)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    engine.add_request("good-2", _request(VIDEO_PROMPT, _video(9)), GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == {"good-1", "good-2"}
    assert len(finished["good-2"].prompt_token_ids) - len(finished["good-1"].prompt_token_ids) == 32 - 10


# -- beside vLLM's own EVS (--video-pruning-rate): one engine-wide rate, the same rule --------------------


@pytest.fixture(scope="module")
def qwen_evs(qwen_path):
    llm = _engine(qwen_path, video_pruning_rate=0.5)
    yield llm
    del llm


def test_tokprune_evs_keeps_what_vllms_own_evs_keeps(qwen, qwen_evs, monkeypatch):
    """vLLM's EVS at ``video_pruning_rate=q`` and tokprune's ``evs(keep_ratio=1-q)`` keep the same rows and
    prompt length. (vLLM's EVS runs on CPU here because the plugin sets the runner's pruning flag that
    ``CPUModelRunner`` never sets.) 2 fps: vLLM's EVS truncates ``second_per_grid_ts`` to an integer."""
    from vllm.model_executor.models import qwen2_5_vl

    stock = qwen2_5_vl.compute_retention_mask
    theirs = []
    monkeypatch.setattr(qwen2_5_vl, "compute_retention_mask", lambda *a, **k: theirs.append(stock(*a, **k)) or theirs[-1])
    video = _video(12, still=3)
    metadata = {**_metadata(video), "fps": 2.0, "duration": len(video) / 2.0}
    request = {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": (video, metadata)}}
    (engine_wide,) = qwen_evs.generate([request], GREEDY)
    with recorded_keeps("evs") as ours:
        (per_request,) = qwen.generate([{**request, "mm_processor_kwargs": {"tokprune": "evs(keep_ratio=0.5)"}}], GREEDY)
    assert len(theirs) == 1 and len(ours) == 1
    assert torch.equal(theirs[0].flatten().cpu(), ours[0][0].cpu())
    assert len(engine_wide.prompt_token_ids) == len(per_request.prompt_token_ids)


def test_a_tokprune_video_spec_on_an_engine_running_vllms_evs_is_refused(qwen_evs):
    with pytest.raises(ValueError, match="video_pruning_rate"):
        qwen_evs.llm_engine.add_request("both", _request(VIDEO_PROMPT, _video(13), "evs(keep_ratio=0.5)"), GREEDY)
    (out,) = qwen_evs.generate([_request(VIDEO_PROMPT, _video(13))], GREEDY)
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens


# -- Qwen3-VL videos: pruned per frame (budget scope "frame"); a budget per video is refused -------------
# Each Qwen3-VL frame is its own placeholder run after its timestamp text, sized by vLLM before the video is
# encoded: the plugin cuts every frame's run to the frame's budget and places each frame's kept rows at their
# stock offsets in that run. Before, the plugin's positions for a Qwen3-VL video crashed the engine (every
# video, with or without a spec).


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    from tokprune.testing.checkpoints import save_tiny_qwen3_vl

    return save_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl_video"))


@pytest.fixture(scope="module")
def qwen3(qwen3_path):
    llm = _engine(qwen3_path)
    yield llm
    del llm


@pytest.fixture(scope="module")
def qwen3_hf(qwen3_path):
    return _transformers(qwen3_path)


def _qwen3_image():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(21).rand(32, 32, 3) * 255).astype("uint8"))  # 16 tokens


def test_qwen3_an_unpruned_video_equals_stock_transformers(qwen3, qwen3_hf):
    video = _video(20)
    (out,) = qwen3.generate([_request(VIDEO_PROMPT, video)], GREEDY)
    want_tokens, want_logprobs, unpruned = _hf_run(*qwen3_hf, VIDEO_PROMPT, video, None)
    assert len(out.prompt_token_ids) == unpruned
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_qwen3_an_image_and_a_video_unpruned_equal_stock_transformers(qwen3, qwen3_hf):
    video, image = _video(22), _qwen3_image()
    (out,) = qwen3.generate([_request(IMAGE_AND_VIDEO, video, None, image)], GREEDY)
    want_tokens, want_logprobs, unpruned = _hf_run(*qwen3_hf, IMAGE_AND_VIDEO, video, None, image)
    assert len(out.prompt_token_ids) == unpruned
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_qwen3_the_video_suite_rejects_frames_placed_at_their_frame_index(qwen3, qwen3_hf):
    """A plugin giving each frame its index on the time axis (Qwen2.5-VL's rule) fails the equality."""
    from vllm.multimodal.video_prune.evs import compute_mrope_for_media

    video = _video(26)  # not seen before: the engine caches a video's rows
    _, want_logprobs, _ = _hf_run(*qwen3_hf, VIDEO_PROMPT, video, None)

    def install(model):
        def frame_index_offsets(emb, grid, keep=None):
            assert keep is None  # an unpruned video
            offsets = compute_mrope_for_media(torch.tensor(grid), model.visual.spatial_merge_size)
            return torch.cat([emb, offsets.to(emb.device, emb.dtype)], dim=1)

        model._with_frame_offsets = frame_index_offsets

    qwen3.apply_model(install)
    try:
        (out,) = qwen3.generate([_request(VIDEO_PROMPT, video)], GREEDY)
    finally:
        qwen3.apply_model(lambda model: model.__dict__.pop("_with_frame_offsets", None))
    with pytest.raises(AssertionError):
        assert_same_logprobs(first_logprobs(out), want_logprobs)


QWEN3_VIDEO_SPECS = [
    # a temporal strategy: refused for the family before any video is seen
    ("evs(keep_ratio=0.5)", ["evs(keep_ratio=0.5)", "per frame only", "budget scope 'frame'", "divprune, random"]),
    # a budget per video cannot size the frames' runs: refused naming the per-frame form, not served half-pruned
    ("divprune(keep=6)", ["divprune(keep=6)", "whole video", "Qwen3-VL", "'tokprune_budget_scope': 'frame'",
                          "'tokprune': 'none'"]),
]


@pytest.mark.parametrize(("spec", "fragments"), QWEN3_VIDEO_SPECS, ids=[s for s, _ in QWEN3_VIDEO_SPECS])
def test_qwen3_a_spec_that_would_prune_a_video_fails_its_request_only(qwen3, spec, fragments):
    engine = qwen3.llm_engine
    engine.add_request("good-1", _request(VIDEO_PROMPT, _video(23)), GREEDY)
    with pytest.raises(ValueError) as info:
        engine.add_request("bad", _request(IMAGE_AND_VIDEO, _video(24), spec, _qwen3_image()), GREEDY)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    engine.add_request("good-2", _request(VIDEO_PROMPT, _video(25), "none"), GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == {"good-1", "good-2"}
    assert len(finished["good-1"].prompt_token_ids) == len(finished["good-2"].prompt_token_ids)


def test_a_budget_scope_the_server_cannot_run_fails_its_request_only(qwen):
    engine = qwen.llm_engine
    bad = _request(VIDEO_PROMPT, _video(31), "divprune(keep=3)")
    bad["mm_processor_kwargs"]["tokprune_budget_scope"] = "tile"
    with pytest.raises(ValueError, match=r"budget scope 'tile'.*'image'.*'frame'"):
        engine.add_request("bad-scope", bad, GREEDY)
    temporal = _request(VIDEO_PROMPT, _video(32), "evs(keep_ratio=0.5)")
    temporal["mm_processor_kwargs"]["tokprune_budget_scope"] = "frame"
    with pytest.raises(ValueError, match=r"evs sets its own budget across the frames.*budget scope 'image'"):
        engine.add_request("bad-temporal", temporal, GREEDY)
    engine.add_request("good", _request(VIDEO_PROMPT, _video(33), "evs(keep=10)"), GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == {"good"}


def _qwen3_frame_request(prompt, video, spec, image=None):
    request = _request(prompt, video, spec, image)
    request["mm_processor_kwargs"]["tokprune_budget_scope"] = "frame"
    return request


# divprune only: the other strategy servable here, random, draws from the features' exact bits, which two
# engines' towers do not share (their float rounding differs)
@pytest.mark.parametrize(("spec", "per_frame"), [("divprune(keep_ratio=0.5)", 4), ("divprune(keep=3)", 3)])
def test_qwen3_a_video_pruned_per_frame_equals_the_transformers_path(qwen3, qwen3_hf, spec, per_frame):
    """mm_processor_kwargs={"tokprune": spec, "tokprune_budget_scope": "frame"}: every frame's run (after its
    timestamp) shrinks to the frame's budget, its kept rows at their stock offsets, as
    tokprune.patch(..., budget_scope="frame") on transformers."""
    video = _video(40)  # 4 frames (temporal groups) of 8 merged tokens
    with recorded_keeps("divprune") as keeps:
        (out,) = qwen3.generate([_qwen3_frame_request(VIDEO_PROMPT, video, spec)], GREEDY)
        want_tokens, want_logprobs, unpruned = _hf_run(*qwen3_hf, VIDEO_PROMPT, video, spec, budget_scope="frame")
    vllm_keep, hf_keep = keeps[0], keeps[1]
    assert vllm_keep.shape == hf_keep.shape == (4, 8) and torch.equal(vllm_keep.cpu(), hf_keep.cpu())
    assert (hf_keep.sum(dim=1) == per_frame).all()
    assert len(out.prompt_token_ids) == unpruned - 32 + 4 * per_frame  # shrinks by exactly the pruned
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_qwen3_an_image_and_a_video_pruned_per_frame_equal_the_transformers_path(qwen3, qwen3_hf):
    video, image, spec = _video(41), _qwen3_image(), "divprune(keep=5)"
    with recorded_keeps("divprune") as keeps:
        (out,) = qwen3.generate([_qwen3_frame_request(IMAGE_AND_VIDEO, video, spec, image)], GREEDY)
        want_tokens, want_logprobs, unpruned = _hf_run(
            *qwen3_hf, IMAGE_AND_VIDEO, video, spec, image, budget_scope="frame"
        )
    assert len(out.prompt_token_ids) == unpruned - (16 - 5) - 4 * (8 - 5)  # the image and every frame
    assert [k.sum(dim=1).tolist() for k in keeps[:2]] == [[5], [5, 5, 5, 5]]  # vLLM: the image, then the frames
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def _first_rows_per_frame(model, embeds, grids, specs):
    """Wrong: each frame keeps its first rows, whatever the strategy chose (the count still matches)."""
    out = []
    for keep, grid in zip(type(model)._prune_frames(model, embeds, grids, specs), grids):
        if keep is None:
            out.append(None)
            continue
        frames = keep.view(int(grid[0]), -1)
        first = torch.zeros_like(frames)
        first[:, : int(frames[0].sum())] = True
        out.append(first.flatten())
    return out


def _next_frame_offsets(model, emb, grid, keep=None):
    """Wrong: every kept row one frame later on the time axis (the rows are right, the positions are not)."""
    rows = type(model)._with_frame_offsets(model, emb, grid, keep)
    rows[:, -4] += 1
    return rows


@pytest.mark.parametrize("wrong", ["_prune_frames", "_with_frame_offsets"], ids=["wrong-rows", "shifted-positions"])
def test_qwen3_the_per_frame_suite_rejects_wrong_variants(qwen3, qwen3_hf, wrong):
    video, spec = _video(42 if wrong == "_prune_frames" else 43), "divprune(keep=3)"
    _, want_logprobs, _ = _hf_run(*qwen3_hf, VIDEO_PROMPT, video, spec, budget_scope="frame")
    mutant = _first_rows_per_frame if wrong == "_prune_frames" else _next_frame_offsets

    def install(model):
        setattr(model, wrong, lambda *args: mutant(model, *args))

    qwen3.apply_model(install)
    try:
        (out,) = qwen3.generate([_qwen3_frame_request(VIDEO_PROMPT, video, spec)], GREEDY)
    finally:
        qwen3.apply_model(lambda model: model.__dict__.pop(wrong, None))
    with pytest.raises(AssertionError):
        assert_same_logprobs(first_logprobs(out), want_logprobs)
