"""The decoder asks the family about every layer (attention kind, its RoPE and mask), so layers of
different kinds differ (Gemma 3's sliding-window and global layers, bidirectional image blocks).
Families from the registry."""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune.adapters import registered_adapters
from tokprune.testing.adapters import LENGTHS, tiny_case

FAMILIES = [cls for cls, _ in registered_adapters()]


def _alternating(family):
    calls = []

    # each layer's own kind (what the family computes it with) and its parity, kept apart by the core
    class Alternating(family):
        """Renames the family's kinds by layer parity (the tiny models' kinds alternate, or are all one)."""

        def layer_attention(self, layer):
            return f"{super().layer_attention(layer)}/{'even' if layer % 2 == 0 else 'odd'}"

        def layer_rotary(self, kind, hidden, pos):
            return super().layer_rotary(kind.rsplit("/", 1)[0], hidden, pos)

        def layer_mask_from(self, kind, keys, dtype):
            own, parity = kind.rsplit("/", 1)
            calls.append((parity, keys.valid.shape[1], keys.query_len))
            return super().layer_mask_from(own, keys, dtype)

    return Alternating, calls


@pytest.mark.parametrize("family", FAMILIES, ids=[cls.name for cls in FAMILIES])
def test_every_layer_is_asked_its_kind_and_each_kind_gets_its_own_inputs_per_segment(family):
    alternating, calls = _alternating(family)
    case = tiny_case(family)
    inputs = case.make_inputs(LENGTHS)
    with torch.no_grad():
        with tokprune.pruned(case.model, "fastv(layer=2)", question_end=case.question_end):
            reference = case.model(**inputs).logits
            tokens = case.model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=case.pad_token_id)
        with tokprune.pruned(case.model, "fastv(layer=2)", question_end=case.question_end, adapter=alternating):
            same_kinds_apart = case.model(**inputs).logits
            prefill_calls = list(calls)
            again = case.model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=case.pad_token_id)
    # identical inputs per kind here, so the output is the default's exactly
    assert torch.equal(same_kinds_apart, reference) and torch.equal(again, tokens)
    # prefill: segment 0 (layers 0, 1) and segment 1 (layers 2, 3, ...) each build one mask per kind
    assert [kind for kind, _, _ in prefill_calls] == ["even", "odd", "even", "odd"]
    assert prefill_calls[0][1] > prefill_calls[2][1]  # the second segment is the pruned one
    decode_calls = calls[len(prefill_calls) :]
    assert decode_calls and {kind for kind, _, q in decode_calls if q == 1} == {"even", "odd"}
