"""Every ``benchmarks/bench_*.py`` runs with ``--smoke`` and prints its measured ratios beside the model's.

The benchmarks are scripts run by hand or by ``benchmarks/gpu_check.sh`` on a machine lent for minutes;
this keeps them from rotting in between. ``--smoke`` swaps in tiny widths and depths (same token counts,
same code paths, printing included), so each script's own work takes a second or two on a CPU.

One subprocess runs every script in turn through ``runpy`` (``__main__``, the script's own ``sys.argv``),
so torch and transformers are imported once: the import alone costs ~7 s of CPU here, more than all the
smoke runs together. A script whose ``--help`` does not offer ``--smoke`` fails: a new benchmark is
picked up by the glob and must bring the flag.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
#: benchmarks of a serving engine, which this venv does not have: CI's leg v runs their --smoke beside
#: the engine (docs/serving.md); GPU runs install the engine first.
NEEDS_ENGINE = {"bench_serve.py"}
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py") if p.name not in NEEDS_ENGINE)
#: extra runs beyond ``--smoke`` alone (each layout of the growth benchmark is its own code path)
VARIANTS = {"bench_growth.py": [[], ["--layout", "tiles"], ["--layout", "next"]]}

_NUM = r"-?\d+(?:\.\d+)?"
_X = rf"{_NUM}x"


def _prefill_expected() -> list[tuple[str, int]]:
    """bench_prefill --smoke: every registered family's tiny model, fp32 and bf16, two pipelines each (one for a
    family without a vision stage), the FLOP model beside each measurement; a family below its tested
    transformers says it is skipped."""
    from tokprune import hf_compat as hf
    from tokprune.adapters import registered_adapters

    families = [cls for cls, _ in registered_adapters()]
    ran = [cls for cls in families if not hf.older_than(cls.min_transformers)]
    rows = sum(2 if getattr(cls, "has_vision_stage", True) else 1 for cls in ran)
    expected = [
        (rf"^prefill \S.*speedup {_X} measured, {_X} FLOP model", 2 * rows),
        # every family but LLaVA-1.5 (whose section adds the scoring and decode parts) prints measured/model
        (
            rf"speedup {_X} measured, {_X} FLOP model, measured/model {_NUM};",
            2 * (rows - 2 * ("llava" in {c.name for c in ran})),
        ),
    ]
    for cls in families:
        if cls in ran:
            expected.append((rf"^=== {cls.name}: tiny model, (fp32|bf16) ===$", 2))
        else:
            expected.append((rf"^=== {cls.name}: skipped, tested from transformers ", 1))
    return expected


#: per script: (pattern, least number of matching lines). Rows are the measured ratio beside the models'.
EXPECTED: dict[str, list[tuple[str, int]]] = {
    "bench_decode.py": [
        (r"^KV ratio pruned/unpruned 0\.\d+ = kept ratio 0\.\d+$", 2),  # bf16 and fp32
        (
            rf"^batch \d+: copy bandwidth {_NUM} GB/s, append \(torch.cat\) unpruned {_NUM} GB/s, pruned {_NUM} GB/s, "
            rf"(bf16|fp32) matmul at \d+ rows {_NUM} GFLOP/s; .*-bound$",
            4,
        ),
        (r"^batch.*model x1.*model x3.*roofline.*meas/x3.*meas/roof.*weights$", 2),
        # batch, tok/s x2, measured, traffic x1, x3, roofline, three measured/predicted, the bound
        (rf"^\s*\d+\s+{_NUM}\s+{_NUM}\s+{_X}\s+{_X}\s+{_X}\s+{_X}\s+{_NUM}\s+{_NUM}\s+{_NUM}\s+(compute|memory)$", 4),
    ],
    "bench_generate.py": [
        (r"prefill FLOP model .*decode traffic model", 1),
        (rf"^\s*\d+\s+\d+\s+{_NUM}\s+{_NUM}\s+{_X}\s+{_X}\s+{_X}$", 4),  # 2 batches x 2 lengths
    ],
    "bench_growth.py": [
        (r"FLOP model .*meas/model", 1),
        (rf"^\s*\d+\s+(\S+\s+)?{_NUM}\s+{_NUM}\s+{_X}\s+{_X}\s+{_NUM}\s+{_X}\s+{_NUM}\s+\d+(\s+{_NUM}){{4}}$", 2),
    ],
    "bench_memory.py": [
        (r"^KV bytes per sample pruned/unpruned: 0\.\d+$", 1),
        (r"-> batch\s+-?\d+\s+KV-only bound\s+\d+$", 2),
    ],
    "bench_overhead.py": [
        (r"glue share", 1),
        (rf"^topk\(keep_ratio=0\.22\)\s+\d+(\s+{_NUM}){{4}}\s+{_NUM}%$", 2),
    ],
    "bench_prefill.py": _prefill_expected(),
    "bench_primitives.py": [
        (rf"^\s*\d+(\s+{_NUM}){{4}}\s+{_X}\s+{_X}$", 2),  # knee: vs sort and vs kneed
        (rf"^\S.*\s+{_NUM}\s+{_NUM}\s+\d+x$", 11),  # every primitive vs its loop reference
    ],
}
#: a script not listed above must at least print one measured ratio
DEFAULT = [(_X, 1)]

_DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
sys.path.insert(0, sys.argv[1])
results = {}
for key, script, extra in json.loads(sys.argv[2]):
    entry = {}
    for phase, argv in (("help", ["--help"]), ("smoke", ["--smoke", *extra])):
        out = io.StringIO()
        sys.argv = [script, *argv]
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
        entry[phase] = {"rc": code, "out": out.getvalue()}
        if phase == "help" and "--smoke" not in out.getvalue():
            break
    results[key] = entry
print("RESULTS" + json.dumps(results))
"""


def _cases() -> list[tuple[str, str, list[str]]]:
    return [(" ".join([name, *extra]), name, extra) for name in SCRIPTS for extra in VARIANTS.get(name, [[]])]


@pytest.fixture(scope="module")
def smoke_runs() -> dict[str, dict]:
    env = {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "MALLOC_MMAP_THRESHOLD_": "131072",  # bench_memory.py would re-execute itself to set it
    }
    cases = [[key, str(BENCH / name), extra] for key, name, extra in _cases()]
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(BENCH), json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0 and "RESULTS" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULTS", 1)[1])


def test_the_scripts_are_found() -> None:
    assert {"bench_decode.py", "bench_growth.py", "bench_prefill.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("key", [k for k, _, _ in _cases()])
def test_script_runs_with_smoke_and_prints_its_ratios(smoke_runs: dict[str, dict], key: str) -> None:
    entry = smoke_runs[key]
    name = key.split()[0]
    assert "smoke" in entry, f"{name}: its --help lacks --smoke; every benchmark needs it (see the module docstring)"
    run = entry["smoke"]
    assert run["rc"] == 0, f"{key} --smoke exited {run['rc']}:\n{run['out'][-4000:]}"
    lines = run["out"].splitlines()
    for pattern, least in EXPECTED.get(name, DEFAULT):
        found = [line for line in lines if re.search(pattern, line)]
        assert len(found) >= least, f"{key}: {len(found)} lines match {pattern!r}, need {least}:\n{run['out'][-4000:]}"


def test_gpu_check_runs_every_benchmark() -> None:
    """The prepared GPU script names every benchmark, so a new one is not left out of the one GPU run."""
    text = (BENCH / "gpu_check.sh").read_text()
    missing = [name for name in SCRIPTS if f"benchmarks/{name}" not in text]
    assert not missing, f"benchmarks/gpu_check.sh does not run {missing}"
