"""tokprune.ablation: config-driven studies of pruning pipelines (``tokprune run``).

``load_config(path, overrides)`` builds an :class:`AblationConfig`; ``run_ablation(cfg)`` runs or resumes
it, appending one JSON line per finished run to ``<output_dir>/results.jsonl`` and writing
``summary.md``, ``summary.csv``, ``tests.csv`` and ``curves.png``. See ``docs/ablation.md``.
"""

from .config import AblationConfig, ConfigError, DatasetConfig, MatchBudgetConfig, PositionsConfig, load_config
from .datasets import DatasetError, EvalSample, load_jsonl
from .results import ResultsError, load_results

__all__ = [
    "AblationConfig",
    "ConfigError",
    "DatasetConfig",
    "DatasetError",
    "EvalSample",
    "MatchBudgetConfig",
    "PositionsConfig",
    "ResultsError",
    "load_config",
    "load_jsonl",
    "load_results",
    "run_ablation",
]


def __getattr__(name: str):  # noqa: ANN202 - lazy: the runner imports torch and transformers
    if name == "run_ablation":
        from .runner import run_ablation

        return run_ablation
    raise AttributeError(f"module 'tokprune.ablation' has no attribute {name!r}")
