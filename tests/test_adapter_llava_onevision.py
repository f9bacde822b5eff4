"""LLaVA-OneVision specifics (the shared behaviour is proven by tests/test_adapter_contract.py): the LLM's rows
after the model's own packing and anyres_max shrinking, base views only for multi-image prompts, the refusals,
the FLOP model against FlopCounterMode."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tokprune
from tokprune import Pipeline, PruningStrategy, Stage, VisionContext, VisionPlan, strategies
from tokprune import hf_compat as hf
from tokprune.adapters.llava_onevision import (
    LlavaOnevisionAdapter,
    image_newlines,
    image_tokens,
    tower_passes,
)
from tokprune.errors import InputError, MissingCapabilityError, StrategyParamError
from tokprune.testing.models import VOCAB
from tokprune.testing.video import onevision_video_inputs

pytestmark = pytest.mark.skipif(
    hf.older_than(LlavaOnevisionAdapter.min_transformers),
    reason=f"llava_onevision is tested from transformers {LlavaOnevisionAdapter.min_transformers}",
)


@pytest.fixture(scope="module")
def case():
    return LlavaOnevisionAdapter.tiny()


def _stock_rows(model, x, **options):
    with torch.no_grad():
        return model.model.get_image_features(x["pixel_values"], x["image_sizes"], return_dict=True, **options)


def test_tiny_images_differ_in_tiles_and_the_2x2_one_is_shrunk_by_anyres_max(case):
    x = case.make_inputs((5, 3), images=2)
    passes = tower_passes(case.model.config, x["image_sizes"], None)
    tokens = image_tokens(case.model.model, x["image_sizes"], None, case.model.config.vision_aspect_ratio)
    assert len(set(passes)) > 1 and len(set(tokens)) > 1
    shrunk = [i for i, size in enumerate(x["image_sizes"].tolist()) if size == [32, 32]]
    # 2x2 tiles: an 8x8 grid over anyres_max_2's 2 tiles' tokens, shrunk to 5x5 (+5 newlines) after the base view
    assert shrunk and all(tokens[i] == 16 + 25 + 5 for i in shrunk)
    assert [r.shape[0] for r in _stock_rows(case.model, x).pooler_output] == tokens


def test_kept_rows_are_the_stock_rows_at_the_kept_slots_and_newlines_stay(case):
    # Per image, shrunk or not: what the LLM receives is the unpatched model's packed rows at the kept slots, in
    # order; every newline is kept; the budget counts the image's own LLM tokens (newlines excluded).
    model, x = case.model, case.make_inputs((5, 2, 8), images=2)
    stock = _stock_rows(model, x).pooler_output
    with tokprune.pruned(model, "random(keep_ratio=0.3)"):
        pruned = _stock_rows(model, x)
    newline = model.model.image_newline
    for i, full in enumerate(stock):
        keep = pruned.keep[i, : full.shape[0]]
        assert not pruned.keep[i, full.shape[0] :].any()
        torch.testing.assert_close(pruned.pooler_output[i], full[keep], rtol=0, atol=0)
        is_newline = (full == newline).all(dim=1)
        assert is_newline.any() and keep[is_newline].all()
        assert keep[~is_newline].sum() == torch.floor((~is_newline).sum() * 0.3 + 0.5)


class _MergeProbe(PruningStrategy):
    """Keeps the first half of each row with merged features (the row's mean), plus one extra token per row."""

    name = "merge_probe"
    stage = Stage.VISION
    ragged_vision = True

    def plan(self, ctx: VisionContext) -> VisionPlan:
        n = ctx.features.shape[1]
        lengths = ctx.lengths if ctx.lengths is not None else torch.full((ctx.features.shape[0],), n)
        j = torch.arange(n)[None, :]
        keep = j < (lengths[:, None] + 1) // 2
        valid = (j < lengths[:, None]).unsqueeze(-1)
        mean = (ctx.features * valid).sum(dim=1) / lengths[:, None]
        return VisionPlan(keep=keep, features=ctx.features + mean[:, None], extra=mean[:, None])


def test_merged_features_and_extra_tokens_are_projected_from_the_resampled_features(case):
    model, x = case.model, case.make_inputs((5,), images=2)
    stock = _stock_rows(model, x).pooler_output
    with tokprune.pruned(model, Pipeline([_MergeProbe()])):
        pruned = _stock_rows(model, x)
    newline = model.model.image_newline
    proj = model.model.multi_modal_projector
    for i, full in enumerate(stock):
        rows = pruned.pooler_output[i]
        keep = pruned.keep[i, : full.shape[0]]
        is_newline = (full == newline).all(dim=1)
        kept_newline = is_newline[keep]
        torch.testing.assert_close(rows[: keep.sum()][kept_newline], full[keep & is_newline])  # newlines as stock
        merged = rows[: keep.sum()][~kept_newline]
        assert merged.shape[0] == (int((~is_newline).sum()) + 1) // 2 and not torch.allclose(
            merged, full[keep][~kept_newline]
        )
        assert rows.shape[0] == keep.sum() + 1  # one extra token, projected (width D)
    assert proj is model.model.multi_modal_projector


class _ProjectedProbe(PruningStrategy):
    """Keeps everything and records ``ctx.projected()``."""

    name = "projected_probe"
    stage = Stage.VISION
    ragged_vision = True
    seen: list = []

    def plan(self, ctx: VisionContext) -> VisionPlan:
        self.seen.append((ctx.projected(), ctx.lengths))
        return VisionPlan(keep=torch.ones(ctx.features.shape[:2], dtype=torch.bool))


def test_the_projected_tokens_a_strategy_reads_are_the_llm_rows_even_on_a_shrunk_grid(case):
    # DivPrune and CDPruner measure the tokens the LLM receives: the stock rows, projected before the resampling
    model, x = case.model, case.make_inputs((5,), images=2)
    stock = _stock_rows(model, x).pooler_output
    probe = _ProjectedProbe()
    with tokprune.pruned(model, Pipeline([probe])):
        _stock_rows(model, x)
    ((projected, lengths),) = probe.seen
    for i, full in enumerate(stock):
        rows = full[~(full == model.model.image_newline).all(dim=1)]
        torch.testing.assert_close(projected[i, : lengths[i]], rows, rtol=0, atol=0)


def test_an_image_with_fewer_tokens_than_the_budget_is_kept_whole(case):
    # 41 tokens in the shrunk 2x2 image, 48 in the others: keep=45 keeps it whole and cuts the others
    model, x = case.model, case.make_inputs((5,), seeds=[1], images=2)
    stock = _stock_rows(model, x).pooler_output
    with tokprune.pruned(model, "divprune(keep=45)"):
        pruned = _stock_rows(model, x)
    own = [int((~(s == model.model.image_newline).all(dim=1)).sum()) for s in stock]
    assert sorted(own) == [41, 48]
    for i, (s, n) in enumerate(zip(stock, own)):
        kept = int(pruned.keep[i].sum()) - (s.shape[0] - n)  # newlines are always kept
        assert kept == min(n, 45)
        if n < 45:
            torch.testing.assert_close(pruned.pooler_output[i], s, rtol=0, atol=0)


def _multi_image(case, lengths, seeds=None):
    x = case.make_inputs(lengths, seeds=seeds, images=2)
    sizes = x["image_sizes"]
    n = torch.full((len(lengths),), 2)
    tokens = image_tokens(case.model.model, sizes, n, case.model.config.vision_aspect_ratio)
    assert tokens == [17] * len(tokens)  # base view + one newline each
    rows = []
    for b in range(len(lengths)):
        ids = x["input_ids"][b][x["attention_mask"][b].bool()].tolist()
        first = ids.index(VOCAB.image)
        end = len(ids) - ids[::-1].index(VOCAB.image)
        words = [t for t in ids[first:end] if t != VOCAB.image]  # the separator between the two images
        rows.append(ids[:first] + [VOCAB.image] * 17 + words + [VOCAB.image] * 17 + ids[end:])
    out = tokprune.adapters._tiny.left_padded(rows)
    return {**out, "pixel_values": x["pixel_values"], "image_sizes": sizes, "batch_num_images": n}


def test_several_images_per_prompt_bring_their_base_view_only_keep_all_and_batch_equal_solo(case):
    model = case.model
    x = _multi_image(case, (5, 3))
    with torch.no_grad():
        stock = model(**x).logits[:, -1]
        tokens = model.generate(**x, max_new_tokens=4)
        with tokprune.pruned(model, "random(keep_ratio=1.0)", question_end=case.question_end):
            torch.testing.assert_close(model(**x).logits[:, -1], stock, rtol=0, atol=0)
            assert torch.equal(model.generate(**x, max_new_tokens=4), tokens)
        with tokprune.pruned(model, "divprune(keep_ratio=0.4)", question_end=case.question_end) as run:
            batch = model(**x).logits[:, -1]
            assert run.stats.image_tokens.tolist() == [17] * 4
            for b, q in enumerate((5, 3)):
                solo = _multi_image(case, (q,), seeds=[b])
                torch.testing.assert_close(model(**solo).logits[0, -1], batch[b], rtol=0, atol=1e-4)
            cached = model.generate(**x, max_new_tokens=4)
            assert torch.equal(cached, model.generate(**x, max_new_tokens=4, use_cache=False))


def test_num_return_sequences_gives_each_prompt_its_own_images(case):
    # two images per prompt, repeated per returned sequence: a prompt never gets another prompt's images
    model, x = case.model, case.make_inputs((5, 3), images=2)
    with tokprune.pruned(model, "divprune(keep_ratio=0.4)", question_end=case.question_end), torch.no_grad():
        both = model.generate(**x, do_sample=True, top_k=1, num_return_sequences=2, max_new_tokens=4)  # greedy
        for b, q in enumerate((5, 3)):
            solo = model.generate(**case.make_inputs((q,), seeds=[b], images=2), max_new_tokens=4)
            width = solo.shape[1]
            for copy in (0, 1):
                assert torch.equal(both[2 * b + copy, -width:], solo[0])


# -- refusals ---------------------------------------------------------------------------------------------


def test_cls_reading_strategies_are_refused_naming_those_that_work(case):
    with pytest.raises(
        MissingCapabilityError,
        match=r"^topk\(keep_ratio=0.5\) reads the CLS token's signals .*"
        r"llava_onevision vision tower has no CLS token; vision strategies that read no CLS signal: "
        r"divprune, evs, random, vidcom2",
    ):
        tokprune.patch(case.model, "topk(keep_ratio=0.5)")
    assert tokprune.adapters.handle_of(case.model) is None
    tokprune.patch(case.model, "fastv(layer=2)", question_end=case.question_end).remove()  # the LLM stage runs


class _FixedSize(PruningStrategy):
    """A vision strategy that assumes N tokens per image (no ``ragged_vision``)."""

    name = "fixed_size_probe"
    stage = Stage.VISION

    def plan(self, ctx: VisionContext) -> VisionPlan:
        return VisionPlan(keep=torch.ones(ctx.features.shape[:2], dtype=torch.bool))


def test_fixed_size_strategies_and_tiles_are_refused(case):
    with pytest.raises(MissingCapabilityError, match=r"^fixed_size_probe .*llava_onevision images differ"):
        tokprune.patch(case.model, Pipeline([_FixedSize()]))
    with pytest.raises(StrategyParamError, match=r"budget_scope='tile' is not available on llava_onevision"):
        tokprune.patch(case.model, "random(keep_ratio=0.5)", budget_scope="tile")
    assert tokprune.adapters.handle_of(case.model) is None


@pytest.mark.parametrize(
    ("setting", "value"), [("vision_feature_layer", [-2, -1]), ("vision_feature_select_strategy", "default")]
)
def test_layouts_a_vision_step_cannot_run_are_refused_at_patch(setting, value):
    model = LlavaOnevisionAdapter.tiny().model
    setattr(model.config, setting, value)
    with pytest.raises(
        MissingCapabilityError, match=rf"{re.escape(f'{setting}={value!r}')}.*supported: an int layer with 'full'"
    ):
        tokprune.patch(model, "random(keep_ratio=0.5)")
    assert tokprune.adapters.handle_of(model) is None
    tokprune.patch(model, "fastv(layer=2)", question_end=VOCAB.assistant_marker).remove()


def test_call_options_that_change_the_checked_layout_and_missing_image_sizes_are_refused(case):
    x = case.make_inputs((5,))
    with tokprune.pruned(case.model, "random(keep_ratio=0.5)", question_end=case.question_end), torch.no_grad():
        with pytest.raises(InputError, match=r"vision_feature_layer=-2 differs from this model's -1"):
            case.model(**x, vision_feature_layer=-2)
        with pytest.raises(
            InputError, match=r"vision_aspect_ratio='anyres_max_9' differs from this model's 'anyres_max_2'"
        ):
            case.model(**x, vision_aspect_ratio="anyres_max_9")
        with pytest.raises(InputError, match=r"needs image_sizes with pixel_values"):
            case.model(**{k: v for k, v in x.items() if k != "image_sizes"})


def test_a_clip_tower_is_not_matched():
    model = LlavaOnevisionAdapter.tiny().model
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model.model.vision_tower = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        )
    )
    assert "expected a SiglipVisionModel vision tower" in LlavaOnevisionAdapter.mismatch(model)


# -- the FLOP model against FlopCounterMode ------------------------------------------------------------------


def _macs(counter: FlopCounterMode, prefix: str) -> int:
    """Multiply-accumulates of the modules under ``prefix`` (each op at its outermost module; the patch
    embedding's convolution left out, as the FLOP model leaves it)."""
    counts = counter.get_flop_counts()
    total = 0
    for name, ops in counts.items():
        if name == prefix or name.startswith(prefix + "."):
            if any(other != name and name.startswith(other + ".") and other.startswith(prefix) for other in counts):
                continue
            total += sum(v for op, v in ops.items() if "convolution" not in str(op))
    return total // 2


def _counted(counter: FlopCounterMode, model) -> int:
    root = f"{type(model).__name__}.model"
    layers = sum(
        _macs(counter, f"{root}.language_model.layers.{i}") for i in range(len(model.model.language_model.layers))
    )
    return layers + _macs(counter, f"{root}.vision_tower") + _macs(counter, f"{root}.multi_modal_projector")


@pytest.mark.parametrize(
    "spec", ["random(keep_ratio=0.5)", "divprune(keep_ratio=0.3)+fastv(layer=2, keep=4)", _MergeProbe()]
)
def test_prefill_flops_are_the_brute_force_count(spec):
    # two images per sample (one shrunk by anyres_max): the tower over every pass, the projector over every tower
    # token (and the merged and extra tokens it maps again), the GQA decoder layers at the counts they ran
    case = LlavaOnevisionAdapter.tiny(attn_implementation="eager")
    model, x = case.model, case.make_inputs((5,), images=2)
    spec = Pipeline([spec]) if isinstance(spec, PruningStrategy) else spec
    with FlopCounterMode(display=False) as counter, tokprune.pruned(model, spec) as run, torch.no_grad():
        model(**x, logits_to_keep=1)
    assert run.stats.visual_kept[0] < run.stats.visual_unpruned[0]
    assert float(run.stats.flops_pruned[0]) == _counted(counter, model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # the stock model, unpruned
        model(**x, logits_to_keep=1)
    assert float(run.stats.flops_unpruned[0]) == _counted(counter, model)


# -- video -----------------------------------------------------------------------------------------------------

MARKER = VOCAB.assistant_marker
KINDS, QUESTIONS = ["v", "iv", "vi", "v"], [3, 6, 2, 4]  # ragged: images and videos mixed, different padding
CLS_FREE = {"cdpruner": "relevance=uniform"}


def _video_batch(model, picks):
    return onevision_video_inputs(model, [KINDS[i] for i in picks], [QUESTIONS[i] for i in picks], seeds=picks)


def video_specs(model):
    """Every registered vision strategy the family runs (CLS-free where it has a CLS-free value), pruning half."""
    out = []
    for name in strategies.available(stage="vision"):
        args = ", ".join(a for a in (CLS_FREE.get(name, ""), "keep_ratio=0.5") if a)
        spec = f"{name}({args})" if "keep_ratio" in {p.name for p in strategies.describe(name).params} else name
        try:
            tokprune.patch(model, spec, question_end=MARKER).remove()
        except MissingCapabilityError:
            continue
        out.append(spec)
    return out


def check_video(model, spec, adapter=None, **options):
    """keep-all == stock (forward, generate); the video rows reaching the LLM == the stock rows at the kept slots,
    the newline kept; batch == solo (logits, kept sets); cache == recompute. AssertionError on the first failure."""
    batch = _video_batch(model, [0, 1, 2, 3])
    with torch.no_grad():
        stock, stock_tokens = model(**batch).logits[:, -1], model.generate(**batch, max_new_tokens=3)
        stock_rows = model.model.get_video_features(batch["pixel_values_videos"], return_dict=True).pooler_output
        name = spec.split("(")[0]
        keep_all = f"{name}({', '.join(a for a in (CLS_FREE.get(name, ''), 'keep=100000') if a)})"
        with tokprune.pruned(model, keep_all, question_end=MARKER, adapter=adapter, **options):
            torch.testing.assert_close(model(**batch).logits[:, -1], stock, rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(**batch, max_new_tokens=3), stock_tokens), "keep-all generate"
        pipeline, scored = strategies.get(spec), []
        plan = pipeline.vision.plan

        def recording(ctx):  # what the strategy scored and kept, as the LLM's rows
            out = plan(ctx)
            scored.append(ctx.projected()[out.keep])
            return out

        pipeline.vision.plan = recording
        with tokprune.pruned(model, pipeline, question_end=MARKER, adapter=adapter, **options) as run:
            out = model.model.get_video_features(batch["pixel_values_videos"], return_dict=True)
            newline = model.model.image_newline
            emitted = []
            for v, full in enumerate(stock_rows):
                keep = out.keep[v, : full.shape[0]]
                assert keep[-1] and not keep[:-1].all(), "the newline kept, the frames pruned"
                torch.testing.assert_close(out.pooler_output[v][: keep.sum()], full[keep], rtol=0, atol=1e-6)
                assert (full[-1] == newline).all()
                emitted.append(out.pooler_output[v][: keep.sum() - 1])
            torch.testing.assert_close(torch.cat(emitted), scored[0], rtol=0, atol=1e-6)  # survivors == the scored
            logits = model(**batch).logits[:, -1]
            kept, sample, tokens = run.stats.kept.vision, run.stats.image_sample, run.stats.image_tokens
            for i in range(4 if name != "random" else 0):  # random hashes the exact bits of a row
                solo = model(**_video_batch(model, [i])).logits[0, -1]
                torch.testing.assert_close(solo, logits[i], rtol=1e-4, atol=1e-4)
                for solo_r, r in enumerate((sample == i).nonzero().flatten().tolist()):
                    n = int(tokens[r])
                    assert torch.equal(run.stats.kept.vision[solo_r, :n], kept[r, :n]), f"sample {i}: kept set"
            cached = model.generate(**batch, max_new_tokens=4)
            assert torch.equal(cached, model.generate(**batch, max_new_tokens=4, use_cache=False)), "cache"


@pytest.fixture(scope="module")
def video_model():
    return LlavaOnevisionAdapter.tiny().model


def test_every_strategy_that_takes_video_passes_the_video_checks_per_video_and_per_frame(video_model):
    specs = video_specs(video_model)
    assert {"evs", "vidcom2", "divprune", "random", "cdpruner"} <= {s.split("(")[0] for s in specs}
    for spec in specs:
        check_video(video_model, spec)
        if not strategies.describe(spec.split("(")[0]).cls.temporal:
            check_video(video_model, spec, budget_scope="frame")
    check_video(video_model, "evs(keep_ratio=0.5)+fastv(layer=2, keep_ratio=0.5)")


class WrongFrameRows(LlavaOnevisionAdapter):
    """Gives each kept token of a video the row of the token one frame earlier."""

    def place_plan(self, images, plan):
        out = super().place_plan(images, plan)
        if images.video:
            out.kept = torch.roll(out.kept, shifts=4, dims=0)
        return out


class FrameMaskOffByOne(LlavaOnevisionAdapter):
    """Scatters each frame's plan onto the next frame (which tokens survive != what was scored)."""

    def plan_images(self, step, images, ctx):
        plan = super().plan_images(step, images, ctx)
        if images.video:
            frames = plan.keep.reshape(plan.keep.shape[0], -1, 4)
            plan = VisionPlan(keep=torch.roll(frames, shifts=1, dims=1).flatten(1), diagnostics=plan.diagnostics)
        return plan


@pytest.mark.parametrize("mutant", [WrongFrameRows, FrameMaskOffByOne])
def test_the_video_checks_reject_the_mutants(video_model, mutant):
    with pytest.raises(AssertionError):
        check_video(video_model, "divprune(keep_ratio=0.5)", adapter=mutant, budget_scope="frame")


def test_per_frame_budgets_keep_each_frames_share_and_temporal_steps_leave_images_whole(video_model):
    batch = _video_batch(video_model, [1])  # an image, then a video of 3 frames of 4 tokens
    for spec, options, video_kept in (
        ("divprune(keep=1)", {"budget_scope": "frame"}, [1, 1, 1]),
        ("evs(keep_ratio=0.25)", {}, None),
    ):
        with tokprune.pruned(video_model, spec, question_end=MARKER, **options) as run, torch.no_grad():
            out = video_model.model.get_video_features(batch["pixel_values_videos"], return_dict=True)
            video_model(**batch)
        assert run.stats.image_frames.tolist() == [1, 3] and run.stats.image_video.tolist() == [False, True]
        newlines = image_newlines(video_model.model, batch["image_sizes"], None, "anyres_max_2")[0].sum()
        # per frame: the kept tokens of each frame (newlines, never pruned, are on no frame)
        assert (run.stats.frame_kept.sum(dim=1) + torch.stack([newlines, torch.tensor(1)])).tolist() == (
            run.stats.image_kept.tolist()
        )
        if video_kept is not None:
            assert out.keep[0, :12].reshape(3, 4).sum(dim=1).tolist() == video_kept
            assert run.stats.frame_kept[1].tolist() == video_kept
        else:  # the image whole, the video cut across its frames
            assert run.stats.image_kept[0] == run.stats.image_tokens[0]
            assert run.stats.image_kept[1] < run.stats.image_tokens[1]
    with pytest.raises(StrategyParamError, match=r"evs.*budget_scope='frame'.*use budget_scope='image'"):
        tokprune.patch(video_model, "evs", budget_scope="frame")


def test_num_return_sequences_repeats_each_prompts_images_and_videos(video_model):
    batch = _video_batch(video_model, [1, 0])  # an image and a video, then a video
    twice = _video_batch(video_model, [1, 1, 0, 0])
    with torch.no_grad():
        for spec in ("random(keep=100000)", "evs(keep_ratio=0.5)"):
            with tokprune.pruned(video_model, spec, question_end=MARKER):
                torch.manual_seed(0)
                got = video_model.generate(**batch, max_new_tokens=4, do_sample=True, num_return_sequences=2)
                torch.manual_seed(0)
                expected = video_model.generate(**twice, max_new_tokens=4, do_sample=True)
            assert torch.equal(got[:, -4:], expected[:, -4:]), spec


def test_video_flops_count_the_tower_and_projector_over_every_frame():
    case = LlavaOnevisionAdapter.tiny(attn_implementation="eager")
    model, x = case.model, onevision_video_inputs(case.model, ["iv"], [4])
    with FlopCounterMode(display=False) as counter, tokprune.pruned(model, "evs(keep_ratio=0.25)") as run:
        with torch.no_grad():
            model(**x, logits_to_keep=1)
    assert run.stats.visual_kept[0] < run.stats.visual_unpruned[0]
    assert float(run.stats.flops_pruned[0]) == _counted(counter, model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**x, logits_to_keep=1)
    assert float(run.stats.flops_unpruned[0]) == _counted(counter, model)


def test_kept_maps_place_base_views_on_their_raster_and_tiles_on_the_unpadded_or_shrunk_grid(case):
    model, x = case.model, case.make_inputs((5,), seeds=[1], images=2)  # a 2x1-tile image, then the shrunk 2x2 one
    with tokprune.pruned(model, "random(keep_ratio=0.5)", question_end=case.question_end) as run, torch.no_grad():
        model(**x)
    cells = run.stats.kept.cells  # [I, P, 4]: tile, frame, row, col
    for i, (rows, cols) in enumerate(((8, 4), (5, 5))):
        n = int(run.stats.image_tokens[i])
        tile, frame, row, col = cells[i, :n].unbind(-1)
        base, grid, newline = tile == 0, tile == 1, tile == -1
        assert base.sum() == 16 and (row[base] * 4 + col[base]).tolist() == list(range(16))
        assert grid.sum() == rows * cols and newline.sum() == rows and (frame[~newline] == 0).all()
        assert sorted(zip(row[grid].tolist(), col[grid].tolist())) == [(r, c) for r in range(rows) for c in range(cols)]
