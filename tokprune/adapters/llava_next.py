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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InputError, InternalError
from ..keptmap import anyres_cells
from ..strategy import PruningStrategy, VisionContext, VisionPlan
from ._anyres import extra_per_image, packed_keep, pad_rows, tile_rows
from ._tiny import VOCAB, TinyCase, left_padded, prompt_ids, random_model
from .clip import ClipTower, clip_mismatch, tiny_llava_config
from .family import EncodedImages, Family, FamilyParts, ForwardOptions, projected_count
from .features import ImageFeatures

__all__ = [
    "NEXT_IMAGE_SIZES",
    "AnyResImages",
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


def anyres_tiles(config: object, image_sizes: Tensor) -> list[int]:
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


@dataclass(kw_only=True)
class AnyResImages(EncodedImages):
    """:class:`EncodedImages` plus where each LLM token of an image comes from (``I`` images, ``L`` tokens each
    without newlines, ``P`` LLM tokens each with them)."""

    tile: Tensor  #: long ``[I, L]``: each image token's tower pass
    patch: Tensor  #: long ``[I, L]``: its index in that pass (CLS at 0)
    valid: Tensor  #: bool ``[I, L]``
    packed: Tensor  #: long ``[I, P]``: the LLM's order, as indices into the image's tokens (-1: a newline)
    packed_valid: Tensor  #: bool ``[I, P]``


class LlavaNextAdapter(Family):
    """HF ``LlavaNextForConditionalGeneration`` with a CLIP tower (AnyRes tiles and newline tokens)."""

    name = "llava_next"
    variable_image_tokens = True
    budget_scopes = ("image", "tile")

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        return clip_mismatch(model, "LlavaNextForConditionalGeneration", _LANGUAGE_MODELS)

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
        model, make_inputs = tiny_llava_next(seed=seed, attn_implementation=attn_implementation)

        def newlines(rows: Tensor) -> Tensor:  # the row separators the LLM always receives
            return (rows == model.model.image_newline.to(rows.dtype)).all(dim=-1)

        return TinyCase(
            model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker, fixed_image_rows=newlines
        )

    def parts(self) -> FamilyParts:
        self.clip = ClipTower(self.model)
        check_anyres(self.clip.inner)
        return self.clip.parts(output_class(), text=False)

    def check_pipeline(self) -> None:
        self.clip.check_pipeline(self.pipeline.vision, self.name)

    def check_inputs(self, pixel_values: Tensor | None, options: ForwardOptions) -> None:
        if pixel_values is not None and pixel_values.shape[0] > 0 and options.get("image_sizes") is None:
            raise InputError("LLaVA-NeXT needs image_sizes with pixel_values (the processor returns both)")

    def stock_features(self, encoded: hf.BaseModelOutputWithPooling, options: ForwardOptions) -> ImageFeatures:
        out = ImageFeatures.unpruned(encoded.pooler_output)
        image_sizes = options.get("image_sizes")
        if image_sizes is not None:
            out.tower_runs = torch.tensor(anyres_tiles(self.clip.config, image_sizes), device=out.keep.device)
        return out

    def patch_cells(self, features: ImageFeatures, options: ForwardOptions) -> Tensor | None:
        """Base view on its raster, tiles on the unpadded grid, from the model's own packing
        (:func:`tokprune.keptmap.anyres_cells`); None without ``image_sizes``."""
        image_sizes = options.get("image_sizes")
        if image_sizes is None:
            return None
        n = self.clip.tokens
        image_sizes = image_sizes.cpu()  # the layout of index tensors is built on the host: no sync per image
        tiles = anyres_tiles(self.clip.config, image_sizes)
        return anyres_cells(anyres_layout(self.clip.inner, tiles, n, image_sizes, "default"), n, self.clip.side)

    # -- the vision stage -----------------------------------------------------------------------------

    def encode_images(self, pixel_values: Tensor, options: ForwardOptions) -> AnyResImages:
        """Tower per tile; one row per image: its non-newline tokens in the LLM's order, as (tile, patch)."""
        image_sizes = options["image_sizes"]
        n = self.clip.tokens
        tiles = anyres_tiles(self.clip.config, image_sizes)
        if pixel_values.dim() == 5:  # [I, max_tiles, 3, H, W], padded with empty tiles
            pixel_values = torch.cat([p[:t] for p, t in zip(pixel_values, tiles)])
        states = self.clip.states(pixel_values)
        layout = anyres_layout(self.clip.inner, tiles, n, image_sizes, "default")  # per image, -1 = newline
        packed, packed_valid = pad_rows(layout, fill=-2)  # [I, P]
        first_tile = torch.tensor([0, *tiles[:-1]], device=packed.device).cumsum(0)  # each image's base tile
        source, valid = pad_rows([lay[lay >= 0] for lay in layout], fill=0)
        tile = first_tile[:, None] + source // n
        patch = source % n + 1  # +1: index 0 of every tile is its CLS

        def per_image(t: Tensor) -> Tensor:
            """``[T, 1+N, C]`` (per tile) -> ``[I, 1+L, C]``: the base CLS, then the image's tokens."""
            return torch.cat([t[first_tile, :1], t[tile, patch]], dim=1)

        return AnyResImages(
            states[self.clip.config.vision_feature_layer][tile, patch],  # [I, L, C]
            lengths=valid.sum(dim=1),
            states=states,
            rows=per_image,
            tower_runs=torch.tensor(tiles, device=packed.device),
            tile=tile,
            patch=patch,
            valid=valid,
            packed=packed,
            packed_valid=packed_valid,
        )

    def project(self, features: Tensor) -> Tensor:
        return self.clip.project(features)

    def plan_images(self, step: PruningStrategy, images: EncodedImages, ctx: VisionContext) -> VisionPlan:
        """``budget_scope="tile"``: the strategy's rows are the tower passes, its plan mapped back per image.

        Each row is one pass: its CLS, then those of its tokens the LLM sees, in raster order (unpadding
        drops some), so ``lengths`` is per pass. Returns the plan in image rows: ``keep`` and ``features``
        ``[I, L]``; ``extra`` ``[I, K*E, C]`` with ``extra_valid``, each image's rows' extra tokens in row
        order (K: the most rows of one image); diagnostics stay per row, with ``row_image`` (long ``[R]``)
        naming each row's image.
        """
        if self.budget_scope != "tile" or not isinstance(images, AnyResImages):
            return step(ctx)
        tile, patch, valid = images.tile, images.patch, images.valid
        rows = tile_rows(tile, patch, valid, images.states[0].shape[0], self.clip.tokens)

        def per_row(t: Tensor) -> Tensor:
            """``[T, 1+N, C]`` (per pass) -> ``[R, 1+W, C]``: each row's CLS, then its tokens."""
            return torch.cat([t[rows.tile, :1], t[rows.tile[:, None], rows.patch]], dim=1)

        signals = self.tower_signals(images, per_row, rows.lengths)
        features = images.states[self.clip.config.vision_feature_layer][rows.tile[:, None], rows.patch]  # [R, W, C]
        ctx = VisionContext(features=features, signals=signals, lengths=rows.lengths, project=self.project)
        plan = step(ctx)
        row, slot = rows.row_of_tile[tile], rows.slot
        keep = plan.keep[row, slot] & valid
        projected = ctx.projected_rows()
        if projected is not None:  # the step projected every token of its rows: place_plan takes the kept ones
            images.projected_rows = projected[row, slot]
        mapped = None if plan.features is None else plan.features[row, slot]
        extra, extra_valid = None, None
        if plan.extra is not None and plan.extra.shape[1] > 0:
            extra, extra_valid = extra_per_image(plan.extra, plan.extra_valid, rows.row_image, tile.shape[0])
        diagnostics = {**plan.diagnostics, "row_image": rows.row_image}
        return VisionPlan(keep=keep, features=mapped, extra=extra, extra_valid=extra_valid, diagnostics=diagnostics)

    def place_plan(self, images: EncodedImages, plan: VisionPlan) -> ImageFeatures:
        """Projector on the kept tokens, then back to the LLM's order: each non-newline slot takes its token's
        decision, newlines (a learned vector, not projected) are kept."""
        if not isinstance(images, AnyResImages):
            raise InternalError(f"{self.name}'s plan placed on images it did not encode ({type(images).__name__})")
        packed, packed_valid = images.packed, images.packed_valid
        newline = packed == -1
        has_extra = plan.extra is not None and plan.extra.shape[1] > 0
        extra = self.project(plan.extra) if has_extra else None
        every = plan.features is None and images.projected_rows is not None  # the step projected every token to choose
        if every:
            projected = images.projected_rows[plan.keep]
        else:
            chosen = plan.features if plan.features is not None else images.features
            projected = self.project(chosen[plan.keep])
        keep = packed_keep(newline, packed_valid, plan.keep)
        kept_newline = newline[keep]
        kept = self.clip.inner.image_newline.to(projected.dtype).expand(kept_newline.shape[0], -1).clone()
        kept[~kept_newline] = projected
        extra_valid = plan.extra_valid if has_extra else None
        num_extra = 0 if extra is None else (extra.shape[1] if extra_valid is None else extra_valid.sum(dim=1))
        return ImageFeatures(
            kept=kept,
            keep=keep,
            extra=extra,
            extra_valid=extra_valid,
            lengths=packed_valid.sum(dim=1),
            tower_runs=images.tower_runs,
            # newlines are not projected
            projected=projected_count(images, extra, extra_valid) if every else (keep & ~newline).sum(dim=1) + num_extra,
        )


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
