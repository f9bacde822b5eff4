"""Pure, batched, device- and dtype-agnostic torch primitives for scoring and selecting visual tokens.

Every function takes and returns tensors with the shapes in its docstring; scores are returned in fp32
(fp64 for fp64 inputs) whatever the input dtype; there is no Python loop over the batch or the tokens
(the greedy selections loop over their *selection steps*, each step batched over every row).

How to cut a score curve into a per-sample count (``cut``, ``CutParams``, ``keep_top``, ``fixed_counts``)
lives here too, so a plugin cuts exactly as the built-ins do.
"""

from ._attention import (
    attention_received,
    cls_attention,
    cls_cosine_similarity,
    query_attention,
    query_cosine_similarity,
)
from ._cut import (
    CUT_RULES,
    FALLBACKS,
    Cut,
    CutParams,
    CutRule,
    CutRuleName,
    FallbackName,
    cut,
    cut_bounds,
    fixed_counts,
    keep_top,
    ragged_raw_counts,
    ratio_bounds,
    raw_counts,
)
from ._diversity import (
    dpp_greedy_map,
    max_min_diversity,
    norm_pivots,
    pairwise_cosine,
    remove_duplicates,
    similarity_to_pivots,
)
from ._knee import NO_KNEE, find_knee, knee_chord
from ._merge import merge_mean, nearest_kept, prumerge_extra_token, prumerge_merge, prumerge_neighbors
from ._outliers import iqr_outlier_count, lof_outlier_count
from ._select import PAD_INDEX, counts_from_mask, ragged_gather, ragged_scatter, topk_mask

__all__ = [
    "CUT_RULES",
    "FALLBACKS",
    "NO_KNEE",
    "PAD_INDEX",
    "attention_received",
    "cls_attention",
    "cls_cosine_similarity",
    "Cut",
    "CutParams",
    "CutRule",
    "CutRuleName",
    "FallbackName",
    "counts_from_mask",
    "cut",
    "cut_bounds",
    "dpp_greedy_map",
    "find_knee",
    "fixed_counts",
    "iqr_outlier_count",
    "keep_top",
    "knee_chord",
    "lof_outlier_count",
    "max_min_diversity",
    "merge_mean",
    "nearest_kept",
    "norm_pivots",
    "pairwise_cosine",
    "prumerge_extra_token",
    "prumerge_merge",
    "prumerge_neighbors",
    "query_attention",
    "query_cosine_similarity",
    "ragged_gather",
    "ragged_raw_counts",
    "ragged_scatter",
    "ratio_bounds",
    "raw_counts",
    "remove_duplicates",
    "similarity_to_pivots",
    "topk_mask",
]
