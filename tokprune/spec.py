"""The spec grammar: parse ``"topk(keep=64)+fastv(layer=2, keep_ratio=0.5)"`` into terms.

::

    spec   := term ("+" term)*          terms run in the order written
    term   := name ["(" [arg ("," arg)*] ")"]
    name   := [a-z][a-z0-9_]*
    arg    := name "=" value
    value  := scalar | "(" scalar ("," scalar)* ")" | "[" value ("," value)* "]"
    scalar := number | true | false | none | bare-word | "quoted string"

Brackets are sweeps (``fastv(layer=[2, 3])``): :func:`expand_sweeps` turns one spec into the grid of
plain specs; :func:`tokprune.strategies.get` rejects them. Parentheses are schedules, one typed value
with a step per entry (``pyramiddrop(layer=(8, 16, 24), keep_ratio=(0.5, 0.25, 0.125))``), parsed as a
tuple for parameters annotated ``tuple[X, ...]``; a sweep of schedules is ``layer=[(2, 4), (3, 6)]``.
Errors point at the offending character.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecSyntaxError
from .params import format_value

__all__ = ["Term", "expand_sweeps", "format_terms", "parse_spec"]

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?|[+-]?inf\b")
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_WORDS = {"true": True, "false": False, "True": True, "False": False, "none": None, "None": None, "null": None}


@dataclass
class Term:
    """One strategy reference in a spec: its name, raw parameter values and where it starts."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    position: int = 0


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str, pos: int | None = None) -> SpecSyntaxError:
        at = self.pos if pos is None else pos
        pointer = " " * at + "^"
        return SpecSyntaxError(f"malformed spec: {message} at position {at}:\n  {self.text}\n  {pointer}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of spec"
            raise self.fail(f"expected {what} but found {found}")
        self.pos += 1

    def match(self, pattern: re.Pattern) -> str | None:
        self.skip_ws()
        m = pattern.match(self.text, self.pos)
        if not m:
            return None
        self.pos = m.end()
        return m.group(0)

    def spec(self) -> list[Term]:
        terms = [self.term()]
        while self.peek() == "+":
            self.pos += 1
            terms.append(self.term())
        if self.peek():
            raise self.fail(f"unexpected {self.text[self.pos]!r} (terms are joined with '+')")
        return terms

    def term(self) -> Term:
        self.skip_ws()
        start = self.pos
        name = self.match(_NAME)
        if name is None:
            what = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of spec"
            raise self.fail(f"expected a strategy name ([a-z][a-z0-9_]*) but found {what}")
        term = Term(name, {}, start)
        if self.peek() == "(":
            self.pos += 1
            if self.peek() == ")":
                self.pos += 1
                return term
            while True:
                key_pos = self.pos
                self.skip_ws()
                key = self.match(_PARAM)
                if key is None:
                    raise self.fail("expected a parameter name")
                if key in term.params:
                    raise self.fail(f"parameter {key!r} given twice", key_pos)
                self.expect("=", f"'=' after parameter {key!r}")
                term.params[key] = self.value()
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect(")", "',' or ')'")
                break
        return term

    def value(self) -> Any:
        char = self.peek()
        if char == "(":
            start = self.pos
            self.pos += 1
            if self.peek() == ")":
                raise self.fail("empty schedule: write at least one value, e.g. (2, 4)", start)
            items = [self.scalar("a schedule value")]
            while self.peek() == ",":
                self.pos += 1
                items.append(self.scalar("a schedule value"))
            self.expect(")", "',' or ')' closing the schedule")
            return tuple(items)
        if char == "[":
            self.pos += 1
            items = [self.value()]
            while self.peek() == ",":
                self.pos += 1
                items.append(self.value())
            self.expect("]", "',' or ']'")
            return items
        return self.scalar("a value (number, true/false, none, a word, a quoted string, a (schedule) or a [sweep])")

    def scalar(self, what: str) -> Any:
        char = self.peek()
        if char and char in "([":
            raise self.fail(f"expected {what}; schedules and sweeps do not nest this way (a sweep of schedules is [(a, b), (c, d)])")
        if char in "\"'":
            return self.quoted(char)
        number = self.match(_NUMBER)
        if number is not None:
            if re.fullmatch(r"[+-]?\d+", number):
                return int(number)
            return float(number)
        word = self.match(_BARE)
        if word is not None:
            return _WORDS.get(word, word)
        raise self.fail(f"expected {what}")

    def quoted(self, quote: str) -> str:
        start = self.pos
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if char == quote:
                self.pos += 1
                return "".join(out)
            out.append(char)
            self.pos += 1
        raise self.fail("unterminated string", start)


def parse_spec(text: str) -> list[Term]:
    """Parse a spec string into terms with raw (unvalidated) parameter values."""
    if not isinstance(text, str):
        raise SpecSyntaxError(f"a spec must be a string, got {type(text).__name__}")
    if not text.strip():
        raise SpecSyntaxError("empty spec: name at least one strategy, e.g. 'cls_knee', or 'none' for no pruning")
    return _Parser(text).spec()


def format_terms(terms: list[Term]) -> str:
    """Spec text for terms (parameters in the order given)."""
    parts = []
    for term in terms:
        args = ", ".join(f"{k}={format_value(v)}" for k, v in term.params.items())
        parts.append(f"{term.name}({args})" if args else term.name)
    return "+".join(parts)


def expand_sweeps(text: str) -> list[str]:
    """The grid of plain specs a spec with list values stands for, in row-major order.

    ``"fastv(layer=[2, 3], keep_ratio=[0.25, 0.5])"`` gives four specs.
    """
    terms = parse_spec(text)
    axes = [(ti, key, values) for ti, t in enumerate(terms) for key, values in t.params.items() if isinstance(values, list)]
    if not axes:
        return [format_terms(terms)]
    specs = []
    for combo in itertools.product(*(values for _, _, values in axes)):
        concrete = [Term(t.name, dict(t.params), t.position) for t in terms]
        for (ti, key, _), value in zip(axes, combo):
            concrete[ti].params[key] = value
        specs.append(format_terms(concrete))
    return specs
