"""The CLIP tower of vLLM's LLaVA families as tokprune runs it: loaded under transformers 5's names, built to
full depth (a strategy may read any layer's CLS signals), run keeping every layer's states and q/k/v."""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

#: transformers 5 saves a LLaVA tower as ``vision_tower.embeddings.*``; vLLM's loaders expect
#: ``vision_tower.vision_model.*`` (the embedded ``tiny-llava-shapes`` is saved the first way).
TOWER_RENAME = {re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."}


def tower_names(mapper: Any) -> Any:
    """vLLM's ``hf_to_vllm_mapper`` of a LLaVA family, also taking the tower as transformers 5 names it."""
    from vllm.model_executor.models.utils import WeightsMapper

    return mapper | WeightsMapper(orig_to_new_regex=TOWER_RENAME)


def full_depth(model: nn.Module, prefix: str) -> bool:
    """Rebuild ``model.vision_tower`` with every layer when it is a CLIP tower vLLM built only up to the feature
    layer; returns whether the tower is CLIP (the towers tokprune prunes through)."""
    from vllm.model_executor.models.clip import CLIPVisionModel

    vision = model.config.vision_config
    if not isinstance(model.vision_tower, CLIPVisionModel):
        return False
    if len(model.vision_tower.vision_model.encoder.layers) < vision.num_hidden_layers:
        model.vision_tower = CLIPVisionModel(
            vision,
            quant_config=getattr(model, "quant_config", None),
            num_hidden_layers_override=vision.num_hidden_layers,
            require_post_norm=False,
            prefix=f"{prefix}.vision_tower" if prefix else "vision_tower",
        )
    return True


def tower_states(tower: nn.Module, pixels: Tensor) -> tuple[list[Tensor], dict[int, Tensor]]:
    """Every layer's hidden states ``[T, 1+n, C]`` (index 0: the embeddings) and every layer's q/k/v projection
    ``[T, 1+n, 3C]`` (by layer) of the CLIP ``tower`` on the stacked passes ``pixels``."""
    vit = tower.vision_model
    captured: dict[int, Tensor] = {}
    hooks = [
        layer.self_attn.qkv_proj.register_forward_hook(
            lambda _m, _i, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)
        )
        for i, layer in enumerate(vit.encoder.layers)
    ]
    try:
        x = vit.pre_layrnorm(vit.embeddings(pixels.to(tower.dtype)))
        hidden = vit.encoder(inputs_embeds=x, return_all_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    return hidden, captured
