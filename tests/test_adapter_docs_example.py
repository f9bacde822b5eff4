"""The minimal adapter of docs/adapters.md ("Writing an adapter"), run as written: it registers through
the plugin hook and passes the adapter contract (LLM stage only)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tokprune
from tokprune._plugins import pm
from tokprune.adapters import registered_adapters
from tokprune.testing.adapters import CHECKS, cache_equivalence

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    block = re.search(r"## Writing an adapter for another family.*?```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert block is not None
    namespace: dict = {}
    exec(compile(block.group(1), str(DOC), "exec"), namespace)  # noqa: S102 (our own docs)
    module = type(tokprune)("tokprune_llava_mistral")
    module.__dict__.update(namespace)
    pm.register(module, name="llava_mistral")
    try:
        yield namespace["LlavaMistralAdapter"]
    finally:
        pm.unregister(module, name="llava_mistral")


def test_the_example_registers_and_is_picked_for_its_model(example):
    assert example in [cls for cls, _ in registered_adapters()]
    case = example.tiny()
    assert not tokprune.adapters.llava.LlavaAdapter.matches(case.model)  # the built-in expects Llama
    with tokprune.pruned(case.model, "fastv") as run:
        assert isinstance(run, example)
    with pytest.raises(tokprune.errors.MissingCapabilityError, match="no vision stage"):
        tokprune.patch(case.model, "topk")


@pytest.mark.parametrize("check", [c for n, c in CHECKS.items() if n != "cache"], ids=[n for n in CHECKS if n != "cache"])
def test_the_example_passes_the_adapter_contract(example, check):
    check(example)


def test_the_example_cache_equals_recompute(example):
    assert cache_equivalence(example, "fastv") is not None and cache_equivalence(example, "topk") is None
