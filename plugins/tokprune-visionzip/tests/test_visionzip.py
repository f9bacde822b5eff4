"""tokprune-visionzip: behaviour against a slow transcription of the reference, plus tokprune's shipped suites."""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune import VisionContext, strategies
from tokprune.adapters.llava_next import anyres_layout, anyres_tiles
from tokprune.errors import StrategyParamError
from tokprune.testing import models
from tokprune.testing.contract import CHECKS, contract_cases
from tokprune.testing.equivalence import check_batch_equivalence, check_cache_equivalence
from tokprune.testing.models import tiny_llava

# Installed, not imported from the source tree: the tests check what `pip install` delivers.
plugin = pytest.importorskip("tokprune_visionzip", reason="pip install ./plugins/tokprune-visionzip")
VisionZip = plugin.VisionZip
uniform_targets = plugin.uniform_targets

LAYERS, HEADS, WIDTH, GRID = 6, 4, 32, 4  # a tiny CLIP: 16 patches + CLS


def tiny_clip(seed: int = 0):
    return models.tiny_clip(seed, layers=LAYERS, heads=HEADS, width=WIDTH, grid=GRID)


run_clip = models.run_clip
context_for = models.clip_context


def reference_visionzip(out, keys: torch.Tensor, dominant: int, contextual: int) -> list[list[torch.Tensor]]:
    """The reference's tokens, one sample at a time: ``[CLS, dominant patches (ascending), contextual]``.

    Transcribed from ``visionzip/clip_encoder.py``: sum over heads of ``attentions[-2]``'s CLS row, top
    ``dominant - 1`` patches plus CLS, the rest merged into uniformly spaced targets by the cosine
    similarity of head-mean keys, contextual token = target + mean(assigned).
    """
    hidden, attn = out.hidden_states[-2], out.attentions[-2]
    tokens = []
    for b in range(hidden.shape[0]):
        score = attn[b].sum(dim=0)[0, 1:].tolist()
        top = sorted(range(len(score)), key=lambda i: (-score[i], i))[: dominant - 1]
        chosen = sorted([0] + [i + 1 for i in top])
        rest = [t for t in range(hidden.shape[1]) if t not in chosen]
        metric = keys[b].view(hidden.shape[1], HEADS, -1).mean(dim=1)
        normed = [metric[t] / metric[t].norm() for t in rest]
        m = len(rest)
        step = max(1, m // contextual)
        targets = list(range(0, m, step))[:contextual]
        groups: dict[int, list[torch.Tensor]] = {j: [] for j in range(len(targets))}
        for i in range(m):
            if i in targets:
                continue
            sims = [float(normed[i] @ normed[t]) for t in targets]
            groups[sims.index(max(sims))].append(hidden[b, rest[i]])
        merged = [
            hidden[b, rest[t]] + (torch.stack(groups[j]).mean(dim=0) if groups[j] else 0) for j, t in enumerate(targets)
        ]
        tokens.append([hidden[b, t] for t in chosen] + merged)
    return tokens


def our_tokens(ctx: VisionContext, plan) -> list[list[torch.Tensor]]:
    """What the LLM receives from a VisionPlan: kept patches in raster order, then the extra tokens."""
    return [list(ctx.features[b][plan.keep[b]]) + list(plan.extra[b]) for b in range(ctx.batch_size)]


@pytest.mark.parametrize(("dominant", "contextual"), [(6, 3), (2, 1), (10, 4), (5, 11)])
def test_dominant_set_and_contextual_merge_equal_the_reference_loop(dominant, contextual):
    model = tiny_clip()
    out, captured = run_clip(model, torch.randn(3, 3, 4 * GRID, 4 * GRID))
    strategy = strategies.get(f"visionzip(dominant={dominant}, contextual={contextual})").vision
    ctx = context_for(strategy, out, captured)
    plan = strategy(ctx)
    assert plan.features is None  # dominant patches pass through unchanged
    reference = reference_visionzip(out, captured[("k", LAYERS - 2)], dominant, contextual)
    for ours, ref in zip(our_tokens(ctx, plan), reference):
        # Ours: [dominant patches | CLS | contextual]; the reference: [CLS | dominant patches | contextual].
        n_patches = dominant - 1
        assert len(ours) == len(ref) == dominant + contextual
        reordered = ref[1 : 1 + n_patches] + ref[:1] + ref[1 + n_patches :]
        torch.testing.assert_close(torch.stack(ours), torch.stack(reordered), rtol=1e-5, atol=1e-5)


def test_without_cls_dominant_counts_patches_only():
    model = tiny_clip()
    out, captured = run_clip(model, torch.randn(2, 3, 4 * GRID, 4 * GRID))
    strategy = VisionZip(dominant=4, contextual=2, include_cls=False)
    plan = strategy(context_for(strategy, out, captured))
    assert plan.keep.sum(dim=1).tolist() == [4, 4]
    assert plan.extra.shape == (2, 2, WIDTH)
    assert all(s.kind == "qk" for s in strategy.requires())


def test_budgets_above_the_patch_count_keep_what_there_is():
    model = tiny_clip()
    out, captured = run_clip(model, torch.randn(2, 3, 4 * GRID, 4 * GRID))
    strategy = VisionZip(dominant=54, contextual=10)  # the README's setting on a 16-patch tower
    plan = strategy(context_for(strategy, out, captured))
    assert plan.keep.all()
    assert plan.extra.shape == (2, 1, WIDTH)  # CLS only: nothing left to merge
    assert plan.diagnostics["dominant_clamped"].all()


@pytest.mark.parametrize(
    ("remaining", "contextual", "expected"), [(10, 3, [0, 3, 6]), (4, 10, [0, 1, 2, 3]), (7, 1, [0])]
)
def test_uniform_targets_follow_the_reference_arange(remaining, contextual, expected):
    assert uniform_targets(remaining, contextual).tolist() == expected


@pytest.mark.parametrize(
    "bad", ["visionzip(dominant=1)", "visionzip(contextual=-1)", "visionzip(dominant=0, include_cls=false)"]
)
def test_bad_params_are_rejected(bad):
    with pytest.raises(StrategyParamError):
        strategies.get(bad)


def test_registered_through_the_entry_point():
    info = strategies.describe("visionzip")
    assert info.cls is VisionZip
    assert info.source.distribution == "tokprune-visionzip"


# -- images of different sizes (ragged_vision: LLaVA-NeXT's AnyRes images) -------------------------


class _Blind(VisionZip):
    """VisionZip reading padding as tokens of the image (what the plugin did before cutting per image)."""

    name = "blind_visionzip"

    def plan(self, ctx):
        from dataclasses import replace

        return super().plan(replace(ctx, lengths=None))


@pytest.mark.parametrize(
    "spec", ["visionzip(dominant=6, contextual=4)", "visionzip(dominant=1, contextual=5, include_cls=false)"]
)
def test_each_image_of_a_ragged_batch_plans_what_it_plans_alone_and_a_length_blind_copy_fails(spec):
    from tokprune.testing.contract import ContractFailure

    (strategy,) = strategies.get(spec)
    assert strategy.ragged_vision
    CHECKS["ragged"](strategy)
    with pytest.raises(ContractFailure, match="ragged"):
        CHECKS["ragged"](_Blind(strategy.params))


def test_counts_derive_from_each_images_own_length():
    from tokprune.testing.contract import VisionBatch

    strategy = VisionZip(dominant=6, contextual=4)
    lengths = (64, 59, 9, 3)
    plan = strategy(VisionBatch.make(strategy).ragged(lengths).context())
    n = torch.tensor(lengths)
    dominant = torch.clamp(n, max=5)
    contextual = torch.clamp(n - dominant, max=4)  # 9 patches: 5 dominant, 4 left; 3 patches: none left
    assert torch.equal(plan.keep.sum(dim=1), dominant)
    assert torch.equal(plan.extra_valid.sum(dim=1), 1 + contextual)  # CLS + the image's own contextual tokens
    assert plan.extra_valid[:, 0].all()  # the CLS slot comes first in every row
    assert plan.diagnostics["dominant_clamped"].tolist() == [False, False, False, True]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ragged_contextual_merge_is_the_reference_merge_row_by_row(seed):
    gen = torch.Generator().manual_seed(seed)
    hidden, metric = torch.randn(4, 13, 6, generator=gen), torch.randn(4, 13, 5, generator=gen)
    remaining = torch.tensor([13, 7, 2, 0])
    tokens, valid, assignment = plugin.contextual_merge_ragged(hidden, metric, remaining, 4)
    for b, m in enumerate(remaining.tolist()):
        solo, solo_assignment = plugin.contextual_merge(hidden[b : b + 1, :m], metric[b : b + 1, :m], 4)
        assert int(valid[b].sum()) == solo.shape[1] == min(4, m)
        torch.testing.assert_close(tokens[b, valid[b]], solo[0], rtol=1e-6, atol=1e-6)
        merged = assignment[b, :m][assignment[b, :m] >= 0]
        assert torch.equal(merged, solo_assignment[0])
        assert (assignment[b, m:] == -1).all()  # padding joins no group


@pytest.mark.parametrize("scope", ["image", "tile"])
def test_on_llava_next_each_image_gets_its_solo_logits_in_both_budget_scopes(scope):
    model, make_inputs = models.tiny_llava_next(seed=0)
    lengths = (5, 2, 8)
    batch = make_inputs(lengths)

    def last_logits(inputs):
        position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return model(**inputs, position_ids=position_ids).logits[:, -1].float()

    spec = "visionzip(dominant=4, contextual=2)"
    marker = models.VOCAB.assistant_marker
    with tokprune.pruned(model, spec, question_end=marker, budget_scope=scope) as run:
        logits = last_logits(batch)
        kept = run.stats.visual_kept
        for i, q in enumerate(lengths):
            solo = make_inputs([q], seeds=[i])
            torch.testing.assert_close(last_logits(solo)[0], logits[i], rtol=0, atol=1e-4)
            assert run.stats.visual_kept[0] == kept[i]

    passes = torch.tensor(anyres_tiles(model.config, batch["image_sizes"]))
    newlines = torch.tensor([int(x.sum()) for x in _newline_counts(model, batch)])
    rows = passes if scope == "tile" else torch.ones_like(passes)  # every row: 3 dominant + CLS + 2 contextual
    assert torch.equal(kept, newlines + rows * 6)


def _newline_counts(model, x):

    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    tiles = anyres_tiles(model.config, x["image_sizes"])
    return [lay == -1 for lay in anyres_layout(model.model, tiles, n, x["image_sizes"], "default")]


# -- tokprune's shipped contract suite, on the defaults and on edge settings -----------------------

CONTRACT_SPECS = [
    "visionzip",
    "visionzip(dominant=54, contextual=10)",
    "visionzip(dominant=2, contextual=0)",
    "visionzip(dominant=1, contextual=5, include_cls=false)",
]


@pytest.mark.parametrize(
    ("strategy", "check"),
    [c[1:] for c in contract_cases(CONTRACT_SPECS)],
    ids=[c[0] for c in contract_cases(CONTRACT_SPECS)],
)
def test_contract(strategy, check):
    CHECKS[check](strategy)


# -- the adapter's equivalence checks, inside a patched tiny LLaVA --------------------------------

EQUIVALENCE_SPECS = [
    "visionzip(dominant=6, contextual=3)",
    "visionzip(dominant=4, contextual=2, include_cls=false)",
    "visionzip(dominant=5, contextual=4)+fastv(layer=2, keep_ratio=0.5)",
]


@pytest.mark.parametrize("spec", EQUIVALENCE_SPECS)
def test_cache_equivalence(spec):
    check_cache_equivalence(spec)


@pytest.mark.parametrize("spec", EQUIVALENCE_SPECS)
def test_batch_equivalence(spec):
    check_batch_equivalence(spec)


def test_patched_model_feeds_dominant_plus_contextual_tokens_to_the_llm():
    model, make_inputs = tiny_llava()
    with tokprune.pruned(model, "visionzip(dominant=6, contextual=3)") as run, torch.no_grad():
        model(**make_inputs([4, 2]))
    assert run.stats.visual_kept.tolist() == [9, 9]  # budget = dominant + contextual


# -- the README's setting on tokprune's embedded trained model ------------------------------------


def test_readme_pipeline_runs_on_the_embedded_model():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokprune import data, models

    path = models.path("tiny-llava-shapes")
    if not (path / "config.json").exists():
        pytest.skip("the embedded model is not in this checkout")
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    samples = data.benchmark("test", n=4)
    inputs = processor(
        images=[s.image for s in samples],
        text=[data.build_prompt(s.question) for s in samples],
        return_tensors="pt",
        padding=True,
    )
    pipeline = strategies.get("visionzip(dominant=54, contextual=10)+fastv")
    with tokprune.pruned(model, pipeline, question_end=processor) as run, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert run.stats.visual_kept.tolist() == [54 + 10] * len(samples)  # 53 patches + CLS + 10 contextual
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(a.strip() for a in answers)
