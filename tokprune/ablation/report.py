"""The study's report: the table (Markdown, CSV), paired tests, curve summaries and the curves plot.

* Every accuracy carries its Wilson 95% interval (overall and per question type).
* Each run is compared with the unpruned model by an exact McNemar test on the same questions; runs of
  the same target budget are compared with each other (every pair, ``tests.csv``) and grouped with the
  best one when the test cannot separate them (``summary.md``, "At each budget").
* Runs that differ only in ``seed`` (the random control) are one line: mean accuracy and range.
* A *method* is a run's label without its budget knob and seed: its runs form one curve. Its summary
  number is the normalised area under accuracy vs equivalent tokens over the targets' range
  (:func:`~tokprune.ablation.statistics.normalized_auc`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TokpruneError
from .statistics import indistinguishable, mcnemar_exact, normalized_auc, paired_counts

__all__ = [
    "PlotUnavailableError",
    "check_plotting",
    "curves_plot",
    "markdown_table",
    "method_of",
    "paired_tests",
    "pareto_front",
    "readings_text",
    "table_rows",
    "write_reports",
]

REFERENCE_LABEL = "cls_knee+text_interact"
ALPHA = 0.05


class PlotUnavailableError(TokpruneError, ImportError):
    """``plot=true`` without matplotlib."""


def check_plotting() -> None:
    """Fail before any run when the plot was asked for but cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailableError(
            f"plot=true needs matplotlib ({exc}); install it with pip install 'tokprune[plot]', or set plot=false"
        ) from None


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ordered(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: 0 if r["role"] == "baseline" else 1)  # stable: plan order otherwise


def method_of(row: dict[str, Any]) -> str:
    """The run's label without its budget knob's parameter and without ``seed``: one curve per method."""
    from ..spec import format_terms, parse_spec

    if row["label"] == "none":
        return "none"
    knob = row.get("knob")
    name, _, param = knob.rpartition(".") if knob else ("", "", "")
    terms = parse_spec(row["label"])
    for t in terms:
        t.params = {k: v for k, v in t.params.items() if k != "seed" and not (t.name == name and k == param)}
    return format_terms(terms)


def _scores(row: dict[str, Any]) -> dict[str, float]:
    return {str(p["question_id"]): float(p["score"]) for p in row.get("predictions", [])}


def _p_value(a: dict[str, float], b: dict[str, float]) -> tuple[int, int, float | None]:
    shared = sorted(set(a) & set(b))
    if not shared:
        return 0, 0, None
    x, y = paired_counts([a[q] for q in shared], [b[q] for q in shared])
    return x, y, mcnemar_exact(x, y)


def _groups(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by (method, target): seeds of one method at one budget share a line."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in _ordered(rows):
        groups.setdefault((method_of(r), r.get("target")), []).append(r)
    return list(groups.values())


def _seeded(group: list[dict[str, Any]]) -> bool:
    return len(group) > 1


def _mean_metric(group: list[dict[str, Any]], key: str) -> float | None:
    values = [r["metrics"].get(key) for r in group if r["metrics"].get(key) is not None]
    return sum(values) / len(values) if values else None


def _at_targets(rows: Sequence[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    """target -> one run per method that reached it (the first seed of a seeded method). A run whose
    calibration missed the target is at another budget and is compared with nothing there."""
    out: dict[float, list[dict[str, Any]]] = {}
    for group in _groups(rows):
        r = group[0]
        if r.get("target") is not None and (r.get("calibration") or {}).get("reachable", True):
            out.setdefault(r["target"], []).append(r)
    return out


def paired_tests(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exact McNemar tests: every run against the unpruned one, and every pair of methods that reached the
    same target (the first seed stands for a seeded method). One dict per test."""
    base = next((r for r in rows if r["role"] == "baseline"), None)
    out = []
    if base is not None:
        ref = _scores(base)
        for r in rows:
            if r is not base:
                b, c, p = _p_value(_scores(r), ref)
                out.append({"target": r.get("target"), "a": r["label"], "b": "none", "a_better": b, "b_better": c, "p": p})
    for target, members in _at_targets(rows).items():
        for i, ra in enumerate(members):
            for rb in members[i + 1 :]:
                b, c, p = _p_value(_scores(ra), _scores(rb))
                out.append({"target": target, "a": ra["label"], "b": rb["label"], "a_better": b, "b_better": c, "p": p})
    return out


def _p_lookup(tests: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float | None]:
    out: dict[tuple[str, str], float | None] = {}
    for t in tests:
        out[(t["a"], t["b"])] = out[(t["b"], t["a"])] = t["p"]
    return out


# ------------------------------------------------------------------------------------------------ table


def _ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _adaptive(m: dict[str, Any]) -> str:
    parts = []
    for name, d in m.get("adaptive", {}).items():
        cut = "/".join(_fmt(d.get(f"cut_p{q}"), ".0f") for q in (10, 50, 90))
        parts.append(f"{name}: {_fmt(d.get('clamped'), '.0%')} / {_fmt(d.get('fallback'), '.0%')} / {cut}")
    return "; ".join(parts) if parts else "-"


def table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat per-run dicts (the CSV): every metric, per-type accuracy and its interval, adaptive-cut
    diagnostics as ``cut_<strategy>_<stat>``, the p-value against the unpruned run."""
    p_base = {(t["a"]): t["p"] for t in paired_tests(rows) if t["b"] == "none"}
    out = []
    for r in _ordered(rows):
        m = r["metrics"]
        flat = {"run": r["label"] + _positions(r), "method": method_of(r), "target": r.get("target"),
                "budget": r["budget"], "role": r["role"], "spec": r["spec"], "key": r["key"]}
        flat.update({k: v for k, v in m.items() if not isinstance(v, (dict, list))})
        if m.get("accuracy_ci"):
            flat["accuracy_lo"], flat["accuracy_hi"] = m["accuracy_ci"]
        flat["p_vs_unpruned"] = p_base.get(r["label"])
        for t, v in m.get("accuracy_by_type", {}).items():
            flat[f"acc_{t}"] = v
            lo_hi = m.get("accuracy_by_type_ci", {}).get(t)
            if lo_hi:
                flat[f"acc_{t}_lo"], flat[f"acc_{t}_hi"] = lo_hi
        for name, d in m.get("adaptive", {}).items():
            flat.update({f"cut_{name}_{k}": v for k, v in d.items()})
        cal = r.get("calibration") or {}
        flat.update({f"calibration_{k}": v for k, v in cal.items()})
        flat["wall_s"] = r["wall_s"]
        out.append(flat)
    return out


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The headline table: one line per method and budget (seeds of the random control merged)."""
    rows = _ordered(rows)
    types = sorted({t for r in rows for t in r["metrics"].get("accuracy_by_type", {})})
    extra = [k for k in ("f1", "precision", "recall") if any(k in r["metrics"] for r in rows)]
    head = ["run", "target", "equiv. tokens", "kept (last layer)", "FLOPs", "FLOPs (FastV formula, LLM)",
            "acc [95% CI]", "Δacc", "p vs unpruned", *[f"acc {t} [95% CI]" for t in types], *extra, "agree",
            "adaptive cut: clamped / fell back / cut p10/p50/p90", "prefill ms", "wall s"]
    base = next((r for r in rows if r["role"] == "baseline"), None)
    base_acc = base["metrics"]["accuracy"] if base is not None else None
    p_base = _p_lookup(paired_tests(rows))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for group in _groups(rows):
        r, m = group[0], group[0]["metrics"]
        cal = r.get("calibration")
        target = "-" if r.get("target") is None else f"{r['target']:.0%}" + ("" if not cal or cal["reachable"] else " (not reached)")
        accs = [g["metrics"]["accuracy"] for g in group if g["metrics"].get("accuracy") is not None]
        if _seeded(group):
            acc = sum(accs) / len(accs)
            label = f"`{method_of(r)}` ×{len(group)} seeds" + (f" `{_knob_value(r)}`" if r.get("knob") else "")
            acc_cell = f"{acc:.3f} (seeds {min(accs):.3f}-{max(accs):.3f})"
            p = "-"
            types_cells = [_fmt(_mean_metric_type(group, t), ".3f") for t in types]
        else:
            acc = m.get("accuracy")
            label = f"`{r['label']}`"
            acc_cell = _ci(acc, m.get("accuracy_ci"))
            p = "-" if r["role"] == "baseline" else _fmt(p_base.get((r["label"], "none")), ".2g")
            types_cells = [_ci(m.get("accuracy_by_type", {}).get(t), m.get("accuracy_by_type_ci", {}).get(t)) for t in types]
        label += _positions(r)
        delta = acc - base_acc if base_acc is not None and acc is not None else None
        equiv = (f"{m['visual_layer_avg']:.1f} ({m['equiv_frac']:.1%})" if m.get("equiv_frac") is not None else "-")
        kept = (f"{m['visual_kept_mean']:.1f} [{m['visual_kept_min']:.0f}-{m['visual_kept_max']:.0f}]"
                if m.get("visual_kept_mean") is not None else "-")
        cells = [
            label, target, equiv, kept, _fmt(_mean_metric(group, "flops_rel"), ".1%"),
            _fmt(_mean_metric(group, "flops_fastv_rel"), ".1%"), acc_cell,
            "-" if r["role"] == "baseline" else _fmt(delta, "+.3f"), p, *types_cells,
            *[_fmt(m.get(k), ".3f") for k in extra], _fmt(_mean_metric(group, "agreement"), ".3f"), _adaptive(m),
            _fmt(m.get("prefill_ms"), ".1f"), _fmt(sum(g.get("wall_s", 0.0) for g in group), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _positions(row: dict[str, Any]) -> str:
    """Non-default position-id modes of the run, for its label (defaults: vision ``method``, llm ``keep``)."""
    pos = (row.get("resolved") or {}).get("positions") or {}
    default = {"vision": "method", "llm": "keep"}
    odd = [f"{stage}={mode}" for stage, mode in sorted(pos.items()) if mode != default.get(stage, "keep")]
    return f" (positions {', '.join(odd)})" if odd else ""


def _knob_value(row: dict[str, Any]) -> str:
    name, _, param = row["knob"].rpartition(".")
    from ..spec import parse_spec

    for t in parse_spec(row["label"]):
        if t.name == name and param in t.params:
            return f"{param}={t.params[param]}"
    return ""


def _mean_metric_type(group: list[dict[str, Any]], qtype: str) -> float | None:
    values = [g["metrics"].get("accuracy_by_type", {}).get(qtype) for g in group]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------ curves and tests


def curves(rows: Sequence[dict[str, Any]], key: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """method -> points ``(x, accuracy, low, high)`` sorted by ``x`` (metric ``key``); seeds averaged, their
    range as the error bar; otherwise the Wilson interval."""
    out: dict[str, list[tuple[float, float, float, float]]] = {}
    for group in _groups(rows):
        r = group[0]
        if r["role"] == "baseline" or r["metrics"].get(key) is None:
            continue
        accs = [g["metrics"]["accuracy"] for g in group]
        x = _mean_metric(group, key)
        assert x is not None
        if _seeded(group):
            point = (x, sum(accs) / len(accs), min(accs), max(accs))
        else:
            lo, hi = r["metrics"].get("accuracy_ci") or (accs[0], accs[0])
            point = (x, accs[0], lo, hi)
        out.setdefault(method_of(r), []).append(point)
    return {k: sorted(v) for k, v in out.items()}


def curve_summary(rows: Sequence[dict[str, Any]], tolerance: float = 0.01) -> list[dict[str, Any]]:
    """Per method: normalised area under accuracy vs equivalent tokens over the targets' range (``None``
    when the curve does not span it; ends within ``tolerance`` of the range count as reaching it)."""
    targets = sorted({r["target"] for r in rows if r.get("target") is not None})
    out = []
    for method, points in curves(rows, "equiv_frac").items():
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        auc = None
        if len(targets) >= 2:
            low, high = targets[0], targets[-1]
            xs = [low if abs(x - low) <= tolerance else high if abs(x - high) <= tolerance else x for x in xs]
            auc = normalized_auc(xs, ys, low, high)
        out.append({"method": method, "auc": auc, "points": len(points),
                    "covers": (min(p[0] for p in points), max(p[0] for p in points))})
    return out


def budget_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target: the methods (first seed for seeded ones) by accuracy, each with its p-value against the
    best, and the group the test cannot separate from the best (``indistinguishable``)."""
    lookup = _p_lookup(paired_tests(rows))
    out = []
    for target, members in sorted(_at_targets(rows).items()):
        acc = {r["label"]: r["metrics"]["accuracy"] for r in members}
        best = max(acc, key=lambda k: acc[k])
        p = {k: lookup.get((k, best)) for k in acc if k != best}
        tied = indistinguishable(acc, {k: v for k, v in p.items() if v is not None}, ALPHA)
        out.append({"target": target, "best": best, "accuracy": acc, "p_vs_best": p, "indistinguishable": tied})
    return out


def readings_text(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]]) -> list[str]:
    """Lines comparing the reference method's readings (docs/reference-method.md's switches: the same
    strategies with other parameters, e.g. ``cls_knee(score=cls_attn_mean)+text_interact``), best area
    first, each with its accuracy at every target; none when fewer than two readings ran."""
    from ..spec import parse_spec

    def strategies_of(method: str) -> str:
        return "+".join(t.name for t in parse_spec(method))

    readings = [s for s in summary if strategies_of(s["method"]) == REFERENCE_LABEL]
    if len(readings) < 2:
        return []
    accuracy: dict[str, dict[float, float]] = {}
    for group in _groups(rows):
        r = group[0]
        if r.get("target") is not None:
            accuracy.setdefault(method_of(r), {})[r["target"]] = r["metrics"]["accuracy"]
    targets = sorted({t for acc in accuracy.values() for t in acc})
    lines = [
        "",
        "### The reference method's readings (docs/reference-method.md: one switch each)",
        "",
        "| reading | area | " + " | ".join(f"acc at {t:.0%}" for t in targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for s in sorted(readings, key=lambda s: -(s["auc"] if s["auc"] is not None else -1)):
        name = f"`{s['method']}`" + (" (default)" if s["method"] == REFERENCE_LABEL else "")
        acc = accuracy.get(s["method"], {})
        cells = " | ".join(_fmt(acc.get(t), ".3f") for t in targets)
        lines.append(f"| {name} | {_fmt(s['auc'], '.3f')} | {cells} |")
    return lines


def summary_text(rows: Sequence[dict[str, Any]], tolerance: float = 0.01) -> str:
    """The sections under the table: curve areas, and what the paired tests separate at each budget."""
    lines = []
    summary = curve_summary(rows, tolerance)
    targets = sorted({r["target"] for r in rows if r.get("target") is not None})
    if summary and len(targets) >= 2:
        lines += ["", f"### Curves: normalised area under accuracy vs equivalent tokens, {targets[0]:.0%}-{targets[-1]:.0%}",
                  "", "| method | area (mean accuracy over the range) | runs | equivalent tokens covered |", "|---|---|---|---|"]
        for s in sorted(summary, key=lambda s: -(s["auc"] if s["auc"] is not None else -1)):
            lo, hi = s["covers"]
            area = _fmt(s["auc"], ".3f") if s["auc"] is not None else "- (does not span the range)"
            lines.append(f"| `{s['method']}` | {area} | {s['points']} | {lo:.1%}-{hi:.1%} |")
    lines += readings_text(rows, summary)
    per_budget = budget_summary(rows)
    if per_budget:
        lines += ["", f"### At each budget: exact McNemar test against the most accurate run (α = {ALPHA}, unadjusted)", ""]
        for b in per_budget:
            tied = ", ".join(f"`{k}`" for k in b["indistinguishable"] if k != b["best"]) or "none"
            lines.append(
                f"* **{b['target']:.0%}**: best `{b['best']}` ({b['accuracy'][b['best']]:.3f}); not separated from it: {tied}. "
                + "p vs best: " + ", ".join(f"`{k}` {_fmt(v, '.2g')}" for k, v in sorted(b["p_vs_best"].items(), key=lambda kv: -(kv[1] or 0)))
            )
        lines.append("")
        lines.append("Every pair at each budget, and each run against the unpruned model: `tests.csv`.")
    return "\n".join(lines) + "\n"


def csv_text(flat: Sequence[dict[str, Any]]) -> str:
    columns: list[str] = []
    for f in flat:
        columns.extend(k for k in f if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- plot


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats (lower or equal cost, strictly higher accuracy), by cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def curves_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy vs equivalent visual tokens (% of an image's tokens, averaged over LLM layers) and vs
    prefill FLOPs (% of unpruned): one line per method through its budgets, error bars = Wilson 95%
    intervals (the seed range for seeded methods), the unpruned accuracy as a dashed line with its
    interval as a grey band."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    panels = [("equiv_frac", "equivalent visual tokens (% of an image's tokens, mean over LLM layers)"),
              ("flops_rel", "prefill FLOPs (% of unpruned)")]
    base = next((r for r in rows if r["role"] == "baseline"), None)
    # tab20's dark shades, then its light ones (its reds, 6 and 7, left to the reference): one colour per
    # method up to 18 methods
    tab20 = plt.get_cmap("tab20").colors
    palette = [tab20[j] for j in [*range(0, 20, 2), *range(1, 20, 2)] if j not in (6, 7)]
    methods = list(curves(rows, "equiv_frac"))
    for ax, (key, xlabel) in zip(axes, panels):
        for i, (method, points) in enumerate(curves(rows, key).items()):
            ref = method == REFERENCE_LABEL
            index = methods.index(method) if method in methods else i
            color = "crimson" if ref else palette[index % len(palette)]
            xs = [100 * p[0] for p in points]
            ys = [100 * p[1] for p in points]
            # max(0, .): at 0% or 100% the interval's end equals the estimate up to rounding
            err = [[100 * max(0.0, p[1] - p[2]) for p in points], [100 * max(0.0, p[3] - p[1]) for p in points]]
            ax.errorbar(xs, ys, yerr=err, color=color, marker="*" if ref else "o^vDPXhp<>"[i % 10],
                        markersize=12 if ref else 6, linewidth=2.2 if ref else 1.3, capsize=3, label=method,
                        zorder=3 if ref else 2)
        if base is not None:
            acc = 100 * base["metrics"]["accuracy"]
            ax.axhline(acc, color="black", linestyle="--", linewidth=0.9, label="unpruned", zorder=1)
            ci = base["metrics"].get("accuracy_ci")
            if ci:
                ax.axhspan(100 * ci[0], 100 * ci[1], color="0.85", zorder=0)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if key == "equiv_frac":
            ax.set_xlim(left=0)  # FLOPs never go near 0 (the tower and the text remain): let that axis zoom
    axes[0].set_ylabel("accuracy (%), 95% interval")
    axes[0].set_title("accuracy vs equivalent tokens")
    axes[1].set_title("accuracy vs prefill compute")
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    ncol = min(len(legend), 4) or 1
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, frameon=False, fontsize=8.5)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04 + 0.045 * -(-len(legend) // ncol), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(rows: Sequence[dict[str, Any]], out_dir: str | Path, plot: bool = True, tolerance: float = 0.01) -> dict[str, Path]:
    """``summary.md`` (table, curve areas, per-budget tests), ``summary.csv``, ``tests.csv`` and, with
    ``plot``, ``curves.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    files = {"table_md": out_dir / "summary.md", "table_csv": out_dir / "summary.csv", "tests_csv": out_dir / "tests.csv"}
    files["table_md"].write_text(markdown_table(rows) + summary_text(rows, tolerance))
    files["table_csv"].write_text(csv_text(table_rows(rows)))
    files["tests_csv"].write_text(csv_text(paired_tests(rows)))
    if plot:
        first = rows[0]["resolved"] if rows else {}
        ds = first.get("dataset", {})
        name = ds.get("name", "") if ds.get("name") != "jsonl" else Path(str(ds.get("path", ""))).stem
        title = f"{Path(str(first.get('model', ''))).name} on {name} (n={ds.get('n', '')}): accuracy vs budget"
        files["plot"] = curves_plot(rows, out_dir / "curves.png", title=title)
    return files
