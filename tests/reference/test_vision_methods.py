"""Vision-stage built-ins against re-implementations of their authors' selection rules, on tiny LLaVAs.

Each ``*_reference`` follows the cited lines of the authors' code for one image (batch of 1, as they run),
reading what that code reads off the unpatched model (``output_attentions``, hooked q/k, hidden states,
the projector); the strategy's default spec, run on a left-padded ragged batch, must keep the same set.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference._harness import Case, Tally, cases, kept_by_strategy, kept_image_ranks, order_margin, topk_margin

from tokprune.adapters.llava import vision_transformer
from tokprune.testing.models import tiny_text_encoder


def _run(method: str, spec: str, reference, **options) -> None:
    tally = Tally(method)
    for model, make_inputs, solo in cases():
        ours = kept_by_strategy(model, make_inputs, spec, **options)
        for case in solo:
            expected, margin = reference(case)
            tally.check(kept_image_ranks(ours[case.index]), expected, margin, f"seed {case.seed} sample {case.index}")
    tally.report()
    assert tally.cases == 12 and tally.equal >= tally.cases - 2, "near-ties may excuse a difference, not many"


def features(case: Case) -> torch.Tensor:
    """LLaVA-1.5's ``hidden_states[-2][:, 1:]`` (``feature_select``), ``[N, C]``."""
    return case.tower_hidden[-2][0, 1:]


# ---------------------------------------------------------------------------------------------------
# PruMerge's single-head CLS attention surrogate: 42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a
# llava/model/multimodal_encoder/clip_encoder.py L93-112 (hooks on the last layer's q/k, C ** -0.5, softmax,
# row 0 without CLS). Used by prumerge, prumerge_plus and as the default score of topk and cls_knee.
# ---------------------------------------------------------------------------------------------------


def surrogate_cls_attention(case: Case) -> torch.Tensor:
    last = len(case.tower_attentions) - 1
    q, k = case.tower_qk[("q", last)][0], case.tower_qk[("k", last)][0]
    c = features(case).shape[-1]
    attn = torch.softmax((q @ k.T) * c**-0.5, dim=-1)
    return attn[0, 1:]


def iqr_ratio(cls_attn: torch.Tensor) -> float:
    """``outlier_dectection``, clip_encoder.py L34-47: share of scores above Q3 + 1.5 IQR (NumPy percentiles)."""
    a = cls_attn.to(torch.float32).numpy().flatten()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    return len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / len(a)


def prumerge_reference(case: Case) -> tuple[list[int], float]:
    """clip_encoder.py L114-116: ``topk(cls_attn, int(N * ratio))``; kept set = those indices.
    Ours keeps at least ``min_keep=1`` where the reference keeps none (documented)."""
    cls_attn = surrogate_cls_attention(case)
    n = cls_attn.numel()
    k = max(int(n * iqr_ratio(cls_attn)), 1)
    return sorted(cls_attn.topk(k).indices.tolist()), topk_margin(cls_attn, k)


def prumerge_plus_reference(case: Case) -> tuple[list[int], float]:
    """clip_encoder.py L203-214: the outliers plus ``arange(0, 575, int(int(1 / ratio) / 3))`` (575 = N - 1)."""
    cls_attn = surrogate_cls_attention(case)
    n = cls_attn.numel()
    ratio = iqr_ratio(cls_attn)
    if ratio == 0:  # the reference divides by zero; ours counts min_keep=1 outlier (documented)
        ratio = 1 / n
    k = int(n * ratio)
    idx = cls_attn.topk(k).indices.tolist()
    stride = int(int(1 / ratio) / 3)
    samples = torch.arange(0, n - 1, stride).tolist()
    return sorted(set(idx) | set(samples)), topk_margin(cls_attn, k)


def test_prumerge():
    _run("prumerge", "prumerge", prumerge_reference)


def test_prumerge_plus():
    _run("prumerge_plus", "prumerge_plus", prumerge_plus_reference)


# topk: the top round(N * keep_ratio) patches by the surrogate (VTC-CLS-like baseline, no authors' code of
# its own: the rule is the definition; the score is PruMerge's, cited above).


def topk_reference(case: Case) -> tuple[list[int], float]:
    cls_attn = surrogate_cls_attention(case)
    k = round(cls_attn.numel() * 0.25)
    return sorted(cls_attn.topk(k).indices.tolist()), topk_margin(cls_attn, k)


def test_topk():
    _run("topk", "topk", topk_reference)


# ---------------------------------------------------------------------------------------------------
# cls_knee: the seed paper's stage 1 (arXiv 2409.01162; no public code) as docs/reference-method.md reads
# it: the knee of the descending CLS-score curve by kneed (arvkevi/kneed KneeLocator, convex, decreasing,
# S=1, offline), count = knee + 1, clamped to [min_keep=16, N], fallback_keep=144 when there is no knee.
# ---------------------------------------------------------------------------------------------------


def cls_knee_reference(case: Case) -> tuple[list[int], float]:
    from kneed import KneeLocator

    scores = surrogate_cls_attention(case).double()
    n = scores.numel()
    curve = scores.sort(descending=True).values.numpy()
    knee = KneeLocator(np.arange(n), curve, S=1.0, curve="convex", direction="decreasing", online=False).knee
    count = knee + 1 if knee is not None else min(144, n)
    count = min(max(count, min(16, n)), n)
    return sorted(scores.topk(count).indices.tolist()), topk_margin(scores, count)


def test_cls_knee():
    _run("cls_knee", "cls_knee", cls_knee_reference)


# ---------------------------------------------------------------------------------------------------
# random: no authors; the rule is ours (strategies/random.py): scores = splitmix64(fingerprint(sample) ^
# splitmix64(seed), token index), fingerprint = wrapping sum of splitmix64(bits + position * golden). The
# oracle recomputes it with Python integers modulo 2**64, one element at a time.
# ---------------------------------------------------------------------------------------------------

_U64 = 1 << 64
_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(x: int) -> int:
    x ^= x >> 30
    x = (x * _M1) % _U64
    x ^= x >> 27
    x = (x * _M2) % _U64
    return x ^ (x >> 31)


def random_reference(case: Case, seed: int = 0) -> tuple[list[int], float]:
    x = features(case).contiguous()
    bits = x.view(torch.int32).flatten().tolist()  # float32 bit patterns, sign-extended like .long()
    fingerprint = sum(_mix((b + i * _GOLDEN) % _U64) for i, b in enumerate(bits)) % _U64
    base = _mix(fingerprint ^ _mix(seed % _U64))
    scores = torch.tensor([float(_mix((base + j * _GOLDEN) % _U64) >> 11) for j in range(1, x.shape[0] + 1)])
    k = round(x.shape[0] * 0.25)
    return sorted(scores.double().topk(k).indices.tolist()), topk_margin(scores, k)


def test_random():
    _run("random", "random", random_reference)


# ---------------------------------------------------------------------------------------------------
# DivPrune: vbdi/divprune @ 799e2d950aa01ba7860907f5a6d86061f885dca6 LLaVA/llava/model/llava_arch.py
# L141-144 (encode_images: the projector), L147-171 (DivPrune) and L365-379 (the call on new_input_embeds:
# the projected tokens, SUBSET_RATIO=0.098).
# ---------------------------------------------------------------------------------------------------


def divprune_reference(case: Case, ratio: float = 0.098) -> tuple[list[int], float]:
    with torch.no_grad():
        x = case.model.model.multi_modal_projector(features(case))
    n = x.shape[0]
    terms = int(round(ratio * n))
    unit = x / x.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    picks: list[int] = []
    margin = math.inf
    for i in range(terms):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(distance[picks], dim=0).values
        top = scores.double().sort(descending=True).values
        margin = min(margin, float(top[0] - top[1]))
        picks.append(int(torch.argmax(scores)))
    return sorted(picks), margin


def test_divprune():
    _run("divprune", "divprune", divprune_reference)


# ---------------------------------------------------------------------------------------------------
# VisPruner: Theia-4869/VisPruner @ aefa01adc7c7ce6334e880c88225e90cede760d1 llava/model/llava_arch.py
# L141-187 (encode_images) on clip_encoder.py L36-52 (hidden_states[-2] without CLS, attentions[-2] CLS row).
# ---------------------------------------------------------------------------------------------------


def vispruner_reference(case: Case, keep_ratio: float = 0.25, important_ratio: float = 0.5) -> tuple[list[int], float]:
    x = features(case)[None]
    attentions = case.tower_attentions[-2][:, :, 0, 1:].mean(dim=1)  # (1, N)
    b, n, _ = x.shape
    visual_token_num = round(n * keep_ratio)
    important = int(visual_token_num * important_ratio)
    diverse = visual_token_num - important
    order = attentions.argsort(dim=-1, descending=True)
    important_indices, residual = order[:, :important], order[:, important:]
    unit = x / x.norm(dim=-1, keepdim=True)
    margin = order_margin(attentions[0])  # the residual's order decides the alternating split
    while diverse > 0:
        r_all = residual.shape[1]
        r = min(8, r_all - diverse)
        if r <= 0:
            break
        tokens = unit[torch.arange(b).unsqueeze(-1).expand(-1, r_all), residual]
        a, c = tokens[..., ::2, :], tokens[..., 1::2, :]
        scores = (a @ c.transpose(-1, -2)).max(dim=-1).values
        margin = min(margin, order_margin(scores))
        distinct = scores.argsort(dim=-1, descending=True)[:, r:]
        residual = torch.cat(
            [
                residual[..., ::2][torch.arange(b).unsqueeze(-1).expand(-1, r_all // 2 - r), distinct],
                residual[..., 1::2],
            ],
            dim=-1,
        )
    selected = torch.cat([important_indices, residual], dim=-1) if diverse > 0 else important_indices
    return sorted(selected[0].tolist()), margin


def test_vispruner():
    _run("vispruner", "vispruner", vispruner_reference)


# ---------------------------------------------------------------------------------------------------
# CDPruner: Theia-4869/CDPruner @ 9541616c40fcd5625de1cdb8ea6c33c129eb7864 llava/model/llava_arch.py L141-187
# (encode_images: the projector L146, similarity L149-152, relevance L155-159, kernel L167, greedy MAP
# L170-182) and llava/model/multimodal_encoder/clip_encoder.py L79-96 (the question through CLIP's
# tokenizer and text tower in segments of max_position_embeddings, zero padded; the patches through
# post_layernorm and visual_projection). The CLIP text tower is tokprune.testing.models.tiny_text_encoder.
# ---------------------------------------------------------------------------------------------------

ENCODER = tiny_text_encoder()


def cdpruner_reference(case: Case, keep_ratio: float = 0.25) -> tuple[list[int], float]:
    model = case.model
    x = features(case)[None]
    with torch.no_grad():
        image_features = model.model.multi_modal_projector(x)
        text = ENCODER.decode(case.question_ids)
        tokens = ENCODER.tokenizer(text=[text])
        ids, mask = torch.tensor(tokens["input_ids"]), torch.tensor(tokens["attention_mask"])
        segment = ENCODER.text_model.config.max_position_embeddings
        pad = segment * ((ids.shape[1] - 1) // segment + 1) - ids.shape[1]
        ids = torch.cat([ids, ids.new_zeros(1, pad)], dim=1).reshape(-1, segment)
        mask = torch.cat([mask, mask.new_zeros(1, pad)], dim=1).reshape(-1, segment)
        text_embeds = ENCODER.text_model(input_ids=ids, attention_mask=mask).text_embeds
        image_embeds = ENCODER.visual_projection(vision_transformer(model.model.vision_tower).post_layernorm(x).float())
    b, n, _ = image_features.shape
    unit = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    similarity = unit @ unit.transpose(1, 2)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-(image_embeds @ text_embeds.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    t = round(n * keep_ratio)
    cis = torch.zeros((t, b, n))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    picks = []
    margin = math.inf
    for i in range(t):
        top = di2s[0].double().sort(descending=True).values
        margin = min(margin, float(top[0] - top[1]))
        j = torch.argmax(di2s, dim=-1)
        picks.append(int(j))
        eis = (
            kernel[torch.arange(b), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(b), j], cis[:i])
        ) / torch.sqrt(di2s[torch.arange(b), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(b), j] = -float("inf")
    return sorted(picks), margin


def test_cdpruner_with_a_clip_text_tower():
    _run("cdpruner", "cdpruner", cdpruner_reference, text_encoder=ENCODER)


@pytest.mark.parametrize("spec", ["divprune(features=encoder)", "cdpruner(features=encoder)"])
def test_the_encoder_switch_selects_something_else(spec):
    """The switch is real: on the tower's features the kept sets differ from the reference's somewhere."""
    reference = divprune_reference if spec.startswith("divprune") else cdpruner_reference
    differ = 0
    for model, make_inputs, solo in cases(seeds=(0, 1)):
        ours = kept_by_strategy(model, make_inputs, spec, text_encoder=ENCODER)
        differ += sum(kept_image_ranks(ours[c.index]) != reference(c)[0] for c in solo)
    assert differ > 0
