"""LLaVA-1.5 in vLLM: the whole CLIP tower (CLS signals of any layer), pruning before the projector, 1-D
positions numbered by vLLM over the shorter prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..vllm_plugin import SPEC_FIELD, VllmPluginError, check_engine_spec, decode_specs, item_groups
from .clip import full_depth, tower_names, tower_states


def classes(mixin: type, registry: Any) -> dict[str, type]:
    """vLLM's LLaVA-1.5 processor and model, subclassed (``mixin``: the spec processor mixin of
    :mod:`tokprune.integrations.vllm_plugin`; the processor registered in ``registry``)."""
    from vllm.model_executor.models import llava

    from ...strategy import Signal, VisionSignals

    class TokpruneLlavaProcessor(mixin, llava.LlavaMultiModalProcessor):
        tokprune_tower = "cls"
        tokprune_family = "LLaVA-1.5"

    def build_processor(info: Any, dummy_inputs: Any, **kwargs: Any) -> Any:
        if isinstance(info, llava.LlavaProcessingInfo):
            return TokpruneLlavaProcessor(info, dummy_inputs, **kwargs)
        return llava._build_llava_or_pixtral_hf_processor(info, dummy_inputs, **kwargs)

    @registry.register_processor(
        build_processor, info=llava._build_llava_or_pixtral_hf_info, dummy_inputs=llava.LlavaDummyInputsBuilder
    )
    class TokpruneLlava(llava.LlavaForConditionalGeneration):
        """vLLM's LLaVA-1.5 with the whole CLIP tower (CLS signals of any layer) and pruning before the projector.

        Also loads checkpoints that name the tower as transformers 5 saves it (``vision_tower.embeddings.*``,
        no ``vision_model.``), such as ``tokprune.models.path("tiny-llava-shapes")``.
        """

        tokprune_prunes = False  # 1-D positions: vLLM numbers the shorter prompt itself
        hf_to_vllm_mapper = tower_names(llava.LlavaForConditionalGeneration.hf_to_vllm_mapper)

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            check_engine_spec(vllm_config, "cls", "LLaVA-1.5")
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._clip = full_depth(self, prefix)

        def embed_multimodal(self, **kwargs: object) -> Any:
            field = kwargs.pop(SPEC_FIELD, None)
            inputs = self._parse_and_validate_image_input(**kwargs)
            if inputs is None:
                return []
            if not self._clip or inputs["type"] != "pixel_values":
                if field is not None and any(s != "none" for s in decode_specs(field, 0)):
                    raise VllmPluginError("tokprune prunes LLaVA images given as pixels through a CLIP tower only")
                return self._process_image_input(inputs)
            return self._pruned_images(inputs["pixel_values"], field)

        def _pruned_images(self, pixel_values: Any, field: Any) -> tuple[Tensor, ...]:
            pixels = pixel_values if isinstance(pixel_values, Tensor) else torch.stack(list(pixel_values))
            hidden, captured = tower_states(self.vision_tower, pixels)
            features = hidden[self.config.vision_feature_layer][:, 1:]  # "default": CLS dropped
            cfg = self.config.vision_config
            side = cfg.image_size // cfg.patch_size
            specs = decode_specs(field, features.shape[0])
            keeps: list[Tensor | None] = [None] * features.shape[0]
            done: dict[int, Tensor] = {}  # image -> its kept rows, projected
            for plan, index in item_groups(specs):
                if not plan.prunes_images:
                    continue
                declared = frozenset(s.resolve(cfg.num_hidden_layers) for s in plan.requires())
                rows = torch.tensor(index, device=features.device)

                def signals(lengths: Tensor, rows: Tensor = rows, declared: frozenset = declared) -> VisionSignals:
                    def fetch(signal: Signal) -> Any:
                        if signal.kind == "qk":
                            q, k, _ = captured[signal.layer].chunk(3, dim=-1)
                            return q[rows], k[rows]
                        return hidden[signal.layer][rows]

                    return VisionSignals(fetch, cfg.num_hidden_layers, cfg.num_attention_heads, declared=declared)

                # the projector per token: DivPrune/CDPruner select on the projected tokens (their reference)
                chosen_by, projected = plan.select_projected(
                    [features[i] for i in index], signals, self.multi_modal_projector, grid=(side, side)
                )
                for i, keep, rows_out in zip(index, chosen_by, projected):
                    keeps[i] = keep
                    if rows_out is not None:  # projected to choose: the kept rows come from it, as in tokprune.patch
                        done[i] = rows_out
            return self._project_rest(features, keeps, done)

        def _project_rest(
            self, features: Tensor, keeps: list[Tensor | None], done: dict[int, Tensor]
        ) -> tuple[Tensor, ...]:
            """Each image's rows for the LLM: those a step already projected (``done``, by image), the others'
            kept features projected now in one call."""
            rest = [i for i in range(features.shape[0]) if i not in done]
            chosen = [features[i] if keeps[i] is None else features[i][keeps[i]] for i in rest]
            if chosen:
                projected = self.multi_modal_projector(torch.cat(chosen)).split([c.shape[0] for c in chosen])
                done = {**done, **dict(zip(rest, projected))}
            return tuple(done[i] for i in range(features.shape[0]))

    return {"TokpruneLlava": TokpruneLlava, "TokpruneLlavaProcessor": TokpruneLlavaProcessor}
