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


# -- the roofline model of a decode step ---------------------------------------------------------------


@pytest.mark.parametrize(
    "weight_flops, expected",
    [
        (10.0, 10.0 + 5.0 + 20.0),  # weights memory-bound: reading 100 B at 10 B/s beats computing 10 FLOP at 10/s
        (400.0, 40.0 + 5.0 + 20.0),  # compute-bound: 400 FLOP at 10/s; the cache's read and append still add
    ],
)
def test_roofline_step_prices_each_part_by_its_bound_and_adds_them(weight_flops, expected):
    # one max over the whole step, a sum of every term, or the append at the copy bandwidth would all differ
    step = common.roofline_step_seconds(
        weight_bytes=100.0,
        weight_flops=weight_flops,
        cache_read=50.0,
        bandwidth=10.0,
        matmul_rate=10.0,
        cache_appended=40.0,
        append_bandwidth=2.0,
    )
    assert step == pytest.approx(expected)
    # without an append rate, appended bytes cost what read ones do
    same = common.roofline_step_seconds(100.0, weight_flops, 50.0, 10.0, 10.0, cache_appended=40.0)
    assert same == pytest.approx(expected - 20.0 + 4.0)


def test_roofline_speedup_by_hand_and_limits():
    w, full, pruned, batch = 1000.0, 300.0, 66.0, 2
    # bandwidth 1 B/s, appends at 0.5 B/s, rate 2 FLOP/s, 4000 FLOP: the weights take max(1000, 2000) s;
    # the cache is read once at 1 B/s and read + written to append at 0.5 B/s
    by_hand = (2000 + 2 * 300 + 2 * 2 * 300 / 0.5) / (2000 + 2 * 66 + 2 * 2 * 66 / 0.5)
    got = common.predicted_roofline_speedup(
        w, 4000.0, full, pruned, batch, 1.0, 2.0, append_passes=2, append_bandwidth=0.5
    )
    assert got == pytest.approx(by_hand)
    # appending at the copy rate with infinitely fast matmuls: the bytes model with three passes
    traffic = common.predicted_decode_speedup(w, full, pruned, batch, passes=3)
    fast = common.predicted_roofline_speedup(w, 4000.0, full, pruned, batch, 1.0, 1e12, append_passes=2)
    assert fast == pytest.approx(traffic)
    # infinitely slow matmuls: nothing to gain from a smaller cache
    assert common.predicted_roofline_speedup(w, 4000.0, full, pruned, batch, 1.0, 1e-9, 2) == pytest.approx(1.0)
    # computing the weights can only add to the part pruning does not touch; a slow append adds to the part it does
    for rate in (0.5, 2.0, 4.0, 8.0):
        assert common.predicted_roofline_speedup(w, 4000.0, full, pruned, batch, 1.0, rate, 2) <= traffic + 1e-12
    slow_append = common.predicted_roofline_speedup(w, 0.0, full, pruned, batch, 1.0, 1.0, 2, append_bandwidth=0.1)
    assert traffic < slow_append < full / pruned
    # the pruned cache's own append rate: faster appends (no page faults) save more
    split = common.predicted_roofline_speedup(
        w, 0.0, full, pruned, batch, 1.0, 1.0, 2, 0.1, append_bandwidth_pruned=1.0
    )
    assert split == pytest.approx((w + 2 * 300 + 4 * 300 / 0.1) / (w + 2 * 66 + 4 * 66 / 1.0))


def test_weight_bound_names_the_slower_side():
    assert common.weight_bound(weight_bytes=100.0, weight_flops=400.0, bandwidth=10.0, matmul_rate=10.0) == "compute"
    assert common.weight_bound(weight_bytes=100.0, weight_flops=40.0, bandwidth=10.0, matmul_rate=10.0) == "memory"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bandwidth": 0.0}, "'bandwidth': 0.0"),
        ({"matmul_rate": -1.0}, "'matmul_rate': -1.0"),
        ({"weight_flops": float("nan")}, "'weight_flops': nan"),
        ({"cache_read": -5.0}, "'cache_read': -5.0"),
        ({"append_bandwidth": 0.0}, "'append_bandwidth': 0.0"),
    ],
)
def test_roofline_rejects_bad_input(kwargs, match):
    args = {"weight_bytes": 1.0, "weight_flops": 1.0, "cache_read": 1.0, "bandwidth": 1.0, "matmul_rate": 1.0}
    with pytest.raises(ValueError, match=match):
        common.roofline_step_seconds(**{**args, **kwargs})


def test_decode_weight_flops_counts_every_matmul_weight(tiny):
    model, _ = tiny
    lm = model.model.language_model
    matrices = [p for p in lm.layers.parameters() if p.dim() == 2] + [model.lm_head.weight]
    assert common.decode_weight_flops(model, batch=3) == 2 * 3 * sum(p.numel() for p in matrices)


def test_calibrations_return_rates():
    bandwidth = common.measure_bandwidth("cpu", nbytes=2**20, repeats=2)
    append = common.measure_append_bandwidth((2, 4, 64, 16), torch.float32, "cpu", repeats=2)
    rate = common.measure_matmul_rate(torch.float32, rows=4, inner=64, cols=32, calls=2, repeats=2)
    assert 1e6 < bandwidth < 1e14 and 1e6 < append < 1e14 and 1e5 < rate < 1e15  # per second, not seconds


def test_causal_overcount_is_the_masked_part_of_the_attention_term():
    n, d = 7, 3
    computed = 2 * d * int(torch.ones(n, n).tril().sum())  # QK^T and AV over the pairs (i, j <= i)
    counted = 2 * n * n * d  # the FLOP model's term
    got = common.causal_attention_overcount(torch.tensor([[n, n], [n, 0]]), d)
    assert got.tolist() == [2 * (counted - computed), counted - computed]


def test_causal_overcount_against_the_stats_flop_model():
    """Removing the overcount from ``layer_flops`` leaves its projections, MLP and ``d n (n + 1)``."""
    from tokprune.stats import layer_flops

    n, d, m = torch.tensor([[40, 12]]), 64, 128
    full = layer_flops(n, d, m).sum(dim=-1)
    linear = layer_flops(n, d, m).sum(dim=-1) - (2 * n.double() ** 2 * d).sum(dim=-1)
    causal = linear + (d * n.double() * (n.double() + 1)).sum(dim=-1)
    assert torch.allclose(full - common.causal_attention_overcount(n, d), causal)


@pytest.mark.parametrize("tokens, d", [(torch.tensor([3, 4]), 8), (torch.tensor([[-1]]), 8), (torch.tensor([[3]]), 0)])
def test_causal_overcount_rejects_bad_input(tokens, d):
    with pytest.raises(ValueError, match="need layer_tokens long"):
        common.causal_attention_overcount(tokens, d)
