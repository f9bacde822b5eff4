"""``downsample``: the pooled grid's shape, area pooling against independent computations, kept positions,
batch == solo, and the refusals where a context has no grid."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokprune_strategies.downsample import area_pool, area_weights, cell_centres, pooled_grid

import tokprune
from tokprune import VisionContext, VisionSignals, strategies
from tokprune.errors import MissingCapabilityError


def ctx_of(features, grid, lengths=None):
    def fetch(signal):  # downsample reads no encoder signal
        raise AssertionError(f"downsample read {signal}")

    signals = VisionSignals(fetch, num_layers=2, num_heads=1, declared=frozenset())
    return VisionContext(features=features, signals=signals, grid=grid, lengths=lengths)


def plan_of(spec, features, grid):
    step = strategies.get(spec)[0]
    return step(ctx_of(features, grid))


@pytest.mark.parametrize(
    ("rows", "cols", "count", "expected"),
    [
        (24, 24, 144, [12] * 12),  # LLaVA-1.5: 576 -> 144, the 12 x 12 grid
        (24, 24, 576, [24] * 24),  # the whole budget: the identity
        (12, 12, 20, [5] * 4),
        (12, 12, 72, [9] * 8),
        (12, 12, 40, [6, 7, 7, 6, 7, 7]),  # no 40-cell grid of square proportions: rows of 6 and 7, exactly 40
        (12, 12, 10, [3, 3, 4]),
        (12, 12, 143, [11] + [12] * 11),
        (6, 12, 18, [6] * 3),  # proportions kept on a wide grid
        (1, 5, 3, [3]),
        (24, 1, 2, [1, 1]),  # rows capped by the count
        (2, 3, 5, [2, 3]),  # at least ceil(count / cols) rows: no row wider than the grid
        (3, 3, 1, [1]),
    ],
)
def test_pooled_grid(rows, cols, count, expected):
    per_row = pooled_grid(rows, cols, count)
    assert per_row.tolist() == expected
    assert per_row.sum() == count and len(expected) <= rows and max(expected) <= cols


@pytest.mark.parametrize("bad", [(4, 4, 0), (4, 4, 17), (0, 4, 1)])
def test_pooled_grid_rejects_impossible_counts(bad):
    with pytest.raises(ValueError, match=rf"got {bad[0]}, {bad[1]}, {bad[2]}"):
        pooled_grid(*bad)


@pytest.mark.parametrize(("rows", "cols", "count"), [(12, 12, 40), (12, 12, 10), (24, 24, 144), (5, 7, 11), (3, 3, 9)])
def test_area_weights_cover_each_patch_once(rows, cols, count):
    per_row = pooled_grid(rows, cols, count)
    w = area_weights(rows, cols, per_row).double()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(count, dtype=torch.float64))  # a mean per output cell
    # Every patch is shared out completely: its weights times the cells' areas sum to its own area.
    areas = (rows / per_row.numel()) * (cols / per_row.double()).repeat_interleave(per_row)
    torch.testing.assert_close(areas @ w, torch.ones(rows * cols, dtype=torch.float64))


def pool(feats, grid, count):
    return area_pool(feats, area_weights(*grid, pooled_grid(*grid, count)))


@pytest.mark.parametrize(
    ("grid", "count", "out"),
    [((12, 12), 36, (6, 6)), ((12, 12), 12, (3, 4)), ((24, 24), 144, (12, 12)), ((6, 4), 6, (3, 2))],
)
def test_area_pool_equals_adaptive_avg_pool_on_grids_that_divide(grid, count, out):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, grid[0] * grid[1], 8, generator=g)
    image = feats.transpose(1, 2).reshape(3, 8, *grid)  # [B, C, rows, cols]
    expected = F.adaptive_avg_pool2d(image, out).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool(feats, grid, count), expected, rtol=1e-5, atol=1e-6)


def box_downsample(feats, grid, per_row):
    """The area means another way, row by row: upsample the grid (nearest) until every cell boundary falls
    on a pixel edge, then average each cell's block of pixels."""
    rows, cols = grid
    r = len(per_row)
    b, _, ch = feats.shape
    image = feats.double().transpose(1, 2).reshape(b, ch, rows, cols)
    out = []
    for i, c in enumerate(per_row):
        fine = image.repeat_interleave(r, dim=2).repeat_interleave(c, dim=3)  # [B, C, rows*r, cols*c]
        band = fine[:, :, i * rows : (i + 1) * rows]  # row i of the layout: rows/r of the image, scaled by r
        out.append(F.avg_pool2d(band, kernel_size=(rows, cols)).flatten(2))  # [B, C, c]
    return torch.cat(out, dim=2).transpose(1, 2)


@pytest.mark.parametrize(
    ("grid", "count"), [((12, 12), 25), ((12, 12), 42), ((12, 12), 40), ((12, 12), 10), ((5, 7), 11)]
)
def test_area_pool_equals_a_box_filter_on_grids_that_do_not_divide(grid, count):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, grid[0] * grid[1], 5, generator=g)
    per_row = pooled_grid(*grid, count).tolist()
    expected = box_downsample(feats, grid, per_row).float()
    torch.testing.assert_close(pool(feats, grid, count), expected, rtol=1e-5, atol=1e-6)
    if len(set(per_row)) == 1:  # a regular grid: adaptive_avg_pool2d's overlapping bins are not area means
        image = feats.transpose(1, 2).reshape(2, 5, *grid)
        overlapping = F.adaptive_avg_pool2d(image, (len(per_row), per_row[0])).flatten(2).transpose(1, 2)
        assert not torch.allclose(overlapping, expected, atol=1e-3)


def test_plan_keeps_the_cell_centres_with_the_pooled_features():
    feats = torch.randn(2, 144, 4, generator=torch.Generator().manual_seed(2))
    plan = plan_of("downsample(keep=42)", feats, (12, 12))  # 6 x 7
    at = cell_centres(12, 12, pooled_grid(12, 12, 42))
    rows, cols = [1, 3, 5, 7, 9, 11], [0, 2, 4, 6, 7, 9, 11]  # floor((2i + 1) * 12 / 12), floor((2j + 1) * 12 / 14)
    assert at.tolist() == [r * 12 + c for r in rows for c in cols]
    expected_keep = torch.zeros(2, 144, dtype=torch.bool)
    expected_keep[:, at] = True
    assert torch.equal(plan.keep, expected_keep)
    assert plan.diagnostics["keep_count"].tolist() == [42, 42]
    pooled = box_downsample(feats, (12, 12), [7] * 6).float()
    torch.testing.assert_close(plan.features[plan.keep].view(2, 42, 4), pooled)
    # A wrong placement (each cell's top-left patch) keeps other positions: the layout check above catches it.
    top_left = [r * 12 + c for r in [0, 2, 4, 6, 8, 10] for c in [0, 1, 3, 5, 6, 8, 10]]
    assert top_left != at.tolist()


def test_keep_ratio_and_the_identity():
    feats = torch.randn(1, 64, 3, generator=torch.Generator().manual_seed(3))
    plan = plan_of("downsample(keep_ratio=0.25)", feats, (8, 8))  # 16 of 64: 4 x 4, each the mean of 2 x 2
    assert plan.diagnostics["keep_count"].tolist() == [16]
    expected = F.avg_pool2d(feats.transpose(1, 2).reshape(1, 3, 8, 8), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(plan.features[plan.keep].view(1, 16, 3), expected)
    whole = plan_of("downsample(keep_ratio=1.0)", feats, (8, 8))
    assert whole.keep.all() and torch.equal(whole.features, feats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_equals_solo(dtype):
    feats = torch.randn(5, 144, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    batch = plan_of("downsample(keep=20)", feats, (12, 12))
    for i in range(5):
        solo = plan_of("downsample(keep=20)", feats[i : i + 1], (12, 12))
        assert torch.equal(batch.keep[i : i + 1], solo.keep)
        torch.testing.assert_close(batch.features[i : i + 1], solo.features, rtol=0, atol=0)


def test_refuses_a_context_without_one_grid():
    feats = torch.randn(2, 10, 4)
    with pytest.raises(MissingCapabilityError, match=r"has none \(grid=None, 10 patches\).*random, topk or divprune"):
        strategies.get("downsample(keep=4)")[0](ctx_of(feats, None))


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_families_without_one_grid_per_image_refuse_it_at_patch(family):
    from tokprune.adapters.llava_next import LlavaNextAdapter
    from tokprune.adapters.qwen2_5_vl import Qwen2_5_VLAdapter

    case = {"llava_next": LlavaNextAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter}[family].tiny()
    with pytest.raises(
        MissingCapabilityError,
        match=rf"^downsample\(keep=4\) cuts images of one fixed size, but {family} images differ",
    ):
        tokprune.patch(case.model, "downsample(keep=4)", question_end=case.question_end)


def test_runs_on_tiny_llava_with_the_pooled_tokens():
    from tokprune.adapters.llava import LlavaAdapter

    case = LlavaAdapter.tiny()
    inputs = case.make_inputs([5, 7])
    with tokprune.patch(case.model, "downsample(keep=4)", question_end=case.question_end) as run:
        with torch.no_grad():
            case.model(**inputs)
    assert run.stats is not None and run.stats.visual_kept.tolist() == [4, 4]
