"""Qwen3-VL specifics: DeepStack under both stages, Qwen3's q/k norms in the scores (the shared behaviour is
proven by tests/test_adapter_contract.py, the Qwen2.5-VL parts it reuses by tests/test_adapter_qwen2_5_vl.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tokprune
from tokprune import Pipeline
from tokprune import hf_compat as hf
from tokprune.adapters.qwen3_vl import Qwen3VLAdapter
from tokprune.testing.adapters import _RecordLastRow, _RecordVisionNorm
from tokprune.testing.equivalence import ProbeLastRow, last_row_attention
from tokprune.testing.models import QWEN3_DEEPSTACK, VOCAB, tiny_qwen3_vl

pytestmark = pytest.mark.skipif(
    hf.older_than(Qwen3VLAdapter.min_transformers),
    reason=f"Qwen3-VL is tested from transformers {Qwen3VLAdapter.min_transformers}",
)

#: How far (max |logit difference|) a wrong DeepStack treatment must land from the patched model.
WRONG = 1e-3


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen3_vl(seed=0)


def _reference(model, x, vision_keep, llm_keep, layer, deepstack="gathered"):
    """Last-token logits of one unpadded sample from Qwen3-VL's stock pieces, pruned by construction.

    The prompt is shortened to the kept image tokens (``vision_keep``, bool over the image's tokens), which
    get their stock merged features, their stock DeepStack rows and their stock 3-D positions; from decoder
    layer ``layer`` on, the tokens ``llm_keep`` drops (bool over the shortened prompt) are masked out of
    every key, which is what removing them does to the survivors. ``deepstack`` says what the image tokens
    get after decoder layer ``j``: ``gathered`` (the rows of the kept tokens: right), or a wrong treatment:
    ``none``, ``first`` (the first rows, not the kept ones), ``before_step`` (nothing from ``layer`` on),
    ``in_order`` (from ``layer`` on, the survivors get the first rows in order, not their own).
    Must run on the unpatched model.
    """
    inner, lm = model.model, model.model.language_model
    ids, grid = x["input_ids"], x["image_grid_thw"]
    with torch.no_grad():
        encoded = inner.get_image_features(x["pixel_values"], grid, return_dict=True)
        pos, _ = inner.get_rope_index(ids, mm_token_type_ids=x["mm_token_type_ids"], image_grid_thw=grid)
        image = ids[0] == VOCAB.image
        slots = image.clone()
        slots[image] = vision_keep
        kept = ~image | slots
        ids, pos, image = ids[:, kept], pos[:, :, kept], image[kept]
        n = int(vision_keep.sum())
        rows = [d[0][:n] if deepstack == "first" else d[0][vision_keep] for d in encoded.deepstack_features]
        hidden = lm.embed_tokens(ids)
        hidden[0, image] = encoded.pooler_output[0][vision_keep]
        rotary = lm.rotary_emb(hidden, pos)
        length = hidden.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        for i, decoder_layer in enumerate(lm.layers):
            allowed = causal & llm_keep[None, :] if i >= layer else causal
            mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
            hidden = decoder_layer(hidden, position_embeddings=rotary, attention_mask=mask[None, None])
            if i >= len(rows) or deepstack == "none" or (deepstack == "before_step" and i >= layer):
                continue
            if deepstack == "in_order" and i >= layer:
                survivors = image & llm_keep
                hidden[0, survivors] += rows[i][: int(survivors.sum())]
            else:
                hidden = lm._deepstack_process(hidden, image[None], rows[i])  # the stock addition
        return model.lm_head(lm.norm(hidden))[0, -1]


def _patched_run(model, x, pipeline):
    with tokprune.pruned(model, pipeline, question_end=VOCAB.assistant_marker) as run, torch.no_grad():
        logits = model(**x).logits[0, -1]
    return logits, run.stats.diagnostics


def _distance(a, b):
    return (a - b).abs().max().item()


def test_the_reference_is_the_stock_model(tiny):
    model, make_inputs = tiny
    x = make_inputs([6])
    every_image = torch.ones(int((x["input_ids"] == VOCAB.image).sum()), dtype=torch.bool)
    every_token = torch.ones(x["input_ids"].shape[1], dtype=torch.bool)
    with torch.no_grad():
        stock = model(**x).logits[0, -1]
    assert _distance(_reference(model, x, every_image, every_token, 0), stock) <= 1e-5
    assert _distance(_reference(model, x, every_image, every_token, 0, deepstack="none"), stock) > WRONG  # it matters


@pytest.mark.parametrize("seed", [0, 1])
def test_the_vision_stage_gathers_deepstack_rows_with_its_keep_mask(tiny, seed):
    model, make_inputs = tiny
    x = make_inputs([6], seeds=[seed])
    logits, diagnostics = _patched_run(model, x, Pipeline([_RecordVisionNorm(keep_ratio=0.5)]))
    keep = diagnostics["probe_vision_norm.keep"][0]
    n = int(keep.sum())
    assert not keep[:n].all()  # the kept tokens are not simply the first ones: "first" is a wrong gather
    length = x["input_ids"].shape[1]
    every = torch.ones(length, dtype=torch.bool)
    assert _distance(logits, _reference(model, x, keep, every, 99)) <= 1e-5
    for wrong in ("none", "first"):
        assert _distance(logits, _reference(model, x, keep, every, 99, deepstack=wrong)) > WRONG, wrong


@pytest.mark.parametrize("layer", [1, 2])  # both before the last DeepStack layer
@pytest.mark.parametrize("vision", [False, True], ids=["llm_only", "both_stages"])
def test_an_llm_step_before_a_deepstack_layer_keeps_the_additions_on_the_survivors(tiny, layer, vision):
    assert layer <= max(range(len(QWEN3_DEEPSTACK)))
    model, make_inputs = tiny
    x = make_inputs([6], seeds=[1])
    steps = [_RecordVisionNorm(keep_ratio=0.5)] if vision else []
    logits, diagnostics = _patched_run(model, x, Pipeline([*steps, _RecordLastRow(layer=layer, keep_ratio=0.5)]))
    n_image = int((x["input_ids"] == VOCAB.image).sum())
    vision_keep = diagnostics["probe_vision_norm.keep"][0] if vision else torch.ones(n_image, dtype=torch.bool)
    llm_keep = diagnostics["probe_last_row.keep"][0]  # over the prompt after the vision stage (one sample: unpadded)
    assert not llm_keep.all()
    assert _distance(logits, _reference(model, x, vision_keep, llm_keep, layer)) <= 1e-5
    for wrong in ("none", "before_step", "in_order"):
        assert _distance(logits, _reference(model, x, vision_keep, llm_keep, layer, deepstack=wrong)) > WRONG, wrong


class _RecordScores(ProbeLastRow):
    """:class:`ProbeLastRow` reporting the attention row it scored with."""

    def plan(self, ctx):
        plan = super().plan(ctx)
        return replace(plan, diagnostics={**plan.diagnostics, "scores": last_row_attention(ctx)})


@pytest.mark.parametrize("layer", [1, 3])
def test_llm_scores_are_the_stock_eager_attention_with_qk_norms(layer, monkeypatch):
    # The last token's head-mean attention row the step scores with == the unpatched model's eager
    # attention weights of layer K-1 (Qwen3 norms q and k per head before RoPE; DeepStack rows are in
    # the states entering layer K-1). Scoring from q_proj/k_proj without the norms must fail this comparison.
    model, make_inputs = tiny_qwen3_vl(seed=1, attn_implementation="eager")
    x = make_inputs((5, 2, 8))
    with torch.no_grad():
        attn = model(**x, output_attentions=True).attentions[layer - 1]  # [B, H, L, L]
    stock = attn[:, :, -1].float().mean(1)  # [B, L]
    valid = x["attention_mask"].bool()

    def scores():
        _, diagnostics = _patched_run(model, x, Pipeline([_RecordScores(layer=layer)]))
        return diagnostics["probe_last_row.scores"]

    assert _distance(scores()[valid], stock[valid]) <= 1e-5
    monkeypatch.setattr(hf, "qk_norms", lambda attn, q, k: (q, k))
    assert _distance(scores()[valid], stock[valid]) > WRONG


def test_generate_with_pre_encoded_deepstack_features_is_the_stock_one(tiny):
    # generate() encodes the images first (the stock output, or ours under a vision step) and passes them
    # back: keeping everything, the DeepStack rows must still arrive (the step logits equal the stock ones)
    model, make_inputs = tiny
    x = make_inputs((5, 2, 8))

    def step_logits():
        with torch.no_grad():
            out = model.generate(
                **x,
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=VOCAB.pad,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return torch.stack(out.logits)

    stock = step_logits()
    for spec in ("none", Pipeline([_RecordVisionNorm(keep_ratio=1.0)])):
        with tokprune.pruned(model, spec, question_end=VOCAB.assistant_marker):
            assert _distance(step_logits(), stock) <= 1e-5, spec
