"""``tokprune run`` with ``engine: vllm`` (issue 24 item 5): the same study through the vLLM plugin.

One engine per model (the session is opened once and handed to every study of this file).
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (docs/serving.md: the CPU recipe)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


from tokprune.ablation import runner  # noqa: E402
from tokprune.ablation.config import ConfigError, load_config  # noqa: E402
from tokprune.ablation.distributed import init as init_dist  # noqa: E402
from tokprune.ablation.results import load_results  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

SPECS = "[topk(keep_ratio=0.25),divprune(keep=36)]"


def _cfg(out, *extra):
    # positions.vision=compact: what vLLM numbers on LLaVA-1.5 (docs/serving.md), so both engines compute the same
    base = [f"output_dir={out}", "limit=20", "batch_size=20", "device=cpu", "budget.targets=[]", "sweep={}",
            f"strategies={SPECS}", "positions.vision=compact"]
    return load_config(None, [*base, *extra])


@pytest.fixture(scope="module")
def vllm_session(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("unused"), "engine=vllm")
    session = runner.open_session(cfg, init_dist(cfg.device), progress=False)
    yield session
    del session


def test_a_study_on_vllm_equals_the_transformers_one(vllm_session, tmp_path):
    cfg_v = _cfg(tmp_path / "v", "engine=vllm")
    vllm_session.cfg = cfg_v
    got = runner.run_ablation(cfg_v, progress=False, echo=None, session=vllm_session)
    cfg_t = _cfg(tmp_path / "t")
    want = runner.run_ablation(cfg_t, progress=False, echo=None)
    assert [r["label"] for r in got.rows] == [r["label"] for r in want.rows] == ["none", *SPECS[1:-1].split(",")]
    for v, t in zip(got.rows, want.rows):
        assert v["engine"] == "vllm" and t["engine"] == "transformers"
        assert v["metrics"]["visual_kept_mean"] == t["metrics"]["visual_kept_mean"], v["label"]
        assert v["metrics"]["visual_total"] == t["metrics"]["visual_total"]
        assert v["metrics"]["visual_layer_avg"] == t["metrics"]["visual_layer_avg"]  # the curves' x axis
        # Item 4: equal answers, or every differing one a first-token tie on the transformers side.
        differing = [(a["question_id"], a["prediction"], b["prediction"])
                     for a, b in zip(v["predictions"], t["predictions"]) if a["prediction"] != b["prediction"]]
        assert not differing, differing
        assert v["metrics"]["accuracy"] == t["metrics"]["accuracy"], v["label"]
    # The same files: rows, table, curves; the engine is part of each run's identity.
    for name in ("results", "config", "table_md", "plot"):
        assert got.files[name].is_file()
    assert {p.name for p in got.output_dir.iterdir()} >= {p.name for p in want.output_dir.iterdir()} - {"kept.png"}
    rows = load_results(got.files["results"])
    assert all(r["engine"] == "vllm" and r["resolved"]["engine"] == "vllm" for r in rows)
    assert {r["key"] for r in rows}.isdisjoint(r["key"] for r in load_results(want.files["results"]))
    assert rows[0]["versions"]["vllm"]


def test_a_transformers_row_is_never_reused_as_a_vllm_one(vllm_session, tmp_path):
    """Same output folder: the transformers rows stay, the vLLM runs run (none 'already recorded')."""
    out = tmp_path / "shared"
    runner.run_ablation(_cfg(out, "strategies=[divprune(keep=36)]", "baseline=false", "limit=4"), progress=False, echo=None)
    cfg_v = _cfg(out, "engine=vllm", "strategies=[divprune(keep=36)]", "baseline=false", "limit=4")
    vllm_session.cfg = cfg_v
    outcome = runner.run_ablation(cfg_v, progress=False, echo=None, session=vllm_session)
    assert outcome.skipped == 0
    engines = [json.loads(line)["engine"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert engines == ["transformers", "vllm"]


@pytest.mark.parametrize(
    "strategies, fragment",
    [("[fastv(keep=8)]", "fastv(keep=8): fastv prunes inside the language model"),
     ("[prumerge]", "prumerge: prumerge chooses how many tokens to keep")],
)
def test_strategies_vllm_cannot_run_are_refused_before_any_work(tmp_path, strategies, fragment):
    out = tmp_path / "study"
    cfg = _cfg(out, "engine=vllm", f"strategies={strategies}", "baseline=false")
    with pytest.raises(ConfigError, match="engine=vllm cannot run") as err:
        runner.run_ablation(cfg, progress=False, echo=None)
    assert fragment in str(err.value) and "divprune" in str(err.value) and "engine=transformers" in str(err.value)
    assert not out.exists()
