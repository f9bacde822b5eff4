"""Qwen2.5-VL specifics (the shared behaviour is proven by tests/test_adapter_contract.py)."""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune import Pipeline
from tokprune import hf_compat as hf
from tokprune.adapters.qwen2_5_vl import Qwen2_5_VLAdapter, mrope_index
from tokprune.errors import InputError, MissingCapabilityError, StrategyParamError, UnsupportedModelError
from tokprune.testing.adapters import _RecordVisionNorm
from tokprune.testing.models import VOCAB, tiny_qwen2_5_vl, tiny_qwen3_vl

pytestmark = pytest.mark.skipif(
    hf.older_than(Qwen2_5_VLAdapter.min_transformers),
    reason=f"Qwen2.5-VL is tested from transformers {Qwen2_5_VLAdapter.min_transformers}",
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_vl(seed=0)


def test_survivors_keep_their_3d_positions(tiny):
    # The rotary embedding of the first decoder layers sees, for each sample, exactly the stock M-RoPE
    # positions (get_rope_index on the unpruned prompt) of the tokens that survived the vision stage.
    model, make_inputs = tiny
    x = make_inputs((5, 2, 8))
    full = mrope_index(model.model, x["input_ids"], x["mm_token_type_ids"], x["image_grid_thw"], x["attention_mask"])
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(
        lambda m, a, kw, o: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    try:
        with tokprune.pruned(model, Pipeline([_RecordVisionNorm(keep_ratio=0.5)])) as run, torch.no_grad():
            model(**x)
    finally:
        hook.remove()
    keep = run.stats.diagnostics["probe_vision_norm.keep"]  # [I, L_max], images in prompt order
    image = x["input_ids"] == VOCAB.image
    slot_keep = torch.zeros_like(image)
    slot_keep[image] = keep[keep.new_ones(keep.shape).cumsum(1) <= run.stats.image_tokens[:, None]]
    kept = x["attention_mask"].bool() & (~image | slot_keep)
    got = seen[0].permute(1, 2, 0)  # [B, W, 3], left-packed
    assert got.shape[-1] == 3 and not torch.equal(full[..., 0], full[..., 1])  # really 3-D (image rows differ)
    for b in range(x["input_ids"].shape[0]):
        n = int(kept[b].sum())
        assert torch.equal(got[b, -n:], full[b][kept[b]])


@pytest.mark.parametrize("family", [tiny_qwen2_5_vl, tiny_qwen3_vl])  # Qwen3-VL reuses this adapter's refusals
def test_cls_strategies_and_compact_positions_are_refused(family):
    model, _ = family()
    name = "qwen3_vl" if family is tiny_qwen3_vl else "qwen2_5_vl"
    with pytest.raises(MissingCapabilityError, match=rf"the {name} vision tower has no CLS token; vision strategies that read no CLS signal: divprune, evs, random, vidcom2 \("):
        tokprune.patch(model, "topk")
    with pytest.raises(StrategyParamError, match=f"{name} uses multi-axis .*M-RoPE"):
        tokprune.patch(model, "random", vision_positions="compact")
    assert tokprune.adapters.handle_of(model) is None


def test_pruning_lowers_the_prompt_the_llm_sees_and_generate_keeps_its_contract(tiny):
    model, make_inputs = tiny
    x = make_inputs((5, 2, 8))
    with tokprune.pruned(model, "random(keep_ratio=0.25)+fastv(layer=2, keep_ratio=0.5)") as run, torch.no_grad():
        out = model.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=VOCAB.pad)
    n = x["input_ids"].shape[1]
    assert torch.equal(out[:, :n], x["input_ids"]) and out.shape[1] == n + 3
    s = run.stats
    assert torch.equal(s.image_tokens, (x["input_ids"] == VOCAB.image).sum(1))  # 6, 8, 4: from image_grid_thw
    assert torch.equal(s.image_kept, (s.image_tokens.double() * 0.25 + 0.5).floor().long().clamp(min=1))
    assert (s.flops_pruned < s.flops_unpruned).all()
    # video pixels without video placeholders: refused, naming both counts (tests/test_video.py runs videos)
    with tokprune.pruned(model, "fastv"), pytest.raises(InputError, match="video tokens do not match: tokens: 0"):
        model(**x, pixel_values_videos=x["pixel_values"], video_grid_thw=x["image_grid_thw"])


def test_a_rotary_embedding_with_one_cos_per_axis_is_refused_at_patch(tiny, monkeypatch):
    """Older releases return cos/sin per M-RoPE axis; scoring q/k with them would be silently wrong."""
    model, _ = tiny
    rotary = model.model.language_model.rotary_emb
    merged = type(rotary).forward

    def per_axis(self, x, position_ids):
        cos, sin = merged(self, x, position_ids)
        return cos.expand(3, *cos.shape), sin.expand(3, *sin.shape)

    monkeypatch.setattr(type(rotary), "forward", per_axis)
    with pytest.raises(UnsupportedModelError, match=r"merges the three M-RoPE axes .* one per axis"):
        tokprune.patch(model, "fastv")
    assert tokprune.adapters.handle_of(model) is None


def test_the_cls_free_dpp_cuts_each_image_as_alone(tiny):
    # cdpruner(relevance=uniform) reads no CLS and cuts per image: images of different sizes in one
    # batch keep what they keep alone and give their solo logits
    from tokprune.testing.adapters import _logits

    model, make_inputs = tiny
    lengths = (5, 2, 8)
    batch = make_inputs(lengths)
    with tokprune.pruned(model, "cdpruner(relevance=uniform, keep_ratio=0.5)", question_end=VOCAB.assistant_marker) as run:
        logits = _logits(model, batch)[:, -1]
        kept = run.stats.visual_kept
        for i, q in enumerate(lengths):
            solo = make_inputs([q], seeds=[i])
            torch.testing.assert_close(_logits(model, solo)[0, -1], logits[i], rtol=0, atol=1e-4)
            assert run.stats.visual_kept[0] == kept[i]
    assert len(set(kept.tolist())) > 1
