"""The study's gallery, ``kept.png``: a few test images by every method of the run, at one budget.

Each panel is one image under one method's spec as the study ran it (the run whose budget target is
closest to ``gallery.target``; pipelines without a knob as written), with the patches the LLM still held
after the method's last cut at full brightness and the others dimmed (:mod:`tokprune.viz`), the count
in its title. Images: the first ``gallery.images`` questions of the report split taken round-robin over
its question types (the dataset's fixed order, so every study of one config draws the same ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import vision_positions_arg
from .report import method_of

__all__ = ["gallery_runs", "gallery_samples", "write_gallery"]


def gallery_runs(rows: Sequence[dict[str, Any]], target: float) -> list[tuple[str, str]]:
    """``(method, spec)`` per method of the study, in table order: its run nearest ``target``."""
    best: dict[str, tuple[float, str]] = {}
    for row in rows:
        spec = row.get("resolved", {}).get("spec")
        if spec is None:
            continue
        method = method_of(row)
        distance = abs(row["target"] - target) if row.get("target") is not None else 1.0
        if method not in best or distance < best[method][0]:
            best[method] = (distance, spec)
    return [(method, spec) for method, (_, spec) in best.items()]


def gallery_samples(samples: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` samples taken round-robin over question types (types in order of appearance)."""
    by_type: dict[str, list[Any]] = {}
    for s in samples:
        by_type.setdefault(getattr(s, "qtype", "") or "", []).append(s)
    picked: list[Any] = []
    queues = list(by_type.values())
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def write_gallery(session: Any, rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Draw the gallery of ``session``'s study into ``path`` (None when there is nothing to draw)."""
    from matplotlib.figure import Figure

    from .. import viz

    cfg = session.cfg
    samples = gallery_samples(session.dataset.samples, cfg.gallery.images)
    runs = gallery_runs(rows, cfg.gallery.target)
    if not samples or not runs:
        return None
    images = [s.load_image() for s in samples]
    questions = [s.question + cfg.dataset.prompt_suffix for s in samples]
    options = {
        "vision_positions": vision_positions_arg(cfg.positions.vision),
        "llm_positions": cfg.positions.llm,
        "budget_scope": cfg.budget_scope,
    }
    done = []
    for method, spec in runs:
        (run,) = viz.run_specs(session.model, session.processor, images, questions, [spec], **options)
        done.append((method, run))
    fig = Figure(figsize=(1.9 * len(done), 2.1 * len(images) + 0.6))
    axes = fig.subplots(len(images), len(done), squeeze=False)
    for c, (method, run) in enumerate(done):
        kept = run.stats.kept
        last = kept.cut_layers[-1] if kept.cut_layers else None
        for r, image in enumerate(images):
            ax = axes[r][c]
            n_kept, total = viz.draw_kept(ax, image, kept, kept.images_of(r)[0], last)
            where = "" if last is None else f" @L{last}"
            ax.set_title(f"{n_kept}/{total}{where}", fontsize=7)
            if r == 0:
                ax.set_title(f"{method}\n{n_kept}/{total}{where}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"{samples[r].qtype}", fontsize=7)
    fig.suptitle(
        f"kept patches (bright) at the {cfg.gallery.target:.0%} budget target; count kept / patches "
        "after the method's last cut (@L: LLM layer)",
        fontsize=8,
    )
    # fixed margins, not tight_layout: its extra draw of every panel was a third of the gallery's time
    top = 1 - 0.75 / fig.get_figheight()
    fig.subplots_adjust(left=0.02, right=0.995, bottom=0.01, top=top, wspace=0.08, hspace=0.3)
    return viz.save_figure(fig, path, overwrite=True, dpi=100)
