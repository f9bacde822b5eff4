"""Run-level metrics from per-sample records and per-batch timings.

Formulas (see ``docs/ablation.md``):

* accuracy = mean over samples of the scorer's 0..1 score (per question type too), each with its Wilson
  95% interval (``accuracy_ci``, ``accuracy_by_type_ci``);
* agreement = share of samples whose normalised prediction equals the unpruned model's;
* kept visual tokens = visual tokens that reach the LLM (after the vision stage and, for LLM-stage
  strategies, after the last LLM-stage cut), mean/min/max over samples;
* tokens averaged over LLM layers = (1/L) * sum_l n_l, the sequence length each decoder layer processes;
  equivalent visual tokens = the same over the visual tokens only, ``visual_layer_avg`` (``equiv_frac``:
  its share of the ``N`` visual tokens of an unpruned image);
* relative prefill FLOPs = sum_i FLOPs_pruned(i) / sum_i FLOPs_unpruned(i) (compute actually spent, so
  longer prompts weigh more), with the adapter's per-layer 4nd^2 + 2n^2d + 2ndm model plus vision tower
  and projector (see :mod:`tokprune.stats`); ``flops_fastv_rel``: FastV's LLM-only formula, mean over samples;
* adaptive cuts (``adaptive``): per strategy that cuts adaptively, the share of samples whose count was
  clamped by ``min_keep``/``max_keep``, the share where the rule found no cut (fallback; for PruMerge: no
  IQR outlier), and the 10/50/90th percentiles of the rule's own cut (the count before fallback and
  clamping, samples where it found one);
* prefill ms = mean over batches of the batch's time to first token; decode ms/token = total decode time /
  total decode steps (one step produces a token for every sample of the batch).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .datasets import EvalSample, Scorer
from .measure import Timing
from .statistics import wilson_interval

__all__ = ["adaptive_cuts", "run_metrics"]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stat(records: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if r.get(key) is not None]


def accuracy_by_type(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get("qtype") is not None:
            groups[str(r["qtype"])].append(float(r["score"]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def accuracy_by_type_ci(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get("qtype") is not None:
            groups[str(r["qtype"])].append(float(r["score"]))
    return {k: list(wilson_interval(sum(v), len(v))) for k, v in sorted(groups.items())}


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (NumPy's default), ``q`` in [0, 100]."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def adaptive_cuts(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per adaptive strategy of the pipeline (found by its per-sample diagnostics): clamped share,
    fallback share and the cut's percentiles. Cut-rule strategies (``cls_knee``, ``text_interact``)
    record ``clamped``/``fallback``/``raw_keep``; PruMerge records ``outliers`` (0: nothing found)."""
    if not records:
        return {}
    first = records[0]
    out: dict[str, dict[str, float | None]] = {}
    for key in first:
        prefix, _, leaf = key.rpartition(".")
        if not prefix or leaf not in ("clamped", "outliers") or prefix in out:
            continue
        if leaf == "clamped":
            clamped: float | None = _mean([float(bool(r[f"{prefix}.clamped"])) for r in records])
            fallback = _mean([float(bool(r.get(f"{prefix}.fallback"))) for r in records])
            cuts = [float(r[f"{prefix}.raw_keep"]) for r in records if r.get(f"{prefix}.raw_keep")]
        else:
            clamped = None  # PruMerge has no bounds but min_keep, which applies exactly when nothing is found
            fallback = _mean([float(r[f"{prefix}.outliers"] == 0) for r in records])
            cuts = [float(r[f"{prefix}.outliers"]) for r in records if r[f"{prefix}.outliers"]]
        out[prefix] = {
            "clamped": clamped,
            "fallback": fallback,
            **{f"cut_p{q}": (_percentile(cuts, q) if cuts else None) for q in (10, 50, 90)},
        }
    return out


def agreement(records: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]] | None) -> float | None:
    """Share of samples answered the same (after normalisation) as the unpruned run."""
    if not baseline:
        return None
    ref = {r["question_id"]: r["normalized"] for r in baseline}
    shared = [r for r in records if r["question_id"] in ref]
    if not shared:
        return None
    return sum(r["normalized"] == ref[r["question_id"]] for r in shared) / len(shared)


def run_metrics(
    records: Sequence[dict[str, Any]],
    samples: Sequence[EvalSample],
    scorer: Scorer,
    timings: Sequence[Timing],
    baseline: Sequence[dict[str, Any]] | None,
) -> dict[str, Any]:
    """Every run-level number of the table, from ordered per-sample ``records``."""
    kept = _stat(records, "visual_kept")
    flops_p, flops_u = _stat(records, "flops_pruned"), _stat(records, "flops_unpruned")
    steps = sum(t.decode_steps for t in timings)
    scores = _stat(records, "score")
    visual_total = _mean(_stat(records, "visual_total"))
    visual_layer_avg = _mean(_stat(records, "visual_layer_avg"))
    out: dict[str, Any] = {
        "n": len(records),
        "accuracy": _mean(scores),
        "accuracy_ci": list(wilson_interval(sum(scores), len(scores))) if scores else None,
        "accuracy_by_type": accuracy_by_type(records),
        "accuracy_by_type_ci": accuracy_by_type_ci(records),
        "agreement": agreement(records, baseline),
        "visual_total": visual_total,
        "visual_kept_mean": _mean(kept),
        "visual_kept_min": min(kept) if kept else None,
        "visual_kept_max": max(kept) if kept else None,
        "visual_layer_avg": visual_layer_avg,
        "equiv_frac": visual_layer_avg / visual_total if visual_layer_avg is not None and visual_total else None,
        "tokens_layer_avg": _mean(_stat(records, "tokens_layer_avg")),
        "seq_len_mean": _mean(_stat(records, "seq_len")),
        "gflops_prefill": _mean(flops_p) / 1e9 if flops_p else None,
        "flops_rel": sum(flops_p) / sum(flops_u) if flops_p and sum(flops_u) > 0 else None,
        "flops_fastv_rel": _mean(_stat(records, "flops_fastv_ratio")),
        "adaptive": adaptive_cuts(records),
        "prefill_ms": 1e3 * _mean([t.prefill_s for t in timings]) if timings else None,
        "decode_ms_per_token": 1e3 * sum(t.decode_s for t in timings) / steps if steps else None,
    }
    if scorer.extra is not None:
        out.update(scorer.extra([r["prediction"] for r in records], samples))
    return out
