"""The Qwen2.5-VL family: HF ``Qwen2_5_VLForConditionalGeneration`` (dynamic resolution, M-RoPE).

Shared with every family (:mod:`.decoder`): generate() checks, assembly, the pruned decoder loop, stats.
This file knows only Qwen2.5-VL:

* the tower (window attention, then the patch merger) runs **unchanged**: the vision stage prunes the
  tokens the LLM sees, after the merger, per image (``image_grid_thw`` decides how many: ``t*h*w/4``).
  The tower has no CLS token, so only strategies reading no CLS signal and cutting per image run
  (refused at ``patch()`` otherwise, with the list of those that work). Budgets are per image;
* videos (``pixel_values_videos`` + ``video_grid_thw``, ``second_per_grid_ts``) run the same tower through
  the model's own ``get_video_features``; each video is one strategy row (its ``t`` frames of
  ``h*w/4`` tokens, :class:`~tokprune.strategy.FrameLayout` in ``ctx.frames``), or one row per frame with
  ``budget_scope="frame"``. Images and videos of one prompt are one list of visual items in prompt order
  for the shared decoder (:mod:`.video`): the video placeholders are image placeholders to it;
* positions are M-RoPE's three axes (temporal, height, width), long ``[B, L, 3]``, built by the model's
  own ``get_rope_index`` on the **unpruned** prompt: survivors keep their 3-D positions. ``compact``
  renumbering is refused (it is defined for 1-D positions);
* the decoder layers get the model's own rotary embedding of the 3-D positions (through hf_compat).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InputError, InternalError, UnsupportedModelError
from ..keptmap import thw_cells
from ..pipeline import Pipeline
from ..stats import FlopModel, WindowedTower, kv_width, mlp_matrices
from ..strategy import FrameLayout, Signal, VisionContext, VisionSignals
from ._tiny import VOCAB, TinyCase, left_padded, prompt_ids, random_model
from .call import _generated_count
from .decoder import CallState, PrunedDecoderAdapter, PrunedImageFeatures, VisionOut
from .features import join_items
from .video import expand_visual_inputs, frame_rows, item_order, rows_to_items

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


class Qwen2_5_VLAdapter(PrunedDecoderAdapter):
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
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> Any:

        model, make_inputs = tiny_qwen2_5_vl(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)

    def __init__(self, model: nn.Module, pipeline: Pipeline, **options: Any) -> None:
        super().__init__(model, pipeline, **options)  # options: see tokprune.patch
        self._inner = model.model
        self._lm = self._inner.language_model
        self._config = model.config
        self._output_class = self._family_output_class()
        self._check_features()
        self._image_token_id = self._config.image_token_id
        self._video_token_id = self._config.video_token_id
        self._init_decoder()
        self._check_cls(tower_has_cls=False)
        vcfg = self._config.vision_config
        self._merge = vcfg.spatial_merge_size**2  # patches per LLM token
        self._tokens_per_image = 0  # no fixed count: image_grid_thw decides
        # The tower (window and full attention blocks, then the merger) is counted per image from its
        # grid (VisionOut.tower_flops); the merger runs before pruning, so no projector term follows it.
        self._tower_flops = WindowedTower.of(vcfg, self._inner.visual.blocks[0].mlp)
        self._flops = FlopModel(
            d=self._lm.config.hidden_size,
            m=self._lm.config.intermediate_size,
            c=vcfg.hidden_size,
            mv=vcfg.intermediate_size,
            vision_layers=0,  # counted by self._tower_flops instead
            vision_tokens=0,
            mlp_matrices=mlp_matrices(self._lm.layers[0].mlp),
            kv_dim=kv_width(self._lm.config),
            projector_macs=0,
        )

    @staticmethod
    def _family_output_class() -> type:
        return output_class()

    def _check_features(self) -> None:
        """Refuse (before anything is touched) what the installed transformers lacks for this family."""
        hf.check_model(self._lm, self._output_class, image_field=False)  # no image field before 5.24
        check_mrope(self._inner, self._lm)

    def _install_family(self) -> None:
        if self.pipeline.vision is None:
            return
        original = self._inner.get_image_features

        @functools.wraps(original)  # generate() routes pixel_values and image_grid_thw by this signature
        def get_image_features(pixel_values: Tensor, image_grid_thw: Tensor, *args: Any, **kwargs: Any) -> Any:
            with self._active(CallState(self)) as call:
                encoded = original(pixel_values, image_grid_thw, return_dict=True)
                return PrunedImageFeatures.of(self._prune(call, encoded, image_grid_thw))

        self._state.set_attribute(self._inner, "get_image_features", get_image_features)
        original_video = self._inner.get_video_features

        @functools.wraps(original_video)  # generate() routes pixel_values_videos and video_grid_thw by it
        def get_video_features(
            pixel_values_videos: Tensor, video_grid_thw: Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            with self._active(CallState(self)) as call:
                encoded = self._encode_videos(pixel_values_videos, video_grid_thw)
                return PrunedImageFeatures.of(self._prune(call, encoded, video_grid_thw, video=True))

        self._state.set_attribute(self._inner, "get_video_features", get_video_features)

    # -- positions: M-RoPE, [B, L, 3] ------------------------------------------------------------------

    @staticmethod
    def _axes(position_ids: Tensor) -> Tensor:
        """The caller's ``[4, B, L]`` (text + 3 axes, generate's) or ``[3, B, L]`` -> ``[B, L, 3]``."""
        return position_ids[-3:].permute(1, 2, 0).long()

    def _positions(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, options: dict
    ) -> Tensor:
        if position_ids is not None and position_ids.dim() == 3:
            return self._axes(position_ids)
        grid, types = options.get("image_grid_thw"), options.get("mm_token_type_ids")
        videos = {k: options.get(k) for k in ("video_grid_thw", "second_per_grid_ts")}
        if position_ids is None and (grid is not None or videos["video_grid_thw"] is not None) and types is not None:
            return mrope_index(self._inner, input_ids, types, grid, attention_mask, **videos)
        # 1-D positions (the caller's, or no image): the rotary embedding repeats them on the three axes
        return super()._positions(input_ids, attention_mask, position_ids, options)

    def _decode_positions(self, position_ids: Tensor | None, seen: int, b: int, q: int, device: torch.device) -> Tensor:
        if position_ids is not None and position_ids.dim() == 3:
            return self._axes(position_ids)
        if position_ids is None and getattr(self._inner, "rope_deltas", None) is not None:
            # what the stock model does: text positions shifted by each sample's M-RoPE delta
            return torch.arange(seen, seen + q, device=device)[None, :] + self._inner.rope_deltas.to(device)
        return super()._decode_positions(position_ids, seen, b, q, device)

    def _rotary(self, hidden: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return hf.rotary_embeddings(self._lm, hidden, pos.permute(2, 0, 1) if pos.dim() == 3 else pos)

    def _text_positions(self, pos: Tensor) -> Tensor:
        return pos[..., 0] if pos.dim() == 3 else pos

    def patch_cells(self, features: VisionOut, options: dict[str, Tensor]) -> Tensor | None:
        """Merged ``2 x 2`` patches on each image's merged grid, frame ``t`` (:func:`tokprune.keptmap.thw_cells`)."""
        grid = features.grid_thw if features.grid_thw is not None else options.get("image_grid_thw")
        if grid is None:
            return None
        return thw_cells(grid, self._config.vision_config.spatial_merge_size)

    # -- the vision stage -----------------------------------------------------------------------------

    def _vision(
        self, call: CallState, pixel_values: Tensor | None, encoded: Any, options: dict
    ) -> tuple[Any, VisionOut | None]:
        grid = options.get("image_grid_thw")  # kept in options: positions need it too
        if encoded is not None:  # pre-encoded by generate() through get_image_features
            return self._pre_encoded(encoded)
        if pixel_values is None:
            return None, None
        if grid is None:
            raise InputError(f"{self.label} needs image_grid_thw with pixel_values (the processor returns both)")
        if self.pipeline.vision is None:
            encoded = self._inner.get_image_features(pixel_values, grid, return_dict=True)
            out = self._unpruned(encoded)
            out.tower_runs = grid.prod(dim=-1)
            out.tower_flops = self._tower_flops.flops(grid)
            out.grid_thw = grid
            return encoded, out
        # The original tower and merger (our own patched attribute is not called back).
        original = type(self._inner).get_image_features.__get__(self._inner)
        encoded = original(pixel_values, grid, return_dict=True)
        out = self._prune(call, encoded, grid)
        return PrunedImageFeatures.of(out), out

    def _prune(self, call: CallState, encoded: Any, grid: Tensor, video: bool = False) -> VisionOut:
        """The strategy on each item's merged tokens (``encoded.pooler_output``: one ``[N_i, D]`` per image or
        video), seen as one padded row per item with ``lengths``, or one row per frame of each video with
        ``budget_scope="frame"``. A temporal step (EVS, VidCom2) leaves images whole."""
        step = self.pipeline.vision
        if step is None:
            raise InternalError("the vision stage ran without a vision step")
        per_item: Sequence[Tensor] = encoded.pooler_output
        if step.temporal and not video:  # as vLLM's --video-pruning-rate: images pass whole
            out = self._unpruned(encoded)
            out.tower_runs, out.tower_flops, out.grid_thw = grid.prod(dim=-1), self._tower_flops.flops(grid), grid
            return out
        device = per_item[0].device
        frames = grid[:, 0].to(device)
        merged = (grid[:, 1:] // self._config.vision_config.spatial_merge_size).to(device)  # (rows, cols)
        per_frame = video and self.budget_scope == "frame"
        if per_frame:
            rows, row_item, row_offset = frame_rows(per_item, frames)
            layout = FrameLayout(torch.ones_like(row_item), merged[row_item])
        else:
            rows, layout = list(per_item), FrameLayout(frames, merged)
        features = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [R, L, D]
        lengths = torch.tensor([p.shape[0] for p in rows], device=device)

        def fetch(signal: Signal) -> Any:  # unreachable: CLS-reading strategies are refused at patch()
            raise UnsupportedModelError(f"{self.label}'s tower provides no {signal}")

        vcfg = self._config.vision_config
        signals = VisionSignals(fetch, vcfg.depth, vcfg.num_heads, declared=frozenset(), lengths=lengths)
        plan = step(VisionContext(features=features, signals=signals, lengths=lengths, frames=layout))
        chosen = plan.features if plan.features is not None else features
        keep = plan.keep
        if per_frame:
            if plan.extra is not None:
                raise UnsupportedModelError(
                    f"{step.short_spec()} adds extra tokens per row, which budget_scope='frame' would multiply by the "
                    "frames of a video; use budget_scope='image' (per video) with it"
                )
            counts = torch.tensor([p.shape[0] for p in per_item], device=device)
            keep = rows_to_items(keep, row_item, row_offset, len(per_item), int(counts.max()))
        # the videos' diagnostics apart from the images' (both may run one step in one prompt)
        prefix = f"video.{step.name}" if video else step.name
        return VisionOut(
            chosen[plan.keep],  # row-major: a video's frame rows are consecutive, so item-major raster order
            keep,
            plan.extra,
            {f"{prefix}.{k}": v for k, v in plan.diagnostics.items()},
            lengths=torch.tensor([p.shape[0] for p in per_item], device=device),
            tower_runs=grid.prod(dim=-1),
            tower_flops=self._tower_flops.flops(grid),
            extra_valid=plan.extra_valid,
            grid_thw=grid,
            videos=torch.full((len(per_item),), video, dtype=torch.bool, device=device),
        )

    # -- videos ---------------------------------------------------------------------------------------

    def _encode_videos(self, pixel_values_videos: Tensor, video_grid_thw: Tensor) -> Any:
        """The stock ``get_video_features`` (the class's: our own patched attribute is not called back)."""
        return type(self._inner).get_video_features(self._inner, pixel_values_videos, video_grid_thw, return_dict=True)

    def _videos(self, call: CallState, pixels: Tensor | None, encoded: Any, options: dict) -> VisionOut | None:
        """This call's videos as a :class:`VisionOut` (pruned by the vision step, else whole), or None."""
        grid = options.get("video_grid_thw")
        if encoded is not None:  # pre-encoded by generate() through get_video_features
            out = self._pre_encoded(encoded)[1]
        elif pixels is None:
            return None
        elif grid is None:
            raise InputError(
                f"{self.label} needs video_grid_thw with pixel_values_videos (the processor returns both)"
            )
        elif self.pipeline.vision is None:
            out = self._unpruned(self._encode_videos(pixels, grid))
        else:
            return self._prune(call, self._encode_videos(pixels, grid), grid, video=True)
        if out.videos is None:  # the stock features (no vision step): what _prune would have set
            out.videos = torch.ones(out.keep.shape[0], dtype=torch.bool, device=out.keep.device)
            if grid is not None:
                out.tower_runs, out.tower_flops, out.grid_thw = grid.prod(-1), self._tower_flops.flops(grid), grid
        return out

    def _expand_items(self, inputs: dict[str, Any], copies: int) -> dict[str, Tensor]:
        """Images' and videos' pixels (a row per patch) and grids (a row per item) for ``num_return_sequences``:
        repeating them row-wise would scramble the patches (:func:`~tokprune.adapters.video.expand_visual_inputs`)."""
        kinds = (
            (self._image_token_id, "pixel_values", "image_grid_thw", ()),
            (self._video_token_id, "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",)),
        )
        return expand_visual_inputs(inputs, kinds, self._merge, copies)

    def _forward_call(
        self,
        call: CallState,
        input_ids: Tensor | None,
        pixel_values: Tensor | None,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        mm_encoder_outputs: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> Any:
        """The shared forward, with a prefill's videos joined to its images as one list of visual items in
        prompt order (:func:`~tokprune.adapters.video.item_order`), handed on as pre-encoded images; the video
        placeholders become image placeholders (positions come from ``mm_token_type_ids``, which keeps them)."""
        pixels = kwargs.pop("pixel_values_videos", None)
        mm = dict(mm_encoder_outputs or {})
        pre_video = mm.pop("video", None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        if input_ids is None or inputs_embeds is not None or not prefill:  # refused, or decoding: the shared path
            kwargs["pixel_values_videos"] = pixels  # a later turn's videos are checked against the cached ones
            return super()._forward_call(
                call, input_ids, pixel_values, attention_mask, position_ids, inputs_embeds, mm or None, kwargs
            )
        options = {**(call.generate.options if call.generate is not None else {}), **kwargs}
        options = {k: v for k, v in options.items() if v is not None}
        prompt = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < (
            input_ids.shape[1] - _generated_count(call.generate, input_ids.shape[1])
        )
        video_out = self._videos(call, pixels, pre_video, options)
        if video_out is None:
            if bool(((input_ids == self._video_token_id) & prompt).any()):
                raise InputError(
                    f"the prompt has video tokens (id {self._video_token_id}) but no pixel_values_videos or video "
                    "features were given"
                )
            return super()._forward_call(
                call, input_ids, pixel_values, attention_mask, position_ids, None, mm or None, kwargs
            )
        if pixel_values is not None and mm.get("image") is not None:
            raise InputError("pass either pixel_values or mm_encoder_outputs (pre-encoded images), not both")
        image_out = self._vision(call, pixel_values, mm.get("image"), kwargs)[1]
        kinds, parts = [], []
        for name, token, out in (("image", self._image_token_id, image_out), ("video", self._video_token_id, video_out)):
            if out is not None:
                kinds.append((name, token, out.token_counts))
                parts.append(out)
        joined = join_items(parts, item_order(input_ids, prompt, kinds))
        ids = torch.where((input_ids == self._video_token_id) & prompt, self._image_token_id, input_ids)
        mm["image"] = PrunedImageFeatures.of(joined)
        # what a later turn of the conversation is checked against: the caller's ids and pixels, not ours
        call.caller_inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "pixel_values_videos": pixels}
        call.caller_inputs = {k: v for k, v in call.caller_inputs.items() if v is not None}
        return super()._forward_call(call, ids, None, attention_mask, position_ids, None, mm, kwargs)


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
