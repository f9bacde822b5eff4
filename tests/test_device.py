"""Primitives, the strategy contract and the LLaVA adapter on an accelerator (``--device``, default cuda).

Skipped without CUDA (see conftest.py). Each check compares the device with the CPU in fp32 and checks
that bf16/fp16 runs give valid results on the device.
"""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune import scoring, strategies
from tokprune.testing.contract import make_batch
from tokprune.testing.device import check_on_device, to_device
from tokprune.testing.models import VOCAB, tiny_llava


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, n, c, lh, length, d, nq = 3, 48, 32, 4, 40, 16, 6
    scores = torch.softmax(torch.randn(b, n, generator=g) * 3, dim=-1)
    return {
        "q": torch.randn(b, n + 1, c, generator=g),
        "k": torch.randn(b, n + 1, c, generator=g),
        "scores": scores,
        "feats": torch.randn(b, n, c, generator=g),
        "keep": scoring.topk_mask(scores, torch.tensor([5, 12, 20])),
        "lq": torch.randn(1, lh, length, d, generator=g),
        "lk": torch.randn(1, lh, length, d, generator=g),
        "qidx": torch.arange(length - nq, length)[None],
        "pad": torch.ones(1, length, dtype=torch.bool),
        "qvalid": torch.ones(1, nq, dtype=torch.bool),
        "lengths": torch.tensor([n, n - 7, 9]),
    }


# name -> call on a dict of inputs (every primitive of tokprune.scoring that takes tensors)
PRIMITIVES = {
    "cls_attention": lambda x: scoring.cls_attention(x["q"], x["k"], 4),
    "cls_cosine_similarity": lambda x: scoring.cls_cosine_similarity(x["q"]),
    "query_attention": lambda x: scoring.query_attention(x["lq"], x["lk"], x["qidx"], x["pad"]),
    "attention_received": lambda x: scoring.attention_received(
        scoring.query_attention(x["lq"], x["lk"], x["qidx"], x["pad"]), x["qvalid"], x["qidx"]
    ),
    "find_knee": lambda x: scoring.find_knee(x["scores"]),
    "find_knee(lengths)": lambda x: scoring.find_knee(x["scores"], lengths=x["lengths"]),
    "knee_chord": lambda x: scoring.knee_chord(x["scores"]),
    "iqr_outlier_count": lambda x: scoring.iqr_outlier_count(x["scores"]),
    "lof_outlier_count": lambda x: scoring.lof_outlier_count(x["scores"], 5),
    "topk_mask": lambda x: scoring.topk_mask(x["scores"], torch.tensor([3, 7, 11], device=x["scores"].device)),
    "ragged_gather": lambda x: scoring.ragged_gather(x["feats"], x["keep"]),
    "prumerge_merge": lambda x: scoring.prumerge_merge(x["feats"], x["k"][:, 1:], x["scores"], x["keep"]),
    "prumerge_extra_token": lambda x: scoring.prumerge_extra_token(x["feats"], x["scores"], x["keep"]),
}


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _cast(x: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in x.items()}


@pytest.mark.parametrize("name", PRIMITIVES)
def test_primitive_on_device(name, device, device_dtype):
    fn, x = PRIMITIVES[name], _inputs()
    expected = _flat(fn(x))
    got = _flat(fn(_cast(x, device, device_dtype)))
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.device.type == torch.device(device).type and g.shape == e.shape
        if g.is_floating_point():
            assert torch.isfinite(g).all()
            if device_dtype == torch.float32:
                torch.testing.assert_close(g.cpu(), e, rtol=1e-4, atol=1e-5)
        elif device_dtype == torch.float32:  # indices, counts, masks: identical decisions in fp32
            assert torch.equal(g.cpu(), e)


@pytest.mark.parametrize("spec", strategies.available())
def test_strategy_contract_on_device(spec, device):
    check_on_device(spec, device)


def test_to_device_moves_every_tensor(device):
    for spec in ("topk", "fastv"):
        batch = to_device(make_batch(strategies.get(spec)[0]), device)
        tensors = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
        tensors += [t for v in getattr(batch, "signals", {}).values() for t in (v if isinstance(v, tuple) else (v,))]
        assert tensors and all(t.device.type == torch.device(device).type for t in tensors)


SPECS = ["topk(keep_ratio=0.25)+fastv(layer=2, keep=4)", "cls_knee+text_interact", "prumerge_plus"]


@pytest.mark.parametrize("spec", SPECS)
def test_adapter_on_device(spec, device, device_dtype):
    """Pruned greedy generation on the device; in fp32: cache == no cache, and the CPU's tokens and kept counts."""
    model, make_inputs = tiny_llava(seed=0)
    inputs = make_inputs((5, 3, 7))
    common = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": VOCAB.pad}
    with torch.no_grad(), tokprune.pruned(model, spec, question_end=VOCAB.assistant_marker) as run:
        cpu_tokens = model.generate(**inputs, **common)
        cpu_kept = run.stats.visual_kept
    model.to(device, device_dtype)
    moved = _cast(inputs, device, device_dtype)
    with torch.no_grad(), tokprune.pruned(model, spec, question_end=VOCAB.assistant_marker) as run:
        cached = model.generate(**moved, use_cache=True, **common)
        uncached = model.generate(**moved, use_cache=False, **common)
        kept = run.stats.visual_kept
    prompt = inputs["input_ids"].shape[1]
    assert cached.device.type == torch.device(device).type and cached.shape == cpu_tokens.shape
    assert torch.equal(cached[:, :prompt].cpu(), inputs["input_ids"])
    assert bool((kept > 0).all())
    if device_dtype == torch.float32:
        # Half precision rounds the cached and the recomputed paths differently, so tokens may part there.
        assert torch.equal(cached, uncached)
        assert torch.equal(cached.cpu(), cpu_tokens) and torch.equal(kept, cpu_kept)


def test_keep_all_is_identity_on_device(device, device_dtype):
    model, make_inputs = tiny_llava(seed=0)
    model.to(device, device_dtype)
    inputs = _cast(make_inputs((5, 3)), device, device_dtype)
    with torch.no_grad():
        reference = model(**inputs).logits
        with tokprune.pruned(model, "topk(keep_ratio=1.0)+fastv(keep_ratio=1.0)"):
            patched = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    tol = 1e-5 if device_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(patched[valid].float(), reference[valid].float(), rtol=tol, atol=tol)
