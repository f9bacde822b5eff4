"""The InternVL family (docs/adapters.md, "InternVL"): the model's own features reproduced, tiled images
budgeted per image (their passes read from the placeholder runs) or per pass (``budget_scope="tile"``) with
the contract and its mutants on them, the CLS signals per token against the tower's own attention, the
checkpoint without a CLS, bad layouts refused at ``patch()``, ``num_return_sequences``, and the FLOP model
against torch's FlopCounterMode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from _flops import macs as _macs
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tokprune
from tokprune import hf_compat as hf
from tokprune.adapters.internvl import InternVLAdapter, tiny_internvl
from tokprune.errors import InputError, MissingCapabilityError, UnsupportedModelError
from tokprune.pipeline import Pipeline
from tokprune.strategy import PruningStrategy, Signal, Stage, VisionPlan
from tokprune.testing.adapters import CHECKS, TinyCase, cache_equivalence
from tokprune.testing.models import VOCAB
from tokprune.testing.mutants import MUTANTS, applies, mutant
from tokprune.testing.tokens import check_tokens

pytestmark = pytest.mark.skipif(
    hf.older_than(InternVLAdapter.min_transformers),
    reason=f"InternVL is tested from transformers {InternVLAdapter.min_transformers}",
)


@pytest.fixture(scope="module")
def case():
    return InternVLAdapter.tiny()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_our_features_are_the_models_own(case):
    inputs = case.make_inputs([5, 3], images=2)
    stock = case.model.model.get_image_features(inputs["pixel_values"]).pooler_output  # [T, N, D]
    with tokprune.pruned(case.model, "divprune(keep_ratio=1.0)", question_end=case.question_end) as run:
        ours = case.model.model.get_image_features(inputs["pixel_values"]).pooler_output
        assert torch.allclose(torch.stack(list(ours)), stock, atol=1e-6)  # one row per pass, in order, all kept
        case.model(**inputs)
    assert run.stats.images.tolist() == [2, 2] and run.stats.image_tokens.tolist() == [16] * 4


def test_an_image_with_fewer_tokens_than_the_budget_is_kept_whole(case):
    inputs = case.make_inputs([5, 3])  # 2 and 1 images of 16 tokens
    with tokprune.pruned(case.model, "random(keep=20)", question_end=case.question_end) as run, torch.no_grad():
        case.model(**inputs)
    assert run.stats.visual_kept.tolist() == [32, 16] == run.stats.visual_unpruned.tolist()


# -- tiles: several tower passes per image -------------------------------------------------------------


class Tiled(InternVLAdapter):
    """The family on inputs whose images are 1 to 3 passes each (its tiny case only differs)."""

    @classmethod
    def tiny(cls, seed=0, attn_implementation="sdpa"):
        model, make_inputs = tiny_internvl(seed=seed, attn_implementation=attn_implementation)

        def tiled(question_lengths=(5, 3), seeds=None, images=None):
            return make_inputs(question_lengths, seeds, images, tiles=3)

        return TinyCase(model, tiled, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)


@pytest.mark.parametrize(("scope", "rows", "kept"), [("image", [2, 2], [10, 10]), ("tile", [3, 5], [15, 25])])
def test_tiled_images_are_budgeted_per_image_or_per_pass(case, scope, rows, kept):
    inputs = case.make_inputs([5, 3], images=2, tiles=3)  # images of 1 + 2 and 2 + 3 passes, one run each
    assert inputs["pixel_values"].shape[0] == (1 + 2) + (2 + 3)
    stock = _logits(case.model, inputs)
    with tokprune.pruned(case.model, "divprune(keep_ratio=1.0)", budget_scope=scope, question_end=case.question_end):
        assert torch.allclose(_logits(case.model, inputs), stock, atol=1e-5)
    with tokprune.pruned(case.model, "random(keep=5)", budget_scope=scope, question_end=case.question_end) as run:
        _logits(case.model, inputs)
    assert run.stats.images.tolist() == rows and run.stats.visual_kept.tolist() == kept
    assert run.stats.visual_unpruned.tolist() == [48, 80]
    with tokprune.pruned(case.model, "none", budget_scope=scope, question_end=case.question_end) as stock_run:
        _logits(case.model, inputs)  # the stock features: the same rows in the stats
    assert stock_run.stats.images.tolist() == rows
    assert stock_run.stats.image_tokens.tolist() == run.stats.image_tokens.tolist()
    assert torch.equal(stock_run.stats.flops_unpruned, run.stats.flops_unpruned)


@pytest.mark.parametrize("scope", ["image", "tile"])
def test_tiled_images_pass_the_contract(scope):
    CHECKS["keep_all"](Tiled)
    CHECKS["batch_solo"](Tiled, budget_scope=scope)
    if scope == "image":  # the tokens check maps one strategy row to one placeholder run (an image)
        check_tokens(Tiled)
    assert cache_equivalence(Tiled, "vispruner(keep=5)+fastv", budget_scope=scope) is not None


def test_fixed_size_strategies_run_per_pass_and_are_refused_per_image(case):
    with pytest.raises(MissingCapabilityError, match=r"downsample cuts rows of one fixed size, but under "
                       r"budget_scope='image' .* use budget_scope='tile' .* per image: cdpruner, cls_knee"):  # fmt: skip
        tokprune.patch(case.model, "downsample", question_end=case.question_end)
    inputs = case.make_inputs([5, 3], tiles=3)
    with tokprune.pruned(case.model, "downsample", budget_scope="tile", question_end=case.question_end) as run:
        _logits(case.model, inputs)
    assert (run.stats.visual_kept * 4 == run.stats.visual_unpruned).all()
    assert cache_equivalence(Tiled, "downsample", budget_scope="tile") is not None  # cache == recompute there


def test_features_asked_outside_a_call_are_one_row_per_pass(case):
    # get_image_features called directly has no prompt to group passes by: one row per pass, said in the docs
    inputs = case.make_inputs([5, 3], images=2, tiles=3)
    with tokprune.pruned(case.model, "random(keep=5)", question_end=case.question_end):
        out = case.model.model.get_image_features(inputs["pixel_values"]).pooler_output
    assert [len(o) for o in out] == [5] * 8


def test_placeholders_that_are_not_whole_passes_are_refused(case):
    inputs = case.make_inputs([5, 3], images=2, tiles=3)
    inputs["pixel_values"] = inputs["pixel_values"][:-1]  # one pass fewer than the prompts' placeholders
    with tokprune.pruned(case.model, "random(keep=5)", question_end=case.question_end), torch.no_grad():
        with pytest.raises(InputError, match=r"runs \(\[16, 32, 32, 48\] tokens\) are not whole tower passes of 16 "
                           r"tokens for the 7 passes"):  # fmt: skip
            case.model(**inputs)


# -- the CLS situation and bad layouts ------------------------------------------------------------------


@dataclass(frozen=True)
class _NoParams:
    pass


class _RecordSignals(PruningStrategy):
    """Keeps everything; records the CLS signals the strategy would read and the features it sees."""

    name = "record_internvl_signals"
    stage = Stage.VISION
    ragged_vision = True
    Params = _NoParams
    seen: ClassVar[dict[str, torch.Tensor]] = {}

    def requires(self):
        return frozenset({Signal("qk", 1), Signal("hidden", -1)})

    def plan(self, ctx):
        s = ctx.signals
        self.seen.update(attention=s.cls_attention(1, heads="mean"), keys=s.patch_keys(1), hidden=s.hidden(-1),
                         similarity=s.cls_similarity(-1), features=ctx.features)  # fmt: skip
        return VisionPlan(keep=ctx.token_valid)


class _RasterGroups(InternVLAdapter):
    """The wrong grouping: four consecutive raster patches per token instead of the shuffle's 2x2 block."""

    def encode_images(self, pixel_values, options):
        images = super().encode_images(pixel_values, options)
        images.groups = torch.arange(images.groups.numel()).view_as(images.groups)
        return images


@pytest.mark.parametrize("adapter", [InternVLAdapter, _RasterGroups], ids=["ours", "raster_groups"])
def test_the_cls_signals_are_the_towers_own_per_token(adapter):
    # The tower's own attention weights (eager), CLS row, head-mean, summed over each token's 2x2 patches
    # by the model's own pixel shuffle: what cls_attention gives each token. The token-space hidden state at
    # the feature layer is the feature itself; a key is the mean of its patches' keys. A family grouping
    # the wrong patches fails both.
    model, make_inputs = tiny_internvl(seed=0, attn_implementation="eager")
    x = make_inputs([5, 3], images=2)
    pixels = x["pixel_values"]
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        pruned = tokprune.pruned(
            model, Pipeline([_RecordSignals()]), adapter=adapter, question_end=VOCAB.assistant_marker
        )
        with pruned:
            model(**x)
    if adapter is _RasterGroups:
        cls_row = out.attentions[1][:, :, 0, 1:].mean(dim=1)
        shuffled = model.model.pixel_shuffle(cls_row.view(-1, 8, 8, 1), scale_factor=0.5).reshape(-1, 16, 4).sum(-1)
        assert not torch.allclose(_RecordSignals.seen["attention"], shuffled, atol=1e-6)
        assert not torch.allclose(_RecordSignals.seen["hidden"][:, 1:], _RecordSignals.seen["features"])
        return
    seen = _RecordSignals.seen
    cls_row = out.attentions[1][:, :, 0, 1:].mean(dim=1)  # [T, 64]: CLS attention to each patch
    shuffled = model.model.pixel_shuffle(cls_row.view(-1, 8, 8, 1), scale_factor=0.5)  # [T, 4, 4, 4]
    assert torch.allclose(seen["attention"], shuffled.reshape(-1, 16, 4).sum(-1), atol=1e-6)
    assert torch.allclose(seen["hidden"][:, 1:], seen["features"])
    assert torch.allclose(seen["hidden"][:, 0], out.last_hidden_state[:, 0].repeat(1, 4))
    assert seen["similarity"].shape == seen["keys"].shape[:2] == (pixels.shape[0], 16)


@pytest.mark.parametrize("spec", ["cls_knee", "topk(keep=4)", "vispruner(keep=4)", "prumerge", "cdpruner(keep=4)"])
def test_cls_reading_strategies_run(case, spec):
    inputs = case.make_inputs([5, 3])
    with tokprune.pruned(case.model, spec, question_end=case.question_end) as run:
        _logits(case.model, inputs)
    assert (run.stats.visual_kept <= run.stats.visual_unpruned).all()
    assert case.model.model.vision_tower.embeddings.cls_token is not None


class _NoClsEmbeddings(nn.Module):
    """InternViT's embeddings without the CLS token (patches and their positions only)."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.patch_embeddings = embeddings.patch_embeddings
        self.position_embeddings = nn.Parameter(embeddings.position_embeddings[:, 1:].detach().clone())

    def forward(self, pixel_values, bool_masked_pos=None):
        return self.patch_embeddings(pixel_values) + self.position_embeddings


def test_a_checkpoint_without_its_cls_runs_cls_free_strategies_and_refuses_the_others():
    model, make_inputs = tiny_internvl(seed=1)
    model.model.vision_tower.embeddings = _NoClsEmbeddings(model.model.vision_tower.embeddings)
    model.config.vision_feature_select_strategy = "full"  # nothing to drop: every token is a patch
    inputs = make_inputs([5, 3], images=2)
    stock = _logits(model, inputs)
    with pytest.raises(MissingCapabilityError, match=r"cls_knee reads the CLS .* internvl vision tower has no CLS"):
        tokprune.patch(model, "cls_knee", question_end=VOCAB.assistant_marker)
    with tokprune.pruned(model, "divprune(keep_ratio=1.0)", question_end=VOCAB.assistant_marker):
        assert torch.allclose(_logits(model, inputs), stock, atol=1e-5)
    with tokprune.pruned(model, "divprune(keep_ratio=0.5)", question_end=VOCAB.assistant_marker) as run:
        _logits(model, inputs)
    assert run.stats.visual_kept.tolist() == [16, 16]


def test_a_select_strategy_the_tower_cannot_run_is_refused():
    model, _ = tiny_internvl()
    model.config.vision_feature_select_strategy = "full"  # CLS kept: 1 + 64 tokens make no square raster
    with pytest.raises(
        MissingCapabilityError,
        match=r"has a CLS token at index 0, so vision_feature_select_strategy "
        r"must be 'default'.*got 'full'",
    ):
        tokprune.patch(model, "divprune", question_end=VOCAB.assistant_marker)
    model.config.vision_feature_select_strategy = "default"
    model.config.vision_feature_layer = [-1, -2]
    with pytest.raises(MissingCapabilityError, match=r"vision_feature_layer=\[-1, -2\]; one int .* LLM-stage"):
        tokprune.patch(model, "divprune", question_end=VOCAB.assistant_marker)


def test_a_call_asking_another_feature_layer_is_refused(case):
    inputs = case.make_inputs([5])
    with tokprune.pruned(case.model, "divprune", question_end=case.question_end), torch.no_grad():
        with pytest.raises(InputError, match=r"vision_feature_layer=-1 .* got vision_feature_layer=-2"):
            case.model(**inputs, vision_feature_layer=-2)
        case.model(**inputs)  # and the next call runs


def test_a_sliding_window_language_model_is_refused():
    model, _ = tiny_internvl()
    model.model.language_model.config.layer_types = ["full_attention", "sliding_attention"] * 2
    with pytest.raises(UnsupportedModelError, match=r"layer_types \['full_attention', 'sliding_attention'\]"):
        tokprune.patch(model, "fastv", question_end=VOCAB.assistant_marker)


def test_video_frames_and_several_images_are_rows_in_prompt_order(case):
    # the processor sends video frames as images: each pass one row, filling its placeholders in order
    inputs = case.make_inputs([4, 6, 2], images=3)
    stock = _logits(case.model, inputs)
    with tokprune.pruned(case.model, "random(keep_ratio=1.0)", question_end=case.question_end):
        assert torch.allclose(_logits(case.model, inputs), stock, atol=1e-5)


# -- the FLOP model against a brute-force count ------------------------------------------------------------


def _counted(counter: FlopCounterMode, model: nn.Module) -> int:
    root = f"{type(model).__name__}.model"
    layers = range(len(model.model.language_model.layers))
    modules = [f"language_model.layers.{i}" for i in layers] + ["vision_tower", "multi_modal_projector"]
    return sum(_macs(counter, f"{root}.{name}") for name in modules)


@pytest.mark.parametrize(
    ("spec", "tiles", "scope"),
    [
        ("random(keep_ratio=0.5)", 1, "image"),
        ("random(keep_ratio=0.25)+fastv(layer=2, keep=4)", 1, "image"),
        ("random(keep=5)", 3, "tile"),
        ("prumerge", 3, "image"),  # an extra token per image, through the projector
    ],
)
def test_prefill_flops_are_the_brute_force_count(spec, tiles, scope):
    # The tower over every pass (CLS included), the projector on the kept tokens (every token unpruned),
    # the decoder layers at the counts they really ran; unpruned: the stock model's count.
    model, make_inputs = tiny_internvl(seed=0, attn_implementation="eager")
    x = make_inputs((5,), images=2, tiles=tiles)
    pruned = tokprune.pruned(model, spec, budget_scope=scope, question_end=VOCAB.assistant_marker)
    with FlopCounterMode(display=False) as counter, pruned as run, torch.no_grad():
        model(**x, logits_to_keep=1)
    s = run.stats
    assert s.visual_kept[0] < s.visual_unpruned[0]
    assert float(s.flops_pruned[0]) == _counted(counter, model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # the stock model, unpruned
        model(**x, logits_to_keep=1)
    assert float(s.flops_unpruned[0]) == _counted(counter, model)


def test_grouped_signals_of_a_ragged_batch_give_padding_no_mass():
    # VisionSignals.groups with lengths (a family merging patches, images of different sizes): the softmax
    # runs over the CLS and the patches of each row's own tokens, then sums per token; padding gets none.
    from tokprune.strategy import VisionSignals

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 9, 4, generator=gen), torch.randn(2, 9, 4, generator=gen)
    groups = torch.tensor([[0, 2], [1, 3], [4, 6], [5, 7]])
    lengths = torch.tensor([4, 2])
    signals = VisionSignals(lambda s: (q, k), 1, 1, lengths=lengths, groups=groups)
    got = signals.cls_attention(0)
    for b, n in enumerate(lengths.tolist()):
        patches = groups[:n].flatten() + 1  # the row's own patches (CLS at 0)
        keys = torch.cat([k[b, :1], k[b, patches.sort().values]])
        attn = torch.softmax(keys @ q[b, 0] / 2.0, dim=0)[1:]
        per_patch = torch.zeros(8).index_put_((patches.sort().values - 1,), attn)
        assert torch.allclose(got[b, :n], per_patch[groups[:n]].sum(-1), atol=1e-6)
        assert (got[b, n:] == 0).all()
    assert torch.allclose(signals.patch_keys(0), k[:, 1:][:, groups].mean(dim=2))


@pytest.mark.parametrize("spec", ["topk(keep=5)+fastv", "none"])
def test_num_return_sequences_repeats_each_prompts_passes(case, spec):
    # pixel_values has a row per tower pass, not per prompt: generate's own expansion would pair prompts with
    # the wrong passes; the family repeats each prompt's passes with it.
    inputs = case.make_inputs([5, 3], images=None, tiles=2)  # 1 + 2 and 2 passes
    repeated = case.make_inputs([5, 5, 5, 3, 3, 3], seeds=[0, 0, 0, 1, 1, 1], tiles=2)
    with tokprune.pruned(case.model, spec, question_end=case.question_end, budget_scope="tile"):
        torch.manual_seed(3)
        got = case.model.generate(**inputs, do_sample=True, top_k=0, num_return_sequences=3, max_new_tokens=5)
        torch.manual_seed(3)
        expected = case.model.generate(**repeated, do_sample=True, top_k=0, max_new_tokens=5)
    assert torch.equal(got, expected)


def test_a_tiled_image_reads_its_thumbnails_cls_over_all_its_passes():
    # budget_scope="image": one row per image; the CLS query and key are the thumbnail's (its last pass), the
    # keys those of every pass's patches; the softmax runs over all of them, then sums per 2x2 token.
    model, make_inputs = tiny_internvl(seed=0)
    x = make_inputs([5, 3], images=2, tiles=3)  # passes per image: 1, 2, 2, 3
    captured = {}
    attention = model.model.vision_tower.encoder.layer[1].attention
    hooks = [
        module.register_forward_hook(lambda _m, _a, out, name=name: captured.__setitem__(name, out))
        for name, module in (("q", attention.q_norm), ("k", attention.k_norm))
    ]
    try:
        with torch.no_grad(), tokprune.pruned(model, Pipeline([_RecordSignals()]), question_end=VOCAB.assistant_marker):
            model(**x)
    finally:
        for hook in hooks:
            hook.remove()
    q, k, got = captured["q"], captured["k"], _RecordSignals.seen["attention"]
    assert got.shape == (4, 3 * 16)
    start = 0
    for i, passes in enumerate([1, 2, 2, 3]):
        own = range(start, start + passes)
        thumbnail = own[-1]
        keys = torch.cat([k[thumbnail, :1], *(k[p, 1:] for p in own)]).view(-1, 2, 16)  # [1 + passes*64, H, D]
        logits = torch.einsum("hd,thd->ht", q[thumbnail, 0].view(2, 16), keys) / 4.0
        per_patch = logits.softmax(dim=-1).mean(dim=0)[1:].view(passes, 8, 8, 1)
        per_token = model.model.pixel_shuffle(per_patch, scale_factor=0.5).reshape(passes * 16, 4).sum(-1)
        assert torch.allclose(got[i, : passes * 16], per_token, atol=1e-6)
        assert (got[i, passes * 16 :] == 0).all()
        start += passes


@pytest.mark.parametrize("name", list(MUTANTS))
def test_every_mutant_fails_on_tiled_images(name):
    # the contract's mutants on images of 1 to 3 passes (budget_scope="image": a row per image)
    if not applies(Tiled, name):
        pytest.skip(f"internvl refuses what {name} changes")
    wrong = mutant(Tiled, name)
    # some wrong rows span placeholder runs with text between them: the assembly refuses them before the check
    with pytest.raises((AssertionError, InputError), match=rf"{wrong.__name__} \(internvl|span placeholder runs"):
        check_tokens(wrong)


def test_a_family_taking_passes_for_images_fails_the_tokens_check():
    # the family's own bug: tiled images cut per pass under budget_scope="image" (rows are not images)
    class PerPass(Tiled):
        def placeholder_runs(self):
            return None

    with pytest.raises(AssertionError, match=r"saw \d+ rows for \d+ images"):
        check_tokens(PerPass)
