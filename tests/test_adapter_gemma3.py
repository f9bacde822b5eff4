"""The Gemma 3 family: sliding-window and full layers with their own RoPE, bidirectional image blocks that follow
the survivors of every cut, LLM-stage cuts only where a full layer scores them, and the refusals (CLS-reading
vision steps, pan-and-scan crops, cuts scored by a sliding layer, configurations the family does not handle).

The references are built from the stock model's own pieces and transformers' own mask builder: each wrong
treatment (no window, no image blocks, blocks that stay where the image was, one RoPE for every layer) is
written here too and must fail them."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma3 import modeling_gemma3 as stock

import tokprune
from tokprune import hf_compat as hf
from tokprune.adapters.family import LayerKeys
from tokprune.adapters.gemma3 import FULL, SLIDING, Gemma3Adapter, image_blocks, layer_mask
from tokprune.errors import MissingCapabilityError, StrategyParamError, UnsupportedModelError
from tokprune.testing.adapters import LENGTHS, cache_equivalence
from tokprune.testing.models import VOCAB, left_padded

pytestmark = pytest.mark.skipif(
    hf.older_than(Gemma3Adapter.min_transformers),
    reason=f"Gemma 3 is tested from transformers {Gemma3Adapter.min_transformers}",
)

WRONG = 1e-3  #: how far (max |logit difference|) a wrong treatment must land
QUESTION_END = VOCAB.assistant_marker


@pytest.fixture(scope="module")
def case():
    return Gemma3Adapter.tiny()


@pytest.fixture(scope="module")
def eager():
    return Gemma3Adapter.tiny(attn_implementation="eager")


# -- wrong treatments (each must fail a test below) ------------------------------------------------------------


class NoWindow(Gemma3Adapter):
    """Sliding layers attend to every earlier key."""

    def layer_mask_from(self, kind, keys, dtype):
        return super().layer_mask_from(FULL, keys, dtype)


class NoBlocks(Gemma3Adapter):
    """Image tokens attend causally only."""

    def attention_groups(self, input_ids, options):
        return None


class OneRope(Gemma3Adapter):
    """Every layer rotates with the full layers' RoPE base."""

    def layer_rotary(self, kind, hidden, pos):
        return super().layer_rotary(FULL, hidden, pos)


class StaleBlocks(Gemma3Adapter):
    """Image blocks read at the packed column (where the image was before the cut), not the survivor's source."""

    def attention_groups(self, input_ids, options):
        self.blocks = super().attention_groups(input_ids, options)
        return self.blocks

    def layer_mask_from(self, kind, keys, dtype):
        if keys.groups is not None:  # right-aligned: the sequences are left-padded before and after a cut
            keys = LayerKeys(keys.valid, keys.positions, keys.query_len, keys.all_valid,
                             self.blocks[:, -keys.valid.shape[1]:])  # fmt: skip
        return super().layer_mask_from(kind, keys, dtype)


def _logits(model, inputs, spec="none", adapter=None, **options):
    with torch.no_grad(), tokprune.pruned(model, spec, question_end=QUESTION_END, adapter=adapter, **options) as run:
        return model(**inputs).logits, run.stats


def _distance(a, b):
    return (a - b).abs().max().item()


# -- the tiny model exercises what the family must get right --------------------------------------------------


def test_the_tiny_case_has_windows_blocks_and_two_ropes_that_matter(case):
    x = case.make_inputs(LENGTHS)
    config = case.model.config.text_config
    images = (x["input_ids"] == VOCAB.image).sum(dim=1)
    assert x["attention_mask"].sum(dim=1).min() > 3 * config.sliding_window  # the window cuts every prompt
    assert images.tolist() == [32, 32, 16]  # several images per sample, ragged
    assert set(config.layer_types) == {SLIDING, FULL}
    assert config.rope_parameters[SLIDING]["rope_theta"] != config.rope_parameters[FULL]["rope_theta"]
    with torch.no_grad():
        with_blocks = case.model(**x).logits
        causal = case.model(**{k: v for k, v in x.items() if k != "token_type_ids"}).logits
    assert _distance(with_blocks, causal) > WRONG


@pytest.mark.parametrize("types", [True, False], ids=["image_blocks", "causal_only"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_keep_all_is_stock_and_each_wrong_mask_or_rope_is_not(types, impl, case, eager):
    case = case if impl == "sdpa" else eager
    x = case.make_inputs(LENGTHS)
    if not types:
        x.pop("token_type_ids")
    with torch.no_grad():
        reference = case.model(**x).logits
        tokens = case.model.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=VOCAB.pad)
    valid = x["attention_mask"].bool()  # padding rows attend to nothing: their outputs are arbitrary
    assert _distance(_logits(case.model, x)[0][valid], reference[valid]) <= 1e-5
    with tokprune.pruned(case.model, "none", question_end=QUESTION_END), torch.no_grad():  # sliding cache layers
        assert torch.equal(case.model.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=VOCAB.pad), tokens)
    for wrong in (NoWindow, OneRope) + ((NoBlocks,) if types else ()):
        assert _distance(_logits(case.model, x, adapter=wrong)[0][valid], reference[valid]) > WRONG, wrong.__name__


def test_the_mask_measures_windows_in_positions_and_keeps_later_tokens_of_a_block():
    # survivors at positions 0, 1, 5, 9, 10, 11 (a cut dropped the others); window 8; 9..11 one image block
    positions = torch.tensor([[0, 1, 5, 9, 10, 11]])
    keys = LayerKeys(torch.ones(1, 6, dtype=torch.bool), positions, 6, True, torch.tensor([[-1, -1, -1, 0, 0, 0]]))
    allowed = layer_mask(keys, 8, torch.float32, "sdpa")[0, 0]
    assert allowed[3].tolist() == [False, False, True, True, True, True]  # 1 is 8 back: outside; later block keys in
    assert allowed[2].tolist() == [True, True, True, False, False, False]  # text stays causal
    full = layer_mask(keys, None, torch.float32, "sdpa")[0, 0]
    assert full[3].tolist() == [True] * 6 and full[2].tolist() == [True] * 3 + [False] * 3
    assert image_blocks(torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]])).tolist() == [[-1, 0, 0, -1, 1, 1, 1, -1]]


# -- the stock model on the survivors ---------------------------------------------------------------------------


def _reference(model, x, vision_keep, llm_keep, layer):
    """Last-token logits of one unpadded sample from Gemma 3's stock pieces and transformers' own masks, pruned by
    construction: the prompt shortened to the kept image tokens (``vision_keep`` bool ``[I, N]``; positions
    renumbered, i.e. ``compact``), and from decoder ``layer`` on the tokens ``llm_keep`` drops (bool over the
    shortened prompt) masked out of every key, which is what removing them does to the survivors under
    ``positions=keep``. Must run on the unpatched model (eager attention)."""
    inner, lm = model.model, model.model.language_model
    with torch.no_grad():
        pooled = inner.get_image_features(x["pixel_values"]).pooler_output.flatten(0, 1)  # [I * N, D]
        image = x["input_ids"][0] == VOCAB.image
        slots = image.clone()
        slots[image] = vision_keep.flatten()
        ids = x["input_ids"][:, ~image | slots]
        hidden = lm.embed_tokens(ids)
        hidden[0, ids[0] == VOCAB.image] = pooled[vision_keep.flatten()]
        pos = torch.arange(ids.shape[1])[None]
        blocks = stock.get_block_sequence_ids_for_mask((ids == VOCAB.image).long())
        masks = stock.create_masks_for_vision_model(
            config=lm.config, inputs_embeds=hidden, attention_mask=torch.ones_like(ids), cache=None,
            position_ids=pos, block_sequence_ids=blocks,
        )  # fmt: skip
        for i, decoder_layer in enumerate(lm.layers):
            kind = lm.config.layer_types[i]
            mask = masks[kind]
            if i >= layer:
                mask = mask.masked_fill(~llm_keep[None, None, None, :], torch.finfo(mask.dtype).min)
            hidden = decoder_layer(hidden, position_embeddings=lm.rotary_emb(hidden, pos, kind), attention_mask=mask)
        return model.lm_head(lm.norm(hidden))[0, -1]  # (Gemma3ForConditionalGeneration applies no final soft-cap)


def _kept(stats, layer, ids):
    """The vision keep mask ``[I, N]`` and the LLM keep mask over the shortened prompt."""
    vision = stats.kept.vision
    survivors = ids[0][ids[0] != VOCAB.image].shape[0] + int(vision.sum())
    llm = torch.ones(survivors, dtype=torch.bool)
    image = ids[0] == VOCAB.image
    slots = image.clone()
    slots[image] = vision.flatten()
    shortened_image = image[~image | slots]
    llm[shortened_image] = stats.kept.layers[layer][vision] if layer in stats.kept.layers else True
    return vision, llm


@pytest.mark.parametrize("layer", [1, 2, 3, 4])
def test_a_vision_and_an_llm_cut_are_the_stock_model_on_the_survivors(layer, eager):
    model, x = eager.model, eager.make_inputs([6], images=2)
    spec = f"divprune(keep_ratio=0.5)+fastv(layer={layer}, keep_ratio=0.5)"
    logits, stats = _logits(model, x, spec, vision_positions="compact")
    vision, llm = _kept(stats, layer, x["input_ids"])
    assert 0 < int(vision.sum()) < vision.numel() and 0 < int((~llm).sum())
    reference = _reference(model, x, vision, llm, layer)
    assert _distance(logits[0, -1], reference) <= 1e-4
    for wrong in (NoWindow, NoBlocks, StaleBlocks, OneRope):
        wrong_logits, wrong_stats = _logits(model, x, spec, adapter=wrong, vision_positions="compact")
        assert torch.equal(wrong_stats.kept.vision, vision)  # same cut, so only the treatment differs
        assert _distance(wrong_logits[0, -1], reference) > WRONG, wrong.__name__


@pytest.mark.parametrize("scores", ["previous", "own"])
@pytest.mark.parametrize("name", ["fastv", "pyramiddrop"])
def test_llm_scores_are_the_stock_eager_attention_of_every_layer(name, scores, eager, monkeypatch):
    # The last token's head-mean attention the steps score with == the unpatched model's eager attention weights
    # of layer K-1 (pyramiddrop(scores=own): of layer K), sliding layers included (their window is shorter than
    # every prompt here). Scores over every earlier key (the layer's mask not read: the wrong treatment) are not
    # that attention on a sliding layer.
    if name == "fastv" and scores == "own":
        pytest.skip("fastv scores with layer K-1")
    spec = (
        "fastv"
        if name == "fastv"
        else f"pyramiddrop(layer=(1, 2, 3, 4, 5), keep_ratio=(1, 1, 1, 1, 1), scores={scores})"
    )
    from tokprune.adapters import loop

    x = eager.make_inputs(LENGTHS)
    valid = x["attention_mask"].bool()
    with torch.no_grad():
        stock = [a[:, :, -1].float().mean(1) for a in eager.model(**x, output_attentions=True).attentions]
    layers = [2] if spec == "fastv" else [1, 2, 3, 4, 5]

    def run_scores():
        with tokprune.pruned(eager.model, spec, question_end=QUESTION_END) as run, torch.no_grad():
            eager.model(**x)
        name = "fastv.scores" if spec == "fastv" else "pyramiddrop@{}.scores"
        return {k: run.stats.diagnostics[name.format(k)] for k in layers}

    scorer = 0 if scores == "own" else -1  # the layer whose attention scores the cut before layer K
    for k, got in run_scores().items():
        assert _distance(got[valid], stock[k + scorer][valid]) <= 1e-5, k
    monkeypatch.setattr(loop, "_seen", lambda mask, p: None)
    for k, got in run_scores().items():
        sliding = eager.model.config.text_config.layer_types[k + scorer] == SLIDING
        assert (_distance(got[valid], stock[k + scorer][valid]) > WRONG) == sliding, k


# -- LLM-stage strategies and where they may cut --------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    ["fastv(layer=1)", "fastv(layer=4)", "text_interact(layer=3)", "dart(layer=3)",
     "pyramiddrop(layer=(1, 3, 5), keep_ratio=(0.5, 0.25, 0.125))",
     "divprune+pyramiddrop(layer=(2, 3), keep_ratio=(0.5, 0.25), positions=keep)"],
)  # fmt: skip
def test_llm_stage_strategies_run_and_the_cache_equals_recompute(spec):
    assert cache_equivalence(Gemma3Adapter, spec) is not None


def test_attention_soft_capping_refuses_the_llm_stage_only(case, monkeypatch):
    monkeypatch.setattr(case.model.config.text_config, "attn_logit_softcapping", 50.0)
    with pytest.raises(StrategyParamError, match=r"soft-caps its logits \(attn_logit_softcapping=50.0\).*: none$"):
        tokprune.patch(case.model, "fastv", question_end=QUESTION_END)
    tokprune.patch(case.model, "divprune", question_end=QUESTION_END).remove()


def test_bidirectional_gemma_is_refused(case, monkeypatch):
    monkeypatch.setattr(case.model.config.text_config, "use_bidirectional_attention", True)
    with pytest.raises(UnsupportedModelError, match=r"use_bidirectional_attention=True.*use_bidirectional_attention="):
        tokprune.patch(case.model, "fastv", question_end=QUESTION_END)


# -- the vision stage ---------------------------------------------------------------------------------------


def test_our_pooled_and_projected_features_are_the_stock_ones(case):
    x = case.make_inputs(LENGTHS)
    with torch.no_grad():
        reference = case.model.model.get_image_features(x["pixel_values"]).pooler_output  # [I, 16, D]
        with tokprune.pruned(case.model, "divprune", question_end=QUESTION_END) as adapter:
            encoded = adapter.encode_images(x["pixel_values"], {})
            ours = adapter.project(encoded.features)
    assert encoded.grid == (4, 4) and encoded.features.shape[:2] == (5, 16)
    assert _distance(ours, reference) <= 1e-6


def test_an_image_with_fewer_tokens_than_the_budget_is_kept_whole(case):
    _, stats = _logits(case.model, case.make_inputs(LENGTHS), "divprune(keep=20)")
    assert stats.image_kept.tolist() == [16] * 5
    _, stats = _logits(case.model, case.make_inputs(LENGTHS), "divprune(keep=6)")
    assert stats.image_kept.tolist() == [6] * 5


def test_cls_reading_strategies_are_refused_naming_those_that_work(case):
    with pytest.raises(MissingCapabilityError, match=r"^cls_knee reads the CLS token's signals .*gemma3 vision tower "
                       r"has no CLS token; vision strategies that read no CLS signal: .*divprune"):  # fmt: skip
        tokprune.patch(case.model, "cls_knee", question_end=QUESTION_END)
    assert tokprune.adapters.handle_of(case.model) is None


def test_pan_and_scan_is_refused_at_patch_for_the_vision_stage(case, monkeypatch):
    from tokprune.adapters import gemma3

    monkeypatch.setattr(gemma3.hf, "model_image_processor", lambda model: type("P", (), {"do_pan_and_scan": True}))
    with pytest.raises(MissingCapabilityError, match=r"do_pan_and_scan=True.*do_pan_and_scan=False"):
        tokprune.patch(case.model, "divprune", question_end=QUESTION_END)
    tokprune.patch(case.model, "fastv", question_end=QUESTION_END).remove()  # the LLM stage still runs


def test_pre_encoded_images_are_refused_unless_ours(case):
    x = case.make_inputs([4])
    with torch.no_grad():
        encoded = case.model.model.get_image_features(x.pop("pixel_values"))
    pre = {"image": BaseModelOutputWithPooling(pooler_output=encoded.pooler_output)}
    with torch.no_grad():
        reference = case.model(**x, mm_encoder_outputs=dict(pre)).logits
        assert _distance(_logits(case.model, {**x, "mm_encoder_outputs": dict(pre)})[0], reference) <= 1e-5


def test_decoding_reads_only_the_keys_a_sliding_cache_layer_keeps(monkeypatch):
    # generate's DynamicCache keeps the last window - 1 keys of a sliding layer: the decode masks must match
    assert cache_equivalence(Gemma3Adapter, "fastv(layer=2)") is not None
    monkeypatch.setattr(hf, "held_keys", lambda cache, layer, keys, query_length: keys)
    with pytest.raises((AssertionError, RuntimeError)):
        cache_equivalence(Gemma3Adapter, "fastv(layer=2)")


# -- the FLOP model -----------------------------------------------------------------------------------------


def _macs(counter, name):
    """Multiply-accumulates of the ops run under module ``name`` (FlopCounterMode counts 2 per MAC);
    convolutions (the patch embedding) are left out of the FLOP model on purpose (tokprune.stats)."""
    ops = counter.get_flop_counts().get(name, {})
    total = sum(v for op, v in ops.items() if "convolution" not in str(op))
    assert total % 2 == 0
    return total // 2


@pytest.mark.parametrize("spec", ["none", "random(keep_ratio=0.25)", "fastv(layer=2, keep=4)", "fastv(layer=4)"])
def test_prefill_flops_are_the_brute_force_count(spec, eager):
    # Tower (every patch, no CLS), the projector's linear map on the tokens it maps (ours maps the kept ones,
    # outside the projector module: what the inner model ran beside its children), and the decoder layers at
    # the counts they ran (queries 96 wide for a 64-wide model). Unpruned: the stock model's own count.
    from torch.utils.flop_counter import FlopCounterMode

    model, x = eager.model, eager.make_inputs((6,), images=2)  # one sample: padding would be counted
    root = f"{type(model).__name__}.model"
    children = ("vision_tower", "multi_modal_projector") + tuple(
        f"language_model.layers.{i}" for i in range(len(model.model.language_model.layers))
    )
    for patched in (True, False):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            if patched:
                with tokprune.pruned(model, spec, question_end=QUESTION_END) as run:
                    model(**x, logits_to_keep=1)
            else:
                model(**x, logits_to_keep=1)
        counted = sum(_macs(counter, f"{root}.{name}") for name in children)
        if spec.startswith("random") and patched:  # our projection of the kept tokens, in the inner model itself
            counted += (
                _macs(counter, root)
                - _macs(counter, f"{root}.vision_tower")
                - sum(_macs(counter, f"{root}.language_model.layers.{i}") for i in range(6))
            )
        stats = run.stats
        figure = stats.flops_pruned if patched else stats.flops_unpruned
        assert float(figure.sum()) == counted, (spec, patched)
    assert (stats.flops_pruned < stats.flops_unpruned).all() == (spec != "none")


@pytest.mark.parametrize("spec", ["none", "divprune+fastv(layer=4)"])
def test_several_sequences_per_prompt_repeat_each_prompts_own_images(spec, case):
    # pixel_values has a row per image, several per prompt: repeated per prompt, not row by row
    x = case.make_inputs(LENGTHS)
    common = {"max_new_tokens": 4, "do_sample": True, "top_k": 1, "pad_token_id": VOCAB.pad}
    with torch.no_grad(), tokprune.pruned(case.model, spec, question_end=QUESTION_END):
        one = case.model.generate(**x, **common)
        two = case.model.generate(**x, num_return_sequences=2, **common)
    assert torch.equal(two, one.repeat_interleave(2, dim=0))
    if spec == "none":
        with torch.no_grad():
            assert torch.equal(case.model.generate(**x, num_return_sequences=2, **common), two)


def test_a_padded_later_turn_on_sliding_cache_layers_is_refused():
    # generate's DynamicCache(config) evicts a sliding layer's entries beyond the window, padding included: a
    # batch's later turn of unequal lengths would leave a padded sample fewer of its own keys than alone
    from transformers import DynamicCache

    case = Gemma3Adapter.tiny(seed=1)  # (seed 0's tiny model writes the image id, which a later turn refuses)
    x = case.make_inputs((5, 3))
    common = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": VOCAB.pad}
    for questions, refused in [([(11, 12), (13,)], True), ([(11, 12), (13, 14)], False)]:
        cache = DynamicCache(config=case.model.config.get_text_config())
        with tokprune.pruned(case.model, "fastv(layer=4)", question_end=QUESTION_END), torch.no_grad():
            out = case.model.generate(**x, cache=cache, **common)
            new = left_padded([[VOCAB.user, VOCAB.colon, *q, *QUESTION_END] for q in questions])
            turn = {
                "input_ids": torch.cat([out, new["input_ids"]], 1),
                "attention_mask": torch.cat([x["attention_mask"], torch.ones_like(out[:, x["input_ids"].shape[1] :]),
                                             new["attention_mask"]], 1),
                "pixel_values": x["pixel_values"],
            }  # fmt: skip
            if refused:
                with pytest.raises(
                    UnsupportedModelError, match=r"padding among its new tokens .*cache=DynamicCache\(\)"
                ):
                    case.model.generate(**turn, cache=cache, **common)
            else:
                assert case.model.generate(**turn, cache=cache, **common).shape[1] == turn["input_ids"].shape[1] + 2
