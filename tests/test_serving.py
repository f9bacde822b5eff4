"""tokprune.serving: which specs a server runs, the counts it announces, and running them (no vLLM needed).

Registry-driven: every servable strategy (``servable_strategies``) keeps exactly the count the server
announced before encoding, alone and in a batch of images of different sizes, on a real CLIP tower's
signals. Wrong implementations (a strategy keeping another count, one adding extra tokens) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from tokprune import PruningStrategy, Stage, VisionContext, VisionPlan, VisionSignals, param
from tokprune.errors import StrategyContractError
from tokprune.registry import available, describe, get
from tokprune.serving import ServingPlan, ServingSpecError, servable_strategies, serving_plan
from tokprune.testing.models import clip_context, run_clip, tiny_clip

# (spec, tower, fragments the error must contain)
REFUSED = [
    ("cls_kne", "cls", ["unknown strategy 'cls_kne'", "Did you mean 'cls_knee'", "topk"]),
    ("topk(keep_ratio=2)", "cls", ["keep_ratio", "topk"]),
    ("topk(nope=1)", "cls", ["nope", "topk"]),
    ("topk(", "cls", ["topk("]),
    ("fastv", "cls", ["fastv", "stage=llm", "topk"]),
    ("topk+fastv", "cls", ["fastv", "stage=llm"]),
    ("cls_knee", "cls", ["cls_knee", "before the image is encoded", "topk"]),
    ("prumerge", "cls", ["prumerge", "fixed budget"]),
    ("topk(keep=4)", "none", ["CLS", "divprune"]),
]


@pytest.mark.parametrize(("spec", "tower", "fragments"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_specs_name_the_bad_value_and_what_works(spec, tower, fragments):
    with pytest.raises(ServingSpecError) as info:
        serving_plan(spec, tower, "the test family")
    assert isinstance(info.value, ValueError)  # servers answer it as a bad request
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("spec", [None, "", "none", " none "])
def test_no_spec_is_no_pruning(spec):
    plan = serving_plan(spec)
    assert not plan.prunes and plan.spec == "none"
    assert plan.kept_counts(torch.tensor([5, 9])).tolist() == [5, 9]


def test_servable_strategies_are_the_fixed_budget_vision_ones():
    cls_tower, no_cls = servable_strategies("cls"), servable_strategies("none")
    assert {"topk", "random", "divprune"} <= set(cls_tower)
    assert set(no_cls) <= set(cls_tower) and "topk" not in no_cls and "divprune" in no_cls
    for name in cls_tower:
        info = describe(name)
        assert info.stage is Stage.VISION and {"keep", "keep_ratio"} <= {p.name for p in info.params}
    adaptive = set(available(stage="vision")) - set(cls_tower)
    assert {"cls_knee", "prumerge"} <= adaptive


def test_plan_is_canonical_and_cached():
    a, b = serving_plan("divprune(keep=3)", "none"), serving_plan("divprune(keep=3)", "none")
    assert a is b and a.spec == str(get("divprune(keep=3)"))  # the registry's canonical spec, every default named
    assert a.spec.startswith("divprune(keep=3,") and serving_plan(a.spec, "none").spec == a.spec


@pytest.fixture(scope="module")
def clip():
    model = tiny_clip(seed=3, layers=4, heads=2, width=32, grid=4)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return run_clip(model, pixels)


@pytest.mark.parametrize("name", servable_strategies("cls"))
@pytest.mark.parametrize("budget", [{"keep": 5}, {"keep_ratio": 0.4}, {"keep": 99}])
def test_every_servable_strategy_keeps_the_announced_count(name, budget, clip):
    outputs, captured = clip
    args = ", ".join(f"{k}={v}" for k, v in budget.items())
    plan = serving_plan(f"{name}({args})", "cls")
    ctx = clip_context(plan.step, outputs, captured)

    def signals(lengths: torch.Tensor) -> VisionSignals:
        return ctx.signals

    keeps = plan.select(list(ctx.features), signals, grid=ctx.grid)
    announced = plan.kept_counts(torch.full((3,), 16))
    assert [int(k.sum()) for k in keeps] == announced.tolist()
    # the count needs no image: what the server sized the prompt with
    assert plan.kept_count(16) == int(announced[0])
    # the same keep masks as the strategy object run directly (no second implementation)
    direct = plan.step(ctx)
    assert torch.equal(torch.stack(keeps), direct.keep)


@pytest.mark.parametrize("name", servable_strategies("none"))
def test_ragged_images_keep_their_own_counts_and_match_solo(name):
    gen = torch.Generator().manual_seed(1)
    features = [torch.randn(n, 8, generator=gen) for n in (16, 9, 4)]
    plan = serving_plan(f"{name}(keep_ratio=0.5)", "none")
    together = plan.select(features)
    assert [int(k.sum()) for k in together] == plan.kept_counts(torch.tensor([16, 9, 4])).tolist()
    for feature, keep in zip(features, together):
        (solo,) = plan.select([feature])
        assert torch.equal(solo, keep)  # batch == solo


@dataclass(frozen=True)
class _Budget:
    keep: int | None = param(None, "kept", ge=1)
    keep_ratio: float = param(0.5, "ratio", gt=0, le=1)


class _KeepsOneMore(PruningStrategy):
    """Wrong on purpose: keeps one token more than its budget."""

    name = "keeps_one_more"
    stage = Stage.VISION
    ragged_vision = True
    Params = _Budget

    def plan(self, ctx: VisionContext) -> VisionPlan:
        keep = torch.zeros(ctx.features.shape[:2], dtype=torch.bool)
        keep[:, : int(ctx.num_patches * self.params.keep_ratio) + 1] = True
        return VisionPlan(keep=keep & ctx.token_valid)


class _AddsExtra(_KeepsOneMore):
    """Wrong on purpose: keeps its budget but appends a token the server never planned."""

    name = "adds_extra"

    def plan(self, ctx: VisionContext) -> VisionPlan:
        keep = torch.zeros(ctx.features.shape[:2], dtype=torch.bool)
        keep[:, : round(ctx.num_patches * self.params.keep_ratio)] = True
        return VisionPlan(keep=keep, extra=ctx.features[:, :1])


@pytest.mark.parametrize("wrong", [_KeepsOneMore, _AddsExtra])
def test_a_plan_off_its_announced_budget_is_refused(wrong):
    plan = ServingPlan("wrong", wrong())
    with pytest.raises(StrategyContractError):
        plan.select([torch.randn(8, 4)])


def _projector(width: int = 32, out: int = 24) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(5)
    mlp = torch.nn.Sequential(torch.nn.Linear(width, out), torch.nn.GELU(), torch.nn.Linear(out, out))
    for w in mlp.parameters():
        w.data = torch.randn(w.shape, generator=gen)
    return mlp


# budgets at which forgetting the projector changes the kept set on this tower (cdpruner: at keep=7)
@pytest.mark.parametrize("spec", ["divprune(keep=5)", "cdpruner(keep=7)"])
def test_select_runs_on_the_projected_tokens_as_the_adapter_does(spec, clip):
    """The family's projector reaches the strategy (``VisionContext.project``): the keep masks equal the
    strategy on the adapter's context with the projector; a server that forgot it selects as
    ``features=encoder`` does, which differs here (so the equality above would catch it)."""
    outputs, captured = clip
    plan = serving_plan(spec, "cls")
    ctx = clip_context(plan.step, outputs, captured)
    project = _projector(ctx.features.shape[-1])
    with torch.no_grad():
        got = torch.stack(plan.select(list(ctx.features), lambda _: ctx.signals, ctx.grid, project=project))
        want = plan.step(replace(ctx, project=project)).keep
        forgot = torch.stack(plan.select(list(ctx.features), lambda _: ctx.signals, ctx.grid))
    assert torch.equal(got, want)
    encoder = serving_plan(spec.replace(")", ", features=encoder)"), "cls")
    assert torch.equal(forgot, torch.stack(encoder.select(list(ctx.features), lambda _: ctx.signals, ctx.grid)))
    assert not torch.equal(got, forgot)


def test_cdpruner_default_runs_its_named_stand_in_on_a_server(clip, caplog):
    """No CLIP text tower in a server: ``relevance=text`` (the default) runs the CLS-attention stand-in, as
    ``tokprune.patch`` without ``text_encoder`` does, and says so once per spec."""
    outputs, captured = clip
    serving_plan.cache_clear()
    with caplog.at_level("WARNING", logger="tokprune.serving"):
        plan = serving_plan("cdpruner(keep=5)", "cls")
        serving_plan("cdpruner(keep=5)", "cls")
    assert plan.stand_in() == "CLS attention at layer -2"
    (record,) = [r for r in caplog.records if r.name == "tokprune.serving"]
    assert "cdpruner" in record.getMessage() and "stand-in runs (CLS attention at layer -2)" in record.getMessage()
    ctx = clip_context(plan.step, outputs, captured)
    as_cls = serving_plan("cdpruner(keep=5, relevance=cls)", "cls")
    assert as_cls.stand_in() is None and serving_plan("divprune(keep=5)", "cls").stand_in() is None
    got = plan.select(list(ctx.features), lambda _: ctx.signals, ctx.grid)
    want = as_cls.select(list(ctx.features), lambda _: ctx.signals, ctx.grid)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert plan.step(ctx).diagnostics["relevance_source"] == "cls"


# -- videos (Qwen2.5-VL's server path): temporal steps with a count known before encoding ---------------


VIDEO_REFUSED = [
    ("evs(keep_ratio=0.5)", False, ["evs", "prunes no video", "divprune"]),
    ("vidcom2(keep_ratio=0.5)", True, ["features decide", "keep=", "reconcile=true", "evs"]),
    ("vidcom2", False, ["prunes no video"]),
]


@pytest.mark.parametrize(("spec", "video", "fragments"), VIDEO_REFUSED, ids=[f"{r[0]}-{r[1]}" for r in VIDEO_REFUSED])
def test_temporal_specs_are_refused_where_the_count_is_unknown_or_there_is_no_video(spec, video, fragments):
    with pytest.raises(ServingSpecError) as info:
        serving_plan(spec, "none", "the test family", video)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_temporal_steps_prune_videos_only():
    listed = servable_strategies("none", video=True)
    assert {"evs", "vidcom2(keep=)", "divprune"} <= set(listed) and "evs" not in servable_strategies("none")
    plan = serving_plan("evs(keep_ratio=0.5)", "none", "the test family", True)
    assert plan.prunes and not plan.prunes_images
    assert plan.kept_counts(torch.tensor([16])).tolist() == [16]  # an image passes whole


def _videos(seed: int):
    """Three videos of (frames, rows, cols) merged tokens: features ``[t*r*c, 8]`` and their layout."""
    from tokprune import FrameLayout

    shapes = [(4, 2, 4), (2, 3, 3), (1, 2, 2)]
    gen = torch.Generator().manual_seed(seed)
    features = [torch.randn(t * r * c, 8, generator=gen) for t, r, c in shapes]
    frames = FrameLayout(torch.tensor([s[0] for s in shapes]), torch.tensor([s[1:] for s in shapes]))
    return features, frames


VIDEO_SPECS = ["evs(keep_ratio=0.5)", "evs(keep=7)", "vidcom2(keep=7)", "vidcom2(keep_ratio=0.3, reconcile=true)",
               "divprune(keep_ratio=0.5)"]


@pytest.mark.parametrize("spec", VIDEO_SPECS)
def test_videos_keep_the_announced_count_and_batch_equals_solo(spec):
    from tokprune import FrameLayout

    features, frames = _videos(2)
    plan = serving_plan(spec, "none", "the test family", True)
    tokens = torch.tensor([f.shape[0] for f in features])
    together = plan.select(features, frames=frames)
    assert [int(k.sum()) for k in together] == plan.video_kept_counts(tokens, frames).tolist()
    for i, (feature, keep) in enumerate(zip(features, together)):
        one = FrameLayout(frames.counts[i : i + 1], frames.grid[i : i + 1])
        (solo,) = plan.select([feature], frames=one)
        assert torch.equal(solo, keep)


# -- budget scope: per video (the default) or per frame, as tokprune.patch(..., budget_scope=...) ----------


@pytest.mark.parametrize(
    ("spec", "scope", "video", "fragments"),
    [
        ("divprune(keep=4)", "tile", True, ["'tile'", "'image'", "'frame'"]),
        ("divprune(keep=4)", "frame", False, ["'frame'", "prunes no video", "valid here: image"]),
        ("evs(keep_ratio=0.5)", "frame", True, ["evs", "across the frames", "budget scope 'image'"]),
    ],
    ids=["unknown", "no-video", "temporal"],
)
def test_a_budget_scope_the_server_cannot_run_is_refused_naming_what_works(spec, scope, video, fragments):
    with pytest.raises(ServingSpecError) as caught:
        serving_plan(spec, "none", "Qwen2.5-VL", video, scope)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


def test_a_frame_budget_counts_per_frame_and_an_image_is_one_frame():
    from tokprune import FrameLayout

    frames = FrameLayout(torch.tensor([4, 1]), torch.tensor([[2, 4], [3, 3]]))  # a video of 4 x 8, an image of 9
    tokens = torch.tensor([32, 9])
    per_frame = serving_plan("divprune(keep_ratio=0.5)", "none", "Qwen2.5-VL", True, "frame")
    per_video = serving_plan("divprune(keep_ratio=0.5)", "none", "Qwen2.5-VL", True)
    assert per_frame.video_kept_counts(tokens, frames).tolist() == [16, 5]  # 8 * 0.5 per frame x 4; 4.5 up
    assert per_video.video_kept_counts(tokens, frames).tolist() == [16, 5]
    fixed = serving_plan("divprune(keep=3)", "none", "Qwen2.5-VL", True, "frame")
    assert fixed.video_kept_counts(tokens, frames).tolist() == [12, 3]  # 3 per frame, not 3 per video
    assert serving_plan("divprune(keep=3)", "none", "Qwen2.5-VL", True).video_kept_counts(tokens, frames).tolist() == [3, 3]
    assert serving_plan(None, "none", "Qwen2.5-VL", True, "frame").scope == "frame"  # no pruning: any scope


# -- families pruning videos per frame only (Qwen3-VL: the engine sizes each frame's run before encoding) ---


def test_a_frame_only_family_refuses_temporal_steps_and_a_budget_per_video_naming_what_works():
    assert servable_strategies("none", video="frame") == [s for s in servable_strategies("none") if "(" not in s]
    with pytest.raises(ServingSpecError) as caught:
        serving_plan("evs(keep=10)", "none", "Qwen3-VL", "frame", "frame")
    for fragment in ("evs(keep=10)", "per frame only", "budget scope 'frame'", "divprune"):
        assert fragment in str(caught.value), str(caught.value)
    per_video = serving_plan("divprune(keep=6)", "none", "Qwen3-VL", "frame")  # images: pruned as asked
    assert per_video.kept_count(16) == 6
    with pytest.raises(ServingSpecError) as caught:
        per_video.check_video("frame", "Qwen3-VL", "divprune(keep=6)")
    for fragment in ("'divprune(keep=6)'", "whole video", "Qwen3-VL", "'tokprune_budget_scope': 'frame'", "'none'"):
        assert fragment in str(caught.value), str(caught.value)
    serving_plan("divprune(keep=6)", "none", "Qwen3-VL", "frame", "frame").check_video("frame", "Qwen3-VL")
    serving_plan(None, "none", "Qwen3-VL", "frame").check_video("frame", "Qwen3-VL")  # no pruning: any video
    per_video.check_video(True, "Qwen2.5-VL")  # a family pruning whole videos takes it


def test_frame_kept_count_is_the_per_frame_budget():
    assert serving_plan("divprune(keep=3)", "none", "Qwen3-VL", "frame", "frame").frame_kept_count(8) == 3
    assert serving_plan("divprune(keep=30)", "none", "Qwen3-VL", "frame", "frame").frame_kept_count(8) == 8
    assert serving_plan("divprune(keep_ratio=0.3)", "none", "Qwen3-VL", "frame", "frame").frame_kept_count(8) == 2
    assert serving_plan(None, "none", "Qwen3-VL", "frame", "frame").frame_kept_count(8) == 8


def test_every_vllm_piece_the_plugin_imports_is_in_pieces():
    """The plugin's vLLM imports (its module and every family's) are all in ``PIECES``, the list checked at
    engine start on an untested vLLM: a piece imported but not listed would fail late, inside a request."""
    import ast
    from pathlib import Path

    from tokprune.integrations import vllm_plugin

    root = Path(vllm_plugin.__file__).parent
    imported = set()
    for path in [root / "vllm_plugin.py", *sorted((root / "vllm_families").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                imported |= {f"{node.module}:{alias.name}" for alias in node.names}
    listed = set(vllm_plugin.PIECES)
    # a module imported whole is listed by the attributes used from it
    modules = {piece.split(":")[0] for piece in listed}
    missing = {p for p in imported if p not in listed and f"{p.split(':')[0]}.{p.split(':')[1]}" not in modules}
    assert not missing, f"vLLM pieces imported but not in PIECES: {sorted(missing)}"
    assert len(imported) >= 10


def test_select_projected_returns_the_rows_the_step_projected_to_choose():
    """DivPrune projects every token to choose: its kept rows come back projected from that one projection (a
    server must not project them again); random projects nothing, so there is nothing to reuse."""
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(8, 6)
    calls: list[tuple[int, ...]] = []

    def project(x):
        calls.append(tuple(x.shape))
        return linear(x)

    features = [torch.randn(12, 8, generator=gen), torch.randn(9, 8, generator=gen)]  # ragged
    plan = serving_plan("divprune(keep=4)", "none")
    with torch.no_grad():
        keeps, projected = plan.select_projected(features, None, project)
        assert calls == [(2, 12, 8)]  # once, on the padded batch
        for f, keep, rows in zip(features, keeps, projected):
            assert keep.sum() == 4 and torch.allclose(rows, linear(f)[keep], atol=1e-6)
        assert [torch.equal(a, b) for a, b in zip(keeps, plan.select(features, project=linear))] == [True, True]
        calls.clear()
        keeps, projected = serving_plan("random(keep=4)", "none").select_projected(features, None, project)
    assert calls == [] and projected == [None, None] and [int(k.sum()) for k in keeps] == [4, 4]


def test_select_frames_makes_every_frame_a_row_with_its_own_budget():
    gen = torch.Generator().manual_seed(5)
    videos = [torch.randn(4 * 8, 6, generator=gen), torch.randn(2 * 9, 6, generator=gen)]
    plan = serving_plan("divprune(keep=3)", "none", "Qwen2.5-VL", True, "frame")
    keeps = plan.select_frames(videos, [4, 2])
    assert [k.shape[0] for k in keeps] == [32, 18]
    assert keeps[0].view(4, 8).sum(dim=1).tolist() == [3] * 4 and keeps[1].view(2, 9).sum(dim=1).tolist() == [3, 3]
    rows = plan.select([*videos[0].split(8), *videos[1].split(9)])  # the frames as rows, in order
    assert torch.equal(keeps[0], torch.cat(rows[:4])) and torch.equal(keeps[1], torch.cat(rows[4:]))
