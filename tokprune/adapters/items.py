"""A prefill's visual items: a family that takes video (``FamilyParts.video_token_id``) gets its images and
videos joined here, in prompt order, before the shared forward (:class:`VisualItems`, mixed into the core).

A video reaches the LLM as runs of its own placeholder id; the shared decoder knows one kind of item, so the
videos (pruned by the vision step like images, or the model's own features) and the images are joined in
the order their placeholders appear (:func:`~tokprune.adapters.video.item_order`,
:func:`~tokprune.adapters.features.join_items`), the video placeholders become image placeholders, and the
joined features go on as pre-encoded images. Positions come from the family (Qwen: ``mm_token_type_ids``,
which keeps the distinction).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .call import CallState, _generated_count
from .features import ImageFeatures, join_items
from .video import item_order

__all__ = ["VisualItems"]


class VisualItems:
    """The forward's videos joined to its images (a part of :class:`~tokprune.adapters.decoder.PrunedDecoderAdapter`)."""

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
        video_id = self.model_parts.video_token_id
        if video_id is None:  # images only: the shared forward as it is
            return super()._forward_call(
                call, input_ids, pixel_values, attention_mask, position_ids, inputs_embeds, mm_encoder_outputs, kwargs
            )
        self.check_inputs(pixel_values, kwargs)
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
            if bool(((input_ids == video_id) & prompt).any()):
                raise InputError(
                    f"the prompt has video tokens (id {video_id}) but no pixel_values_videos or video "
                    "features were given"
                )
            return super()._forward_call(
                call, input_ids, pixel_values, attention_mask, position_ids, None, mm or None, kwargs
            )
        if pixel_values is not None and mm.get("image") is not None:
            raise InputError("pass either pixel_values or mm_encoder_outputs (pre-encoded images), not both")
        image_out = self._vision(call, pixel_values, mm.get("image"), kwargs)[1]
        kinds, parts = [], []
        for name, token, out in (("image", self._image_token_id, image_out), ("video", video_id, video_out)):
            if out is not None:
                kinds.append((name, token, out.token_counts))
                parts.append(out)
        joined = join_items(parts, item_order(input_ids, prompt, kinds))
        ids = torch.where((input_ids == video_id) & prompt, self._image_token_id, input_ids)
        mm["image"] = ImageFeatures.of(joined)
        # what a later turn of the conversation is checked against: the caller's ids and pixels, not ours
        call.caller_inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "pixel_values_videos": pixels}
        call.caller_inputs = {k: v for k, v in call.caller_inputs.items() if v is not None}
        return super()._forward_call(call, ids, None, attention_mask, position_ids, None, mm, kwargs)

    def _videos(
        self, call: CallState, pixels: Tensor | None, encoded: Any, options: Mapping[str, object]
    ) -> ImageFeatures | None:
        """This call's videos (pruned by the vision step, else whole), or None."""
        if encoded is not None:  # pre-encoded by generate() through get_video_features
            return self._pre_encoded(encoded, options, video=True)[1]
        if pixels is None:
            return None
        if self.pipeline.vision is None:
            return self.stock_video_features(self._stock_encode(pixels, options, "get_video_features"), options)
        return self._vision_stage(call, pixels, options, video=True)
