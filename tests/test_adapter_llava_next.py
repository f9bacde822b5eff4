"""LLaVA-NeXT specifics (the shared behaviour is proven by tests/test_adapter_contract.py)."""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune import Pipeline, PruningStrategy, Stage, VisionContext, VisionPlan
from tokprune.adapters.llava_next import anyres_layout, anyres_tiles
from tokprune.errors import MissingCapabilityError
from tokprune.testing.models import VOCAB, tiny_llava_next


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava_next(seed=0)


def test_pruned_features_are_the_stock_packed_features_at_the_kept_slots(tiny):
    # Per image across base and tiles: what reaches the LLM is exactly the unpatched model's packed
    # features (base, unpadded tiles, newlines) at the kept slots, in order; every newline is kept.
    model, make_inputs = tiny
    x = make_inputs((5, 2, 8))
    with torch.no_grad():
        stock = model.model.get_image_features(x["pixel_values"], x["image_sizes"], return_dict=True).pooler_output
        with tokprune.pruned(model, "topk(keep_ratio=0.3)") as run:
            pruned = model.model.get_image_features(x["pixel_values"], x["image_sizes"], return_dict=True)
    newline = model.model.image_newline
    for i, full in enumerate(stock):
        keep = pruned.keep[i, : full.shape[0]]
        assert not pruned.keep[i, full.shape[0] :].any()  # padding of the ragged rows is never kept
        torch.testing.assert_close(pruned.pooler_output[i], full[keep], rtol=0, atol=1e-6)
        is_newline = (full == newline).all(dim=1)
        assert is_newline.any() and keep[is_newline].all()
        real = (~is_newline).sum()
        assert keep[~is_newline].sum() == torch.floor(real * 0.3 + 0.5)  # the budget is the image's own tokens
    assert run.stats is None  # encoding alone is not a prefill


def test_images_of_one_batch_bring_different_counts_and_the_tower_cost_counts_tiles(tiny):
    model, make_inputs = tiny
    x = make_inputs((5, 2, 8))
    with tokprune.pruned(model, "random(keep_ratio=0.5)", question_end=VOCAB.assistant_marker) as run, torch.no_grad():
        model(**x)
    s = run.stats
    assert len(set(s.image_tokens.tolist())) == 3 and torch.equal(s.image_tokens, (x["input_ids"] == VOCAB.image).sum(1))
    tiles = torch.tensor(anyres_tiles(model.config, x["image_sizes"]), dtype=torch.float64)
    fm = run._flops
    llm = fm.llm(s.seq_len[:, None].expand(-1, s.layer_tokens.shape[1]))
    # unpruned, the stock model projects every pass's N patches (then unpads): tests/test_flop_model.py
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert torch.allclose(s.flops_unpruned, llm + fm.vision(tiles) + fm.projector(tiles * n))


class _FixedSize(PruningStrategy):
    """A vision strategy that assumes N tokens per image (no ``ragged_vision``)."""

    name = "fixed_size_probe"
    stage = Stage.VISION

    def plan(self, ctx: VisionContext) -> VisionPlan:
        return VisionPlan(keep=torch.ones(ctx.features.shape[:2], dtype=torch.bool))


def test_fixed_size_vision_strategies_are_refused_naming_those_that_work(tiny):
    model, _ = tiny
    # the built-ins cutting per image (the installed plugins' visionzip and vtc_cls join them)
    working = r"cdpruner, cls_knee, divprune, prumerge, prumerge_plus, random, topk, (visionzip, )?vispruner"
    with pytest.raises(MissingCapabilityError, match=rf"^fixed_size_probe .*llava_next images differ.*: {working}\b"):
        tokprune.patch(model, Pipeline([_FixedSize()]))
    assert tokprune.adapters.handle_of(model) is None


#: Strategies cutting per image (ragged_vision), in settings whose cut the tiny images do not clamp.
PER_IMAGE = [
    "cls_knee(min_keep=1)",
    "cls_knee(min_keep=1, cut=iqr, score=cls_attn_mean, fallback_keep=10)",
    "prumerge(iqr_factor=0.5, k_neighbors=4)",
    "prumerge_plus(k_neighbors=40)",
    "vispruner(keep_ratio=0.3, step=3)",
    "cdpruner(keep_ratio=0.2)",
]


def _last_logits(model, inputs):
    position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**inputs, position_ids=position_ids).logits[:, -1].float()


@pytest.mark.parametrize("spec", PER_IMAGE)
def test_per_image_strategies_give_each_image_of_a_batch_its_solo_cut_and_logits(tiny, spec):
    # images of different sizes in one batch: each keeps what it keeps alone (never padding) and each
    # sample's logits are its solo logits
    model, make_inputs = tiny
    lengths = (5, 2, 8)
    batch = make_inputs(lengths)
    with tokprune.pruned(model, spec, question_end=VOCAB.assistant_marker) as run:
        logits = _last_logits(model, batch)
        kept, tokens = run.stats.visual_kept, run.stats.image_tokens
        for i, q in enumerate(lengths):
            solo = make_inputs([q], seeds=[i])
            torch.testing.assert_close(_last_logits(model, solo)[0], logits[i], rtol=0, atol=1e-4)
            assert run.stats.visual_kept[0] == kept[i]
    assert len(set(kept.tolist())) > 1 and bool((kept < tokens).all())


# -- budget_scope: what a vision budget counts on tiled images -------------------------------------


def _kept_per_pass(model, x, keep):
    """``(kept, present)`` long ``[I, P]``: kept and LLM-visible tokens of each image's tower passes
    (the base view, then the tiles), read from the model's own packed layout (newlines excluded)."""
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    tiles = anyres_tiles(model.config, x["image_sizes"])
    layout = anyres_layout(model.model, tiles, n, x["image_sizes"], "default")
    kept = torch.zeros(len(tiles), max(tiles), dtype=torch.long)
    present = torch.zeros_like(kept)
    for i, lay in enumerate(layout):
        real = lay >= 0
        passes = lay[real] // n
        present[i].index_add_(0, passes, torch.ones_like(passes))
        kept[i].index_add_(0, passes, keep[i, : lay.numel()][real].long())
    return kept, present


def test_tile_scope_cuts_every_pass_by_its_own_budget_and_image_scope_pools_them(tiny):
    model, make_inputs = tiny
    x = make_inputs((5, 2, 8))
    ratio = 0.3
    per_scope = {}
    for scope in ("image", "tile"):
        with torch.no_grad(), tokprune.pruned(model, f"topk(keep_ratio={ratio})", budget_scope=scope) as run:
            out = model.model.get_image_features(x["pixel_values"], x["image_sizes"], return_dict=True)
        assert run.budget_scope == scope
        per_scope[scope] = _kept_per_pass(model, x, out.keep)
    kept, present = per_scope["tile"]
    rounded = torch.where(present > 0, torch.floor(present * ratio + 0.5).clamp(min=1), 0).long()
    assert torch.equal(kept, rounded)  # topk's own rounding, row by row: each pass is a row
    image_kept, _ = per_scope["image"]
    image_rule = torch.floor(present.sum(dim=1) * ratio + 0.5).long()
    assert torch.equal(image_kept.sum(dim=1), image_rule)  # one budget over the image's pooled tokens
    assert not torch.equal(rounded.sum(dim=1), image_rule)  # the two meanings differ on these images
    assert not torch.equal(image_kept, kept)


def test_tile_scope_extra_tokens_come_one_set_per_pass(tiny):
    # PruMerge emits one extra token per row: under tile scope, one per tower pass of the image
    model, make_inputs = tiny
    x = make_inputs((5, 2, 8))
    tiles = torch.tensor(anyres_tiles(model.config, x["image_sizes"]))
    for scope, extras in (("image", torch.ones_like(tiles)), ("tile", tiles)):
        with torch.no_grad(), tokprune.pruned(model, "prumerge(iqr_factor=0.5)", budget_scope=scope):
            out = model.model.get_image_features(x["pixel_values"], x["image_sizes"], return_dict=True)
        counts = torch.tensor([p.shape[0] for p in out.pooler_output]) - out.keep.sum(dim=1)
        assert torch.equal(counts, extras), scope


def test_tile_scope_batch_equals_solo_and_cache_equals_recompute():
    from tokprune.adapters.llava_next import LlavaNextAdapter
    from tokprune.testing.adapters import cache_equivalence, check_batch_solo

    check_batch_solo(LlavaNextAdapter, budget_scope="tile")
    for spec in ("prumerge(iqr_factor=0.5, k_neighbors=4)+fastv(layer=2)", "vispruner(keep_ratio=0.3, step=3)"):
        assert cache_equivalence(LlavaNextAdapter, spec, budget_scope="tile") is not None, spec


@pytest.mark.parametrize("spec", PER_IMAGE)
def test_per_image_strategies_give_each_image_its_solo_logits_under_tile_scope(tiny, spec):
    model, make_inputs = tiny
    lengths = (5, 2, 8)
    batch = make_inputs(lengths)
    with tokprune.pruned(model, spec, question_end=VOCAB.assistant_marker, budget_scope="tile") as run:
        logits = _last_logits(model, batch)
        kept = run.stats.visual_kept
        for i, q in enumerate(lengths):
            solo = make_inputs([q], seeds=[i])
            torch.testing.assert_close(_last_logits(model, solo)[0], logits[i], rtol=0, atol=1e-4)
            assert run.stats.visual_kept[0] == kept[i]


def test_budget_scope_is_refused_where_images_have_no_tiles_and_on_bad_values(tiny):
    from tokprune.errors import StrategyParamError
    from tokprune.testing.models import tiny_llava, tiny_qwen2_5_vl

    llava, _ = tiny_llava()
    qwen = tiny_qwen2_5_vl()[0]
    for other, name in ((llava, "llava"), (qwen, "qwen2_5_vl")):
        with pytest.raises(
            StrategyParamError, match=rf"budget_scope='tile' is not available on {name}: .*valid here: image"
        ):
            tokprune.patch(other, "random(keep_ratio=0.5)", budget_scope="tile")
        assert tokprune.adapters.handle_of(other) is None
    model, _ = tiny
    with pytest.raises(StrategyParamError, match=r"budget_scope must be one of: image, tile, frame; got 'crop'"):
        tokprune.patch(model, "topk(keep_ratio=0.5)", budget_scope="crop")
    assert tokprune.adapters.handle_of(model) is None
