"""Batched Kneedle knee finder for sorted score curves.

Follows ``kneed.KneeLocator(x=arange(N), y=sort_desc(scores), curve="convex", direction="decreasing",
interp_method="interp1d")`` (kneed 0.9.0, the test oracle) and Satopää et al. 2011 (Kneedle):

1. sort each row descending; ranks ``r = 0..N-1`` are the x axis;
2. normalise ``x_n = r / (N-1)`` and ``y_n = (v - min) / (max - min)``;
3. convex + decreasing -> knee shape: ``y_t = max(y_n) - y_n = 1 - y_n``; difference ``d = y_t - x_n``;
4. local maxima / minima of ``d`` with ``>=`` / ``<=`` (plateaus count, endpoints compared with themselves
   as ``scipy.signal.argrelextrema(mode="clip")``);
5. threshold of a maximum ``m``: ``T_m = d[m] - S * mean(diff(x_n))``;
6. walk ``i`` from the first maximum to ``N-2``: a maximum sets the threshold and the candidate and
   (re)activates detection, a minimum sets the threshold to 0 and pauses detection until the next maximum
   (a plateau point that is both is processed max-then-min, so it pauses); a knee is declared at the
   candidate when ``d[i+1] < threshold``. Offline returns the first knee, online the last one.

The walk is a scan, vectorised here with a ``cummax`` over "event" positions: the state at ``i`` only
depends on the most recent extremum at or before ``i`` (its kind and its ``d``), so no loop over N.
Arithmetic is done in float64 (by default) with kneed's operation order, so the result matches kneed bit
for bit on float inputs; see ``tests/test_knee.py`` for the measured agreement.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ._validate import check_float, check_lengths, check_tensor

NO_KNEE: int = -1
"""Returned for rows with no knee: constant/flat, linear (no threshold crossing), N < 3 or non-finite."""


@lru_cache(maxsize=64)
def _mean_dx(n: int) -> float:
    # kneed's step term is |mean(diff(x_n))| computed by numpy; reproduce its exact rounding (depends on N only)
    x = np.arange(n, dtype=float)
    x_n = (x - x.min()) / (x.max() - x.min())
    return float(np.abs(np.diff(x_n).mean()))


@lru_cache(maxsize=16)
def _mean_dx_table(n_max: int) -> np.ndarray:
    """``_mean_dx(n)`` for ``n = 0 .. n_max`` (0 below 2): the step term of rows of any length up to ``n_max``."""
    return np.array([_mean_dx(n) if n >= 2 else 0.0 for n in range(n_max + 1)])


def _sorted_desc(scores: Tensor, presorted: bool, valid: Tensor | None = None) -> Tensor:
    """Rows sorted descending; with ``valid`` (bool ``[B, N]``, a prefix per row), padding sorts last as -inf."""
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    return scores if presorted else torch.sort(scores, dim=-1, descending=True).values


def _difference_curve(v: Tensor, compute_dtype: torch.dtype, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``v [B, N]`` sorted descending -> (``d [B, N]`` kneed's difference curve, ``ok [B]`` finite & non-flat).

    With ``lengths`` (long ``[B]``) row ``b`` is the curve ``v[b, :lengths[b]]``; ``d`` beyond it is
    meaningless and ``ok`` is False for rows shorter than 3. Flat rows give NaN in ``d`` (0/0) exactly like
    kneed; callers mask them with ``ok``.
    """
    n = v.shape[-1]
    v = v.to(compute_dtype)
    ranks = torch.arange(n, device=v.device, dtype=compute_dtype)
    if lengths is None:
        vmin = v[:, -1:]
        x_n = ranks / (n - 1)
    else:
        last = (lengths - 1).clamp_min(0)[:, None]
        vmin = v.gather(1, last)
        x_n = ranks / last.clamp_min(1).to(compute_dtype)
    rng = v[:, :1] - vmin
    ok = (rng > 0).squeeze(1) & torch.isfinite(rng).squeeze(1)
    if lengths is not None:
        ok &= lengths >= 3
    # same operation order as kneed: y_n = (v-min)/(max-min); y_t = 1 - y_n; d = y_t - x_n
    d = (v - vmin).div_(rng).neg_().add_(1.0).sub_(x_n)  # -(y) + 1 == 1 - y exactly in IEEE
    return d, ok


def find_knee(
    scores: Tensor,
    sensitivity: float = 1.0,
    online: bool = False,
    presorted: bool = False,
    *,
    lengths: Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Batched Kneedle knee of each row's descending-sorted score curve.

    Args:
        scores: ``[B, N]`` float scores (any float dtype, any device); or ``[N]`` for a single row.
        sensitivity: Kneedle's ``S`` (>= 0); larger values need a bigger drop after a maximum, so the knee
            comes later or not at all.
        online: ``False`` returns the first knee found (kneed's default), ``True`` the last one.
        presorted: rows are already sorted in descending order; skips the sort.
        lengths: long ``[B]``, ragged rows: row ``b`` is the curve ``scores[b, :lengths[b]]`` and the rest of
            the row is padding (ignored, any value). Each row's knee is the one it has alone, with its own
            ``N`` in the normalisation and the threshold, so one call serves a batch of different
            candidate counts. ``[B, N]`` input only.
        compute_dtype: dtype of the normalisation and difference curve. float64 (default) reproduces
            kneed exactly; float32 is faster on some GPUs and may differ on near-ties.

    Returns:
        long ``[B]`` (or a 0-d tensor for ``[N]`` input): the knee's rank in the descending-sorted row
        (0-based; keep ``knee + 1`` tokens), or ``NO_KNEE`` (-1) for flat, linear, too short (N < 3) or
        non-finite rows.
    """
    check_tensor("scores", scores, (1, 2), "[B, N] or [N]")
    check_float("scores", scores)
    if sensitivity < 0:
        raise InputError(f"sensitivity must be >= 0, got {sensitivity}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise InputError(f"compute_dtype must be one of [torch.float32, torch.float64], got {compute_dtype}")
    if scores.dim() == 1:
        if lengths is not None:
            raise InputError("lengths needs [B, N] scores, got a single [N] row")
        return find_knee(scores[None], sensitivity, online, presorted, compute_dtype=compute_dtype)[0]
    b, n = scores.shape
    valid = None
    if lengths is not None:
        check_lengths(lengths, b, n)
        valid = torch.arange(n, device=scores.device) < lengths[:, None]
    if n < 3:
        return torch.full((b,), NO_KNEE, dtype=torch.long, device=scores.device)

    d, ok = _difference_curve(_sorted_desc(scores, presorted, valid), compute_dtype, lengths)
    idx = _index_dtype(n)
    # Everything below is bool / small-int arithmetic in one dtype: mixed-dtype ops (bool * int, where)
    # are several times slower on CPU than the sort this is meant to keep up with.
    # s[i] = sign(d[i+1] - d[i]) for i = 0..N-2 (NaN rows give 0 everywhere -> never a knee).
    right, left = d[:, 1:], d[:, :-1]
    up, down = right > left, right < left  # [B, N-1]: sign of d[i+1] - d[i]; NaN rows: neither
    # Position i = 0..N-2 (N-1 is never processed by kneed's walk) has the slope s[i-1] on its left
    # (0 at i = 0: 'clip' compares d[0] with itself) and s[i] on its right. It is
    #   a max only (sets the threshold, activates detection):  left >= 0 >= right, not both 0
    #   a min, plateau max+min included (pauses detection):    left <= 0 <= right
    # i.e. an event unless both slopes have the same strict sign, and an activating one iff left > right.
    # key = 2i+1 at an activating max, 2i at a pause, 0 elsewhere; position 0 is always an event, so the
    # running max gives, for every i, the most recent extremum at or before i and whether detection is on.
    # (bool ops, then one dtype: mixed-dtype ops are several times slower on CPU.)
    up_l, up_r, dn_l, dn_r = up[:, :-1], up[:, 1:], down[:, :-1], down[:, 1:]
    event = ~((up_l & up_r) | (dn_l & dn_r))
    activate = (up_l & ~up_r) | (~dn_l & dn_r)
    pos = torch.arange(n - 1, device=d.device, dtype=idx)
    key = torch.empty(up.shape, dtype=idx, device=d.device)
    torch.mul(event.to(idx), 2 * pos[1:], out=key[:, 1:]).add_(activate.to(idx))
    key[:, 0] = down[:, 0].to(idx)
    last = torch.cummax(key, dim=1).values
    active = last & 1
    cand = (last >> 1).long()  # position of the governing extremum
    if lengths is None:
        threshold = d.gather(1, cand).sub_(sensitivity * _mean_dx(n))
        hit = (right < threshold).to(idx) * active  # knee declared while at i (kneed compares d[i+1])
    else:
        step = torch.from_numpy(sensitivity * _mean_dx_table(n)).to(d.device, d.dtype)[lengths]
        threshold = d.gather(1, cand).sub_(step[:, None])
        # kneed's walk stops at a row's own N-2; what lies beyond (padding) never declares a knee.
        in_row = pos[None] < (lengths - 1)[:, None]
        hit = ((right < threshold) & in_row).to(idx) * active

    # first / last hit without argmax (slow on CPU): the max of hit * rank-weight identifies it
    if online:
        m = (hit * (pos + 1)).amax(dim=1)
        i = m.long() - 1
    else:
        m = (hit * (n - 1 - pos)).amax(dim=1)
        i = (n - 1) - m.long()
    found = ok & (m > 0)
    knee = cand.gather(1, i.clamp(0, n - 2)[:, None]).squeeze(1)
    return torch.where(found, knee, torch.full_like(knee, NO_KNEE))


def _index_dtype(n: int) -> torch.dtype:
    # keys reach 2N-1; int16 halves memory traffic for LLaVA-sized rows
    return torch.int16 if 2 * n < torch.iinfo(torch.int16).max else torch.int64


def knee_chord(scores: Tensor, presorted: bool = False, *, lengths: Tensor | None = None) -> Tensor:
    """Cheap knee: the point of the descending-sorted curve farthest from its chord.

    ``argmax`` of Kneedle's difference curve (= the knee when that curve has a single peak and S -> 0).

    Args:
        scores: ``[B, N]`` float scores (or ``[N]``).
        presorted: rows are already sorted in descending order.
        lengths: long ``[B]``, ragged rows as in :func:`find_knee` (``[B, N]`` input only).

    Returns:
        long ``[B]`` rank index (first maximum on ties), ``NO_KNEE`` for flat, non-finite or N < 3 rows.
    """
    check_tensor("scores", scores, (1, 2), "[B, N] or [N]")
    check_float("scores", scores)
    if scores.dim() == 1:
        if lengths is not None:
            raise InputError("lengths needs [B, N] scores, got a single [N] row")
        return knee_chord(scores[None], presorted)[0]
    b, n = scores.shape
    valid = None
    if lengths is not None:
        check_lengths(lengths, b, n)
        valid = torch.arange(n, device=scores.device) < lengths[:, None]
    if n < 3:
        return torch.full((b,), NO_KNEE, dtype=torch.long, device=scores.device)
    d, ok = _difference_curve(_sorted_desc(scores, presorted, valid), torch.float32, lengths)
    d = torch.nan_to_num(d, nan=0.0)
    if valid is not None:
        d = d.masked_fill(~valid, float("-inf"))
    idx = d.argmax(dim=1)
    return torch.where(ok, idx, torch.full_like(idx, NO_KNEE))
