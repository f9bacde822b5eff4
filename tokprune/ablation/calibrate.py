"""Budget calibration: the knob value that brings a pipeline's mean budget to a target.

A budget is measured on the calibration split (``calibration.split``, never the report split) by one
prefill per batch: no decoding and no answers are read, only kept-token counts and FLOPs. Three axes,
each a fraction:

* ``equiv_tokens``: visual tokens averaged over the LLM layers, ``(1/L) Σ_l v_l``, over the ``N`` visual
  tokens of an unpruned image (SparseVLM's "equivalent tokens": a FastV run that keeps ``k`` of ``N``
  from layer ``K`` on has ``(K·N + (L−K)·k) / L``);
* ``kept_tokens``: visual tokens processed by the last LLM layer, over ``N``;
* ``flops``: prefill FLOPs over the unpruned model's (sums over the questions).

:func:`search` assumes the mean budget is monotone in the knob (more ``keep``, more tokens; a larger
``iqr_factor``, fewer outliers) in either direction; it measures both ends of the range, then alternates
interpolation and bisection steps inside the bracket until the budget is within the tolerance. A target
outside what the range reaches gets the closest end; a budget left outside the tolerance (out of range,
a jump in the curve, steps exhausted) is flagged ``reachable = False``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import vision_positions_arg

__all__ = ["Calibration", "Calibrator", "axis_value", "search"]


@dataclass(frozen=True)
class Calibration:
    """The outcome of one search: the knob's value, the budget it gave on the calibration split, and
    whether that is within the tolerance of the target (``reachable``)."""

    value: int | float
    budget: float
    target: float
    reachable: bool
    steps: int


def search(
    measure: Callable[[int | float], float],
    low: float,
    high: float,
    target: float,
    tolerance: float,
    integer: bool,
    max_steps: int = 10,
) -> Calibration:
    """The knob value in ``[low, high]`` whose ``measure`` is closest to ``target`` (see the module doc).

    Float knobs are searched on a log scale (``low > 0``), integer knobs on integers.
    """
    seen: dict[int | float, float] = {}

    def f(v: int | float) -> float:
        if v not in seen:
            seen[v] = measure(v)
        return seen[v]

    def closest() -> tuple[int | float, float]:
        v = min(seen, key=lambda k: (abs(seen[k] - target), k))
        return v, seen[v]

    a: int | float = int(low) if integer else float(low)
    b: int | float = int(high) if integer else float(high)
    fa, fb = f(a), f(b)
    if not min(fa, fb) - tolerance <= target <= max(fa, fb) + tolerance:
        v, got = closest()
        return Calibration(v, got, target, False, len(seen))
    to_x = (lambda v: math.log(v)) if not integer else (lambda v: float(v))
    from_x = (lambda x: math.exp(x)) if not integer else (lambda x: x)
    for step in range(max_steps):
        if abs(closest()[1] - target) <= tolerance:
            break
        xa, xb = to_x(a), to_x(b)
        # Odd steps bisect, so a curve that interpolation keeps approaching from one side still shrinks.
        t = 0.5 if step % 2 or fb == fa else min(max((target - fa) / (fb - fa), 0.0), 1.0)
        m: int | float = from_x(xa + t * (xb - xa))
        if integer:
            lo, hi = min(a, b), max(a, b)
            if hi - lo < 2:
                break  # adjacent integers: nothing in between
            m = min(max(round(m), lo + 1), hi - 1)
        fm = f(m)
        if (fm - target) * (fa - target) > 0:
            a, fa = m, fm
        else:
            b, fb = m, fm
    v, got = closest()
    return Calibration(v, got, target, abs(got - target) <= tolerance, len(seen))


def axis_value(axis: str, stats: dict[str, float]) -> float:
    """The budget on ``axis`` from summed per-question quantities (see :meth:`Calibrator.measure`)."""
    if axis == "equiv_tokens":
        return stats["visual_layer_sum"] / stats["visual_total_sum"]
    if axis == "kept_tokens":
        return stats["visual_last_sum"] / stats["visual_total_sum"]
    if axis == "flops":
        return stats["flops_pruned_sum"] / stats["flops_unpruned_sum"]
    raise ValueError(f"unknown budget axis {axis!r}; valid: equiv_tokens, kept_tokens, flops")


def _read_cache(path: Path) -> dict[str, Any]:
    """The calibration cache as a dict, or an empty one when the file is missing or is not one (garbage,
    another program's JSON, a file cut short): never an error, as it holds only measurements."""
    try:
        data = json.loads(path.read_bytes()) if path.is_file() else {}
    except (OSError, ValueError):  # ValueError: not JSON, not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def _valid_entry(entry: Any) -> bool:
    """An entry maps specs to the summed budget quantities :meth:`Calibrator.measure` returns."""
    return isinstance(entry, dict) and all(
        isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()) for v in entry.values()
    )


class Calibrator:
    """Measures pipelines' budgets on the calibration questions, caching them in ``cache_path`` (JSON), so
    a resumed study finds the same knob values without measuring again."""

    def __init__(self, session: Any, samples: list[Any], cache_path: Path | None, identity: dict[str, Any]) -> None:
        self.session = session
        self.samples = samples
        self.cache_path = cache_path
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        entry = _read_cache(cache_path).get(self.key) if cache_path is not None else None
        # A damaged cache (or entry) only costs measurements.
        self.cache: dict[str, dict[str, float]] = entry if _valid_entry(entry) else {}
        self.results: list[dict[str, Any]] = []

    def measure(self, spec: str) -> dict[str, float]:
        """Summed budget quantities of ``spec`` over the calibration questions (one prefill per batch)."""
        if spec in self.cache:
            return self.cache[spec]
        import tokprune

        s = self.session
        sums = dict.fromkeys(
            ("visual_layer_sum", "visual_last_sum", "visual_total_sum", "flops_pruned_sum", "flops_unpruned_sum"), 0.0
        )
        handle = tokprune.patch(
            s.model, spec, vision_positions=vision_positions_arg(s.cfg.positions.vision),
            llm_positions=s.cfg.positions.llm,
            question_end=s.processor.tokenizer,
            budget_scope=s.cfg.budget_scope,
        )
        try:
            for start in range(0, len(self.samples), s.cfg.batch_size):
                batch = self.samples[start : start + s.cfg.batch_size]
                with torch.inference_mode():
                    s.model(**s.inputs(batch))
                st = handle.stats
                sums["visual_layer_sum"] += float(st.visual_layer_avg.double().sum())
                sums["visual_last_sum"] += float(st.layer_visual[:, -1].double().sum())
                sums["visual_total_sum"] += float(st.visual_total * st.batch_size)
                sums["flops_pruned_sum"] += float(st.flops_pruned.sum())
                sums["flops_unpruned_sum"] += float(st.flops_unpruned.sum())
        finally:
            handle.remove()
        self.cache[spec] = sums
        return sums

    def save(self) -> None:
        if self.cache_path is None:
            return
        data = _read_cache(self.cache_path)
        data[self.key] = self.cache
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.cache_path)  # atomic: a kill leaves the old cache or the new one

    def record(self, label: str, calibration: Calibration) -> None:
        self.results.append({"run": label, **asdict(calibration)})
