"""The spec grammar: table-driven parses, canonical round trips and error texts."""

from __future__ import annotations

import pytest

from tokprune.errors import SpecSyntaxError
from tokprune.spec import expand_sweeps, format_terms, parse_spec

PARSES = [
    ("a", [("a", {})]),
    ("a+b", [("a", {}), ("b", {})]),
    ("  a ( )  +  b ", [("a", {}), ("b", {})]),
    ("fastv(layer=2, keep_ratio=0.5)", [("fastv", {"layer": 2, "keep_ratio": 0.5})]),
    ("t(x=-3, y=1e-3, z=.5, w=+2)", [("t", {"x": -3, "y": 1e-3, "z": 0.5, "w": 2})]),
    ("t(a=true, b=False, c=none, d=null)", [("t", {"a": True, "b": False, "c": None, "d": None})]),
    ("t(s=cls_attn, p=a.b-c)", [("t", {"s": "cls_attn", "p": "a.b-c"})]),
    ('t(s="a, b)", q=\'x+y\')', [("t", {"s": "a, b)", "q": "x+y"})]),
    ('t(s="say \\"hi\\"")', [("t", {"s": 'say "hi"'})]),
    ("t(l=[1, 2,3])", [("t", {"l": [1, 2, 3]})]),
    # parentheses are a schedule (a tuple), brackets a sweep (a list); a sweep of schedules is both
    ("p(layer=(8, 16,24), r=( 0.5 ,0.25))", [("p", {"layer": (8, 16, 24), "r": (0.5, 0.25)})]),
    ("p(layer=(2))", [("p", {"layer": (2,)})]),
    ("p(layer=[(2, 4), (3, 6)], x=[1])", [("p", {"layer": [(2, 4), (3, 6)], "x": [1]})]),
]


@pytest.mark.parametrize(("text", "expected"), PARSES)
def test_parses(text, expected):
    assert [(t.name, t.params) for t in parse_spec(text)] == expected


@pytest.mark.parametrize(("text", "expected"), PARSES)
def test_format_round_trips(text, expected):
    terms = parse_spec(text)
    again = parse_spec(format_terms(terms))
    assert [(t.name, t.params) for t in again] == expected


ERRORS = [
    ("a++b", 2, "expected a strategy name"),
    ("a+", 2, "expected a strategy name"),
    ("fastv(layer=2 keep_ratio=0.5)", 14, "expected ',' or ')'"),
    ("fastv(layer 2)", 12, "expected '=' after parameter 'layer'"),
    ("fastv(layer=2", 13, "expected ',' or ')'"),
    ("Fastv", 0, "expected a strategy name"),
    ("fastv(layer=2, layer=3)", 14, "parameter 'layer' given twice"),
    ('t(s="abc)', 4, "unterminated string"),
    ("t(x=)", 4, "expected a value"),
    ("a b", 2, "unexpected 'b'"),
    ("p(layer=(2, 4)", 14, "expected ',' or ')' but found end of spec"),
    ("p(layer=(2 4))", 11, "closing the schedule"),
    ("p(layer=())", 8, "empty schedule"),
    ("p(layer=((2)))", 9, "do not nest"),
    ("p(layer=([2]))", 9, "do not nest"),
]


@pytest.mark.parametrize(("text", "position", "message"), ERRORS)
def test_syntax_errors_point_at_the_character(text, position, message):
    with pytest.raises(SpecSyntaxError) as info:
        parse_spec(text)
    text_out = str(info.value)
    assert message in text_out
    assert f"at position {position}" in text_out
    # The caret sits under the offending character.
    lines = text_out.splitlines()
    assert lines[-1].index("^") - 2 == position
    assert isinstance(info.value, ValueError)


def test_empty_spec_is_an_error_that_suggests_none():
    with pytest.raises(SpecSyntaxError, match="'none' for no pruning"):
        parse_spec("   ")


def test_expand_sweeps_is_a_row_major_grid():
    specs = expand_sweeps("topk(keep=[8, 16])+fastv(layer=[2, 3], keep_ratio=0.5)")
    assert specs == [
        "topk(keep=8)+fastv(layer=2, keep_ratio=0.5)",
        "topk(keep=8)+fastv(layer=3, keep_ratio=0.5)",
        "topk(keep=16)+fastv(layer=2, keep_ratio=0.5)",
        "topk(keep=16)+fastv(layer=3, keep_ratio=0.5)",
    ]
    assert expand_sweeps("fastv(layer=2)") == ["fastv(layer=2)"]


def test_a_sweep_of_schedules_expands_into_schedules():
    assert expand_sweeps("p(layer=[(2, 4), (3, 6)], r=(0.5, 0.25))") == [
        "p(layer=(2, 4), r=(0.5, 0.25))",
        "p(layer=(3, 6), r=(0.5, 0.25))",
    ]


def test_schedule_parameters_are_typed_and_tell_schedules_from_sweeps():
    from dataclasses import dataclass

    from tokprune.errors import StrategyParamError
    from tokprune.params import build_params, format_value, param, param_infos

    @dataclass(frozen=True)
    class P:
        layer: tuple[int, ...] = param((2, 4), "layers", ge=1)
        k: int = param(1, "plain")

    assert build_params("p", P, {"layer": (3, 5)}).layer == (3, 5)
    assert build_params("p", P, {"layer": 3}).layer == (3,)  # one value is a schedule of one step
    assert param_infos(P)[0].type == "(int, ...)" and format_value((3, 5)) == "(3, 5)"
    with pytest.raises(StrategyParamError, match=r"lists are sweeps.*a schedule is a tuple: \(3, 5\)"):
        build_params("p", P, {"layer": [3, 5]})
    with pytest.raises(StrategyParamError, match=r"p.layer must be >= 1, got 0"):
        build_params("p", P, {"layer": (2, 0)})
    with pytest.raises(StrategyParamError, match=r"p.layer must be \(int, ...\)"):
        build_params("p", P, {"layer": (2, 0.5)})
    with pytest.raises(StrategyParamError, match=r"p.k got a schedule \(1, 2\), but k takes one int"):
        build_params("p", P, {"k": (1, 2)})
