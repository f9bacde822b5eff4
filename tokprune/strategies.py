"""Public registry API: ``from tokprune import strategies; strategies.get("cls_knee+text_interact")``."""

from .registry import StrategyInfo, available, describe, get

__all__ = ["StrategyInfo", "available", "describe", "get"]
