"""An engine-wide spec the family cannot run refuses at engine start, naming what works (skipped without vLLM).

Its own module: a failed in-process engine start tears down vLLM's global parallel groups, so it runs
when no other engine of tests/test_vllm_plugin.py is alive (module-scoped fixtures end with their module).
"""

from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (docs/serving.md: the CPU recipe)")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tokprune.serving import ServingSpecError  # noqa: E402
from tokprune.testing.checkpoints import save_tiny_qwen2_5_vl  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


STARTS = [
    ("fastv", {}, ["fastv prunes inside the language model", "divprune"]),
    ("vidcom2(keep_ratio=0.5)", {}, ["features decide", "reconcile=true", "evs"]),
    ("evs(keep_ratio=0.5)", {"video_pruning_rate": 0.5}, ["own EVS", "video_pruning_rate=0.5"]),
]


@pytest.mark.parametrize(("spec", "options", "fragments"), STARTS, ids=[s[0] for s in STARTS])
def test_an_engine_wide_spec_the_family_cannot_run_refuses_at_engine_start(tmp_path, spec, options, fragments):
    path = save_tiny_qwen2_5_vl(tmp_path / "qwen")
    with pytest.raises(ServingSpecError) as info:
        vllm.LLM(
            model=str(path),
            max_model_len=512,
            limit_mm_per_prompt={"image": 1, "video": 1},
            dtype="float32",
            enforce_eager=True,
            kv_cache_memory_bytes=256 << 20,
            gpu_memory_utilization=0.05,
            mm_processor_kwargs={"tokprune": spec},
            **options,
        )
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
