"""Qwen3-VL in vLLM: images pruned per request and videos per frame, each kept token's DeepStack features on
the same row, positions as ``tokprune.patch`` gives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...serving import ServingPlan
from ..vllm_plugin import SPEC_FIELD, VIDEO_SPEC_FIELD, check_engine_spec, decode_specs, item_groups
from .mrope import recompute_on_placeholders, unpruned_positions


def classes(mixin: type, registry: Any) -> dict[str, type]:
    """vLLM's Qwen3-VL processor and model, subclassed (``mixin``: the spec processor mixin of
    :mod:`tokprune.integrations.vllm_plugin`; the processor registered in ``registry``)."""
    from vllm.model_executor.models.qwen3_vl import (
        Qwen3VLDummyInputsBuilder,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMultiModalProcessor,
        Qwen3VLProcessingInfo,
    )
    from vllm.multimodal.processing import PromptUpdateDetails
    from vllm.multimodal.video_prune.evs import compute_mrope_for_media

    class TokpruneQwen3VLProcessor(mixin, Qwen3VLMultiModalProcessor):
        tokprune_tower = "none"
        tokprune_family = "Qwen3-VL"
        tokprune_video = "frame"

        def tokprune_video_tokens(self, tokens: Any, plan: ServingPlan, item: Any) -> Any:
            """Every frame's run (after its timestamp and vision start) cut to the frame's budget: a Qwen3-VL
            video is one block per frame whose sizes vLLM fixes before encoding, so a server prunes it per
            frame only (``tokprune_budget_scope="frame"``, :meth:`ServingPlan.check_video`)."""
            video_id = self.info.get_hf_config().video_token_id
            layout = self.tokprune_frames(item)
            kept = plan.frame_kept_count(int(layout.tokens_per_frame[0]))
            ids = tokens.full if isinstance(tokens, PromptUpdateDetails) else list(tokens)
            out, run = [], 0
            for token in ids:
                run = run + 1 if token == video_id else 0
                if run <= kept:
                    out.append(token)
            return PromptUpdateDetails.select_token_id(out, video_id)

    @registry.register_processor(
        TokpruneQwen3VLProcessor, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
    )
    class TokpruneQwen3VL(Qwen3VLForConditionalGeneration):
        """vLLM's Qwen3-VL; pruned images keep their merged tokens' DeepStack features (the same rows: vLLM
        concatenates them on the channel axis) and their unpruned positions, as ``tokprune.patch`` does.
        Videos are pruned per frame (budget scope ``"frame"``), each frame's kept rows at their stock offsets
        in the frame's own run, as ``tokprune.patch(..., budget_scope="frame")``."""

        tokprune_prunes = True
        supports_multimodal_pruning = True

        def __init__(self, *, vllm_config: Any, prefix: str = "model") -> None:
            check_engine_spec(vllm_config, "none", "Qwen3-VL", video="frame")
            super().__init__(vllm_config=vllm_config, prefix=prefix)

        def get_encoder_cudagraph_config(self) -> Any:
            saved = self.is_multimodal_pruning_enabled
            self.is_multimodal_pruning_enabled = True  # see TokpruneQwen2_5_VL
            try:
                return super().get_encoder_cudagraph_config()
            finally:
                self.is_multimodal_pruning_enabled = saved

        def embed_multimodal(self, **kwargs: object) -> Any:
            field = kwargs.pop(SPEC_FIELD, None)
            video_field = kwargs.pop(VIDEO_SPEC_FIELD, None)
            by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
            if not by_modality:
                return None
            out: list[Tensor] = []
            for modality, inputs in by_modality.items():
                if modality == "image":
                    embeds = list(self._process_image_input(inputs))
                    grids = inputs["image_grid_thw"].tolist()
                    out += self._prune_images(embeds, grids, decode_specs(field, len(grids)))
                elif modality == "video":
                    embeds = self._process_video_input(inputs)
                    if self.is_multimodal_pruning_enabled:  # vLLM's own EVS (--video-pruning-rate): its rows
                        out += list(self._postprocess_video_embeds_evs(embeds, inputs))
                        continue
                    grids = inputs["video_grid_thw"].tolist()
                    keeps = self._prune_frames(list(embeds), grids, decode_specs(video_field, len(grids)))
                    out += [self._with_frame_offsets(e, g, k) for e, g, k in zip(embeds, grids, keeps)]
            return tuple(out)

        def _prune_frames(self, embeds: list[Tensor], grids: list[list[int]], specs: list[str]) -> list[Tensor | None]:
            """Each video's keep mask bool ``[T * H * W]`` (None: unpruned), every frame a strategy row of its
            own scored on its merged tokens (the DeepStack levels follow on the channel axis), as
            ``tokprune.patch``'s frame rows; the processor admitted budget scope ``"frame"`` only."""
            keeps: list[Tensor | None] = [None] * len(embeds)
            width = self.visual_dim
            for plan, index in item_groups(specs):
                if not plan.prunes:
                    continue
                videos = [embeds[i][:, :width] for i in index]
                for i, keep in zip(index, plan.select_frames(videos, [grids[i][0] for i in index])):
                    keeps[i] = keep
            return keeps

        def _with_frame_offsets(self, emb: Tensor, grid: list[int], keep: Tensor | None = None) -> Tensor:
            """A video's (kept) rows with their offsets appended (4 columns, as images'): each frame is its own
            placeholder run after its timestamp, at time offset 0 (Qwen3-VL tells frames apart by timestamps),
            so a frame's token (r, c) sits at (0, r, c) past its run's start, kept or not."""
            t, h, w = grid
            frame = compute_mrope_for_media(torch.tensor([1, h, w]), self.visual.spatial_merge_size)
            offsets = frame.repeat(t, 1).to(emb.device, emb.dtype)
            if keep is not None:
                emb, offsets = emb[keep.to(emb.device)], offsets[keep.to(emb.device)]
            return torch.cat([emb, offsets], dim=1)

        def _prune_images(self, embeds: list[Tensor], grids: list[list[int]], specs: list[str]) -> list[Tensor]:
            keeps: list[Tensor | None] = [None] * len(embeds)
            # the merged tokens (the LLM's input: no projector); the DeepStack levels follow on the channel axis
            width = self.visual_dim
            for plan, index in item_groups(specs):
                if plan.prunes_images:
                    for i, keep in zip(index, plan.select([embeds[i][:, :width] for i in index])):
                        keeps[i] = keep
            out = []
            for emb, grid, keep in zip(embeds, grids, keeps):
                pos = compute_mrope_for_media(torch.tensor(grid), self.visual.spatial_merge_size).to(emb.device)
                if keep is not None:
                    emb, pos = emb[keep.to(emb.device)], pos[keep.to(pos.device)]
                out.append(torch.cat([emb, pos.to(emb.dtype)], dim=1))
            return out

        def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[Tensor, int]:
            merge = self.config.vision_config.spatial_merge_size
            media_ids = (self.config.image_token_id, self.config.video_token_id)

            def full_runs(feature: Any) -> list[int]:
                key = "image_grid_thw" if feature.modality == "image" else "video_grid_thw"
                t, h, w = (int(x) for x in feature.data[key].data)
                return [h * w // merge**2] * (1 if feature.modality == "image" else t)

            if sum(sum(full_runs(f)) for f in mm_features) == sum(t in media_ids for t in input_tokens):
                return super().get_mrope_input_positions(input_tokens, mm_features)

            def stock(tokens: list[int], features: list[Any]) -> tuple[Tensor, int]:
                return Qwen3VLForConditionalGeneration._get_mrope_input_positions(
                    input_tokens=tokens, mm_features=features, config=self.config
                )

            return unpruned_positions(stock, input_tokens, mm_features, full_runs, media_ids)

        def recompute_mrope_positions(
            self,
            input_ids: Any,
            multimodal_embeddings: Sequence[Tensor],
            mrope_positions: Tensor,
            num_computed_tokens: int,
        ) -> tuple[Sequence[Tensor], Tensor, int]:
            """Every media row on its placeholder at its own offset (:func:`place_media_positions`), as for
            Qwen2.5-VL; text keeps the unpruned prompt's positions (:meth:`get_mrope_input_positions`).
            vLLM's own recompute would renumber everything after an item as text, which moves a video's
            later frames (each frame is its own run after its timestamp text)."""
            return recompute_on_placeholders(
                self.config, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )

    return {"TokpruneQwen3VL": TokpruneQwen3VL, "TokpruneQwen3VLProcessor": TokpruneQwen3VLProcessor}
