"""Test suites shipped for plugin authors: run them on your own strategies.

* :mod:`tokprune.testing.contract` — every strategy, on random inputs (no model needed); the inputs are
  :mod:`tokprune.testing.batches`, public for checks of your own.
* :mod:`tokprune.testing.adapters` — every model adapter, on its own tiny random model (keep-all ==
  stock, batch == solo, cache == recompute, remove() restores, sdpa == eager, stats add up).
* :mod:`tokprune.testing.equivalence` — a strategy inside a patched tiny LLaVA (cache == no cache,
  batch == solo).
"""

from .contract import CHECKS, ContractFailure, check_strategy

__all__ = ["CHECKS", "ContractFailure", "check_strategy"]
