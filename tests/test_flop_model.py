"""The FLOP model (tokprune/stats.py) against a brute-force count: torch's FlopCounterMode over the real
modules of tiny models in eager attention (every matmul, attention's included, is an aten op it counts).

FlopCounterMode counts 2 FLOPs per multiply-accumulate; the model counts multiply-accumulates. Norms,
activations, softmax and rotary products are element-wise and counted by neither; patch-embedding
convolutions are left out of the model on purpose (stats module docstring), so they are subtracted.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _families import FAMILY_PARAMS
from _flops import macs as _macs
from torch.utils.flop_counter import FlopCounterMode

import tokprune
from tokprune import hf_compat as hf
from tokprune.adapters import Family
from tokprune.adapters.llava_next import anyres_tiles
from tokprune.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from tokprune.adapters.smolvlm import SmolVLMAdapter
from tokprune.stats import WindowedTower, layer_flops
from tokprune.testing.adapters import tiny_case
from tokprune.testing.models import tiny_llava_next, tiny_qwen2_5_vl, tiny_qwen3_vl

qwen_only = pytest.mark.skipif(
    hf.older_than(Qwen2_5_VLAdapter.min_transformers),
    reason=f"Qwen2.5-VL is tested from transformers {Qwen2_5_VLAdapter.min_transformers}",
)


def _tower_macs(visual: torch.nn.Module, grids: list[tuple[int, int, int]]) -> int:
    cfg = visual.config
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(dim=-1).sum()), patch_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        visual(pixels, grid_thw=grid)
    return _macs(counter, type(visual).__name__)


@qwen_only
@pytest.mark.parametrize("full", [[1], [0, 1], [7]])  # one full block; every block full; none (7 >= depth)
@pytest.mark.parametrize(
    "grids",
    [
        [(1, 8, 8)],  # 4 x 4 merged tokens: whole 2 x 2 windows only
        [(1, 6, 10)],  # 3 x 5 merged: windows cut short by the edge in both axes
        [(2, 4, 6), (1, 10, 2)],  # two frames (full attention per frame) and a second image in the same call
    ],
)
def test_windowed_tower_is_the_brute_force_count_of_qwens_tower(grids, full):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    model, _ = tiny_qwen2_5_vl(seed=0, attn_implementation="eager")
    vcfg = Qwen2_5_VLConfig(vision_config={**model.config.vision_config.to_dict(), "fullatt_block_indexes": full})
    vcfg = vcfg.vision_config
    vcfg._attn_implementation = "eager"
    visual = Qwen2_5_VisionTransformerPretrainedModel(vcfg).eval()
    tower = WindowedTower.of(vcfg, visual.blocks[0].mlp)
    assert tower.window == 2 and tower.full_blocks == sum(i < vcfg.depth for i in full)
    per_image = tower.flops(torch.tensor(grids))
    assert per_image.shape == (len(grids),)
    assert float(per_image.sum()) == _tower_macs(visual, grids)


@qwen_only
def test_windowed_tower_tells_window_from_full_attention():
    # The same patches cut into different windows (3 x 3 merged tokens: 2 + 1 by 2 + 1; 1 x 9: 2+2+2+2+1)
    # must cost differently: a count linear in the patches would give one figure for both.
    tower = WindowedTower(c=8, mv=16, depth=4, full_blocks=1, window=2, merge=2, out=8)
    square, strip = tower.flops(torch.tensor([[1, 6, 6], [1, 2, 18]]))  # 36 patches each
    assert square != strip
    with pytest.raises(ValueError, match="full_blocks=5, depth=4"):
        WindowedTower(c=8, mv=16, depth=4, full_blocks=5, window=2, merge=2, out=8)


def _layers_and(counter: FlopCounterMode, model: torch.nn.Module, *modules: str) -> int:
    """MACs of the decoder layers and the named modules of ``model.model``."""
    root = type(model).__name__
    lm = model.model.language_model
    counted = sum(_macs(counter, f"{root}.model.language_model.layers.{i}") for i in range(len(lm.layers)))
    return counted + sum(_macs(counter, f"{root}.model.{name}") for name in modules)


@qwen_only
@pytest.mark.parametrize("family", [tiny_qwen2_5_vl, tiny_qwen3_vl], ids=["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("spec", ["random(keep_ratio=0.25)", "random(keep_ratio=0.5)+fastv(layer=2, keep=1)"])
def test_qwen_prefill_flops_are_the_brute_force_count(spec, family):
    # Tower + merger(s) (the same pruned or not) and the GQA decoder layers at the counts they really ran;
    # unpruned: the stock model's count. Qwen3-VL: a tower without windows, and DeepStack mergers.
    model, make_inputs = family(seed=0, attn_implementation="eager")
    x = make_inputs((5,))
    with FlopCounterMode(display=False) as counter, tokprune.pruned(model, spec) as run, torch.no_grad():
        model(**x, logits_to_keep=1)
    s = run.stats
    assert s.visual_kept[0] < s.visual_unpruned[0]
    assert float(s.flops_pruned[0]) == _layers_and(counter, model, "visual")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**x, logits_to_keep=1)
    assert float(s.flops_unpruned[0]) == _layers_and(counter, model, "visual")


@qwen_only
def test_a_gqa_decoder_layer_is_the_brute_force_count():
    model, _ = tiny_qwen2_5_vl(seed=0, attn_implementation="eager")
    lm = model.model.language_model
    cfg = lm.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert kv < cfg.hidden_size  # really grouped-query
    n = 11
    h = torch.randn(1, n, cfg.hidden_size)
    pos = torch.arange(n)[None]
    pe = lm.rotary_emb(h, position_ids=pos.expand(3, 1, n))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        lm.layers[0](h, attention_mask=None, position_ids=pos, position_embeddings=pe)
    counted = _macs(counter, type(lm.layers[0]).__name__)
    assert float(layer_flops(torch.tensor(n), cfg.hidden_size, cfg.intermediate_size, 3, kv)) == counted


@pytest.mark.parametrize(
    ("spec", "scope"),
    [
        ("random(keep_ratio=0.5)", "image"),
        ("random(keep_ratio=0.5)+fastv(layer=2, keep=4)", "image"),
        ("prumerge", "tile"),  # one extra token per tower pass, each mapped by the projector
        ("divprune(keep_ratio=0.5)", "image"),  # every token projected to choose, the kept rows taken from it
        ("divprune(keep_ratio=0.5)", "tile"),  # rows of its own per tile: the kept rows projected after
    ],
)
def test_llava_next_prefill_flops_are_the_brute_force_count(spec, scope):
    # Base view + tiles: the tower over every pass; the projector on what it maps (every pass's patches
    # in the stock model, the kept ones without the row newlines when pruned); the decoder layers.
    model, make_inputs = tiny_llava_next(seed=0, attn_implementation="eager")
    x = make_inputs((5,))
    tiles = torch.tensor(anyres_tiles(model.config, x["image_sizes"]))
    assert int(tiles[0]) == x["pixel_values"].shape[1] > 1
    pruned = tokprune.pruned(model, spec, budget_scope=scope)
    with FlopCounterMode(display=False) as counter, pruned as run, torch.no_grad():
        model(**x, logits_to_keep=1)
    assert float(run.stats.flops_pruned[0]) == _layers_and(counter, model, "vision_tower", "multi_modal_projector")
    assert run.stats.visual_kept[0] < run.stats.visual_unpruned[0]
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # the stock model, unpruned
        model(**x, logits_to_keep=1)
    assert float(run.stats.flops_unpruned[0]) == _layers_and(counter, model, "vision_tower", "multi_modal_projector")


# -- every registered family, from the registry --------------------------------------------------------------


def _model_macs(counter: FlopCounterMode, model: torch.nn.Module, inner: torch.nn.Module) -> int:
    """MACs of every module ``model`` ran below its inner model except ``lm_head`` (the tower, the projector,
    the decoder layers...): each op once, at its outermost such module, patch-embedding convolutions left out.

    Ops in the inner model's own forward (outside any child module) are left out: when patched, that forward
    is tokprune's, and what it computes there is a strategy's scoring (FastV's attention row), not the model.
    """
    root = type(model).__name__
    inner_name = next(f"{root}.{n}" if n else root for n, m in model.named_modules() if m is inner)
    skip = {root, inner_name, f"{root}.lm_head"}
    names = [n for n in counter.get_flop_counts() if n.startswith(root + ".") and n not in skip]
    names = [n for n in names if not n.startswith(f"{root}.lm_head.")]
    outermost = [n for n in names if not any(n.startswith(other + ".") for other in names)]
    # convolutions inside the language model are the model's (Qwen3.5's linear-attention layers run a
    # depthwise one), unlike the towers' patch embeddings, which the FLOP model leaves out
    language = [n for n in outermost if ".language_model" in n]
    convs = sum(_macs(counter, n, convolutions=True) - _macs(counter, n) for n in language)
    return sum(_macs(counter, n) for n in outermost) + convs


def _check_family_flops(cls: type[Family], spec: str, adapter: type[Family] | None = None) -> None:
    """``spec``'s ``flops_pruned`` and the stock model's ``flops_unpruned`` against FlopCounterMode on the
    family's tiny model (``adapter``: a class to patch with instead of ``cls``, the mutants)."""
    case = tiny_case(cls, seed=0, attn_implementation="eager")
    model, x = case.model, case.make_inputs((5,))
    pruned = tokprune.pruned(model, spec, question_end=case.question_end, adapter=adapter or cls)
    with FlopCounterMode(display=False) as counter, pruned as run, torch.no_grad():
        model(**x, logits_to_keep=1)
    inner, s = run.model_parts.inner, run.stats
    if spec != "none":
        assert int(s.layer_tokens[0, -1]) < int(s.seq_len[0])  # the cut really happened
    assert float(s.flops_pruned[0]) == _model_macs(counter, model, inner), f"{cls.name}: {spec}"
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # the stock model
        model(**x, logits_to_keep=1)
    assert float(s.flops_unpruned[0]) == _model_macs(counter, model, inner), f"{cls.name}: stock model"


def _specs(cls: type[Family]) -> list[str]:
    """Keep-all, a vision-stage cut (where the family has a vision stage), one that projects every token to
    choose (DivPrune: the projector's cost is all of them, the kept rows taken from that projection), and an
    LLM-stage cut after the first at the layer the family's tiny case names."""
    layer = tiny_case(cls).llm_layer
    vision = ["random(keep_ratio=0.5)"] if cls.has_vision_stage else []
    projecting = ["divprune(keep_ratio=0.5)"] if cls.has_vision_stage else []
    return ["none", *vision, *projecting, f"{'+'.join([*vision, f'fastv(layer={layer}, keep=2)'])}"]


#: Families whose FLOPs this generic count cannot see in full, checked against FlopCounterMode by a test of
#: their own that adds what it misses: the reason, and that test.
OWN_CHECK = {
    "gemma3": "tokprune projects the kept tokens in the patched inner forward, which the generic count leaves "
    "out with the strategies' scoring (tests/test_adapter_gemma3.py::test_prefill_flops_are_the_brute_force_count)",
    "qwen3_5": "the delta rule's triangular solves have no FlopCounterMode rule "
    "(tests/test_adapter_qwen3_5.py::test_prefill_flops_are_the_brute_force_count)",
    "qwen3_5_moe": "the triangular solves, and the default grouped_mm experts run an op FlopCounterMode has no "
    "rule for (tests/test_adapter_qwen3_5.py::test_prefill_flops_are_the_brute_force_count)",
}


def _generic_check_applies(cls: type) -> None:
    if not issubclass(cls, Family):
        pytest.skip(f"{cls.name} is a ModelAdapter without the Family protocol: no FLOP model to check")
    if cls.name in OWN_CHECK:
        pytest.skip(f"{cls.name}: {OWN_CHECK[cls.name]}")


@pytest.mark.parametrize("cls", FAMILY_PARAMS)
def test_every_familys_prefill_flops_are_the_brute_force_count(cls):
    # Tower, projector and LLM as each family computes them; a new family joins by being registered.
    _generic_check_applies(cls)
    for spec in _specs(cls):
        _check_family_flops(cls, spec)


def _wrong_mlp(cls: type[Family]) -> type[Family]:
    """``cls`` with a FLOP model that counts the LLM's MLP with the other number of matrices (a gated MLP
    as a plain one, or the reverse): the bug of reading ``k`` from the wrong module."""

    class WrongMLP(cls):  # type: ignore[misc, valid-type]
        def parts(self):
            parts = super().parts()
            return replace(parts, flops=replace(parts.flops, mlp_matrices=5 - parts.flops.mlp_matrices))

    return WrongMLP


@pytest.mark.parametrize("cls", FAMILY_PARAMS)
def test_the_family_check_rejects_a_wrong_flop_model(cls):
    _generic_check_applies(cls)
    with pytest.raises(AssertionError, match=cls.name):
        _check_family_flops(cls, "random(keep_ratio=0.5)" if cls.has_vision_stage else "none", _wrong_mlp(cls))


def _projects_the_kept_rows_again(cls: type[Family]) -> type[Family]:
    """``cls`` projecting the kept rows again after the step projected every token to choose (the work done
    twice, and the FLOP model counting the kept rows only): what tokprune did before the projection was
    shared."""

    class ProjectsAgain(cls):  # type: ignore[misc, valid-type]
        def place_plan(self, images, plan):
            images.projected_rows = None
            return super().place_plan(images, plan)

    return ProjectsAgain


@pytest.mark.parametrize("cls", FAMILY_PARAMS)
def test_the_family_check_rejects_projecting_the_kept_rows_again(cls):
    _generic_check_applies(cls)
    if not cls.has_vision_stage:
        pytest.skip(f"{cls.name} has no vision stage")
    _check_family_flops(cls, "divprune(keep_ratio=0.5)")
    try:
        _check_family_flops(cls, "divprune(keep_ratio=0.5)", _projects_the_kept_rows_again(cls))
    except AssertionError as caught:
        assert cls.name in str(caught)
    else:  # the mutant is the same work only where the projector is the identity (its rows are the features)
        assert cls.name in IDENTITY_PROJECTION, f"{cls.name}: the check did not see the kept rows projected twice"


#: Families whose vision step reads tokens already in the LLM's space (no projector after the step), so that
#: projecting the kept rows again costs nothing: the mutant above is not a bug there.
IDENTITY_PROJECTION = {"qwen2_5_vl", "qwen3_vl", "llava_onevision"}


@pytest.mark.parametrize(
    ("wrong", "what"),
    [
        ({"vision_tokens": 1}, "a CLS token added to SigLIP's patches"),
        ({"projector_macs": None}, "LLaVA's two-layer projector instead of one linear map"),
        ({"kv_dim": None}, "grouped-query k/v counted at full width"),
    ],
    ids=["cls", "projector", "gqa"],
)
@pytest.mark.skipif(hf.older_than(SmolVLMAdapter.min_transformers), reason="SmolVLM's tested minimum")
def test_smolvlm_flops_reject_specific_wrong_counts(wrong, what):
    # SmolVLM's tower has no CLS, its connector is one linear map after the pixel shuffle, its Llama has
    # grouped-query heads: each wrong reading is caught by the family check.
    class Wrong(SmolVLMAdapter):
        def parts(self):
            parts = super().parts()
            fm = parts.flops
            change = {k: (fm.vision_tokens + v if k == "vision_tokens" else v) for k, v in wrong.items()}
            return replace(parts, flops=replace(fm, **change))

    _check_family_flops(SmolVLMAdapter, "random(keep_ratio=0.5)")
    with pytest.raises(AssertionError, match="smolvlm"):
        _check_family_flops(SmolVLMAdapter, "random(keep_ratio=0.5)", Wrong)
