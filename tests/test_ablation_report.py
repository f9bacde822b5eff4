"""The report from fabricated results rows: intervals, paired tests, seeds merged, curves, diagnostics."""

from __future__ import annotations

import csv
import io

import pytest

from tokprune.ablation import report
from tokprune.ablation.datasets import get_scorer
from tokprune.ablation.metrics import adaptive_cuts, run_metrics
from tokprune.ablation.statistics import mcnemar_exact, wilson_interval


def _row(label, scores, target=None, knob=None, equiv=1.0, reachable=True, role="swept"):
    """A results row as the runner writes it, from per-question 0/1 ``scores``."""
    recs = [{"question_id": str(i), "qtype": "ab"[i % 2], "score": float(s), "visual_kept": 144 * equiv,
             "visual_total": 144, "visual_layer_avg": 144 * equiv, "flops_pruned": equiv, "flops_unpruned": 1.0}
            for i, s in enumerate(scores)]
    m = run_metrics(recs, [], get_scorer("exact"), [], None)
    cal = None if target is None else {"axis": "equiv_tokens", "target": target, "budget": equiv, "reachable": reachable}
    return {"label": label, "role": role, "target": target, "knob": knob, "budget": "", "spec": label, "key": label,
            "metrics": m, "predictions": recs, "calibration": cal, "wall_s": 1.0, "resolved": {}}


N = 200
BASE = [1] * 190 + [0] * 10
GOOD = [1] * 180 + [0] * 20  # 10 more wrong than the base: discordant 10 vs 0
BAD = [0] * 60 + [1] * 140


def _study():
    return [
        _row("none", BASE, role="baseline"),
        _row("topk(keep=14)", GOOD, 0.1, "topk.keep", 0.1),
        _row("topk(keep=72)", BASE, 0.5, "topk.keep", 0.5),
        _row("random(seed=0, keep=14)", BAD, 0.1, "random.keep", 0.1),
        _row("random(seed=1, keep=14)", [1] * 150 + [0] * 50, 0.1, "random.keep", 0.1),
        _row("random(seed=0, keep=72)", BASE, 0.5, "random.keep", 0.5),
        _row("random(seed=1, keep=72)", BASE, 0.5, "random.keep", 0.5),
        _row("fastv(keep=1)", GOOD, 0.1, "fastv.keep", 0.503, reachable=False),
    ]


def test_metrics_carry_wilson_intervals_overall_and_per_type():
    m = _study()[1]["metrics"]
    assert m["accuracy_ci"] == pytest.approx(list(wilson_interval(180, 200)))
    assert m["accuracy_by_type_ci"]["a"] == pytest.approx(list(wilson_interval(sum(GOOD[0::2]), 100)))
    assert m["equiv_frac"] == pytest.approx(0.1)


def test_method_drops_the_knob_and_the_seed_only():
    rows = _study()
    assert [report.method_of(r) for r in rows[:4]] == ["none", "topk", "topk", "random"]
    assert report.method_of({"label": "cls_knee(min_keep=3, score=cls_sim)+text_interact", "knob": "cls_knee.min_keep"}) \
        == "cls_knee(score=cls_sim)+text_interact"


def test_paired_tests_against_unpruned_and_within_a_budget():
    tests = report.paired_tests(_study())
    vs_base = {t["a"]: t for t in tests if t["b"] == "none"}
    assert (vs_base["topk(keep=14)"]["a_better"], vs_base["topk(keep=14)"]["b_better"]) == (0, 10)
    assert vs_base["topk(keep=14)"]["p"] == pytest.approx(mcnemar_exact(0, 10))
    within = {(t["a"], t["b"]) for t in tests if t["b"] != "none"}
    # The first seed stands for random; fastv missed 10% (it is at 50%): compared with nothing there.
    assert within == {("topk(keep=14)", "random(seed=0, keep=14)"), ("topk(keep=72)", "random(seed=0, keep=72)")}


def test_markdown_merges_seeds_and_marks_missed_targets():
    md = report.markdown_table(_study())
    lines = md.splitlines()
    assert len(lines) == 2 + 6  # header, rule, none, 2 topk, 2 random (seeds merged), fastv
    topk = next(line for line in lines if line.startswith("| `topk(keep=14)`"))
    lo, hi = wilson_interval(180, 200)
    assert f"0.900 [{lo:.3f}, {hi:.3f}]" in topk and f"{mcnemar_exact(0, 10):.2g}" in topk
    rnd = next(line for line in lines if "`random` ×2 seeds `keep=14`" in line)
    assert "0.725 (seeds 0.700-0.750)" in rnd
    assert "10% (not reached)" in next(line for line in lines if line.startswith("| `fastv"))


def test_labels_show_non_default_positions():
    rows = _study()
    rows[1]["resolved"] = {"positions": {"vision": "compact", "llm": "keep"}}
    md = report.markdown_table(rows)
    assert "| `topk(keep=14)` (positions vision=compact) |" in md
    assert "| `topk(keep=72)` |" in md  # defaults add nothing
    assert report.table_rows(rows)[1]["run"] == "topk(keep=14) (positions vision=compact)"


def test_summary_areas_and_groups():
    rows = _study()
    areas = {s["method"]: s["auc"] for s in report.curve_summary(rows)}
    assert areas["topk"] == pytest.approx((0.9 + 0.95) / 2)
    assert areas["random"] == pytest.approx((0.725 + 0.95) / 2)  # the seeds' mean
    assert areas["fastv"] is None  # one budget, at 50%: does not span 10-50%
    by_target = {b["target"]: b for b in report.budget_summary(rows)}
    assert by_target[0.1]["best"] == "topk(keep=14)" and by_target[0.1]["indistinguishable"] == ["topk(keep=14)"]
    assert set(by_target[0.5]["indistinguishable"]) == {"topk(keep=72)", "random(seed=0, keep=72)"}


def test_write_reports_files(tmp_path):
    files = report.write_reports(_study(), tmp_path, plot=True)
    text = files["table_md"].read_text()
    assert "### Curves" in text and "### At each budget" in text
    tests = list(csv.DictReader(io.StringIO(files["tests_csv"].read_text())))
    assert {"target", "a", "b", "a_better", "b_better", "p"} <= set(tests[0])
    flat = list(csv.DictReader(io.StringIO(files["table_csv"].read_text())))
    assert {"accuracy_lo", "accuracy_hi", "p_vs_unpruned", "acc_a_lo", "method"} <= set(flat[0])
    assert files["plot"].stat().st_size > 10_000


def test_adaptive_cut_diagnostics():
    recs = [
        {"cls_knee.clamped": True, "cls_knee.fallback": False, "cls_knee.raw_keep": 8, "prumerge.outliers": 0},
        {"cls_knee.clamped": True, "cls_knee.fallback": True, "cls_knee.raw_keep": 0, "prumerge.outliers": 4},
        {"cls_knee.clamped": False, "cls_knee.fallback": False, "cls_knee.raw_keep": 20, "prumerge.outliers": 6},
    ]
    d = adaptive_cuts(recs)
    assert d["cls_knee"]["clamped"] == pytest.approx(2 / 3) and d["cls_knee"]["fallback"] == pytest.approx(1 / 3)
    assert (d["cls_knee"]["cut_p10"], d["cls_knee"]["cut_p50"], d["cls_knee"]["cut_p90"]) == pytest.approx((9.2, 14, 18.8))
    assert d["prumerge"]["fallback"] == pytest.approx(1 / 3) and d["prumerge"]["cut_p50"] == 5
    assert adaptive_cuts([]) == {}


def test_the_reference_methods_readings_get_a_section_best_area_first():
    knob = "cls_knee.min_keep"
    rows = [
        _row("none", BASE, role="baseline"),
        _row("cls_knee(min_keep=14)+text_interact", BAD, 0.1, knob, 0.1),
        _row("cls_knee(min_keep=72)+text_interact", BAD, 0.5, knob, 0.5),
        _row("cls_knee(score=cls_attn_mean, min_keep=14)+text_interact", GOOD, 0.1, knob, 0.1),
        _row("cls_knee(score=cls_attn_mean, min_keep=72)+text_interact", BASE, 0.5, knob, 0.5),
        _row("topk(keep=14)", BASE, 0.1, "topk.keep", 0.1),
        _row("topk(keep=72)", BASE, 0.5, "topk.keep", 0.5),
    ]
    text = report.summary_text(rows)
    section = text.split("### The reference method's readings")[1].split("###")[0]
    lines = [line for line in section.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in lines] == [
        "cls_knee(score=cls_attn_mean)+text_interact",  # the better area first
        "cls_knee+text_interact",
    ]
    assert "(default)" in lines[1] and "topk" not in section
    assert lines[0].endswith("| 0.900 | 0.950 |") and "| 0.700 | 0.700 |" in lines[1]
    # A study with one reading (or none) gets no section.
    assert "readings" not in report.summary_text([r for r in rows if "score=" not in r["label"]])
