"""``tokprune show``, ``tokprune.viz`` and the study's ``kept.png``: drawn from the stats, read back as pixels,
and every bad input a clear error with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokprune
from tokprune import cli, viz
from tokprune.adapters import registered_adapters
from tokprune.testing.adapters import LENGTHS, tiny_case

ADAPTERS = {cls.name: cls for cls, _ in registered_adapters()}


@pytest.fixture(scope="module")
def embedded():
    return viz.load_model(None)


@pytest.fixture
def grey(tmp_path) -> Path:
    """A uniform grey image: any brightness difference in the figure is the kept/dropped veil."""
    path = tmp_path / "grey.png"
    Image.new("RGB", (96, 96), (200, 200, 200)).save(path)
    return path


def _pixel_brightness(png: Path, fig, ax, points: np.ndarray) -> np.ndarray:
    """Mean RGB of the saved figure at data points ``[P, 2]`` (x, y in image pixels) of ``ax``."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(float)
    display = ax.transData.transform(points)  # origin bottom-left, in the saved figure's pixels
    cols = np.round(display[:, 0]).astype(int)
    rows = np.round(pixels.shape[0] - display[:, 1]).astype(int)
    return pixels[rows, cols].mean(axis=1)


def test_show_png_is_bright_where_the_stats_say_kept(embedded, grey, tmp_path):
    model, processor = embedded
    spec = "divprune(keep=20)+fastv(layer=2, keep=6)"
    image = viz.open_image(grey)
    (run,) = viz.run_specs(model, processor, [image], ["what color is the circle ?"], [spec])
    fig = viz.show(image, "what color is the circle ?", [spec], model=model, processor=processor)
    fig.set_dpi(120)
    out = viz.save_figure(fig, tmp_path / "kept.png")
    kept = run.stats.kept
    cells = kept.cells[0]
    centres = np.stack([(cells[:, 3].numpy() + 0.5) * 8, (cells[:, 2].numpy() + 0.5) * 8], axis=1)  # 12x12 of 8 px
    for ax, layer in zip(fig.axes, [None, 2]):
        brightness = _pixel_brightness(out, fig, ax, centres)
        mask = kept.kept(layer)[0].numpy()
        assert mask.sum() == (20 if layer is None else 6)
        assert (brightness[mask] > 180).all(), f"kept patches must be at full brightness (layer {layer})"
        assert (brightness[~mask] < 80).all(), f"dropped patches must be dimmed (layer {layer})"
        assert f"{int(mask.sum())}/144 kept" in ax.get_title()


def test_in_llm_methods_get_one_panel_per_cut_layer(embedded):
    model, processor = embedded
    spec = "pyramiddrop(layer=(1, 2, 3), keep_ratio=(0.5, 0.25, 0.125))"
    fig = viz.show(None, None, [spec], model=model, processor=processor)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["layer 1: 72/144 kept", "layer 2: 36/144 kept", "layer 3: 18/144 kept"]


def test_scores_are_the_strategys_own(embedded):
    model, processor = embedded
    image, question = viz.world_image()
    specs = ["topk(keep=10)", "fastv(layer=2, keep=5)"]
    topk, fastv = viz.run_specs(model, processor, [image], [question], specs)
    what, heat = viz.token_scores(topk.stats, topk.pipeline)
    assert what == "scores" and torch.equal(heat[0], topk.stats.diagnostics["topk.scores"][0].double())
    what, heat = viz.token_scores(fastv.stats, fastv.pipeline, 2)
    columns = fastv.stats.kept.columns[2][0]
    assert torch.equal(heat[0], fastv.stats.diagnostics["fastv.scores"][0, columns].double())
    fig = viz.show(image, question, specs, model=model, processor=processor, scores=True)
    assert [ax.get_title().split(": ")[-1] for ax in fig.axes] == ["10/144 kept", "scores", "5/144 kept", "scores"]


def test_tiles_get_their_own_panel_and_scores_skip_newlines():
    case = tiny_case(ADAPTERS["llava_next"])
    pipeline = tokprune.strategies.get("topk(keep=6)")
    with tokprune.patch(case.model, pipeline, question_end=case.question_end) as run, torch.no_grad():
        case.model(**case.make_inputs(LENGTHS))
    kept = run.stats.kept
    labels = [v.label for v in viz.views(kept.cells[0])]
    assert labels == ["base view", "tiles"]
    _, heat = viz.token_scores(run.stats, pipeline)
    patch = kept.patches()
    for i in range(kept.num_images):  # the strategy's row holds the image's patches in order, no newlines
        scores = run.stats.diagnostics["topk.scores"][i, : int(patch[i].sum())].double()
        assert torch.equal(heat[i][patch[i]], scores)
        assert heat[i][~patch[i]].isnan().all()


# -- tokprune show: bad input is a clear error, nothing written -----------------------------------------


def _show(argv, capsys):
    rc = cli.main(["show", *argv])
    return rc, capsys.readouterr()


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.png"], "does not exist"),
        (["notes.png"], "is not an image"),
        (["grey.png", "-s", "fastv(layer=9)"], "layer must be in 1..3"),
        (["grey.png", "-s", "cls_kne"], "Did you mean 'cls_knee'"),
        (["grey.png", "-q", "red " * 600], "longer than the model's context of 512"),
        (["grey.png", "-o", "nowhere/kept.png"], "does not exist"),
        (["grey.png", "-o", "/proc/kept.png"], "is not writable"),
        (["grey.png", "-o", "kept.txt"], "unknown image format"),
        (["grey.png", "-m", "notes.png"], "neither a local checkpoint directory nor an embedded model"),
    ],
)
def test_show_bad_input(args, message, grey, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    if "-q" not in args:
        args = [*args, "-q", "what color is the circle ?"]
    rc, captured = _show(args, capsys)
    assert rc == 2 and message in captured.err and "Traceback" not in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png", "notes.png"], "nothing may be written"


def test_show_never_overwrites_unasked_and_never_half_writes(grey, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "kept.png"
    out.write_bytes(b"the user's file")
    rc, captured = _show([str(grey), "-q", "what ?", "-o", str(out)], capsys)
    assert rc == 2 and "--overwrite" in captured.err and out.read_bytes() == b"the user's file"

    from matplotlib.figure import Figure

    def broken(self, fname, **kwargs):
        Path(fname).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError):
        viz.save_figure(Figure(), out, overwrite=True)
    assert out.read_bytes() == b"the user's file", "a failed save leaves the old file whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png", "kept.png"], "no temporary file left"


def test_show_cli_writes_the_figure(grey, tmp_path, capsys):
    out = tmp_path / "kept.png"
    rc, captured = _show([str(grey), "-q", "what ?", "-s", "divprune(keep=8)", "--scores", "-o", str(out)], capsys)
    assert rc == 0 and out.is_file() and str(out) in captured.out
    assert Image.open(out).size[0] > 300


# -- the study's gallery --------------------------------------------------------------------------------


def test_every_study_writes_a_gallery(tmp_path):
    from tokprune.ablation import runner
    from tokprune.ablation.config import load_config

    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "limit=8",
            "batch_size=8",
            "device=cpu",
            "strategies=[divprune, fastv(layer=1)]",
            "budget.targets=[0.14, 0.5]",
            "calibration.limit=4",
            "gallery.target=0.5",
            "gallery.images=3",
        ],
    )
    outcome = runner.run_ablation(cfg, progress=False, echo=None)
    assert outcome.files["gallery"] == tmp_path / "kept.png" and (tmp_path / "curves.png").is_file()
    width, height = Image.open(tmp_path / "kept.png").size
    # three methods (none, divprune, fastv) side by side, three images down (1.9 x 2.1 in panels, 100 dpi)
    assert abs(width - 3 * 1.9 * 100) < 2 and abs(height - (3 * 2.1 + 0.6) * 100) < 2

    from tokprune.ablation.datasets import load_dataset
    from tokprune.ablation.gallery import gallery_runs, gallery_samples

    runs = dict(gallery_runs(outcome.rows, 0.5))
    assert runs["none"] == "none" and runs["divprune"].startswith("divprune(keep=") and len(runs) == 3
    chosen = [r for r in outcome.rows if r.get("resolved", {}).get("spec") == runs["divprune"]]
    assert chosen[0]["target"] == 0.5
    picks = gallery_samples(load_dataset(cfg.dataset, 8).samples, 4)
    assert len({s.qtype for s in picks}) == 4, "one image per question type"


@pytest.mark.parametrize(
    "override, message", [("gallery.target=0", "gallery.target"), ("gallery.images=-1", "gallery.images")]
)
def test_gallery_config_is_checked(override, message):
    from tokprune.ablation.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
