"""Measure a tiny-LLaVA checkpoint on the held-out benchmark: ``python -m tokprune.models.evaluate``.

Prints accuracy by question type (batched greedy ``generate``) and its wall time, majority-class rates,
CLS-attention concentration on object patches, and accuracy with only the top / random / bottom 22% of
patches (by CLS attention) visible. ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from tokprune import data, models
from tokprune.models import diagnostics


def evaluate(path: Path, split: str = "test", n: int = 500, keep: float = 0.22) -> dict:
    """All figures of the model card for the checkpoint at ``path``."""
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    samples = data.benchmark(split, n)
    tower = model.model.vision_tower
    out: dict = {"split": split, "n": n, "majority": diagnostics.majority_rates(samples)}
    out["accuracy"], out["generate_seconds"] = diagnostics.generate_eval(model, processor, samples)
    for layer in (-2, -1):
        out[f"cls_L{layer}"] = diagnostics.cls_stats(tower, samples, layer=layer, keep=keep)
        out[f"prune{int(keep * 100)}_L{layer}"] = diagnostics.pruning_report(
            model, processor, samples, keep=keep, layer=layer)
    out["probe"] = diagnostics.linear_probe(tower, samples[:200])
    return out


def markdown(res: dict, keep: int = 22) -> str:
    """The model card's result tables from an ``evaluate`` result."""
    types = [*data.QUESTION_TYPES, "overall"]
    acc = res["accuracy"]
    maj = res["majority"]
    lines = ["| question type | accuracy | majority-class rate |", "|---|---|---|"]
    lines += [f"| {t} | {acc[t]:.1%} | {maj[t]:.1%} |" if t in maj else f"| {t} | {acc[t]:.1%} | |" for t in types]
    lines += ["", f"{res['n']} `{res['split']}` questions, batched greedy `generate` (batch 100, "
              f"max_new_tokens=3): {res['generate_seconds']:.1f} s on the build machine's 2-core CPU.", ""]
    lines += ["| CLS attention (head mean) | layer -2 (feature layer) | layer -1 (last) |", "|---|---|---|"]
    for k in res["cls_L-2"]:
        lines.append(f"| {k} | {res['cls_L-2'][k]:.3f} | {res['cls_L-1'][k]:.3f} |")
    lines += ["", f"| keep {keep}% of patches by | kept from | overall | " + " | ".join(data.QUESTION_TYPES)
              + " | retained |", "|---" * (4 + len(data.QUESTION_TYPES)) + "|"]
    for layer in ("L-2", "L-1"):
        rep = res[f"prune{keep}_{layer}"]
        full = rep["full"]["overall"]
        for name in ("full", "top", "random", "bottom", "none"):
            r = rep[name]
            label = {"full": "(unpruned)", "top": "top CLS", "random": "random", "bottom": "bottom CLS",
                     "none": "(no image tokens)"}[name]
            lines.append(f"| {label} | {layer} | {r['overall']:.1%} | "
                         + " | ".join(f"{r[t]:.1%}" for t in data.QUESTION_TYPES)
                         + f" | {r['overall'] / full:.0%} |")
    lines += ["", "Linear probe on single patch features (layer -2, held-out patches): "
              + ", ".join(f"{k} {v:.1%}" for k, v in res["probe"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--path", type=Path, default=None, help="checkpoint dir (default: the shipped model)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", action="store_true", help="also print the model card tables")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = evaluate(args.path or models.path(), args.split, args.n)
    res["total_seconds"] = time.perf_counter() - t0
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.markdown:
        print(markdown(res))
    return res


if __name__ == "__main__":
    main()
