"""End to end (issue 14, item 4): ``model.generate`` wall time, pruned vs unpruned, short and long answers.

A script, not a test. The LLaVA-1.5-7B-shaped model of ``_common.py`` (2 + 2 layers on the CPU, full
depth with ``--device cuda``), 576 image + 64 text tokens, greedy, exactly ``N`` new tokens (8 and 128
by default), at each batch of ``--batches`` (CPU default 1,4: a batch-32 prefill of this slice takes minutes
on 2 cores; cuda default 1,32). What a user of ``model.generate`` saves: prefill and decode together.

Beside each measured speedup, the two model bounds it should lie between: the prefill FLOP model's
(``handle.stats``, what a 1-token answer would save) and the decode memory-traffic model's at this
batch (``_common.py``, with ``DynamicCache``'s three passes; what a very long answer tends to).

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_generate.py [--batches 1,4] [--new-tokens 8,128] [--device cuda]
    python benchmarks/bench_generate.py --smoke     # tiny widths, batches 1,2, 2 and 4 new tokens
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: 2 OpenMP threads stall on small matmuls otherwise

import contextlib
import gc

import _common as C
import torch

import tokprune
from tokprune import hf_compat as hf

TOPK = "topk(keep_ratio=0.22)"


def generate(model, inputs, spec: str | None, tokens: int):
    context = tokprune.pruned(model, spec) if spec else contextlib.nullcontext()
    with torch.no_grad(), context as run:
        out = model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, return_dict_in_generate=True
        )
    return out, (run.stats if spec else None)


def main() -> None:
    p = C.parser(__doc__, dtypes="fp32")
    p.add_argument("--batches", default=None, help="default 1,4 (CPU), 1,32 (cuda), 1,2 (--smoke)")
    p.add_argument("--new-tokens", default=None, help="default 8,128 (--smoke: 2,4)")
    p.set_defaults(default_repeats=1)
    args = p.parse_args()
    dtypes = C.setup(args)
    batches = [int(b) for b in C.pick(args.batches, args, smoke="1,2", cuda="1,32", cpu="1,4").split(",")]
    lengths = [int(n) for n in C.pick(args.new_tokens, args, smoke="2,4", cuda="8,128", cpu="8,128").split(",")]
    for dtype in dtypes:
        model = C.build(dtype, args.device)
        print(f"\n=== {C.dtype_name(dtype)}: {C.describe(model)} ===")
        weights = C.decode_weight_bytes(model)
        print(
            f"{'batch':>5} {'new tok':>7} {'unpruned s':>11} {'pruned s':>9} {'speedup':>8} "
            f"{'prefill FLOP model':>18} {'decode traffic model':>20}"
        )
        for batch in batches:
            inputs = C.make_inputs(model, batch)
            for spec in (None, TOPK):  # warm-up, and the caches and stats for the models
                out, stats = generate(model, inputs, spec, 2)
                if spec:
                    flop_x = float(stats.flops_unpruned[0] / stats.flops_pruned[0])
                    kv_pruned = C.cache_bytes(hf.output_cache(out)) // batch
                else:
                    kv_full = C.cache_bytes(hf.output_cache(out)) // batch
                del out
            traffic_x = C.predicted_decode_speedup(weights, kv_full, kv_pruned, batch, C.DYNAMIC_CACHE_PASSES)
            for tokens in lengths:
                times: dict[str, list[float]] = {"": [], TOPK: []}
                for _ in range(args.repeats):  # interleaved rounds, after the warm-up above
                    for spec, spent in times.items():
                        spent.append(
                            C.once(lambda s=spec, n=tokens, x=inputs, m=model: generate(m, x, s, n), args.device)
                        )
                tu, tp = min(times[""]), min(times[TOPK])
                print(
                    f"{batch:>5} {tokens:>7} {tu:>11.2f} {tp:>9.2f} {tu / tp:>7.2f}x {flop_x:>17.2f}x {traffic_x:>19.2f}x",
                    flush=True,
                )
            gc.collect()


if __name__ == "__main__":
    main()
