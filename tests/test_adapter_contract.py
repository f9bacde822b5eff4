"""The adapter contract over every registered adapter (timm's one test over ``list_models()``).

A new family passes by registering its adapter (with ``tiny()``): nothing here names a family.
"""

from __future__ import annotations

import pytest

from tokprune import hf_compat as hf
from tokprune.adapters import registered_adapters
from tokprune.testing.adapters import CHECKS, cache_equivalence, contract_specs


def _family(cls):
    # A family whose tested minimum is above the installed transformers is skipped with the reason
    # (CI's declared-minimum leg); patch() itself refuses there by feature detection.
    reason = f"{cls.name} is tested from transformers {cls.min_transformers}, this is {hf.transformers_version()}"
    return pytest.param(cls, marks=pytest.mark.skipif(hf.older_than(cls.min_transformers), reason=reason))


ADAPTERS = [_family(cls) for cls, _ in registered_adapters()]
IDS = [cls.name for cls, _ in registered_adapters()]
# "cache" runs every registered strategy: parametrised per strategy below, so a failure names it.
CHECKS_ONE_RUN = {name: check for name, check in CHECKS.items() if name != "cache"}


@pytest.mark.parametrize("check", list(CHECKS_ONE_RUN.values()), ids=list(CHECKS_ONE_RUN))
@pytest.mark.parametrize("adapter", ADAPTERS, ids=IDS)
def test_adapter_contract(adapter, check):
    check(adapter)


@pytest.mark.parametrize("spec", contract_specs())
@pytest.mark.parametrize("adapter", ADAPTERS, ids=IDS)
def test_cache_equals_recompute(adapter, spec):
    if cache_equivalence(adapter, spec) is None:  # refused at patch(): shown as a skip, never a silent pass
        pytest.skip(f"{adapter.name} refuses {spec} on its tower")


def test_every_family_tokprune_ships_is_registered_so_in_the_contract():
    """Every concrete adapter class in tokprune.adapters is registered (so parametrised above): found by
    walking the package, not from a list that a new family would have to be added to."""
    import importlib
    import inspect
    import pkgutil

    import tokprune.adapters as package
    from tokprune.adapters import ModelAdapter

    shipped = set()
    for module in pkgutil.iter_modules(package.__path__):
        for _, obj in inspect.getmembers(importlib.import_module(f"{package.__name__}.{module.name}"), inspect.isclass):
            if issubclass(obj, ModelAdapter) and not inspect.isabstract(obj) and "name" in vars(obj):
                shipped.add(obj)
    registered = {cls for cls, _ in registered_adapters()}
    assert shipped and shipped <= registered, f"shipped but not registered: {shipped - registered}"


def test_an_adapter_without_a_tiny_model_fails_the_contract():
    from tokprune.adapters import ModelAdapter

    class Bare(ModelAdapter):
        name = "bare"

        @classmethod
        def matches(cls, model):
            return False

        def _install(self):
            pass

    with pytest.raises(AssertionError, match="'bare' provides no tiny model"):
        CHECKS["keep_all"](Bare)
