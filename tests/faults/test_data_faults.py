"""Fault class 2, data: truncated and corrupt images, decompression bombs, a BOM, non-UTF-8 bytes,
markers of the model's template inside a question, over-long questions and huge limits.

With ``dataset.skip_bad_rows=true`` every per-row failure is found before the first run, skipped and
counted with its reason; without it the first one is an error naming the file, the line (or question)
and the fix. Nothing fails in the middle of a batch."""

from __future__ import annotations

import pytest
from faults._kit import bomb_png, jpeg_bytes, png_bytes, qa_rows, write_rows

from tokprune.ablation.datasets import DatasetError, load_jsonl


def _one_bad(tmp_path, data: bytes, name: str):
    """A dataset of a good row and a row whose image file holds ``data``."""
    (tmp_path / name).write_bytes(data)
    rows = qa_rows(2)
    rows[1]["image"] = name
    return write_rows(tmp_path, rows)


BAD_IMAGES = {
    "truncated_jpeg": ("cut.jpg", lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2], r"truncated"),
    "truncated_png": ("cut.png", lambda: png_bytes(size=64)[:-40], r"cut\.png"),
    "corrupt_jpeg_body": ("junk.jpg", lambda: jpeg_bytes()[:200] + bytes(range(256)) * 8, r"junk\.jpg"),
    "zero_bytes": ("empty.png", lambda: b"", r"empty\.png"),
    "decompression_bomb": ("bomb.png", bomb_png, r"bomb\.png.*(pixels|bomb)"),
    "text_named_png": ("text.png", lambda: b"hello, I am not an image\n", r"text\.png"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_a_bad_image_is_skipped_and_counted_at_load(tmp_path, kind):
    name, make, reason = BAD_IMAGES[kind]
    path = _one_bad(tmp_path, make(), name)
    samples, skipped = load_jsonl(path, skip_bad_rows=True)
    assert [s.question_id for s in samples] == ["q0"]
    assert len(skipped) == 1 and skipped[0].startswith("line 2:")
    assert __import__("re").search(reason, skipped[0]), skipped[0]
    assert samples[0].load_image().size == (24, 24)


@pytest.mark.parametrize("kind", ["truncated_jpeg", "decompression_bomb"])
def test_a_bad_image_without_skip_names_the_line_and_the_fix(tmp_path, kind):
    name, make, _ = BAD_IMAGES[kind]
    path = _one_bad(tmp_path, make(), name)
    with pytest.raises(DatasetError, match=rf"q\.jsonl:2: .*{name}.*skip_bad_rows=true"):
        load_jsonl(path)


def test_an_image_damaged_after_loading_is_an_error_naming_the_file(tmp_path):
    """The file changed between loading and its batch: a DatasetError naming it, not an OSError from PIL."""
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    rows = qa_rows(1)
    rows[0]["image"] = "a.jpg"
    samples, _ = load_jsonl(write_rows(tmp_path, rows))
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes()[:300])
    with pytest.raises(DatasetError, match=r"a\.jpg.*q0.*changed"):
        samples[0].load_image()


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = write_rows(tmp_path, qa_rows(2))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    samples, skipped = load_jsonl(path)
    assert [s.question_id for s in samples] == ["q0", "q1"] and skipped == []


def test_crlf_line_endings_are_accepted(tmp_path):
    path = write_rows(tmp_path, qa_rows(2))
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    samples, _ = load_jsonl(path)
    assert [s.answers for s in samples] == [("red",), ("red",)]


def _latin1_row(tmp_path):
    path = write_rows(tmp_path, qa_rows(3))
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"What color", b"Qu\xe9 color")  # Latin-1 bytes, not UTF-8
    path.write_bytes(b"\n".join(lines))
    return path


def test_non_utf8_bytes_are_a_bad_row_naming_the_line(tmp_path):
    with pytest.raises(DatasetError, match=r"q\.jsonl:2: .*UTF-8.*skip_bad_rows=true"):
        load_jsonl(_latin1_row(tmp_path))


def test_non_utf8_bytes_are_skipped_and_counted(tmp_path):
    samples, skipped = load_jsonl(_latin1_row(tmp_path), skip_bad_rows=True)
    assert [s.question_id for s in samples] == ["q0", "q2"]
    assert len(skipped) == 1 and skipped[0].startswith("line 2:") and "UTF-8" in skipped[0]


def test_a_deeply_nested_row_is_a_bad_row(tmp_path):
    path = write_rows(tmp_path, qa_rows(1))
    with path.open("a") as fh:
        fh.write("[" * 100_000 + "]" * 100_000 + "\n")
    samples, skipped = load_jsonl(path, skip_bad_rows=True)
    assert len(samples) == 1 and skipped and skipped[0].startswith("line 2:")
    with pytest.raises(DatasetError, match=r"q\.jsonl:2: "):
        load_jsonl(path)


def test_an_image_path_that_is_a_folder_is_a_bad_row(tmp_path):
    (tmp_path / "folder.png").mkdir()
    rows = qa_rows(2)
    rows[1]["image"] = "folder.png"
    samples, skipped = load_jsonl(write_rows(tmp_path, rows), skip_bad_rows=True)
    assert len(samples) == 1 and "folder.png" in skipped[0]


def test_every_row_bad_says_so(tmp_path):
    rows = qa_rows(2)
    for r in rows:
        r["image"] = "missing.png"
    with pytest.raises(DatasetError, match=r"no usable rows \(2 skipped\)"):
        load_jsonl(write_rows(tmp_path, rows), skip_bad_rows=True)


def test_a_dataset_path_that_is_a_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset file not found.*dataset\.path"):
        load_jsonl(tmp_path)


def test_a_huge_limit_on_a_file_reads_the_file(tmp_path):
    samples, _ = load_jsonl(write_rows(tmp_path, qa_rows(3)), limit=100_000_000)
    assert len(samples) == 3


def test_a_huge_limit_on_the_embedded_benchmark_is_refused_before_any_image(monkeypatch):
    from tokprune.ablation.config import load_config
    from tokprune.data import world
    from tokprune.errors import TokpruneError

    monkeypatch.setattr(world, "make_sample", lambda *a, **k: pytest.fail("an image was built"))
    with pytest.raises(TokpruneError, match=r"limit=100000000"):
        load_config(None, ["limit=100000000"])


# ---------------------------------------------------------------- rows only the model's processor can judge

_MARKER_ROWS = {
    "image_marker": "How many <image> are there?",
    "eos_marker": "What color</s> is it?",
    "over_long": "word " * 1200,
}


@pytest.mark.parametrize("kind", sorted(_MARKER_ROWS))
def test_a_question_the_model_cannot_take_is_refused_before_the_first_run(tmp_path, study, kind):
    rows = qa_rows(2)
    rows[1]["question"] = _MARKER_ROWS[kind]
    path = write_rows(tmp_path / "data", rows)
    hint = r"(tokens.*512|max_position)" if kind == "over_long" else r"<image>|</s>"
    with pytest.raises(DatasetError, match=rf"(?s)q1.*{hint}.*skip_bad_rows=true"):
        study(tmp_path / "out", "dataset.name=jsonl", f"dataset.path={path}")
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_skip_bad_rows_skips_every_kind_of_bad_row_and_the_run_completes(tmp_path, study):
    """One good row among every per-row fault: the study runs on it, and each skip is counted with its reason."""
    rows = qa_rows(7)
    rows[1]["question"] = _MARKER_ROWS["image_marker"]
    rows[2]["question"] = _MARKER_ROWS["eos_marker"]
    rows[3]["question"] = _MARKER_ROWS["over_long"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cut.jpg").write_bytes(jpeg_bytes()[:400])
    (tmp_path / "data" / "bomb.png").write_bytes(bomb_png())
    rows[4]["image"], rows[5]["image"] = "cut.jpg", "bomb.png"
    rows[6]["image"] = "nowhere.png"
    path = write_rows(tmp_path / "data", rows)
    outcome = study(
        tmp_path / "out", "dataset.name=jsonl", f"dataset.path={path}", "dataset.skip_bad_rows=true", "limit=10"
    )
    for row in outcome.rows:
        assert row["metrics"]["n"] == 1 and [p["question_id"] for p in row["predictions"]] == ["q0"]
        skipped = row["env"]["dataset_skipped_rows"]
        assert len(skipped) == 6, skipped
    assert any("<image>" in s for s in skipped) and any("</s>" in s for s in skipped)
