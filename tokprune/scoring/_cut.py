"""How to cut a score curve: the one place where a per-sample keep count is chosen.

Public (``tokprune.scoring``) so plugins cut exactly as the built-ins do. Every adaptive strategy
(``cls_knee``, ``text_interact``) goes through the same three steps:

1. **rule** -> a raw count per sample from the scores of its candidates (:func:`raw_counts`):
   ``knee`` (Kneedle on the descending-sorted curve, keep ``knee + 1``), ``chord`` (the point farthest
   from the chord, keep ``index + 1``), ``iqr`` (number of high outliers above ``Q3 + f * IQR``, PruMerge's
   rule), ``lof`` (number of LocalOutlierFactor outliers, the authors' sibling code);
2. **fallback** when the rule finds nothing (no knee, zero outliers, fewer than 3 candidates):
   ``fixed`` (``fallback_keep`` tokens), ``all`` or ``min`` (``min_keep``);
3. **clamp** into ``[min_keep, max_keep]`` (each capped at the candidate count): bounds always win, also
   over the fallback.

Then :func:`keep_top` keeps the top-``count`` candidates by score (a mask, so raster order is untouched).

Candidate sets may be ragged (LLM stage: a different number of image/question tokens per sample). The
knee and the outlier rules depend on the curve's length, so a row padded to the batch width would not
give the result it gives alone. The knee, chord and IQR primitives therefore take per-row ``lengths``
and serve the whole batch in one call; LOF has no ragged form, so its rows are bucketed by candidate
count, one batched call per distinct count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import InputError, StrategyParamError
from ..params import param
from ._knee import find_knee, knee_chord
from ._outliers import iqr_outlier_count, lof_outlier_count
from ._select import ragged_gather, topk_mask

__all__ = [
    "CUT_RULES",
    "FALLBACKS",
    "Cut",
    "CutParams",
    "CutRule",
    "CutRuleName",
    "FallbackName",
    "cut",
    "cut_bounds",
    "fixed_counts",
    "keep_top",
    "ragged_raw_counts",
    "ratio_bounds",
    "raw_counts",
]

CutRuleName = Literal["knee", "chord", "iqr", "lof"]
FallbackName = Literal["fixed", "all", "min"]
CUT_RULES: tuple[str, ...] = ("knee", "chord", "iqr", "lof")
FALLBACKS: tuple[str, ...] = ("fixed", "all", "min")

#: Curves shorter than this have no knee and no meaningful quartiles: the fallback applies.
MIN_CURVE = 3


@dataclass(frozen=True)
class CutRule:
    """The "how to cut" settings shared by every adaptive strategy."""

    rule: CutRuleName = "knee"
    sensitivity: float = 1.0
    online: bool = False
    iqr_factor: float = 1.5
    lof_neighbors: int = 20


@dataclass(frozen=True)
class CutParams:
    """Parameters of :func:`cut`, shared by the adaptive strategies' ``Params`` (which subclass it)."""

    cut: CutRuleName = param("knee", "how to cut the sorted score curve: knee (Kneedle), chord, iqr or lof")
    sensitivity: float = param(1.0, "Kneedle sensitivity S (cut=knee): larger = later knee or none", ge=0)
    online: bool = param(False, "Kneedle online mode (cut=knee): last knee instead of the first")
    iqr_factor: float = param(1.5, "outlier fence Q3 + factor * IQR (cut=iqr)", gt=0)
    lof_neighbors: int = param(20, "LocalOutlierFactor n_neighbors (cut=lof)", ge=1)
    min_keep: int = param(16, "keep at least this many candidates per sample (capped at the candidates)", ge=1)
    max_keep: int | None = param(None, "keep at most this many candidates per sample; none = no bound", ge=1)
    fallback: FallbackName = param("fixed", "when the rule finds no cut: fixed (fallback_keep), all, or min (min_keep)")
    fallback_keep: int = param(144, "count kept by fallback=fixed (then clamped to min/max_keep)", ge=1)

    def __post_init__(self) -> None:
        if self.max_keep is not None and self.min_keep > self.max_keep:
            raise StrategyParamError(f"min_keep={self.min_keep} must be <= max_keep={self.max_keep}")

    @property
    def rule(self) -> CutRule:
        return CutRule(self.cut, self.sensitivity, self.online, self.iqr_factor, self.lof_neighbors)


@dataclass(frozen=True)
class Cut:
    """A per-sample keep decision. Every field is ``[B]``."""

    #: long: number of candidates to keep (0 only where a sample has no candidate).
    counts: Tensor
    #: long: what the rule proposed before fallback and clamping (0 = nothing found).
    raw: Tensor
    #: long: the rule's cut index in the descending-sorted curve (``raw - 1``), -1 where nothing was found.
    knee: Tensor
    #: bool: the fallback was taken.
    fallback: Tensor
    #: bool: ``min_keep``/``max_keep`` changed the count.
    clamped: Tensor

    def diagnostics(self) -> dict[str, Tensor]:
        return {
            "knee": self.knee,
            "raw_keep": self.raw,
            "keep_count": self.counts,
            "fallback": self.fallback,
            "clamped": self.clamped,
        }


def raw_counts(scores: Tensor, rule: CutRule, lengths: Tensor | None = None) -> Tensor:
    """Count proposed by ``rule`` for each row.

    Args:
        scores: fp32 ``[B, M]``.
        rule: the cut settings.
        lengths: long ``[B]``: row ``b``'s curve is ``scores[b, :lengths[b]]``; None = every entry.

    Returns:
        long ``[B]``: keep count, 0 where the rule finds no cut (no knee, no outlier, fewer than 3 entries).
    """
    b, m = scores.shape
    if m < MIN_CURVE:
        return torch.zeros(b, dtype=torch.long, device=scores.device)
    if rule.rule == "knee":
        knee = find_knee(scores, sensitivity=rule.sensitivity, online=rule.online, lengths=lengths)
        return torch.where(knee >= 0, knee + 1, torch.zeros_like(knee))
    if rule.rule == "chord":
        knee = knee_chord(scores, lengths=lengths)
        return torch.where(knee >= 0, knee + 1, torch.zeros_like(knee))
    if rule.rule == "iqr":
        counts = iqr_outlier_count(scores, factor=rule.iqr_factor, lengths=lengths).long()
        return counts if lengths is None else counts.masked_fill(lengths < MIN_CURVE, 0)
    if rule.rule == "lof":
        if lengths is not None:
            raise InputError("the lof rule takes dense rows; use ragged_raw_counts for ragged ones")
        return lof_outlier_count(scores, n_neighbors=rule.lof_neighbors).long()
    raise StrategyParamError(f"cut rule {rule.rule!r} is not one of {list(CUT_RULES)}")


def ragged_raw_counts(scores: Tensor, candidates: Tensor, rule: CutRule) -> Tensor:
    """:func:`raw_counts` over each row's candidates only.

    Args:
        scores: fp32 ``[B, L]``.
        candidates: bool ``[B, L]``.
        rule: the cut settings.

    Returns:
        long ``[B]`` raw counts (0 where nothing was found or a row has no candidates).
    """
    n = candidates.sum(dim=1)
    if bool(candidates.all()):
        return raw_counts(scores, rule)
    dense, _, _ = ragged_gather(scores, candidates)  # left-aligned candidates, [B, max n]
    if rule.rule != "lof":
        return raw_counts(dense, rule, lengths=n)
    # LOF has no ragged form: one batched call per distinct candidate count, each row at its own length.
    out = torch.zeros_like(n)
    for width in torch.unique(n).tolist():
        if width == 0:
            continue
        rows = (n == width).nonzero().flatten()
        out[rows] = raw_counts(dense[rows, :width], rule)
    return out


def cut_bounds(
    n: Tensor,
    min_keep: int | Tensor = 1,
    max_keep: int | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row ``(lo, hi)`` keep bounds, long ``[B]``, each capped at the candidate count ``n``."""
    hi = n if max_keep is None else torch.minimum(n, torch.as_tensor(max_keep, device=n.device).long())
    lo = torch.minimum(torch.as_tensor(min_keep, device=n.device).long().expand_as(n), hi)
    return lo, hi


def cut(
    scores: Tensor,
    rule: CutRule,
    *,
    candidates: Tensor | None = None,
    min_keep: int | Tensor = 1,
    max_keep: int | Tensor | None = None,
    fallback: FallbackName = "fixed",
    fallback_keep: int = 144,
) -> Cut:
    """Choose each sample's keep count: rule, then fallback, then clamp.

    Args:
        scores: fp32 ``[B, L]`` (higher = more important).
        rule: the cut settings.
        candidates: bool ``[B, L]`` positions the count refers to; None = all.
        min_keep: lower bound (int or long ``[B]``), capped at the candidate count.
        max_keep: upper bound (int, long ``[B]`` or None = no bound).
        fallback: count used where the rule finds nothing: ``fixed`` -> ``fallback_keep``, ``all`` -> every
            candidate, ``min`` -> ``min_keep``.
        fallback_keep: the ``fixed`` fallback count.

    Returns:
        :class:`Cut` with ``counts`` in ``[min(min_keep, n), min(max_keep, n)]`` for every row.
    """
    if fallback not in FALLBACKS:
        raise InputError(f"fallback {fallback!r} is not one of {list(FALLBACKS)}")
    if candidates is None:
        n = torch.full(scores.shape[:1], scores.shape[1], dtype=torch.long, device=scores.device)
        raw = raw_counts(scores, rule)
    else:
        n = candidates.sum(dim=1)
        raw = ragged_raw_counts(scores, candidates, rule)
    lo, hi = cut_bounds(n, min_keep, max_keep)
    found = raw > 0
    if fallback == "fixed":
        alternative = torch.full_like(n, fallback_keep)
    elif fallback == "all":
        alternative = n
    else:
        alternative = lo
    proposed = torch.where(found, raw, alternative)
    counts = torch.maximum(torch.minimum(proposed, hi), lo)
    knee = torch.where(found, raw - 1, torch.full_like(raw, -1))
    return Cut(counts=counts, raw=raw, knee=knee, fallback=~found & (n > 0), clamped=counts != proposed)


def keep_top(scores: Tensor, counts: Tensor, candidates: Tensor | None = None) -> Tensor:
    """bool ``[B, L]``: the top-``counts[b]`` candidates of each row by score (others False).

    Non-candidates are ranked below every candidate, so they are never picked while ``counts`` does not
    exceed the candidate count (which :func:`cut` and :func:`fixed_counts` guarantee).
    """
    if candidates is not None:
        scores = scores.masked_fill(~candidates, float("-inf"))
    mask = topk_mask(scores, counts)
    return mask if candidates is None else mask & candidates


def fixed_counts(n: Tensor, keep: int | None, keep_ratio: float) -> Tensor:
    """long ``[B]`` keep counts of a fixed budget: ``min(keep, n)``, or ``round(n * keep_ratio)`` (half
    up, as FastV's ``round(576 * (1 - R))``) and at least 1 where ``n > 0``.
    """
    if keep is not None:
        return torch.clamp(n, max=keep)
    counts = torch.floor(n.double() * keep_ratio + 0.5).long()
    return torch.minimum(torch.clamp(counts, min=1), n)


def ratio_bounds(n: Tensor, min_ratio: float, max_ratio: float) -> tuple[Tensor, Tensor]:
    """Count bounds from fractions of ``n`` (long ``[B]``): ``ceil(n * min_ratio)``, ``floor(n * max_ratio)``."""
    lo = torch.ceil(n.double() * min_ratio - 1e-9).long()
    hi = torch.floor(n.double() * max_ratio + 1e-9).long()
    return lo, hi
