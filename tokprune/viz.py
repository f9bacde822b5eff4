"""See what a method keeps: images with their kept patches lit and the dropped ones dimmed.

Everything is drawn from a prefill's :class:`~tokprune.keptmap.KeptMap` (``stats.kept``), by matplotlib:

* :func:`show` runs specs on one image and returns a figure, one row per spec: the vision stage's
  survivors, then one panel per LLM layer that cut (LLaVA-NeXT: the base view and the tiles side by
  side), each titled with the count kept; with ``scores=True`` a heat map of the strategy's own scores
  beside each mask (:func:`token_scores`: the ``scores``/``relevance`` diagnostics the strategy computed,
  or a selection order's rank; no score is computed twice). ``tokprune show`` is its command line.
* :func:`draw_kept` and :func:`draw_scores` draw one panel on an axis (notebooks, the study's gallery).

A view (an image's one tower pass, or LLaVA-NeXT's base view and its unpadded tile grid) is drawn over
the whole image: a processor that centre-crops draws the crop's patches stretched over the image.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .errors import TokpruneError
from .keptmap import KeptMap, strategy_columns

if TYPE_CHECKING:  # matplotlib is imported where it draws (a core dependency, but heavy)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL.Image import Image as PILImage

    from .stats import PruneStats

__all__ = [
    "DIM",
    "ShowError",
    "SpecRun",
    "View",
    "draw_kept",
    "draw_scores",
    "load_model",
    "model_inputs",
    "open_image",
    "run_specs",
    "save_figure",
    "show",
    "token_scores",
    "views",
    "world_image",
]

#: Opacity of the black veil over a dropped patch (a kept one has none): dropped pixels keep 30% of
#: their brightness.
DIM = 0.7
#: Diagnostics read as scores, in order of preference (higher = more important).
SCORE_KEYS = ("scores", "relevance")
#: Diagnostics read as a selection order (``[B, K]`` token indices, first pick first; -1 padded).
ORDER_KEYS = ("order",)


class ShowError(TokpruneError, ValueError):
    """Bad input to :func:`show` or ``tokprune show``: the message names it and what to do."""


# ---------------------------------------------------------------------------------------- the views


@dataclass(frozen=True)
class View:
    """The tokens of one image drawn on one grid: ``select`` (bool ``[N]``) picks them; rows and cols of
    the grid start at ``row0``/``col0``."""

    label: str
    select: Tensor
    rows: int
    cols: int
    row0: int
    col0: int


def views(cells: Tensor) -> list[View]:
    """The views of one image from its cells (long ``[N, 4]``): the tower pass (tile 0; LLaVA-NeXT's base
    view) and, where there are tiles, their unpadded grid; frame 0 only (an image has one)."""
    patch = (cells[:, 2] >= 0) & (cells[:, 1] <= 0)
    tiled = bool((patch & (cells[:, 0] > 0)).any())
    out = []
    for label, select in (
        ("base view" if tiled else "", patch & (cells[:, 0] == 0)),
        ("tiles", patch & (cells[:, 0] > 0)),
    ):
        if not bool(select.any()):
            continue
        r, c = cells[select, 2], cells[select, 3]
        r0, c0 = int(r.min()), int(c.min())
        out.append(View(label, select, int(r.max()) - r0 + 1, int(c.max()) - c0 + 1, r0, c0))
    return out


def _grid(cells: Tensor, view: View, values: Tensor) -> np.ndarray:
    """``values`` (``[N]``) of the view's tokens laid on its grid, fp64 ``[rows, cols]``, NaN where no token."""
    out = np.full((view.rows, view.cols), np.nan)
    sel = view.select
    out[(cells[sel, 2] - view.row0).numpy(), (cells[sel, 3] - view.col0).numpy()] = values[sel].double().numpy()
    return out


def _image_array(image: PILImage | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)


def draw_kept(
    ax: Axes, image: PILImage | np.ndarray, kept: KeptMap, index: int, layer: int | None = None, view: int = 0
) -> tuple[int, int]:
    """Draw image ``index`` of ``kept`` with the patches kept after the vision stage (``layer=None``) or
    still held after the cut at or before ``layer`` at full brightness and the others dimmed; ``view``:
    which of :func:`views` (LLaVA-NeXT: 0 base, 1 tiles). Returns ``(kept, patches)`` of that view."""
    if kept.cells is None:
        raise ShowError(
            "this model family gives no patch grid (its adapter has no patch_cells), so nothing can be drawn"
        )
    cells = kept.cells[index]
    v = views(cells)[view]
    mask = kept.kept(layer)[index]
    grid = _grid(cells, v, mask.double())
    pixels = _image_array(image)
    h, w = pixels.shape[:2]
    veil = np.zeros((v.rows, v.cols, 4))
    veil[..., 3] = np.where(grid == 0.0, DIM, 0.0)  # dropped: veiled; kept or no token: clear
    ax.imshow(pixels, extent=(0, w, h, 0), interpolation="nearest")
    ax.imshow(veil, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return int(mask[v.select].sum()), int(v.select.sum())


def draw_scores(
    ax: Axes, image: PILImage | np.ndarray, kept: KeptMap, index: int, scores: Tensor, view: int = 0
) -> None:
    """A heat map of ``scores`` (fp ``[I, N]`` per image token, NaN: none) over image ``index``, greyed."""
    assert kept.cells is not None
    cells = kept.cells[index]
    v = views(cells)[view]
    grid = _grid(cells, v, scores[index])
    pixels = _image_array(image)
    h, w = pixels.shape[:2]
    ax.imshow(pixels.mean(axis=2), cmap="gray", extent=(0, w, h, 0), interpolation="nearest", alpha=0.5)
    ax.imshow(np.ma.masked_invalid(grid), cmap="inferno", extent=(0, w, h, 0), interpolation="nearest", alpha=0.75)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------- scores


def token_scores(stats: PruneStats, pipeline: Any, layer: int | None = None) -> tuple[str, Tensor] | None:
    """The scores the step at a stage ran on, per image token: ``(what, fp64 [I, N])``, NaN where none.

    ``layer=None``: the vision step's ``scores`` / ``relevance`` diagnostic, or the rank of its selection
    ``order`` (first pick = highest); ``layer=K``: the LLM step's at K, read through each token's column.
    None when the step reports none (or its rows are not images: ``budget_scope="tile"``).
    """
    kept = stats.kept
    if kept is None:
        return None
    step = pipeline.vision if layer is None else next((s for s in pipeline.llm if layer in s.llm_layers), None)
    if step is None:
        return None
    prefix = step.name if layer is None or len(step.llm_layers) == 1 else f"{step.name}@{layer}"
    diag = stats.diagnostics
    found = next(((k, diag[f"{prefix}.{k}"]) for k in SCORE_KEYS + ORDER_KEYS if f"{prefix}.{k}" in diag), None)
    if found is None or not isinstance(found[1], Tensor):
        return None
    key, value = found
    value = value.double()
    if key in ORDER_KEYS:  # a selection order: the first pick scores highest
        rank = torch.full((value.shape[0], int(value.max()) + 2), float("nan"), dtype=torch.float64)
        picks = value.long()
        weight = (picks.shape[1] - torch.arange(picks.shape[1], dtype=torch.float64))[None, :].expand_as(value)
        rank.scatter_(1, torch.where(picks >= 0, picks, rank.shape[1] - 1), weight)
        value, key = rank[:, :-1], f"{key} (first pick brightest)"
    out = torch.full(kept.vision.shape, float("nan"), dtype=torch.float64)
    if layer is None:
        if value.shape[0] != kept.num_images:
            return None
        column = strategy_columns(kept.cells, kept.vision.shape[1]).expand_as(kept.vision)
        ok = (column >= 0) & (column < value.shape[1])
        out[ok] = value.gather(1, column.clamp(0, value.shape[1] - 1))[ok]
    else:
        column = kept.columns[layer]
        rows = kept.image_sample[:, None].expand_as(column)
        ok = (column >= 0) & (column < value.shape[1])
        out[ok] = value[rows[ok], column[ok]]
    return key, out


# ---------------------------------------------------------------------------------------- running


@dataclass
class SpecRun:
    """One spec's prefill on the shown images: its pipeline and stats."""

    spec: str
    pipeline: Any
    stats: PruneStats


def _context_length(model: Any) -> int | None:
    config = getattr(model.config, "text_config", model.config)
    return getattr(config, "max_position_embeddings", None)


def model_inputs(model: Any, processor: Any, images: Sequence[PILImage], questions: Sequence[str]) -> dict[str, Tensor]:
    """The processor's left-padded batch for ``images`` and ``questions``, checked against the context."""
    processor.tokenizer.padding_side = "left"
    from .ablation.loading import build_prompts  # the study's prompts: show draws what a study runs

    prompts = build_prompts(processor, questions)  # one image per prompt, nested (SmolVLM's processor needs it)
    inputs = processor(text=prompts, images=[[image] for image in images], return_tensors="pt", padding=True)
    limit = _context_length(model)
    if limit is not None and inputs["input_ids"].shape[1] > limit:
        raise ShowError(
            f"the prompt is {inputs['input_ids'].shape[1]} tokens (image and question), longer than the model's "
            f"context of {limit}; shorten the question"
        )
    device = next(model.parameters()).device
    inputs = inputs.to(device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return dict(inputs)


def run_specs(
    model: Any,
    processor: Any,
    images: Sequence[PILImage],
    questions: Sequence[str],
    specs: Sequence[Any],
    **options: Any,
) -> list[SpecRun]:
    """One prefill per spec on ``images`` (one question each): the stats of each (``options`` go to ``patch``)."""
    import tokprune

    from .registry import get

    inputs = model_inputs(model, processor, images, questions)
    options.setdefault("question_end", processor.tokenizer)
    out = []
    for spec in specs:
        pipeline = get(spec)
        with tokprune.pruned(model, pipeline, **options) as run, torch.inference_mode():
            model(**inputs)
        assert run.stats is not None and run.stats.kept is not None
        out.append(SpecRun(str(spec), pipeline, run.stats))
    return out


def load_model(model: str | os.PathLike[str] | None) -> tuple[Any, Any]:
    """A local checkpoint directory or an embedded model's name (None: the embedded default), on the CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import models

    name = models.DEFAULT_MODEL if model is None else str(model)
    path = Path(name).expanduser()
    if not path.is_dir():
        try:
            path = models.path(name)
        except KeyError:
            raise ShowError(
                f"model {name!r} is neither a local checkpoint directory nor an embedded model "
                f"({', '.join(models.names())})"
            ) from None
    try:
        processor = AutoProcessor.from_pretrained(path)
        loaded = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise ShowError(f"cannot load a multimodal model from {str(path)!r}: {exc}") from None
    return loaded.eval(), processor


def open_image(path: str | os.PathLike[str]) -> PILImage:
    """The image at ``path`` as RGB, or a :class:`ShowError` saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ShowError(f"image {str(p)!r} does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ShowError(f"{str(p)!r} is not an image Pillow can read ({exc})") from None


def world_image(seed: int = 0) -> tuple[PILImage, str]:
    """A scene of the embedded model's shapes world and its question (the test split's sample ``seed``)."""
    from .data import world

    sample = world.benchmark("test", n=seed + 1)[seed]
    return sample.image, sample.question


# ---------------------------------------------------------------------------------------- the figure


def _stages(run: SpecRun) -> list[int | None]:
    kept = run.stats.kept
    assert kept is not None
    if run.pipeline.vision is None and kept.cut_layers:  # an in-LLM method: its cuts only
        return list(kept.cut_layers)
    return [None, *kept.cut_layers]


def show(
    image: PILImage | str | os.PathLike[str] | None = None,
    question: str | None = None,
    specs: Sequence[Any] = ("divprune(keep=32)",),
    *,
    model: Any = None,
    processor: Any = None,
    scores: bool = False,
    **options: Any,
) -> Figure:
    """Run each spec on ``image`` and draw what it keeps: one row per spec, one panel per stage that cut.

    ``image``: a PIL image or a path; None: a scene of the embedded model's world (with its question when
    ``question`` is None). ``model``: a loaded model (then ``processor`` too), a checkpoint directory or an
    embedded model's name; None: the embedded model. ``scores``: a heat map of the step's own scores
    beside each mask (where it reports some). ``options`` go to ``tokprune.patch``.
    """
    from matplotlib.figure import Figure  # no pyplot: no backend, nothing global, shows in notebooks

    if not specs:
        raise ShowError("give at least one spec (--spec 'divprune(keep=32)')")
    if image is None:
        image, asked = world_image()
        question = asked if question is None else question
    elif not hasattr(image, "convert"):
        image = open_image(image)
    if question is None:
        raise ShowError("give a question (--question '...'): text-guided methods choose by it")
    from .registry import get

    labels = [str(spec) for spec in specs]
    specs = [get(spec) for spec in specs]  # a bad spec fails before the model loads
    if model is None or isinstance(model, (str, os.PathLike)):
        model, processor = load_model(model)
    elif processor is None:
        raise ShowError("a loaded model needs its processor (processor=...)")
    runs = run_specs(model, processor, [image], [question], specs, **options)
    for run, label in zip(runs, labels):
        run.spec = label
    panels = []  # per spec: (stage, view) pairs
    for run in runs:
        kept = run.stats.kept
        assert kept is not None and kept.cells is not None
        n_views = len(views(kept.cells[0]))
        row = []
        for stage in _stages(run):
            for v in range(n_views):
                row.append((stage, v, False))
                if scores and token_scores(run.stats, run.pipeline, stage) is not None:
                    row.append((stage, v, True))
        panels.append(row)
    cols = max(len(r) for r in panels)
    fig = Figure(figsize=(3.2 * cols, 3.5 * len(runs)))
    axes = fig.subplots(len(runs), cols, squeeze=False)
    for r, (run, row) in enumerate(zip(runs, panels)):
        kept = run.stats.kept
        assert kept is not None and kept.cells is not None
        names = [v.label for v in views(kept.cells[0])]
        for c, (stage, v, heat) in enumerate(row):
            ax = axes[r][c]
            where = "vision stage" if stage is None else f"layer {stage}"
            where += f", {names[v]}" if names[v] else ""
            if heat:
                found = token_scores(run.stats, run.pipeline, stage)
                assert found is not None
                draw_scores(ax, image, kept, 0, found[1], v)
                ax.set_title(f"{where}: {found[0]}", fontsize=8)
            else:
                n_kept, total = draw_kept(ax, image, kept, 0, stage, v)
                ax.set_title(f"{where}: {n_kept}/{total} kept", fontsize=8)
        for c in range(len(row), cols):
            axes[r][c].axis("off")
        axes[r][0].set_ylabel(run.spec, fontsize=8)
    fig.suptitle(f"kept patches (bright) for: {question}", fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], overwrite: bool = False, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` whole or not at all (a temporary file in the folder, then renamed);
    an existing file is replaced only with ``overwrite``."""
    out = Path(path)
    check_output(out, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix or ".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def check_output(out: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an output the command could not write or would overwrite unasked."""
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ShowError(f"cannot write {str(out)!r}: the folder {str(folder)!r} does not exist")
    try:  # the real test (permissions, a read-only file system), also for root
        fd, probe = tempfile.mkstemp(prefix=".tokprune-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ShowError(
            f"cannot write {str(out)!r}: the folder {str(folder)!r} is not writable ({exc.strerror or exc})"
        ) from None
    if out.is_dir():
        raise ShowError(f"cannot write {str(out)!r}: it is a folder; give a file name such as kept.png")
    if out.exists() and not overwrite:
        raise ShowError(f"{str(out)!r} exists; pass --overwrite to replace it, or choose another -o")
    if out.suffix.lower() not in ("", ".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise ShowError(f"cannot write {str(out)!r}: unknown image format {out.suffix!r}; use .png, .pdf, .svg or .jpg")


def main(args: Any) -> int:
    """``tokprune show``: the parsed arguments of :func:`add_parser`'s sub-command."""
    out = Path(args.output)
    check_output(out, args.overwrite)  # before the model loads: a bad -o costs nothing
    image = open_image(args.image) if args.image is not None else None
    fig = show(image, args.question, args.spec or ["divprune(keep=32)"], model=args.model, scores=args.scores)
    print(f"wrote {save_figure(fig, out, overwrite=args.overwrite)}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``tokprune show`` on the command's sub-parsers."""
    p = sub.add_parser(
        "show",
        help="draw the patches each spec keeps on an image (kept bright, dropped dimmed)",
        description="Run each --spec on IMAGE and draw its kept patches: one row per spec, one panel per "
        "stage that cut (vision stage, each LLM layer), the count kept in each title.",
    )
    p.add_argument("image", nargs="?", help="an image file; omitted: a scene of the embedded model's world")
    p.add_argument("--question", "-q", help="the question (default with no IMAGE: the scene's own)")
    p.add_argument(
        "--spec", "-s", action="append", help="a pipeline spec; repeat for several (default divprune(keep=32))"
    )
    p.add_argument("--model", "-m", help="a checkpoint directory or embedded model name (default: the embedded model)")
    p.add_argument("--scores", action="store_true", help="draw each step's own scores as a heat map beside its mask")
    p.add_argument("--output", "-o", default="kept.png", help="the figure to write (default kept.png)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.set_defaults(func=main)
