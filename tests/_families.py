"""The registered families as pytest parameters: every family-driven test takes them from here.

A family whose tested minimum (``min_transformers``) is above the installed transformers is skipped with the
reason (CI's declared-minimum leg); ``patch()`` itself refuses there by feature detection.
"""

from __future__ import annotations

import pytest

from tokprune import hf_compat as hf
from tokprune.adapters import ModelAdapter, registered_adapters


def family_param(cls: type[ModelAdapter]) -> object:
    """``cls`` as a pytest parameter, skipped below its ``min_transformers``, with its name as the id."""
    reason = f"{cls.name} is tested from transformers {cls.min_transformers}, this is {hf.transformers_version()}"
    return pytest.param(cls, marks=pytest.mark.skipif(hf.older_than(cls.min_transformers), reason=reason), id=cls.name)


#: Every registered family, as parameters.
FAMILY_PARAMS = [family_param(cls) for cls, _ in registered_adapters()]
