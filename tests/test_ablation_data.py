"""Ablation datasets (JSONL loader, embedded benchmark), scorers against hand-computed values, and the
append-only results file (truncated-line repair)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tokprune.ablation.config import DatasetConfig
from tokprune.ablation.datasets import (
    DatasetError,
    EvalSample,
    get_scorer,
    load_dataset,
    load_jsonl,
    normalize_vqa,
    yes_no,
)
from tokprune.ablation.metrics import agreement, run_metrics
from tokprune.ablation.results import ResultsError, append_result, load_results, run_key


def _jsonl(tmp_path, rows, images=("a.png", "b.png")):
    for name in images:
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_accepts_llava_variants(tmp_path):
    path = _jsonl(
        tmp_path,
        [
            {"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes", "category": "adversarial"},
            {"question_id": "q2", "image": "b.png", "question": "Colour?", "answers": [{"answer": "red"}, {"answer": "Red"}]},
            "",
            {"question_id": 3, "image": str(tmp_path / "a.png"), "question": "Shape?", "answer": "square"},
        ],
    )
    samples, skipped = load_jsonl(path)
    assert skipped == []
    assert [s.question_id for s in samples] == ["1", "q2", "3"]
    assert samples[0].question == "Is there a cat?" and samples[0].answers == ("yes",) and samples[0].qtype == "adversarial"
    assert samples[1].answers == ("red", "Red")
    assert samples[2].load_image().size == (8, 8)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"question_id": 2, "image": "b.png", "text": "x"', "not valid JSON"),
        ({"question_id": 2, "image": "missing.png", "text": "x", "answer": "y"}, "image not found"),
        ({"question_id": 2, "text": "x", "answer": "y"}, "missing key(s) ['image']"),
        ({"question_id": 2, "image": "b.png", "answer": "y"}, "missing key 'question' (or 'text')"),
        ({"question_id": 2, "image": "b.png", "text": "x"}, "no answer"),
        ({"question_id": 1, "image": "b.png", "text": "x", "answer": "y"}, "duplicate question_id '1'"),
    ],
)
def test_jsonl_bad_row_error_names_file_and_line(tmp_path, bad, message):
    good = {"question_id": 1, "image": "a.png", "text": "q", "answer": "a"}
    path = _jsonl(tmp_path, [good, bad, {**good, "question_id": 9}])
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    assert f"{path}:2: " in str(info.value) and message in str(info.value)
    assert "skip_bad_rows=true" in str(info.value)


def test_jsonl_skip_bad_rows_counts_every_skip(tmp_path):
    good = {"question_id": 1, "image": "a.png", "text": "q", "answer": "a"}
    rows = [good, "{broken", {**good, "question_id": 2, "image": "nope.png"}, {**good, "question_id": 3}]
    samples, skipped = load_jsonl(_jsonl(tmp_path, rows), skip_bad_rows=True)
    assert [s.question_id for s in samples] == ["1", "3"]
    assert len(skipped) == 2 and skipped[0].startswith("line 2:") and skipped[1].startswith("line 3: image not found")


def test_jsonl_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="dataset file not found: '.*nope.jsonl' \\(dataset.path\\)"):
        load_jsonl(tmp_path / "nope.jsonl")
    path = _jsonl(tmp_path, [{"question_id": 1, "image": "a.png", "text": "q", "answer": "a"}])
    with pytest.raises(DatasetError, match="image folder not found"):
        load_jsonl(path, image_folder=tmp_path / "imgs")
    with pytest.raises(DatasetError, match="dataset file not found"):
        load_dataset(DatasetConfig(name="jsonl", path=str(tmp_path / "x.jsonl")))


def test_jsonl_image_folder_and_limit(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "a.png")
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "image": "a.png", "text": "q", "answer": "a"}) + "\n" for i in range(5)))
    samples, _ = load_jsonl(path, image_folder=tmp_path / "imgs", limit=3)
    assert len(samples) == 3 and samples[0].image == tmp_path / "imgs" / "a.png"


def _sample(answers, qtype=None):
    return EvalSample("q", None, "?", tuple(answers), qtype)


def test_normalizers():
    assert normalize_vqa("The Two dogs!") == "2 dogs"
    assert yes_no("Yes, there is.") == "yes" and yes_no("There is not.") == "no" and yes_no("No") == "no"
    assert yes_no("Yes. There is no cat.") == "yes"  # only the first sentence counts, as in eval_pope.py


def test_vqa_accuracy_hand_computed():
    vqa = get_scorer("vqa")
    answers = ["2", "two", "2", "3", "2", "2", "three", "4", "2", "2"]  # "2" x7 (+"two" normalises to "2")
    assert vqa.score("Two", _sample(answers)) == 1.0
    assert vqa.score("3", _sample(answers)) == pytest.approx(2 / 3)  # "3" and "three"
    assert vqa.score("4", _sample(answers)) == pytest.approx(1 / 3)
    assert vqa.score("5", _sample(answers)) == 0.0


def test_exact_match():
    exact = get_scorer("exact")
    assert exact.score("A red square.", _sample(["red square"])) == 1.0
    assert exact.score("red", _sample(["red square"])) == 0.0


def test_yesno_precision_recall_f1_hand_computed():
    scorer = get_scorer("yesno")
    truth = ["yes", "yes", "yes", "no", "no"]
    preds = ["Yes", "No", "yes.", "Yes", "no"]
    samples = [_sample([t]) for t in truth]
    # TP=2 (1,3), FN=1 (2), FP=1 (4), TN=1 (5)
    records = [{"question_id": str(i), "score": scorer.score(p, s), "prediction": p} for i, (p, s) in enumerate(zip(preds, samples))]
    m = run_metrics(records, samples, scorer, [], None)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 5)


def test_auto_scorer_choice():
    assert get_scorer("auto", [_sample(["yes"]), _sample(["No"])]).name == "yesno"
    assert get_scorer("auto", [_sample(["a", "b", "a"]), _sample(["x"])]).name == "vqa"
    assert get_scorer("auto", [_sample(["cat"])]).name == "exact"


def test_shapes_dataset_and_scorer():
    ds = load_dataset(DatasetConfig(), limit=8)
    assert len(ds.samples) == 8 and ds.scorer.name == "shapes"
    s = ds.samples[0]
    assert ds.scorer.score(s.answers[0].upper() + ".", s) == 1.0
    assert {x.qtype for x in ds.samples} == {"color", "count", "exist", "position"}


def test_agreement_and_per_type_accuracy():
    base = [{"question_id": "a", "normalized": "red"}, {"question_id": "b", "normalized": "two"}]
    run = [{"question_id": "a", "normalized": "red"}, {"question_id": "b", "normalized": "one"}]
    assert agreement(run, base) == 0.5
    assert agreement(run, None) is None
    recs = [
        {"question_id": "a", "qtype": "color", "score": 1.0, "visual_kept": 10, "visual_total": 144,
         "flops_pruned": 1.0, "flops_unpruned": 4.0},
        {"question_id": "b", "qtype": "count", "score": 0.0, "visual_kept": 30, "visual_total": 144,
         "flops_pruned": 3.0, "flops_unpruned": 4.0},
    ]
    m = run_metrics(recs, [], get_scorer("exact"), [], None)
    assert m["accuracy_by_type"] == {"color": 1.0, "count": 0.0}
    assert (m["visual_kept_mean"], m["visual_kept_min"], m["visual_kept_max"]) == (20, 10, 30)
    assert m["flops_rel"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------- results file


def test_results_append_and_reload(tmp_path):
    path = tmp_path / "r" / "results.jsonl"
    for i in range(3):
        append_result(path, {"key": str(i), "x": [i]})
    assert [r["key"] for r in load_results(path)] == ["0", "1", "2"]


def test_truncated_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, {"key": "a"})
    append_result(path, {"key": "b"})
    with path.open("ab") as fh:
        fh.write(b'{"key": "c", "metr')  # a kill in the middle of the third write
    with pytest.warns(UserWarning, match="truncated last line"):
        rows = load_results(path)
    assert [r["key"] for r in rows] == ["a", "b"]
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 2
    append_result(path, {"key": "c"})
    assert [r["key"] for r in load_results(path)] == ["a", "b", "c"]


def test_complete_json_without_newline_counts_as_truncated(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}')
    with pytest.warns(UserWarning):
        assert [r["key"] for r in load_results(path)] == ["a"]


def test_corruption_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a"}\n{oops\n{"key": "b"}\n')
    with pytest.raises(ResultsError, match="results.jsonl:2"):
        load_results(path)


def test_run_key_is_order_independent_and_sensitive():
    assert run_key({"a": 1, "b": [1, 2]}) == run_key({"b": [1, 2], "a": 1})
    assert run_key({"a": 1}) != run_key({"a": 2})


def test_pareto_front():
    from tokprune.ablation.report import pareto_front

    points = [(1, 0.5), (2, 0.4), (3, 0.6), (3, 0.7), (0.5, 0.1), (4, 0.7)]
    assert pareto_front(points) == [(0.5, 0.1), (1, 0.5), (3, 0.7)]
