"""tokprune-vtc-cls: behaviour against the reference's own computation, plus tokprune's shipped suites."""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune import strategies
from tokprune.errors import StrategyParamError
from tokprune.testing import models
from tokprune.testing.contract import CHECKS, contract_cases
from tokprune.testing.equivalence import check_batch_equivalence, check_cache_equivalence
from tokprune.testing.models import tiny_llava

# Installed, not imported from the source tree: the tests check what `pip install` delivers.
plugin = pytest.importorskip("tokprune_vtc_cls", reason="pip install ./plugins/tokprune-vtc-cls")
VtcCls = plugin.VtcCls

LAYERS, HEADS, WIDTH, GRID = 6, 4, 32, 4  # a tiny CLIP: 16 patches + CLS


def tiny_clip(seed: int = 0):
    return models.tiny_clip(seed, layers=LAYERS, heads=HEADS, width=WIDTH, grid=GRID)


run_clip = models.run_clip
context_for = models.clip_context


def reference_keep(attentions: tuple[torch.Tensor, ...], start_layer: int, keep: int) -> list[list[int]]:
    """The reference, one sample at a time: sum over ``attentions[start:-1]`` of the head-mean CLS row."""
    kept = []
    for b in range(attentions[0].shape[0]):
        rows = [attn[b].mean(dim=0)[0, 1:] for attn in attentions[start_layer:-1]]
        score = torch.stack(rows).sum(dim=0).tolist()
        ranked = sorted(range(len(score)), key=lambda i: (-score[i], i))
        kept.append(sorted(ranked[:keep]))  # raster order
    return kept


@pytest.mark.parametrize(("start_layer", "keep"), [(-2, 1), (-4, 5), (-6, 7), (-3, 16)])
def test_selection_equals_reference_sum_of_head_mean_cls_rows(start_layer, keep):
    model = tiny_clip()
    out, captured = run_clip(model, torch.randn(3, 3, 4 * GRID, 4 * GRID))
    strategy = strategies.get(f"vtc_cls(keep={keep}, start_layer={start_layer})").vision
    plan = strategy(context_for(strategy, out, captured))
    got = [row.nonzero().flatten().tolist() for row in plan.keep]
    assert got == reference_keep(out.attentions, start_layer, keep)
    expected_scores = sum(a.mean(dim=1)[:, 0, 1:] for a in out.attentions[start_layer:-1])
    torch.testing.assert_close(plan.diagnostics["scores"], expected_scores, rtol=1e-5, atol=1e-6)


def test_requires_exactly_the_summed_layers():
    strategy = VtcCls(start_layer=-5)
    assert {s.layer for s in strategy.requires()} == {-5, -4, -3, -2}
    assert {s.kind for s in strategy.requires()} == {"qk"}


def test_keep_above_patch_count_keeps_all_and_says_so():
    model = tiny_clip()
    out, captured = run_clip(model, torch.randn(2, 3, 4 * GRID, 4 * GRID))
    strategy = VtcCls(keep=500, start_layer=-3)
    plan = strategy(context_for(strategy, out, captured))
    assert plan.keep.all()
    assert plan.diagnostics["keep_clamped"].all()


@pytest.mark.parametrize("bad", ["vtc_cls(start_layer=3)", "vtc_cls(start_layer=-1)", "vtc_cls(keep=0)"])
def test_bad_params_are_rejected(bad):
    with pytest.raises(StrategyParamError):
        strategies.get(bad)


def test_registered_through_the_entry_point():
    info = strategies.describe("vtc_cls")
    assert info.cls is VtcCls
    assert info.source.distribution == "tokprune-vtc-cls"


# -- tokprune's shipped contract suite, on the defaults and on edge settings -----------------------

CONTRACT_SPECS = ["vtc_cls", "vtc_cls(keep=1, start_layer=-2)", "vtc_cls(keep=500, start_layer=-12)"]


@pytest.mark.parametrize(
    ("strategy", "check"),
    [c[1:] for c in contract_cases(CONTRACT_SPECS)],
    ids=[c[0] for c in contract_cases(CONTRACT_SPECS)],
)
def test_contract(strategy, check):
    CHECKS[check](strategy)


# -- the adapter's equivalence checks, inside a patched tiny LLaVA --------------------------------

EQUIVALENCE_SPECS = [
    "vtc_cls(keep=6, start_layer=-3)",
    "vtc_cls(keep=3, start_layer=-2)+fastv(layer=2, keep_ratio=0.5)",
]


@pytest.mark.parametrize("spec", EQUIVALENCE_SPECS)
def test_cache_equivalence(spec):
    check_cache_equivalence(spec)


@pytest.mark.parametrize("spec", EQUIVALENCE_SPECS)
def test_batch_equivalence(spec):
    check_batch_equivalence(spec)


def test_patched_model_feeds_keep_visual_tokens_to_the_llm():
    model, make_inputs = tiny_llava()
    with tokprune.pruned(model, "vtc_cls(keep=5, start_layer=-3)") as run, torch.no_grad():
        model(**make_inputs([4, 2]))
    assert run.stats.visual_kept.tolist() == [5, 5]


def test_a_start_layer_deeper_than_the_tower_fails_at_patch_time():
    model, _ = tiny_llava(vision_layers=3)  # the default start_layer=-8 does not exist in 3 layers
    with pytest.raises(StrategyParamError, match="out of range for 3 layers"):
        tokprune.patch(model, "vtc_cls")


# -- images of different sizes (ragged_vision) -----------------------------------------------------


def test_each_image_of_a_ragged_batch_keeps_what_it_keeps_alone_and_a_length_blind_copy_fails():
    from dataclasses import replace

    from tokprune.testing.contract import ContractFailure

    class Blind(VtcCls):  # reads padding as tokens of the image
        name = "blind_vtc_cls"

        def plan(self, ctx):
            return super().plan(replace(ctx, lengths=None))

    strategy = VtcCls(keep=5, start_layer=-3)
    assert strategy.ragged_vision
    CHECKS["ragged"](strategy)
    with pytest.raises(ContractFailure, match="ragged"):
        CHECKS["ragged"](Blind(strategy.params))


def test_on_llava_next_each_image_keeps_its_own_top_keep_and_solo_logits():
    model, make_inputs = models.tiny_llava_next(seed=0)
    lengths = (5, 2, 8)
    batch = make_inputs(lengths)

    def last_logits(inputs):
        position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return model(**inputs, position_ids=position_ids).logits[:, -1].float()

    with tokprune.pruned(model, "vtc_cls(keep=6, start_layer=-3)", question_end=models.VOCAB.assistant_marker) as run:
        logits = last_logits(batch)
        kept = run.stats.visual_kept  # 6 patches + the image's row newlines (always kept)
        for i, q in enumerate(lengths):
            solo = make_inputs([q], seeds=[i])
            torch.testing.assert_close(last_logits(solo)[0], logits[i], rtol=0, atol=1e-4)
            assert run.stats.visual_kept[0] == kept[i]
    assert bool((kept < batch["input_ids"].eq(models.VOCAB.image).sum(1)).all())  # pruned
