"""Fixtures of the fault-injection suite (the helpers live in ``_kit``)."""

from faults._kit import study  # noqa: F401  (a fixture)
