"""A :class:`Pipeline` is an ordered, validated composition of strategies (``a+b+...``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .errors import StageOrderError
from .strategy import PruningStrategy, Signal, Stage

__all__ = ["Pipeline"]


class Pipeline(Sequence[PruningStrategy]):
    """Strategies in the order they run: at most one vision-stage step, then LLM-stage steps at
    strictly increasing layers (a step with a schedule of layers occupies all of them). ``str(pipeline)`` is a canonical spec that parses back to an equal
    pipeline; the empty pipeline (no pruning) is spelled ``none``.
    """

    def __init__(self, steps: Sequence[PruningStrategy] = ()) -> None:
        self.steps: tuple[PruningStrategy, ...] = tuple(steps)
        _check_order(self.steps)

    @property
    def vision(self) -> PruningStrategy | None:
        """The vision-stage step, if any."""
        return next((s for s in self.steps if s.stage is Stage.VISION), None)

    @property
    def llm(self) -> tuple[PruningStrategy, ...]:
        """LLM-stage steps, in increasing layer order."""
        return tuple(s for s in self.steps if s.stage is Stage.LLM)

    @property
    def llm_layers(self) -> tuple[int, ...]:
        """Every decoder layer an LLM step prunes before (a schedule contributes each of its layers)."""
        return tuple(k for s in self.llm for k in s.llm_layers)

    def requires(self) -> frozenset[Signal]:
        """Union of the encoder signals every step reads."""
        out: frozenset[Signal] = frozenset()
        for step in self.steps:
            out |= step.requires()
        return out

    def to_config(self) -> list[dict[str, Any]]:
        """The pipeline as a list of ``{name: ..., <param>: ...}`` dicts (the omegaconf form)."""
        import dataclasses

        return [{"name": s.name, **dataclasses.asdict(s.params)} for s in self.steps]

    def __getitem__(self, index: int) -> PruningStrategy:  # type: ignore[override]
        return self.steps[index]

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[PruningStrategy]:
        return iter(self.steps)

    def __str__(self) -> str:
        return "+".join(s.spec() for s in self.steps) if self.steps else "none"

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and other.steps == self.steps

    def __hash__(self) -> int:
        return hash(self.steps)


def _check_order(steps: tuple[PruningStrategy, ...]) -> None:
    spec = "+".join(s.name for s in steps)
    vision = [s for s in steps if s.stage is Stage.VISION]
    if len(vision) > 1:
        raise StageOrderError(
            f"{spec!r} has {len(vision)} vision-stage strategies ({', '.join(s.name for s in vision)}); "
            "a pipeline takes at most one (compose scores inside one strategy instead)"
        )
    seen_llm: PruningStrategy | None = None
    for step in steps:
        if step.stage is Stage.VISION and seen_llm is not None:
            raise StageOrderError(
                f"{step.name!r} (stage=vision) comes after {seen_llm.name!r} (stage=llm, layer={seen_llm.layer}) "
                f"in {spec!r}; vision-stage strategies run before the LLM: write "
                f"'{step.name}+{seen_llm.name}'"
            )
        if step.stage is Stage.LLM:
            layers = step.llm_layers
            if any(b <= a for a, b in zip(layers, layers[1:])):
                raise StageOrderError(
                    f"{step.name!r} has the schedule layer={layers}: its layers must strictly increase"
                )
            if seen_llm is not None and layers[0] <= seen_llm.llm_layers[-1]:
                raise StageOrderError(
                    f"LLM layers out of order in {spec!r}: {step.name!r} at layer {layers[0]} follows "
                    f"{seen_llm.name!r} at layer {seen_llm.llm_layers[-1]}; LLM-stage steps need strictly "
                    "increasing layers, in the order written"
                )
            seen_llm = step
