"""One error hierarchy under TokpruneError on every run-time path (issue 20 item 6), and refusals that name
the strategy by its short spec, the family and what works. Families come from the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tokprune
from tokprune import errors
from tokprune.adapters import registered_adapters
from tokprune.testing.adapters import LENGTHS, tiny_case

PACKAGE = Path(tokprune.__file__).parent
#: Modules on the run-time path of patch / forward / generate and of the strategies they run.
RUNTIME = [
    *sorted((PACKAGE / "adapters").glob("*.py")),
    *sorted((PACKAGE / "scoring").glob("*.py")),
    *(
        PACKAGE / name
        for name in ("hf_compat.py", "stats.py", "registry.py", "strategy.py", "pipeline.py", "params.py", "spec.py")
    ),
]
BUILTIN_ERRORS = {"RuntimeError", "ValueError", "TypeError", "KeyError", "IndexError", "AssertionError", "Exception"}
FAMILIES = [cls for cls, _ in registered_adapters()]


def _bare_raises(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assert):
            found.append(f"{path.name}:{node.lineno}: assert")
        elif isinstance(node, ast.Raise) and node.exc is not None:
            call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(call, ast.Name) and call.id in BUILTIN_ERRORS:
                found.append(f"{path.name}:{node.lineno}: raise {call.id}")
    return found


@pytest.mark.parametrize("path", RUNTIME, ids=[str(p.relative_to(PACKAGE)) for p in RUNTIME])
def test_no_bare_builtin_error_or_assert_on_a_runtime_path(path):
    assert _bare_raises(path) == []


def test_every_error_class_is_a_tokprune_error_and_the_builtin_a_caller_would_catch():
    expected = {
        "InputError": ValueError,
        "AlreadyPatchedError": RuntimeError,
        "InternalError": RuntimeError,
        "PluginError": TypeError,
        "AdapterNameClash": ValueError,
        "AmbiguousModelError": errors.UnsupportedModelError,
        "UnsupportedModelError": TypeError,
        "MissingCapabilityError": RuntimeError,
        "StrategyParamError": ValueError,
    }
    for name, base in expected.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.TokpruneError) and issubclass(cls, base), name
    assert not issubclass(errors.InputError, TypeError)


@pytest.mark.parametrize("family", FAMILIES, ids=[cls.name for cls in FAMILIES])
def test_right_padding_is_an_input_error_not_a_type_error(family):
    case = tiny_case(family)
    inputs = case.make_inputs(LENGTHS)
    right = {k: v for k, v in inputs.items()}
    # roll every row so its padding is on the right
    pads = (~inputs["attention_mask"].bool()).sum(dim=1)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in right:
            right[key] = inputs[key].clone()
            for b, p in enumerate(pads.tolist()):
                right[key][b] = inputs[key][b].roll(-p)
    with tokprune.pruned(case.model, "fastv", question_end=case.question_end):
        with pytest.raises(errors.InputError, match="left padding") as err:
            case.model(**right)
    assert not isinstance(err.value, TypeError)


def test_patching_twice_is_an_already_patched_error_naming_the_pipeline():
    case = tiny_case(FAMILIES[0])
    with tokprune.pruned(case.model, "fastv(layer=2)"):
        with pytest.raises(errors.AlreadyPatchedError, match="already patched with 'fastv") as err:
            tokprune.patch(case.model, "fastv")
    assert isinstance(err.value, RuntimeError)


@pytest.mark.parametrize("family", FAMILIES, ids=[cls.name for cls in FAMILIES])
def test_a_layer_out_of_range_names_the_short_spec_and_the_family(family):
    case = tiny_case(family)
    with pytest.raises(errors.StrategyParamError) as err:
        tokprune.patch(case.model, "fastv(layer=9)")
    text = str(err.value)
    assert (
        text.startswith("fastv(layer=9) prunes before decoder layer 9") and f"this {family.name} language model" in text
    )
    assert f"layer must be in 1..{case.model.config.get_text_config().num_hidden_layers - 1}" in text


def test_short_spec_keeps_only_the_changed_parameters():
    assert tokprune.strategies.get("fastv")[0].short_spec() == "fastv"
    assert tokprune.strategies.get("fastv(layer=3)")[0].short_spec() == "fastv(layer=3)"
    full = tokprune.strategies.get("fastv(layer=3)")[0].spec()
    assert full.startswith("fastv(") and full.count("=") > 1


@pytest.mark.parametrize("family", FAMILIES, ids=[cls.name for cls in FAMILIES])
def test_a_vision_step_a_family_cannot_run_is_refused_naming_it_the_family_and_what_works(family):
    """Every registered vision strategy a family refuses names itself (short spec), the family and the ones that work."""
    case = tiny_case(family)
    refused = 0
    for name in tokprune.strategies.available(stage="vision"):
        try:
            tokprune.patch(case.model, name, question_end=case.question_end).remove()
        except errors.MissingCapabilityError as err:
            refused += 1
            text = str(err)
            assert text.startswith(f"{name} ") and family.name in text, text
            assert ":" in text.split(family.name, 1)[1], f"no list of what works: {text}"
    if refused == 0:
        pytest.skip(f"{family.name} runs every registered vision strategy")
