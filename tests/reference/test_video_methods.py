"""Reference checks of the temporal methods: ``evs`` against vLLM's rule, ``vidcom2`` against the authors' rule
(and, with ``reconcile=true``, vLLM's port), re-implemented small here from the pinned sources, one video at a
time with plain loops, and compared kept set by kept set on random videos and on the tiny Qwen2.5-VL /
Qwen3-VL models (the reference reading each video's stock ``get_video_features`` alone).

Sources (read with the search tools, not copied):

* EVS: ``vllm-project/vllm`` at ``094f117823287790739d3022162a3f30f13d758b``, ``vllm/multimodal/evs.py``:
  ``compute_retained_tokens_count`` L17-36, ``compute_retention_mask`` L39-93;
* VidCom2: ``xuyang-liu16/VidCom2`` at ``d31b1560e4ddcd0e7bbceb48dd933a9f634d8905``,
  ``token_compressor/vidcom2/vidcom2.py`` L15-78;
* VidCom2 in vLLM: ``vllm-project/vllm`` at ``0f17ee061e413bf8ab7927f926f69cdff24dc63e``,
  ``vllm/multimodal/video_prune/vidcom2.py`` L19-30 (target count) and L99-120 (reconcile).

A reference decision with a margin below :data:`NEAR_TIE` (a score gap at a cut, a channel-variance gap at the
channel cut, a frame budget within it of a rounding boundary) may flip with float rounding: such a case is
counted, not failed, and most cases must be clear and equal.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokprune
from tokprune import FrameLayout, VisionContext, VisionSignals, strategies
from tokprune.testing.models import VOCAB
from tokprune.testing.video import video_inputs

NEAR_TIE = 1e-5


# -- the references, one video at a time ------------------------------------------------------------------


def evs_reference(embeds: torch.Tensor, t: int, per_frame: int, q: float) -> tuple[torch.Tensor, float]:
    """vLLM's ``compute_retention_mask`` (L60-93) for one video ``[t * per_frame, D]``: (mask, margin at the cut)."""
    x = embeds.reshape(t, per_frame, -1)
    dissimilarity = 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(x[:1, :, 0]), dissimilarity], dim=0).reshape(-1)
    order = torch.argsort(dissimilarity, descending=True, stable=True)
    keep = max(per_frame, int(t * per_frame * (1 - q)))  # compute_retained_tokens_count, L33-36
    mask = torch.zeros_like(dissimilarity, dtype=torch.bool)
    mask[order[:keep]] = True
    ranked = dissimilarity[order]
    margin = math.inf if keep >= len(ranked) else float(ranked[keep - 1] - ranked[keep])
    return mask, margin


def vidcom2_reference(
    embeds: torch.Tensor, t: int, per_frame: int, base: float, reconcile_q: float | None = None
) -> tuple[torch.Tensor, float]:
    """The authors' ``vidcom2_compression`` (L15-78) for one video; with ``reconcile_q``, vLLM's step 5 after it
    (target ``max(T, min(int(N (1 - q)), N))``). Returns (mask, the smallest margin of its decisions)."""
    margins = []
    variances = embeds.var(dim=0, unbiased=False)  # select_low_var_channels, L38-43
    k = int(embeds.shape[-1] * 0.5)
    low = torch.sort(variances).values
    margins.append(float(low[k] - low[k - 1]) if k < len(low) else math.inf)
    channels = torch.topk(variances, k=k, largest=False).indices
    frames = F.normalize(embeds[:, channels].view(t, per_frame, k), dim=-1)  # compute_gaussian_scores, L45-57
    video_centre = frames.mean(dim=(0, 1), keepdim=True)
    frame_centre = frames.mean(dim=1, keepdim=True)

    def kernel(centre: torch.Tensor) -> torch.Tensor:  # _multi_scale_gaussian, L59-62
        distance = ((frames - centre) ** 2).sum(dim=-1)
        return sum(torch.exp(-distance / (2 * a)) for a in [2**e for e in range(-3, 2)])

    video_score, frame_score = kernel(video_centre), kernel(frame_centre)
    uniqueness = -video_score.mean(dim=-1)  # compute_scales, L64-68
    probs = F.softmax((uniqueness - uniqueness.max()) / 0.01, dim=0)
    scales = (base * (1 + probs - probs.mean())).clamp(max=1.0)
    raw = scales * per_frame
    margins += [abs(float(r - math.floor(r) - 0.5)) for r in raw]  # a budget at a .5 rounds either way
    budgets = raw.round().long().clamp(min=1).tolist()  # select_outlier_indices, L70-78
    score = video_score + frame_score
    mask = torch.zeros(t, per_frame, dtype=torch.bool)
    for f, budget in enumerate(budgets):
        idx = torch.topk(score[f], k=budget, largest=False, sorted=False).indices
        mask[f, idx] = True
        ranked = torch.sort(score[f]).values
        margins.append(float(ranked[budget] - ranked[budget - 1]) if budget < per_frame else math.inf)
    mask = mask.reshape(-1)
    if reconcile_q is not None:  # vLLM's port, L99-120
        flat = score.reshape(-1)
        total = t * per_frame
        target = max(t, min(int(total * (1 - reconcile_q)), total))
        current = int(mask.sum())
        if current > target:
            kept = mask.nonzero().flatten()
            ranked = torch.sort(flat[kept], descending=True).values
            margins.append(float(ranked[current - target - 1] - ranked[current - target]) if current - target < len(kept) else math.inf)
            mask[kept[torch.topk(flat[kept], k=current - target, largest=True).indices]] = False
        elif current < target:
            spare = (~mask).nonzero().flatten()
            ranked = torch.sort(flat[spare]).values
            need = target - current
            margins.append(float(ranked[need] - ranked[need - 1]) if need < len(spare) else math.inf)
            mask[spare[torch.topk(flat[spare], k=need, largest=False).indices]] = True
    return mask, min(margins)


def reference_mask(spec: str, embeds: torch.Tensor, t: int, per_frame: int) -> tuple[torch.Tensor, float]:
    step = strategies.get(spec).vision
    p = step.params
    if step.name == "evs":
        return evs_reference(embeds, t, per_frame, 1 - p.keep_ratio)
    return vidcom2_reference(embeds, t, per_frame, p.keep_ratio, 1 - p.keep_ratio if p.reconcile else None)


SPECS = [
    "evs(keep_ratio=0.25)",
    "evs(keep_ratio=0.5)",
    "vidcom2",
    "vidcom2(keep_ratio=0.5)",
    "vidcom2(keep_ratio=0.25, reconcile=true)",
    "vidcom2(keep_ratio=0.75, reconcile=true)",
]


class Tally:
    def __init__(self) -> None:
        self.cases = self.equal = self.near = 0
        self.notes: list[str] = []

    def check(self, ours: torch.Tensor, ref: torch.Tensor, margin: float, where: str) -> None:
        self.cases += 1
        if torch.equal(ours, ref):
            self.equal += 1
        elif margin < NEAR_TIE:
            self.near += 1
            self.notes.append(f"{where}: near-tie (margin {margin:.2e})")
        else:
            raise AssertionError(f"{where}: kept {ours.nonzero().flatten().tolist()}, reference {ref.nonzero().flatten().tolist()}")

    def done(self) -> None:
        assert self.cases and self.equal >= 0.9 * self.cases, f"{self.equal}/{self.cases} equal; {self.notes}"
        print(f"{self.equal}/{self.cases} equal, {self.near} near-ties")


# -- random videos ---------------------------------------------------------------------------------------


def _random_videos(seed: int) -> list[tuple[torch.Tensor, int, int]]:
    """Videos ``(embeds [t * per, D], t, per)`` of different lengths and frame sizes, some near-static (each
    frame the previous plus small noise, with a few moving tokens), as EVS meets them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, per in ((4, 6), (3, 8), (1, 6), (6, 4), (2, 12)):
        first = torch.randn(per, 32, generator=g)
        frames = [first]
        for _ in range(t - 1):
            nxt = frames[-1] + 0.05 * torch.randn(per, 32, generator=g)
            moved = torch.randperm(per, generator=g)[: per // 3]
            nxt[moved] = torch.randn(len(moved), 32, generator=g)
            frames.append(nxt)
        out.append((torch.cat(frames), t, per))
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_temporal_methods_keep_what_their_reference_keeps_on_random_videos(spec):
    tally = Tally()
    step = strategies.get(spec).vision
    for seed in range(6):
        videos = _random_videos(seed)
        features = torch.nn.utils.rnn.pad_sequence([v[0] for v in videos], batch_first=True)
        lengths = torch.tensor([v[0].shape[0] for v in videos])
        frames = FrameLayout(torch.tensor([v[1] for v in videos]), torch.tensor([[1, v[2]] for v in videos]))
        signals = VisionSignals(lambda s: None, 1, 1, declared=frozenset(), lengths=lengths)
        plan = step(VisionContext(features=features, signals=signals, lengths=lengths, frames=frames))
        for i, (embeds, t, per) in enumerate(videos):
            ref, margin = reference_mask(spec, embeds, t, per)
            tally.check(plan.keep[i, : t * per], ref, margin, f"seed {seed} video {i} ({t}x{per})")
    tally.done()


# -- the tiny models --------------------------------------------------------------------------------------

VIDEOS = [[("video", (3, 4, 6))], [("image", (1, 8, 4)), ("video", (4, 4, 4))], [("video", (2, 8, 4))], [("video", (1, 4, 6))]]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("spec", SPECS)
def test_temporal_methods_keep_what_their_reference_keeps_on_tiny_models(family, spec):
    from tokprune.adapters import describe_adapter

    tally = Tally()
    for seed in (0, 1):
        model = describe_adapter(family).cls.tiny(seed=seed).model
        batch = video_inputs(model, VIDEOS, [3, 5, 2, 4])
        with tokprune.pruned(model, spec, question_end=VOCAB.assistant_marker) as run, torch.no_grad():
            model(**batch)
        kept = run.stats.kept.vision[run.stats.image_video]
        merge = model.config.vision_config.spatial_merge_size**2
        for v, sample in enumerate([s for items in VIDEOS for s in items if s[0] == "video"]):
            t, h, w = sample[1]
            # the video alone through the unpatched tower: its own pixels, read from the batch
            start = int(sum(g.prod() for g in batch["video_grid_thw"][:v]))
            pixels = batch["pixel_values_videos"][start : start + t * h * w]
            with torch.no_grad():
                embeds = model.model.get_video_features(pixels, batch["video_grid_thw"][v : v + 1]).pooler_output[0]
            ref, margin = reference_mask(spec, embeds.float(), t, h * w // merge)
            tally.check(kept[v, : t * h * w // merge], ref, margin, f"{family} seed {seed} video {v}")
    tally.done()


# -- the check rejects wrong rules ------------------------------------------------------------------------


def _next_frame(orig):
    def scores(features, frames, valid):  # compares with the *next* frame (the last frame scored 255)
        return orig(features.flip(1), frames, valid.flip(1)).flip(1).masked_fill(~valid, float("-inf"))

    return scores


@pytest.mark.parametrize(
    "spec, module, name, wrong",
    [
        ("evs(keep_ratio=0.5)", "evs", "evs_scores", _next_frame),
        ("vidcom2", "vidcom2", "low_variance_channels", lambda orig: lambda f, v, r: orig(f, v, 1.0)),
        ("vidcom2", "vidcom2", "frame_budgets", lambda orig: lambda *a: orig(*a[:-1], 1.0)),  # temperature 1
    ],
    ids=["evs_next_frame", "vidcom2_every_channel", "vidcom2_flat_budgets"],
)
def test_the_reference_check_rejects_wrong_rules(monkeypatch, spec, module, name, wrong):
    import importlib

    target = importlib.import_module(f"tokprune_strategies.{module}")
    monkeypatch.setattr(target, name, wrong(getattr(target, name)))
    with pytest.raises(AssertionError, match="reference"):
        test_temporal_methods_keep_what_their_reference_keeps_on_random_videos(spec)
