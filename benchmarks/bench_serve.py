"""Serving with vLLM: stock requests vs tokprune-pruned ones in one engine, one run, beside the token-count model.

A Qwen2.5-VL checkpoint built from config with random weights at Qwen2.5-VL-3B's text widths (2048 wide,
11008 MLP, 16 heads, 2 KV heads) and a small tower (the LLM dominates, as at real scale), saved with a
trained BPE tokenizer and processor; on the CPU 2 decoder layers, ``--device cuda`` 36 (full depth, bf16).
A 448x448 image is 256 visual tokens. One engine serves every variant: requests with no spec (what stock
vLLM runs: the plugin leaves them alone) and requests with ``divprune`` at 25/50/75% of the image tokens
pruned (``mm_processor_kwargs={"tokprune": ...}``), interleaved round by round so drift hits all alike.

At each concurrency ``C`` (1, 8, 32) a round submits ``C`` requests at once (distinct images: no encoder
cache hits) and waits for all: prompt tokens, time to first token (a round with ``max_tokens=1``),
requests/s and output tokens/s (rounds with ``--max-tokens``). The token-count model predicts the speedup
of a prefill-bound step as the ratio of prompt tokens, unpruned/pruned; decoding (weight-bound at small
``C``) and the tower (unchanged by pruning) make the measured ratio smaller, so measured/model says how much
of the token saving reaches the server. Prints ratios measured in one run; no assertion.

    python benchmarks/bench_serve.py [--device cpu|cuda] [--concurrency 1,8,32] [--pruned 0.25,0.5,0.75]
        [--rounds N] [--max-tokens N] [--layers N] [--profile] [--smoke]

``--profile``: after the table, where a request's time goes at concurrency 1, per variant (ms per request,
median over the rounds): the frontend processor (tokprune's spec check and placeholder sizing inside it),
the encoder step (vLLM's tower plus tokprune's selection), the selection alone (``ServingPlan.select``), the
plugin's M-RoPE position work, the LLM's prefill forward, its decode forwards, and the rest (scheduling,
sampling, detokenizing: the engine's Python). Timers wrap the methods of this one in-process engine (on CUDA
each synchronises, which slows the run a little, and forwards replayed from CUDA graphs, the decode steps,
bypass the forward's timer and land in "rest"). Then the ceiling the token-count model allows a request
whose other parts do not shrink: the stock request with only its prefill forward scaled by the prompt ratio
(``meas/ceiling`` near 1: the plugin loses nothing beyond what pruning cannot reach).

``--video``: the same on videos (``--frames`` frames of ``--image`` side, 2 fps): stock, tokprune's ``evs``
per request, and vLLM's own EVS (``video_pruning_rate``, engine-wide: one more engine per rate, each running
the same requests with no spec) at the same rates, side by side (issue 24 item 6). vLLM's EVS runs on the
CPU only because tokprune's plugin sets the runner flag ``CPUModelRunner`` never sets.

``--smoke``: the tiny test checkpoint, concurrency 1 and 2, one round (seconds of work after the engine
starts). Needs vLLM (docs/serving.md); without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>describe the image. what color is the square?"
    "<|im_end|>\n<|im_start|>assistant\n"
)
VIDEO_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>describe the video. what moves?"
    "<|im_end|>\n<|im_start|>assistant\n"
)
WIDTHS_3B = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
TOWER = {
    "depth": 2,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_heads": 4,
    "out_hidden_size": 2048,
    "window_size": 112,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--pruned", default="0.25,0.5,0.75", help="fractions of the image tokens pruned")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per variant and concurrency")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 2 on cpu, 36 on cuda)")
    ap.add_argument("--image", type=int, default=448, help="image side in pixels (448: 256 tokens)")
    ap.add_argument("--profile", action="store_true", help="also: where a request's time goes (concurrency 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny checkpoint, concurrency 1,2, one round")
    ap.add_argument("--video", action="store_true", help="videos: tokprune's evs vs vLLM's own EVS at equal rates")
    ap.add_argument("--frames", type=int, default=16, help="frames per video (--video; 2 per temporal patch group)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.concurrency, args.rounds, args.max_tokens, args.image = "1,2", 1, 4, 32
        args.frames = min(args.frames, 8)
    args.layers = args.layers or (36 if args.device == "cuda" else 2)
    return args


def build(path: str, args: argparse.Namespace) -> str:
    from tokprune.testing.checkpoints import save_tiny_qwen2_5_vl

    if args.smoke:
        return str(save_tiny_qwen2_5_vl(path))
    text = {**WIDTHS_3B, "num_hidden_layers": args.layers}
    return str(save_tiny_qwen2_5_vl(path, text=text, vision=TOWER, patch_size=14, max_pixels=args.image**2))


def images(seed: int, count: int, side: int) -> list:
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray((rng.rand(side, side, 3) * 255).astype("uint8")) for _ in range(count)]


def videos(seed: int, count: int, side: int, frames: int) -> list:
    """``(uint8 [F, side, side, 3], metadata)`` per video at 2 fps (vLLM needs the metadata)."""
    rng = np.random.RandomState(seed)
    meta = {"fps": 2.0, "total_num_frames": frames, "frames_indices": list(range(frames)), "duration": frames / 2.0}
    return [((rng.rand(frames, side, side, 3) * 255).astype("uint8"), meta) for _ in range(count)]


def run_round(
    llm, spec: str | None, count: int, max_tokens: int, seed: int, side: int, frames: int = 0
) -> tuple[float, list]:
    from vllm import SamplingParams

    requests = []
    media = videos(seed, count, side, frames) if frames else images(seed, count, side)
    for item in media:
        request = (
            {"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": item}}
            if frames
            else {"prompt": PROMPT, "multi_modal_data": {"image": item}}
        )
        if spec is not None:
            request["mm_processor_kwargs"] = {"tokprune": spec}
        requests.append(request)
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - start, outputs


PROFILED = {  # label -> (where, method): the pieces of a request --profile times
    "frontend": ("processor", "apply"),
    "encoder+select": ("model", "embed_multimodal"),
    "select": ("serving", "select"),
    "positions": ("model", "get_mrope_input_positions"),
    "recompute": ("model", "recompute_mrope_positions"),
    "forward": ("model", "forward"),
}


class Profile:
    """Wall time spent inside the methods of :data:`PROFILED`, per label (the forward split into prefill and
    decode by the number of positions it runs)."""

    def __init__(self, device: str) -> None:
        import torch

        from tokprune import serving
        from tokprune.integrations import vllm_plugin

        classes = vllm_plugin._classes()  # noqa: SLF001 - the benchmark times the plugin's own classes
        self.owners = {
            "processor": classes["TokpruneQwen2_5_VLProcessor"],
            "model": classes["TokpruneQwen2_5_VL"],
            "serving": serving.ServingPlan,
        }
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = {}
        self.saved: list[tuple[type, str, object]] = []

    def __enter__(self) -> Profile:
        for label, (owner, name) in PROFILED.items():
            cls = self.owners[owner]
            original = getattr(cls, name)
            self.saved.append((cls, name, cls.__dict__.get(name)))

            def timed(*args, _original=original, _label=label, **kwargs):
                self.sync()
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.sync()
                    label = _label
                    if label == "forward":
                        positions = kwargs.get("positions", args[2] if len(args) > 2 else None)
                        label = "prefill" if positions is not None and positions.shape[-1] > 1 else "decode"
                    self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

            setattr(cls, name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, name, original in reversed(self.saved):
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
        self.saved.clear()

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {}
        return seconds


def profile(llm, variants: list[tuple[str, str | None]], args: argparse.Namespace) -> None:
    """Where one request's time goes at concurrency 1, per variant (ms per request, median of the rounds), and
    the ceiling the token-count model allows when only the prefill forward shrinks with the prompt."""
    labels = ["frontend", "encoder+select", "select", "positions", "recompute", "prefill", "decode", "rest", "total"]
    rows: dict[str, dict[str, list[float]]] = {name: {label: [] for label in labels} for name, _ in variants}
    prompts: dict[str, int] = {}
    rounds = max(args.rounds, 3)
    with Profile(args.device) as timers:
        seed = 10_000
        for _ in range(rounds):
            for name, spec in variants:
                seed += 1
                timers.take()
                wall, outs = run_round(llm, spec, 1, args.max_tokens, seed, args.image)
                seconds = timers.take()
                seconds["total"] = wall
                prompts[name] = len(outs[0].prompt_token_ids)
                # select runs inside the encoder step, recompute inside the runner's step before prefill
                inside = ("frontend", "encoder+select", "positions", "recompute", "prefill", "decode")
                seconds["rest"] = wall - sum(seconds.get(label, 0.0) for label in inside)
                for label in labels:
                    rows[name][label].append(seconds.get(label, 0.0))
    median = {name: {label: float(np.median(v)) for label, v in row.items()} for name, row in rows.items()}
    print(
        f"\nwhere a request's time goes at concurrency 1 (ms per request, median of {rounds} rounds; "
        f"{args.max_tokens} output tokens: 1 prefill + {args.max_tokens - 1} decode forwards)"
    )
    print(f"{'variant':<12} " + " ".join(f"{label:>14}" for label in labels))
    for name, _ in variants:
        print(f"{name:<12} " + " ".join(f"{median[name][label] * 1e3:>14.1f}" for label in labels), flush=True)
    # ceiling: the stock request with only its prefill forward shortened by the token-count model
    stock = median["stock"]
    print(
        "\nspeedup per request (stock total / variant total) beside the token-count model and its prefill-only "
        "ceiling (the stock request with only its prefill forward scaled by the prompt ratio)"
    )
    print(f"{'variant':<12} {'total x':>8} {'prefill x':>9} {'model x':>8} {'ceiling x':>9} {'meas/ceiling':>12}")
    for name, _ in variants:
        ratio = prompts["stock"] / prompts[name]
        ceiling = stock["total"] / (stock["total"] - stock["prefill"] * (1 - 1 / ratio))
        total = stock["total"] / median[name]["total"]
        prefill = stock["prefill"] / median[name]["prefill"] if median[name]["prefill"] else float("nan")
        print(
            f"{name:<12} {total:>7.2f}x {prefill:>8.2f}x {ratio:>7.2f}x {ceiling:>8.2f}x {total / ceiling:>12.2f}",
            flush=True,
        )


def engine(llm_class, path: str, args: argparse.Namespace, concurrency: list[int], rate: float | None):
    """One in-process engine; ``rate``: vLLM's own EVS at that ``video_pruning_rate`` (None: off)."""
    tokens = 320 if not args.video else (args.image // 28) ** 2 * (args.frames // 2) + 64
    return llm_class(
        model=path,
        max_model_len=max(1024, tokens + 64),
        max_num_seqs=max(concurrency),
        max_num_batched_tokens=max(2048, max(concurrency) * tokens),
        limit_mm_per_prompt={"image": 0, "video": 1} if args.video else {"image": 1, "video": 0},
        dtype="bfloat16" if args.device == "cuda" else "float32",
        enforce_eager=args.device == "cpu",
        seed=0,
        enable_prefix_caching=False,
        **({"video_pruning_rate": rate} if rate is not None else {}),
        **({"kv_cache_memory_bytes": 2 << 30, "gpu_memory_utilization": 0.05} if args.device == "cpu" else {}),
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if importlib.util.find_spec("vllm") is None:
        print("vLLM is not installed (docs/serving.md: the CPU recipe): nothing measured")
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    concurrency = [int(c) for c in args.concurrency.split(",")]
    pruned = [float(p) for p in args.pruned.split(",")]
    frames = args.frames if args.video else 0
    method = "evs" if args.video else "divprune"
    # (name, engine: None = the tokprune engine, else vLLM's own EVS at that video_pruning_rate, spec)
    variants: list[tuple[str, float | None, str | None]] = [("stock", None, None)] + [
        (f"{int(p * 100)}% pruned", None, f"{method}(keep_ratio={1 - p:g})") for p in pruned
    ]
    if args.video:
        variants += [(f"{int(p * 100)}% vLLM EVS", p, None) for p in pruned]
    with tempfile.TemporaryDirectory() as tmp:
        path = build(tmp, args)
        start = time.perf_counter()
        engines = {rate: engine(LLM, path, args, concurrency, rate) for rate in dict.fromkeys(v[1] for v in variants)}
        llm = engines[None]
        print(
            f"{len(engines)} engine(s) ready in {time.perf_counter() - start:.1f} s; {args.layers} decoder layers, "
            f"{args.device}"
        )
        for _, rate, spec in variants:  # warm-up: the first request of each path pays one-off costs
            run_round(engines[rate], spec, 1, 1, 999, args.image, frames)
        media = f"videos of {frames} frames" if frames else "images"
        print(
            f"{method} through tokprune's vLLM plugin vs no spec"
            + (" vs vLLM's own EVS (engine-wide rate)" if args.video else "")
            + f" on {media}, {args.rounds} rounds each, median; model = token-count model (prompt tokens unpruned/pruned)"
        )
        print(
            f"{'conc':>4} {'variant':<12} {'prompt':>6} {'TTFT s':>8} {'req/s':>8} {'out tok/s':>9} "
            f"{'TTFT x':>7} {'req/s x':>7} {'model x':>7} {'meas/model':>10}",
            flush=True,
        )
        seed = 0
        for c in concurrency:
            table: dict[str, dict] = {}
            for _ in range(args.rounds):  # variants interleaved within each round
                for name, rate, spec in variants:
                    seed += 1
                    ttft, _ = run_round(engines[rate], spec, c, 1, seed, args.image, frames)
                    seed += 1
                    wall, outs = run_round(engines[rate], spec, c, args.max_tokens, seed, args.image, frames)
                    row = table.setdefault(name, {"ttft": [], "wall": []})
                    row["ttft"].append(ttft)
                    row["wall"].append(wall)
                    row["prompt"] = len(outs[0].prompt_token_ids)
            base = table["stock"]
            base_ttft, base_wall = np.median(base["ttft"]), np.median(base["wall"])
            for name, _, _ in variants:
                row = table[name]
                ttft, wall = np.median(row["ttft"]), np.median(row["wall"])
                rps, tps = c / wall, c * args.max_tokens / wall
                model = base["prompt"] / row["prompt"]
                speed = base_wall / wall
                print(
                    f"{c:>4} {name:<12} {row['prompt']:>6} {ttft:>8.3f} {rps:>8.2f} {tps:>9.1f} "
                    f"{base_ttft / ttft:>6.2f}x {speed:>6.2f}x {model:>6.2f}x {speed / model:>10.2f}",
                    flush=True,
                )
        if args.profile and not args.video:
            profile(llm, [(name, spec) for name, _, spec in variants], args)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
