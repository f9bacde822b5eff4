"""The LLaVA-OneVision family: HF ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower without CLS, AnyRes
tiles, a two-layer projector, a Qwen2 LM with 1-D RoPE).

Like LLaVA-NeXT (:mod:`.llava_next`) an image is a base view plus AnyRes tiles whose grid is unpadded to the
image's aspect ratio with an ``image_newline`` after each row; what differs, and what this file handles:

* **resampling after the projector**: ``vision_aspect_ratio="anyres_max_K"`` shrinks (bilinear) an unpadded grid
  of more than ``1.1^2 K`` tiles' tokens, and a video frame is pooled 2x2 (bilinear), both on *projected*
  features; the LLM's tokens are then mixes of tower tokens. So the strategy's rows are **the LLM's own tokens**
  (newlines excluded), their features the same resampling applied to the tower features (the model's own
  ``pack_image_features`` / ``apply_pooling`` run on them), and a kept token reaches the LLM as the stock row
  itself: the projector maps every tower token, as the unpatched model does, and the kept rows are gathered
  after the model's own packing (keep-all == stock exactly); ``ctx.projected()`` gives those rows. A strategy's merged features (``plan.features``)
  and extra tokens are projected from that resampled feature space;
* **several images per prompt** (``batch_num_images`` > 1) bring only their base view (the model's rule), one
  image alone its tiles; a **video** brings its frames' pooled grids, frame-major, then one newline: one strategy
  row per video (``ctx.frames``), or per frame with ``budget_scope="frame"``; temporal steps leave images whole;
* the tower has **no CLS** (SigLIP): CLS-reading strategies are refused at ``patch()``, naming those that work;
  only ``ragged_vision`` strategies run (images differ in token count);
* newline tokens are never pruned (row separators; an all-dropped row leaves its newline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InputError, InternalError, MissingCapabilityError
from ..keptmap import anyres_cells, thw_cells
from ..stats import FlopModel, kv_width, mlp_matrices
from ..strategy import FrameLayout, PruningStrategy, VisionContext, VisionPlan
from ._anyres import extra_per_image, packed_keep
from ._tiny import VOCAB, TinyCase, left_padded, prompt_ids, random_model
from .clip import class_names
from .family import EncodedImages, Family, FamilyParts, ForwardOptions, TowerSignals
from .features import ImageFeatures
from .video import expand_items

__all__ = [
    "ONEVISION_IMAGE_SIZES",
    "LlavaOnevisionAdapter",
    "PackedItems",
    "image_newlines",
    "image_tokens",
    "tiny_llava_onevision",
    "tower_passes",
]

_MODEL = "LlavaOnevisionForConditionalGeneration"


# -- transformers contact points -------------------------------------------------------------------------


def output_class() -> type:
    """The output dataclass of ``LlavaOnevisionModel.forward``."""
    return hf.declared_output("transformers.models.llava_onevision.modeling_llava_onevision", "LlavaOnevisionModel")


def tower_passes(config: object, image_sizes: Tensor, batch_num_images: Tensor | None) -> list[int]:
    """Tower passes of each image: base + AnyRes tiles (the model's own count), or 1 for an image that shares its
    prompt with others (``batch_num_images`` > 1: no tiles, as ``get_image_features`` decides)."""
    try:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
    except ImportError as exc:
        raise hf.refuse("transformers.models.llava_onevision.image_size_to_num_patches") from exc
    tiled = [True] * len(image_sizes)
    if batch_num_images is not None:
        tiled = [n == 1 for n in batch_num_images.tolist() for _ in range(n)]
    side = config.vision_config.image_size
    return [
        int(image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=side))
        if tile
        else 1
        for size, tile in zip(image_sizes, tiled)
    ]


def image_newlines(inner: nn.Module, image_sizes: Tensor, batch_num_images: Tensor | None, aspect: str) -> list[Tensor]:
    """Which LLM tokens of each image are newlines, bool ``[P_i]``: the model's own packing run on empty features."""
    config = inner.config
    tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    empty = [torch.zeros(t, tokens, 1) for t in tower_passes(config, image_sizes, batch_num_images)]
    packed, _ = inner.pack_image_features(empty, image_sizes.cpu(), torch.ones(1), vision_aspect_ratio=aspect)
    return [p[:, 0] == 1 for p in packed]


def image_tokens(inner: nn.Module, image_sizes: Tensor, batch_num_images: Tensor | None, aspect: str) -> list[int]:
    """LLM tokens of each image (newlines included)."""
    return [int(n.numel()) for n in image_newlines(inner, image_sizes, batch_num_images, aspect)]


@dataclass(kw_only=True)
class PackedItems(EncodedImages):
    """:class:`EncodedImages` plus the LLM's rows of each item (``I`` items, ``L`` strategy tokens each, ``P`` LLM
    tokens each: the strategy tokens in order with newlines among them)."""

    stock: Tensor  #: ``[I, P, D]``: the rows the unpatched model feeds the LLM (projected, resampled, newlines)
    llm: Tensor  #: ``[I, L, D]``: those rows without the newlines (each strategy token as the LLM receives it)
    newline: Tensor  #: bool ``[I, P]``
    packed_valid: Tensor  #: bool ``[I, P]``
    frames: Tensor | None = None  #: long ``[I]``: frames of each video (None: images)


class LlavaOnevisionAdapter(Family):
    """HF ``LlavaOnevisionForConditionalGeneration`` with its SigLIP tower (no CLS)."""

    name = "llava_onevision"
    variable_image_tokens = True
    min_transformers = "5.24.0"
    budget_scopes = ("image", "frame")  # "frame": one budget per frame of a video (docs/video.md)

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        if _MODEL not in class_names(model):
            return f"expected a {_MODEL}, got {type(model).__name__}"
        tower = getattr(getattr(model, "model", None), "vision_tower", None)
        if "SiglipVisionModel" not in class_names(tower):
            return f"expected a SiglipVisionModel vision tower (every released OneVision), got {type(tower).__name__}"
        return ""

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
        model, make_inputs = tiny_llava_onevision(seed=seed, attn_implementation=attn_implementation)

        def newlines(rows: Tensor) -> Tensor:  # the row separators the LLM always receives
            return (rows == model.model.image_newline.to(rows.dtype)).all(dim=-1)

        return TinyCase(
            model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker, fixed_image_rows=newlines
        )

    def parts(self) -> FamilyParts:
        self.inner, self.config = self.model.model, self.model.config
        vision, lm = self.config.vision_config, self.inner.language_model
        self.side = vision.image_size // vision.patch_size
        self.tokens = self.side**2  # patch tokens of one tower pass (no CLS)
        pooled = self.inner.apply_pooling(torch.zeros(1, self.tokens, 1)).shape[1]  # tokens of a video frame
        self.frame_side = int(round(pooled**0.5))
        flops = FlopModel(
            d=lm.config.hidden_size,
            m=lm.config.intermediate_size,
            c=vision.hidden_size,
            mv=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            vision_tokens=self.tokens,
            mlp_matrices=mlp_matrices(lm.layers[0].mlp),
            kv_dim=kv_width(lm.config),
        )
        return FamilyParts(
            inner=self.inner,
            language_model=lm,
            image_token_id=self.config.image_token_id,
            tokens_per_image=self.tokens,
            flops=flops,
            output_class=output_class(),
            tower=TowerSignals(heads=vision.num_attention_heads, cls=False, depth=vision.num_hidden_layers),
            video_token_id=self.config.video_token_id,
        )

    def check_pipeline(self) -> None:
        layer, select = self.config.vision_feature_layer, self.config.vision_feature_select_strategy
        if not isinstance(layer, int) or select != "full":
            raise MissingCapabilityError(
                f"{self.pipeline.vision.short_spec()} needs one vision feature layer and every SigLIP token fed to "
                f"the projector, but this {self.name} model has vision_feature_layer={layer!r}, "
                f"vision_feature_select_strategy={select!r}; supported: an int layer with 'full' (every released "
                "OneVision); LLM-stage strategies work on it"
            )

    def check_inputs(self, pixel_values: Tensor | None, options: ForwardOptions) -> None:
        if pixel_values is not None and pixel_values.shape[0] > 0 and options.get("image_sizes") is None:
            raise InputError("LLaVA-OneVision needs image_sizes with pixel_values (the processor returns both)")
        aspect = options.get("vision_aspect_ratio")
        if aspect is not None and aspect != self.config.vision_aspect_ratio:
            # the stock forward ignores it for images (its get_image_features takes the config's), while
            # get_image_features honours it: one value, the config's, keeps both paths the model's
            raise InputError(
                f"vision_aspect_ratio={aspect!r} differs from this model's {self.config.vision_aspect_ratio!r}, which "
                f"the stock forward uses for images whatever it is passed; set it on the config before patching"
            )
        if self.pipeline.vision is None:
            return
        for key in ("vision_feature_layer", "vision_feature_select_strategy"):
            value, own = options.get(key), getattr(self.config, key)
            if value is not None and value != own:
                raise InputError(
                    f"{key}={value!r} differs from this model's {own!r}, which patch() checked; a pruned "
                    f"{self.name} model runs its config's (set it there before patching)"
                )

    # -- the model's own output ---------------------------------------------------------------------------

    def stock_features(self, encoded: hf.BaseModelOutputWithPooling, options: ForwardOptions) -> ImageFeatures:
        out = ImageFeatures.unpruned(encoded.pooler_output)
        image_sizes = options.get("image_sizes")
        if image_sizes is not None:
            passes = tower_passes(self.config, image_sizes, self._num_images(options))
            out.tower_runs = torch.tensor(passes, device=out.keep.device)
        out.grid_thw = self._grid(torch.zeros_like(out.lengths, dtype=torch.bool), 1)
        return out

    def stock_video_features(self, encoded: hf.BaseModelOutputWithPooling, options: ForwardOptions) -> ImageFeatures:
        out = ImageFeatures.unpruned(list(encoded.pooler_output))  # [videos, frames * n + 1, D]
        frames = options.get("pixel_values_videos")
        count = frames.shape[1] if isinstance(frames, Tensor) else 1
        out.tower_runs = torch.full_like(out.lengths, count)
        out.videos = torch.ones(out.keep.shape[0], dtype=torch.bool, device=out.keep.device)
        out.grid_thw = self._grid(out.videos, count)
        return out

    def _grid(self, videos: Tensor, frames: int) -> Tensor:
        """long ``[I, 3]`` ``(t, h, w)`` per item: a video's frames on its pooled grid, an image one frame (a
        tower pass's raster: its tokens are on several grids, :meth:`patch_cells`)."""
        image = torch.tensor([1, self.side, self.side], device=videos.device)
        video = torch.tensor([frames, self.frame_side, self.frame_side], device=videos.device)
        return torch.where(videos[:, None], video, image)

    def patch_cells(self, features: ImageFeatures, options: ForwardOptions) -> Tensor | None:
        """Each LLM token's cell (newlines -1): an image's base view on its raster (tile 0), its AnyRes tokens on
        the unpadded (or shrunk) grid as one tile 1 (:func:`tokprune.keptmap.anyres_cells`); a video's tokens on
        their frame's pooled grid (``grid_thw``). None without ``image_sizes`` for the call's images."""
        videos = features.videos if features.videos is not None else torch.zeros_like(features.keep[:, 0])
        videos, width = videos.cpu(), features.keep.shape[1]
        out = torch.full((videos.shape[0], width, 4), -1, dtype=torch.long)
        if (~videos).any():
            sizes = options.get("image_sizes")
            if not isinstance(sizes, Tensor):
                return None
            layout = [
                torch.where(n, -1, torch.arange(n.numel()).clamp(max=self.tokens))  # tile 1: the grid
                for n in image_newlines(self.inner, sizes, self._num_images(options), self._aspect(options))
            ]
            cells = anyres_cells(layout, self.tokens, self.side)
            out[~videos, : cells.shape[1]] = cells[:, :width]
        if videos.any():
            if features.grid_thw is None:
                return None
            cells = thw_cells(features.grid_thw.cpu()[videos], 1)
            out[videos, : cells.shape[1]] = cells[:, :width]
        return out

    def _num_images(self, options: ForwardOptions) -> Tensor | None:
        n = options.get("batch_num_images")
        return n if isinstance(n, Tensor) else (None if n is None else torch.as_tensor(n))

    def _aspect(self, options: ForwardOptions) -> str:
        return str(self.config.vision_aspect_ratio)  # a call's other value is refused (check_inputs)

    # -- the vision stage ---------------------------------------------------------------------------------

    def _tower(self, pixel_values: Tensor) -> Tensor:
        """The tower's feature layer per pass, ``[T, N, C]`` (SigLIP: every token, no CLS)."""
        pixel_values = pixel_values.to(self.inner.vision_tower.dtype)
        out = self.inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        return out.hidden_states[self.config.vision_feature_layer]

    def _packed(self, per_item: Sequence[Tensor], stock: Sequence[Tensor], **extra: object) -> PackedItems:
        """Items from the resampled tower features (``[P_i, C + 1]``, last channel 1 at a newline) and the stock
        rows (``[P_i, D]``)."""
        newline_rows = [p[:, -1] == 1 for p in per_item]
        features, valid = pad_rows_float([p[~n, :-1] for p, n in zip(per_item, newline_rows)])
        rows, packed_valid = pad_rows_float(list(stock))
        newline = torch.nn.utils.rnn.pad_sequence(newline_rows, batch_first=True)
        llm, _ = pad_rows_float([p[~n] for p, n in zip(stock, newline_rows)])
        return PackedItems(
            features, lengths=valid.sum(dim=1), stock=rows, llm=llm, newline=newline, packed_valid=packed_valid, **extra
        )

    def encode_images(self, pixel_values: Tensor, options: ForwardOptions) -> PackedItems:
        """Tower per pass; one row per image: its LLM tokens (newlines excluded) after the model's own packing."""
        image_sizes = options["image_sizes"]
        passes = tower_passes(self.config, image_sizes, self._num_images(options))
        if pixel_values.dim() == 5:  # [I, max_passes, 3, H, W], padded with empty tiles
            pixel_values = torch.cat([p[:t] for p, t in zip(pixel_values, passes)])
        hidden = self._tower(pixel_values)  # [T, N, C]
        flag = torch.zeros(hidden.shape[-1] + 1, dtype=hidden.dtype, device=hidden.device)
        flag[-1] = 1  # a newline marked on a channel the bilinear resampling leaves at 0 on every token
        flagged = torch.cat([hidden, hidden.new_zeros(*hidden.shape[:-1], 1)], dim=-1).split(passes)
        aspect = self._aspect(options)
        resampled, _ = self.inner.pack_image_features(flagged, image_sizes, flag, vision_aspect_ratio=aspect)
        projected = self.project(hidden).split(passes)
        stock, _ = self.inner.pack_image_features(projected, image_sizes, self.inner.image_newline, aspect)
        return self._packed(resampled, stock, tower_runs=torch.tensor(passes, device=hidden.device))

    def encode_videos(self, pixel_values_videos: Tensor, options: ForwardOptions) -> PackedItems:
        """Tower per frame, each frame pooled 2x2 (the model's ``apply_pooling``, on the tower features for the
        strategy, on the projected ones for the LLM); one row per video: its frames in turn, then one newline."""
        b, f = pixel_values_videos.shape[:2]
        hidden = self._tower(pixel_values_videos.flatten(0, 1))  # [B*F, N, C]
        pooled = self.inner.apply_pooling(hidden)  # [B*F, n, C]
        rows = self.inner.apply_pooling(self.project(hidden)).reshape(b, -1, self.inner.image_newline.shape[0])
        stock = torch.cat([rows, self.inner.image_newline[None, None].expand(b, 1, -1).to(rows)], dim=1)
        newline = torch.zeros(stock.shape[:2], dtype=torch.bool, device=stock.device)
        newline[:, -1] = True
        return PackedItems(
            pooled.reshape(b, -1, pooled.shape[-1]),
            stock=stock,
            llm=rows,
            newline=newline,
            packed_valid=torch.ones_like(newline),
            tower_runs=torch.full((b,), f, device=stock.device),
            video=True,
            frames=torch.full((b,), f, device=stock.device),
        )

    def project(self, features: Tensor) -> Tensor:
        return self.inner.multi_modal_projector(features)

    def plan_images(self, step: PruningStrategy, images: EncodedImages, ctx: VisionContext) -> VisionPlan:
        """``ctx.projected()`` is the LLM's own rows (the projector ran before the resampling), not the projector
        on the resampled features: DivPrune and CDPruner measure the tokens the LLM receives, as in their code.

        A video is one row of its frames (``ctx.frames``), or with ``budget_scope="frame"`` one row per frame
        (frames of one call have one size), its plan folded back onto the video; a temporal step leaves images
        whole."""
        if not isinstance(images, PackedItems):
            raise InternalError(f"{self.name}'s plan made on items it did not encode ({type(images).__name__})")
        if step.temporal and images.frames is None:
            return VisionPlan(keep=ctx.token_valid)
        rows, features = images.llm, ctx.features
        if images.frames is None:
            return step(replace(ctx, project=lambda f: rows if f is features else self.project(f)))
        b, side = features.shape[0], self.frame_side
        grid = torch.tensor([[side, side]], device=features.device)
        if self.budget_scope != "frame":
            layout = FrameLayout(images.frames, grid.expand(b, 2))
            return step(replace(ctx, project=lambda f: rows if f is features else self.project(f), frames=layout))
        per_frame, frames = features.reshape(-1, side * side, features.shape[-1]), int(images.frames[0])
        frame_rows = rows.reshape(per_frame.shape[0], side * side, -1)
        lengths = torch.full((per_frame.shape[0],), side * side, device=features.device)
        layout = FrameLayout(torch.ones_like(lengths), grid.expand(per_frame.shape[0], 2))
        plan = step(
            VisionContext(
                features=per_frame,
                signals=self.tower_signals(images, None, lengths),
                lengths=lengths,
                project=lambda f: frame_rows if f is per_frame else self.project(f),
                frames=layout,
            )
        )
        extra, extra_valid = None, None
        if plan.extra is not None and plan.extra.shape[1] > 0:
            row_video = torch.arange(b, device=features.device).repeat_interleave(frames)
            extra, extra_valid = extra_per_image(plan.extra, plan.extra_valid, row_video, b)
        return VisionPlan(
            keep=plan.keep.reshape(b, -1),
            features=None if plan.features is None else plan.features.reshape(b, -1, features.shape[-1]),
            extra=extra,
            extra_valid=extra_valid,
            diagnostics=plan.diagnostics,
        )

    def place_plan(self, images: EncodedImages, plan: VisionPlan) -> ImageFeatures:
        """The stock rows of the kept tokens and every newline (merged features projected instead)."""
        if not isinstance(images, PackedItems):
            raise InternalError(f"{self.name}'s plan placed on items it did not encode ({type(images).__name__})")
        keep = packed_keep(images.newline, images.packed_valid, plan.keep)
        kept = images.stock[keep]
        if plan.features is not None:  # a merge: its features are new tokens, projected here
            kept = kept.clone()
            kept[~images.newline[keep]] = self.project(plan.features[plan.keep]).to(kept.dtype)
        has_extra = plan.extra is not None and plan.extra.shape[1] > 0
        extra_valid = plan.extra_valid if has_extra else None
        num_extra = 0 if not has_extra else (plan.extra.shape[1] if extra_valid is None else extra_valid.sum(dim=1))
        remapped = 0 if plan.features is None else plan.keep.sum(dim=1)
        frames = 1 if images.frames is None else int(images.frames[0])  # one size per call
        return ImageFeatures(
            kept=kept,
            keep=keep,
            extra=self.project(plan.extra) if has_extra else None,
            extra_valid=extra_valid,
            lengths=images.packed_valid.sum(dim=1),
            tower_runs=images.tower_runs,
            projected=images.tower_runs * self.tokens + remapped + num_extra,  # every tower token, as stock
            videos=torch.full_like(keep[:, 0], images.video),
            grid_thw=self._grid(torch.full_like(keep[:, 0], images.video), frames),
        )

    def repeat_item_inputs(self, inputs: ForwardOptions, copies: int) -> dict[str, Tensor]:
        """Images (``pixel_values``, ``image_sizes``: a row per image) and videos (``pixel_values_videos``: a row
        per video) for ``num_return_sequences``: a prompt's items ``copies`` times in a row (repeating rows would
        give a prompt another prompt's items)."""
        ids, out = inputs["input_ids"], {}
        pixels, sizes, videos = inputs.get("pixel_values"), inputs.get("image_sizes"), inputs.get("pixel_values_videos")
        if isinstance(pixels, Tensor) and isinstance(sizes, Tensor):
            counts = image_tokens(self.inner, sizes, self._num_images(inputs), self._aspect(inputs))
            items = self._repeated(ids, self.config.image_token_id, torch.tensor(counts, device=sizes.device), copies)
            out.update(pixel_values=pixels[items.to(pixels.device)], image_sizes=sizes[items.to(sizes.device)])
        if isinstance(videos, Tensor):
            counts = torch.full((videos.shape[0],), videos.shape[1] * self.frame_side**2 + 1, device=videos.device)
            out["pixel_values_videos"] = videos[self._repeated(ids, self.config.video_token_id, counts, copies)]
        return out

    def _repeated(self, ids: Tensor, token: int, counts: Tensor, copies: int) -> Tensor:
        """long ``[items * copies]``: each prompt's items (``counts`` placeholders each) ``copies`` times in a row."""
        prompt_tokens = (ids == token).sum(dim=1).to(counts.device)
        return expand_items(counts, prompt_tokens, torch.ones_like(counts), copies)[0]


def pad_rows_float(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Ragged ``[n_i, C]`` rows -> ``([I, W, C]`` zero-padded, bool ``[I, W]`` valid)."""
    lengths = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
    out = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return out, torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None]


# -- the tiny case -----------------------------------------------------------------------------------------


#: Image sizes (h, w) the tiny inputs draw from: 1x2, 2x1 and 2x2 tiles; the 2x2 one is shrunk by anyres_max_2.
ONEVISION_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((14, 30), (30, 12), (32, 32), (20, 26))


def tiny_llava_onevision(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny ``LlavaOnevisionForConditionalGeneration``: SigLIP 16 px / 4 px patches (16 tokens a
    pass), AnyRes tiles up to 2x2, ``anyres_max_2`` (a 2x2-tile image is shrunk, the others are not), Qwen2.

    ``make_inputs(question_lengths, seeds=None, images=1)`` as :func:`~._tiny.fixed_size_inputs`, image ``k`` of
    sample ``s`` drawing its size from ``s + k``: every image tiled (no ``batch_num_images``, the model's default),
    so the images of one prompt differ in tiles and tokens.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 16, "patch_size": 4,
              "vision_use_head": False, "initializer_range": 0.08}  # fmt: skip
    text = {"model_type": "qwen2", "vocab_size": VOCAB.size, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "pad_token_id": VOCAB.pad, "bos_token_id": VOCAB.bos,
            "eos_token_id": VOCAB.eos, "initializer_range": 0.08, "tie_word_embeddings": False}  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCAB.image,
        video_token_index=VOCAB.size - 1,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        vision_aspect_ratio="anyres_max_2",
    )
    model = random_model(LlavaOnevisionForConditionalGeneration, config, seed, attn_implementation, dtype)
    side = 16

    def make_inputs(
        question_lengths: Sequence[int] = (5, 3), seeds: Sequence[int] | None = None, images: int = 1
    ) -> dict[str, Tensor]:
        seeds = list(range(len(question_lengths))) if seeds is None else list(seeds)
        rows, pixels, sizes = [], [], []
        for q, s in zip(question_lengths, seeds):
            gen = torch.Generator().manual_seed(s * 1009 + q)
            own = torch.tensor([ONEVISION_IMAGE_SIZES[(s + k) % len(ONEVISION_IMAGE_SIZES)] for k in range(images)])
            words = torch.randint(VOCAB.first_word, VOCAB.size - 1, (q,), generator=gen).tolist()
            counts = image_tokens(model.model, own, None, config.vision_aspect_ratio) if images else []
            rows.append(prompt_ids(counts, words))
            for t in tower_passes(config, own, None):
                pixels.append(torch.randn(t, 3, side, side, generator=gen))
            sizes += list(own)
        out = left_padded(rows)
        if pixels:
            most = max(p.shape[0] for p in pixels)  # the processor pads every image to the most passes
            pixel_values = torch.zeros(len(pixels), most, 3, side, side)
            for i, p in enumerate(pixels):
                pixel_values[i, : p.shape[0]] = p
            out.update(pixel_values=pixel_values.to(dtype), image_sizes=torch.stack(sizes))
        return out

    return model, make_inputs
