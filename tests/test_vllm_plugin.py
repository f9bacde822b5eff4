"""tokprune inside a real vLLM engine (CPU, in-process, offline): skipped where vLLM is not installed.

Install: the CPU recipe of docs/serving.md (CI leg ``v`` in .ci/run). Two engines per run: the tiny random
Qwen2.5-VL saved to a tmp folder with its trained BPE tokenizer and processor (per-request specs), and the
embedded LLaVA ``tiny-llava-shapes`` as shipped (an engine-wide spec, overridden per request).

Equality with the transformers path: the strategy object's keep masks (recorded on the registered class,
which both engines call in this process), first-token log-probs and greedy outputs equal those of
``tokprune.patch`` on the same checkpoint. The suite rejects wrong variants of the plugin: kept tokens at
shifted positions and the wrong rows kept (tests/test_vllm_video.py adds vLLM's own position recompute, which
puts the video of an image-then-video prompt on the image's placeholders).
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
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

import tokprune  # noqa: E402
from tokprune import data, models  # noqa: E402
from tokprune.integrations import vllm_plugin  # noqa: E402
from tokprune.registry import describe  # noqa: E402
from tokprune.testing.checkpoints import save_tiny_qwen2_5_vl  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

QWEN_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what color is the square?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_TWO_IMAGES = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
    "how many circles are there?<|im_end|>\n<|im_start|>assistant\n"
)
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"


def _image(seed: int, height: int = 32, width: int = 32) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def _engine(path, **options):
    return vllm.LLM(
        model=str(path),
        max_model_len=512,
        max_num_seqs=8,
        limit_mm_per_prompt={"image": 2, "video": 0},
        dtype="float32",
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=256 << 20,
        gpu_memory_utilization=0.05,
        enable_prefix_caching=False,  # a mutated rerun must not reuse the unmutated run's KV cache
        **options,
    )


def _request(prompt, images, spec=None):
    request = {"prompt": prompt, "multi_modal_data": {"image": images if len(images) != 1 else images[0]}}
    if not images:
        request = {"prompt": prompt}
    if spec is not None:
        request["mm_processor_kwargs"] = {"tokprune": spec}
    return request


GREEDY = vllm.SamplingParams(max_tokens=4, temperature=0.0, logprobs=5)




@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def qwen(qwen_path):
    llm = _engine(qwen_path)
    yield llm
    del llm


@pytest.fixture(scope="module")
def qwen_hf(qwen_path):
    processor = AutoProcessor.from_pretrained(qwen_path)
    model = AutoModelForImageTextToText.from_pretrained(qwen_path, dtype=torch.float32).eval()
    return model, processor


def _hf_run(model, processor, prompt, images, spec, **options):
    """Greedy tokens and first-token top-5 log-probs of the transformers path (``tokprune.patch``)."""
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    context = tokprune.pruned(model, spec, **options) if spec else contextlib.nullcontext()
    with context, torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=GREEDY.max_tokens, do_sample=False)
    top = torch.log_softmax(logits.double(), -1).topk(5)
    return out[0, inputs["input_ids"].shape[1] :].tolist(), dict(zip(top.indices.tolist(), top.values.tolist()))


# -- Qwen2.5-VL, per-request specs ---------------------------------------------------------------------


def test_plugin_is_found_by_vllm():
    from importlib.metadata import entry_points

    assert "tokprune" in {e.name for e in entry_points(group="vllm.general_plugins")}
    assert vllm_plugin.vllm_version() in vllm_plugin.TESTED_VLLM
    assert vllm_plugin.missing_pieces() == []


# Left out: cdpruner(relevance=uniform), whose first DPP pick is an exact tie (every diagonal entry is 1),
# broken by the 1e-7 differences between vLLM's tower and transformers' as a logits tie would be; and
# random, whose subset hashes the features' bits (by design: never the batch), so those 1e-7 differences
# draw another subset. Both keep their announced counts (test_qwen_requests_in_one_batch_use_their_own_specs).
def test_an_untested_vllm_lacking_a_piece_refuses_at_engine_start_naming_it(monkeypatch):
    monkeypatch.setattr(vllm_plugin, "vllm_version", lambda: "0.99.0")
    monkeypatch.setattr(
        vllm_plugin, "missing_pieces", lambda: ["vllm.multimodal.video_prune.evs:compute_mrope_for_media"]
    )
    with pytest.raises(vllm_plugin.VllmPluginError) as info:
        vllm_plugin.register()
    message = str(info.value)
    assert "compute_mrope_for_media" in message and "0.99.0" in message and "VLLM_PLUGINS" in message
    monkeypatch.setattr(vllm_plugin, "missing_pieces", lambda: [])
    with pytest.warns(vllm_plugin.UntestedVllmWarning, match="0.99.0"):
        vllm_plugin.register()


@pytest.mark.parametrize("spec", ["divprune(keep_ratio=0.5)", "divprune(keep=3)"])
def test_qwen_equals_the_transformers_path(qwen, qwen_hf, spec):
    image = _image(11)
    name = spec.split("(")[0]
    with recorded_keeps(name) as keeps:
        (out,) = qwen.generate([_request(QWEN_PROMPT, [image], spec)], GREEDY)
        want_tokens, want_logprobs = _hf_run(*qwen_hf, QWEN_PROMPT, [image], spec)
    vllm_keep, hf_keep = keeps[0], keeps[1]  # vLLM ran first; the HF forward and generate follow
    assert torch.equal(vllm_keep.cpu(), hf_keep.cpu())
    assert len(out.prompt_token_ids) == 43 - 16 + int(hf_keep.sum())  # shrinks by exactly the pruned tokens
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_qwen_unpruned_equals_stock_transformers(qwen, qwen_hf):
    image = _image(12, 48, 32)
    (out,) = qwen.generate([_request(QWEN_PROMPT, [image])], GREEDY)
    want_tokens, want_logprobs = _hf_run(*qwen_hf, QWEN_PROMPT, [image], None)
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def _shift_kept(model, grid, t_factor=1.0):
    pos = type(model)._media_positions(model, grid, t_factor)
    pos[:, 1] += 1  # wrong on purpose: every kept token one row down
    return pos


def _first_rows(model, embeds, grids, specs):
    out = type(model)._prune_images(model, embeds, grids, specs)
    return [torch.cat([e[: o.shape[0]], o[:, -4:]], dim=1) for e, o in zip(embeds, out)]  # wrong rows kept


@pytest.mark.parametrize(
    ("attribute", "wrong", "seed"),
    [
        ("_media_positions", _shift_kept, 21),
        ("_prune_images", _first_rows, 23),
    ],
    ids=["shifted-positions", "wrong-rows"],
)
def test_the_equality_suite_rejects_wrong_variants(qwen, qwen_hf, attribute, wrong, seed):
    image = _image(seed, 48, 32)  # taller than wide: the text restart differs from EVS's rule
    spec = "divprune(keep_ratio=0.5)"
    want_tokens, want_logprobs = _hf_run(*qwen_hf, QWEN_PROMPT, [image], spec)

    def install(model):
        setattr(model, attribute, lambda *args: wrong(model, *args))

    qwen.apply_model(install)
    try:
        (out,) = qwen.generate([_request(QWEN_PROMPT, [image], spec)], GREEDY)
    finally:
        qwen.apply_model(lambda model: model.__dict__.pop(attribute, None))
    with pytest.raises(AssertionError):
        assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_qwen_requests_in_one_batch_use_their_own_specs(qwen):
    image = _image(31)
    specs = [None, "divprune(keep=4)", "random(keep=9)", "divprune(keep_ratio=0.5)"]
    batch = qwen.generate([_request(QWEN_PROMPT, [image], s) for s in specs], GREEDY)
    assert [len(o.prompt_token_ids) for o in batch] == [43, 43 - 12, 43 - 7, 43 - 8]
    for spec, together in zip(specs, batch):  # batch == solo, and the cached image is never reused across specs
        (solo,) = qwen.generate([_request(QWEN_PROMPT, [image], spec)], GREEDY)
        assert list(solo.outputs[0].token_ids) == list(together.outputs[0].token_ids)
        assert len(solo.prompt_token_ids) == len(together.prompt_token_ids)


def test_qwen_several_images_one_spec_and_a_budget_above_the_tokens(qwen):
    small, large = _image(41, 16, 16), _image(42, 32, 48)  # 4 and 24 tokens
    (out,) = qwen.generate([_request(QWEN_TWO_IMAGES, [small, large], "divprune(keep=6)")], GREEDY)
    (full,) = qwen.generate([_request(QWEN_TWO_IMAGES, [small, large])], GREEDY)
    assert len(full.prompt_token_ids) - len(out.prompt_token_ids) == (4 - 4) + (24 - 6)
    (everything,) = qwen.generate([_request(QWEN_PROMPT, [_image(43)], "divprune(keep=1000)")], GREEDY)
    assert len(everything.prompt_token_ids) == 43


@pytest.mark.parametrize("spec", [None, "divprune(keep=6)"])
def test_qwen_two_images_equal_the_transformers_path(qwen, qwen_hf, spec):
    """Each image's rows on its own placeholders (the plugin places them itself since vLLM 0.32's
    recompute_mrope_positions misplaced an image followed by a video: tests/test_vllm_video.py)."""
    images = [_image(44), _image(45, 48, 32)]
    (out,) = qwen.generate([_request(QWEN_TWO_IMAGES, images, spec)], GREEDY)
    want_tokens, want_logprobs = _hf_run(*qwen_hf, QWEN_TWO_IMAGES, images, spec)
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_qwen_a_request_without_an_image_runs_with_a_spec(qwen):
    (out,) = qwen.generate([_request("<|im_start|>user\nhello<|im_end|>\n", [], "divprune(keep=3)")], GREEDY)
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens


BAD = [
    ("cls_kne", ["cls_kne", "divprune"]),
    ("divprune(keep_ratio=2)", ["keep_ratio", "divprune"]),
    ("fastv", ["stage=llm", "divprune"]),
    ("cls_knee", ["before the image is encoded", "divprune"]),
    ("topk(keep=4)", ["CLS", "divprune"]),
]


@pytest.mark.parametrize(("spec", "fragments"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_spec_fails_its_request_only_and_the_engine_keeps_serving(qwen, spec, fragments):
    engine = qwen.llm_engine
    engine.add_request("good-1", _request(QWEN_PROMPT, [_image(51)], "divprune(keep=4)"), GREEDY)
    with pytest.raises(ValueError) as info:
        engine.add_request("bad", _request(QWEN_PROMPT, [_image(52)], spec), GREEDY)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    engine.add_request("good-2", _request(QWEN_PROMPT, [_image(53)]), GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == {"good-1", "good-2"}
    assert len(finished["good-1"].prompt_token_ids) == 43 - 12
    (after,) = qwen.generate([_request(QWEN_PROMPT, [_image(54)], "divprune(keep=2)")], GREEDY)
    assert len(after.prompt_token_ids) == 43 - 14


# -- LLaVA-1.5: the embedded model as shipped, an engine-wide spec ------------------------------------------


@pytest.fixture(scope="module")
def llava():
    llm = _engine(models.path("tiny-llava-shapes"), mm_processor_kwargs={"tokprune": "topk(keep_ratio=0.25)"})
    yield llm
    del llm


@pytest.fixture(scope="module")
def llava_hf():
    path = models.path("tiny-llava-shapes")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, processor


def test_llava_engine_wide_spec_and_per_request_overrides(llava):
    sample = data.benchmark("test", 1)[0]
    prompt = LLAVA_PROMPT.format(question=sample.question)
    default, off, other = llava.generate(
        [
            _request(prompt, [sample.image]),
            _request(prompt, [sample.image], "none"),
            _request(prompt, [sample.image], "random(keep=10)"),
        ],
        GREEDY,
    )
    unpruned = len(off.prompt_token_ids)
    assert unpruned - len(default.prompt_token_ids) == 144 - 36
    assert unpruned - len(other.prompt_token_ids) == 144 - 10


# vLLM numbers LLaVA's shorter prompt contiguously: tokprune.patch's default for the methods whose reference
# renumbers (positions() == "compact"); topk's default keeps the unpruned positions, so it is compared with
# vision_positions="compact" named (docs/serving.md). cdpruner: no CLIP text tower on either side, so both
# run relevance=text's CLS stand-in.
LLAVA_EQUAL = [
    ("topk(keep_ratio=0.25)", {"vision_positions": "compact"}),
    ("vispruner(keep=20)", {}),
    ("divprune(keep=30)", {}),
    ("cdpruner(keep=20)", {}),
]


@pytest.mark.parametrize(("spec", "options"), LLAVA_EQUAL, ids=[e[0] for e in LLAVA_EQUAL])
def test_llava_equals_the_transformers_path_on_the_benchmark(llava, llava_hf, spec, options):
    """Kept rows, first-token log-probs and greedy answers on benchmark questions against ``tokprune.patch``
    with its defaults wherever vLLM's contiguous numbering is the default."""
    samples = data.benchmark("test", 6)
    name = spec.split("(")[0]
    assert (describe(name).cls().positions() == "compact") == (not options)  # compact is the default here
    for sample in samples:
        prompt = LLAVA_PROMPT.format(question=sample.question)
        with recorded_keeps(name) as keeps:
            (out,) = llava.generate([_request(prompt, [sample.image], spec)], GREEDY)
            want_tokens, want_logprobs = _hf_run(*llava_hf, prompt, [sample.image], spec, **options)
        assert torch.equal(keeps[0].cpu(), keeps[1].cpu())
        assert list(out.outputs[0].token_ids) == want_tokens
        assert_same_logprobs(first_logprobs(out), want_logprobs)


@pytest.mark.parametrize("spec", ["divprune(keep=30)", "cdpruner(keep=20)"])
def test_llava_selects_on_the_projected_tokens(llava, spec):
    """The projector reaches the strategy in vLLM: ``features=encoder`` (what a plugin that forgot
    ``project`` computes) keeps another set on some questions, so the equality above catches it (checked by
    hand: with the projector left out of the plugin, its divprune and cdpruner cases fail on keep masks)."""
    samples = data.benchmark("test", 12)[6:]  # images no other test sent with this spec: none is cached
    name = spec.split("(")[0]
    differ = 0
    for sample in samples:
        prompt = LLAVA_PROMPT.format(question=sample.question)
        with recorded_keeps(name) as keeps:
            llava.generate([_request(prompt, [sample.image], spec)], GREEDY)
            llava.generate([_request(prompt, [sample.image], spec.replace(")", ", features=encoder)"))], GREEDY)
        assert len(keeps) == 2, "each request must encode its image (a cached one records no keep mask)"
        differ += not torch.equal(keeps[0].cpu(), keeps[1].cpu())
    assert differ > 0


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    # module-scoped like every engine here: an in-process engine torn down mid-module takes vLLM's global
    # parallel groups with it, and the engines still alive fail their next step
    from tokprune.testing.checkpoints import save_tiny_llava

    path = save_tiny_llava(tmp_path_factory.mktemp("llava"))
    llm = _engine(path)
    hf = (
        AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(),
        AutoProcessor.from_pretrained(path),
    )
    yield llm, hf
    del llm


def test_tiny_random_llava_reads_the_layer_vllm_would_not_build(tiny_llava):
    """vLLM builds a LLaVA tower only up to ``vision_feature_layer`` (-2); ``topk``'s default score reads the
    last layer's q/k: the plugin builds the whole tower, and kept rows and outputs equal transformers'."""
    llm, hf = tiny_llava
    prompt = LLAVA_PROMPT.format(question="what color is the square ?")
    for seed in (61, 62):
        image = _image(seed)
        with recorded_keeps("topk") as keeps:
            (out,) = llm.generate([_request(prompt, [image], "topk(keep=5)")], GREEDY)
            # topk's default positions are keep; vLLM's 1-D numbering is compact
            want_tokens, want_logprobs = _hf_run(*hf, prompt, [image], "topk(keep=5)", vision_positions="compact")
        assert torch.equal(keeps[0].cpu(), keeps[1].cpu())
        assert list(out.outputs[0].token_ids) == want_tokens
        assert_same_logprobs(first_logprobs(out), want_logprobs)


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
def test_llava_benchmark_accuracy_per_budget_equals_the_transformers_path(llava, llava_hf, keep_ratio):
    """The embedded benchmark through both engines at one budget: every answer equal, or the two leading
    first-token log-probs tied (within 1e-4) on the transformers side; accuracy equal when none tie."""
    samples = data.benchmark("test", 40)
    spec = f"topk(keep_ratio={keep_ratio})"
    prompts = [data.build_prompt(s.question) for s in samples]
    outs = llava.generate([_request(p, [s.image], spec) for p, s in zip(prompts, samples)], GREEDY)
    model, processor = llava_hf
    inputs = processor(text=prompts, images=[s.image for s in samples], return_tensors="pt", padding=True)
    with tokprune.pruned(model, spec, vision_positions="compact"), torch.no_grad():
        first = torch.log_softmax(model(**inputs).logits[:, -1].double(), -1).topk(2).values
        hf = model.generate(**inputs, max_new_tokens=GREEDY.max_tokens, do_sample=False)
    hf_answers = processor.batch_decode(hf[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    vllm_answers = [o.outputs[0].text for o in outs]
    differing = [i for i, (a, b) in enumerate(zip(hf_answers, vllm_answers)) if a.strip() != b.strip()]
    ties = [i for i in differing if float(first[i, 0] - first[i, 1]) < 1e-4]
    assert differing == ties, [(i, hf_answers[i], vllm_answers[i], first[i].tolist()) for i in differing]
    if not differing:
        hf_accuracy = sum(data.score_answer(a, s) for a, s in zip(hf_answers, samples))
        assert hf_accuracy == sum(data.score_answer(a, s) for a, s in zip(vllm_answers, samples))


# -- Qwen3-VL: DeepStack features follow the kept tokens ----------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory):
    from tokprune.testing.checkpoints import save_tiny_qwen3_vl

    return save_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"))


@pytest.fixture(scope="module")
def qwen3(qwen3_path):
    llm = _engine(qwen3_path)
    yield llm
    del llm


@pytest.fixture(scope="module")
def qwen3_hf(qwen3_path):
    processor = AutoProcessor.from_pretrained(qwen3_path)
    model = AutoModelForImageTextToText.from_pretrained(qwen3_path, dtype=torch.float32).eval()
    return model, processor


@pytest.mark.parametrize(
    ("spec", "size"),
    [("divprune(keep_ratio=0.5)", (32, 32)), ("divprune(keep=5)", (48, 32)), (None, (48, 32))],
    ids=["half", "keep5-tall", "unpruned-tall"],
)
def test_qwen3_equals_the_transformers_path(qwen3, qwen3_hf, spec, size):
    image = _image(71, *size)
    with recorded_keeps("divprune") as keeps:
        (out,) = qwen3.generate([_request(QWEN_PROMPT, [image], spec)], GREEDY)
        want_tokens, want_logprobs = _hf_run(*qwen3_hf, QWEN_PROMPT, [image], spec)
    if spec is not None:
        assert torch.equal(keeps[0].cpu(), keeps[1].cpu())
        full = size[0] * size[1] // 64
        assert len(out.prompt_token_ids) == 43 - 16 + full - (full - int(keeps[0].sum()))
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_qwen3_two_images_one_pruned_prompt(qwen3, qwen3_hf):
    images = [_image(72), _image(73, 48, 32)]
    (out,) = qwen3.generate([_request(QWEN_TWO_IMAGES, images, "divprune(keep=6)")], GREEDY)
    want_tokens, want_logprobs = _hf_run(*qwen3_hf, QWEN_TWO_IMAGES, images, "divprune(keep=6)")
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def _projected_tokens(llm) -> list[int]:
    """Install a hook on the engine's projector recording how many tokens each call maps; returns the list."""
    seen: list[int] = []

    def install(model):
        model.multi_modal_projector.register_forward_hook(
            lambda _m, args, _out: seen.append(int(args[0].shape[:-1].numel()))
        )

    llm.apply_model(install)
    return seen


def test_llava_projects_each_token_once(llava):
    """DivPrune selects on the projected tokens: the projector maps the image's 144 tokens once and the kept
    rows are taken from that projection (as its reference does, and tokprune.patch), not projected again;
    a strategy that does not read them (random) has only its kept rows projected."""
    sample = data.benchmark("test", 20)[19]  # an image no other test sends
    prompt = LLAVA_PROMPT.format(question=sample.question)
    seen = _projected_tokens(llava)
    try:
        llava.generate([_request(prompt, [sample.image], "divprune(keep=30)")], GREEDY)
        assert seen == [144], seen
        seen.clear()
        llava.generate([_request(prompt, [sample.image], "random(keep=30)")], GREEDY)
        assert seen == [30], seen
    finally:
        llava.apply_model(lambda model: model.multi_modal_projector._forward_hooks.clear())
