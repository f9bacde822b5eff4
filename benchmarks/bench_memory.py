"""Memory benchmark (issue 14, item 2): KV bytes per sample, peak memory of prefill + decode, batch that fits.

A script, not a test. The LLaVA-1.5-7B-shaped model of ``_common.py`` (2 + 2 layers on the CPU, full
depth with ``--device cuda``), 576 image + 64 text tokens. For the unpruned model and for
``topk(keep_ratio=0.22)``, at each batch of ``--batches``, one ``model.generate`` of ``--steps`` tokens
(prefill + decode, the patched ``generate`` when pruned) and prints:

* the exact KV-cache bytes per sample, read from the cache ``generate`` returns, and the kept tokens;
* the peak memory the call added above the loaded model (CUDA: ``max_memory_allocated``; CPU: the
  resident high-water mark, an upper bound that includes allocator slack);
* a line fitted through the peaks (``peak(B) = a + b B``) and the largest batch whose peak plus the
  weights fits ``--budget-gb``, pruned vs unpruned, with the KV-only bound (budget minus weights, over the
  KV bytes per sample) beside it.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_memory.py [--batches 1,2] [--budget-gb 16] [--device cuda]
    python benchmarks/bench_memory.py --smoke     # tiny widths, 2 new tokens: checks the script runs

On the CPU the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` set (see the code) and defaults
to fp32 (this CPU has no native bf16: bf16 runs several times slower, the proportions are the same).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: 2 OpenMP threads stall on small matmuls otherwise
if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    # glibc keeps freed heap memory resident, so a high-water mark would miss what a later call reuses:
    # blocks >= 128 KiB get their own mapping, returned on free, and the resident size tracks live tensors.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import contextlib
import gc

import _common as C
import torch

import tokprune
from tokprune import hf_compat as hf

TOPK = "topk(keep_ratio=0.22)"


def generate(model, inputs, spec: str | None, steps: int):
    """One greedy ``generate`` (exactly ``steps`` new tokens); returns ``(cache, stats or None)``."""
    context = tokprune.pruned(model, spec) if spec else contextlib.nullcontext()
    with torch.no_grad(), context as run:
        out = model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True
        )
    return hf.output_cache(out), (run.stats if spec else None)


def main() -> None:
    p = C.parser(__doc__, dtypes="fp32")
    p.add_argument("--batches", default=None, help="default 1,2 (CPU and --smoke), 1,16 (cuda)")
    p.add_argument("--steps", type=int, default=None, help="new tokens per generate call (default 4; --smoke: 2)")
    p.add_argument("--budget-gb", type=float, default=None, help="memory budget (default 16 on CPU, 80 on cuda)")
    args = p.parse_args()
    dtypes = C.setup(args)
    cuda = args.device == "cuda"
    batches = [int(b) for b in C.pick(args.batches, args, smoke="1,2", cuda="1,16", cpu="1,2").split(",")]
    args.steps = C.pick(args.steps, args, smoke=2, cuda=4, cpu=4)
    if len(batches) < 2:
        raise SystemExit(f"--batches needs two or more batch sizes to fit the peak per sample, got {batches}")
    budget = (args.budget_gb or (80.0 if cuda else 16.0)) * 2**30
    for dtype in dtypes:
        model = C.build(dtype, args.device)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"\n=== {C.dtype_name(dtype)}: {C.describe(model)}; weights held {weights / 2**30:.2f} GiB ===")
        print(
            f"{'variant':<24} {'batch':>5} {'KV/sample MiB':>14} {'positions/layer':>16} {'peak MiB':>9} {'peak/sample':>12}"
        )
        peaks: dict[str, list[tuple[int, int]]] = {}
        kv_sample: dict[str, int] = {}
        generate(model, C.make_inputs(model, 1), None, 2)  # warm-up (lazy inits, thread pools)
        for spec in (None, TOPK):
            name = spec or "unpruned"
            for batch in batches:
                inputs = C.make_inputs(model, batch)
                with C.peak_memory(args.device) as mem:
                    cache, stats = generate(model, inputs, spec, args.steps)
                kv = C.cache_bytes(cache) // batch
                positions = C.cache_positions(cache)
                if stats is not None:  # the cache holds the kept prompt tokens plus the decoded ones, nothing else
                    assert positions == [int(t) + args.steps - 1 for t in stats.layer_tokens[0]], positions
                kv_sample[name] = kv
                peaks.setdefault(name, []).append((batch, mem["peak"]))
                print(
                    f"{name:<24} {batch:>5} {kv / 2**20:>14.2f} {positions[0]:>16} {mem['peak'] / 2**20:>9.0f} "
                    f"{mem['peak'] / batch / 2**20:>12.1f}",
                    flush=True,
                )
                del cache, inputs
                gc.collect()
        ratio = kv_sample[TOPK] / kv_sample["unpruned"]
        print(f"KV bytes per sample pruned/unpruned: {ratio:.4f}")
        print(f"largest batch within {budget / 2**30:.0f} GiB (weights + fitted peak), vs KV-only bound:")
        for name, points in peaks.items():
            b = torch.tensor([x for x, _ in points], dtype=torch.float64)
            y = torch.tensor([float(v) for _, v in points], dtype=torch.float64)
            slope = float(((b - b.mean()) * (y - y.mean())).sum() / ((b - b.mean()) ** 2).sum())
            intercept = float(y.mean() - slope * b.mean())
            fits = int((budget - weights - intercept) // slope) if slope > 0 else -1
            kv_only = int((budget - weights) // kv_sample[name])
            print(
                f"  {name:<24} {slope / 2**20:8.1f} MiB per sample (+{intercept / 2**20:.0f} MiB fixed) -> batch {fits:>6}"
                f"   KV-only bound {kv_only:>6}"
            )
        del model
        gc.collect()


if __name__ == "__main__":
    main()
