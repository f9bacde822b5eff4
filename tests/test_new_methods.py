"""DART, DivPrune, PyramidDrop, VisPruner and CDPruner against transliterations of their reference code.

Each ``*_reference`` function below follows the reference repository's function line by line for one
sample (batch size 1, as the references assume), with only the inputs swapped for our fabricated ones;
the strategy, run batched, must keep exactly the same tokens for every sample.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokprune import LLMAttention, LLMContext, Signal, TokenRole, VisionContext, VisionSignals, strategies

B, N, C, HEADS = 3, 36, 16, 2


def strategy(spec: str):
    return strategies.get(spec)[0]


def vision_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    q = torch.randn(B, 1 + N, C, generator=gen, dtype=torch.float64)
    k = torch.randn(B, 1 + N, C, generator=gen, dtype=torch.float64)
    return features, q, k


def vision_ctx(features, q, k) -> VisionContext:
    def fetch(signal: Signal):
        return q, k

    return VisionContext(features=features, signals=VisionSignals(fetch, num_layers=24, num_heads=HEADS))


def head_mean_cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``attentions[:, :, 0, 1:].mean(heads)`` of one encoder layer, written out, ``[N]`` for one sample."""
    d = C // HEADS
    rows = []
    for h in range(HEADS):
        logits = (q[0, h * d : (h + 1) * d] @ k[:, h * d : (h + 1) * d].T) / math.sqrt(d)
        rows.append(torch.softmax(logits, dim=-1)[1:])
    return torch.stack(rows).mean(dim=0)


# ---------------------------------------------------------------------------------------------
# DivPrune: vbdi/divprune LLaVA/llava/model/llava_arch.py L147-171
# ---------------------------------------------------------------------------------------------


def divprune_reference(visual_feature_vectors: torch.Tensor, threshold_ratio: float) -> torch.Tensor:
    image_feature_length = visual_feature_vectors.shape[0]
    threshold_terms = int(round(threshold_ratio * image_feature_length))
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            m2 = torch.index_select(cosine_matrix, 0, s[:i])
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s.sort().values


@pytest.mark.parametrize("ratio", [0.098, 0.25, 0.6])
def test_divprune_matches_the_reference(ratio):
    features, q, k = vision_batch(0)
    plan = strategy(f"divprune(keep_ratio={ratio})")(vision_ctx(features, q, k))
    for b in range(B):
        assert plan.keep[b].nonzero().flatten().tolist() == divprune_reference(features[b], ratio).tolist()


# ---------------------------------------------------------------------------------------------
# VisPruner: Theia-4869/VisPruner llava/model/llava_arch.py L141-187
# ---------------------------------------------------------------------------------------------


def vispruner_reference(image_features, image_attentions, visual_token_num, important_ratio):
    image_features, image_attentions = image_features[None], image_attentions[None]
    bsz, n, _ = image_features.shape
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    token_indices = image_attentions.argsort(dim=-1, descending=True, stable=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        r_all = residual_indices.shape[1]
        r = min(8, r_all - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(bsz).unsqueeze(-1).expand(-1, r_all), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True, stable=True)[:, r:]
        residual_indices = torch.cat(
            [
                residual_indices[..., ::2][
                    torch.arange(bsz).unsqueeze(-1).expand(-1, r_all // 2 - r), distinct_indices
                ],
                residual_indices[..., 1::2],
            ],
            dim=-1,
        )
    selected = torch.cat([important_indices, residual_indices], dim=-1) if diverse_token_num > 0 else important_indices
    mask = torch.zeros(bsz, n, dtype=torch.bool)
    mask.scatter_(1, selected, True)
    return mask[0]


@pytest.mark.parametrize(("keep", "important_ratio"), [(9, 0.5), (16, 0.25), (20, 0.5), (6, 1.0)])
def test_vispruner_matches_the_reference(keep, important_ratio):
    # N - int(keep * r) even: the reference crashes on an odd residual count (documented deviation)
    features, q, k = vision_batch(1)
    plan = strategy(f"vispruner(keep={keep}, important_ratio={important_ratio})")(vision_ctx(features, q, k))
    for b in range(B):
        expected = vispruner_reference(features[b], head_mean_cls_attention(q[b], k[b]), keep, important_ratio)
        assert torch.equal(plan.keep[b], expected)
    assert plan.keep.sum(dim=1).tolist() == [keep] * B


def test_vispruner_handles_an_odd_residual():
    features, q, k = vision_batch(2)
    plan = strategy("vispruner(keep=9, important_ratio=0.34)")(vision_ctx(features, q, k))  # residual 33
    assert plan.keep.sum(dim=1).tolist() == [9] * B


# ---------------------------------------------------------------------------------------------
# CDPruner: Theia-4869/CDPruner llava/model/llava_arch.py L141-187
# ---------------------------------------------------------------------------------------------


def cdpruner_reference(image_features, relevance, visual_token_num):
    image_features, relevance = image_features[None], relevance[None]
    bsz, n, _ = image_features.shape
    image_normalized = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, bsz, n))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, bsz), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (
            kernel[torch.arange(bsz), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(bsz), j], cis[:i])
        ) / torch.sqrt(di2s[torch.arange(bsz), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(bsz), j] = -float("inf")
    return torch.sort(select_idx.t()).values[0]


@pytest.mark.parametrize("keep", [4, 9, 16])
def test_cdpruner_matches_the_reference_given_the_same_relevance(keep):
    features, q, k = vision_batch(3)
    features, q, k = features.float(), q.float(), k.float()
    plan = strategy(f"cdpruner(keep={keep})")(vision_ctx(features, q, k))
    for b in range(B):
        expected = cdpruner_reference(features[b], head_mean_cls_attention(q[b], k[b]), keep)
        assert plan.keep[b].nonzero().flatten().tolist() == expected.tolist()


def test_cdpruner_uniform_relevance_is_the_plain_dpp():
    from test_diversity import dpp_loop

    from tokprune.scoring import pairwise_cosine

    features, q, k = vision_batch(4)
    plan = strategy("cdpruner(keep=8, relevance=uniform)")(vision_ctx(features, q, k))
    similarity = pairwise_cosine(features)  # the kernel itself, its unit diagonal exact (a tie to the lowest index)
    similarity.diagonal(dim1=1, dim2=2).fill_(1.0)
    for b in range(B):
        assert plan.keep[b].nonzero().flatten().tolist() == sorted(dpp_loop(similarity[b], 8))


# ---------------------------------------------------------------------------------------------
# LLM stage: a LLaVA-layout sequence  <template x2> <image x n> <question x m> <template x2> <protected>
# ---------------------------------------------------------------------------------------------


def llm_ctx(seed: int, n_image: int = 24, n_question: int = 6, heads: int = 2, head_dim: int = 8, layer: int = 2):
    gen = torch.Generator().manual_seed(seed)
    blocks = [
        (TokenRole.TEMPLATE, 2),
        (TokenRole.IMAGE, n_image),
        (TokenRole.QUESTION, n_question),
        (TokenRole.TEMPLATE, 2),
        (TokenRole.PROTECTED, 1),
    ]
    roles = torch.cat([torch.full((c,), int(r)) for r, c in blocks])[None].repeat(B, 1)
    length = roles.shape[1]
    hidden = torch.randn(B, length, 12, generator=gen, dtype=torch.float64)
    q = torch.randn(B, heads, length, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(B, heads, length, head_dim, generator=gen, dtype=torch.float64)
    valid = torch.ones(B, length, dtype=torch.bool)
    attention = LLMAttention(q, k, valid)  # also layer K's own rows here (pyramiddrop's scores=own)
    return LLMContext(layer=layer, roles=roles, hidden=hidden, attention=attention, layer_attention=lambda: attention)


# DART: xqy1111111/DART (fork of ZichenWen1/DART) modeling_llama_self.py L20-74


def dart_reference(last_layer_state, k_states, start, length, max_num_trunction, pivot_image=4, pivot_text=4):
    token_topk = int(max_num_trunction // (pivot_image + pivot_text))
    k_states = k_states.permute(0, 2, 1, 3).reshape(k_states.shape[0], k_states.shape[2], -1)
    k_image = k_states[0][start : start + length, :]
    k_query = k_states[0][start + length :, :]
    image_indices = (torch.norm(k_image, p=1, dim=-1).topk(pivot_image).indices + start).tolist()
    query_indices = (torch.norm(k_query, p=1, dim=-1).topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length))
    valid_indices.difference_update(image_indices)
    for item in sorted(indices_set):  # the reference iterates the set; ours: pivot_order=position
        valid_indices_list = list(valid_indices)
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_real_indices = [valid_indices_list[i] for i in cos_sim.topk(token_topk).indices.tolist()]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


@pytest.mark.parametrize("max_num_trunction", [8, 16])
def test_dart_matches_the_reference(max_num_trunction):
    ctx = llm_ctx(5)
    keep = 4 + 8 * (max_num_trunction // 8)  # the reference keeps its 4 image pivots on top of its budget
    plan = strategy(f"dart(keep={keep}, pivot_order=position)")(ctx)  # the transliteration walks sorted(set)
    image = ctx.role_mask(TokenRole.IMAGE)
    for b in range(B):
        expected = dart_reference(ctx.hidden[b : b + 1], ctx.attention.k[b : b + 1], 2, 24, max_num_trunction)
        assert (plan.keep[b] & image[b]).nonzero().flatten().tolist() == expected
        assert plan.keep[b][~image[b]].all()


def test_dart_merge_folds_dropped_tokens_into_their_nearest_kept_token():
    ctx = llm_ctx(6)
    plain = strategy("dart(keep=8)")(ctx)
    merged = strategy("dart(keep=8, merge=true)")(ctx)
    assert torch.equal(plain.keep, merged.keep)
    image = ctx.role_mask(TokenRole.IMAGE)
    h = ctx.hidden / ctx.hidden.norm(dim=-1, keepdim=True)
    for b in range(B):
        kept = (plain.keep[b] & image[b]).nonzero().flatten().tolist()
        dropped = (~plain.keep[b] & image[b]).nonzero().flatten().tolist()
        groups = {i: [i] for i in kept}
        for j in dropped:
            groups[max(kept, key=lambda i: float(h[b, i] @ h[b, j]))].append(j)
        for i, members in groups.items():
            assert torch.allclose(merged.hidden[b, i], ctx.hidden[b, members].mean(dim=0))


# PyramidDrop: Cooperx521/PyramidDrop modeling_llama_pdrop.py L1342-1376 (inference: the last instruction token)


def pyramiddrop_reference(q, k, image_index, image_tokens, keep_length):
    head_dim = q.shape[-1]
    text_query_states = q[:, -1, :].unsqueeze(1)  # (heads, 1, D): prompt_total_len - 1
    attn_weights = torch.matmul(text_query_states, k.transpose(1, 2)) / math.sqrt(head_dim)
    attn_weights = torch.softmax(attn_weights, dim=-1, dtype=torch.float32)  # the last row sees every key
    attention_avg_head = torch.mean(attn_weights, dim=0)[:, image_index : image_index + image_tokens]
    attention_avg_text = torch.mean(attention_avg_head, dim=0)
    return (attention_avg_text.topk(keep_length).indices + image_index).sort().values


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.3])
def test_pyramiddrop_first_stage_matches_the_reference(ratio):
    ctx = llm_ctx(7, layer=2)
    plan = strategy(f"pyramiddrop(layer=(2, 3), keep_ratio=({ratio}, 0.1))")(ctx)
    image = ctx.role_mask(TokenRole.IMAGE)
    for b in range(B):
        expected = pyramiddrop_reference(ctx.attention.q[b], ctx.attention.k[b], 2, 24, int(24 * ratio))
        assert (plan.keep[b] & image[b]).nonzero().flatten().tolist() == expected.tolist()


def test_pyramiddrop_later_stages_count_from_the_first():
    spec = "pyramiddrop(layer=(2, 5, 9), keep_ratio=(0.5, 0.25, 0.125))"
    counts = []
    n_image = 576
    for layer in (2, 5, 9):
        ctx = llm_ctx(8, n_image=n_image, layer=layer)
        n_image = int(strategy(spec)(ctx).diagnostics["keep_count"][0])
        counts.append(n_image)
    assert counts == [288, 144, 72]  # the reference's int(576 * r_s)
    with pytest.raises(Exception, match="called at layer 3"):
        strategy(spec)(llm_ctx(8, layer=3))


def test_pyramiddrop_rejects_malformed_schedules():
    with pytest.raises(ValueError, match="one ratio per layer"):
        strategy("pyramiddrop(layer=(2, 4), keep_ratio=(0.5))")
    with pytest.raises(ValueError, match="must not increase"):
        strategy("pyramiddrop(layer=(2, 4), keep_ratio=(0.25, 0.5))")
    with pytest.raises(ValueError, match="lists are sweeps"):
        strategy("pyramiddrop(layer=[2, 4], keep_ratio=(0.5, 0.25))")
    spec = "pyramiddrop(layer=(2, 4), keep_ratio=(0.5, 0.25), query=last, scores=own, positions=compact)"
    assert str(strategies.get(spec)) == spec  # the canonical spec round-trips with its schedules
    assert strategies.get(str(strategies.get(spec))) == strategies.get(spec)


def test_list_shows_the_five_with_their_stage(capsys):
    from tokprune.cli import main

    expected = {"dart": "llm", "divprune": "vision", "pyramiddrop": "llm", "vispruner": "vision", "cdpruner": "vision"}
    assert main(["list"]) in (0, None)
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    assert {name: lines.get(name) for name in expected} == expected
