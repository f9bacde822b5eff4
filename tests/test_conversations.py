"""Conversations: later turns continue the first turn's pruned cache (docs/concepts.md, "Conversations").

The behaviour under test: a later turn continues the pruned cache as it is. Nothing is pruned again, so a
strategy that reads the question (text_interact, cdpruner's text relevance, fastv/dart/pyramiddrop's last
prompt token) keeps what turn one's question selected, whatever the new question says.

The reference, written out (:func:`reference_logits`): one forward over the whole conversation of one sample,
alone and without a cache, in which turn one's prompt is the prompt and every later token (turn one's answer,
the later questions and answers) is treated as generated. That is the adapter's no-cache path, where
(i) the vision stage cuts the image tokens before the LLM from turn one's prompt alone (the instruction a
vision step reads is turn one's), so the reference is one forward over the whole text with turn one's kept
image tokens; (ii) an LLM step decides at layer K on turn one's prompt positions (by causality their q/k
are those of turn one's prefill: the same cut) and keeps every later token at every layer, so the later
tokens attend to exactly the tokens the pruned cache holds. It runs no session bookkeeping (no cache, no
offsets, no segment masks), which is what the continuation relies on; its stats give the kept set it used,
compared with turn one's.

The conversations run as users run them: ``generate(input_ids=<the last returned sequences + the new
question>, attention_mask=..., cache=cache)``, a ragged batch of two conversations whose
questions differ in length at every turn (left padding in turn one, padding in the middle after it).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import tokprune
from tokprune import hf_compat as hf
from tokprune.adapters import _tiny
from tokprune.adapters import loop as loop_module
from tokprune.adapters.call import IMAGE_INPUTS, CallState, GenerateCall, _Session
from tokprune.adapters.gemma3 import tiny_gemma3
from tokprune.adapters.llava import tiny_llava
from tokprune.adapters.llava_next import tiny_llava_next
from tokprune.adapters.llava_onevision import tiny_llava_onevision
from tokprune.adapters.qwen2_5_vl import tiny_qwen2_5_vl
from tokprune.adapters.qwen3_vl import tiny_qwen3_vl
from tokprune.errors import InputError, UnsupportedModelError
from tokprune.testing.models import tiny_text_encoder
from tokprune.testing.video import default_items, onevision_video_inputs, video_inputs


def cached(model, cache):
    """The cache as the keyword this transformers takes (``cache=`` from 5.24, ``past_key_values=`` before):
    the old spelling warns from 5.24 on, and CI turns transformers' FutureWarnings into errors."""
    return {hf.cache_keyword(type(model).forward) or "past_key_values": cache}


VOCAB = _tiny.VOCAB
FAMILIES = {
    "llava": tiny_llava,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "llava_next": tiny_llava_next,
    "qwen3_vl": tiny_qwen3_vl,
    "llava_onevision": tiny_llava_onevision,
    "gemma3": tiny_gemma3,
}
#: Per family: a vision-stage strategy, LLM-stage ones (one layer, a schedule, DART), the reference method
#: (Qwen's tower has no CLS token: its vision half is divprune) and the question-reading ones.
SPECS = {
    "llava": [
        "divprune(keep_ratio=0.5)",
        "fastv(layer=2, keep_ratio=0.5)",
        "dart(layer=2, keep_ratio=0.5)",
        "pyramiddrop(layer=(1, 3), keep_ratio=(0.5, 0.25))",
        "cls_knee+text_interact",
        "cdpruner(keep_ratio=0.5)",  # relevance=text through a CLIP text tower (below)
    ],
    "qwen2_5_vl": [
        "divprune(keep_ratio=0.5)",
        "fastv(layer=2, keep_ratio=0.5)",
        "dart(layer=2, keep_ratio=0.5)",
        "pyramiddrop(layer=(1, 3), keep_ratio=(0.5, 0.25), positions=keep)",  # M-RoPE: no 1-D renumbering
        "divprune(keep_ratio=0.5)+text_interact",
    ],
}
# The other families: a vision cut and an LLM cut each (AnyRes tiles; Qwen3-VL's DeepStack features; Gemma 3's
# sliding-window cache layers and image blocks, two images in the first sample).
SPECS["llava_next"] = ["divprune(keep_ratio=0.5)", "fastv(layer=2, keep_ratio=0.5)"]
SPECS["qwen3_vl"] = ["divprune(keep_ratio=0.5)", "fastv(layer=2, keep_ratio=0.5)"]
SPECS["llava_onevision"] = ["divprune(keep_ratio=0.5)", "fastv(layer=2, keep_ratio=0.5)"]  # shrunk grids, newlines
SPECS["gemma3"] = ["divprune(keep_ratio=0.5)", "fastv(layer=4, keep_ratio=0.5)"]
CASES = [(family, spec) for family, specs in SPECS.items() for spec in specs]
#: The later turns' questions of the two conversations: lengths differ at every turn (middle padding).
LATER_QUESTIONS = [[(11, 12, 13, 14), (21,)], [(31,), (41, 42, 43)]]
NEW_TOKENS = 4
ATOL = 1e-4


def question_ids(words) -> list[int]:
    """A later turn's prompt: ``USER : <words> ASSISTANT :`` (the embedded model's multi-turn layout)."""
    return [VOCAB.user, VOCAB.colon, *words, *VOCAB.assistant_marker]


@dataclass
class Conversation:
    """What a conversation left: the final sequences and mask, and per turn the generated tokens' logits."""

    sequences: torch.Tensor  #: long ``[B, T]``: every turn, with the padding the batch put in
    mask: torch.Tensor  #: long ``[B, T]``
    logits: list[torch.Tensor]  #: per turn, ``[B, NEW_TOKENS, V]``: the scores generate() returned
    prompt_valid: torch.Tensor  #: long ``[B]``: non-padding tokens of turn one's prompt
    ends: list[torch.Tensor]  #: per turn, long ``[B]``: non-padding tokens up to the turn's last generated one
    stats: object  #: the patch's stats after turn one


#: Seeds other than 0 where seed 0's tiny model writes the image placeholder id (a later turn bringing it is refused).
SEEDS = {"gemma3": 1}


def setup(family: str, spec: str, seed: int | None = None):
    model, make_inputs = FAMILIES[family](seed=SEEDS.get(family, 0) if seed is None else seed)
    options = {"question_end": VOCAB.assistant_marker}
    if spec.startswith("cdpruner"):
        options["text_encoder"] = tiny_text_encoder()
    handle = tokprune.patch(model, spec, **options)
    return model, make_inputs((5, 3)), handle


def image_types(ids: torch.Tensor, model=None) -> torch.Tensor:
    """``mm_token_type_ids`` as a Qwen processor makes them: 1 at image placeholders, 2 at video ones."""
    video = getattr(getattr(model, "config", None), "video_token_id", None)
    return (ids == VOCAB.image).int() + (2 * (ids == video).int() if video is not None else 0)


def sliding(model) -> bool:
    """Whether the language model has sliding-window layers (Gemma 3)."""
    return "sliding_attention" in (getattr(model.config.get_text_config(), "layer_types", None) or ())


def new_cache(model) -> DynamicCache:
    """The model's dynamic cache; without sliding-window layers for Gemma 3 (such a layer evicts by entries, padding
    included, so a batch's padded later turn is refused on it: tests/test_adapter_gemma3.py)."""
    return DynamicCache() if sliding(model) else DynamicCache(config=model.config.get_text_config())


def converse(model, handle, inputs, turns=LATER_QUESTIONS, cache=None, images_again=True) -> Conversation:
    """Turn one, then each later turn appended to the returned sequences, on one cache; ``images_again``: the
    later turns pass the image inputs again (as a processor run on the whole conversation returns them; the
    stock model refuses them, a patched one checks that they are the same)."""
    cache = new_cache(model) if cache is None else cache
    common = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": VOCAB.pad}
    scored = {"output_logits": True, "return_dict_in_generate": True}
    out = model.generate(**inputs, **cached(model, cache), **common, **scored)
    stats = handle.stats if handle is not None else None
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(out.sequences[:, inputs["input_ids"].shape[1] :])], 1)
    logits, ends = [torch.stack(out.logits, 1)], [mask.sum(1)]
    sequences = out.sequences
    for later in turns:
        new = _tiny.left_padded([question_ids(words) for words in later])
        ids = torch.cat([sequences, new["input_ids"]], 1)
        mask = torch.cat([mask, new["attention_mask"]], 1)
        images = IMAGE_INPUTS if images_again else ()
        extra = {k: v for k, v in inputs.items() if k in images}
        if "mm_token_type_ids" in inputs:  # what a Qwen processor returns for the whole conversation
            extra["mm_token_type_ids"] = image_types(ids, model)
        if "token_type_ids" in inputs:  # Gemma 3's processor: 1 at image placeholders
            extra["token_type_ids"] = (ids == VOCAB.image).long()
        out = model.generate(input_ids=ids, attention_mask=mask, **cached(model, cache), **extra, **common, **scored)
        assert torch.equal(out.sequences[:, : ids.shape[1]], ids), "the returned sequences begin with the conversation"
        sequences = out.sequences
        mask = torch.cat([mask, torch.ones_like(sequences[:, ids.shape[1] :])], 1)
        logits.append(torch.stack(out.logits, 1))
        ends.append(mask.sum(1))
    return Conversation(sequences, mask, logits, inputs["attention_mask"].sum(1), ends, stats)


def sample_inputs(inputs, conv: Conversation, i: int, upto: int, model=None, solo=None) -> dict[str, torch.Tensor]:
    """Sample ``i``'s whole conversation alone, without padding, up to its ``upto`` first tokens; ``solo(i)``
    gives its visual inputs alone (else they are cut out of the batch's: one image per sample)."""
    valid = conv.mask[i].bool()
    ids = conv.sequences[i, valid][None, :upto]
    one = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if solo is not None:
        one.update(solo(i), mm_token_type_ids=image_types(ids, model))
    elif "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        sizes = grid.prod(-1).tolist()
        start = sum(sizes[:i])
        one.update(
            pixel_values=inputs["pixel_values"][start : start + sizes[i]],
            image_grid_thw=grid[i : i + 1],
            mm_token_type_ids=image_types(ids),
        )
    elif "token_type_ids" in inputs:  # Gemma 3: a row per image, several per sample, of equal token counts
        per_image = inputs["pixel_values"].shape[0]
        counts = (
            (inputs["input_ids"] == VOCAB.image).sum(1) * per_image // int((inputs["input_ids"] == VOCAB.image).sum())
        )
        start = int(counts[:i].sum())
        one.update(
            pixel_values=inputs["pixel_values"][start : start + int(counts[i])],
            token_type_ids=(ids == VOCAB.image).long(),
        )
    else:
        one["pixel_values"] = inputs["pixel_values"][i : i + 1]
        if "image_sizes" in inputs:
            one["image_sizes"] = inputs["image_sizes"][i : i + 1]
    return one


def reference_logits(model, handle, inputs: dict[str, torch.Tensor], prompt_len: int) -> torch.Tensor:
    """The reference (module docstring): one no-cache forward of a whole conversation whose prompt is turn
    one's first ``prompt_len`` tokens; every later token is kept at every layer. Logits ``[1, T, V]``."""
    call = CallState(handle, GenerateCall(prompt_len=prompt_len, use_cache=False))
    with torch.no_grad(), handle._active(call):
        return model(**inputs, use_cache=False).logits


def kept_rows(kept, sample: int, which: torch.Tensor) -> list[torch.Tensor]:
    """The rows of ``which`` (bool ``[I, N]``, a kept map's) of the images and videos of ``sample``, each cut
    to its own token count."""
    return [which[r, : int(kept.tokens[r])] for r in (kept.image_sample == sample).nonzero()[:, 0].tolist()]


def same_rows(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def check_conversation(model, handle, inputs, conv: Conversation, solo=None) -> None:
    """Every turn's scores and greedy tokens equal the reference's, sample by sample, and the reference
    kept what turn one kept."""
    for i in range(conv.sequences.shape[0]):
        end = int(conv.ends[-1][i])
        one = sample_inputs(inputs, conv, i, end - 1, model, solo)  # the last token is predicted, never fed
        ref = reference_logits(model, handle, one, int(conv.prompt_valid[i]))[0]
        for turn, (scores, stop) in enumerate(zip(conv.logits, conv.ends)):
            stop = int(stop[i])
            want = ref[stop - NEW_TOKENS - 1 : stop - 1]
            err = (scores[i] - want).abs().max().item()
            assert err <= ATOL, f"sample {i}, turn {turn + 1}: scores differ from the reference by {err:.3g}"
            tokens = conv.sequences[i, conv.mask[i].bool()][stop - NEW_TOKENS : stop]
            assert torch.equal(want.argmax(-1), tokens), f"sample {i}, turn {turn + 1}: greedy tokens differ"
        ref_stats, first = handle.stats, conv.stats  # the reference's prefill decided on turn one's prompt again
        assert int(ref_stats.visual_kept[0]) == int(first.visual_kept[i])
        ref_kept, kept = ref_stats.kept, first.kept
        same = same_rows(kept_rows(ref_kept, 0, ref_kept.vision), kept_rows(kept, i, kept.vision))
        assert same, f"sample {i}: other image tokens than turn one's"
        for layer, count in first.llm_kept.items():
            assert int(ref_stats.llm_kept[layer][0]) == int(count[i]), f"layer {layer}: another cut than turn one's"
            same = same_rows(kept_rows(ref_kept, 0, ref_kept.layers[layer]), kept_rows(kept, i, kept.layers[layer]))
            assert same, f"sample {i}, layer {layer}: other image tokens than turn one's"


@pytest.mark.parametrize("family, spec", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_later_turns_equal_the_conversation_rerun_with_turn_one_kept(family, spec):
    model, inputs, handle = setup(family, spec)
    conv = converse(model, handle, inputs)
    assert conv.stats.visual_kept.sum() < conv.stats.visual_unpruned.sum() or conv.stats.llm_kept
    check_conversation(model, handle, inputs, conv)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("kinds, spec", [("vv", "evs(keep_ratio=0.5)"), ("iv", "fastv(layer=2, keep_ratio=0.5)")])
def test_a_conversation_about_a_video(family, kinds, spec):
    # turn one brings a video (and an image): the later turns continue its pruned frames
    model = FAMILIES[family](seed=0)[0]
    handle = tokprune.patch(model, spec, question_end=VOCAB.assistant_marker)
    samples, lengths = [default_items(0, kinds[0]), default_items(1, kinds[1])], (5, 3)
    inputs = video_inputs(model, samples, question_lengths=lengths)

    def solo(i):
        alone = video_inputs(model, [samples[i]], question_lengths=[lengths[i]], seeds=[i])
        return {k: v for k, v in alone.items() if k in IMAGE_INPUTS}

    conv = converse(model, handle, inputs)
    check_conversation(model, handle, inputs, conv, solo=solo)


@pytest.mark.parametrize("kinds, spec", [(("v", "iv"), "evs(keep_ratio=0.5)"), (("vi", "v"), "fastv(layer=2, keep_ratio=0.5)")])
def test_a_conversation_about_a_llava_onevision_video(kinds, spec):
    # LLaVA-OneVision: pooled frames and a newline per video, 1-D positions; the later turns continue them
    model = tiny_llava_onevision(seed=0)[0]
    handle = tokprune.patch(model, spec, question_end=VOCAB.assistant_marker)
    lengths = (5, 3)
    inputs = onevision_video_inputs(model, kinds, lengths)

    def solo(i):
        alone = onevision_video_inputs(model, [kinds[i]], [lengths[i]], seeds=[i])
        return {k: v for k, v in alone.items() if k in IMAGE_INPUTS}

    conv = converse(model, handle, inputs)
    check_conversation(model, handle, inputs, conv, solo=solo)


def test_a_keep_all_patch_continues_a_conversation_as_the_stock_model_does():
    # the bookkeeping the continuation relies on (positions from the mask, Qwen's M-RoPE offset) is HF's own
    for family in FAMILIES:
        model, make_inputs = FAMILIES[family](seed=1)
        inputs = make_inputs((5, 3))
        # Gemma 3: transformers measures a sliding window in cache entries, padding among them included, so its
        # padded later turns differ from the same turn alone; tokprune measures it in positions (== alone, the
        # test above). Equal-length turns (no padding among the keys) are where both agree.
        turns = [[(11, 12, 13, 14), (21, 22, 23, 24)], [(31,), (41,)]] if sliding(model) else LATER_QUESTIONS
        with torch.no_grad():
            stock = converse(model, None, inputs, turns=turns, images_again=False)
        with tokprune.pruned(model, "divprune(keep_ratio=1.0)", question_end=VOCAB.assistant_marker) as handle:
            patched = converse(model, handle, inputs, turns=turns, images_again=False)
        assert torch.equal(stock.sequences, patched.sequences), family
        for turn, (a, b) in enumerate(zip(stock.logits, patched.logits)):
            assert (a - b).abs().max().item() <= ATOL, f"{family}, turn {turn + 1}"


@pytest.mark.parametrize("spec", ["cls_knee+text_interact", "fastv(layer=2, keep_ratio=0.5)"])
def test_re_pruning_for_the_new_question_is_another_computation_and_fails_the_check(spec):
    # The other behaviour a later turn could have: a fresh prefill of the whole conversation (no cache), where
    # the question read is the whole dialogue and the last prompt token the end of the new question. It keeps
    # other image tokens than turn one, and the check rejects its answer: the check tells the two apart.
    model, inputs, handle = setup("llava", spec)
    conv = converse(model, handle, inputs)
    width = conv.sequences.shape[1] - NEW_TOKENS  # the last turn's prompt
    fresh = model.generate(
        input_ids=conv.sequences[:, :width],
        attention_mask=conv.mask[:, :width],
        pixel_values=inputs["pixel_values"],
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=VOCAB.pad,
        output_logits=True,
        return_dict_in_generate=True,
    )
    layer = conv.stats.kept.cut_layers[0]
    assert not torch.equal(handle.stats.kept.layers[layer], conv.stats.kept.layers[layer])
    rerun = Conversation(
        fresh.sequences,
        conv.mask,
        [*conv.logits[:-1], torch.stack(fresh.logits, 1)],
        conv.prompt_valid,
        conv.ends,
        conv.stats,
    )
    with pytest.raises(AssertionError, match="differ"):
        check_conversation(model, handle, inputs, rerun)


# -- wrong implementations the check must reject --------------------------------------------------------------


_EXTEND = _Session.extend


def _stale_extend(self, input_ids, valid, text_positions):
    """The session forgets the decoding steps: it still stands for turn one's prompt only (stale state)."""
    if not self.tokens:
        _EXTEND(self, input_ids, valid, text_positions)


def _hf_bookkeeping(self, original, named, input_ids, session):
    """generate()'s own bookkeeping: the new tokens start at ``cache.get_seq_length()`` (the pruned length)."""
    return original(**{k: v for k, v in named.items() if k not in IMAGE_INPUTS})


@pytest.mark.parametrize("spec", ["divprune(keep_ratio=0.5)", "fastv(layer=2, keep_ratio=0.5)"])
def test_a_stale_session_is_refused(monkeypatch, spec):
    # a session that forgets the decoding steps would feed turn one's answer again on top of the cache
    model, inputs, handle = setup("llava", spec)
    monkeypatch.setattr(_Session, "extend", _stale_extend)
    with pytest.raises(InputError, match="this pruned cache stands for"):
        converse(model, handle, inputs)


def test_a_later_turn_that_forgets_the_compacted_offset_passes_the_runtime_checks_and_fails_the_check(monkeypatch):
    # pyramiddrop renumbers its survivors (positions=compact): decoding subtracts each segment's offset from
    # the caller's positions. A later turn that resets the offsets (as if its tokens started a new prompt)
    # gets every runtime check's approval (they read the caller's positions) and wrong answers.
    model, inputs, handle = setup("llava", "pyramiddrop(layer=(1, 3), keep_ratio=(0.5, 0.25))")
    decode = type(handle)._decode

    def forgetful(self, input_ids, attention_mask, position_ids, cache):
        if input_ids.shape[1] > 1:
            for seg in self._sessions[cache].segments:
                seg.shift = torch.zeros_like(seg.shift)
        return decode(self, input_ids, attention_mask, position_ids, cache)

    monkeypatch.setattr(type(handle), "_decode", forgetful)
    conv = converse(model, handle, inputs)
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="differ"):
        check_conversation(model, handle, inputs, conv)


def test_continuing_at_the_pruned_length_is_refused_and_fails_the_check(monkeypatch):
    # A vision-stage cut leaves layer 0's cache shorter than the tokens it stands for: slicing there re-feeds
    # part of the history. The runtime checks refuse it; with them off, the equivalence check rejects it.
    model, inputs, handle = setup("llava", "divprune(keep_ratio=0.5)")
    monkeypatch.setattr(type(handle), "_continue_conversation", _hf_bookkeeping)
    with pytest.raises(InputError, match="attention_mask has .* columns, but this pruned cache stands for"):
        converse(model, handle, inputs)
    model, inputs, handle = setup("llava", "divprune(keep_ratio=0.5)")
    monkeypatch.setattr(loop_module, "check_mask_width", lambda *args: None)
    monkeypatch.setattr(loop_module, "check_positions_follow", lambda *args: None)
    monkeypatch.setattr(loop_module, "check_no_visual_tokens", lambda *args: None)  # it re-feeds image tokens
    conv = converse(model, handle, inputs)
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="differ"):
        check_conversation(model, handle, inputs, conv)


# -- bad input ---------------------------------------------------------------------------------------------------


def turn_one(family="llava", spec="fastv(layer=2, keep_ratio=0.5)", seed=None):
    model, inputs, handle = setup(family, spec, seed=seed)
    cache = new_cache(model)
    out = model.generate(**inputs, **cached(model, cache), max_new_tokens=3, do_sample=False, pad_token_id=VOCAB.pad)
    new = _tiny.left_padded([question_ids((11, 12)), question_ids((13,))])
    turn = {
        **inputs,
        "input_ids": torch.cat([out, new["input_ids"]], 1),
        "attention_mask": torch.cat(
            [inputs["attention_mask"], torch.ones_like(out[:, inputs["input_ids"].shape[1] :]), new["attention_mask"]],
            1,
        ),
    }
    if "mm_token_type_ids" in inputs:
        turn["mm_token_type_ids"] = image_types(turn["input_ids"], model)
    return model, handle, cache, turn


def later(model, cache, turn, **changes):
    return model.generate(**{**turn, **changes}, **cached(model, cache), max_new_tokens=2, pad_token_id=VOCAB.pad)


def test_a_cache_from_another_model_or_patch_is_refused():
    model, handle, cache, turn = turn_one()
    other, _, other_handle = setup("llava", "fastv(layer=2, keep_ratio=0.5)", seed=1)
    with pytest.raises(UnsupportedModelError, match="not filled by this patched model's prefill"):
        later(other, cache, turn)
    handle.remove()  # the same model, patched again with another spec
    tokprune.patch(model, "divprune(keep_ratio=0.5)", question_end=VOCAB.assistant_marker)
    with pytest.raises(UnsupportedModelError, match="from another tokprune.patch of this one"):
        later(model, cache, turn)
    model, handle, _, turn = turn_one()  # a cache the unpatched model filled
    handle.remove()
    cache = DynamicCache(config=model.config.get_text_config())
    model.generate(**turn, **cached(model, cache), max_new_tokens=1, pad_token_id=VOCAB.pad)
    tokprune.patch(model, "fastv(layer=2, keep_ratio=0.5)", question_end=VOCAB.assistant_marker)
    with pytest.raises(UnsupportedModelError, match="or from the unpatched model"):
        model(input_ids=turn["input_ids"][:, -1:], **cached(model, cache))


@pytest.mark.parametrize("family", FAMILIES)
def test_another_image_in_a_later_turn_is_refused(family):
    model, handle, cache, turn = turn_one(family, "divprune(keep_ratio=0.5)")
    with pytest.raises(InputError, match="pixel_values differs from the one this pruned cache was filled with"):
        later(model, cache, turn, pixel_values=turn["pixel_values"].flip(0))
    # a new image placeholder among the new tokens
    ids = turn["input_ids"].clone()
    ids[:, -3] = VOCAB.image
    with pytest.raises(UnsupportedModelError, match="the new turn brings an image or a video"):
        later(
            model,
            cache,
            turn,
            input_ids=ids,
            **({"mm_token_type_ids": image_types(ids, model)} if family != "llava" else {}),
        )
    # nothing was consumed by the refusals: the same turn then runs
    assert later(model, cache, turn).shape[1] == turn["input_ids"].shape[1] + 2


def test_a_history_that_is_not_the_cached_one_is_refused():
    model, handle, cache, turn = turn_one()
    ids = turn["input_ids"].clone()
    ids[1, -8] = 50  # an answer token re-tokenized differently
    with pytest.raises(InputError, match=r"sample 1 differs at column \d+"):
        later(model, cache, turn, input_ids=ids)
    with pytest.raises(InputError, match="but the pruned cache already holds"):
        later(model, cache, turn, input_ids=turn["input_ids"][:, :10], attention_mask=turn["attention_mask"][:, :10])
    with pytest.raises(InputError, match="attention_mask has .* columns and input_ids"):
        later(model, cache, turn, attention_mask=turn["attention_mask"][:, 1:])
    with pytest.raises(InputError, match="attention_mask has .* columns, but this pruned cache stands for"):
        model(input_ids=turn["input_ids"], attention_mask=turn["attention_mask"], **cached(model, cache))


def test_stale_m_rope_offsets_are_refused_not_used():
    # Qwen's generate() adds the M-RoPE offset the model kept from its last prompt: another conversation's
    # turn one in between replaces it, and the positions of the new tokens would be shifted
    model, handle, cache, turn = turn_one("qwen2_5_vl", "divprune(keep_ratio=0.5)")
    _, make_inputs = tiny_qwen2_5_vl()
    model.generate(**make_inputs((9, 2), seeds=(5, 6)), max_new_tokens=1, pad_token_id=VOCAB.pad)
    with pytest.raises(InputError, match="positions must continue the cache"):
        later(model, cache, turn)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_the_new_tokens_only_form_equals_the_whole_conversation(family):
    # HF's other form: input_ids are only the new tokens, the attention mask (and Qwen's token types, as a
    # processor returns them) cover the history too
    model, handle, cache, turn = turn_one(family, "divprune(keep_ratio=0.5)")
    width = cache.get_seq_length()
    whole = later(model, cache, turn)
    model, handle, cache, turn = turn_one(family, "divprune(keep_ratio=0.5)")
    seen = turn["input_ids"].shape[1] - 7  # the cache lacks turn one's last answer token, then the new question
    new_only = later(model, cache, turn, input_ids=turn["input_ids"][:, seen:])
    assert width > 0 and torch.equal(new_only, whole[:, seen:])


# -- the documented example -----------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "concepts.md"


def test_the_documented_conversation_runs_and_equals_the_reference(capsys):
    # docs/concepts.md "Conversations", run as written on the embedded trained model; then its three answers
    # checked against the reference (one no-cache forward of the conversation with turn one's prompt as prompt)
    block = re.search(r"## Conversations.*?```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert block is not None
    namespace: dict = {}
    exec(compile(block.group(1), str(DOC), "exec"), namespace)  # noqa: S102 (our own docs)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and all("->" in line for line in printed)
    model, handle, out, inputs = namespace["model"], namespace["handle"], namespace["out"], namespace["inputs"]
    tokenizer = namespace["processor"].tokenizer
    prompt_len = inputs["input_ids"].shape[1]
    seq = out[:, :-1]
    ref = reference_logits(
        model,
        handle,
        {"input_ids": seq, "attention_mask": torch.ones_like(seq), "pixel_values": inputs["pixel_values"]},
        prompt_len,
    )[0].argmax(-1)
    # every answer token (from each ASSISTANT: marker to its </s>) is the reference's greedy choice
    marker = tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]
    tokens = out[0].tolist()
    starts = [i + len(marker) for i in range(len(tokens)) if tokens[i : i + len(marker)] == marker]
    assert len(starts) == 3
    for start in starts:
        end = tokens.index(tokenizer.eos_token_id, start) + 1
        assert ref[start - 1 : end - 1].tolist() == tokens[start:end], tokenizer.decode(tokens[start:end])


def test_a_forward_continues_a_pruned_cache_as_generate_does():
    # model(...) with only the new tokens, the mask over the history and them, and positions from the mask
    model, handle, cache, turn = turn_one()
    scores = model.generate(
        **turn, **cached(model, cache), max_new_tokens=1, output_logits=True, return_dict_in_generate=True
    ).logits[0]
    model, handle, cache, turn = turn_one()
    seen = turn["input_ids"].shape[1] - 7  # the cache lacks turn one's last answer token, then the new question
    positions = (turn["attention_mask"].cumsum(-1) - 1).clamp(min=0)[:, seen:]
    with torch.no_grad():
        out = model(
            input_ids=turn["input_ids"][:, seen:],
            attention_mask=turn["attention_mask"],
            position_ids=positions,
            **cached(model, cache),
        )
    assert (out.logits[:, -1] - scores).abs().max().item() <= ATOL


def test_a_copied_cache_branches_the_conversation():
    # two later turns from one history: handle.copy_cache keeps what the patch knows; copy.deepcopy does not
    model, handle, cache, turn = turn_one()
    branch = handle.copy_cache(cache)
    other = {**turn, "input_ids": turn["input_ids"].clone()}
    other["input_ids"][:, -3] = 60  # another question on the branch
    on_branch = later(model, branch, other)
    on_cache = later(model, cache, turn)
    model, handle, cache, turn = turn_one()
    assert torch.equal(on_cache, later(model, cache, turn))  # the branch left the original as it was
    model, handle, cache, turn = turn_one()
    assert torch.equal(on_branch, later(model, cache, other))
    with pytest.raises(UnsupportedModelError, match=r"handle.copy_cache\(cache\), not copy.deepcopy"):
        later(model, copy.deepcopy(handle.copy_cache(cache)), turn)


def test_a_later_turn_needs_the_cache_and_one_sequence_per_prompt():
    model, handle, cache, turn = turn_one()
    for bad in ({"use_cache": False}, {"num_return_sequences": 2, "do_sample": True}):
        with pytest.raises(UnsupportedModelError, match="continuing a pruned cache"):
            later(model, cache, turn, **bad)


def test_another_video_or_a_new_video_in_a_later_turn_is_refused():
    model = FAMILIES["qwen2_5_vl"](seed=0)[0]
    tokprune.patch(model, "evs(keep_ratio=0.5)", question_end=VOCAB.assistant_marker)
    inputs = video_inputs(model, [default_items(0, "v"), default_items(1, "v")], question_lengths=(5, 3))
    cache = DynamicCache(config=model.config.get_text_config())
    out = model.generate(**inputs, **cached(model, cache), max_new_tokens=2, pad_token_id=VOCAB.pad)
    new = _tiny.left_padded([question_ids((11, 12)), question_ids((13,))])
    ids = torch.cat([out, new["input_ids"]], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(out[:, inputs["input_ids"].shape[1] :])], 1)
    turn = {**inputs, "input_ids": ids, "attention_mask": torch.cat([mask, new["attention_mask"]], 1)}
    turn["mm_token_type_ids"] = image_types(ids, model)
    with pytest.raises(InputError, match="pixel_values_videos differs from the one this pruned cache"):
        later(model, cache, turn, pixel_values_videos=inputs["pixel_values_videos"] + 1)
    video = ids.clone()
    video[:, -3] = model.config.video_token_id
    with pytest.raises(UnsupportedModelError, match="the new turn brings an image or a video"):
        later(model, cache, turn, input_ids=video, mm_token_type_ids=image_types(video, model))
    assert later(model, cache, turn).shape[1] == ids.shape[1] + 2  # the turn as given then runs
