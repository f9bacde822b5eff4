"""Patch-time refusals of the pruned decoder (:class:`PatchChecks`, mixed into
:class:`~tokprune.adapters.decoder.PrunedDecoderAdapter`): a vision step the family cannot run (no vision
stage, no CLS, no video), an LLM-stage cut at a layer the model cannot host. Each names the bad value and
what works, before anything runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import hf_compat as hf
from ..errors import MissingCapabilityError, StrategyParamError
from ..strategy import PruningStrategy, Signal

if TYPE_CHECKING:
    from .family import FamilyParts

__all__ = ["PatchChecks"]


class PatchChecks:
    """The refusals at ``patch()`` (a part of :class:`~tokprune.adapters.decoder.PrunedDecoderAdapter`)."""

    def _check_vision_stage(self, parts: FamilyParts) -> frozenset[Signal]:
        """Refuse a vision step this family cannot run; returns the tower signals the step reads (resolved)."""
        step = self.pipeline.vision
        if step is None:
            return frozenset()
        if not self.has_vision_stage:
            from ..registry import available

            raise MissingCapabilityError(
                f"{step.short_spec()}: the {self.name} adapter has no vision stage (it does not encode images "
                f"itself); LLM-stage strategies work on it: {', '.join(available(stage='llm')) or 'none registered'}"
            )
        self.check_pipeline()
        self._check_cls(parts.tower.cls)
        encoder = self.text_encoder
        if step.reads_instruction() and encoder is not None and encoder.decode is None:
            if hf.model_tokenizer(self.model) is None:
                raise MissingCapabilityError(
                    f"{step.short_spec()} reads the question through the text encoder, which needs it as text, and this "
                    "model has no tokenizer saved with it; give ClipTextEncoder(..., decode=your_tokenizer.decode)"
                )
        return frozenset(s.resolve(parts.tower.num_layers) for s in self.pipeline.requires())

    def _check_temporal(self, step: PruningStrategy) -> None:
        """Refuse a temporal vision step (it cuts across a video's frames) where there are no frames to cut
        across: on a family without video, and under ``budget_scope="frame"`` (every row one frame)."""
        from ._base import _families_with

        if "frame" not in self.budget_scopes:
            raise MissingCapabilityError(
                f"{step.short_spec()} prunes across the frames of a video, and {self.name} takes no video"
                f"{_families_with('frame')}"
            )
        if self.budget_scope == "frame":
            raise StrategyParamError(
                f"{step.short_spec()} sets its own budget across the frames of each video, so budget_scope='frame' "
                "(one budget per frame) does not apply to it; use budget_scope='image' (the default: per video)"
            )

    def _check_cls(self, tower_has_cls: bool) -> None:
        """Refuse a vision step reading CLS signals on a tower without a CLS token, naming what works.

        Every encoder signal (:class:`~tokprune.strategy.Signal` ``qk`` / ``hidden``) is read relative to
        the CLS token (its attention row, its similarity), so a tower without one provides none of them.
        """
        step = self.pipeline.vision
        if tower_has_cls or step is None or not step.requires():
            return
        from ..registry import available, describe

        working = []
        for name in available(stage="vision"):
            cls = describe(name).cls
            if cls.temporal and "frame" not in self.budget_scopes:
                continue  # refused here anyway: this family takes no video
            if not cls().requires() and (cls.ragged_vision or not self.variable_image_tokens):
                working.append(name)
        signals = ", ".join(f"{s.kind}@{s.layer}" for s in sorted(step.requires(), key=lambda s: (s.kind, s.layer)))
        raise MissingCapabilityError(
            f"{step.short_spec()} reads the CLS token's signals ({signals}), and the {self.name} vision tower has no CLS "
            f"token; vision strategies that read no CLS signal: {', '.join(working) or 'none registered'} (some "
            "strategies have a CLS-free parameter value, e.g. cdpruner(relevance=uniform): see tokprune describe NAME)"
        )

    def _check_llm_layers(self) -> dict[int, PruningStrategy]:
        num_layers = len(self._lm.layers)
        steps = {}
        for step in self.pipeline.llm:
            for k in step.llm_layers:  # a schedule (e.g. PyramidDrop) is one step at each of its layers
                if not 1 <= k <= num_layers - 1:
                    raise StrategyParamError(
                        f"{step.short_spec()} prunes before decoder layer {k}, but this {self.name} language model has "
                        f"{num_layers} layers: layer must be in 1..{num_layers - 1} (layer K-1 provides the scores)"
                    )
                self._check_scoring_layers(step, k)
                steps[k] = step
        refused = {k: why for k in sorted(steps) if (why := self.llm_cut_refusal(k))}
        if refused:
            k, why = next(iter(refused.items()))
            hosts = [j for j in range(1, num_layers) if not self.llm_cut_refusal(j)]
            raise StrategyParamError(
                f"{steps[k].short_spec()} prunes before decoder layer {k}, which this {self.name} model cannot host: "
                f"{why}; layers that can host an LLM-stage cut: {', '.join(map(str, hosts)) or 'none'}"
            )
        return steps

    def _check_scoring_layers(self, step: PruningStrategy, k: int) -> None:
        """Refuse a cut before layer ``k`` whose scoring layer has no softmax attention (a linear-attention
        layer: no attention matrix, no q/k to read), naming the layers that can host it. Every cut reads layer
        K-1's q/k (``LLMContext.attention``); a step that :meth:`~PruningStrategy.reads_layer_attention` reads
        layer K's too."""
        scored = [hf.has_attention(layer) for layer in self._lm.layers]
        own = step.reads_layer_attention()
        needed = [k - 1, k] if own else [k - 1]
        missing = [j for j in needed if not scored[j]]
        if not missing:
            return
        hosts = [c for c in range(1, len(scored)) if scored[c - 1] and (scored[c] or not own)]
        kinds = ", ".join(f"layer {j} is {self.layer_attention(j)}" for j in missing)
        previous = [c for c in range(1, len(scored)) if scored[c - 1]]
        hint = (
            f"; it also reads layer K's own attention: a configuration reading layer K-1's alone can be hosted "
            f"before layers {previous or 'none'}"
            if own
            else ""
        )
        raise StrategyParamError(
            f"{step.short_spec()} prunes before decoder layer {k} and scores with the softmax attention of layer"
            f"{'s' if len(needed) > 1 else ''} {' and '.join(map(str, needed))}, but in this {self.name} model {kinds} "
            f"(no attention matrix to read); layers K this cut can be hosted before: {hosts or 'none'}{hint}"
        )
