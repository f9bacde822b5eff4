"""The serving benchmarks' memory-traffic model (benchmarks/_common.py) against real caches and its own algebra."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import tokprune
from tokprune import hf_compat as hf
from tokprune.testing.models import tiny_llava

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
_spec = importlib.util.spec_from_file_location("bench_common", _PATH)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(seed=0)


def _prefill_cache(model, inputs):
    with torch.no_grad():
        return hf.output_cache(model(**inputs, use_cache=True))


@pytest.mark.parametrize("spec", [None, "topk(keep_ratio=0.25)", "topk(keep_ratio=0.25)+fastv(layer=2, keep=4)"])
def test_kv_bytes_is_the_cache_a_prefill_leaves(tiny, spec):
    model, make_inputs = tiny
    inputs = make_inputs(question_lengths=(4, 4, 4))  # equal lengths: no padding, every sample keeps alike
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if spec is None:
        cache = _prefill_cache(model, inputs)
        tokens = [inputs["input_ids"].shape[1]] * cfg.num_hidden_layers
    else:
        with tokprune.pruned(model, spec) as run:
            cache = _prefill_cache(model, inputs)
        tokens = run.stats.layer_tokens[0].tolist()
        assert run.stats.layer_tokens.unique(dim=0).shape[0] == 1
    assert common.cache_positions(cache) == tokens
    per_sample = common.kv_bytes(tokens, cfg.num_key_value_heads, head_dim, model.dtype.itemsize)
    assert common.cache_bytes(cache) == 3 * per_sample


def test_kv_bytes_is_proportional_to_tokens():
    one = common.kv_bytes([1], kv_heads=8, head_dim=128, itemsize=2)
    assert one == 2 * 8 * 128 * 2
    assert common.kv_bytes([640, 640, 191], 8, 128, 2) == (640 + 640 + 191) * one
    assert common.kv_bytes([], 8, 128, 2) == 0


@pytest.mark.parametrize(
    "args, match",
    [
        (([-1], 8, 128, 2), "tokens_per_layer"),
        (([[1]], 8, 128, 2), "tokens_per_layer"),
        (([1], 0, 128, 2), "kv_heads must be >= 1, got 0"),
        (([1], 8, 128, 0), "itemsize must be >= 1, got 0"),
    ],
)
def test_kv_bytes_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        common.kv_bytes(*args)


def test_decode_speedup_limits():
    w, full, pruned = 1000.0, 300.0, 66.0
    # no cache traffic to save: no speedup; no weights: the cache ratio
    assert common.predicted_decode_speedup(w, 0.0, 0.0, batch=8) == 1.0
    assert common.predicted_decode_speedup(0.0, full, pruned, batch=8) == pytest.approx(full / pruned)
    assert common.predicted_decode_speedup(w, full, pruned, batch=1) == pytest.approx((w + full) / (w + pruned))
    # grows with the batch and the passes, towards the cache ratio
    by_batch = [common.predicted_decode_speedup(w, full, pruned, b) for b in (1, 8, 32, 64, 10_000)]
    assert by_batch == sorted(by_batch) and by_batch[-1] < full / pruned
    assert common.predicted_decode_speedup(w, full, pruned, 8, passes=3) > by_batch[1]
    assert common.decode_bytes(w, full, batch=4, passes=3) == w + 3 * 4 * full


@pytest.mark.parametrize("kwargs", [{"batch": 0}, {"batch": 1, "passes": 0}, {"batch": 1, "weight_bytes": -1.0}])
def test_decode_bytes_rejects_bad_input(kwargs):
    args = {"weight_bytes": 1.0, "kv_per_sample": 1.0, **kwargs}
    with pytest.raises(ValueError, match="need batch >= 1"):
        common.decode_bytes(**args)


def test_expand_cache_repeats_a_sample(tiny):
    model, make_inputs = tiny
    inputs = make_inputs(question_lengths=(4,))
    cache = _prefill_cache(model, inputs)
    big = common.expand_cache(cache, 5)
    assert common.cache_bytes(big) == 5 * common.cache_bytes(cache)
    assert common.cache_positions(big) == common.cache_positions(cache)
    assert torch.equal(big.layers[-1].values[4], cache.layers[-1].values[0])


def test_decode_weight_bytes_counts_what_a_step_reads(tiny):
    model, _ = tiny
    lm = model.model.language_model
    everything = sum(p.numel() * p.element_size() for p in lm.parameters()) + model.lm_head.weight.nbytes
    assert common.decode_weight_bytes(model) == everything - lm.embed_tokens.weight.nbytes
