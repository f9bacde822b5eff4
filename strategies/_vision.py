"""Vision-stage scores shared by ``cls_knee``, ``topk`` (and the signal bookkeeping behind ``requires()``).

``layer`` always indexes *encoder layers* (0-based, negative from the end, like :class:`Signal` ``"qk"``).
A layer's score is computed from what that layer sees:

* ``cls_attn``: PruMerge's single-head surrogate ``softmax(q_cls . k^T / sqrt(C))`` from the layer's q/k;
* ``cls_attn_mean``: the same row split into the encoder's heads, softmax per head, head mean;
* ``cls_sim``: cosine similarity between the CLS and each patch of the layer's *input* hidden state, i.e.
  ``hidden_states[layer]`` for ``layer >= 0`` and ``hidden_states[layer - 1]`` for ``layer < 0``. With the
  default ``layer=-1`` this is ``hidden_states[-2]``, the feature layer LLaVA-1.5 projects.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from tokprune import Signal, VisionSignals

__all__ = ["SCORE_SOURCES", "ScoreSource", "score_signal", "vision_scores"]

ScoreSource = Literal["cls_attn", "cls_attn_mean", "cls_sim"]
SCORE_SOURCES: tuple[str, ...] = ("cls_attn", "cls_attn_mean", "cls_sim")


def hidden_index(layer: int) -> int:
    """``hidden_states`` index of encoder layer ``layer``'s input (HF: entry 0 = embeddings)."""
    return layer if layer >= 0 else layer - 1


def score_signal(source: ScoreSource, layer: int) -> Signal:
    """The encoder signal ``source`` reads at encoder layer ``layer``."""
    if source == "cls_sim":
        return Signal("hidden", hidden_index(layer))
    return Signal("qk", layer)


def vision_scores(signals: VisionSignals, source: ScoreSource, layer: int) -> Tensor:
    """fp32 ``[B, N]`` CLS scores of the patches (higher = more important)."""
    if source == "cls_attn":
        return signals.cls_attention(layer, heads="single")
    if source == "cls_attn_mean":
        return signals.cls_attention(layer, heads="mean")
    if source == "cls_sim":
        return signals.cls_similarity(hidden_index(layer))
    raise ValueError(f"score {source!r} is not one of {list(SCORE_SOURCES)}")
