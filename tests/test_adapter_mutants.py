"""The adapter contract catches wrong tokens: every deliberately wrong adapter fails the ``tokens`` check,
on every registered family, while the family itself passes it (the latter in test_adapter_contract.py)."""

from __future__ import annotations

import pytest

from tokprune import hf_compat as hf
from tokprune.adapters import registered_adapters
from tokprune.testing.adapters import check_adapter
from tokprune.testing.mutants import MUTANTS, applies, mutant
from tokprune.testing.tokens import check_tokens


def _family(cls):
    reason = f"{cls.name} is tested from transformers {cls.min_transformers}, this is {hf.transformers_version()}"
    return pytest.param(cls, marks=pytest.mark.skipif(hf.older_than(cls.min_transformers), reason=reason))


ADAPTERS = [_family(cls) for cls, _ in registered_adapters()]
IDS = [cls.name for cls, _ in registered_adapters()]


@pytest.mark.parametrize("name", list(MUTANTS))
@pytest.mark.parametrize("adapter", ADAPTERS, ids=IDS)
def test_every_mutant_fails_the_tokens_check(adapter, name):
    if not applies(adapter, name):
        pytest.skip(f"{adapter.name} refuses what {name} changes (compact positions on multi-axis RoPE)")
    wrong = mutant(adapter, name)
    with pytest.raises(AssertionError, match=rf"{wrong.__name__} \({adapter.name}"):
        check_tokens(wrong)


def test_a_mutant_is_its_family_with_one_bug():
    adapter = registered_adapters()[0][0]
    for name in MUTANTS:
        wrong = mutant(adapter, name)
        assert issubclass(wrong, adapter) and wrong.name == adapter.name
    with pytest.raises(KeyError, match="unknown mutant 'nope'; available: wrong_rows"):
        mutant(adapter, "nope")


def test_check_adapter_reports_a_mutant_the_check_lets_through(monkeypatch):
    import tokprune.testing.mutants as mutants

    adapter = registered_adapters()[0][0]
    monkeypatch.setitem(mutants.MUTANTS, "harmless", lambda cls: cls)  # a "mutant" with no bug
    with pytest.raises(AssertionError, match="let these wrong adapters through: harmless"):
        check_adapter(adapter, checks=["tokens"])
