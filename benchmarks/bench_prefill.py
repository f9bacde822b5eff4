"""Prefill benchmark of the LLaVA adapter (issue 3, item 9), and of the LLaVA-NeXT and Qwen2.5-VL
adapters at their high-resolution shapes (issue 12). A script, not a test.

A LLaVA-1.5-7B-shaped model built from config with random weights, real widths (CLIP-L/14-336 tower,
Llama-7B language model) but only 2 vision and 2 LLM layers; batch 1, 576 image + 64 text tokens;
fp32 and bf16. Prints, per dtype:

* prefill time unpruned vs ``topk(keep_ratio=0.22)`` vs ``cls_knee+text_interact(layer=1)``, with the
  FLOP model's predicted speedup next to the measured one;
* the decision (scoring) time of each strategy as a fraction of one full-length LLM layer;
* FastV scored from layer K-1's q/k (what the adapter does) vs the reference way (a second pass of
  layer K-1's attention in eager mode with its weights, last-token row);
* one decode step against the pruned vs the unpruned KV cache.

``--family next`` and ``--family qwen`` (or a list, ``--family llava,next,qwen``) print the prefill part
for the other two families, each measured speedup beside the FLOP model's (``handle.stats``) and their ratio:

* ``next``: a LLaVA-NeXT-7B-shaped ``LlavaNextForConditionalGeneration`` (``_common.build_next``: the same
  tower and LLM widths and depth, llava-v1.6's AnyRes grids), one 672 x 672 image: the base view + 2 x 2
  tiles (5 tower passes), 576 + 48^2 + 48 row newlines = 2,928 LLM tokens; ``topk(keep_ratio=0.22)`` and
  ``cls_knee+text_interact(layer=1)`` through the ``llava_next`` adapter;
* ``qwen``: a Qwen2.5-VL-7B-shaped ``Qwen2_5_VLForConditionalGeneration`` (``_common.build_qwen``: tower
  1280 wide, 16 heads, gated MLP 3420, windows of 112 px, merger to 3584; LLM 3584 wide, MLP 18944, 28
  heads, 4 key-value heads, vocabulary 152064), 2 vision blocks (one windowed, one full attention) + 2
  LLM layers, one 1920 x 1080 (Full HD) image, which Qwen's processor keeps at native resolution and
  rounds to 1932 x 1092 px: 69 x 39 = 2,691 LLM tokens (10,764 patches), near LLaVA-NeXT's 2,928 so the
  families compare at like token counts. Its tower has no CLS token, so ``topk`` is refused; the 22% row
  is ``random(keep_ratio=0.22)`` (the same kept count with no scoring cost, what the FLOP model counts),
  the composite ``divprune(keep_ratio=0.22)+text_interact(layer=1)``.

Every other registered family (``tokprune adapters``: SmolVLM, and any family a plugin registers) runs
on its own tiny model (``Family.tiny()``) with the same two rows, ``random(keep_ratio=0.22)`` and
``random(keep_ratio=0.22)+fastv(layer=K, keep_ratio=0.5)`` at the layer its tiny case names: a tiny-shaped
measurement, its speedup printed beside the FLOP model's, until a real-shaped case is written for it.
``--family`` takes registered names (``llava_next`` and ``qwen2_5_vl`` are ``next`` and ``qwen``).

``--smoke`` runs every registered family on its tiny model with one round: a check that the script runs
(seconds), not a measurement.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_prefill.py [--repeats 5] [--dtypes fp32,bf16] [--device cuda]
        [--family llava|next|qwen|<registered family>|llava,next,qwen] [--clock cpu] [--smoke]

``--device cuda`` runs the full-depth models of ``_common.py`` instead (LLaVA and LLaVA-NeXT: 24 vision +
32 LLM layers; Qwen2.5-VL: 32 vision blocks, 4 of them full attention, + 28 LLM layers; bf16 by default),
timed with CUDA events after synchronising.

Times are the best of interleaved rounds (the machine is shared). Prefill runs with
``logits_to_keep=1`` (what ``generate`` does), pruned and unpruned alike.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: 2 OpenMP threads stall on small matmuls otherwise

import argparse
import gc
import platform
import time
from collections.abc import Callable

import _common
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import tokprune
from tokprune import LLMContext, TokenRole, VisionContext, VisionSignals
from tokprune import hf_compat as hf

IMAGE_TOKEN = 32000
N_TEXT = 64
TOPK = "topk(keep_ratio=0.22)"
COMPOSITE = "cls_knee+text_interact(layer=1)"
FASTV = "fastv(layer=1, keep_ratio=0.22)"
DEVICE = "cpu"  # set by --device
SMOKE = False  # set by --smoke: the tiny test models
#: the families with a real-shaped case (the registered name -> its section's short name)
REAL_SHAPED = {"llava": "llava", "llava_next": "next", "qwen2_5_vl": "qwen"}
ALIASES = {short: name for name, short in REAL_SHAPED.items()}
#: what each family compares with its unpruned prefill: 22% kept at the vision stage, then a composite
#: with an LLM-stage step. Qwen2.5-VL's tower has no CLS token (``topk``/``cls_knee`` read it).
SPECS = {
    "llava": (TOPK, COMPOSITE),
    "llava_next": (TOPK, COMPOSITE),
    "qwen2_5_vl": ("random(keep_ratio=0.22)", "divprune(keep_ratio=0.22)+text_interact(layer=1)"),
}
TITLES = {"llava_next": "LLaVA-NeXT-7B shape", "qwen2_5_vl": "Qwen2.5-VL-7B shape"}


def registered() -> dict[str, type]:
    """Every registered family by name (``tokprune adapters``), in registration order."""
    from tokprune.adapters import registered_adapters

    return {cls.name: cls for cls, _ in registered_adapters()}


def tiny_specs(cls: type, llm_layer: int) -> tuple[str, ...]:
    """The two rows of a family without a real-shaped case: a vision cut (where it has a vision stage) and it
    followed by an LLM-stage cut at the layer its tiny case names."""
    llm = f"fastv(layer={llm_layer}, keep_ratio=0.5)"
    if not getattr(cls, "has_vision_stage", True):
        return (llm,)
    return ("random(keep_ratio=0.22)", f"random(keep_ratio=0.22)+{llm}")


def build(dtype: torch.dtype) -> LlavaForConditionalGeneration:
    if DEVICE != "cpu":
        return _common.build(dtype, DEVICE)  # full depth
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=2,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(config)
    return model.to(dtype).eval()


def llava_case(dtype: torch.dtype) -> tuple[LlavaForConditionalGeneration, dict[str, torch.Tensor]]:
    """The LLaVA-1.5 model and prompt: the 7B-shaped slice, or the tiny test model with ``--smoke``."""
    if SMOKE:
        from tokprune.testing.models import tiny_llava

        model, make = tiny_llava(seed=0, dtype=dtype)
        return model, make((N_TEXT,))
    return build(dtype), make_inputs(dtype)


def make_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(100, 30000, (N_TEXT,), generator=gen)
    # <s> USER : <image>*576 question ASSISTANT : -> 64 text tokens in all
    ids = torch.cat([text[:3], torch.full((576,), IMAGE_TOKEN), text[3:]])[None]
    pixels = torch.randn(1, 3, 336, 336, generator=gen).to(dtype)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    return {k: v.to(DEVICE) for k, v in out.items()}


def once(fn: Callable[[], object]) -> float:
    if DEVICE != "cpu" or _common.CLOCK == "cpu":
        return _common.once(fn, DEVICE)  # CUDA events (synchronised), or process CPU time
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``fn`` in seconds over ``repeats`` calls after a warm-up call.

    The minimum, not the median: on a shared 2-core machine the slow calls measure the neighbours.
    """
    fn()
    return min(once(fn) for _ in range(repeats))


def prefill(model, inputs) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(**inputs, logits_to_keep=1, use_cache=False)

    return run


def spy(pipeline: tokprune.Pipeline) -> dict[str, object]:
    """Wrap each step's ``plan`` on the instance to keep the last context it saw."""
    seen: dict[str, object] = {}
    for step in pipeline:
        original = step.plan

        def plan(ctx, _original=original, _name=step.name):
            seen[_name] = ctx
            return _original(ctx)

        step.__dict__["plan"] = plan
    return seen


def fresh(ctx):
    """The same context with an empty signal cache (vision signals memoise derived scores)."""
    if isinstance(ctx, VisionContext):
        s = ctx.signals
        signals = VisionSignals(s._fetch, s.num_layers, s.num_heads, declared=s._declared, cls_index=s.cls_index)
        return VisionContext(features=ctx.features, signals=signals, grid=ctx.grid)
    return ctx


def decision_time(pipeline: tokprune.Pipeline, contexts: dict[str, object], repeats: int) -> dict[str, float]:
    out = {}
    for step in pipeline:
        ctx = contexts[step.name]
        out[step.name] = timed(lambda step=step, ctx=ctx: step(fresh(ctx)), repeats)
    return out


def layer_time(model, inputs, repeats: int) -> float:
    """One full-length decoder layer (the unit of the scoring overhead)."""
    lm = model.model.language_model
    h = torch.randn(1, inputs["input_ids"].shape[1], lm.config.hidden_size, dtype=model.dtype, device=DEVICE)
    pos = torch.arange(h.shape[1], device=DEVICE)[None]
    pe = lm.rotary_emb(h, position_ids=pos)

    def run() -> object:
        with torch.no_grad():
            return lm.layers[1](h, attention_mask=None, position_ids=pos, position_embeddings=pe)

    return timed(run, repeats)


def fastv_reference(model, inputs, repeats: int) -> tuple[float, float, float]:
    """FastV scored from q/k (adapter) vs from eager weights of a second pass of layer K-1 (reference)."""
    lm = model.model.language_model
    captured: dict[str, object] = {}
    hook = lm.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: captured.update(h=args[0], kw=kwargs), with_kwargs=True
    )
    pipeline = tokprune.strategies.get(FASTV)
    contexts = spy(pipeline)
    try:
        with tokprune.pruned(model, pipeline):
            prefill(model, inputs)()
    finally:
        hook.remove()
    ctx: LLMContext = contexts["fastv"]  # type: ignore[assignment]
    qk_time = decision_time(pipeline, contexts, repeats)["fastv"]
    step = pipeline[0]
    h, kw = captured["h"], captured["kw"]
    attn = lm.layers[0].self_attn
    mask = hf.attention_mask(kw["position_ids"].new_ones(h.shape[:2], dtype=torch.bool), h.shape[1], h.dtype, "eager")

    def second_pass() -> torch.Tensor:
        # Layer K-1's attention again, eager, for its weights (FastV's lmms-eval port, LLMC's pre-hook).
        saved = attn.config._attn_implementation
        attn.config._attn_implementation = "eager"
        try:
            with torch.no_grad():
                _, weights = attn(lm.layers[0].input_layernorm(h), kw["position_embeddings"], mask)
        finally:
            attn.config._attn_implementation = saved
        row = weights[:, :, -1].float().mean(1)  # last token's row, head mean
        image = ctx.role_mask(TokenRole.IMAGE)
        k = int(round(int(image.sum()) * 0.22))
        return row.masked_fill(~image, float("-inf")).topk(k).indices

    ref_time = timed(second_pass, repeats)
    with torch.no_grad():
        ours = step(ctx).keep & ctx.role_mask(TokenRole.IMAGE)
    # In bf16 the eager weights are rounded to bf16 (ties reorder), our scores are fp32: report the overlap.
    ours_set, ref_set = set(ours[0].nonzero().flatten().tolist()), set(second_pass()[0].tolist())
    return qk_time, ref_time, len(ours_set & ref_set) / len(ref_set)


def decode_step(model, inputs, spec: str | None, repeats: int) -> float:
    """One greedy decode step against the cache a prefill left (pruned with ``spec``, or unpruned)."""
    handle = tokprune.patch(model, spec) if spec else None
    try:
        with torch.no_grad():
            out = model(**inputs, logits_to_keep=1, use_cache=True)
            cache = hf.output_cache(out)
            n = inputs["input_ids"].shape[1]
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.ones(1, n + 1, dtype=torch.long, device=DEVICE)
            state = {"mask": mask, "pos": n}

            def step() -> object:
                # Each call appends one position; the cache grows by one token per repeat (negligible).
                r = model(
                    input_ids=token,
                    attention_mask=state["mask"],
                    position_ids=torch.tensor([[state["pos"]]], device=DEVICE),
                    **{hf.cache_keyword(type(model).forward): cache},
                    use_cache=True,
                    logits_to_keep=1,
                )
                state["mask"] = torch.cat([state["mask"], torch.ones(1, 1, dtype=torch.long, device=DEVICE)], dim=1)
                state["pos"] += 1
                return r

            return timed(step, repeats)
    finally:
        if handle is not None:
            handle.remove()


def prefill_times(
    model, inputs, repeats: int, specs: tuple[str, ...] = (TOPK, COMPOSITE), question_end: object = None
) -> tuple[dict[str, float], dict[str, object], dict[str, object]]:
    """Best prefill time of each variant, measured in interleaved rounds (same background load for all)."""
    pipelines = {spec: tokprune.strategies.get(spec) for spec in specs}
    contexts = {spec: spy(p) for spec, p in pipelines.items()}
    times: dict[str, list[float]] = {"unpruned": [], **{spec: [] for spec in pipelines}}
    stats = {}
    for _ in range(repeats + 1):  # round 0 warms up
        times["unpruned"].append(once(prefill(model, inputs)))
        for spec, pipeline in pipelines.items():
            with tokprune.pruned(model, pipeline, question_end=question_end) as run:
                times[spec].append(once(prefill(model, inputs)))
                stats[spec] = run.stats
    best = {k: min(v[1:]) for k, v in times.items()}
    return best, stats, {"pipelines": pipelines, "contexts": contexts}


def run_dtype(dtype: torch.dtype, repeats: int) -> None:
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    print(f"\n=== llava: {'tiny model' if SMOKE else 'LLaVA-1.5-7B shape'}, {name} ===", flush=True)
    model, inputs = llava_case(dtype)
    best, stats, spied = prefill_times(model, inputs, repeats)
    one_layer = layer_time(model, inputs, repeats)
    t_full = best["unpruned"]
    print(
        f"prefill unpruned                      {t_full * 1e3:8.1f} ms   (one LLM layer at "
        f"{inputs['input_ids'].shape[1]} tokens: {one_layer * 1e3:.1f} ms)"
    )
    for spec in (TOPK, COMPOSITE):
        t, st = best[spec], stats[spec]
        predicted = float(st.flops_unpruned[0] / st.flops_pruned[0])
        kept = {k: int(v[0]) for k, v in st.llm_kept.items()}
        print(
            f"prefill {spec:<30} {t * 1e3:8.1f} ms   speedup {t_full / t:4.2f}x measured, {predicted:4.2f}x "
            f"FLOP model; visual kept {int(st.visual_kept[0])}/{st.visual_total}, llm kept {kept}, "
            f"tokens/layer {float(st.tokens_layer_avg[0]):.0f}"
        )
        pipeline, contexts = spied["pipelines"][spec], spied["contexts"][spec]
        for step_name, seconds in decision_time(pipeline, contexts, repeats).items():
            share = 100 * seconds / one_layer
            print(f"    scoring {step_name:<14} {seconds * 1e3:7.2f} ms = {share:5.2f}% of one layer")
    qk, ref, same = fastv_reference(model, inputs, repeats)
    print(
        f"FastV scoring: from q/k {qk * 1e3:.2f} ms vs eager second pass of layer K-1 {ref * 1e3:.2f} ms "
        f"({ref / qk:.0f}x slower); kept sets agree on {100 * same:.1f}%"
    )
    d_full = decode_step(model, inputs, None, repeats * 4)
    d_pruned = decode_step(model, inputs, TOPK, repeats * 4)
    print(
        f"decode step: unpruned cache {d_full * 1e3:.1f} ms, pruned cache ({TOPK}) {d_pruned * 1e3:.1f} ms "
        f"({d_full / d_pruned:.2f}x)"
    )
    del model
    gc.collect()


def tiny_family_case(name: str, dtype: torch.dtype) -> tuple[object, dict, str, tuple[str, ...], object]:
    """A registered family's own tiny model (``cls.tiny()``), its prompt, description, rows and question end."""
    cls = registered()[name]
    case = cls.tiny(seed=0, attn_implementation="sdpa")
    if case is None:
        raise SystemExit(f"--family {name}: the family provides no tiny model (ModelAdapter.tiny)")
    model = case.model.to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.make_inputs((N_TEXT,)).items()}
    specs = SPECS[name] if name in SPECS else tiny_specs(cls, case.llm_layer)
    return model, inputs, f"tiny test model ({cls.__name__}.tiny())", specs, case.question_end


def family_case(family: str, dtype: torch.dtype, sizes: dict[str, tuple[int, int]]) -> tuple[object, dict, str]:
    """Model, prompt and a one-line description of the LLaVA-NeXT or Qwen2.5-VL section."""
    if family == "llava_next":
        model = _common.build_next(dtype, DEVICE)
        inputs = _common.next_inputs(model, sizes["next"])
        passes = inputs["pixel_values"].shape[1]
        widths = "CLIP-L/14-336 and Llama-7B widths, AnyRes over 336-px tiles"
        image = f"{passes} tower passes (base + tiles)"
    else:
        model = _common.build_qwen(dtype, DEVICE)
        inputs = _common.qwen_inputs(model, sizes["qwen"])
        widths = "Qwen2.5-VL-7B widths (window + full attention tower, 2x2 merger, GQA LLM)"
        image = f"{inputs['pixel_values'].shape[0]:,} patches"
    v, t = model.config.vision_config, model.config.text_config
    h, w = sizes[REAL_SHAPED[family]]
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_image
    depth = f"{getattr(v, 'depth', None) or v.num_hidden_layers} + {t.num_hidden_layers} layers"
    return model, inputs, f"{widths}, {depth}, image {h} x {w} px: {image}, {n_image:,} image + {n_text} text tokens"


def run_family(family: str, dtype: torch.dtype, repeats: int, sizes: dict[str, tuple[int, int]]) -> None:
    """The prefill part for one family: unpruned vs each of its specs, measured beside the FLOP model."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    tiny = SMOKE or family not in TITLES
    title = "tiny model" if tiny else TITLES[family]
    print(f"\n=== {family}: {title}, {name} ===", flush=True)
    if tiny:
        model, inputs, description, specs, question_end = tiny_family_case(family, dtype)
    else:
        (model, inputs, description), specs, question_end = family_case(family, dtype, sizes), SPECS[family], None
    print(f"model: {description}, {DEVICE}")
    best, stats, _ = prefill_times(model, inputs, repeats, specs, question_end=question_end)
    t_full = best["unpruned"]
    any_stats = stats[specs[0]]
    layers = any_stats.layer_tokens.shape[1]
    llm_full = float(any_stats.flop_model.llm(any_stats.seq_len[:, None].expand(-1, layers))[0])
    share = 100 * llm_full / float(any_stats.flops_unpruned[0])
    print(
        f"prefill unpruned                      {t_full * 1e3:8.1f} ms   (FLOP model: "
        f"{float(any_stats.flops_unpruned[0]) / 1e9:,.1f} GMAC, LLM layers {share:.0f}%, tower and projector the rest)"
    )
    for spec in specs:
        t, st = best[spec], stats[spec]
        predicted = float(st.flops_unpruned[0] / st.flops_pruned[0])
        measured = t_full / t
        kept = {k: int(v[0]) for k, v in st.llm_kept.items()}
        visual = int(st.visual_unpruned[0]) if st.visual_unpruned is not None else st.visual_total
        print(
            f"prefill {spec:<30} {t * 1e3:8.1f} ms   speedup {measured:4.2f}x measured, {predicted:4.2f}x "
            f"FLOP model, measured/model {measured / predicted:.2f}; visual kept {int(st.visual_kept[0])}/{visual}, "
            f"llm kept {kept}, tokens/layer {float(st.tokens_layer_avg[0]):.0f}"
        )
    del model
    gc.collect()


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW in pixels, e.g. 672x672; got {text!r}") from None
    return h, w


def _families(text: str) -> list[str]:
    """Registered family names (or the short names ``next`` and ``qwen``), in the order given."""
    names = [ALIASES.get(n.strip(), n.strip()) for n in text.split(",")]
    known = registered()
    unknown = [n for n in names if n not in known]
    if unknown:
        choices = ", ".join([*known, *ALIASES])
        raise argparse.ArgumentTypeError(f"unknown family {unknown[0]!r}; choose from {choices}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=_common.DEVICES)
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="CPU timing: wall or process CPU time")
    parser.add_argument(
        "--family",
        type=_families,
        default=["llava"],
        help="comma-separated registered families (tokprune adapters; next, qwen: llava_next, qwen2_5_vl); "
        "default llava",
    )
    parser.add_argument("--next-image", type=_size, default=(672, 672), help="LLaVA-NeXT image, HxW px")
    parser.add_argument("--qwen-image", type=_size, default=(1092, 1932), help="Qwen2.5-VL image, HxW px (x 28)")
    parser.add_argument(
        "--smoke", action="store_true", help="every registered family on its tiny model, one round (seconds)"
    )
    args = parser.parse_args()
    _common.CLOCK = args.clock
    global DEVICE, SMOKE
    DEVICE, SMOKE = args.device, args.smoke
    if SMOKE:
        if DEVICE != "cpu":
            raise SystemExit(f"--smoke runs the tiny models on the CPU; got --device {DEVICE}")
        args.repeats, args.family = 1, list(registered())
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}, {platform.processor() or platform.machine()}, clock {args.clock}"
    )
    dtypes = args.dtypes if DEVICE == "cpu" or args.dtypes != "fp32,bf16" else "bf16"
    sizes = {"next": args.next_image, "qwen": args.qwen_image}
    for family in args.family:
        cls = registered()[family]
        if hf.older_than(cls.min_transformers):
            print(f"\n=== {family}: skipped, tested from transformers {cls.min_transformers} ===")
            continue
        if family == "llava":
            depth = "24 + 32 layers (full)" if DEVICE != "cpu" else "2 + 2 layers"
            if SMOKE:
                print(f"model: tiny test model (--smoke), batch 1, {DEVICE}")
            else:
                print(
                    f"model: CLIP-L/14-336 and Llama-7B widths, {depth}, batch 1, 576 image + 64 text tokens, {DEVICE}"
                )
        for d in dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[d.strip()]
            if family == "llava":
                run_dtype(dtype, args.repeats)
            else:
                run_family(family, dtype, args.repeats, sizes)


if __name__ == "__main__":
    main()
