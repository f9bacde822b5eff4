"""Shared pieces of the serving benchmarks (issue 14): the LLaVA-1.5-7B-shaped model, clocks, memory, and the
memory-traffic model of a decode step.

The model is ``LlavaForConditionalGeneration`` built from config with random weights at real widths
(CLIP-L/14-336 tower: 1024 wide, 16 heads; Llama-7B: 4096 wide, 11008 MLP, 32 heads, vocabulary 32064).
On the CPU it is the 2 vision + 2 LLM layer slice of ``bench_prefill.py``; with ``--device cuda`` it is
full depth (24 + 32 layers, bf16, sdpa), the real LLaVA-1.5-7B cost.

Memory-traffic model of one greedy decode step (weight-bound at batch 1, cache-bound at large batch)::

    bytes(step) = W + passes * B * KV

``W``: bytes of the weights a step reads (decoder layers, final norm, ``lm_head``; the embedding table
is only indexed); ``KV``: bytes of one sample's cache, ``sum_l 2 * kv_heads * head_dim * n_l * itemsize``
over the layers ``l`` holding ``n_l`` positions; ``passes``: how often a step touches the cache. A
preallocated (static/paged) cache is read once by attention (``passes=1``, the issue's model); HF's
``DynamicCache`` appends with ``torch.cat``, which reads and rewrites the whole cache every step before
attention reads it (``passes=3``). The predicted speedup of a pruned cache is the ratio of the bytes.

The bytes model assumes every byte costs the same time and nothing else does. Where the machine computes
the weights' matmuls slower than it reads them (a CPU without native bf16 at batch 32, say), a step is
compute-bound in that part and the bytes model over-predicts. The roofline model of a step (see
:func:`roofline_step_seconds`) prices each part by its own bound, with the machine's copy bandwidth ``BW``,
its matmul rate ``R`` for the dtype and the batch's row count, and the rate ``BWa`` at which
``DynamicCache``'s ``torch.cat`` appends (a new tensor every step: on the CPU, fresh pages), all measured
in the same run (:func:`measure_bandwidth`, :func:`measure_matmul_rate`, :func:`measure_append_bandwidth`)::

    t(step) = max(W / BW, F / R) + B * KV / BW + 2 * B * KV / BWa,    F = 2 * B * (weights of the matmuls)

(attention reads the cache once; the append reads and writes it). With ``BWa = BW`` and memory-bound
weights this is the bytes model with three passes.

Summed, not one ``max`` over the whole step: eager PyTorch runs a layer's weight matmuls and its cache
copies and attention one after the other on the same cores, so their times add; each part is bound by
its own resource. The cache part is priced by bytes alone: appending copies it (no arithmetic) and
attention does ~1 multiply-add per cached element (``2 * itemsize`` bytes), far below any CPU or GPU's
ratio of compute to bandwidth.

``--smoke`` (every script) swaps in tiny widths and depths (:data:`SMOKE_WIDTHS`) and small defaults, so
the same code paths, printing included, run in seconds on a CPU; ``gpu_check.sh --smoke`` dry-runs the
prepared GPU script that way.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

IMAGE_TOKEN = 32000
N_TEXT = 64
PATCH = 14
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("cpu", "cuda")

#: "wall" (perf_counter) or "cpu" (process CPU time of all threads), set by --clock; CUDA always uses events
CLOCK = "wall"

#: set by --smoke: tiny widths and depths instead of LLaVA-1.5-7B's (same image token counts)
SMOKE = False
#: the --smoke model: LLaVA-1.5-7B's structure (CLIP tower, Llama LLM, vocabulary, patch grid), tiny widths
SMOKE_WIDTHS = {
    "vision_hidden": 32,
    "vision_mlp": 64,
    "vision_heads": 2,
    "vision_layers": 2,
    "hidden": 64,
    "mlp": 128,
    "heads": 4,
    "llm_layers": 2,
}

#: passes over the cache per decode step: attention's read, plus torch.cat's read and write in DynamicCache
DYNAMIC_CACHE_PASSES = 3
#: of which torch.cat's (the append): read the old cache, write the new one
APPEND_PASSES = 2


# -- the traffic model (pure; tests/test_bench_common.py) ------------------------------------------------


def kv_bytes(tokens_per_layer: Sequence[int] | Tensor, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Bytes of one sample's KV cache whose layer ``l`` holds ``tokens_per_layer[l]`` positions (keys + values)."""
    tokens = torch.as_tensor(tokens_per_layer, dtype=torch.long)
    if tokens.dim() != 1 or bool((tokens < 0).any()):
        raise ValueError(f"tokens_per_layer must be a 1-d sequence of counts >= 0, got {tokens_per_layer!r}")
    for name, value in (("kv_heads", kv_heads), ("head_dim", head_dim), ("itemsize", itemsize)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return int(2 * kv_heads * head_dim * itemsize * tokens.sum())


def decode_bytes(weight_bytes: float, kv_per_sample: float, batch: int, passes: int = 1) -> float:
    """Bytes one decode step moves: the weights once, the batch's cache ``passes`` times (see module doc)."""
    if batch < 1 or passes < 1 or weight_bytes < 0 or kv_per_sample < 0:
        raise ValueError(
            f"need batch >= 1, passes >= 1 and sizes >= 0; got batch={batch}, passes={passes}, "
            f"weight_bytes={weight_bytes}, kv_per_sample={kv_per_sample}"
        )
    return weight_bytes + passes * batch * kv_per_sample


def predicted_decode_speedup(
    weight_bytes: float, kv_full: float, kv_pruned: float, batch: int, passes: int = 1
) -> float:
    """Step time unpruned / pruned if a step costs its bytes (memory-bound): ``bytes(full) / bytes(pruned)``."""
    return decode_bytes(weight_bytes, kv_full, batch, passes) / decode_bytes(weight_bytes, kv_pruned, batch, passes)


def roofline_step_seconds(
    weight_bytes: float,
    weight_flops: float,
    cache_read: float,
    bandwidth: float,
    matmul_rate: float,
    cache_appended: float = 0.0,
    append_bandwidth: float | None = None,
) -> float:
    """Seconds of one decode step on a machine with ``bandwidth`` bytes/s and ``matmul_rate`` FLOP/s.

    ``max(weight_bytes / bandwidth, weight_flops / matmul_rate) + cache_read / bandwidth
    + cache_appended / append_bandwidth``: the weight matmuls are bound by whichever of reading and
    computing takes longer; attention's read of the cache by bandwidth; the bytes ``torch.cat`` reads and
    writes to append to it by the rate of that append (``append_bandwidth``, default ``bandwidth``); the
    parts run one after the other, so they add (see the module doc).
    """
    append_bandwidth = bandwidth if append_bandwidth is None else append_bandwidth
    values = {
        "weight_bytes": weight_bytes,
        "weight_flops": weight_flops,
        "cache_read": cache_read,
        "cache_appended": cache_appended,
        "bandwidth": bandwidth,
        "matmul_rate": matmul_rate,
        "append_bandwidth": append_bandwidth,
    }
    rates = ("bandwidth", "matmul_rate", "append_bandwidth")
    bad = {k: v for k, v in values.items() if not v >= 0 or (k in rates and v <= 0)}
    if bad:
        raise ValueError(f"need sizes >= 0 and rates > 0, got {bad}")
    weights = max(weight_bytes / bandwidth, weight_flops / matmul_rate)
    return weights + cache_read / bandwidth + cache_appended / append_bandwidth


def weight_bound(weight_bytes: float, weight_flops: float, bandwidth: float, matmul_rate: float) -> str:
    """``"compute"`` if the weight matmuls take longer to compute than to read, else ``"memory"``."""
    return "compute" if weight_flops / matmul_rate > weight_bytes / bandwidth else "memory"


def predicted_roofline_speedup(
    weight_bytes: float,
    weight_flops: float,
    kv_full: float,
    kv_pruned: float,
    batch: int,
    bandwidth: float,
    matmul_rate: float,
    append_passes: int = 0,
    append_bandwidth: float | None = None,
    append_bandwidth_pruned: float | None = None,
) -> float:
    """Step time unpruned / pruned under :func:`roofline_step_seconds`; the weights' part is the same in both.

    ``weight_flops``: FLOPs of the step's weight matmuls at this ``batch``; ``kv_*``: one sample's cache,
    read once by attention; ``append_passes``: passes over it to append (0 for a static cache,
    :data:`APPEND_PASSES` for ``DynamicCache``) at ``append_bandwidth`` (the pruned cache's at
    ``append_bandwidth_pruned``, default the same: see :func:`measure_append_bandwidth`).
    """
    if batch < 1 or append_passes < 0:
        raise ValueError(f"need batch >= 1 and append_passes >= 0, got batch={batch}, append_passes={append_passes}")
    pruned_rate = append_bandwidth if append_bandwidth_pruned is None else append_bandwidth_pruned

    def step(kv: float, rate: float | None) -> float:
        appended = append_passes * batch * kv
        return roofline_step_seconds(weight_bytes, weight_flops, batch * kv, bandwidth, matmul_rate, appended, rate)

    return step(kv_full, append_bandwidth) / step(kv_pruned, pruned_rate)


def causal_attention_overcount(layer_tokens: Tensor, d: int) -> Tensor:
    """Multiply-adds the FLOP model's attention term counts beyond what causal attention computes.

    ``layer_tokens``: long ``[B, L]``, the tokens each LLM layer holds; returns fp64 ``[B]``. The model
    (``tokprune.stats.layer_flops``, FastV's formula) counts ``2 n^2 d`` per layer for ``QK^T`` and ``AV``
    over every pair of positions. Under a causal mask query ``i`` sees keys ``0..i``: ``n (n + 1) / 2``
    pairs, ``d n (n + 1)`` multiply-adds for both products; PyTorch's sdpa kernels (CPU flash attention,
    CUDA flash / memory-efficient) skip the blocks above the diagonal, so ``d n (n - 1)`` per layer is
    counted but never computed. A vision tower's attention is not causal and keeps its full term.
    """
    if layer_tokens.dim() != 2 or bool((layer_tokens < 0).any()) or d < 1:
        raise ValueError(f"need layer_tokens long [B, L] >= 0 and d >= 1, got shape {tuple(layer_tokens.shape)}, d={d}")
    n = layer_tokens.to(torch.float64)
    return (d * n * (n - 1)).sum(dim=-1)


def cache_bytes(cache: object) -> int:
    """Exact bytes the keys and values of a ``DynamicCache`` hold (every layer, every sample), from its tensors.

    A left-padded batch stores its padding too; it is counted (it is memory the cache holds).
    """
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ValueError(f"expected a transformers Cache with .layers, got {type(cache).__name__}")
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))


def cache_positions(cache: object) -> list[int]:
    """Positions each layer of a ``DynamicCache`` holds (layers past a pruning point hold fewer)."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """``W``: bytes of the language model's weights a decode step reads (all but the embedding table)."""
    lm = model.model.language_model
    parts = [lm.layers, lm.norm, model.lm_head]
    return sum(p.numel() * p.element_size() for part in parts for p in part.parameters())


def decode_weight_flops(model: torch.nn.Module, batch: int) -> int:
    """``F``: FLOPs of a decode step's weight matmuls at ``batch`` rows (every ``nn.Linear`` of the decoder
    layers and ``lm_head``: 2 per weight per row; norms and biases are noise)."""
    lm = model.model.language_model
    linears = [m for part in (lm.layers, model.lm_head) for m in part.modules() if isinstance(m, torch.nn.Linear)]
    return 2 * batch * sum(m.weight.numel() for m in linears)


def measure_bandwidth(device: str = "cpu", nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes/s of ``dst.copy_(src)`` over ``nbytes`` (read + written, so ``2 * nbytes`` moved), best of
    ``repeats`` on the benchmark clock (:func:`once`): the rate a decode step streams weights and cache at."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages before timing
    return 2 * nbytes / min(once(lambda: dst.copy_(src), device) for _ in range(repeats))


def measure_append_bandwidth(
    shape: Sequence[int], dtype: torch.dtype = torch.float32, device: str = "cpu", repeats: int = 3
) -> float:
    """Bytes/s (read + written) of ``torch.cat([cache, one_position], dim=-2)`` on a ``shape`` cache tensor
    (one layer's keys, ``[B, kv_heads, positions, head_dim]``), the way ``DynamicCache`` appends: into a
    new tensor every step.

    On the CPU the rate depends on the size. glibc serves blocks above its mmap threshold (at most 32 MiB)
    with fresh pages from the kernel and unmaps them on free, so such an append pays a page fault and the
    kernel's zeroing per 4 KiB on top of the copy, several times slower than :func:`measure_bandwidth`;
    smaller blocks reuse the heap. Hence the real tensor's shape, per variant: a pruned cache can fall
    below the threshold where the unpruned one does not. On a GPU the caching allocator reuses memory.
    """
    cache = torch.ones(*shape, dtype=dtype, device=device)
    one = torch.ones(*shape[:-2], 1, shape[-1], dtype=dtype, device=device)
    for _ in range(2):  # the first frees set glibc's threshold, as a decode's first steps do
        torch.cat([cache, one], dim=-2)
    moved = 2 * cache.numel() * cache.element_size()
    return moved / min(once(lambda: torch.cat([cache, one], dim=-2), device) for _ in range(repeats))


def measure_matmul_rate(
    dtype: torch.dtype, rows: int, inner: int, device: str = "cpu", cols: int = 256, calls: int = 8, repeats: int = 3
) -> float:
    """FLOP/s of ``F.linear`` on ``[rows, inner]`` inputs and a ``[cols, inner]`` weight in ``dtype``.

    The weight (4 MiB in fp32 at ``inner=4096``) stays in the CPU's last-level cache across the ``calls``,
    so this is the compute roof for this row count and dtype, not the memory one.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=gen).to(device, dtype)
    w = torch.randn(cols, inner, generator=gen).to(device, dtype)

    def run() -> None:
        for _ in range(calls):
            torch.nn.functional.linear(x, w)

    run()
    return 2 * rows * inner * cols * calls / min(once(run, device) for _ in range(repeats))


# -- the model ----------------------------------------------------------------------------------------


def build(
    dtype: torch.dtype,
    device: str = "cpu",
    *,
    vision_layers: int | None = None,
    llm_layers: int | None = None,
    image_size: int = 336,
) -> torch.nn.Module:
    """LLaVA-1.5-7B-shaped model with random weights; depth defaults to 2+2 on CPU and 24+32 on CUDA."""
    from transformers import LlavaForConditionalGeneration

    config = build_config(device, vision_layers=vision_layers, llm_layers=llm_layers, image_size=image_size)
    return _instantiate(LlavaForConditionalGeneration, config, dtype, device)


def build_config(
    device: str = "cpu", *, vision_layers: int | None = None, llm_layers: int | None = None, image_size: int = 336
) -> object:
    """The ``LlavaConfig`` of :func:`build` (LLaVA-1.5-7B widths)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    full = device != "cpu"
    w = SMOKE_WIDTHS if SMOKE else {}
    vision = CLIPVisionConfig(
        hidden_size=w.get("vision_hidden", 1024),
        intermediate_size=w.get("vision_mlp", 4096),
        num_hidden_layers=vision_layers or w.get("vision_layers") or (24 if full else 2),
        num_attention_heads=w.get("vision_heads", 16),
        image_size=image_size,
        patch_size=PATCH,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=w.get("hidden", 4096),
        intermediate_size=w.get("mlp", 11008),
        num_hidden_layers=llm_layers or w.get("llm_layers") or (32 if full else 2),
        num_attention_heads=w.get("heads", 32),
        num_key_value_heads=w.get("heads", 32),
        max_position_embeddings=8192,
        pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=(image_size // PATCH) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _instantiate(cls: type, config: object, dtype: torch.dtype, device: str) -> torch.nn.Module:
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    torch.manual_seed(0)
    # Initialise in the target dtype on the target device: a full-depth fp32 copy would double GPU memory.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    return model.eval()


#: LLaVA-NeXT-7B's AnyRes grids (llava-v1.6-vicuna-7b), in pixels of 336-px tiles.
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_next(
    dtype: torch.dtype, device: str = "cpu", *, vision_layers: int | None = None, llm_layers: int | None = None
) -> torch.nn.Module:
    """LLaVA-NeXT-7B-shaped ``LlavaNextForConditionalGeneration`` with random weights: :func:`build`'s tower
    and LLM widths, AnyRes over 336-px tiles; depth defaults as in :func:`build`."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    base = build_config(device, vision_layers=vision_layers, llm_layers=llm_layers)
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return _instantiate(LlavaNextForConditionalGeneration, config, dtype, device)


def next_inputs(
    model: torch.nn.Module, image_size: tuple[int, int] = (672, 672), n_text: int = N_TEXT
) -> dict[str, Tensor]:
    """One ``<s> USER : <image>*P question ASSISTANT :`` prompt for an image of ``image_size`` (h, w) px.

    ``P`` (base image + the tiles unpadded to the image's aspect ratio + a newline per row) and the tile
    count are the model's own (:func:`tokprune.adapters.llava_next.anyres_layout`), as its processor would expand them.
    """
    from tokprune.adapters.llava_next import anyres_layout, anyres_tiles

    device, dtype = model.device, model.dtype
    side = model.config.vision_config.image_size
    sizes = torch.tensor([list(image_size)])
    tiles = anyres_tiles(model.config, sizes)
    tokens = int(anyres_layout(model.model, tiles, num_patches(model), sizes, "default")[0].numel())
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(100, 30000, (n_text,), generator=gen)
    ids = torch.cat([text[:3], torch.full((tokens,), IMAGE_TOKEN), text[3:]])[None]
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(1, tiles[0], 3, side, side, generator=gen).to(device, dtype),
        "image_sizes": sizes.to(device),
    }


#: Qwen2.5-VL-7B-Instruct's widths (its config.json): tower 32 blocks of 1280 (16 heads, gated MLP 3420),
#: full attention in blocks 7/15/23/31, windows of 112 px; merger to 3584; Qwen2.5-7B LLM (28 layers,
#: 28 heads, 4 key-value heads, MLP 18944, vocabulary 152064).
QWEN_IMAGE, QWEN_VISION_START, QWEN_VISION_END = 151655, 151652, 151653


def build_qwen(
    dtype: torch.dtype, device: str = "cpu", *, vision_layers: int | None = None, llm_layers: int | None = None
) -> torch.nn.Module:
    """Qwen2.5-VL-7B-shaped ``Qwen2_5_VLForConditionalGeneration`` with random weights; depth 2 + 2 on the
    CPU (block 1 full attention, block 0 windowed: one block of each kind), 32 + 28 on CUDA."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    depth = vision_layers or (32 if device != "cpu" else 2)
    full = [i for i in (7, 15, 23, 31) if i < depth] if depth > 2 else [1]
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": depth,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": full,
            "hidden_act": "silu",
        },
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": llm_layers or (28 if device != "cpu" else 2),
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "pad_token_id": 151643,
        },
        image_token_id=QWEN_IMAGE,
        vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
        # The CPU slice shares lm_head with the embedding (2.2 GB less fp32 memory on a shared 23 GiB
        # machine); the prefill computes one row of logits (logits_to_keep=1) either way.
        tie_word_embeddings=device == "cpu",
    )
    return _instantiate(Qwen2_5_VLForConditionalGeneration, config, dtype, device)


def qwen_inputs(
    model: torch.nn.Module, image_size: tuple[int, int] = (1092, 1932), n_text: int = N_TEXT
) -> dict[str, Tensor]:
    """One ``<s> USER : <vision_start><image>*P<vision_end> question`` prompt for an image already resized
    to ``image_size`` (h, w) px, multiples of ``patch * merge`` (28) as Qwen's processor makes them:
    ``P = (h / 28) (w / 28)`` LLM tokens from ``(h / 14) (w / 14)`` patches."""
    vcfg = model.config.vision_config
    unit = vcfg.patch_size * vcfg.spatial_merge_size
    h, w = image_size
    if h % unit or w % unit or h < unit or w < unit:
        raise ValueError(f"image_size must be positive multiples of {unit} px (Qwen's resize), got {image_size}")
    grid = torch.tensor([[1, h // vcfg.patch_size, w // vcfg.patch_size]])
    tokens = int(grid.prod()) // vcfg.spatial_merge_size**2
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(100, 30000, (n_text - 2,), generator=gen)
    image = torch.tensor([QWEN_VISION_START, *[model.config.image_token_id] * tokens, QWEN_VISION_END])
    ids = torch.cat([text[:3], image, text[3:]])[None]
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    device, dtype = model.device, model.dtype
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(int(grid.prod()), patch_dim, generator=gen).to(device, dtype),
        "image_grid_thw": grid.to(device),
        "mm_token_type_ids": (ids == model.config.image_token_id).int().to(device),
    }


def num_patches(model: torch.nn.Module) -> int:
    cfg = model.config.vision_config
    return (cfg.image_size // cfg.patch_size) ** 2


def make_inputs(model: torch.nn.Module, batch: int = 1, n_text: int = N_TEXT) -> dict[str, Tensor]:
    """``batch`` copies of ``<s> USER : <image>*N question ASSISTANT :`` (``n_text`` text tokens in all)."""
    device, dtype = model.device, model.dtype
    side = model.config.vision_config.image_size
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(100, 30000, (n_text,), generator=gen)
    ids = torch.cat([text[:3], torch.full((num_patches(model),), IMAGE_TOKEN), text[3:]])[None].repeat(batch, 1)
    pixels = torch.randn(1, 3, side, side, generator=gen).repeat(batch, 1, 1, 1)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": pixels.to(device, dtype),
    }


def expand_cache(cache: object, batch: int) -> object:
    """A ``DynamicCache`` holding ``batch`` copies of a batch-1 cache (same positions in every layer)."""
    from transformers.cache_utils import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.expand(batch, -1, -1, -1).clone(), layer.values.expand(batch, -1, -1, -1).clone(), i)
    return out


# -- clocks and memory ----------------------------------------------------------------------------------


def now() -> float:
    """Seconds on the CPU clock chosen by ``--clock``.

    ``cpu`` counts the cycles this process's threads ran (``process_time``), not the time they waited
    for a core: on a machine shared with other jobs it measures the work, where wall time measures the
    neighbours too. With ``OMP_WAIT_POLICY=PASSIVE`` idle threads sleep, so waiting adds no CPU time.
    """
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


def once(fn: Callable[[], object], device: str = "cpu") -> float:
    """Wall seconds of one call: CUDA events around it on a GPU (synchronised), ``perf_counter`` on the CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = now()
    fn()
    return now() - t0


def best_of(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu") -> dict[str, float]:
    """Best time of each function over ``repeats`` interleaved rounds after one warm-up round (not timed).

    Interleaving gives every variant the same background load; the minimum drops the rounds where the
    neighbours on a shared machine took the cores.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t = once(fn, device)
            if r:
                times[k].append(t)
    return {k: min(v) for k, v in times.items()}


def _rss_peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, int]]:
    """Peak bytes allocated inside the block above what was held before it, in ``result["peak"]``.

    CUDA: ``max_memory_allocated`` (the caching allocator's exact count). CPU: the process's resident
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), which also counts allocator
    slack, so it is an upper bound of what the tensors needed.
    """
    result: dict[str, int] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated() - base
        return
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _rss_peak_kib()
    yield result
    result["peak"] = (_rss_peak_kib() - base) * 1024


# -- command line ---------------------------------------------------------------------------------------


def parser(doc: str, dtypes: str = "bf16,fp32") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=DEVICES, help="cuda: full-depth 7B, bf16 (default dtypes)")
    p.add_argument(
        "--dtypes", default=None, help=f"comma-separated, of {sorted(DTYPES)} (default {dtypes}; cuda: bf16)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after a warm-up (default 3; --smoke: 1)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="CPU timing: wall time or process CPU time")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny widths and depths, 1 repeat, small default batches and steps: checks the script runs (seconds on a CPU)",
    )
    p.set_defaults(default_dtypes=dtypes, default_repeats=3)
    return p


def pick(value: object, args: argparse.Namespace, *, smoke: object, cuda: object, cpu: object) -> object:
    """``value`` if the flag was given, else the default for ``--smoke``, ``--device cuda`` or the CPU."""
    if value is not None:
        return value
    return smoke if args.smoke else cuda if args.device == "cuda" else cpu


def setup(args: argparse.Namespace) -> list[torch.dtype]:
    """Threads, device check and the dtypes to run; prints the machine line every table needs."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    torch.set_num_threads(args.threads)
    global CLOCK, SMOKE
    CLOCK = args.clock
    SMOKE = args.smoke
    if args.repeats is None:  # one round is all a smoke run needs
        args.repeats = 1 if SMOKE else args.default_repeats
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    names = args.dtypes or ("bf16" if args.device == "cuda" else args.default_dtypes)
    unknown = [n for n in names.split(",") if n.strip() not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    import transformers

    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device} ({machine}), "
        f"threads {torch.get_num_threads()}, clock {CLOCK if args.device == 'cpu' else 'cuda events'}, "
        f"load average {load:.1f}" + (", SMOKE: tiny widths, the figures mean nothing" if SMOKE else "")
    )
    return [DTYPES[n.strip()] for n in names.split(",")]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def describe(model: torch.nn.Module) -> str:
    v, t = model.config.vision_config, model.config.text_config
    return (
        f"{'tiny (--smoke)' if SMOKE else 'LLaVA-1.5-7B'} widths, {v.num_hidden_layers} vision + {t.num_hidden_layers} LLM layers, "
        f"{num_patches(model)} image tokens, {model.dtype}, sdpa"
    )
