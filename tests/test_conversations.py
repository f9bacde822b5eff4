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
question>, attention_mask=..., past_key_values=cache)``, a ragged batch of two conversations whose
questions differ in length at every turn (left padding in turn one, padding in the middle after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

import tokprune
from tokprune.adapters import _tiny
from tokprune.adapters.call import IMAGE_INPUTS, CallState, GenerateCall
from tokprune.adapters.llava import tiny_llava
from tokprune.adapters.qwen2_5_vl import tiny_qwen2_5_vl
from tokprune.testing.models import tiny_text_encoder

VOCAB = _tiny.VOCAB
FAMILIES = {"llava": tiny_llava, "qwen2_5_vl": tiny_qwen2_5_vl}
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


def setup(family: str, spec: str, seed: int = 0):
    model, make_inputs = FAMILIES[family](seed=seed)
    options = {"question_end": VOCAB.assistant_marker}
    if spec.startswith("cdpruner"):
        options["text_encoder"] = tiny_text_encoder()
    handle = tokprune.patch(model, spec, **options)
    return model, make_inputs((5, 3)), handle


def image_types(ids: torch.Tensor) -> torch.Tensor:
    return (ids == VOCAB.image).int()


def converse(model, handle, inputs, turns=LATER_QUESTIONS, cache=None, images_again=True) -> Conversation:
    """Turn one, then each later turn appended to the returned sequences, on one cache; ``images_again``: the
    later turns pass the image inputs again (as a processor run on the whole conversation returns them; the
    stock model refuses them, a patched one checks that they are the same)."""
    cache = DynamicCache(config=model.config.get_text_config()) if cache is None else cache
    common = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": VOCAB.pad}
    scored = {"output_logits": True, "return_dict_in_generate": True}
    out = model.generate(**inputs, past_key_values=cache, **common, **scored)
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
            extra["mm_token_type_ids"] = image_types(ids)
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **extra, **common, **scored)
        assert torch.equal(out.sequences[:, : ids.shape[1]], ids), "the returned sequences begin with the conversation"
        sequences = out.sequences
        mask = torch.cat([mask, torch.ones_like(sequences[:, ids.shape[1] :])], 1)
        logits.append(torch.stack(out.logits, 1))
        ends.append(mask.sum(1))
    return Conversation(sequences, mask, logits, inputs["attention_mask"].sum(1), ends, stats)


def sample_inputs(inputs, conv: Conversation, i: int, upto: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sample ``i``'s whole conversation alone, without padding, up to its ``upto`` first tokens."""
    valid = conv.mask[i].bool()
    ids = conv.sequences[i, valid][None, :upto]
    one = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        sizes = grid.prod(-1).tolist()
        start = sum(sizes[:i])
        one.update(
            pixel_values=inputs["pixel_values"][start : start + sizes[i]],
            image_grid_thw=grid[i : i + 1],
            mm_token_type_ids=image_types(ids),
        )
    else:
        one["pixel_values"] = inputs["pixel_values"][i : i + 1]
    return one


def reference_logits(model, handle, inputs: dict[str, torch.Tensor], prompt_len: int) -> torch.Tensor:
    """The reference (module docstring): one no-cache forward of a whole conversation whose prompt is turn
    one's first ``prompt_len`` tokens; every later token is kept at every layer. Logits ``[1, T, V]``."""
    call = CallState(handle, GenerateCall(prompt_len=prompt_len, use_cache=False))
    with torch.no_grad(), handle._active(call):
        return model(**inputs, use_cache=False).logits


def check_conversation(model, handle, inputs, conv: Conversation) -> None:
    """Every turn's scores and greedy tokens equal the reference's, sample by sample, and the reference
    kept what turn one kept."""
    for i in range(conv.sequences.shape[0]):
        end = int(conv.ends[-1][i])
        one = sample_inputs(inputs, conv, i, end - 1)  # the last token is predicted, never fed
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
        n = int(first.kept.tokens[i])
        assert torch.equal(ref_stats.kept.vision[0, :n], first.kept.vision[i, :n]), f"sample {i}: other image tokens"
        for layer, count in first.llm_kept.items():
            assert int(ref_stats.llm_kept[layer][0]) == int(count[i]), f"layer {layer}: another cut than turn one's"
            same = torch.equal(ref_stats.kept.layers[layer][0, :n], first.kept.layers[layer][i, :n])
            assert same, f"sample {i}, layer {layer}: other image tokens than turn one's"


@pytest.mark.parametrize("family, spec", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_later_turns_equal_the_conversation_rerun_with_turn_one_kept(family, spec):
    model, inputs, handle = setup(family, spec)
    conv = converse(model, handle, inputs)
    assert conv.stats.visual_kept.sum() < conv.stats.visual_unpruned.sum() or conv.stats.llm_kept
    check_conversation(model, handle, inputs, conv)


def test_a_keep_all_patch_continues_a_conversation_as_the_stock_model_does():
    # the bookkeeping the continuation relies on (positions from the mask, Qwen's M-RoPE offset) is HF's own
    for family in FAMILIES:
        model, make_inputs = FAMILIES[family](seed=1)
        inputs = make_inputs((5, 3))
        with torch.no_grad():
            stock = converse(model, None, inputs, images_again=False)
        with tokprune.pruned(model, "divprune(keep_ratio=1.0)", question_end=VOCAB.assistant_marker) as handle:
            patched = converse(model, handle, inputs, images_again=False)
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
