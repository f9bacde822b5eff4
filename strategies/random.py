"""``random``: a seeded random subset of patches, the control every pruning method should beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokprune import PruningStrategy, Stage, VisionContext, VisionPlan, param
from tokprune.scoring import fixed_counts, keep_top

_U64 = 1 << 64


def _i64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    return value - _U64 if value >= 1 << 63 else value


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_M1 = _i64(0xBF58476D1CE4E5B9)
_M2 = _i64(0x94D049BB133111EB)


def _shr(x: Tensor, bits: int) -> Tensor:
    # logical shift: torch's >> on int64 is arithmetic
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic), elementwise."""
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def fingerprint(features: Tensor, valid: Tensor | None = None) -> Tensor:
    """int64 ``[B]``: a hash of each sample's features ``[B, N, C]`` (only its ``valid`` tokens, bool ``[B, N]``).

    Hashes the exact bit patterns and sums them with wrapping int64 addition, which is associative:
    the result does not depend on reduction order, hence not on the batch the sample sits in (nor on
    the padding of a ragged batch, which ``valid`` leaves out).
    """
    b, n, c = features.shape
    bits = features.contiguous().view(_BITS[features.dtype]).long()
    where = torch.arange(n * c, device=features.device, dtype=torch.long).view(1, n, c)
    mixed = mix64(bits + where * _GOLDEN)
    if valid is not None:
        mixed = mixed * valid[..., None].long()
    return mixed.sum(dim=(1, 2))


def random_scores(features: Tensor, seed: int, valid: Tensor | None = None) -> Tensor:
    """fp64 ``[B, N]`` uniform-looking scores from ``hash(seed, fingerprint(sample), token index)``."""
    n = features.shape[1]
    base = mix64(fingerprint(features, valid) ^ mix64(torch.tensor(seed, dtype=torch.long, device=features.device)))
    index = torch.arange(1, n + 1, device=features.device, dtype=torch.long)
    h = mix64(base[:, None] + index[None, :] * _GOLDEN)
    return _shr(h, 11).double()  # 53 bits: exact in fp64, ties practically impossible


@dataclass(frozen=True)
class RandomParams:
    keep: int | None = param(None, "patches kept per sample; overrides keep_ratio", ge=1)
    keep_ratio: float = param(0.25, "fraction of patches kept, round(N * keep_ratio), at least 1", gt=0, le=1)
    seed: int = param(0, "seed; the subset also depends on the sample's own features, never on the batch")


class Random(PruningStrategy):
    """Keep a random subset of ``keep`` (or ``round(N * keep_ratio)``) patches per sample, in raster order.

    The subset is a pure function of (``seed``, the sample's features, token index): deterministic,
    batch-invariant (a sample selects the same alone or in any batch), different across images, and
    drawn without a global RNG (so it does not perturb other code's random streams).

    Budget: counts are visual tokens per image, of its own tokens when images differ in size
    (``keep_ratio`` of ``ctx.lengths[b]``; ``keep`` capped at it), see docs/adapters.md. Diagnostics: ``keep_count`` ``[B]``.
    """

    name = "random"
    stage = Stage.VISION
    ragged_vision = True
    Params = RandomParams

    def plan(self, ctx: VisionContext) -> VisionPlan:
        p = self.params
        scores = random_scores(ctx.features, p.seed, ctx.token_valid)
        counts = fixed_counts(ctx.token_counts, p.keep, p.keep_ratio)  # of each image's own tokens
        return VisionPlan(keep=keep_top(scores, counts, ctx.token_valid), diagnostics={"keep_count": counts})

