"""Qwen2.5-VL in vLLM: images and videos pruned per request, each kept merged token at its unpruned 3-D
M-RoPE position (as ``tokprune.patch``), the text after a medium at its unpruned positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...strategy import FrameLayout
from ..vllm_plugin import SPEC_FIELD, VIDEO_SPEC_FIELD, check_engine_spec, decode_specs, item_groups
from .mrope import recompute_on_placeholders


def classes(mixin: type, registry: Any) -> dict[str, type]:
    """vLLM's Qwen2.5-VL processor and model, subclassed (``mixin``: the spec processor mixin of
    :mod:`tokprune.integrations.vllm_plugin`; the processor registered in ``registry``)."""
    import numpy as np
    from vllm.model_executor.models.qwen2_5_vl import (
        Qwen2_5_VLDummyInputsBuilder,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLMultiModalProcessor,
        Qwen2_5_VLProcessingInfo,
    )
    from vllm.multimodal.video_prune.evs import compute_mrope_for_media

    class TokpruneQwen2_5_VLProcessor(mixin, Qwen2_5_VLMultiModalProcessor):
        tokprune_tower = "none"
        tokprune_family = "Qwen2.5-VL"
        tokprune_video = True

    @registry.register_processor(
        TokpruneQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
    )
    class TokpruneQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
        """vLLM's Qwen2.5-VL; images whose request asks for a spec keep only the chosen merged tokens."""

        tokprune_prunes = True
        supports_multimodal_pruning = True

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            check_engine_spec(vllm_config, "none", "Qwen2.5-VL", video=True)
            super().__init__(vllm_config=vllm_config, prefix=prefix)

        def get_encoder_cudagraph_config(self) -> Any:
            # vLLM's encoder CUDA graphs bypass embed_multimodal (where the rows are chosen and their
            # positions appended); vLLM's own EVS turns them off for the same reason, through this flag
            saved = self.is_multimodal_pruning_enabled
            self.is_multimodal_pruning_enabled = True
            try:
                return super().get_encoder_cudagraph_config()
            finally:
                self.is_multimodal_pruning_enabled = saved

        def _media_positions(self, grid: Sequence[int], t_factor: float = 1.0) -> Tensor:
            """long ``[N, 4]``: each merged token's unpruned (t, h, w) offset and, in column 3, the offset the
            text after the media starts at (vLLM's 4-column row format; the plugin's own recompute reads the offsets only)."""
            merge = self.visual.spatial_merge_size
            if t_factor == 1.0:
                pos = compute_mrope_for_media(torch.tensor(grid), merge)
            else:
                pos = compute_mrope_for_media(torch.tensor(grid), merge, tokens_per_second=t_factor)
            pos[:, 3] = pos[:, :3].max() + 1
            return pos

        def embed_multimodal(self, **kwargs: object) -> Any:
            field = kwargs.pop(SPEC_FIELD, None)
            video_field = kwargs.pop(VIDEO_SPEC_FIELD, None)
            by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
            out: list[Tensor] = []
            for modality, inputs in by_modality.items():
                if modality == "image":
                    embeds = self._process_image_input(inputs)
                    grids = inputs["image_grid_thw"].tolist()
                    out += self._prune_images(list(embeds), grids, decode_specs(field, len(grids)))
                elif modality == "video":
                    embeds = self._process_video_input(inputs)
                    if self.is_multimodal_pruning_enabled:  # vLLM's own EVS appends its positions
                        out += list(self._postprocess_video_embeds_evs(embeds, inputs))
                        continue
                    grids = inputs["video_grid_thw"].tolist()
                    seconds = inputs.get("second_per_grid_ts")
                    tps = getattr(self.config.vision_config, "tokens_per_second", 1.0)
                    # the stock rule's time axis (get_mrope_input_positions): frame index * seconds * tps
                    factors = [tps * (float(seconds[i]) if seconds is not None else 1.0) for i in range(len(grids))]
                    out += self._prune_videos(list(embeds), grids, factors, decode_specs(video_field, len(grids)))
            return tuple(out)

        def _prune_videos(
            self, embeds: list[Tensor], grids: list[list[int]], factors: list[float], specs: list[str]
        ) -> list[Tensor]:
            """Each video's kept merged tokens (one strategy row per video, its frames in ``ctx.frames``, as
            ``tokprune.patch``'s default ``budget_scope="image"``; one row per frame under budget scope
            ``"frame"``) with their unpruned M-RoPE offsets appended."""
            merge = self.visual.spatial_merge_size
            keeps: list[Tensor | None] = [None] * len(embeds)
            for plan, index in item_groups(specs):
                if not plan.prunes:
                    continue
                if plan.scope == "frame":  # each frame a row of its own, as tokprune.patch's frame_rows
                    for i, keep in zip(index, plan.select_frames([embeds[i] for i in index], [grids[i][0] for i in index])):
                        keeps[i] = keep
                    continue
                thw = torch.tensor([grids[i] for i in index], device=embeds[index[0]].device)
                layout = FrameLayout(thw[:, 0], thw[:, 1:] // merge)
                for i, keep in zip(index, plan.select([embeds[i] for i in index], frames=layout)):
                    keeps[i] = keep
            out = []
            for emb, grid, factor, keep in zip(embeds, grids, factors, keeps):
                pos = self._media_positions(grid, factor).to(emb.device)
                rows = emb if keep is None else emb[keep.to(emb.device)]
                pos = pos if keep is None else pos[keep.to(pos.device)]
                out.append(torch.cat([rows, pos.to(emb.dtype)], dim=1))
            return out

        def _prune_images(self, embeds: list[Tensor], grids: list[list[int]], specs: list[str]) -> list[Tensor]:
            """Each image's kept merged tokens, with their unpruned M-RoPE offsets appended (4 columns)."""
            keeps: list[Tensor | None] = [None] * len(embeds)
            for plan, index in item_groups(specs):
                if plan.prunes_images:
                    # the merged tokens already are the LLM's input: no projector (as the transformers adapter)
                    for i, keep in zip(index, plan.select([embeds[i] for i in index])):
                        keeps[i] = keep
            out = []
            for emb, grid, keep in zip(embeds, grids, keeps):
                pos = self._media_positions(grid).to(emb.device)
                rows = emb if keep is None else emb[keep.to(emb.device)]
                pos = pos if keep is None else pos[keep.to(pos.device)]
                out.append(torch.cat([rows, pos.to(emb.dtype)], dim=1))
            return out

        def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
            """Text positions as the unpruned prompt has them; an image's placeholders provisional (the runner
            replaces them with the kept tokens' own after encoding, :meth:`recompute_mrope_positions`)."""
            chunks, start, next_pos = [], 0, 0
            for (offset, t, h, w, t_factor), feature in zip(
                self.iter_mm_grid_thw(mm_features), sorted(mm_features, key=lambda f: f.mm_position.offset)
            ):
                text = offset - start
                chunks.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
                grid = np.indices((t, h, w))
                if t_factor != 1.0:
                    grid[0] = (grid[0] * t_factor).astype(np.int64)
                media = grid.reshape(3, -1) + next_pos + text
                length = feature.mm_position.length
                chunks.append(media[:, :length])
                next_pos = int(media.max()) + 1
                start = offset + length
            if start < len(input_tokens):
                text = len(input_tokens) - start
                chunks.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
            positions = np.concatenate(chunks, axis=1).reshape(3, -1)
            return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))

        def recompute_mrope_positions(
            self,
            input_ids: Any,
            multimodal_embeddings: Sequence[Tensor],
            mrope_positions: Tensor,
            num_computed_tokens: int,
        ) -> tuple[Sequence[Tensor], Tensor, int]:
            """The kept rows' own positions on their placeholders (:func:`place_media_positions`). vLLM's
            ``recompute_mrope_positions`` finds an item's run from the vision starts and a count that
            advances by the media rows only, and in an image-then-video prompt puts the video's rows on the
            image's placeholders (measured; tests/test_vllm_video.py); the text positions need no
            recomputing here (they are the unpruned prompt's, from :meth:`get_mrope_input_positions`)."""
            return recompute_on_placeholders(
                self.config, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )

    return {"TokpruneQwen2_5_VL": TokpruneQwen2_5_VL, "TokpruneQwen2_5_VLProcessor": TokpruneQwen2_5_VLProcessor}
