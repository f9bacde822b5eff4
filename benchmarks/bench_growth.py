"""Cost growth (issue 14, item 3): prefill time vs the number of image tokens, unpruned and at 22% kept.

A script, not a test. The LLaVA-1.5-7B-shaped model of ``_common.py`` (2 + 2 layers on the CPU, full
depth with ``--device cuda``), batch 1, 64 text tokens, with more image tokens in one of two layouts:

* ``--layout size`` (default): the tower's image size raised, 336 / 476 / 756 px, i.e. 24^2 = 576,
  34^2 = 1,156 and 54^2 = 2,916 patches (the squares nearest 576, 1,152, 2,880); the tower's own
  attention grows quadratically too, unpruned in both variants;
* ``--layout tiles``: 1 / 2 / 5 images of 576 patches in the prompt (576, 1,152, 2,880 exactly), the
  LLaVA-NeXT token count with a LLaVA-1.5 tower;
* ``--layout next``: the 2,880-token point on a real LLaVA-NeXT-7B-shaped
  ``LlavaNextForConditionalGeneration`` (same widths and depth, AnyRes over 336-px tiles) through the
  LLaVA-NeXT adapter: one 672 x 672 image, i.e. 5 tower passes (base + 2 x 2 tiles) and 576 + 48^2 + 48
  newlines = 2,928 tokens. Its ratio columns are relative to ``--layout tiles``' first point (576
  tokens, LLaVA-1.5), run first.

For each count it prints the unpruned and ``topk(keep_ratio=0.22)`` prefill times, the measured speedup
beside the FLOP model's (``handle.stats``, FastV's formula: full ``2 n^2 d`` attention) and beside the
same model with the LLM's attention counted as the causal kernels compute it (``d n (n + 1)``, see
``_common.causal_attention_overcount``: at 2,880 tokens the full term is 10% of an unpruned layer's
count, half of it never computed), and each variant's time and FLOPs relative to the smallest count:
the pruned cost should grow with the kept tokens, the unpruned with the input ones.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_growth.py [--layout size|tiles] [--repeats 2] [--device cuda]
    python benchmarks/bench_growth.py --smoke [--layout ...]     # tiny widths, same token counts, 1 round
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: 2 OpenMP threads stall on small matmuls otherwise

import gc

import _common as C
import torch

import tokprune

TOPK = "topk(keep_ratio=0.22)"
#: (tower image size, images in the prompt); "next": the LLaVA-1.5 576-token reference, then the LLaVA-NeXT point.
LAYOUTS = {
    "size": ((336, 1), (476, 1), (756, 1)),
    "tiles": ((336, 1), (336, 2), (336, 5)),
    "next": ((336, 1), (672, "next")),
}


def tiled_inputs(model, images: int) -> dict[str, torch.Tensor]:
    """One prompt with ``images`` image blocks (one per tile) and ``N_TEXT`` text tokens in all."""
    one = C.make_inputs(model, 1)
    if images == 1:
        return one
    ids = one["input_ids"][0]
    block = torch.full((C.num_patches(model),), C.IMAGE_TOKEN, device=ids.device)
    ids = torch.cat([ids[:3], *[block] * (images - 1), ids[3:]])[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": one["pixel_values"].repeat(images, 1, 1, 1),
    }


def main() -> None:
    p = C.parser(__doc__, dtypes="fp32")
    p.add_argument("--layout", default="size", choices=sorted(LAYOUTS))
    args = p.parse_args()
    dtypes = C.setup(args)
    for dtype in dtypes:
        print(f"\n=== {C.dtype_name(dtype)}, layout {args.layout} ===", flush=True)
        print(
            f"{'image tok':>9} {'unpruned ms':>12} {'pruned ms':>10} {'speedup':>8} {'FLOP model':>10} {'meas/model':>10} "
            f"{'causal':>7} {'meas/causal':>11} {'kept':>5} {'t_u/t_u0':>9} {'F_u/F_u0':>9} {'t_p/t_p0':>9} {'F_p/F_p0':>9}"
        )
        base = None
        for image_size, images in LAYOUTS[args.layout]:
            if images == "next":
                model = C.build_next(dtype, args.device)
                inputs = C.next_inputs(model, (image_size, image_size))
            else:
                model = C.build(dtype, args.device, image_size=image_size)
                inputs = tiled_inputs(model, images)
            pipeline = tokprune.strategies.get(TOPK)

            def unpruned(model=model, inputs=inputs):
                with torch.no_grad():
                    model(**inputs, logits_to_keep=1, use_cache=False)

            def pruned(model=model, inputs=inputs, pipeline=pipeline):
                with torch.no_grad(), tokprune.pruned(model, pipeline):
                    model(**inputs, logits_to_keep=1, use_cache=False)

            best = C.best_of({"unpruned": unpruned, "pruned": pruned}, args.repeats, args.device)
            with torch.no_grad(), tokprune.pruned(model, pipeline) as run:
                model(**inputs, logits_to_keep=1, use_cache=False)
            st = run.stats
            fu, fp = float(st.flops_unpruned[0]), float(st.flops_pruned[0])
            d, layers = model.config.text_config.hidden_size, st.layer_tokens.shape[1]
            causal_x = (fu - float(C.causal_attention_overcount(st.seq_len[:, None].expand(-1, layers), d)[0])) / (
                fp - float(C.causal_attention_overcount(st.layer_tokens, d)[0])
            )
            tu, tp = best["unpruned"], best["pruned"]
            base = base or (tu, fu, tp, fp)
            n_img = int(st.visual_unpruned[0])
            measured, model_x = tu / tp, fu / fp
            print(
                f"{n_img:>9} {tu * 1e3:>12.0f} {tp * 1e3:>10.0f} {measured:>7.2f}x {model_x:>9.2f}x "
                f"{measured / model_x:>10.2f} {causal_x:>6.2f}x {measured / causal_x:>11.2f} "
                f"{int(st.visual_kept[0]):>5} {tu / base[0]:>9.2f} {fu / base[1]:>9.2f} "
                f"{tp / base[2]:>9.2f} {fp / base[3]:>9.2f}",
                flush=True,
            )
            del model, inputs, pipeline, run
            gc.collect()


if __name__ == "__main__":
    main()
