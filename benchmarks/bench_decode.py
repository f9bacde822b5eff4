"""Decode benchmark (issue 14, item 1): greedy decoding against the pruned vs the unpruned KV cache, by batch.

A script, not a test. The LLaVA-1.5-7B-shaped model of ``_common.py`` (2 + 2 layers on the CPU, full
depth with ``--device cuda``), 576 image + 64 text tokens. Per dtype and batch it prints the decode
throughput (tokens/s) with the cache left by an unpruned prefill and by a ``topk(keep_ratio=0.22)``
prefill, the measured speedup, and the memory-traffic model's prediction (``_common.py``): the bytes of a
step, weights + cache, with the cache counted once (a static/paged cache, the issue's model) and three
times (HF's ``DynamicCache``, which ``torch.cat``-copies the cache every step), and measured / predicted;
then the roofline model for this machine (``_common.roofline_step_seconds``: attention's read of the
cache, ``torch.cat``'s read and write to append to it): after each batch's timing it measures the copy
bandwidth, the append rate and the dtype's matmul rate at that batch's row count, prints them, the
weight matmuls' bound (memory or compute), the roofline's prediction and measured / roofline. The bytes model is the issue's target; the roofline says what this machine allows
when its matmuls, not its memory, set the pace (bf16 on a CPU without bf16 instructions).

How: one batch-1 prefill per variant through the public API (``tokprune.pruned``) leaves the cache; the
script checks that its per-layer lengths are the kept tokens of ``handle.stats`` (KV bytes per sample
exactly in proportion to the kept tokens) and copies it ``B`` times (identical samples, so the cache of a
batch-B prefill, without paying ``B`` prefills on a 2-core CPU). The decode steps run the plain model on
that cache: for a vision-stage strategy the adapter's own decode is this computation plus its mask
bookkeeping, and the script checks at batch 1 that both give the same logits (the adapter's share is
``bench_overhead.py``'s business).

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_decode.py [--batches 1,8,32,64] [--steps 8] [--device cuda]
    python benchmarks/bench_decode.py --smoke     # tiny widths, batches 1,2, 2 steps: checks the script runs

Times are the best of interleaved rounds (warm-up round excluded; CUDA events on a GPU).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: 2 OpenMP threads stall on small matmuls otherwise

import gc

import _common as C
import torch

import tokprune
from tokprune import hf_compat as hf

TOPK = "topk(keep_ratio=0.22)"


def prefill(model, inputs, spec: str | None):
    """Batch-1 prefill with a cache: ``(cache, next token, stats or None)``."""
    with torch.no_grad():
        if spec is None:
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            return hf.output_cache(out), out.logits[:, -1:].argmax(-1), None
        with tokprune.pruned(model, spec) as run:
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        return hf.output_cache(out), out.logits[:, -1:].argmax(-1), run.stats


def decode(model, cache, token, start: int, steps: int):
    """``steps`` greedy steps on ``cache`` for a prompt of ``start`` positions; returns the last logits."""
    b, cached = token.shape[0], C.cache_positions(cache)[0]
    device = token.device
    with torch.no_grad():
        for i in range(steps):
            out = model(
                input_ids=token,
                attention_mask=torch.ones(b, cached + i + 1, dtype=torch.long, device=device),
                position_ids=torch.full((b, 1), start + i, device=device),
                **{hf.cache_keyword(type(model).forward): cache},
                use_cache=True,
                logits_to_keep=1,
            )
            token = out.logits[:, -1:].argmax(-1)
    return out.logits


def adapter_decode_matches(model, inputs) -> float:
    """Max |logit difference| of one decode step: patched model on its cache vs plain model on a copy."""
    n = inputs["input_ids"].shape[1]
    with torch.no_grad(), tokprune.pruned(model, TOPK):
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        copy = C.expand_cache(hf.output_cache(out), 1)
        ours = model(
            input_ids=token,
            attention_mask=torch.ones(1, n + 1, dtype=torch.long, device=token.device),
            position_ids=torch.full((1, 1), n, device=token.device),
            **{hf.cache_keyword(type(model).forward): hf.output_cache(out)},
            use_cache=True,
            logits_to_keep=1,
        ).logits
    plain = decode(model, copy, token, n, 1)
    return float((ours.float() - plain.float()).abs().max())


def run_dtype(args, dtype: torch.dtype) -> None:
    model = C.build(dtype, args.device)
    inputs = C.make_inputs(model, 1)
    n = inputs["input_ids"].shape[1]
    print(f"\n=== {C.dtype_name(dtype)}: {C.describe(model)}, {n} prompt tokens ===", flush=True)
    cfg = model.config.text_config
    head_dim, itemsize = cfg.hidden_size // cfg.num_attention_heads, dtype.itemsize
    caches = {"unpruned": prefill(model, inputs, None), TOPK: prefill(model, inputs, TOPK)}
    stats = caches[TOPK][2]
    kept = stats.layer_tokens[0].tolist()
    positions = {k: C.cache_positions(c[0]) for k, c in caches.items()}
    assert positions[TOPK] == kept, (positions[TOPK], kept)  # the cache holds exactly the kept tokens
    kv = {k: C.cache_bytes(c[0]) for k, c in caches.items()}
    per_token = 2 * cfg.num_key_value_heads * head_dim * itemsize
    for k, p in positions.items():
        assert kv[k] == C.kv_bytes(p, cfg.num_key_value_heads, head_dim, itemsize)
        print(
            f"KV cache per sample, {k:<22} {kv[k] / 2**20:8.2f} MiB = {sum(p)} layer-positions x "
            f"{per_token} B ({p[0]} positions per layer)"
        )
    print(
        f"KV ratio pruned/unpruned {kv[TOPK] / kv['unpruned']:.4f} = kept ratio {sum(kept) / sum(positions['unpruned']):.4f}"
    )
    print(
        f"adapter decode vs plain decode on the same pruned cache: max |dlogit| {adapter_decode_matches(model, inputs):.2e}"
    )
    weights = C.decode_weight_bytes(model)
    print(f"weights a decode step reads: {weights / 2**30:.2f} GiB (decoder layers, norm, lm_head)")
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for batch in args.batches:
        need = held + 2.2 * batch * kv["unpruned"]  # base copy + the copy torch.cat makes while decoding
        if need > args.memory_gb * 2**30:
            print(f"{batch:>5} skipped: needs ~{need / 2**30:.1f} GiB > --memory-gb {args.memory_gb}")
            continue
        times: dict[str, list[float]] = {k: [] for k in caches}
        for r in range(args.repeats + 1):  # round 0 warms up
            for k, (cache, token, _) in caches.items():
                big, tokens = C.expand_cache(cache, batch), token.expand(batch, 1)
                t = C.once(lambda big=big, tokens=tokens: decode(model, big, tokens, n, args.steps), args.device)
                if r:
                    times[k].append(t)
                del big
                gc.collect()
        best = {k: min(v) for k, v in times.items()}
        # the machine's rates, measured right after the timing (same load, same clock)
        bandwidth = C.measure_bandwidth(args.device, args.calibration_mib * 2**20)
        append = {  # one layer's keys at this batch, unpruned and pruned (glibc treats them differently)
            k: C.measure_append_bandwidth(
                (batch, cfg.num_key_value_heads, positions[k][-1], head_dim), dtype, args.device
            )
            for k in caches
        }
        matmul = C.measure_matmul_rate(dtype, batch, cfg.hidden_size, args.device)
        flops = C.decode_weight_flops(model, batch)
        bound = C.weight_bound(weights, flops, bandwidth, matmul)
        print(
            f"batch {batch}: copy bandwidth {bandwidth / 1e9:.2f} GB/s, append (torch.cat) unpruned "
            f"{append['unpruned'] / 1e9:.2f} GB/s, pruned {append[TOPK] / 1e9:.2f} GB/s, "
            f"{C.dtype_name(dtype)} matmul at {batch} rows {matmul / 1e9:.1f} GFLOP/s; weights "
            f"{weights / bandwidth * 1e3:.0f} ms to read vs {flops / 1e9:.1f} GFLOP {flops / matmul * 1e3:.0f} ms to "
            f"compute per step: weight matmuls {bound}-bound",
            flush=True,
        )
        rows.append((batch, best, bandwidth, append, matmul, flops, bound))
    # the table after the calibration lines, so it reads in one piece
    print(
        f"{'batch':>5} {'unpruned tok/s':>15} {'pruned tok/s':>13} {'speedup':>8} {'model x1':>9} {'model x3':>9} "
        f"{'roofline':>9} {'meas/x1':>8} {'meas/x3':>8} {'meas/roof':>9} {'weights':>8}"
    )
    for batch, best, bandwidth, append, matmul, flops, bound in rows:
        rate = {k: batch * args.steps / t for k, t in best.items()}
        measured = best["unpruned"] / best[TOPK]
        x1 = C.predicted_decode_speedup(weights, kv["unpruned"], kv[TOPK], batch, passes=1)
        x3 = C.predicted_decode_speedup(weights, kv["unpruned"], kv[TOPK], batch, passes=C.DYNAMIC_CACHE_PASSES)
        roof = C.predicted_roofline_speedup(
            weights, flops, kv["unpruned"], kv[TOPK], batch, bandwidth, matmul, C.APPEND_PASSES, *append.values()
        )
        print(
            f"{batch:>5} {rate['unpruned']:>15.1f} {rate[TOPK]:>13.1f} {measured:>7.2f}x {x1:>8.2f}x {x3:>8.2f}x "
            f"{roof:>8.2f}x {measured / x1:>8.2f} {measured / x3:>8.2f} {measured / roof:>9.2f} {bound:>8}",
            flush=True,
        )


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--batches", default=None, help="default 1,8,32,64 (--smoke: 1,2)")
    p.add_argument("--steps", type=int, default=None, help="decode steps per timed call (default 8; --smoke: 2)")
    p.add_argument("--memory-gb", type=float, default=None, help="skip batches whose caches would not fit (CPU: 8)")
    p.add_argument(
        "--calibration-mib",
        type=int,
        default=None,
        help="MiB copied to measure the copy bandwidth (default 256; --smoke: 8)",
    )
    args = p.parse_args()
    dtypes = C.setup(args)
    args.batches = [
        int(b) for b in C.pick(args.batches, args, smoke="1,2", cuda="1,8,32,64", cpu="1,8,32,64").split(",")
    ]
    args.steps = C.pick(args.steps, args, smoke=2, cuda=8, cpu=8)
    args.calibration_mib = C.pick(args.calibration_mib, args, smoke=8, cuda=1024, cpu=256)
    if args.memory_gb is None:
        args.memory_gb = (
            torch.cuda.get_device_properties(0).total_memory / 2**30 * 0.9 if args.device == "cuda" else 8.0
        )
    for dtype in dtypes:
        run_dtype(args, dtype)
        gc.collect()  # the model and its caches went out of scope with run_dtype


if __name__ == "__main__":
    main()
