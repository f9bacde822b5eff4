"""The summary table (Markdown and CSV, unpruned baseline first) and the Pareto plot (PNG)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "pareto_plot", "table_rows", "write_reports"]

REFERENCE_LABEL = "cls_knee+text_interact"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ordered(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: 0 if r["role"] == "baseline" else 1)  # stable: plan order otherwise


def table_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat per-run dicts (the CSV): every metric, per-type accuracy as ``acc_<type>`` columns."""
    out = []
    for r in _ordered(rows):
        m = r["metrics"]
        flat = {"run": r["label"], "budget": r["budget"], "role": r["role"], "spec": r["spec"], "key": r["key"]}
        flat.update({k: v for k, v in m.items() if not isinstance(v, dict)})
        flat.update({f"acc_{k}": v for k, v in m.get("accuracy_by_type", {}).items()})
        flat["wall_s"] = r["wall_s"]
        out.append(flat)
    return out


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The headline table: one line per run, the unpruned baseline first."""
    rows = _ordered(rows)
    types = sorted({t for r in rows for t in r["metrics"].get("accuracy_by_type", {})})
    extra = [k for k in ("f1", "precision", "recall") if any(k in r["metrics"] for r in rows)]
    head = ["run", "budget", "acc", "Δacc", *[f"acc {t}" for t in types], *extra, "agree",
            "visual kept mean [min-max]", "tokens/layer", "FLOPs", "prefill ms", "decode ms/tok", "peak MB", "wall s"]
    base = next((r["metrics"]["accuracy"] for r in rows if r["role"] == "baseline"), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        m = r["metrics"]
        delta = m["accuracy"] - base if base is not None and m.get("accuracy") is not None else None
        kept = (
            f"{m['visual_kept_mean']:.1f} [{m['visual_kept_min']:.0f}-{m['visual_kept_max']:.0f}] / {m['visual_total']:.0f}"
            if m.get("visual_kept_mean") is not None
            else "-"
        )
        cells = [
            f"`{r['label']}`",
            r["budget"],
            _fmt(m.get("accuracy"), ".3f"),
            "-" if r["role"] == "baseline" else _fmt(delta, "+.3f"),
            *[_fmt(m.get("accuracy_by_type", {}).get(t), ".3f") for t in types],
            *[_fmt(m.get(k), ".3f") for k in extra],
            _fmt(m.get("agreement"), ".3f"),
            kept,
            _fmt(m.get("tokens_layer_avg"), ".1f"),
            _fmt(m.get("flops_rel"), ".1%"),
            _fmt(m.get("prefill_ms"), ".1f"),
            _fmt(m.get("decode_ms_per_token"), ".2f"),
            _fmt(m.get("peak_mem_mb"), ".0f"),
            _fmt(r.get("wall_s"), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    flat = table_rows(rows)
    columns: list[str] = []
    for f in flat:
        columns.extend(k for k in f if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def _family(label: str) -> str:
    """Strategy names without parameters: points of one sweep share a colour and a legend entry."""
    import re

    return re.sub(r"\([^()]*(\([^()]*\))*[^()]*\)", "", label)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats (lower or equal cost, strictly higher accuracy), by cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _style(row: dict[str, Any], families: list[str]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    fam = _family(row["label"])
    if row["role"] == "baseline":
        return dict(marker="s", color="black", s=90, zorder=4, label="unpruned (baseline)")
    if row["role"] == "reference" or fam == REFERENCE_LABEL:
        # Big but drawn *under* the other markers, so a baseline matched to the same budget stays visible.
        return dict(marker="*", color="crimson", s=420, zorder=2, edgecolors="black", linewidths=0.6,
                    label=f"{fam} (reference)")
    i = families.index(fam)
    palette = plt.get_cmap("tab10").colors
    colors = [c for j, c in enumerate(palette) if j != 3]  # tab10's red is the reference's
    return dict(marker="o^vDPXhp<>"[i % 10], color=colors[i % len(colors)], s=75, zorder=3, edgecolors="white",
                linewidths=0.5, label=fam)


def pareto_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Accuracy vs mean kept visual tokens and vs relative prefill FLOPs; one marker per run.

    The reference method is a large red star, the unpruned baseline a black square plus a dashed line at
    its accuracy; each other strategy family has its own colour and marker (one legend entry); a dotted
    step line is the Pareto front over all runs (best accuracy at or below each cost).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in _ordered(rows) if r["metrics"].get("accuracy") is not None]
    families = list(dict.fromkeys(
        _family(r["label"]) for r in rows if r["role"] not in ("baseline", "reference") and _family(r["label"]) != REFERENCE_LABEL
    ))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    panels = [("visual_kept_mean", "kept visual tokens (mean per sample, after all stages)", 1.0),
              ("flops_rel", "prefill FLOPs (% of unpruned)", 100.0)]
    base = next((r for r in rows if r["role"] == "baseline"), None)
    for ax, (key, xlabel, scale) in zip(axes, panels):
        groups: dict[str, list[tuple[float, float, dict[str, Any]]]] = {}
        for r in rows:
            if r["metrics"].get(key) is not None:
                style = _style(r, families)
                groups.setdefault(style["label"], []).append((r["metrics"][key] * scale, 100 * r["metrics"]["accuracy"], style))
        for points in groups.values():
            ax.scatter([p[0] for p in points], [p[1] for p in points], **points[0][2])
        front = pareto_front([(x, y) for points in groups.values() for x, y, _ in points])
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.55", linewidth=1,
                    linestyle=":", zorder=1, label="Pareto front (all runs)")
        if base is not None:
            ax.axhline(100 * base["metrics"]["accuracy"], color="black", linestyle="--", linewidth=0.8, zorder=1)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0, right=max((p[0] for g in groups.values() for p in g), default=1) * 1.06)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_title("accuracy vs kept visual tokens")
    axes[1].set_title("accuracy vs prefill compute")
    legend: dict[str, Any] = {}
    for ax in axes:  # the front may be drawn in one panel only
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    ncol = min(len(labels), 5)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=9, markerscale=1.0)
    if title:
        fig.suptitle(title)
    rows_of_legend = -(-len(labels) // ncol) if labels else 0
    fig.tight_layout(rect=(0, 0.04 + 0.05 * rows_of_legend, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_reports(rows: Sequence[dict[str, Any]], out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """``summary.md``, ``summary.csv`` and (with matplotlib) ``pareto.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    files = {"table_md": out_dir / "summary.md", "table_csv": out_dir / "summary.csv"}
    files["table_md"].write_text(markdown_table(rows))
    files["table_csv"].write_text(csv_text(rows))
    if plot:
        first = rows[0]["resolved"] if rows else {}
        ds = first.get("dataset", {})
        name = ds.get("name", "") if ds.get("name") != "jsonl" else Path(str(ds.get("path", ""))).stem
        title = f"{Path(str(first.get('model', ''))).name} on {name} (n={ds.get('n', '')}): accuracy vs budget"
        png = pareto_plot(rows, out_dir / "pareto.png", title=title)
        if png is not None:
            files["plot"] = png
    return files
