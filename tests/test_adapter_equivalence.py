"""Contract tests over the registry: every strategy inside a patched tiny LLaVA.

* cache == no cache (greedy, token for token), for every registered strategy and the composites (the tiny
  model is an sdpa model: the attention-free methods, and the q/k-scored ones, never switch to eager);
* batch == solo for every registered strategy and the composites in every call form (``generate``,
  ``model(...)`` with and without ``position_ids``) on a batch whose padding amounts differ by more than
  RoPE's shortest period; deliberately broken variants fail it;
* batch == solo for ragged keep counts at both stages, in both position modes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tokprune
from tokprune import LLMAttention, Pipeline, strategies
from tokprune.testing.equivalence import (
    CALL_FORMS,
    WIDE_LENGTHS,
    ProbeLastRow,
    ProbeVisionTopK,
    check_batch_equivalence,
    check_cache_equivalence,
)
from tokprune.testing.models import tiny_text_encoder

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
# Temporal strategies (evs, vidcom2) prune videos, which the tiny LLaVA does not take (refused at patch());
# tests/test_video.py runs them through the same equivalences on the families with video.
SPECS = [
    SHALLOW.get(name, name)
    for name in tokprune.strategies.available()
    if not tokprune.strategies.describe(name).cls.temporal
] + COMPOSITES

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
    check_batch_equivalence(spec, lengths=WIDE_LENGTHS)


def test_batch_equals_solo_with_the_instruction_read_through_a_clip_text_tower():
    # the 30-word question spans several text segments; each image is conditioned on its own question
    check_batch_equivalence("cdpruner", lengths=WIDE_LENGTHS, text_encoder=lambda model: tiny_text_encoder())


class _PaddedKeysDart(strategies.get("dart")[0].__class__):
    """DART ranking its pivots by the L1 norms of keys rotated where the batch put them (the bug fixed)."""

    name = "dart_padded_keys"

    def plan(self, ctx):
        att = ctx.attention
        as_run = LLMAttention(att.q, att.k, att.key_padding_mask, att.scale)  # keys_from_start() is k
        return super().plan(dataclasses.replace(ctx, attention=as_run))


class _BatchCentredDivPrune(strategies.get("divprune")[0].__class__):
    """DivPrune on features centred by the batch's mean (a statistic that crosses samples)."""

    name = "divprune_batch_centred"

    def plan(self, ctx):
        centred = ctx.features - ctx.features.mean(dim=(0, 1), keepdim=True)
        return super().plan(dataclasses.replace(ctx, features=centred, project=None))


BROKEN = {
    # (wrong variant, the call form that exposes it, the correct spec)
    "dart_padded_keys": (_PaddedKeysDart(keep_ratio=0.25), "forward", "dart(keep_ratio=0.25)"),
    "divprune_batch_centred": (_BatchCentredDivPrune(features="encoder"), "generate", "divprune(features=encoder)"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_batch_equals_solo_fails_broken_variants(name):
    broken, form, fixed = BROKEN[name]
    with pytest.raises(AssertionError, match=rf"\({form}\): sample \d"):
        check_batch_equivalence(Pipeline([broken]), lengths=WIDE_LENGTHS, call_forms=[form])
    check_batch_equivalence(fixed, lengths=WIDE_LENGTHS, call_forms=[form])  # the failure is the bug's


def test_call_forms_are_checked():
    assert CALL_FORMS == ("generate", "forward_positions", "forward")
    with pytest.raises(ValueError, match="unknown call forms"):
        check_batch_equivalence("random", call_forms=["forwards"])


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


@pytest.mark.parametrize("name", ["divprune", "cdpruner", "vispruner", "prumerge", "prumerge_plus"])
def test_vision_methods_whose_reference_shortens_the_image_block_renumber_by_default(name):
    from tokprune.testing.models import tiny_llava

    model, make_inputs = tiny_llava(seed=0)
    inputs = make_inputs()
    logits = {}
    for mode in (None, "compact", "keep"):
        with torch.no_grad(), tokprune.pruned(model, name, vision_positions=mode):
            logits[mode] = model(**inputs).logits[:, -1]
    assert torch.equal(logits[None], logits["compact"])
    assert not logits[None].allclose(logits["keep"])


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
