"""LLM-stage built-ins against re-implementations of their authors' selection rules, on tiny LLaVAs.

The reference side runs each sample alone, unpadded, positions ``0..L-1``, through the unpatched eager
model (``output_attentions``, ``output_hidden_states``, hooked ``k_proj``), as the authors' code runs one
sample; the strategy's default spec runs on a left-padded ragged batch (padding 27, 16, 0) called without
``position_ids``, so a rule that read padding-shifted positions would show here too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference._harness import Case, Tally, cases, kept_by_strategy, kept_image_ranks, rope, topk_margin

from tokprune import hf_compat as hf
from tokprune.testing.models import VOCAB


def _run(method: str, spec: str, reference, kept=kept_image_ranks) -> Tally:
    tally = Tally(method)
    for model, make_inputs, solo in cases():
        ours = kept_by_strategy(model, make_inputs, spec)
        for case in solo:
            expected, margin = reference(case)
            tally.check(kept(ours[case.index]), expected, margin, f"seed {case.seed} sample {case.index}")
    tally.report()
    assert tally.cases == 12 and tally.equal >= tally.cases - 2, "near-ties may excuse a difference, not many"
    return tally


def keys(case: Case, layer: int) -> torch.Tensor:
    """Layer ``layer``'s keys with RoPE at positions 0..L-1 (the cached keys), ``[1, Hkv, L, hd]``."""
    lm = case.model.model.language_model
    attn = lm.layers[layer].self_attn
    k = case.lm_k[layer]
    k = k.view(1, k.shape[1], -1, attn.head_dim).transpose(1, 2)
    return rope(k, case.model, torch.arange(k.shape[2])[None])


# ---------------------------------------------------------------------------------------------------
# FastV: pkunlp-icler/FastV @ d1659729b5bf1be225e99ee15783deeea80f63b1
# src/transformers/src/transformers/models/llama/modeling_llama.py L736-756: at layer K, layer K-1's attention
# (layer_outputs[1]) averaged over heads, the last token's row, on the image span, top ATTENTION_RANK;
# position_ids = keep_indexs (original ids kept).
# ---------------------------------------------------------------------------------------------------


def fastv_reference(case: Case, k: int = 2, keep_ratio: float = 0.5) -> tuple[list[int], float]:
    start, end = case.image_span
    row = case.attentions[k - 1][0].mean(dim=0)[-1][start:end]
    rank = round((end - start) * keep_ratio)
    return sorted(row.topk(rank).indices.tolist()), topk_margin(row, rank)


def test_fastv():
    _run("fastv", "fastv", fastv_reference)


# ---------------------------------------------------------------------------------------------------
# DART: ZichenWen1/DART as snapshotted in xqy1111111/DART @ 0247657060a42dd329d6f273455bfad05d5b2c74
# llava/model/language_model/modeling_llama_self.py L18-74 (get_retained_image_token) and L197-214 (the call:
# last_layer_state = self.norm(layer_outputs[0]) at L200-201, K_states = the layer's cached keys at L202).
# max_num_trunction=16 with 4 + 4 pivots keeps 4 + 8 * (16 // 8) = 20 image tokens: ours dart(keep=20).
# ---------------------------------------------------------------------------------------------------


def dart_reference(case: Case, k: int = 2, max_num_trunction: int = 16, set_order: bool = True):
    pivot_image, pivot_text = 4, 4
    token_topk = int(max_num_trunction // (pivot_image + pivot_text))
    lm = case.model.model.language_model
    with torch.no_grad():
        last_layer_state = lm.norm(case.hidden[k])
    k_states = keys(case, k - 1)
    k_states = k_states.permute(0, 2, 1, 3).reshape(1, k_states.shape[2], -1)
    start, end = case.image_span
    length = end - start
    image_norms = torch.norm(k_states[0][start:end], p=1, dim=-1)
    query_norms = torch.norm(k_states[0][end:], p=1, dim=-1)
    image_indices = (image_norms.topk(pivot_image).indices + start).tolist()
    query_indices = (query_norms.topk(pivot_text).indices + end).tolist()
    margin = min(topk_margin(image_norms, pivot_image), topk_margin(query_norms, pivot_text))
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, end)) - set(image_indices)
    walk = list(indices_set.copy()) if set_order else sorted(indices_set)  # L51-53; sorted: pivot_order=position
    for item in walk:
        valid_list = list(valid_indices)
        cos = -torch.nn.functional.cosine_similarity(last_layer_state[0][item], last_layer_state[0][valid_list], dim=-1)
        margin = min(margin, topk_margin(cos, token_topk))
        picked = [valid_list[i] for i in cos.topk(token_topk).indices.tolist()]
        indices_set.update(picked)
        valid_indices.difference_update(picked)
    indices_set.difference_update(query_indices)
    assert len(indices_set) == pivot_image + len(walk) * token_topk and length >= len(indices_set)
    return sorted(i - start for i in indices_set), margin


def test_dart():
    _run("dart", "dart(keep=20)", dart_reference)


def test_dart_pivot_order_position():
    """pivot_order=position walks the pivots in sequence order: the reference's rule with sorted(set)."""
    _run(
        "dart(pivot_order=position)",
        "dart(keep=20, pivot_order=position)",
        lambda c: dart_reference(c, set_order=False),
    )


@pytest.mark.parametrize("spec", ["dart(keep=20, norm=raw)", "dart(keep=20, pivot_order=position)"])
def test_dart_switches_select_something_else(spec):
    """norm=raw (no final norm; the harness gives the models a non-unit norm weight) and the sequence-order
    walk are real switches: their kept sets differ from the reference's somewhere."""
    differ = 0
    for model, make_inputs, solo in cases(seeds=(0, 1)):
        ours = kept_by_strategy(model, make_inputs, spec)
        differ += sum(kept_image_ranks(ours[c.index]) != dart_reference(c)[0] for c in solo)
    assert differ > 0


# ---------------------------------------------------------------------------------------------------
# PyramidDrop: Cooperx521/PyramidDrop @ 6444f304aee4b7edcb022839fb9e8cd07859704a
# llava/model/modeling_llama_pdrop.py L1220-1238 (rank before layer_idx + 1 in layer_list), L1320-1342 (layer
# K_s's own input_layernorm, q_proj, k_proj, RoPE on the states entering K_s), L1389-1407 (the last instruction
# token's softmax row, head mean, image span, top int(n_0 * r_{s+1}), sorted), L1445-1446 (positions
# renumbered 0..len-1); llava/eval/model_vqa_loader.py L94-96 (ratio list with a leading 1.0). The tiny models
# have grouped-query heads: keys are repeated per query head, as Llama's attention does (LLaVA-7B has none).
# ---------------------------------------------------------------------------------------------------

SCHEDULE = ((1, 2, 3), (0.5, 0.25, 0.125))


def pyramiddrop_reference(case: Case, layers=SCHEDULE[0], ratios=SCHEDULE[1]) -> tuple[list[int], float]:
    lm = case.model.model.language_model
    h = case.hidden[0]
    length = h.shape[1]
    image = case.ids == VOCAB.image
    origin = torch.arange(length)
    n0 = int(image.sum())
    ratio_list = [1.0, *ratios]
    margin = math.inf
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i in layers:
                stage = layers.index(i)
                pos = torch.arange(h.shape[1])[None]
                q, k = hf.layer_qk(layer, h)  # input_layernorm, q_proj, k_proj (L1323-1337)
                q, k = rope(q, case.model, pos), rope(k, case.model, pos)
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                weights = torch.softmax((q[0, :, -1:] @ k[0].transpose(1, 2)) / math.sqrt(q.shape[-1]), dim=-1)
                start = int(image.nonzero()[0])
                count = int(n0 * ratio_list[stage])
                avg = weights.mean(dim=0).mean(dim=0)[start : start + count]
                keep_length = int(n0 * ratio_list[stage + 1])
                margin = min(margin, topk_margin(avg, keep_length))
                top = avg.topk(keep_length).indices.sort().values + start
                index = torch.cat([torch.arange(start), top, torch.arange(start + count, h.shape[1])])
                h, origin, image = h[:, index], origin[index], image[index]
            pos = torch.arange(h.shape[1])[None]  # renumbered contiguously after every stage
            mask = hf.attention_mask(torch.ones(1, h.shape[1], dtype=torch.bool), h.shape[1], h.dtype, "eager", True)
            h = hf.call_decoder_layer(
                layer, h, mask=mask, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos), cache=None
            )
    first = int((case.ids == VOCAB.image).nonzero()[0])
    return sorted((origin[image] - first).tolist()), margin


def test_pyramiddrop():
    layers, ratios = SCHEDULE
    _run("pyramiddrop", f"pyramiddrop(layer={layers}, keep_ratio={ratios})", pyramiddrop_reference)


# ---------------------------------------------------------------------------------------------------
# text_interact: the seed paper's stage 2 (arXiv 2409.01162; no public code) as docs/reference-method.md
# reads it: at layer K=2, the question tokens' and the last token's head-mean attention of layer K-1, each
# position averaged over the queries that see it; candidates = image + question tokens, cut at the kneed
# knee (convex, decreasing, S=1, offline) of their descending scores, count = knee + 1 clamped to
# [min(16, n), n], no knee -> keep all. Compared over every position (question tokens may go too).
# ---------------------------------------------------------------------------------------------------


def text_interact_reference(case: Case, k: int = 2) -> tuple[list[int], float]:
    from kneed import KneeLocator

    a = case.attentions[k - 1][0].mean(dim=0).double()  # [L, L]
    length = a.shape[0]
    start, end = case.image_span
    marker = length - len(VOCAB.assistant_marker)
    question = list(range(end, marker))
    queries = [*question, length - 1]
    rows = a[queries]  # [Q, L]
    seen = torch.tensor(queries)[:, None] >= torch.arange(length)[None, :]
    scores = (rows * seen).sum(dim=0) / seen.sum(dim=0).clamp_min(1)
    candidates = list(range(start, end)) + question
    cand = scores[candidates]
    n = len(candidates)
    curve = cand.sort(descending=True).values.numpy()
    knee = KneeLocator(np.arange(n), curve, S=1.0, curve="convex", direction="decreasing", online=False).knee
    count = knee + 1 if knee is not None else n
    count = min(max(count, min(16, n)), n)
    kept = {candidates[i] for i in cand.topk(count).indices.tolist()}
    kept |= set(range(length)) - set(candidates)
    return sorted(kept), topk_margin(cand, count)


def test_text_interact():
    def kept_positions(per_call):
        ((keep, _, valid),) = per_call
        return keep[valid].nonzero().flatten().tolist()

    _run("text_interact", "text_interact", text_interact_reference, kept=kept_positions)


@pytest.mark.parametrize("switch", ["scores=previous", "positions=keep"])
def test_pyramiddrop_switches_select_something_else(switch):
    """The old defaults (layer K_s - 1's q/k; original position ids) keep other sets than the reference."""
    layers, ratios = SCHEDULE
    spec = f"pyramiddrop(layer={layers}, keep_ratio={ratios}, {switch})"
    differ = 0
    for model, make_inputs, solo in cases(seeds=(0, 1)):
        ours = kept_by_strategy(model, make_inputs, spec)
        differ += sum(kept_image_ranks(ours[c.index]) != pyramiddrop_reference(c)[0] for c in solo)
    assert differ > 0
