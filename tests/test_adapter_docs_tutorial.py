"""docs/adapters.md's "Adding a family" tutorial shows the shipped SmolVLM family: every code block of it is
an excerpt of tokprune/adapters/smolvlm.py (so the tutorial cannot drift from the code that passes the
contract), and its last block runs the contract in one call on that family."""

from __future__ import annotations

import re
from pathlib import Path

import tokprune.adapters.smolvlm as smolvlm

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"


def _tutorial_blocks() -> list[str]:
    text = DOC.read_text()
    section = text[text.index("### Tutorial: SmolVLM") : text.index("### Writing an adapter for another family")]
    return re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)


def test_every_tutorial_excerpt_is_in_the_shipped_family():
    source = Path(smolvlm.__file__).read_text()
    blocks = _tutorial_blocks()
    excerpts = [b for b in blocks if not b.startswith("from tokprune.adapters.smolvlm import")]
    assert len(excerpts) >= 6
    missing = [b.splitlines()[0] for b in excerpts if b not in source]
    assert missing == [], f"tutorial excerpts not found in {smolvlm.__file__}: {missing}"


def test_the_tutorial_ends_with_the_one_call_contract_on_the_family():
    last = _tutorial_blocks()[-1]
    namespace: dict = {}
    exec(compile(last, str(DOC), "exec"), namespace)  # noqa: S102 (our own docs)
    assert namespace["SmolVLMAdapter"] is smolvlm.SmolVLMAdapter
    namespace["test_smolvlm_contract"]()  # the block as a contributor runs it: every check, every mutant
