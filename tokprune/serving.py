"""Vision-stage pruning for serving engines: which specs a server can run, how many tokens they keep, and
running one on an engine's own encoder outputs. Engine-independent (no vLLM import); the vLLM layer is
:mod:`tokprune.integrations.vllm_plugin`.

A serving engine sizes an image's placeholder tokens *before* the image is encoded (vLLM's scheduler, KV
slots and attention metadata are planned from the prompt), so a server can run only strategies whose kept
count is known from the image's token count alone: the vision-stage strategies with a fixed budget
(``keep=`` / ``keep_ratio=``, counted by :func:`tokprune.scoring.fixed_counts`). This module decides that
(:func:`serving_plan`), counts (:meth:`ServingPlan.kept_counts`) and runs the registered strategy object on
the engine's features (:meth:`ServingPlan.select`), checking that it kept exactly the announced count.
The strategies, their parameters and the spec grammar are the registry's: nothing here re-implements one.

Public names: :class:`ServingPlan`, :func:`serving_plan`, :func:`servable_strategies`, :class:`ServingSpecError`,
and the types :data:`TowerSignals` and :data:`VideoPruning`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import StrategyContractError, TokpruneError
from .pipeline import Pipeline
from .strategy import FrameLayout, PruningStrategy, Signal, Stage, VisionContext, VisionSignals

__all__ = ["ServingPlan", "ServingSpecError", "TowerSignals", "VideoPruning", "servable_strategies", "serving_plan"]

logger = logging.getLogger("tokprune.serving")

#: What a family's tower offers a vision-stage strategy: ``"cls"`` (CLIP: CLS-relative signals computed
#: from the encoder's q/k and hidden states), ``"none"`` (Qwen-VL: merged tokens only, no CLS).
TowerSignals = Literal["cls", "none"]
#: How a family's server path takes videos: ``False`` (it prunes none), ``True`` (per video or per frame),
#: ``"frame"`` (per frame only: Qwen3-VL, where the engine fixes each frame's placeholder run, after its
#: timestamp, before the video is encoded, so only a budget known per frame can size them).
VideoPruning = bool | Literal["frame"]


class ServingSpecError(TokpruneError, ValueError):
    """A spec a serving engine cannot run (or cannot parse): the message names the bad value and what works.

    A ``ValueError`` so that servers answer it as a bad request (HTTP 400), never as a server error.
    """


def _fixed_budget(cls: type[PruningStrategy]) -> bool:
    names = {f for f in getattr(cls.Params, "__dataclass_fields__", {})}
    return {"keep", "keep_ratio"} <= names


def servable_strategies(tower: TowerSignals = "cls", video: VideoPruning = False) -> list[str]:
    """Registered vision-stage strategies with a fixed budget that a tower offering ``tower`` runs with their
    default parameters, sorted (``"none"``: those reading no encoder signal, e.g. on Qwen-VL). ``video=True``:
    the family prunes videos per video, so the temporal strategies are listed too (they prune videos only),
    as ``name(keep=)`` where only an absolute ``keep`` fixes their count (:meth:`PruningStrategy.video_counts`);
    ``"frame"``: per frame only, where a temporal strategy (its budget spread over the frames after encoding)
    cannot run."""
    from .registry import available, describe

    names = []
    for name in available(stage="vision"):
        cls = describe(name).cls
        if not _fixed_budget(cls) or not cls.ragged_vision:
            continue
        if cls.temporal:
            if video is not True:
                continue
            if _video_counts(cls()) is None:
                if _video_counts(cls(keep=1)) is not None:
                    names.append(f"{name}(keep=)")
                continue
        if tower == "none" and cls().requires():
            continue
        names.append(name)
    return names


def _video_counts(step: PruningStrategy) -> Tensor | None:
    """The step's count on a probe video (2 frames of 2 tokens): None where the features decide it."""
    return step.video_counts(torch.tensor([4]), FrameLayout(torch.tensor([2]), torch.tensor([[1, 2]])))


@dataclass(frozen=True)
class ServingPlan:
    """One parsed, validated spec as a server runs it: its vision step (None: no pruning)."""

    spec: str
    step: PruningStrategy | None
    #: What a budget counts on a video: ``"image"`` (the whole video, the default) or ``"frame"`` (each of its
    #: frames), as ``tokprune.patch(..., budget_scope=...)``. Images are one frame either way.
    scope: str = "image"

    @property
    def prunes(self) -> bool:
        """Something is pruned (images or videos)."""
        return self.step is not None

    @property
    def prunes_images(self) -> bool:
        """Images are pruned: a temporal step (EVS, VidCom2) prunes videos only, images pass whole (as in
        ``tokprune.patch`` and vLLM's ``--video-pruning-rate``)."""
        return self.step is not None and not self.step.temporal

    def requires(self) -> frozenset[Signal]:
        """Encoder signals the step reads (unresolved layers; resolve with :meth:`Signal.resolve`)."""
        return self.step.requires() if self.step is not None else frozenset()

    def stand_in(self) -> str | None:
        """What runs instead of the instruction where the step reads it (:meth:`PruningStrategy.reads_instruction`,
        e.g. CDPruner's default ``relevance=text``): a server has no CLIP text tower, so the strategy's own
        stand-in runs, as ``tokprune.patch`` without ``text_encoder`` does. None: the step reads no instruction."""
        step = self.step
        if step is None or not step.reads_instruction():
            return None
        layer = getattr(step.params, "layer", None)
        return f"CLS attention at layer {layer}" if layer is not None else "the strategy's stand-in"

    def kept_counts(self, token_counts: Tensor) -> Tensor:
        """long ``[I]``: tokens kept of images bringing ``token_counts`` (long ``[I]``) tokens each, by the
        strategy's own budget rule (``min(keep, n)`` or ``round(n * keep_ratio)``, at least 1)."""
        from .scoring import fixed_counts

        if not self.prunes_images:
            return token_counts.clone()
        p = self.step.params
        return fixed_counts(token_counts, p.keep, p.keep_ratio)

    def video_kept_counts(self, token_counts: Tensor, frames: FrameLayout) -> Tensor:
        """long ``[V]``: tokens kept of videos bringing ``token_counts`` (long ``[V]``) tokens laid out as
        ``frames``: a temporal step's own count (:meth:`PruningStrategy.video_counts`), any other step's
        budget over the whole video (one row per video, as ``tokprune.patch``'s ``budget_scope="image"``)."""
        from .scoring import fixed_counts

        step = self.step
        if step is None:
            return token_counts.clone()
        if step.temporal:
            counts = step.video_counts(token_counts, frames)
            assert counts is not None, "serving_plan refuses temporal steps whose count the features decide"
            return counts
        if self.scope == "frame":  # the budget per frame, every frame of a video alike
            per_frame = torch.div(token_counts, frames.counts.clamp_min(1), rounding_mode="floor")
            return fixed_counts(per_frame, step.params.keep, step.params.keep_ratio) * frames.counts
        return fixed_counts(token_counts, step.params.keep, step.params.keep_ratio)

    def check_video(self, video: VideoPruning, family: str = "this model", asked: object = None) -> None:
        """Refuse, naming what works, a plan that would prune a video the family's server path cannot size:
        per video (scope ``"image"``) on a family pruning videos per frame only (``video="frame"``). ``asked``:
        the spec as the request gave it (named in the error; default: the plan's resolved spec)."""
        if self.prunes and video == "frame" and self.scope != "frame":
            raise ServingSpecError(
                f"tokprune spec {asked if asked is not None else self.spec!r} would prune this request's video with one budget for the whole video, "
                f"and {family}'s server path prunes videos per frame only (the engine sizes each frame's placeholder "
                "run before the video is encoded); what works: the same spec per frame, "
                "mm_processor_kwargs={'tokprune': ..., 'tokprune_budget_scope': 'frame'}, or this video unpruned "
                "with {'tokprune': 'none'}"
            )

    def frame_kept_count(self, frame_tokens: int) -> int:
        """Tokens kept of each frame of ``frame_tokens`` tokens under budget scope ``"frame"`` (every frame of a
        video alike: :meth:`video_kept_counts` per frame)."""
        assert self.scope == "frame" or self.step is None, "frame_kept_count() on a plan budgeted per video"
        one = FrameLayout(torch.tensor([1]), torch.tensor([[1, frame_tokens]]))
        return int(self.video_kept_counts(torch.tensor([frame_tokens]), one)[0])

    def kept_count(self, token_count: int) -> int:
        """:meth:`kept_counts` for one image of ``token_count`` tokens."""
        return int(self.kept_counts(torch.tensor([token_count]))[0])

    def select(
        self,
        features: Sequence[Tensor],
        signals: Callable[[Tensor], VisionSignals] | None = None,
        grid: tuple[int, int] | None = None,
        project: Callable[[Tensor], Tensor] | None = None,
        frames: FrameLayout | None = None,
    ) -> list[Tensor]:
        """The step on each image's tokens; returns one bool keep mask ``[N_i]`` per image, in raster order.

        ``features``: one ``[N_i, D]`` per image (the rows the strategy scores; images may differ in size).
        ``signals``: builds the :class:`VisionSignals` of the padded batch from its ``lengths`` (long
        ``[I]``), for towers that have them; None: a tower with no encoder signals. ``grid``: the patch grid
        when every image has one. ``project``: the family's projector as a per-token map ``[I, L, C] -> [I, L, D]``
        (:attr:`VisionContext.project`: DivPrune and CDPruner select on the projected tokens by default, as
        their references do); None where ``features`` already are the tokens the LLM receives (Qwen-VL's
        merged tokens), exactly as the transformers adapters set it. ``frames``: the videos' frame layout
        when ``features`` are videos (one row each; counts from :meth:`video_kept_counts`). Raises :class:`StrategyContractError` when a plan keeps another count than
        :meth:`kept_counts` announced (the engine planned the prompt from it) or adds extra tokens.
        """
        step = self.step
        assert step is not None, "select() on a plan that does not prune"
        padded = torch.nn.utils.rnn.pad_sequence(list(features), batch_first=True)  # [I, L, D]
        lengths = torch.tensor([f.shape[0] for f in features], device=padded.device)
        uniform = bool((lengths == padded.shape[1]).all())
        if signals is not None:
            vision_signals = signals(lengths)
        else:

            def fetch(signal: Signal) -> Tensor:  # unreachable: serving_plan refuses signal readers here
                raise ServingSpecError(f"{step.spec()} reads {signal}, which this tower does not provide")

            vision_signals = VisionSignals(fetch, 1, 1, declared=frozenset(), lengths=lengths)
        ctx = VisionContext(
            features=padded,
            signals=vision_signals,
            grid=grid if uniform else None,
            # as the transformers adapters do: towers with a grid pass full rows, the others their lengths
            lengths=None if uniform and grid is not None else lengths,
            project=project,
            text=None,  # a server has no CLIP text tower: instruction readers run their stand-in (stand_in())
            frames=frames,
        )
        plan = step(ctx)
        if plan.extra is not None and plan.extra.shape[1] > 0:
            raise StrategyContractError(f"{step.spec()} added extra tokens; a server cannot place them")
        expected = self.kept_counts(lengths) if frames is None else self.video_kept_counts(lengths, frames)
        got = plan.keep.sum(dim=1)
        if not torch.equal(got.cpu(), expected.cpu()):
            raise StrategyContractError(
                f"{step.spec()} kept {got.tolist()} tokens where its budget announced {expected.tolist()}; "
                "the server sized the prompt from the budget"
            )
        return [plan.keep[i, :n] for i, n in enumerate(lengths.tolist())]


    def select_frames(self, videos: Sequence[Tensor], frame_counts: Sequence[int]) -> list[Tensor]:
        """Budget scope ``"frame"``: each video's keep mask bool ``[T_i * N_i]``, every one of its ``T_i`` frames
        (``videos[i]`` ``[T_i * N_i, D]``, frame-major) a strategy row of its own, as ``tokprune.patch``'s frame
        rows with ``budget_scope="frame"``."""
        frames = [video.split(video.shape[0] // int(t)) for video, t in zip(videos, frame_counts)]
        kept = self.select([frame for video in frames for frame in video])
        ends = torch.tensor([len(video) for video in frames]).cumsum(0).tolist()
        return [torch.cat(kept[end - len(video) : end]) for video, end in zip(frames, ends)]

    def select_projected(
        self,
        features: Sequence[Tensor],
        signals: Callable[[Tensor], VisionSignals] | None,
        project: Callable[[Tensor], Tensor],
        grid: tuple[int, int] | None = None,
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """:meth:`select` with the family's projector, also returning each image's kept rows projected
        (``[K_i, D]``) where the step projected every token to choose (DivPrune, CDPruner:
        :meth:`VisionContext.projected`), so that a server takes them from that projection instead of projecting
        them again, as ``tokprune.patch`` and those methods' references do; None per image where it did not."""
        projections: list[Tensor] = []

        def recorded(x: Tensor) -> Tensor:
            projections.append(project(x))
            return projections[-1]

        keeps = self.select(features, signals, grid=grid, project=recorded)
        widest = max(f.shape[0] for f in features)
        if len(projections) != 1 or projections[0].shape[:2] != (len(features), widest):
            return keeps, [None] * len(keeps)
        every = projections[0]
        return keeps, [every[i, : f.shape[0]][keep.to(every.device)] for i, (f, keep) in enumerate(zip(features, keeps))]


@functools.lru_cache(maxsize=256)
def serving_plan(
    spec: str | None,
    tower: TowerSignals = "cls",
    family: str = "this model",
    video: VideoPruning = False,
    scope: str | None = None,
) -> ServingPlan:
    """Parse and validate ``spec`` for a server whose tower offers ``tower`` (``video``: how the family's
    server path prunes videos, :data:`VideoPruning`), budgets counted per ``scope`` (``"image"``, the default,
    or ``"frame"``: per frame of a video, as ``tokprune.patch``'s ``budget_scope``); cached per spec. On a
    family pruning videos per frame only, a plan of scope ``"image"`` still prunes images: the family's
    processor refuses it for a request that brings a video (:meth:`ServingPlan.check_video`).

    Refused, with :class:`ServingSpecError` naming the bad value and the strategies that work: a spec that
    does not parse (unknown strategy, bad parameter: the registry's own message), LLM-stage steps (they
    prune inside the decoder, which the engine runs itself), adaptive counts (the count must be known
    before the image is encoded; a temporal step whose count the features decide, e.g. vidcom2 without
    ``keep=`` or ``reconcile=true``), temporal steps where the family prunes no video, CLS-reading steps on
    a tower without CLS.
    """
    from .registry import get

    text = "none" if spec is None else str(spec).strip()
    scope = "image" if scope is None else str(scope).strip()
    if scope not in ("image", "frame"):
        raise ServingSpecError(
            f"tokprune budget scope {scope!r}: a server counts budgets per 'image' (the default; a video is one) or "
            f"per 'frame' (each frame of a video)"
        )
    if scope == "frame" and not video:
        raise ServingSpecError(
            f"tokprune budget scope 'frame' counts budgets per frame of a video, and the tokprune server path prunes "
            f"no video on {family}; valid here: image"
        )
    if text in ("", "none"):
        return ServingPlan("none", None, scope)
    working = ", ".join(servable_strategies(tower, video)) or "none registered"
    try:
        pipeline: Pipeline = get(text)
    except TokpruneError as exc:
        raise ServingSpecError(
            f"tokprune spec {text!r}: {exc}. Strategies a server runs on {family}: {working}"
        ) from exc
    if pipeline.llm:
        names = ", ".join(s.name for s in pipeline.llm)
        verb = "prunes" if len(pipeline.llm) == 1 else "prune"
        raise ServingSpecError(
            f"tokprune spec {text!r}: {names} {verb} inside the language model (stage=llm), which the serving "
            f"engine runs itself; a server runs fixed-budget vision-stage strategies only: {working}"
        )
    step = pipeline.vision
    if step is None:
        return ServingPlan("none", None, scope)
    if not _fixed_budget(type(step)):
        raise ServingSpecError(
            f"tokprune spec {text!r}: {step.name} chooses how many tokens to keep from the image, but a server "
            f"sizes the prompt before the image is encoded; use a fixed budget (keep= or keep_ratio=) with: {working}"
        )
    if step.temporal and not video:
        raise ServingSpecError(
            f"tokprune spec {text!r}: {step.name} prunes across the frames of a video, and the tokprune server path "
            f"prunes no video on {family}; strategies that work here: {working}"
        )
    if step.temporal and video == "frame":
        raise ServingSpecError(
            f"tokprune spec {text!r}: {step.name} spreads a video's budget over its frames after encoding, and "
            f"{family}'s server path prunes videos per frame only (the engine sizes each frame's placeholder run "
            f"before encoding); strategies that work here, with budget scope 'frame': {working}"
        )
    if step.temporal and _video_counts(step) is None:
        raise ServingSpecError(
            f"tokprune spec {text!r}: {step.spec()} lets the features decide how many tokens each video keeps, but "
            "a server sizes the prompt before the video is encoded; fix the count with keep= (or the strategy's "
            f"own switch, vidcom2's reconcile=true); strategies that work here: {working}"
        )
    if step.temporal and scope == "frame":
        raise ServingSpecError(
            f"tokprune spec {text!r}: {step.name} sets its own budget across the frames of each video, so budget "
            "scope 'frame' (one budget per frame) does not apply to it; use budget scope 'image' (the default: per video)"
        )
    if tower == "none" and step.requires():
        signals = ", ".join(f"{s.kind}@{s.layer}" for s in sorted(step.requires(), key=lambda s: (s.kind, s.layer)))
        raise ServingSpecError(
            f"tokprune spec {text!r}: {step.spec()} reads the CLS token's signals ({signals}) and the {family} "
            f"vision tower has no CLS token; strategies that work here: {working}"
        )
    if step.stage is not Stage.VISION:  # pragma: no cover - Pipeline.vision guarantees it
        raise ServingSpecError(f"tokprune spec {text!r}: not a vision-stage step")
    plan = ServingPlan(str(pipeline), step, scope)
    stand_in = plan.stand_in()
    if stand_in is not None:  # once per spec and process (cached)
        logger.warning(
            "tokprune spec %r: %s reads the instruction through a CLIP text tower, which a server does not have; "
            "its stand-in runs (%s), as tokprune.patch without text_encoder does",
            plan.spec,
            step.name,
            stand_in,
        )
    return plan
