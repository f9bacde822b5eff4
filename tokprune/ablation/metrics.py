"""Run-level metrics from per-sample records and per-batch timings.

Formulas (see ``docs/ablation.md``):

* accuracy = mean over samples of the scorer's 0..1 score (per question type too);
* agreement = share of samples whose normalised prediction equals the unpruned model's;
* kept visual tokens = visual tokens that reach the LLM (after the vision stage and, for LLM-stage
  strategies, after the last LLM-stage cut), mean/min/max over samples;
* tokens averaged over LLM layers = (1/L) * sum_l n_l, the sequence length each decoder layer processes;
* relative prefill FLOPs = sum_i FLOPs_pruned(i) / sum_i FLOPs_unpruned(i) (compute actually spent, so
  longer prompts weigh more), with the adapter's per-layer 4nd^2 + 2n^2d + 2ndm model plus vision tower
  and projector;
* prefill ms = mean over batches of the batch's time to first token; decode ms/token = total decode time /
  total decode steps (one step produces a token for every sample of the batch).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .datasets import EvalSample, Scorer
from .measure import Timing

__all__ = ["run_metrics"]


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
    out: dict[str, Any] = {
        "n": len(records),
        "accuracy": _mean(_stat(records, "score")),
        "accuracy_by_type": accuracy_by_type(records),
        "agreement": agreement(records, baseline),
        "visual_total": _mean(_stat(records, "visual_total")),
        "visual_kept_mean": _mean(kept),
        "visual_kept_min": min(kept) if kept else None,
        "visual_kept_max": max(kept) if kept else None,
        "visual_layer_avg": _mean(_stat(records, "visual_layer_avg")),
        "tokens_layer_avg": _mean(_stat(records, "tokens_layer_avg")),
        "seq_len_mean": _mean(_stat(records, "seq_len")),
        "gflops_prefill": _mean(flops_p) / 1e9 if flops_p else None,
        "flops_rel": sum(flops_p) / sum(flops_u) if flops_p and sum(flops_u) > 0 else None,
        "prefill_ms": 1e3 * _mean([t.prefill_s for t in timings]) if timings else None,
        "decode_ms_per_token": 1e3 * sum(t.decode_s for t in timings) / steps if steps else None,
    }
    if scorer.extra is not None:
        out.update(scorer.extra([r["prediction"] for r in records], samples))
    return out
