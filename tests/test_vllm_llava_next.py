"""tokprune's vLLM plugin on LLaVA-NeXT (AnyRes tiles, newline tokens): skipped where vLLM is not installed.

Install: the CPU recipe of docs/serving.md (CI leg ``v`` in .ci/run). One engine: the tiny random LLaVA-NeXT
saved with its tokenizer and processor (16-px tiles of 2 x 2 patches; grids 16 x 32, 32 x 16, 32 x 32).
Images of five shapes: wide and tall (1 x 2 and 2 x 1 tiles), square (2 x 2 tiles) and wide and tall ones whose
2 x 2 tiles are unpadded to the image's aspect ratio (rows or columns of the tiles' grid dropped).

Equality with ``tokprune.patch(model, spec, vision_positions="compact")`` (vLLM numbers the shorter prompt
1-D): the keep masks the registered strategy returns (one row per image: base view and tiles, newlines
excluded), the prompt length (shorter by exactly the pruned tokens; newlines stay), greedy tokens and
first-token log-probs. The suite rejects kept rows placed one slot off and newlines moved to the run's end.
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
from tokprune.integrations import vllm_plugin  # noqa: E402
from tokprune.testing.checkpoints import save_tiny_llava_next  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

PROMPT = "USER: <image>\nwhat is in the picture ? ASSISTANT:"
TWO_IMAGES = "USER: <image>\n<image>\nwhich one is larger ? ASSISTANT:"
GREEDY = vllm.SamplingParams(max_tokens=4, temperature=0.0, logprobs=5)
#: (h, w): 1 x 2 and 2 x 1 tiles, 2 x 2 tiles whole, and 2 x 2 tiles unpadded to the image's aspect ratio
#: (the 4 x 4 patch grid cut to 2 rows or 2 columns: 4 + 8 tokens, not 4 + 16)
SIZES = {"wide": (14, 30), "tall": (30, 12), "square": (32, 32), "wide-unpadded": (20, 32), "tall-unpadded": (32, 20)}
#: each shape's real tokens (base view and tiles, newlines excluded): what a budget counts
REAL = {"wide": 12, "tall": 12, "square": 20, "wide-unpadded": 12, "tall-unpadded": 12}


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8"))


def _request(prompt, images, spec=None, scope=None):
    request = {"prompt": prompt, "multi_modal_data": {"image": images if len(images) != 1 else images[0]}}
    kwargs = {k: v for k, v in (("tokprune", spec), ("tokprune_budget_scope", scope)) if v is not None}
    if kwargs:
        request["mm_processor_kwargs"] = kwargs
    return request




@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_tiny_llava_next(tmp_path_factory.mktemp("llava_next"))


@pytest.fixture(scope="module")
def llm(path):
    engine = _engine(path)
    yield engine
    del engine


@pytest.fixture(scope="module")
def engine_wide(path):
    # module-scoped like every engine here: an in-process engine torn down mid-module takes vLLM's global
    # parallel groups with it, and the engines still alive fail their next step
    engine = _engine(path, mm_processor_kwargs={"tokprune": "vispruner(keep=5)"})
    yield engine
    del engine


def _engine(path, **options):
    return vllm.LLM(
        model=str(path),
        max_model_len=512,
        max_num_seqs=8,
        limit_mm_per_prompt={"image": 2},
        dtype="float32",
        enforce_eager=True,
        seed=0,
        kv_cache_memory_bytes=256 << 20,
        gpu_memory_utilization=0.05,
        enable_prefix_caching=False,  # a mutated rerun must not reuse the unmutated run's KV cache
        **options,
    )


@pytest.fixture(scope="module")
def hf(path):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(), AutoProcessor.from_pretrained(
        path
    )


def _hf_run(model, processor, prompt, images, spec):
    """Greedy tokens, first-token top-5 log-probs and the unpruned prompt length of ``tokprune.patch`` with
    vLLM's 1-D numbering (``vision_positions="compact"``)."""
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    context = tokprune.pruned(model, spec, vision_positions="compact") if spec else contextlib.nullcontext()
    with context, torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=GREEDY.max_tokens, do_sample=False)
    top = torch.log_softmax(logits.double(), -1).topk(5)
    length = inputs["input_ids"].shape[1]
    return out[0, length:].tolist(), dict(zip(top.indices.tolist(), top.values.tolist())), length


def test_llava_next_is_registered():
    assert vllm_plugin.FAMILIES["LlavaNextForConditionalGeneration"][0] == "TokpruneLlavaNext"
    assert vllm_plugin.missing_pieces() == []


# topk and vispruner read the CLS (the base view's) and each token's own pass; divprune and cdpruner select on
# the projected tokens; cdpruner's relevance=text runs its CLS stand-in on both sides (no CLIP text tower).
# Left out: random, whose subset hashes the features' bits (by design: never the batch), so the 1e-7
# differences between vLLM's tower and transformers' draw another subset (measured on all three shapes); it
# keeps its announced count (test_requests_in_one_batch_use_their_own_specs).
EQUAL = [
    "divprune(keep_ratio=0.5)",
    "topk(keep=5)",
    "vispruner(keep=6)",
    "cdpruner(keep=6)",
    "cdpruner(keep=4, relevance=uniform)",
]


@pytest.mark.parametrize("shape", list(SIZES))
@pytest.mark.parametrize("spec", EQUAL)
def test_a_pruned_image_equals_the_transformers_path(llm, hf, spec, shape):
    image = _image(list(SIZES).index(shape) + 1, SIZES[shape])
    name = spec.split("(")[0]
    with recorded_keeps(name) as keeps:
        (out,) = llm.generate([_request(PROMPT, [image], spec)], GREEDY)
        want_tokens, want_logprobs, unpruned = _hf_run(*hf, PROMPT, [image], spec)
    vllm_keep, hf_keep = keeps[0], keeps[1]  # vLLM ran first; the HF forward and generate follow
    assert vllm_keep.shape[0] == 1 and torch.equal(vllm_keep.cpu(), hf_keep.cpu())
    real, kept = hf_keep.shape[1], int(hf_keep.sum())  # the image's tokens without newlines, and those kept
    assert real == REAL[shape] and kept < real
    assert len(out.prompt_token_ids) == unpruned - real + kept  # shorter by exactly the pruned tokens
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


@pytest.mark.parametrize("shape", list(SIZES))
def test_an_unpruned_image_equals_stock_transformers(llm, hf, shape):
    image = _image(10 + list(SIZES).index(shape), SIZES[shape])
    for spec in (None, "none"):
        (out,) = llm.generate([_request(PROMPT, [image], spec)], GREEDY)
        want_tokens, want_logprobs, unpruned = _hf_run(*hf, PROMPT, [image], None)
        assert len(out.prompt_token_ids) == unpruned
        assert list(out.outputs[0].token_ids) == want_tokens
        assert_same_logprobs(first_logprobs(out), want_logprobs)


@pytest.mark.parametrize("spec", [None, "divprune(keep=4)", "vispruner(keep=5)"])
def test_two_images_of_other_shapes_in_one_prompt_equal_the_transformers_path(llm, hf, spec):
    # the processor pads the wide image's passes to the square's: the plugin encodes each image's own
    images = [_image(20, SIZES["wide-unpadded"]), _image(21, SIZES["square"])]
    (out,) = llm.generate([_request(TWO_IMAGES, images, spec)], GREEDY)
    want_tokens, want_logprobs, unpruned = _hf_run(*hf, TWO_IMAGES, images, spec)
    if spec is not None:
        kept = int(spec.split("=")[1].rstrip(")"))
        assert len(out.prompt_token_ids) == unpruned - (12 - kept) - (20 - kept)
    assert list(out.outputs[0].token_ids) == want_tokens
    assert_same_logprobs(first_logprobs(out), want_logprobs)


def test_requests_in_one_batch_use_their_own_specs(llm):
    image = _image(30, SIZES["tall"])  # 12 real tokens and their newlines
    specs = [None, "divprune(keep=4)", "random(keep=7)", "cdpruner(keep=3, relevance=uniform)", "topk(keep=2)"]
    batch = llm.generate([_request(PROMPT, [image], s) for s in specs], GREEDY)
    full = len(batch[0].prompt_token_ids)
    assert [full - len(o.prompt_token_ids) for o in batch] == [0, 12 - 4, 12 - 7, 12 - 3, 12 - 2]
    for spec, together in zip(specs, batch):  # batch == solo; the cached image is never reused across specs
        (solo,) = llm.generate([_request(PROMPT, [image], spec)], GREEDY)
        assert list(solo.outputs[0].token_ids) == list(together.outputs[0].token_ids)
        assert len(solo.prompt_token_ids) == len(together.prompt_token_ids)


def test_an_engine_wide_spec_and_per_request_overrides(llm, engine_wide):
    image = _image(32, SIZES["tall-unpadded"])
    default, off, other = engine_wide.generate(
        [_request(PROMPT, [image]), _request(PROMPT, [image], "none"), _request(PROMPT, [image], "divprune(keep=3)")],
        GREEDY,
    )
    unpruned = len(off.prompt_token_ids)
    assert [unpruned - len(o.prompt_token_ids) for o in (default, other)] == [12 - 5, 12 - 3]
    (asked,) = llm.generate([_request(PROMPT, [image], "vispruner(keep=5)")], GREEDY)  # the same, per request
    assert list(default.outputs[0].token_ids) == list(asked.outputs[0].token_ids)
    assert_same_logprobs(first_logprobs(default), first_logprobs(asked), tol=1e-6)


def test_a_budget_above_the_tokens_keeps_every_token(llm):
    image = _image(31, SIZES["wide"])
    (everything,) = llm.generate([_request(PROMPT, [image], "divprune(keep=1000)")], GREEDY)
    (full,) = llm.generate([_request(PROMPT, [image])], GREEDY)
    assert len(everything.prompt_token_ids) == len(full.prompt_token_ids)
    assert list(everything.outputs[0].token_ids) == list(full.outputs[0].token_ids)


def _rows_one_slot_off(model, features, layout, keep, projected):
    """Wrong on purpose: every kept row takes the next row's features (the last wraps); where the step
    projected the rows already (divprune), the next kept row's."""
    if projected is not None:
        return type(model)._placed(model, features, layout, keep, projected.roll(-1, dims=0))
    return type(model)._placed(model, features.roll(-1, dims=0), layout, keep, None)


def _newlines_at_the_end(model, features, layout, keep, projected):
    """Wrong on purpose: the kept rows first, every newline after them (the count is right)."""
    out = type(model)._placed(model, features, layout, keep, projected)
    newline = (out == model.image_newline.to(out.dtype)).all(dim=-1)
    return torch.cat([out[~newline], out[newline]])


@pytest.mark.parametrize(
    ("wrong", "seed"), [(_rows_one_slot_off, 40), (_newlines_at_the_end, 41)], ids=["rows-one-off", "newlines-moved"]
)
def test_the_equality_suite_rejects_wrong_variants(llm, hf, wrong, seed):
    # an image of its own per mutant: vLLM's encoder cache serves an image's rows again to the same spec
    image = _image(seed, SIZES["wide-unpadded"])
    spec = "divprune(keep_ratio=0.5)"
    _, want_logprobs, _ = _hf_run(*hf, PROMPT, [image], spec)

    def install(model):
        model._placed = lambda *args: wrong(model, *args)

    llm.apply_model(install)
    try:
        (out,) = llm.generate([_request(PROMPT, [image], spec)], GREEDY)
    finally:
        llm.apply_model(lambda model: model.__dict__.pop("_placed", None))
    with pytest.raises(AssertionError):
        assert_same_logprobs(first_logprobs(out), want_logprobs)
    fresh = _image(seed + 100, SIZES["wide-unpadded"])  # the plugin itself passes on an image the mutant never saw
    (right,) = llm.generate([_request(PROMPT, [fresh], spec)], GREEDY)
    assert_same_logprobs(first_logprobs(right), _hf_run(*hf, PROMPT, [fresh], spec)[1])


def _signals_tile_major(model, plan, hidden, captured, rows, first):
    """Wrong on purpose: each image's signals in tile-major order (the passes one after the other), not in the
    LLM's order of its rows (the unpadded grid's rows run across the tiles side by side)."""
    order = [torch.argsort(tile * 1000 + patch) for tile, patch in rows]
    rows = [(tile[o], patch[o]) for (tile, patch), o in zip(rows, order)]
    return type(model)._signals(model, plan, hidden, captured, rows, first)


def test_the_equality_suite_rejects_signals_in_the_wrong_order(llm, hf):
    """A CLS reader scores each row with its own token's q/k: signals of another token (tile-major where the LLM
    reads the wide image's two tiles row by row) keep another set."""
    spec = "topk(keep=5)"
    differ = 0
    for seed in (60, 61, 62):
        image = _image(seed, SIZES["wide"])

        def install(model):
            model._signals = lambda *args: _signals_tile_major(model, *args)

        llm.apply_model(install)
        try:
            with recorded_keeps("topk") as keeps:
                llm.generate([_request(PROMPT, [image], spec)], GREEDY)
                _hf_run(*hf, PROMPT, [image], spec)
        finally:
            llm.apply_model(lambda model: model.__dict__.pop("_signals", None))
        differ += not torch.equal(keeps[0].cpu(), keeps[1].cpu())
    assert differ > 0


BAD = [
    ("fastv", None, ["stage=llm", "divprune"]),
    ("cls_knee", None, ["before the image is encoded", "divprune"]),
    ("divprune(keep_ratio=2)", None, ["keep_ratio", "divprune"]),
    ("divprune(keep=4)", "tile", ["'tile'", "image"]),
]


@pytest.mark.parametrize(("spec", "scope", "fragments"), BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_a_bad_spec_fails_its_request_only_and_the_engine_keeps_serving(llm, spec, scope, fragments):
    engine = llm.llm_engine
    engine.add_request("good-1", _request(PROMPT, [_image(51, SIZES["square"])], "divprune(keep=4)"), GREEDY)
    with pytest.raises(ValueError) as info:
        engine.add_request("bad", _request(PROMPT, [_image(52, SIZES["square"])], spec, scope), GREEDY)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    engine.add_request("good-2", _request(PROMPT, [_image(53, SIZES["square"])]), GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == {"good-1", "good-2"}
    assert len(finished["good-2"].prompt_token_ids) - len(finished["good-1"].prompt_token_ids) == 20 - 4


def test_checkpoints_the_plugin_cannot_prune_are_named(path):
    """What the processor refuses a pruning spec on (naming why), before it reaches the model."""
    from transformers import AutoConfig, SiglipVisionConfig

    from tokprune.integrations.vllm_families.llava_next import unsupported

    config = AutoConfig.from_pretrained(path)
    assert unsupported(config) is None
    config.vision_feature_select_strategy = "full"
    assert "'full'" in unsupported(config)
    config.vision_feature_select_strategy, config.vision_feature_layer = "default", [-2, -1]
    assert "several tower layers" in unsupported(config)
    config.vision_feature_layer, config.vision_config = -2, SiglipVisionConfig()
    assert "SiglipVisionConfig" in unsupported(config)


@pytest.mark.parametrize("tile", [16, 24], ids=["2x2-patches", "3x3-patches"])
def test_vllms_packing_gives_the_transformers_adapters_order(path, tile):
    """The plugin's rows (vLLM's own packing run on indices) are the transformers adapter's, for any image size:
    the same LLM order, the newlines in the same places (60 sizes per tile size, 23 and 42 of them unpadded)."""
    from transformers import AutoConfig, LlavaNextForConditionalGeneration
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration as VllmLlavaNext

    from tokprune.adapters.llava_next import anyres_layout, anyres_tiles
    from tokprune.integrations.vllm_families.llava_next import packed_layout, tower_passes

    config = AutoConfig.from_pretrained(path)
    config.vision_config.image_size = tile
    config.image_grid_pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [tile, 3 * tile]]
    inner = LlavaNextForConditionalGeneration(config).model
    n = (tile // config.vision_config.patch_size) ** 2
    sizes = np.random.RandomState(0).randint(4, 4 * tile, size=(60, 2)).tolist()
    for h, w in sizes:
        size = torch.tensor([[h, w]])
        assert tower_passes(config, (h, w)) == anyres_tiles(config, size)[0], (h, w)
        want = anyres_layout(inner, anyres_tiles(config, size), n, size, "default")[0]
        got = packed_layout(VllmLlavaNext._merge_image_patch_embeddings, config, (h, w))
        assert torch.equal(got, want), (h, w)
