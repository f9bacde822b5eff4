"""tokprune.data: the synthetic shapes world and its held-out benchmark."""

from tokprune.data.world import (
    BENCHMARK_SEEDS,
    COLORS,
    GRID,
    IMAGE_SIZE,
    NUM_PATCHES,
    PATCH_SIZE,
    QUESTION_TYPES,
    SHAPES,
    Sample,
    SceneObject,
    benchmark,
    build_prompt,
    generate_samples,
    make_sample,
    normalize_answer,
    score_answer,
)

__all__ = [
    "BENCHMARK_SEEDS",
    "COLORS",
    "GRID",
    "IMAGE_SIZE",
    "NUM_PATCHES",
    "PATCH_SIZE",
    "QUESTION_TYPES",
    "SHAPES",
    "Sample",
    "SceneObject",
    "benchmark",
    "build_prompt",
    "generate_samples",
    "make_sample",
    "normalize_answer",
    "score_answer",
]
