"""What the vLLM equality suites share: the keep masks a registered strategy returns in either engine, and
the first generated token's log-probs compared between vLLM and transformers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from tokprune.registry import describe


@contextlib.contextmanager
def recorded_keeps(name: str) -> Iterator[list[Tensor]]:
    """Every keep mask the registered strategy ``name`` returns, from either engine (both run in this process)."""
    cls = describe(name).cls
    original = cls.plan
    seen: list[Tensor] = []

    def plan(self: Any, ctx: Any) -> Any:
        out = original(self, ctx)
        seen.append(out.keep.clone())
        return out

    cls.plan = plan
    try:
        yield seen
    finally:
        cls.plan = original


def first_logprobs(output: Any) -> dict[int, float]:
    """A vLLM request output's top log-probs of its first generated token, by token id."""
    return {token: lp.logprob for token, lp in output.outputs[0].logprobs[0].items()}


def assert_same_logprobs(got: dict[int, float], want: dict[int, float], tol: float = 2e-4) -> None:
    """At least 4 of the top-5 tokens in common, each within ``tol``."""
    common = set(got) & set(want)
    assert len(common) >= 4, (got, want)
    for token in common:
        assert abs(got[token] - want[token]) < tol, (token, got, want)
