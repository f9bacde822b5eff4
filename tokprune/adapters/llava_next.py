"""The LLaVA-NeXT family: HF ``LlavaNextForConditionalGeneration`` (AnyRes tiles, CLIP tower, 1-D RoPE LM).

Shared with every family (:mod:`.decoder`): generate() checks, assembly, the pruned decoder loop, stats.
This file knows only LLaVA-NeXT:

* each image is a base view plus AnyRes tiles (their number follows ``image_sizes``); the tower runs
  once per tile; the LLM sees the base view's ``N`` tokens, then the tiles' grid unpadded to the image's
  aspect ratio with an ``image_newline`` token after each row. :func:`anyres_layout`
  gives that order from the model's own packing;
* the vision stage prunes **per image across base and tiles** by default (``budget_scope="image"``):
  the strategy sees one row per image (``lengths`` = its base + tile tokens, newlines excluded), with
  the base view's CLS as the image's CLS (the q/k and hidden signals of each token come from its own
  tile), so budgets count the image's own tokens. With ``budget_scope="tile"`` every tower pass (the
  base view and each tile) is its own row, with its own CLS and the tile's tokens the LLM sees (after
  unpadding), so budgets count per tile as VisionZip's and VisionPruner's LLaVA-NeXT code do; the
  plans are mapped back to the image, each row's extra tokens following the image's kept tokens
  (docs/adapters.md, "Budgets on tiled images"). Only ``ragged_vision`` strategies run;
* **newline tokens** are not visual content and are never pruned: they stay as row separators after
  the kept tokens of their row (an all-dropped row leaves its newline). They count as visual tokens
  in the stats (the LLM processes them);
* positions are 1-D; the decoder layers are called through :mod:`tokprune.hf_compat`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InputError, InternalError
from ..keptmap import anyres_cells
from ..strategy import VisionContext, VisionPlan
from ._anyres import extra_per_image, pad_rows, tile_rows
from ._tiny import VOCAB, TinyCase, left_padded, prompt_ids, random_model
from .decoder import CallState, PrunedImageFeatures, VisionOut
from .llava import LlavaAdapter, _class_names, tiny_llava_config

__all__ = [
    "NEXT_IMAGE_SIZES",
    "LlavaNextAdapter",
    "anyres_layout",
    "anyres_tiles",
    "check_anyres",
    "output_class",
    "tiny_llava_next",
]

_LANGUAGE_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model")


# -- transformers contact points (feature-detected; refused at patch() with the tested range) -----------


def output_class() -> type:
    """The output dataclass of ``LlavaNextModel.forward``."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModelOutputWithPast

    return LlavaNextModelOutputWithPast


def anyres_tiles(config: Any, image_sizes: Tensor) -> list[int]:
    """Tower passes of each image (base image + AnyRes tiles) for ``image_sizes`` long ``[I, 2]`` (h, w).

    LLaVA-NeXT's own count (``image_size_to_num_patches``), so it always agrees with its processor.
    """
    try:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    except ImportError as exc:
        raise hf.refuse("transformers.models.llava_next.image_size_to_num_patches") from exc
    return [
        int(
            image_size_to_num_patches(
                image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
            )
        )
        for size in image_sizes
    ]


def check_anyres(inner: nn.Module) -> None:
    """Refuse at ``patch()`` time when ``LlavaNextModel`` lacks the packing :func:`anyres_layout` runs."""
    params = hf.parameters(getattr(inner, "pack_image_features", None) or (lambda: None))
    if not {"image_features", "image_sizes", "image_newline"} <= set(params):
        raise hf.refuse(
            f"{type(inner).__name__}.pack_image_features(image_features, image_sizes, ..., image_newline)",
            f"signature: {list(params)}",
        )


def anyres_layout(
    inner: nn.Module, tiles: list[int], tokens_per_tile: int, image_sizes: Tensor, select: str
) -> list[Tensor]:
    """Where each token LLaVA-NeXT feeds the LLM comes from, per image: long ``[P_i]``.

    Entry ``j`` of image ``i`` is the index of its ``j``-th LLM token among the image's
    ``tiles[i] * tokens_per_tile`` tile tokens (tile-major, raster order), or -1 for a newline token.
    The model's own ``pack_image_features`` (base image, then the tiles' grid unpadded to the image's
    aspect ratio with a newline after each row) is run on the indices themselves, so the layout is
    exactly the one the unpatched model builds, whatever its release does inside.
    """
    index = [
        torch.arange(t * tokens_per_tile, dtype=torch.float64, device=image_sizes.device).view(t, tokens_per_tile, 1)
        for t in tiles
    ]
    newline = torch.full((1,), -1.0, dtype=torch.float64, device=image_sizes.device)
    packed, _ = inner.pack_image_features(
        index, image_sizes, vision_feature_select_strategy=select, image_newline=newline
    )
    return [p[:, 0].round().long() for p in packed]


class LlavaNextAdapter(LlavaAdapter):
    """HF ``LlavaNextForConditionalGeneration`` with a CLIP tower (AnyRes tiles and newline tokens).

    LLaVA-1.5's adapter (tower run, signals, checks, FLOP model per tower pass) with AnyRes packing.
    """

    name = "llava_next"
    variable_image_tokens = True
    budget_scopes = ("image", "tile")

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        if "LlavaNextForConditionalGeneration" not in _class_names(model):
            return f"expected a LlavaNextForConditionalGeneration, got {type(model).__name__}"
        inner = getattr(model, "model", None)
        if "CLIPVisionModel" not in _class_names(getattr(inner, "vision_tower", None)):
            return f"expected a CLIPVisionModel vision tower, got {type(getattr(inner, 'vision_tower', None)).__name__}"
        lm = getattr(inner, "language_model", None)
        if not _class_names(lm) & set(_LANGUAGE_MODELS):
            return f"expected a language model among {', '.join(_LANGUAGE_MODELS)}, got {type(lm).__name__}"
        return ""

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> Any:

        model, make_inputs = tiny_llava_next(seed=seed, attn_implementation=attn_implementation)

        def newlines(rows: Tensor) -> Tensor:  # the row separators the LLM always receives
            return (rows == model.model.image_newline.to(rows.dtype)).all(dim=-1)

        return TinyCase(
            model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker, fixed_image_rows=newlines
        )

    @staticmethod
    def _family_output_class() -> type:
        return output_class()

    def _check_features(self) -> None:
        super()._check_features()
        check_anyres(self._inner)

    def patch_cells(self, features: VisionOut, options: dict[str, Tensor]) -> Tensor | None:
        """Base view on its raster, tiles on the unpadded grid, from the model's own packing
        (:func:`tokprune.keptmap.anyres_cells`); None without ``image_sizes``."""
        image_sizes = options.get("image_sizes")
        if image_sizes is None:
            return None
        n = self._tokens_per_image
        image_sizes = image_sizes.cpu()  # the layout of index tensors is built on the host: no sync per image
        tiles = anyres_tiles(self._config, image_sizes)
        layout = anyres_layout(self._inner, tiles, n, image_sizes, "default")
        cfg = self._tower.config
        return anyres_cells(layout, n, cfg.image_size // cfg.patch_size)

    # -- the vision stage -----------------------------------------------------------------------------

    def _image_features(self, pixel_values: Tensor, image_sizes: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The patched ``get_image_features`` (``generate`` routes ``pixel_values`` and ``image_sizes`` to it)."""
        with self._active(CallState(self)) as call:
            return PrunedImageFeatures.of(self._run_vision(call, pixel_values, image_sizes))

    def _vision(
        self, call: CallState, pixel_values: Tensor | None, encoded: Any, options: dict
    ) -> tuple[Any, VisionOut | None]:
        image_sizes = options.pop("image_sizes", None)
        layer = options.pop("vision_feature_layer", None)
        select = options.pop("vision_feature_select_strategy", None)
        if encoded is not None:  # pre-encoded by generate() through get_image_features
            return self._pre_encoded(encoded)
        if pixel_values is None or pixel_values.shape[0] == 0:
            return None, None
        if image_sizes is None:
            raise InputError("LLaVA-NeXT needs image_sizes with pixel_values (the processor returns both)")
        if self.pipeline.vision is None:  # the unpatched tower, projector and packing
            encoded = self._inner.get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=layer,
                vision_feature_select_strategy=select,
                return_dict=True,
            )
            out = VisionOut.unpruned(encoded.pooler_output)
            out.tower_runs = torch.tensor(anyres_tiles(self._config, image_sizes), device=out.keep.device)
            return encoded, out
        out = self._run_vision(call, pixel_values, image_sizes)
        return PrunedImageFeatures.of(out), out

    def _run_vision(self, call: CallState, pixel_values: Tensor, image_sizes: Tensor) -> VisionOut:
        """Tower per tile, one strategy row per image (base + tiles), projector on the kept, newlines back."""
        step = self.pipeline.vision
        if step is None:
            raise InternalError("the vision stage ran without a vision step")
        n = self._tokens_per_image
        tiles = anyres_tiles(self._config, image_sizes)
        if pixel_values.dim() == 5:  # [I, max_tiles, 3, H, W], padded with empty tiles
            pixel_values = torch.cat([p[:t] for p, t in zip(pixel_values, tiles)])
        hidden, captured = self._run_tower(call, pixel_values)
        layout = anyres_layout(self._inner, tiles, n, image_sizes, "default")  # per image, -1 = newline
        packed, packed_valid = pad_rows(layout, fill=-2)  # [I, P]
        newline = packed == -1
        first_tile = torch.tensor([0, *tiles[:-1]], device=packed.device).cumsum(0)  # each image's base tile
        # The strategy's row of image i: its non-newline tokens in LLM order, as (tile, patch) sources.
        source, source_valid = pad_rows([lay[lay >= 0] for lay in layout], fill=0)
        tile = first_tile[:, None] + source // n
        patch = source % n + 1  # +1: index 0 of every tile is its CLS
        lengths = source_valid.sum(dim=1)

        def per_image(t: Tensor) -> Tensor:
            """``[T, 1+N, C]`` (per tile) -> ``[I, 1+L, C]``: the base CLS, then the image's tokens."""
            return torch.cat([t[first_tile, :1], t[tile, patch]], dim=1)

        features = hidden[self._config.vision_feature_layer][tile, patch]  # [I, L, C]
        if self.budget_scope == "tile":
            plan = self._plan_per_tile(hidden, captured, tile, patch, source_valid)
        else:
            signals = self._vision_signals(hidden, captured, per_image, lengths)
            plan = step(VisionContext(features=features, signals=signals, lengths=lengths, project=self._project))
        chosen = plan.features if plan.features is not None else features
        projector = self._inner.multi_modal_projector
        projected = projector(chosen[plan.keep])
        has_extra = plan.extra is not None and plan.extra.shape[1] > 0
        extra = projector(plan.extra) if has_extra else None
        # Back to the LLM's order: each non-newline slot takes its token's decision, newlines are kept.
        rank = ((~newline & packed_valid).long().cumsum(dim=1) - 1).clamp(min=0)
        keep = packed_valid & (newline | plan.keep.gather(1, rank.clamp(max=plan.keep.shape[1] - 1)))
        kept_newline = newline[keep]
        kept = self._inner.image_newline.to(projected.dtype).expand(kept_newline.shape[0], -1).clone()
        kept[~kept_newline] = projected
        diagnostics = {f"{step.name}.{k}": v for k, v in plan.diagnostics.items()}
        runs = torch.tensor(tiles, device=keep.device)
        extra_valid = plan.extra_valid if has_extra else None
        num_extra = 0 if extra is None else (extra.shape[1] if extra_valid is None else extra_valid.sum(dim=1))
        mapped = (keep & ~newline).sum(dim=1) + num_extra  # newlines are not projected
        return VisionOut(
            kept,
            keep,
            extra,
            diagnostics,
            packed_valid.sum(dim=1),
            runs,
            projected=mapped,
            extra_valid=extra_valid,
        )

    def _plan_per_tile(
        self, hidden: list[Tensor], captured: dict, tile: Tensor, patch: Tensor, valid: Tensor
    ) -> VisionPlan:
        """``budget_scope="tile"``: the strategy's rows are the tower passes, its plan mapped back per image.

        ``tile``/``patch``/``valid`` (``[I, L]``) name each image token's tower pass and index in it (CLS
        at 0). Each row is one pass: its CLS, then those of its tokens the LLM sees, in raster order
        (unpadding drops some), so ``lengths`` is per pass. Returns the plan in image rows: ``keep`` and
        ``features`` ``[I, L]``; ``extra`` ``[I, K*E, C]`` with ``extra_valid``, each image's rows' extra
        tokens in row order (K: the most rows of one image); diagnostics stay per row, with
        ``row_image`` (long ``[R]``) naming each row's image.
        """
        step = self.pipeline.vision
        if step is None:
            raise InternalError("the vision stage ran without a vision step")
        rows = tile_rows(tile, patch, valid, hidden[0].shape[0], self._tokens_per_image)

        def per_row(t: Tensor) -> Tensor:
            """``[T, 1+N, C]`` (per pass) -> ``[R, 1+W, C]``: each row's CLS, then its tokens."""
            return torch.cat([t[rows.tile, :1], t[rows.tile[:, None], rows.patch]], dim=1)

        signals = self._vision_signals(hidden, captured, per_row, rows.lengths)
        features = hidden[self._config.vision_feature_layer][rows.tile[:, None], rows.patch]  # [R, W, C]
        plan = step(VisionContext(features=features, signals=signals, lengths=rows.lengths, project=self._project))
        row, slot = rows.row_of_tile[tile], rows.slot
        keep = plan.keep[row, slot] & valid
        mapped = None if plan.features is None else plan.features[row, slot]
        extra, extra_valid = None, None
        if plan.extra is not None and plan.extra.shape[1] > 0:
            extra, extra_valid = extra_per_image(plan.extra, plan.extra_valid, rows.row_image, tile.shape[0])
        diagnostics = {**plan.diagnostics, "row_image": rows.row_image}
        return VisionPlan(keep=keep, features=mapped, extra=extra, extra_valid=extra_valid, diagnostics=diagnostics)


# -- the tiny case -----------------------------------------------------------------------------------------


#: Image sizes (h, w) the tiny LLaVA-NeXT inputs draw from: 1x2, 2x1 and 2x2 tiles, unpadded differently.
NEXT_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((14, 30), (30, 12), (32, 32), (20, 26))


def tiny_llava_next(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny ``LlavaNextForConditionalGeneration`` (AnyRes, 16-px tiles of 16 patches) and
    ``make_inputs`` like :func:`tiny_llava`'s; sample ``i`` also draws its image size from its seed, so
    images of one batch bring different numbers of tokens (base + tiles + newlines).
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    base = tiny_llava_config(attn_implementation=attn_implementation, image_size=16)
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=VOCAB.image,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = random_model(LlavaNextForConditionalGeneration, config, seed, attn_implementation, dtype)
    side, n = 16, 16

    def make_inputs(
        question_lengths: Sequence[int] = (5, 3), seeds: Sequence[int] | None = None, images: int = 1
    ) -> dict[str, Tensor]:
        seeds = list(range(len(question_lengths))) if seeds is None else list(seeds)
        rows, pixels, sizes = [], [], []
        for q, s in zip(question_lengths, seeds):
            gen = torch.Generator().manual_seed(s * 1009 + q)
            counts = []
            for k in range(images):  # image k of sample s: the size after its previous image's
                size = torch.tensor([NEXT_IMAGE_SIZES[(s + k) % len(NEXT_IMAGE_SIZES)]])
                tiles = anyres_tiles(config, size)
                counts.append(int(anyres_layout(model.model, tiles, n, size, "default")[0].numel()))
                sizes.append(size[0])
                pixels.append(tiles[0])
            words = torch.randint(VOCAB.first_word, VOCAB.size, (q,), generator=gen).tolist()
            rows.append(prompt_ids(counts, words))
            for k in range(images):
                pixels[-images + k] = torch.randn(pixels[-images + k], 3, side, side, generator=gen)
        most = max(p.shape[0] for p in pixels)  # the processor pads every image to the most tiles
        pixel_values = torch.zeros(len(pixels), most, 3, side, side)
        for i, p in enumerate(pixels):
            pixel_values[i, : p.shape[0]] = p
        return {**left_padded(rows), "pixel_values": pixel_values.to(dtype), "image_sizes": torch.stack(sizes)}

    return model, make_inputs
