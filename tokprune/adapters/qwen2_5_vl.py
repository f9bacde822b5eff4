"""The Qwen2.5-VL family: HF ``Qwen2_5_VLForConditionalGeneration`` (dynamic resolution, M-RoPE).

Shared with every family (:mod:`.decoder`): generate() checks, assembly, the pruned decoder loop, stats.
This file knows only Qwen2.5-VL (through the public protocol, :class:`~tokprune.adapters.Family`):

* the tower (window attention, then the patch merger) runs **unchanged**: the vision stage prunes the
  tokens the LLM sees, after the merger, per image (``image_grid_thw`` decides how many: ``t*h*w/4``).
  The tower has no CLS token, so only strategies reading no CLS signal and cutting per image run
  (refused at ``patch()`` otherwise, with the list of those that work). Budgets are per image;
* videos (``pixel_values_videos`` + ``video_grid_thw``, ``second_per_grid_ts``) run the same tower through
  the model's own ``get_video_features``; each video is one strategy row (its ``t`` frames of
  ``h*w/4`` tokens, :class:`~tokprune.strategy.FrameLayout` in ``ctx.frames``), or one row per frame with
  ``budget_scope="frame"``. Images and videos of one prompt are one list of visual items in prompt order
  for the shared decoder (:mod:`.items`): the video placeholders are image placeholders to it;
* positions are M-RoPE's three axes (temporal, height, width), long ``[B, L, 3]``, built by the model's
  own ``get_rope_index`` on the **unpruned** prompt: survivors keep their 3-D positions. ``compact``
  renumbering is refused (it is defined for 1-D positions);
* the decoder layers get the model's own rotary embedding of the 3-D positions (through hf_compat).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InputError, InternalError, UnsupportedModelError
from ..keptmap import thw_cells
from ..stats import FlopModel, WindowedTower, kv_width, mlp_matrices
from ..strategy import FrameLayout, PruningStrategy, VisionContext, VisionPlan
from ._tiny import VOCAB, TinyCase, left_padded, prompt_ids, random_model
from .family import EncodedImages, Family, FamilyParts, ForwardOptions, TowerSignals
from .features import ImageFeatures
from .video import expand_visual_inputs, frame_rows, rows_to_items

__all__ = ["QWEN_GRIDS", "Qwen2_5_VLAdapter", "check_mrope", "mrope_index", "output_class", "tiny_qwen2_5_vl"]


# -- transformers contact points (feature-detected; refused at patch() with the tested range) -----------


def output_class() -> type:
    """The output dataclass of ``Qwen2_5_VLModel.forward``."""
    return hf.declared_output("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLModel")


def check_mrope(inner: nn.Module, language_model: nn.Module) -> None:
    """Refuse at ``patch()`` time when ``Qwen2_5_VLModel`` lacks ``get_rope_index`` as :func:`mrope_index`
    calls it, or when its rotary embedding does not merge the three M-RoPE axes itself.

    The adapter scores q/k with :func:`apply_rope`, which takes the merged ``[B, L, head_dim]`` form;
    older releases return one cos/sin per axis (``[3, B, L, head_dim]``) and merge them in the layer.
    A one-token probe tells which (the module is tiny; no version number is read).
    """
    params = hf.parameters(getattr(inner, "get_rope_index", None) or (lambda: None))
    if not {"input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask"} <= set(params):
        raise hf.refuse(
            f"{type(inner).__name__}.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, attention_mask)",
            f"signature: {list(params)}",
        )
    weight = next(language_model.parameters())
    probe = torch.zeros(1, 1, 1, dtype=weight.dtype, device=weight.device)
    rotary = language_model.rotary_emb
    with torch.no_grad():  # the module's own forward, past its hooks: a probe is not a model call
        positions = torch.zeros(3, 1, 1, dtype=torch.long, device=weight.device)
        cos, _ = type(rotary).forward(rotary, probe, position_ids=positions)
    if cos.dim() != 3:
        raise hf.refuse(
            f"a rotary embedding that merges the three M-RoPE axes (it returns cos of shape "
            f"{tuple(cos.shape)}, one per axis)"
        )


def mrope_index(
    inner: nn.Module,
    input_ids: Tensor,
    mm_token_type_ids: Tensor,
    image_grid_thw: Tensor | None,
    attention_mask: Tensor | None,
    **videos: Tensor,
) -> Tensor:
    """The model's own 3-D (temporal, height, width) M-RoPE position ids, long ``[B, L, 3]``.

    ``get_rope_index`` returns ``[3, B, L]`` and per-sample deltas; tokprune keeps positions
    batch-first (the axis last) so that gathering kept tokens moves their three ids together.
    ``videos``: ``video_grid_thw`` and (Qwen2.5-VL) ``second_per_grid_ts``, passed on where given.
    """
    given = {k: v for k, v in videos.items() if v is not None}
    position_ids, _ = inner.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
        **given,
    )
    return position_ids.permute(1, 2, 0).long()


@dataclass(kw_only=True)
class QwenItems(EncodedImages):
    """:class:`EncodedImages` of Qwen's tower: each item's merged tokens and its patch grid."""

    items: list[Tensor]  #: one ``[N_i, D]`` per image or video (frame-major for a video)
    grid: Tensor  #: long ``[I, 3]``: each item's ``(t, h, w)`` in patches


class Qwen2_5_VLAdapter(Family):
    """HF ``Qwen2_5_VLForConditionalGeneration``: images of any size and videos, no CLS, 3-D positions."""

    name = "qwen2_5_vl"
    #: the family as messages name it, and the HF class it patches (Qwen3-VL subclasses this adapter)
    label: ClassVar[str] = "Qwen2.5-VL"
    model_class: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    # 5.6 lacks the image field and merges no M-RoPE axes in the rotary embedding (refused at patch()).
    min_transformers = "5.24.0"
    variable_image_tokens = True
    one_d_positions = False
    budget_scopes = ("image", "frame")  # "frame": one budget per frame of a video (docs/video.md)

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        names = {c.__name__ for c in type(model).__mro__}
        if cls.model_class not in names:
            return f"expected a {cls.model_class}, got {type(model).__name__}"
        return ""

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
        model, make_inputs = tiny_qwen2_5_vl(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)

    def parts(self) -> FamilyParts:
        self.inner = self.model.model
        self.config = self.model.config
        lm = self.inner.language_model
        check_mrope(self.inner, lm)
        vcfg = self.config.vision_config
        # The tower (window and full attention blocks, then the merger) is counted per image from its
        # grid (ImageFeatures.tower_flops); the merger runs before pruning, so no projector term follows it.
        self.tower_flops = WindowedTower.of(vcfg, self.inner.visual.blocks[0].mlp)
        return FamilyParts(
            inner=self.inner,
            language_model=lm,
            image_token_id=self.config.image_token_id,
            tokens_per_image=0,  # no fixed count: image_grid_thw decides
            flops=self.flop_model(lm),
            output_class=output_class(),
            tower=TowerSignals(heads=vcfg.num_heads, cls=False, depth=vcfg.depth),
            image_field=False,  # no image field before 5.24
            video_token_id=self.config.video_token_id,
        )

    def flop_model(self, language_model: nn.Module) -> FlopModel:
        """The LLM's FLOP model (the tower is counted per image by ``self.tower_flops``, no projector term)."""
        lm, vcfg = language_model, self.config.vision_config
        return FlopModel(
            d=lm.config.hidden_size,
            m=lm.config.intermediate_size,
            c=vcfg.hidden_size,
            mv=vcfg.intermediate_size,
            vision_layers=0,  # counted by self.tower_flops instead
            vision_tokens=0,
            mlp_matrices=mlp_matrices(lm.layers[0].mlp),
            kv_dim=kv_width(lm.config),
            projector_macs=0,
        )

    # -- positions: M-RoPE, [B, L, 3] ------------------------------------------------------------------

    @staticmethod
    def _axes(position_ids: Tensor) -> Tensor:
        """The caller's ``[4, B, L]`` (text + 3 axes, generate's) or ``[3, B, L]`` -> ``[B, L, 3]``."""
        return position_ids[-3:].permute(1, 2, 0).long()

    def positions(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, options: ForwardOptions
    ) -> Tensor:
        if position_ids is not None and position_ids.dim() == 3:
            return self._axes(position_ids)
        grid, types = options.get("image_grid_thw"), options.get("mm_token_type_ids")
        videos = {k: options.get(k) for k in ("video_grid_thw", "second_per_grid_ts")}
        if position_ids is None and (grid is not None or videos["video_grid_thw"] is not None) and types is not None:
            return mrope_index(self.inner, input_ids, types, grid, attention_mask, **videos)
        # 1-D positions (the caller's, or no image): the rotary embedding repeats them on the three axes
        return super().positions(input_ids, attention_mask, position_ids, options)

    def decode_positions(self, position_ids: Tensor | None, seen: int, b: int, q: int, device: torch.device) -> Tensor:
        if position_ids is not None and position_ids.dim() == 3:
            return self._axes(position_ids)
        if position_ids is None and getattr(self.inner, "rope_deltas", None) is not None:
            # what the stock model does: text positions shifted by each sample's M-RoPE delta
            return torch.arange(seen, seen + q, device=device)[None, :] + self.inner.rope_deltas.to(device)
        return super().decode_positions(position_ids, seen, b, q, device)

    def rotary(self, hidden: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return super().rotary(hidden, pos.permute(2, 0, 1) if pos.dim() == 3 else pos)

    def text_positions(self, pos: Tensor) -> Tensor:
        return pos[..., 0] if pos.dim() == 3 else pos

    def patch_cells(self, features: ImageFeatures, options: ForwardOptions) -> Tensor | None:
        """Merged ``2 x 2`` patches on each image's merged grid, frame ``t`` (:func:`tokprune.keptmap.thw_cells`)."""
        grid = features.grid_thw if features.grid_thw is not None else options.get("image_grid_thw")
        if grid is None:
            return None
        return thw_cells(grid, self.config.vision_config.spatial_merge_size)

    # -- the vision stage -----------------------------------------------------------------------------

    def check_inputs(self, pixel_values: Tensor | None, options: ForwardOptions) -> None:
        if pixel_values is not None and options.get("image_grid_thw") is None:
            raise InputError(f"{self.label} needs image_grid_thw with pixel_values (the processor returns both)")
        if options.get("pixel_values_videos") is not None and options.get("video_grid_thw") is None:
            raise InputError(
                f"{self.label} needs video_grid_thw with pixel_values_videos (the processor returns both)"
            )

    def stock_features(self, encoded: hf.BaseModelOutputWithPooling, options: ForwardOptions) -> ImageFeatures:
        return self._whole(encoded, options.get("image_grid_thw"))

    def stock_video_features(
        self, encoded: hf.BaseModelOutputWithPooling, options: ForwardOptions
    ) -> ImageFeatures:
        out = self._whole(encoded, options.get("video_grid_thw"))
        out.videos = torch.ones(out.keep.shape[0], dtype=torch.bool, device=out.keep.device)
        return out

    def _whole(self, encoded: hf.BaseModelOutputWithPooling, grid: object) -> ImageFeatures:
        """The model's own items, kept whole, with their tower cost and grid where the grid is given."""
        out = ImageFeatures.unpruned(encoded.pooler_output)
        if isinstance(grid, Tensor):
            out.tower_runs, out.tower_flops, out.grid_thw = grid.prod(dim=-1), self.tower_flops.flops(grid), grid
        out.deepstack = self.deepstack_rows(encoded, padded=False)
        return out

    def encode_images(self, pixel_values: Tensor, options: ForwardOptions) -> QwenItems:
        """The tower and merger unchanged (the class's ``get_image_features``: our own patched attribute is not
        called back); each image's merged tokens (one ``[N_i, D]`` each) as one padded row with ``lengths``."""
        grid = options["image_grid_thw"]
        encoded = type(self.inner).get_image_features(self.inner, pixel_values, grid, return_dict=True)
        return self._items(encoded, grid, video=False)

    def encode_videos(self, pixel_values_videos: Tensor, options: ForwardOptions) -> QwenItems:
        """The stock ``get_video_features`` (the class's), one padded row per video (its frames in turn)."""
        grid = options["video_grid_thw"]
        return self._items(self.video_features(pixel_values_videos, grid), grid, video=True)

    def video_features(self, pixel_values_videos: Tensor, grid: Tensor) -> hf.BaseModelOutputWithPooling:
        """The tower on videos (Qwen2.5-VL: the class's ``get_video_features``)."""
        return type(self.inner).get_video_features(self.inner, pixel_values_videos, grid, return_dict=True)

    def _items(self, encoded: hf.BaseModelOutputWithPooling, grid: Tensor, video: bool) -> QwenItems:
        items = list(encoded.pooler_output)
        features = torch.nn.utils.rnn.pad_sequence(items, batch_first=True)  # [I, L, D]
        return QwenItems(
            features,
            lengths=torch.tensor([p.shape[0] for p in items], device=features.device),
            tower_runs=grid.prod(dim=-1),
            tower_flops=self.tower_flops.flops(grid),
            deepstack=self.deepstack_rows(encoded, padded=True),
            video=video,
            items=items,
            grid=grid,
        )

    def deepstack_rows(self, encoded: hf.BaseModelOutputWithPooling, padded: bool) -> list[Tensor] | None:
        """Rows the LLM adds to the image tokens after its first layers (Qwen3-VL's DeepStack); none here."""
        return None

    def repeat_item_inputs(self, inputs: ForwardOptions, copies: int) -> dict[str, Tensor]:
        """Images' and videos' pixels (a row per patch) and grids (a row per item) for ``num_return_sequences``:
        repeating them row-wise would scramble the patches (:func:`~tokprune.adapters.video.expand_visual_inputs`)."""
        kinds = (
            (self.config.image_token_id, "pixel_values", "image_grid_thw", ()),
            (self.config.video_token_id, "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",)),
        )
        return expand_visual_inputs(dict(inputs), kinds, self.config.vision_config.spatial_merge_size**2, copies)

    def _frame_rows(self, images: QwenItems) -> tuple[FrameLayout, list[Tensor] | None, Tensor, Tensor]:
        """The strategy rows' frame layout and, with ``budget_scope="frame"`` on videos, the rows themselves
        (one per frame of each video, :func:`~.video.frame_rows`) with each row's item and first token."""
        device = images.features.device
        frames = images.grid[:, 0].to(device)
        merged = (images.grid[:, 1:] // self.config.vision_config.spatial_merge_size).to(device)  # (rows, cols)
        if images.video and self.budget_scope == "frame":
            rows, row_item, row_offset = frame_rows(images.items, frames)
            return FrameLayout(torch.ones_like(row_item), merged[row_item]), rows, row_item, row_offset
        return FrameLayout(frames, merged), None, frames, frames

    def plan_images(self, step: PruningStrategy, images: EncodedImages, ctx: VisionContext) -> VisionPlan:
        """Each item one row with its frame layout (``ctx.frames``), or one row per frame of a video with
        ``budget_scope="frame"``; a temporal step (EVS, VidCom2) leaves images whole (vLLM's
        ``--video-pruning-rate``)."""
        if not isinstance(images, QwenItems):
            raise InternalError(f"{self.label}'s plan made on images it did not encode ({type(images).__name__})")
        if step.temporal and not images.video:
            return VisionPlan(keep=ctx.token_valid)
        layout, rows, _, _ = self._frame_rows(images)
        if rows is None:
            return step(replace(ctx, frames=layout))
        features = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [R, L, D]
        lengths = torch.tensor([p.shape[0] for p in rows], device=features.device)
        signals = self.tower_signals(images, None, lengths)
        return step(VisionContext(features=features, signals=signals, lengths=lengths, frames=layout))

    def place_plan(self, images: EncodedImages, plan: VisionPlan) -> ImageFeatures:
        """The kept merged tokens (no projector: the merger ran in the tower), a per-frame plan mapped back to
        its videos, each item's grid and kind."""
        if not isinstance(images, QwenItems):
            raise InternalError(f"{self.label}'s plan placed on images it did not encode ({type(images).__name__})")
        step = self.pipeline.vision
        if step is not None and step.temporal and not images.video:  # images pass whole
            out = ImageFeatures.unpruned(images.items)
            out.tower_runs, out.tower_flops, out.grid_thw = images.tower_runs, images.tower_flops, images.grid
            if images.deepstack is not None:
                out.deepstack = [rows[out.keep] for rows in images.deepstack]
            return out
        _, rows, row_item, row_offset = self._frame_rows(images)
        features = images.features
        keep = plan.keep
        if rows is not None:
            if plan.extra is not None:
                raise UnsupportedModelError(
                    f"{step.short_spec()} adds extra tokens per row, which budget_scope='frame' would multiply by "
                    "the frames of a video; use budget_scope='image' (per video) with it"
                )
            features = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
            keep = rows_to_items(keep, row_item, row_offset, len(images.items), images.features.shape[1])
        chosen = plan.features if plan.features is not None else features
        device = images.features.device
        return ImageFeatures(
            kept=chosen[plan.keep],  # row-major: a video's frame rows are consecutive, so item-major raster order
            keep=keep,
            extra=plan.extra,
            extra_valid=plan.extra_valid,
            lengths=images.lengths,
            tower_runs=images.tower_runs,
            tower_flops=images.tower_flops,
            deepstack=None if images.deepstack is None else [rows[keep] for rows in images.deepstack],
            grid_thw=images.grid,
            videos=torch.full((len(images.items),), images.video, dtype=torch.bool, device=device),
        )


# -- the tiny case -----------------------------------------------------------------------------------------


#: Image grids (t, h, w) in patches the tiny Qwen2.5-VL inputs draw from: 6, 8, 4 and 12 LLM tokens.
QWEN_GRIDS: tuple[tuple[int, int, int], ...] = ((1, 4, 6), (1, 8, 4), (1, 4, 4), (1, 6, 8))


def _qwen_token_ids() -> dict[str, int]:
    return {
        "image_token_id": VOCAB.image,
        "video_token_id": VOCAB.size - 1,
        "vision_start_token_id": VOCAB.size - 3,
        "vision_end_token_id": VOCAB.size - 2,
    }


def _qwen_text_config(**extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB.size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "initializer_range": 0.08,
        "bos_token_id": VOCAB.bos,
        "eos_token_id": VOCAB.eos,
        "pad_token_id": VOCAB.pad,
        **extra,
    }


def _qwen_model(
    model_cls: type, config: Any, seed: int, attn_implementation: str, dtype: torch.dtype
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """Build a Qwen-VL model from ``config`` and the ``make_inputs`` of :func:`tiny_qwen2_5_vl`."""
    model = random_model(model_cls, config, seed, attn_implementation, dtype)
    vcfg = config.vision_config
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2

    def make_inputs(
        question_lengths: Sequence[int] = (5, 3), seeds: Sequence[int] | None = None, images: int = 1
    ) -> dict[str, Tensor]:
        seeds = list(range(len(question_lengths))) if seeds is None else list(seeds)
        rows, pixels, grids = [], [], []
        for q, s in zip(question_lengths, seeds):
            gen = torch.Generator().manual_seed(s * 1009 + q)
            own = [torch.tensor(QWEN_GRIDS[(s + k) % len(QWEN_GRIDS)]) for k in range(images)]
            words = torch.randint(VOCAB.first_word, VOCAB.size - 3, (q,), generator=gen).tolist()
            rows.append(prompt_ids([int(g.prod()) // vcfg.spatial_merge_size**2 for g in own], words))
            pixels += [torch.randn(int(g.prod()), patch_dim, generator=gen) for g in own]
            grids += own
        padded = left_padded(rows)
        input_ids = padded["input_ids"]
        return {
            **padded,
            "pixel_values": torch.cat(pixels).to(dtype),
            "image_grid_thw": torch.stack(grids),
            "mm_token_type_ids": (input_ids == VOCAB.image).int(),
        }

    return model, make_inputs


def tiny_qwen2_5_vl(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny ``Qwen2_5_VLForConditionalGeneration`` (window attention, 2x2 patch merger,
    M-RoPE) and ``make_inputs`` like :func:`tiny_llava`'s; sample ``i`` draws its image grid from its
    seed, so images of one batch bring different numbers of tokens.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 4,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 16,
            "fullatt_block_indexes": [1],
            "in_channels": 3,
            "initializer_range": 0.08,
        },
        text_config=_qwen_text_config(),
        **_qwen_token_ids(),
        bos_token_id=VOCAB.bos,
        eos_token_id=VOCAB.eos,
        pad_token_id=VOCAB.pad,
    )
    return _qwen_model(Qwen2_5_VLForConditionalGeneration, config, seed, attn_implementation, dtype)
