"""Adapter overhead (issue 14, item 5): the adapter's own time as a share of the pruned prefill, by batch.

A script, not a test. The LLaVA-1.5-7B-shaped model of ``_common.py`` (2 + 2 layers on the CPU, full
depth with ``--device cuda``), 576 image + 64 text tokens, ``topk(keep_ratio=0.22)``. The adapter is not
edited: forward hooks time every module that does model work (tower embeddings and layers, projector,
token embedding, rotary embedding, decoder layers, final norm, ``lm_head``) and the pipeline steps'
``plan`` is wrapped to time the strategy's decision; what is left of the prefill's wall time is glue:

    glue = prefill - modules - decision

For the pruned prefill the glue is the adapter (roles, masks, packing gathers, per-sample counts, the
syncs they cause) plus HF's mask building it calls per segment; the unpruned prefill's glue (HF's own:
placeholder scatter, masks) is printed beside it at ``--unpruned-batches``. The target is adapter
glue <= 3% of the pruned prefill at batch 1 and 32.

With ``--device cuda`` the script also runs one pruned prefill under
``torch.cuda.set_sync_debug_mode("warn")`` and lists every host-device synchronisation by ``file:line``
(on the CPU there is no device to wait for; the syncs found by reading the code are in
``docs/benchmarks.md``).

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_overhead.py [--batches 1,32] [--repeats 2] [--device cuda]
    python benchmarks/bench_overhead.py --smoke     # tiny widths, batches 1,2: checks the script runs
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: 2 OpenMP threads stall on small matmuls otherwise

import collections
import gc
import warnings

import _common as C
import torch

import tokprune

TOPK = "topk(keep_ratio=0.22)"


class Spans:
    """Total time spent inside a set of modules and functions (CUDA events on a GPU, ``perf_counter`` on the CPU)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.pairs: list[tuple[object, object]] = []
        self._open: list[object] = []

    def start(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open.append(event)
        else:
            self._open.append(C.now())

    def stop(self) -> None:
        begin = self._open.pop()
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = C.now()
        if not self._open:  # nested spans (a wrapped plan inside a hooked module) count once
            self.pairs.append((begin, end))

    def reset(self) -> None:
        self.pairs.clear()

    def total(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(b.elapsed_time(e) for b, e in self.pairs) / 1e3
        return sum(e - b for b, e in self.pairs)


def model_modules(model) -> list[torch.nn.Module]:
    inner = model.model
    tower, lm = inner.vision_tower, inner.language_model
    return [
        tower.embeddings,
        tower.pre_layrnorm,
        *tower.encoder.layers,
        tower.post_layernorm,
        inner.multi_modal_projector,
        lm.embed_tokens,
        lm.rotary_emb,
        *lm.layers,
        lm.norm,
        model.lm_head,
    ]


def instrument(model, pipeline, spans: Spans, decision: Spans) -> list:
    """Hooks timing the model modules into ``spans`` and each step's ``plan`` into ``decision``."""
    handles = []
    for module in model_modules(model):
        handles.append(module.register_forward_pre_hook(lambda *_: spans.start()))
        handles.append(module.register_forward_hook(lambda *_: spans.stop()))
    for step in pipeline:
        original = step.plan

        def plan(ctx, _original=original):
            decision.start()
            try:
                return _original(ctx)
            finally:
                decision.stop()

        step.__dict__["plan"] = plan
    return handles


def breakdown(model, inputs, pipeline, repeats: int, device: str) -> tuple[float, float, float]:
    """``(prefill, modules, decision)`` seconds of the fastest of ``repeats`` rounds (after a warm-up)."""
    spans, decision = Spans(device), Spans(device)
    handles = instrument(model, pipeline or [], spans, decision)
    rounds = []
    try:
        for r in range(repeats + 1):
            spans.reset()
            decision.reset()
            with torch.no_grad(), tokprune.pruned(model, pipeline) if pipeline else _null():
                t = C.once(lambda: model(**inputs, logits_to_keep=1, use_cache=False), device)
            if r:
                rounds.append((t, spans.total(), decision.total()))
    finally:
        for h in handles:
            h.remove()
    return min(rounds)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def find_syncs(model, inputs) -> collections.Counter:
    """``file:line`` of every synchronising CUDA call in one pruned prefill (needs a GPU)."""
    found: collections.Counter = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), tokprune.pruned(model, TOPK):
            warnings.simplefilter("always")
            model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            found[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    return found


def main() -> None:
    p = C.parser(__doc__, dtypes="fp32")
    p.add_argument("--batches", default=None, help="default 1,32 (--smoke: 1,2)")
    p.add_argument("--unpruned-batches", default=None, help="default 1 (CPU), the --batches (cuda)")
    p.set_defaults(default_repeats=2)
    args = p.parse_args()
    dtypes = C.setup(args)
    args.batches = C.pick(args.batches, args, smoke="1,2", cuda="1,32", cpu="1,32")
    batches = [int(b) for b in args.batches.split(",")]
    unpruned_at = [
        int(b) for b in (args.unpruned_batches or ("1" if args.device == "cpu" else args.batches)).split(",")
    ]
    for dtype in dtypes:
        model = C.build(dtype, args.device)
        print(f"\n=== {C.dtype_name(dtype)}: {C.describe(model)} ===")
        print(
            f"{'variant':<24} {'batch':>5} {'prefill ms':>11} {'modules ms':>11} {'decision ms':>12} {'glue ms':>8} "
            f"{'glue share':>10}"
        )
        for batch in batches:
            inputs = C.make_inputs(model, batch)
            variants = [(TOPK, tokprune.strategies.get(TOPK))]
            if batch in unpruned_at:
                variants.insert(0, ("unpruned", None))
            for name, pipeline in variants:
                total, modules, decision = breakdown(model, inputs, pipeline, args.repeats, args.device)
                glue = total - modules - decision
                print(
                    f"{name:<24} {batch:>5} {total * 1e3:>11.1f} {modules * 1e3:>11.1f} {decision * 1e3:>12.2f} "
                    f"{glue * 1e3:>8.1f} {100 * glue / total:>9.2f}%",
                    flush=True,
                )
            if args.device == "cuda":
                syncs = find_syncs(model, inputs)
                print(f"host-device syncs in one pruned prefill at batch {batch}: {sum(syncs.values())}")
                for where, count in syncs.most_common():
                    print(f"    {count:>3} x {where}")
            gc.collect()


if __name__ == "__main__":
    main()
