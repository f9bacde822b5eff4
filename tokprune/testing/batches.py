"""Fabricated strategy inputs: random but realistic contexts for either stage, from fixed seeds.

The contract's checks (:mod:`tokprune.testing.contract`) run strategies on these; plugin authors can build
their own checks on the same inputs. :class:`VisionBatch` is a vision-stage context (features, CLS-style
long-tailed attention, q/k, optional frames or ragged images), :class:`LLMBatch` an LLM-stage one (hidden
states, attention, token roles, left padding), :func:`make_batch` whichever ``strategy`` needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokprune.strategy import (
    FrameLayout,
    LLMAttention,
    LLMContext,
    PruningStrategy,
    Signal,
    Stage,
    TokenRole,
    VisionContext,
    VisionSignals,
)

__all__ = ["Batch", "LLMBatch", "VisionBatch", "make_batch"]


def _generator(*key: int) -> torch.Generator:
    seed = 0
    for part in key:  # stable across runs and platforms, unlike hash()
        seed = (seed * 1_000_003 + int(part)) % (2**62)
    return torch.Generator().manual_seed(seed)


def _long_tail(base: Tensor, anchor: Tensor, gen: torch.Generator, share: float = 0.15) -> Tensor:
    """Pull a random ``share`` of the tokens of ``base [B, 1+N, C]`` towards ``anchor [B, C]`` so CLS scores
    are long-tailed (a few high outliers), like real CLIP CLS attention."""
    b, n1, _ = base.shape
    pick = torch.rand(b, n1, generator=gen) < share
    pick[:, 0] = False
    strength = torch.rand(b, n1, 1, generator=gen) * 0.8 + 0.2
    return base + pick[:, :, None] * strength * anchor[:, None, :]


@dataclass(frozen=True)
class VisionBatch:
    """Fabricated vision-stage inputs: features and the raw encoder signals for the declared ones only.

    ``signals`` maps each resolved :class:`Signal` to ``(q, k)`` (``[B, 1+N, C]`` each) or hidden states
    ``[B, 1+N, C]``. :meth:`context` builds a fresh :class:`VisionContext` (fresh signal cache) whose
    :class:`VisionSignals` refuses undeclared reads; :meth:`sample` is one sample as a batch of 1.
    """

    features: Tensor
    signals: dict[Signal, Any]
    num_layers: int
    num_heads: int
    grid: tuple[int, int] | None
    #: Images of different sizes: each row's real patch count (padding after it); None: all full.
    lengths: tuple[int, ...] | None = None

    @classmethod
    def make(
        cls,
        strategy: PruningStrategy,
        *,
        batch: int = 4,
        grid: tuple[int, int] = (8, 8),
        channels: int = 32,
        num_layers: int = 24,
        num_heads: int = 4,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        constant: bool = False,
    ) -> VisionBatch:
        """Random (or constant) inputs for ``strategy``'s declared signals, ``N = rows * cols`` patches."""
        n = grid[0] * grid[1]
        declared = {s.resolve(num_layers) for s in strategy.requires()}
        gen = _generator(seed, 1)
        if constant:
            features = torch.full((batch, n, channels), 0.5)
        else:
            features = torch.randn(batch, n, channels, generator=gen)
        signals: dict[Signal, Any] = {}
        for sig in sorted(declared, key=lambda s: (s.kind, s.layer)):
            g = _generator(seed, 2 if sig.kind == "qk" else 3, sig.layer)
            if constant:
                signals[sig] = (
                    (torch.full((batch, n + 1, channels), 0.25).to(dtype),) * 2
                    if sig.kind == "qk"
                    else torch.full((batch, n + 1, channels), 0.25).to(dtype)
                )
                continue
            if sig.kind == "qk":
                q = torch.randn(batch, n + 1, channels, generator=g)
                k = _long_tail(torch.randn(batch, n + 1, channels, generator=g), q[:, 0], g)
                signals[sig] = (q.to(dtype), k.to(dtype))
            else:
                h = torch.randn(batch, n + 1, channels, generator=g)
                signals[sig] = _long_tail(h, h[:, 0], g).to(dtype)
        return cls(features.to(dtype), signals, num_layers, num_heads, grid)

    def context(self) -> VisionContext:
        declared = frozenset(self.signals)

        def fetch(signal: Signal) -> Any:
            return self.signals[signal]

        lengths = None if self.lengths is None else torch.tensor(self.lengths, device=self.features.device)
        vs = VisionSignals(fetch, self.num_layers, self.num_heads, declared=declared, lengths=lengths)
        grid = self.grid if self.lengths is None else None  # padded rows have no raster grid
        return VisionContext(features=self.features, signals=vs, grid=grid, lengths=lengths, frames=self.frames())

    def frames(self) -> FrameLayout:
        """Every row as a video (temporal strategies read it; the others ignore it): a row of ``L`` tokens is
        frames of ``d`` tokens, ``d`` the largest divisor of ``L`` up to the grid's width (8 without a grid),
        a function of the row's own length, so a sample has the same frames alone as in a ragged batch."""
        n = self.features.shape[1]
        widest = self.grid[1] if self.grid is not None else 8
        per = []
        for length in self.lengths or (n,) * self.batch_size:  # rows of the fabricated batch (a test kit)
            per.append(max(d for d in range(1, min(widest, length) + 1) if length % d == 0))
        tokens = torch.tensor(self.lengths or (n,) * self.batch_size)
        per_frame = torch.tensor(per)
        grid = torch.stack([torch.ones_like(per_frame), per_frame], dim=1)
        return FrameLayout(counts=tokens // per_frame, grid=grid)

    def sample(self, i: int) -> VisionBatch:
        """Sample ``i`` alone (a batch of 1; a ragged row cut to its own length, without padding)."""
        n = self.features.shape[1] if self.lengths is None else self.lengths[i]

        def cut(value: Any) -> Any:
            if isinstance(value, tuple):
                return tuple(v[i : i + 1, : 1 + n] for v in value)
            return value[i : i + 1, : 1 + n]  # CLS + the image's patches

        return dataclasses.replace(
            self,
            features=self.features[i : i + 1, :n],
            signals={s: cut(v) for s, v in self.signals.items()},
            lengths=None,
            grid=self.grid if self.lengths is None else None,
        )

    def ragged(self, lengths: Sequence[int]) -> VisionBatch:
        """The batch as images of ``lengths`` patches each, the rest of every row padding filled with noise
        (a strategy must neither keep nor be swayed by it)."""
        n = self.features.shape[1]
        pad = torch.arange(n + 1)[None, :] > torch.tensor(list(lengths))[:, None]  # [B, 1+N], CLS at 0

        def noisy(x: Tensor) -> Tensor:
            noise = 50.0 * torch.randn(x.shape, generator=_generator(7, x.shape[1])).to(x.dtype)
            return torch.where(pad[:, -x.shape[1] :, None], noise, x)

        def fill(value: Any) -> Any:
            return tuple(noisy(v) for v in value) if isinstance(value, tuple) else noisy(value)

        return dataclasses.replace(
            self,
            features=noisy(self.features),
            signals={s: fill(v) for s, v in self.signals.items()},
            lengths=tuple(int(x) for x in lengths),
        )

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]


@dataclass(frozen=True)
class LLMBatch:
    """Fabricated LLM-stage inputs: left-padded sequences of
    ``[PADDING] [TEMPLATE] [IMAGE] [QUESTION] [TEMPLATE] [PROTECTED]`` with a different length of every
    block per sample, random hidden states and random post-RoPE q/k (GQA: ``heads`` query heads sharing
    ``kv_heads`` key heads). ``padding[i]`` is sample i's left padding; :meth:`sample` is sample i alone
    without padding, so ``plan.keep[i, padding[i]:]`` must equal the solo plan's ``keep[0]``.
    """

    roles: Tensor
    hidden: Tensor
    q: Tensor
    k: Tensor
    padding: tuple[int, ...]
    layer: int

    @classmethod
    def make(
        cls,
        strategy: PruningStrategy,
        *,
        image: tuple[int, ...] = (12, 9, 16, 6),
        question: tuple[int, ...] = (5, 7, 3, 6),
        template: tuple[int, int] = (3, 2),
        heads: int = 4,
        kv_heads: int = 2,
        head_dim: int = 16,
        hidden_size: int = 24,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        constant: bool = False,
        extra_padding: int = 1,
    ) -> LLMBatch:
        """One sample per entry of ``image``/``question`` (their counts of IMAGE/QUESTION tokens)."""
        if len(image) != len(question):
            raise ValueError(f"image {image} and question {question} must have one entry per sample")
        lengths = [template[0] + n_img + n_q + template[1] + 1 for n_img, n_q in zip(image, question)]
        # every sample gets some padding, a different amount each (sample 0 the least)
        width = max(lengths) + extra_padding
        padding = tuple(width - n for n in lengths)
        rows = []
        for pad, n_img, n_q in zip(padding, image, question):
            blocks = [
                (TokenRole.PADDING, pad),
                (TokenRole.TEMPLATE, template[0]),
                (TokenRole.IMAGE, n_img),
                (TokenRole.QUESTION, n_q),
                (TokenRole.TEMPLATE, template[1]),
                (TokenRole.PROTECTED, 1),
            ]
            rows.append(torch.cat([torch.full((count,), int(role)) for role, count in blocks]))
        roles = torch.stack(rows).long()
        b = len(image)
        gen = _generator(seed, 7)
        if constant:
            hidden = torch.full((b, width, hidden_size), 0.5)
            q = torch.full((b, heads, width, head_dim), 0.25)
            k = torch.full((b, kv_heads, width, head_dim), 0.25)
        else:
            hidden = torch.randn(b, width, hidden_size, generator=gen)
            q = torch.randn(b, heads, width, head_dim, generator=gen)
            k = torch.randn(b, kv_heads, width, head_dim, generator=gen)
            # a few image keys aligned with the mean query: long-tailed attention, as in real models
            boost = (torch.rand(b, 1, width, 1, generator=gen) < 0.2) & (roles == TokenRole.IMAGE)[:, None, :, None]
            k = k + boost * 2.0 * q.view(b, kv_heads, heads // kv_heads, width, head_dim).mean(dim=(2, 3))[:, :, None]
        layer = strategy.layer if strategy.layer is not None else 2
        return cls(roles, hidden.to(dtype), q.to(dtype), k.to(dtype), padding, int(layer))

    def context(self) -> LLMContext:
        valid = self.roles != TokenRole.PADDING
        positions = (valid.long().cumsum(dim=1) - 1).clamp_min(0)
        attention = LLMAttention(self.q, self.k, valid)
        return LLMContext(
            layer=self.layer,
            roles=self.roles,
            hidden=self.hidden,
            attention=attention,
            position_ids=positions,
            # layer K's own rows: the same fabricated q/k stand in (strategies reading them run here too)
            layer_attention=lambda: LLMAttention(self.q, self.k, valid),
        )

    def sample(self, i: int) -> LLMBatch:
        """Sample ``i`` alone, its padding removed."""
        p = self.padding[i]
        return dataclasses.replace(
            self,
            roles=self.roles[i : i + 1, p:],
            hidden=self.hidden[i : i + 1, p:],
            q=self.q[i : i + 1, :, p:],
            k=self.k[i : i + 1, :, p:],
            padding=(0,),
        )

    @property
    def batch_size(self) -> int:
        return self.roles.shape[0]


Batch = VisionBatch | LLMBatch


def make_batch(strategy: PruningStrategy, **kwargs: Any) -> Batch:
    """Fabricated inputs for ``strategy``'s stage (keyword arguments go to ``VisionBatch.make`` or
    ``LLMBatch.make``; ``size`` is translated: vision grid ``(1, size)``, LLM ``size`` image tokens)."""
    size = kwargs.pop("size", None)
    if strategy.stage is Stage.VISION:
        if size is not None:
            kwargs["grid"] = (1, size)
        return VisionBatch.make(strategy, **kwargs)
    if size is not None:
        b = kwargs.pop("batch", 4)
        kwargs["image"] = tuple(max(1, size - i % size) for i in range(b))
        kwargs["question"] = tuple(1 + i % 2 for i in range(b))
        kwargs["template"] = (1, 0)
    else:
        kwargs.pop("batch", None)
    return LLMBatch.make(strategy, **kwargs)
