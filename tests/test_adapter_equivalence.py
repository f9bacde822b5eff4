"""Contract tests over the registry: every strategy inside a patched tiny LLaVA.

* cache == no cache (greedy, token for token), for every registered strategy and the composites (the tiny
  model is an sdpa model: the attention-free methods, and the q/k-scored ones, never switch to eager);
* batch == solo for ragged keep counts at both stages, in both position modes.
"""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune import Pipeline
from tokprune.testing.equivalence import (
    ProbeLastRow,
    ProbeVisionTopK,
    check_batch_equivalence,
    check_cache_equivalence,
)

COMPOSITES = [
    "cls_knee+text_interact",
    # the newer methods composed across stages, a schedule after a vision step, and merging inside the LLM
    "divprune(keep_ratio=0.5)+dart(layer=1, keep_ratio=0.5)",
    "vispruner(keep_ratio=0.5)+pyramiddrop(layer=(1, 3), keep_ratio=(0.5, 0.25))",
    "cdpruner(keep_ratio=0.5)+fastv(layer=2, keep_ratio=0.5)",
    "dart(merge=true, keep_ratio=0.3)",
    "cdpruner(relevance=uniform)+dart(layer=2, merge=true, pivot_order=norm)",
]
# Defaults written for deeper models (the tiny LLaVA has 4 decoder layers): the same method, a fitting schedule.
SHALLOW = {"pyramiddrop": "pyramiddrop(layer=(1, 2, 3), keep_ratio=(0.5, 0.25, 0.125))"}
SPECS = [SHALLOW.get(name, name) for name in tokprune.strategies.available()] + COMPOSITES

RAGGED = {
    "vision": Pipeline([ProbeVisionTopK(ragged=True)]),
    "vision_merge_extra": Pipeline([ProbeVisionTopK(ragged=True, merge=True, extra=2)]),
    "llm": Pipeline([ProbeLastRow(layer=2, ragged=True)]),
    "both_two_llm_steps": Pipeline(
        [ProbeVisionTopK(ragged=True, extra=1), ProbeLastRow(layer=1, ragged=True), ProbeLastRow(layer=3, ragged=True)]
    ),
}
POSITIONS = {
    "keep": {},
    "compact": {"vision_positions": "compact", "llm_positions": "compact"},
    "mixed": {"vision_positions": "compact", "llm_positions": "keep"},
}


@pytest.mark.parametrize("spec", SPECS)
def test_cache_equals_no_cache(spec):
    check_cache_equivalence(spec)


@pytest.mark.parametrize("spec", SPECS)
def test_batch_equals_solo(spec):
    check_batch_equivalence(spec)


@pytest.mark.parametrize("positions", list(POSITIONS), ids=list(POSITIONS))
@pytest.mark.parametrize("name", list(RAGGED), ids=list(RAGGED))
def test_ragged_counts(name, positions):
    spec, options = RAGGED[name], POSITIONS[positions]
    tokens = check_cache_equivalence(spec, **options)
    check_batch_equivalence(spec, **options)
    assert tokens.shape[0] == 3


def test_ragged_probes_really_are_ragged():
    from tokprune.testing.models import VOCAB, tiny_llava

    model, make_inputs = tiny_llava(seed=0)
    with tokprune.pruned(model, RAGGED["both_two_llm_steps"], question_end=VOCAB.assistant_marker) as run:
        model(**make_inputs((5, 2, 8)))
    stats = run.stats
    assert len(set(stats.visual_kept.tolist())) > 1
    for layer in (1, 3):
        assert len(set((stats.seq_len - stats.llm_kept[layer]).tolist())) > 1


def test_compact_positions_change_the_answer():
    from tokprune.testing.models import tiny_llava

    model, make_inputs = tiny_llava(seed=0)
    inputs = make_inputs()
    logits = {}
    for mode in ("keep", "compact"):
        with tokprune.pruned(model, "topk(keep_ratio=0.25)", vision_positions=mode):
            logits[mode] = model(**inputs).logits[:, -1]
    assert not logits["keep"].allclose(logits["compact"])


def test_schedule_prunes_at_each_layer_and_merging_changes_only_the_merged_states():
    from tokprune.testing.models import VOCAB, tiny_llava

    model, make_inputs = tiny_llava(seed=0)
    inputs = make_inputs((5, 2, 8))
    with tokprune.pruned(model, SHALLOW["pyramiddrop"], question_end=VOCAB.assistant_marker) as run:
        model(**inputs)
    image = run.stats.layer_visual  # [B, layers]: image tokens each layer saw
    assert (image[:, 1] < image[:, 0]).all() and (image[:, 2] < image[:, 1]).all() and (image[:, 3] < image[:, 2]).all()
    assert "pyramiddrop@1.keep_count" in run.stats.diagnostics and "pyramiddrop@3.keep_count" in run.stats.diagnostics
    logits, kept = {}, {}
    for merge in ("false", "true"):
        with tokprune.pruned(model, f"dart(keep_ratio=0.3, merge={merge})", question_end=VOCAB.assistant_marker) as run:
            logits[merge] = model(**inputs).logits[:, -1]
        kept[merge] = run.stats.layer_tokens
    assert torch.equal(kept["false"], kept["true"])  # the same tokens kept ...
    assert not torch.allclose(logits["false"], logits["true"])  # ... but the kept states carry the merged ones
