"""Pure, batched, device- and dtype-agnostic torch primitives for scoring and selecting visual tokens.

Every function takes and returns tensors with the shapes in its docstring; scores are returned in fp32
(fp64 for fp64 inputs) whatever the input dtype; there is no Python loop over the batch or the tokens.
"""

from ._attention import (
    attention_received,
    cls_attention,
    cls_cosine_similarity,
    query_attention,
    query_cosine_similarity,
)
from ._knee import NO_KNEE, find_knee, knee_chord
from ._merge import prumerge_extra_token, prumerge_merge
from ._outliers import iqr_outlier_count, lof_outlier_count
from ._select import PAD_INDEX, counts_from_mask, ragged_gather, ragged_scatter, topk_mask

__all__ = [
    "NO_KNEE",
    "PAD_INDEX",
    "attention_received",
    "cls_attention",
    "cls_cosine_similarity",
    "counts_from_mask",
    "find_knee",
    "iqr_outlier_count",
    "knee_chord",
    "lof_outlier_count",
    "prumerge_extra_token",
    "prumerge_merge",
    "query_attention",
    "query_cosine_similarity",
    "ragged_gather",
    "ragged_scatter",
    "topk_mask",
]
