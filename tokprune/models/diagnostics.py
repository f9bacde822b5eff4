"""Self-contained checks of the tiny LLaVA: accuracy, CLS-attention quality, pruning discrimination.

Pruning here is deliberately simple and independent of the adapter: a pruned image token is removed
from the attention mask while every remaining token keeps its original position id, which is
equivalent to dropping it from the sequence without renumbering positions.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from tokprune.data import world
from tokprune.data.world import Sample, build_prompt, score_answer


def pixel_values_of(samples: list[Sample]) -> torch.Tensor:
    """``[B, 3, H, W]`` float tensor, normalised like the shipped ``CLIPImageProcessor`` (mean=std=0.5)."""
    arr = np.stack([np.asarray(s.image, dtype=np.float32) for s in samples])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(255.0).sub(0.5).div(0.5)


@torch.no_grad()
def cls_attention(vision_tower: torch.nn.Module, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """Head-mean attention of the CLS query over patch keys in encoder layer ``layer``.

    Recomputed from the layer's q/k projections so it works under any attention implementation.
    Returns ``[B, N_patches]``, renormalised to sum to 1 over patches (the CLS self-weight dropped).
    """
    layers = vision_tower.encoder.layers
    idx = layer % len(layers)
    out = vision_tower(pixel_values=pixel_values, output_hidden_states=True)
    x = layers[idx].layer_norm1(out.hidden_states[idx])
    attn = layers[idx].self_attn
    b, t, d = x.shape
    h = attn.num_heads
    q = attn.q_proj(x[:, :1]).view(b, 1, h, d // h).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, h, d // h).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)[:, 0, 1:]
    return probs / probs.sum(-1, keepdim=True)


def knee_fraction(scores: torch.Tensor) -> torch.Tensor:
    """Kept fraction at the max-distance-to-chord knee of each descending-sorted score curve.

    ``scores``: ``[B, N]``; returns ``[B]`` in ``(0, 1]``.
    """
    s = scores.sort(-1, descending=True).values
    n = s.shape[-1]
    x = torch.linspace(0, 1, n)
    y = (s - s[:, -1:]) / (s[:, :1] - s[:, -1:]).clamp_min(1e-12)
    # Chord from (0, 1) to (1, 0): distance is proportional to 1 - x - y (curve below the chord).
    dist = 1 - x - y
    return (dist.argmax(-1) + 1).float() / n


def cls_stats(vision_tower: torch.nn.Module, samples: list[Sample], layer: int = -2,
              keep: float = 0.22) -> dict[str, float]:
    """CLS-attention concentration on objects, averaged over ``samples``."""
    pv = pixel_values_of(samples)
    att = torch.cat([cls_attention(vision_tower, pv[i:i + 64], layer) for i in range(0, len(pv), 64)])
    mask = torch.stack([s.object_mask for s in samples]).float()
    n = att.shape[1]
    k = round(keep * n)
    top = att.topk(k, -1).indices
    top_mask = torch.zeros_like(att).scatter_(1, top, 1.0)
    return {
        "object_patch_share": mask.mean().item(),
        "cls_mass_on_objects": (att * mask).sum(-1).mean().item(),
        "top_patch_vs_uniform": (att.max(-1).values * n).mean().item(),
        f"top{int(keep * 100)}_mass": (att * top_mask).sum(-1).mean().item(),
        f"top{int(keep * 100)}_object_recall": ((top_mask * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean().item(),
        f"top{int(keep * 100)}_precision": ((top_mask * mask).sum(-1) / k).mean().item(),
        "knee_keep_fraction": knee_fraction(att).mean().item(),
    }


def _patch_labels(sample: Sample) -> list[tuple[int, str, str]]:
    """(patch index, colour, shape) for patches at least half covered by a single object."""
    p = world.PATCH_SIZE
    labels = []
    for obj in sample.objects:
        m = np.zeros((world.IMAGE_SIZE, world.IMAGE_SIZE), dtype=bool)
        m[obj.y0:obj.y0 + obj.side, obj.x0:obj.x0 + obj.side] = world._shape_mask(obj.shape, obj.side)
        cover = m.reshape(world.GRID, p, world.GRID, p).mean(axis=(1, 3)).reshape(-1)
        labels += [(int(i), obj.color, obj.shape) for i in np.flatnonzero(cover >= 0.5)]
    return labels


@torch.no_grad()
def linear_probe(vision_tower: torch.nn.Module, samples: list[Sample], layer: int = -2) -> dict[str, float]:
    """Held-out accuracy of linear probes reading colour and shape from single patch features."""
    pv = pixel_values_of(samples)
    feats = vision_tower(pixel_values=pv, output_hidden_states=True).hidden_states[layer][:, 1:]
    xs, colors, shapes = [], [], []
    for b, s in enumerate(samples):
        for i, c, sh in _patch_labels(s):
            xs.append(feats[b, i].numpy())
            colors.append(c)
            shapes.append(sh)
    x = np.stack(xs)
    half = len(x) // 2
    out = {}
    for name, y in (("color", colors), ("shape", shapes)):
        clf = LogisticRegression(max_iter=500).fit(x[:half], y[:half])
        out[f"probe_{name}"] = float(clf.score(x[half:], y[half:]))
    return out


def _encode(processor: LlavaProcessor, samples: list[Sample]) -> dict[str, torch.Tensor]:
    return processor(text=[build_prompt(s.question) for s in samples], images=[s.image for s in samples],
                     return_tensors="pt", padding=True)


@torch.no_grad()
def first_token_answers(model: LlavaForConditionalGeneration, processor: LlavaProcessor,
                        samples: list[Sample], keep: torch.Tensor | None = None) -> list[str]:
    """Greedy first answer word per sample, optionally with only ``keep`` image patches visible.

    ``keep``: bool ``[B, N_patches]`` (raster order) or None for the unpruned model. Answers are one
    word, so the first generated token is the whole answer.
    """
    enc = _encode(processor, samples)
    mask = enc["attention_mask"].clone()
    # Original positions, as generate() computes them for left padding.
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    if keep is not None:
        is_image = enc["input_ids"] == model.config.image_token_id
        mask[is_image] = keep.reshape(-1).to(mask.dtype)
    out = model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"].to(model.dtype),
                attention_mask=mask, position_ids=position_ids, logits_to_keep=1)
    ids = out.logits[:, -1].argmax(-1)
    return processor.tokenizer.batch_decode(ids[:, None], skip_special_tokens=True)


def accuracy_by_type(samples: list[Sample], predictions: list[str]) -> dict[str, float]:
    """Overall and per-question-type accuracy."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for s, p in zip(samples, predictions):
        ok = score_answer(p, s)
        hits[s.qtype].append(ok)
        hits["overall"].append(ok)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def majority_rates(samples: list[Sample]) -> dict[str, float]:
    """Accuracy of always answering each type's most frequent answer."""
    out = {}
    for q in world.QUESTION_TYPES:
        answers = [s.answer for s in samples if s.qtype == q]
        if answers:
            out[q] = max(answers.count(a) for a in set(answers)) / len(answers)
    return out


def keep_masks(vision_tower: torch.nn.Module, samples: list[Sample], keep: float, seed: int = 0,
               layer: int = -2) -> dict[str, torch.Tensor]:
    """Bool ``[B, N]`` masks keeping ``keep`` of the patches: top / random / bottom by CLS attention."""
    att = cls_attention(vision_tower, pixel_values_of(samples), layer)
    b, n = att.shape
    k = max(1, round(keep * n))
    gen = torch.Generator().manual_seed(seed)

    def from_idx(idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(b, n, dtype=torch.bool).scatter_(1, idx, True)

    return {
        "top": from_idx(att.topk(k, -1).indices),
        "random": from_idx(torch.rand(b, n, generator=gen).topk(k, -1).indices),
        "bottom": from_idx((-att).topk(k, -1).indices),
        "none": torch.zeros(b, n, dtype=torch.bool),
    }


@torch.no_grad()
def pruning_report(model: LlavaForConditionalGeneration, processor: LlavaProcessor, samples: list[Sample],
                   keep: float = 0.22, batch_size: int = 100, layer: int = -2) -> dict[str, dict[str, float]]:
    """Accuracy unpruned and with ``keep`` of the patches kept by top / random / bottom CLS attention."""
    preds: dict[str, list[str]] = defaultdict(list)
    tower = model.model.vision_tower
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        preds["full"] += first_token_answers(model, processor, chunk)
        for name, m in keep_masks(tower, chunk, keep, seed=i, layer=layer).items():
            preds[name] += first_token_answers(model, processor, chunk, keep=m)
    return {name: accuracy_by_type(samples, p) for name, p in preds.items()}


@torch.no_grad()
def generate_eval(model: LlavaForConditionalGeneration, processor: LlavaProcessor, samples: list[Sample],
                  batch_size: int = 100) -> tuple[dict[str, float], float]:
    """Accuracy with batched greedy ``generate`` and its wall time in seconds."""
    t0 = time.perf_counter()
    preds: list[str] = []
    for i in range(0, len(samples), batch_size):
        enc = _encode(processor, samples[i:i + batch_size])
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        preds += processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return accuracy_by_type(samples, preds), time.perf_counter() - t0
