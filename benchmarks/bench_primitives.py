"""Benchmark of tokprune.scoring primitives against their loop references (a script, not a test).

Run::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_primitives.py [--device cpu|cuda] [--threads 2] [--quick]
    python benchmarks/bench_primitives.py --smoke     # tiny shapes, one round each: checks the script runs

``OMP_WAIT_POLICY=PASSIVE`` keeps idle OpenMP threads from spinning, which matters on a small shared CPU
(the 2-core dev box) where spinning threads steal time from the kneed/Python loops being compared.
Timings are the minimum over repeats (least disturbed by other processes), per call and per curve/sample.

Part 1 compares the batched knee finder with a per-row ``kneed.KneeLocator`` loop and with a bare
``torch.sort`` of the same scores (the floor, since the knee finder must sort) at B=64 and B=1024, N=576.
Targets on the 2-core CPU: >= 8x faster than kneed and within 2x of the sort.
Part 2 times each primitive at LLaVA-1.5 shapes (N=576 patches, C=1024, 16 heads; LLM side L=640,
32 heads x 128 dims, Q=64 queries) against its loop reference from the tests.
Part 3 times the LLM-stage cut of ragged candidate sets (every sample its own count, as after a
vision-stage cut plus questions of different lengths): one ``find_knee(..., lengths=)`` call against one
call per distinct count (how ``_cut`` bucketed rows before ``lengths`` existed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tokprune import scoring

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_scoring as refs  # noqa: E402  (the slow loop references live with the tests)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes every part times (LLaVA-1.5's by default; ``--smoke``: :data:`SMOKE`)."""

    knee_batches: tuple[int, ...] = (64, 1024)
    knee_n: int = 576  # patches per curve
    b: int = 4  # vision side: images, patches, channels, heads
    n: int = 576
    c: int = 1024
    heads: int = 16
    lh: int = 32  # LLM side: heads, tokens, head dim, question rows
    length: int = 640
    d: int = 128
    nq: int = 64
    ragged_batches: tuple[int, ...] = (16, 256)
    ragged_min: int = 40  # candidate counts drawn from [ragged_min, length]


#: tiny shapes for --smoke: the same code paths in a fraction of a second each
SMOKE = Shapes(
    knee_batches=(8, 16),
    knee_n=48,
    b=2,
    n=48,
    c=32,
    heads=2,
    lh=2,
    length=48,
    d=8,
    nq=8,
    ragged_batches=(4, 8),
    ragged_min=8,
)
#: timing rounds (repeats, min seconds per round) for the batched calls; --smoke: one quick round
ROUNDS = {"repeat": 7, "min_time": 0.05}


def timeit(fn: Callable[[], object], device: str, repeat: int | None = None, min_time: float | None = None) -> float:
    """Minimum seconds per call over ``repeat`` rounds of enough calls to last ``min_time`` (defaults: ROUNDS)."""
    repeat = ROUNDS["repeat"] if repeat is None else min(repeat, ROUNDS["repeat"])
    min_time = ROUNDS["min_time"] if min_time is None else min(min_time, ROUNDS["min_time"])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    number = max(1, int(min_time / once))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def long_tailed_scores(b: int, n: int, device: str) -> torch.Tensor:
    """CLS-attention-like rows: softmax of Gaussian logits with a few artifact tokens."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, n + 1, generator=g)
    art = torch.randint(0, n + 1, (b, 3), generator=g)
    logits.scatter_add_(1, art, torch.full((b, 3), 8.0))
    return torch.softmax(logits, dim=-1)[:, 1:].contiguous().to(device)


def kneed_loop(scores: torch.Tensor) -> list[float | None]:
    from kneed import KneeLocator

    x = np.arange(scores.shape[1])
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row in scores.cpu().numpy():
            v = np.sort(row)[::-1]
            out.append(KneeLocator(x, v, curve="convex", direction="decreasing").knee)
    return out


def bench_knee(device: str, quick: bool, shapes: Shapes) -> None:
    print(f"\n== knee finder, N={shapes.knee_n} (us per curve; min over repeats) ==")
    hdr = f"{'B':>5} {'sort':>8} {'find_knee':>10} {'knee_chord':>11} {'kneed loop':>11} {'knee/sort':>10} {'kneed/knee':>11}"
    print(hdr)
    for b in shapes.knee_batches:
        s = long_tailed_scores(b, shapes.knee_n, device)
        t_sort = timeit(lambda s=s: torch.sort(s, dim=1, descending=True), device)
        t_knee = timeit(lambda s=s: scoring.find_knee(s), device)
        t_chord = timeit(lambda s=s: scoring.knee_chord(s), device)
        kb = min(64, b) if quick else b  # the kneed loop is linear in B; time a slice when asked to be quick
        t_kneed = timeit(lambda s=s[:kb]: kneed_loop(s), device, repeat=3, min_time=0.0) * b / kb
        us = 1e6 / b
        print(
            f"{b:>5} {t_sort * us:>8.1f} {t_knee * us:>10.1f} {t_chord * us:>11.1f} {t_kneed * us:>11.1f} "
            f"{t_knee / t_sort:>9.2f}x {t_kneed / t_knee:>10.1f}x"
        )


def bench_ragged(device: str, shapes: Shapes) -> None:
    low, high = shapes.ragged_min, shapes.length
    print(f"\n== ragged knee (LLM stage), rows of {low}-{high} candidates (us per call; min over repeats) ==")
    print(f"{'B':>5} {'distinct':>9} {'lengths=':>10} {'per count':>10} {'speed-up':>9}")
    for b in shapes.ragged_batches:
        g = torch.Generator().manual_seed(1)
        lengths = torch.randint(low, high + 1, (b,), generator=g).to(device)
        s = long_tailed_scores(b, high, device)

        def bucketed(s: torch.Tensor = s, lengths: torch.Tensor = lengths) -> torch.Tensor:
            out = torch.empty_like(lengths)
            for width in torch.unique(lengths).tolist():
                rows = (lengths == width).nonzero().flatten()
                out[rows] = scoring.find_knee(s[rows, :width])
            return out

        assert torch.equal(bucketed(), scoring.find_knee(s, lengths=lengths))
        t_one = timeit(lambda s=s, n=lengths: scoring.find_knee(s, lengths=n), device)
        t_per = timeit(bucketed, device)
        distinct = len(torch.unique(lengths))
        print(f"{b:>5} {distinct:>9} {t_one * 1e6:>10.0f} {t_per * 1e6:>10.0f} {t_per / t_one:>8.1f}x")


def bench_primitives(device: str, quick: bool, shapes: Shapes) -> None:
    print(
        f"\n== primitives at N={shapes.n}, C={shapes.c} (ms per call; loop = reference from tests/test_scoring.py) =="
    )
    b, n, c, heads = shapes.b, shapes.n, shapes.c, shapes.heads
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, n + 1, c, generator=g).to(device)
    k = torch.randn(b, n + 1, c, generator=g).to(device)
    hidden = torch.randn(b, n + 1, c, generator=g).to(device)
    scores = long_tailed_scores(b, n, device)
    feats = torch.randn(b, n, c, generator=g).to(device)
    kk = (torch.tensor([32, 64, 100, 144][:b]) * n // 576).clamp(min=1).to(device)  # 6-25% kept
    keep = scoring.topk_mask(scores, kk)
    # LLM side: L=640 tokens, 32 heads x 128 dims, 64 query rows (the question tokens)
    lb, lh, length, d, nq = 1, shapes.lh, shapes.length, shapes.d, shapes.nq
    lq = torch.randn(lb, lh, length, d, generator=g).to(device)
    lk = torch.randn(lb, lh, length, d, generator=g).to(device)
    qidx = torch.arange(length - nq, length, device=device)[None].expand(lb, nq).contiguous()
    pad = torch.ones(lb, length, dtype=torch.bool, device=device)
    probs = scoring.query_attention(lq, lk, qidx, pad)
    qvalid = torch.ones(lb, nq, dtype=torch.bool, device=device)
    cpu = lambda t: t.cpu()  # noqa: E731  (loop references run on the CPU)

    cases = [
        (
            "cls_attention 1 head",
            f"[{b},{n + 1},{c}]",
            lambda: scoring.cls_attention(q, k),
            lambda: refs.ref_cls_attention(cpu(q), cpu(k), 1),
        ),
        (
            f"cls_attention {heads} heads",
            f"[{b},{n + 1},{c}]",
            lambda: scoring.cls_attention(q, k, heads),
            lambda: refs.ref_cls_attention(cpu(q), cpu(k), heads),
        ),
        (
            "cls_cosine_similarity",
            f"[{b},{n + 1},{c}]",
            lambda: scoring.cls_cosine_similarity(hidden),
            lambda: refs.ref_cls_cos(cpu(hidden)),
        ),
        (
            "query_attention",
            f"[{lb},{lh},{length},{d}] Q={nq}",
            lambda: scoring.query_attention(lq, lk, qidx, pad),
            lambda: refs.ref_query_attention(cpu(lq), cpu(lk), cpu(qidx), cpu(pad)),
        ),
        (
            "attention_received",
            f"[{lb},{lh},{nq},{length}]",
            lambda: scoring.attention_received(probs, qvalid, qidx),
            lambda: refs.ref_attention_received(cpu(probs), cpu(qvalid), cpu(qidx)),
        ),
        (
            "iqr_outlier_count",
            f"[{b},{n}]",
            lambda: scoring.iqr_outlier_count(scores),
            lambda: refs.ref_iqr(cpu(scores)),
        ),
        (
            "lof_outlier_count k=20",
            f"[{b},{n}]",
            lambda: scoring.lof_outlier_count(scores),
            lambda: refs.ref_lof(cpu(scores)),
        ),
        (
            "topk_mask",
            f"[{b},{n}]",
            lambda: scoring.topk_mask(scores, kk),
            lambda: refs.ref_topk_mask(cpu(scores), cpu(kk)),
        ),
        (
            "prumerge_merge k=32",
            f"[{b},{n},{c}]",
            lambda: scoring.prumerge_merge(feats, k[:, 1:], scores, keep),
            lambda: refs.ref_prumerge_merge(cpu(feats), cpu(k[:, 1:]), cpu(scores), cpu(keep)),
        ),
        (
            "prumerge_extra_token",
            f"[{b},{n},{c}]",
            lambda: scoring.prumerge_extra_token(feats, scores, keep),
            lambda: refs.ref_extra_token(cpu(feats), cpu(scores), cpu(keep)),
        ),
        (
            "ragged_gather",
            f"[{b},{n},{c}]",
            lambda: scoring.ragged_gather(feats, keep),
            lambda: refs.ref_ragged_gather(cpu(feats), cpu(keep)),
        ),
    ]
    print(f"{'primitive':<24} {'shape':<24} {'batched':>9} {'loop':>10} {'speed-up':>9}")
    for name, shape, fast, slow in cases:
        t_fast = timeit(fast, device)
        t_slow = timeit(slow, "cpu", repeat=1 if quick else 2, min_time=0.0)
        print(f"{name:<24} {shape:<24} {t_fast * 1e3:>9.3f} {t_slow * 1e3:>10.1f} {t_slow / t_fast:>8.0f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="time the slow loops on fewer repeats / rows")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one round: checks the script runs (seconds)")
    args = ap.parse_args()
    shapes = SMOKE if args.smoke else Shapes()
    if args.smoke:
        ROUNDS.update(repeat=1, min_time=0.0)
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__} on {name}"
        + (", SMOKE: tiny shapes, the figures mean nothing" if args.smoke else "")
    )
    bench_knee(args.device, args.quick, shapes)
    bench_primitives(args.device, args.quick, shapes)
    bench_ragged(args.device, shapes)


if __name__ == "__main__":
    main()
