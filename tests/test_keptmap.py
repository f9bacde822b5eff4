"""Kept maps (``stats.kept``) against what the LLM really received, for every built-in strategy and family.

The oracle reads the decoder layers' own inputs (forward pre-hooks): each row a layer receives is an image
token identified by its position id (so the oracle patches with original positions kept: the methods whose
reference renumbers, divprune or pyramiddrop say, would hide a token's identity; which tokens a step keeps is
recorded the same way in either mode), and, for strategies that do not merge, its hidden
state at layer 0 must equal that token's stock projected feature (the gathered feature, as the adapter
contract checks rows). The cells (row, column, tile) are checked against oracles of each family's own:
the raster, Qwen's M-RoPE positions (``get_rope_index``), LLaVA-NeXT's tile grid (``get_anyres_image_grid_shape``
and its packing run on coordinates). Wrong kept maps (shifted, stale, transposed) must fail the same checks.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch

import tokprune
from tokprune.adapters import registered_adapters
from tokprune.adapters.llava_next import anyres_tiles
from tokprune.adapters.qwen2_5_vl import mrope_index
from tokprune.errors import MissingCapabilityError, StrategyParamError
from tokprune.keptmap import KeptMap, anyres_cells, thw_cells, token_slots
from tokprune.testing.adapters import LENGTHS, contract_specs, tiny_case

ADAPTERS = {cls.name: cls for cls, _ in registered_adapters()}
FAMILIES = ("llava", "llava_next", "qwen2_5_vl", "qwen3_vl")
#: strategies whose kept rows are merged or pooled features (not the stock feature of their patch)
MERGING = {"prumerge", "prumerge_plus", "downsample"}


def _name(spec: str) -> str:
    return spec.split("(")[0]


def _stock_features(model, inputs) -> list[torch.Tensor]:
    """The unpatched model's projected features, one ``[N_i, D]`` per image, in prompt order."""
    fn = model.model.get_image_features
    names = set(inspect.signature(fn).parameters)
    kwargs = {k: v for k, v in inputs.items() if k in names and k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return [f for f in fn(**kwargs, return_dict=True).pooler_output]


def _positions(inputs) -> torch.Tensor:
    return (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)


def _received(model, inputs, spec, question_end, layers=()):
    """Patch, run one prefill with hooks on decoder layers 0 and ``layers``: (stats, {layer: (hidden, pos)})."""
    lm = model.model.language_model
    seen = {}

    def hook_for(k):
        def hook(_module, args, kwargs):
            seen[k] = (args[0] if args else kwargs["hidden_states"]).detach().clone(), kwargs["position_ids"].clone()

        return hook

    pipeline = tokprune.strategies.get(spec)
    extras = torch.zeros(0, dtype=torch.long)
    step = pipeline.vision
    if step is not None:  # record the extra tokens (no patch) the plan adds to each image
        plan = step.plan

        def recording(ctx):
            nonlocal extras
            out = plan(ctx)
            if out.extra is not None:
                e = out.extra.shape[1]
                extras = out.extra_valid.sum(1) if out.extra_valid is not None else torch.full((out.keep.shape[0],), e)
            return out

        step.plan = recording
    for step in pipeline.llm:  # a method's own renumbering (pyramiddrop's default) would win over keep
        step.positions = lambda: None
    with tokprune.patch(model, pipeline, question_end=question_end, vision_positions="keep") as run:
        hooks = [lm.layers[k].register_forward_pre_hook(hook_for(k), with_kwargs=True) for k in {0, *layers}]
        try:
            with torch.no_grad():
                model(**inputs, position_ids=_positions(inputs))
        finally:
            for h in hooks:
                h.remove()
    run.stats.extras = extras
    return run.stats, seen


def _token_of_position(inputs, image_id, counts):
    """Per sample: position id -> (image, token) of each placeholder (images fill them in order)."""
    image = inputs["input_ids"] == image_id
    slots = token_slots(image, counts, int(counts.max()))
    pos = _positions(inputs).flatten()
    n = inputs["input_ids"].shape[1]
    out = [dict() for _ in range(image.shape[0])]
    for i in range(slots.shape[0]):
        for j in range(int(counts[i])):
            flat = int(slots[i, j])
            out[flat // n][int(pos[flat])] = (i, j)
    return out


def _rows_received(hidden_pos, valid_counts, lookup, extras):
    """The (image, token, row hidden) each sample's valid rows hold, extra tokens (the last ``extras[i]`` rows
    of image ``i``'s block, sharing its last position) set aside."""
    hidden, pos = hidden_pos
    found = []
    for b in range(hidden.shape[0]):
        width = hidden.shape[1]
        rows = range(width - int(valid_counts[b]), width)
        per_image: dict[int, list] = {}
        for r in rows:
            hit = lookup[b].get(int(pos[b, r]))
            if hit is not None:
                per_image.setdefault(hit[0], []).append((hit[1], hidden[b, r]))
        for i, items in per_image.items():
            e = int(extras[i]) if i < extras.numel() else 0
            for j, row in items[: len(items) - e]:
                found.append((i, j, row))
    return found


def _mask(found, shape):
    m = torch.zeros(shape, dtype=torch.bool)
    for i, j, _ in found:
        assert not m[i, j], f"image {i} token {j} received twice"
        m[i, j] = True
    return m


def check_against_model(kept: KeptMap, stats, seen, lookup, spec, stock):
    """The kept map equals the rows each stage's first layer received (the acceptance check)."""
    extras = stats.extras
    found = _rows_received(seen[0], stats.layer_tokens[:, 0], lookup, extras)
    received = _mask(found, kept.vision.shape)
    assert torch.equal(kept.vision, received), f"{spec}: vision-stage kept map != the rows layer 0 received"
    if not (MERGING & {_name(s) for s in spec.split("+")}):
        for i, j, row in found:  # the gathered feature of exactly that patch
            assert torch.allclose(row, stock[i][j], atol=1e-5), f"{spec}: row of image {i} token {j} is another feature"
    for k in kept.cut_layers:
        found_k = _rows_received(seen[k], stats.layer_tokens[:, k], lookup, extras)
        assert torch.equal(kept.layers[k], _mask(found_k, kept.vision.shape)), f"{spec}: kept map at layer {k} != rows"


def _specs():
    # every registered strategy; the reference pipeline; CLS-free settings the Qwen tower (no CLS) runs
    return [
        *contract_specs(),
        "cls_knee+text_interact",
        "cdpruner(relevance=uniform)+dart(layer=2, merge=true)",
        "none",
    ]


def _run_family(family, spec):
    case = tiny_case(ADAPTERS[family])
    inputs = case.make_inputs(LENGTHS)
    pipeline = tokprune.strategies.get(spec)
    try:
        tokprune.patch(case.model, pipeline, question_end=case.question_end).remove()
    except (MissingCapabilityError, StrategyParamError):
        pytest.skip(f"{family} refuses {spec}")
    stats, seen = _received(case.model, inputs, pipeline, case.question_end, pipeline.llm_layers)
    stock = _stock_features(case.model, inputs)
    counts = torch.tensor([f.shape[0] for f in stock])
    lookup = _token_of_position(inputs, case.model.config.image_token_id, counts)
    return case, inputs, stats, seen, lookup, stock


@pytest.mark.parametrize("spec", _specs())
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_map_is_what_the_llm_received(family, spec):
    case, inputs, stats, seen, lookup, stock = _run_family(family, spec)
    kept = stats.kept
    assert kept is not None and kept.cells is not None
    check_against_model(kept, stats, seen, lookup, spec, stock)
    assert torch.equal(kept.tokens, torch.tensor([f.shape[0] for f in stock]))
    _check_cells(family, case, inputs, kept)
    if spec == "none":  # keep-all maps every patch
        assert torch.equal(kept.kept(), kept.patches())
        for i in range(kept.num_images):
            pos = kept.positions(i)
            assert pos.shape[0] == int(kept.patches()[i].sum())
            assert len({tuple(p) for p in pos.tolist()}) == pos.shape[0], "two patches on one cell"


def _check_cells(family, case, inputs, kept):
    if family == "llava":
        side = case.model.config.vision_config.image_size // case.model.config.vision_config.patch_size
        j = torch.arange(side * side)
        assert torch.equal(kept.cells[:, :, 2:], torch.stack([j // side, j % side], -1).expand(kept.num_images, -1, -1))
    elif family.startswith("qwen"):
        _check_qwen_cells(case, inputs, kept)
    else:
        _check_next_cells(case, inputs, kept)


def _check_qwen_cells(case, inputs, kept):
    """Row and column are the M-RoPE height and width positions the model itself gives each image token."""
    inner = case.model.model
    rope = mrope_index(
        inner, inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs["attention_mask"]
    )  # [B, n, 3]
    image = inputs["input_ids"] == case.model.config.image_token_id
    for b in range(image.shape[0]):
        hw = rope[b][image[b]][:, 1:]
        expect = hw - hw.min(dim=0).values
        assert torch.equal(kept.cells[b, : hw.shape[0], 2:], expect), f"image {b}: cells != M-RoPE positions"


def _check_next_cells(case, inputs, kept):
    """Tile tokens: (tile row * side + row in tile, tile col * side + col in tile) on the tile grid HF's
    ``get_anyres_image_grid_shape`` gives, less the unpadded offset; the packing run on coordinates."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    config = case.model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    n = side * side
    sizes = inputs["image_sizes"]
    tiles = anyres_tiles(config, sizes)
    for i, size in enumerate(sizes):
        rows, cols = get_anyres_image_grid_shape(
            size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size
        )
        t = torch.arange(tiles[i])[:, None].expand(-1, n)
        r, c = torch.arange(n)[None, :] // side, torch.arange(n)[None, :] % side
        gy = torch.where(t > 0, (t - 1) // cols * side + r, r)
        gx = torch.where(t > 0, (t - 1) % cols * side + c, c)
        coords = torch.stack([t, gy, gx], -1).double()  # [tiles, n, 3]: the packing moves them as features
        packed, _ = case.model.model.pack_image_features(
            [coords], size[None], vision_feature_select_strategy="default", image_newline=torch.full((3,), -1.0)
        )
        packed = packed[0].round().long()
        tile_tokens = packed[:, 0] > 0
        off = packed[tile_tokens][:, 1:].min(dim=0).values
        expect = torch.where(tile_tokens[:, None], packed[:, 1:] - off, packed[:, 1:])
        newline = packed[:, 0] < 0
        got = kept.cells[i, : packed.shape[0]]
        assert torch.equal(got[~newline][:, 0], packed[~newline][:, 0]), f"image {i}: tiles differ"
        assert torch.equal(got[~newline][:, 2:], expect[~newline]), f"image {i}: cells != the tile grid"
        assert bool((got[newline] == -1).all()), "newlines are no patch"
        assert rows * cols + 1 == tiles[i]


# -- the checks reject wrong kept maps ------------------------------------------------------------------


WRONG = {
    "shifted": lambda k: replace(k, vision=k.vision.roll(1, dims=1)),
    "stale layers": lambda k: replace(k, layers={q: k.vision for q in k.layers}),
    "other image": lambda k: replace(k, vision=k.vision.roll(1, dims=0)),
}


@pytest.mark.parametrize("wrong", list(WRONG), ids=list(WRONG))
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_the_check_rejects_wrong_kept_maps(family, wrong):
    spec = "divprune(keep=5)+fastv(layer=2, keep=3)"
    case, inputs, stats, seen, lookup, stock = _run_family(family, spec)
    check_against_model(stats.kept, stats, seen, lookup, spec, stock)  # the right one passes
    with pytest.raises(AssertionError):
        check_against_model(WRONG[wrong](stats.kept), stats, seen, lookup, spec, stock)


def test_the_cell_checks_reject_transposed_cells():
    for family in ("qwen2_5_vl", "llava_next"):
        case, inputs, stats, *_ = _run_family(family, "none")
        kept = stats.kept
        swapped = replace(kept, cells=kept.cells[..., [0, 1, 3, 2]])
        with pytest.raises(AssertionError):
            _check_cells(family, case, inputs, swapped)


# -- the embedded model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    from tokprune import viz
    from tokprune.data import world

    model, processor = viz.load_model(None)
    samples = world.benchmark("test", n=3)
    inputs = viz.model_inputs(model, processor, [s.image for s in samples], [s.question for s in samples])
    return model, processor, inputs


@pytest.mark.parametrize("spec", _specs())
def test_kept_map_on_the_embedded_model(embedded, spec):
    model, processor, inputs = embedded
    pipeline = tokprune.strategies.get(spec)
    try:
        tokprune.patch(model, pipeline, question_end=processor.tokenizer).remove()
    except (MissingCapabilityError, StrategyParamError):
        pytest.skip(f"the embedded model refuses {spec}")
    stats, seen = _received(model, inputs, pipeline, processor.tokenizer, pipeline.llm_layers)
    stock = _stock_features(model, inputs)
    lookup = _token_of_position(inputs, model.config.image_token_id, torch.tensor([f.shape[0] for f in stock]))
    check_against_model(stats.kept, stats, seen, lookup, spec, stock)
    assert stats.kept.cells.shape == (3, 144, 4)
    if spec == "none":
        assert torch.equal(stats.kept.kept(), torch.ones(3, 144, dtype=torch.bool))


# -- the pure helpers -----------------------------------------------------------------------------------


def test_images_of_different_sizes_each_get_their_own_grid():
    cells = thw_cells(torch.tensor([[1, 4, 6], [1, 8, 4]]), merge=2)
    assert cells.shape == (2, 8, 4)
    assert cells[0, :6, 2:].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert (cells[0, 6:] == -1).all()
    assert cells[1, :, 2:].tolist() == [[r, c] for r in range(4) for c in range(2)]


def test_anyres_cells_read_rows_from_newlines():
    # base 2x2 (n=4, side=2), then one unpadded row of two tiles side by side: 4 tokens and a newline
    layout = [torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, -1])]
    cells = anyres_cells(layout, tokens_per_tile=4, side=2)[0]
    assert cells[:4, 2:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert cells[4:8].tolist() == [[1, 0, 0, 0], [1, 0, 0, 1], [2, 0, 0, 2], [2, 0, 0, 3]]
    assert cells[8].tolist() == [-1, -1, -1, -1]


def test_stats_carry_no_features():
    case = tiny_case(ADAPTERS["llava"])
    with tokprune.patch(case.model, "divprune(keep=4)", question_end=case.question_end) as run, torch.no_grad():
        case.model(**case.make_inputs(LENGTHS))
    kept = run.stats.kept
    tensors = [kept.vision, kept.cells, kept.tokens, kept.image_sample]
    assert all(t.dtype in (torch.bool, torch.long) and t.device.type == "cpu" for t in tensors)
    assert kept.to_records(0)[0]["vision"] == kept.positions(0).tolist()


# -- merges ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_in_llm_merges_fold_every_dropped_image_patch_into_a_kept_one(family):
    case = tiny_case(ADAPTERS[family])
    spec = "random(keep=5)+dart(layer=2, keep=2, merge=true)"
    with tokprune.patch(case.model, spec, question_end=case.question_end) as run, torch.no_grad():
        case.model(**case.make_inputs(LENGTHS))
    kept, diagnostics = run.stats.kept, run.stats.diagnostics
    merges = kept.merges["llm@2"]
    assert "dart.merge_target" not in diagnostics  # moved into the map, not left in the records
    sources = torch.zeros_like(kept.vision)
    sources[merges[:, 0], merges[:, 1]] = True
    assert torch.equal(sources, kept.kept() & ~kept.kept(2)), "every dropped patch merges once, nothing else"
    assert bool(kept.kept(2)[merges[:, 2], merges[:, 3]].all()), "merge targets are kept tokens"
    assert torch.equal(merges[:, 0], merges[:, 2]), "one image per sample: targets are in the source's image"


def test_prumerge_merges_are_each_kept_tokens_neighbours():
    case = tiny_case(ADAPTERS["llava"])
    with tokprune.patch(case.model, "prumerge(min_keep=4)", question_end=case.question_end) as run, torch.no_grad():
        case.model(**case.make_inputs(LENGTHS))
    kept = run.stats.kept
    merges = kept.merges["vision"]
    targets = torch.zeros_like(kept.vision)
    targets[merges[:, 2], merges[:, 3]] = True
    assert torch.equal(targets, kept.kept()), "every kept token absorbs neighbours, and only kept ones do"
    per_target = torch.zeros_like(kept.vision, dtype=torch.long).index_put_(
        (merges[:, 2], merges[:, 3]), torch.ones(merges.shape[0], dtype=torch.long), accumulate=True
    )
    assert bool((per_target[kept.kept()] == min(32, kept.vision.shape[1] - 1)).all())
    assert bool((merges[:, 1] != merges[:, 3]).all()), "a token is not its own neighbour"


# -- call forms -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["none", "random(keep=3)+fastv(layer=2, keep=2)"])
@pytest.mark.parametrize("family", list(ADAPTERS))
def test_generate_records_the_same_kept_map_as_forward(family, spec):
    """generate() encodes the images before its first forward and passes some keywords (image sizes, grids)
    on as None: the map (cells included) is still the forward's."""
    case = tiny_case(ADAPTERS[family])
    inputs = case.make_inputs(LENGTHS)
    with tokprune.patch(case.model, spec, question_end=case.question_end) as run, torch.no_grad():
        case.model(**inputs)
        forward = run.stats.kept
        case.model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=case.pad_token_id)
    generated = run.stats.kept
    assert forward.cells is not None and torch.equal(generated.cells, forward.cells)
    assert torch.equal(generated.vision, forward.vision)
    assert generated.layers.keys() == forward.layers.keys()
    assert all(torch.equal(generated.layers[k], forward.layers[k]) for k in forward.layers)
