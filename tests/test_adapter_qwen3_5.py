"""Qwen3.5 specifics: linear-attention (Gated DeltaNet) layers beside full-attention ones, the layers that may
host an LLM-stage cut, the mixture-of-experts refusal and the FLOP model (the shared behaviour is proven by
tests/test_adapter_contract.py, the Qwen2.5-VL vision parts it reuses by tests/test_adapter_qwen2_5_vl.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _flops import macs as _macs
from transformers import DynamicCache

import tokprune
from tokprune import Pipeline
from tokprune import hf_compat as hf
from tokprune.adapters.qwen3_5 import LINEAR, TINY_LAYER_TYPES, Qwen3_5Adapter, Qwen3_5MoeAdapter, tiny_qwen3_5
from tokprune.errors import InputError, MissingCapabilityError, StrategyParamError
from tokprune.testing.adapters import _RecordLastRow, _RecordVisionNorm, cache_equivalence, check_batch_solo
from tokprune.testing.equivalence import ProbeLastRow, last_row_attention
from tokprune.testing.models import VOCAB

pytestmark = pytest.mark.skipif(
    hf.older_than(Qwen3_5Adapter.min_transformers),
    reason=f"Qwen3.5 is tested from transformers {Qwen3_5Adapter.min_transformers}",
)

#: How far (max |logit difference|) a wrong treatment of the recurrent layers must land from the patched model.
WRONG = 1e-3
MARKER = VOCAB.assistant_marker


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen3_5(seed=0)


def _distance(a, b):
    return (a - b).abs().max().item()


def test_the_tiny_model_mixes_linear_and_full_attention_layers(tiny):
    model, _ = tiny
    kinds = model.config.text_config.layer_types
    assert tuple(kinds) == TINY_LAYER_TYPES and {LINEAR, "full_attention"} == set(kinds)
    layers = model.model.language_model.layers
    assert [hasattr(layer, "linear_attn") for layer in layers] == [k == LINEAR for k in kinds]
    with tokprune.pruned(model, "none") as run:
        assert [run.layer_attention(i) for i in range(len(layers))] == list(kinds)


# -- the LLM stage: survivors' recurrent states ----------------------------------------------------------


def _reference(model, x, llm_keep, layer, treatment="removed"):
    """Last-token logits of one unpadded sample from Qwen3.5's stock pieces, pruned by construction.

    Layers ``0..layer-1`` run on the whole prompt; the tokens ``llm_keep`` drops (bool over the prompt) then
    leave it: ``removed`` runs layers ``layer..`` on the survivors alone, with their stock 3-D positions
    (what pruning means: the recurrent states of the later linear layers see only the survivors). The wrong
    treatment ``masked`` keeps them in the sequence, masked out of every full-attention key and zeroed at the
    linear layers' input (their recurrent states still step over them and decay). Must run unpatched.
    """
    inner, lm = model.model, model.model.language_model
    ids, grid = x["input_ids"], x["image_grid_thw"]
    with torch.no_grad():
        features = inner.get_image_features(x["pixel_values"], grid, return_dict=True).pooler_output
        pos, _ = inner.get_rope_index(ids, mm_token_type_ids=x["mm_token_type_ids"], image_grid_thw=grid)
        hidden = lm.embed_tokens(ids)
        hidden[0, ids[0] == VOCAB.image] = torch.cat(list(features))
        n = hidden.shape[1]
        present = torch.ones(n, dtype=torch.bool)
        for i, decoder_layer in enumerate(lm.layers):
            if i == layer and treatment == "removed":
                hidden, pos = hidden[:, llm_keep], pos[:, :, llm_keep]
                present = present[llm_keep]
            elif i == layer:
                present = llm_keep
            length = hidden.shape[1]
            allowed = torch.ones(length, length, dtype=torch.bool).tril() & present[None, :]
            if decoder_layer.block_type == LINEAR:
                mask = None if present.all() else present[None].float()
            else:
                mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            hidden = decoder_layer(hidden, position_embeddings=lm.rotary_emb(hidden, pos), attention_mask=mask)
        return model.lm_head(lm.norm(hidden))[0, -1]


def _patched_run(model, x, pipeline):
    with tokprune.pruned(model, pipeline, question_end=MARKER) as run, torch.no_grad():
        logits = model(**x).logits[0, -1]
    return logits, run.stats.diagnostics


def test_the_reference_is_the_stock_model(tiny):
    model, make_inputs = tiny
    x = make_inputs([6], images=2)
    every = torch.ones(x["input_ids"].shape[1], dtype=torch.bool)
    with torch.no_grad():
        stock = model(**x).logits[0, -1]
    assert _distance(_reference(model, x, every, 0), stock) <= 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_a_cut_before_a_linear_layer_runs_its_recurrence_over_the_survivors_alone(tiny, seed):
    # The probe cuts before layer 2: layer 3 is linear attention, its conv and delta-rule states see the
    # survivors only. Keeping the dropped tokens in the recurrence (masked, zeroed) must be told apart.
    model, make_inputs = tiny
    assert TINY_LAYER_TYPES[3] == LINEAR
    x = make_inputs([6], seeds=[seed], images=2)
    logits, diagnostics = _patched_run(model, x, Pipeline([_RecordLastRow(layer=2, keep_ratio=0.5)]))
    keep = diagnostics["probe_last_row.keep"][0]
    assert not keep.all()
    assert _distance(logits, _reference(model, x, keep, 2)) <= 1e-5
    assert _distance(logits, _reference(model, x, keep, 2, treatment="masked")) > WRONG


class _NoLinearMask(Qwen3_5Adapter):
    """Wrong: the linear layers get no padding mask, so the padding of a ragged batch enters their states."""

    def layer_mask(self, kind, valid, query_len, dtype, all_valid):
        return None if kind == LINEAR else super().layer_mask(kind, valid, query_len, dtype, all_valid)


def test_padding_never_reaches_a_recurrent_state(tiny):
    # batch == solo holds (also in the contract); the adapter without the linear layers' padding mask fails it,
    # since the tiny model's padding row is not zero (as in trained checkpoints)
    model, _ = tiny
    assert model.model.language_model.embed_tokens.weight[VOCAB.pad].abs().sum() > 0
    check_batch_solo(Qwen3_5Adapter)
    with pytest.raises(AssertionError, match="differ from its solo run"):
        check_batch_solo(_NoLinearMask)


class _RecordScores(ProbeLastRow):
    """:class:`ProbeLastRow` reporting the attention rows of layer K-1 and of layer K itself."""

    def plan(self, ctx):
        plan = super().plan(ctx)
        own = last_row_attention(replace(ctx, attention=ctx.layer_attention()))
        return replace(plan, diagnostics={"previous": last_row_attention(ctx), "own": own})


def test_llm_scores_are_the_stock_eager_attention_of_the_gated_partly_rotated_layers(monkeypatch):
    # The last token's head-mean attention rows a step scores with (layer K-1's from its captured q/k, layer
    # K's own recomputed from the states entering it) == the unpatched model's eager attention weights: q_proj
    # gives a query and a gate per head, and RoPE turns half of each head. Rotating whole heads must fail.
    model, make_inputs = tiny_qwen3_5(seed=1, attn_implementation="eager")
    x = make_inputs((5, 2, 8), images=2)
    with torch.no_grad():
        attentions = model(**x, output_attentions=True).attentions  # full-attention layers only: 1, 2
    stock = {k: a[:, :, -1].float().mean(1) for k, a in zip(("previous", "own"), attentions)}
    valid = x["attention_mask"].bool()

    def scores():
        _, diagnostics = _patched_run(model, x, Pipeline([_RecordScores(layer=2)]))
        return diagnostics

    got = scores()
    for key in ("previous", "own"):
        assert _distance(got[f"probe_last_row.{key}"][valid], stock[key][valid]) <= 1e-5, key
    rope, layer_qk = hf.apply_rope, hf.layer_qk

    def whole_heads(q, k, cos, sin):  # wrong: cos/sin stretched over the whole head
        times = q.shape[-1] // cos.shape[-1]
        return rope(q, k, cos.repeat(1, 1, times), sin.repeat(1, 1, times))

    def ungated(layer, hidden):  # wrong: q_proj's output read as queries only (gates taken for heads)
        q, k = layer_qk(layer, hidden)
        b, n = hidden.shape[:2]
        raw = layer.self_attn.q_proj(layer.input_layernorm(hidden)).view(b, n, -1, q.shape[-1])[:, :, : q.shape[1]]
        return layer.self_attn.q_norm(raw).transpose(1, 2), k

    with monkeypatch.context() as patched:
        patched.setattr(hf, "apply_rope", whole_heads)
        assert _distance(scores()["probe_last_row.previous"][valid], stock["previous"][valid]) > WRONG
    with monkeypatch.context() as patched:
        patched.setattr(hf, "layer_qk", ungated)
        assert _distance(scores()["probe_last_row.own"][valid], stock["own"][valid]) > WRONG


@pytest.mark.parametrize("spec", ["none", "divprune(keep_ratio=0.5)", "fastv(layer=2, keep_ratio=0.5)"])
def test_later_turns_continue_the_recurrent_states_and_padding_after_the_history_is_refused(tiny, spec):
    # Later turns of equal length per sample continue the pruned cache (the linear layers' states included)
    # as the conversation re-run without a cache does (tests/test_conversations.py's reference). Later turns
    # that differ in length put padding after each sample's history, over which a recurrent state would
    # step (decaying): refused before anything runs, the cache left as it was, so the conversation goes on.
    from tests import test_conversations as conversations
    from tokprune.adapters._tiny import left_padded

    model, make_inputs = tiny
    inputs = make_inputs((5, 3))
    with tokprune.pruned(model, spec, question_end=MARKER) as handle:
        conv = conversations.converse(model, handle, inputs, turns=[[(11, 12), (21, 22)], [(31,), (41,)]])
        cache = DynamicCache(config=model.config.get_text_config())
        first = conversations.converse(model, handle, inputs, turns=[], cache=cache)
        new = left_padded([[VOCAB.user, VOCAB.colon, *words, *MARKER] for words in [(11, 12, 13), (21,)]])
        ids = torch.cat([first.sequences, new["input_ids"]], 1)
        extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
        extra["mm_token_type_ids"] = conversations.image_types(ids, model)
        with pytest.raises(InputError, match=r"padding after real tokens in this later turn's new tokens \(sample 1\)"):
            model.generate(
                input_ids=ids,
                attention_mask=torch.cat([first.mask, new["attention_mask"]], 1),
                **conversations.cached(model, cache),
                **extra,
                max_new_tokens=2,
                pad_token_id=VOCAB.pad,
            )
        conversations.check_conversation(model, handle, inputs, conv)


# -- which layers may host an LLM-stage cut --------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "fastv(layer=3)",
        "text_interact(layer=3)",
        "dart(layer=3)",
        "pyramiddrop(layer=(2, 3), keep_ratio=(0.5, 0.25), scores=previous, positions=keep)",
        "pyramiddrop(layer=2, keep_ratio=0.5, positions=keep)",  # scores=own: layers 1 and 2 are full
        "divprune(keep_ratio=0.5)+fastv(layer=2, keep_ratio=0.5)",
    ],
)
def test_llm_stage_strategies_at_the_layers_that_host_them_keep_cache_equal_recompute(spec):
    assert cache_equivalence(Qwen3_5Adapter, spec) is not None, f"{spec} was refused"


@pytest.mark.parametrize(
    "spec",
    [
        "fastv(layer=3, keep_ratio=0.5)",
        "dart(layer=2)",
        "pyramiddrop(layer=(2, 3), keep_ratio=(0.5, 0.25), scores=previous, positions=keep)",
    ],
)
def test_llm_stage_strategies_give_each_sample_its_solo_logits(tiny, spec):
    from tokprune.testing.adapters import _logits

    model, make_inputs = tiny
    lengths = (5, 2, 8)
    batch = make_inputs(lengths, images=2)
    with tokprune.pruned(model, spec, question_end=MARKER) as run:
        logits = _logits(model, batch)[:, -1]
        for i, q in enumerate(lengths):
            solo = make_inputs([q], seeds=[i], images=2)
            assert _distance(_logits(model, solo)[0, -1], logits[i]) <= 1e-4, (spec, i)
    assert (run.stats.layer_tokens[:, -1] < run.stats.seq_len).all()


def test_a_cut_scored_by_a_linear_layer_is_refused_naming_the_hosts(tiny):
    model, _ = tiny
    # layer 0 and 3 are linear: a cut before 1 or 4 would read their (absent) attention; 2 and 3 can host it
    with pytest.raises(
        StrategyParamError,
        match=r"fastv\(layer=1\) prunes before decoder layer 1 and scores with the softmax attention of layer 0, but in this qwen3_5 model layer 0 is linear_attention \(no attention matrix to read\); layers K this cut can be hosted before: \[2, 3\]",
    ):
        tokprune.patch(model, "fastv(layer=1)")
    # pyramiddrop's own-layer scores read layer K too: only 2 (1 and 2 full); layer=3 reads linear layer 3
    with pytest.raises(
        StrategyParamError,
        match=r"layers 2 and 3, but in this qwen3_5 model layer 3 is linear_attention .* hosted before: \[2\]; it also reads layer K's own attention: a configuration reading layer K-1's alone can be hosted before layers \[2, 3\]",
    ):
        tokprune.patch(model, "pyramiddrop(layer=(2, 3), keep_ratio=(0.5, 0.25), positions=keep)")
    assert tokprune.adapters.handle_of(model) is None


def test_on_qwen3_5s_own_layout_a_cut_is_hosted_after_each_full_attention_layer():
    # Qwen3.5's checkpoints: three linear layers, then a full one (full_attention_interval=4): FastV's
    # default layer 2 is refused, naming 4 and 8
    model, _ = tiny_qwen3_5(num_hidden_layers=12, layer_types=None)
    kinds = model.config.text_config.layer_types
    assert [i for i, k in enumerate(kinds) if k != LINEAR] == [3, 7, 11]
    with pytest.raises(StrategyParamError, match=r"layer 1 is linear_attention .* hosted before: \[4, 8\]"):
        tokprune.patch(model, "fastv")
    with pytest.raises(StrategyParamError, match=r"hosted before: none; .* can be hosted before layers \[4, 8\]"):
        tokprune.patch(model, "pyramiddrop(layer=(4, 8), keep_ratio=(0.5, 0.25), positions=keep)")
    tokprune.patch(model, "fastv(layer=4)").remove()


# -- the vision stage, bad input ------------------------------------------------------------------------


def test_the_vision_stage_keeping_everything_is_the_stock_model(tiny):
    model, make_inputs = tiny
    x = make_inputs((5, 2, 8), images=2)
    with torch.no_grad():
        stock_features = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"], return_dict=True)
        stock = model(**x).logits
    with tokprune.pruned(model, Pipeline([_RecordVisionNorm(keep_ratio=1.0)]), question_end=MARKER) as run:
        with torch.no_grad():
            ours = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])
            logits = model(**x).logits
    assert torch.equal(torch.cat(list(ours.pooler_output)), torch.cat(list(stock_features.pooler_output)))
    valid = x["attention_mask"].bool()
    assert _distance(logits[valid], stock[valid]) <= 1e-5
    assert torch.equal(run.stats.images, torch.full((3,), 2))


def test_an_image_with_fewer_tokens_than_the_budget_is_kept_whole(tiny):
    # the tiny images bring 6, 8, 4 and 12 tokens: keep=7 keeps a 6- or 4-token image whole, cuts the others
    model, make_inputs = tiny
    x = make_inputs((5, 2, 8), images=2)
    with tokprune.pruned(model, "divprune(keep=7)", question_end=MARKER) as run, torch.no_grad():
        model(**x)
    s = run.stats
    assert torch.equal(s.image_kept, s.image_tokens.clamp(max=7))
    assert (s.image_tokens < 7).any() and (s.image_tokens > 7).any()


def test_cls_reading_strategies_and_compact_positions_are_refused(tiny):
    model, _ = tiny
    with pytest.raises(
        MissingCapabilityError,
        match=r"the qwen3_5 vision tower has no CLS token; vision strategies that read no CLS signal: divprune, evs, random, vidcom2 \(",
    ):
        tokprune.patch(model, "topk")
    with pytest.raises(StrategyParamError, match="qwen3_5 uses multi-axis .*M-RoPE"):
        tokprune.patch(model, "random", vision_positions="compact")
    assert tokprune.adapters.handle_of(model) is None


def test_the_mixture_of_experts_variant_is_the_same_code_path():
    # Qwen3_5MoeForConditionalGeneration (not a subclass of the dense class) has its own family, the same
    # decoder path (the contract runs on it too): the dense one does not claim it, nor it the dense model
    moe, _ = tiny_qwen3_5(experts=4)
    dense, _ = tiny_qwen3_5()
    assert tokprune.adapters.pick_adapter(moe) is Qwen3_5MoeAdapter
    assert tokprune.adapters.pick_adapter(dense) is Qwen3_5Adapter
    with pytest.raises(StrategyParamError, match=r"this qwen3_5_moe model layer 0 is linear_attention"):
        tokprune.patch(moe, "fastv(layer=1)")


# -- the FLOP model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts", [0, 4], ids=["dense", "moe"])
@pytest.mark.parametrize(
    "spec", ["none", "random(keep_ratio=0.25)", "random(keep_ratio=0.5)+fastv(layer=2, keep=1)", "fastv(layer=3)"]
)
def test_prefill_flops_are_the_brute_force_count(spec, experts):
    # FlopCounterMode over the real modules (eager attention): the tower and its merger (patch-embedding
    # convolution apart, as in every family) and each decoder layer at the count it really ran, the linear
    # layers' depthwise convolution and chunked delta rule included. The delta rule's triangular solves have
    # no FlopCounterMode rule: the model counts them, the brute force adds them. MoE: each token runs its
    # routed experts only (plus the router, the shared expert and its gate).
    from torch.utils.flop_counter import FlopCounterMode

    model, make_inputs = tiny_qwen3_5(seed=0, attn_implementation="eager", experts=experts)
    # inference weights: from transformers 5.25 the depthwise convolution runs as a `kernels` layer that takes the
    # weight as a module input, and FlopCounterMode's module tracker cannot hook a leaf that requires grad
    model.requires_grad_(False)
    if experts:  # the default grouped_mm experts run an op FlopCounterMode has no rule for: the loop, same products
        model.config.text_config._experts_implementation = "eager"
    x = make_inputs((5,), images=2)
    root, lm = type(model).__name__, model.model.language_model

    def brute(counter, layer_tokens, flops):
        layers = sum(
            _macs(counter, f"{root}.model.language_model.layers.{i}", convolutions=True) for i in range(len(lm.layers))
        )
        solves = sum(
            float(flops.triangular_solves(layer_tokens[0, i])) for i, k in enumerate(TINY_LAYER_TYPES) if k == LINEAR
        )
        return layers + solves + _macs(counter, f"{root}.model.visual", convolutions=False)

    with FlopCounterMode(display=False) as counter, tokprune.pruned(model, spec) as run, torch.no_grad():
        model(**x, logits_to_keep=1)
    s, flops = run.stats, run.model_parts.flops
    assert float(s.flops_pruned[0]) == brute(counter, s.layer_tokens, flops)
    if spec != "none":
        assert s.flops_pruned[0] < s.flops_unpruned[0]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**x, logits_to_keep=1)
    unpruned = s.seq_len[:, None].expand(-1, len(lm.layers))
    assert float(s.flops_unpruned[0]) == brute(counter, unpruned, flops)
