"""vLLM's LLaVA-NeXT through tokprune: each image pruned across its base view and AnyRes tiles.

What the LLM receives equals ``tokprune.patch(model, spec, vision_positions="compact")`` on transformers
(``budget_scope="image"``, the default; :mod:`tokprune.adapters.llava_next`):

* the strategy sees one row per image: its real tokens (the base view's, then the unpadded tiles' in the
  LLM's order), newlines excluded (row separators, not candidates: always kept), the base view's CLS as
  the image's CLS and each token's q/k and hidden states from its own tower pass;
* the processor sizes each image's placeholder run to ``kept_count(real tokens) + newlines``;
* the model runs vLLM's tower on every pass, the strategy picks rows (features before the projector, the
  projector as ``VisionContext.project``), and the kept rows reach the LLM projected, each newline after
  the kept tokens of its grid row; positions are 1-D and contiguous (vLLM numbers the shorter prompt).

Where each LLM token comes from is vLLM's own packing (``_merge_image_patch_embeddings``) run on token
indices (:func:`packed_layout`), as the transformers adapter runs transformers' ``pack_image_features``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ...serving import ServingPlan, ServingSpecError
from ...strategy import Signal, VisionSignals
from ..vllm_plugin import SPEC_FIELD, VllmPluginError, check_engine_spec, decode_specs, field_plan, item_groups
from .clip import full_depth, tower_names, tower_states

FAMILY = "LLaVA-NeXT"


def tower_passes(config: Any, image_size: Sequence[int]) -> int:
    """Tower passes of an image of ``image_size`` (h, w): its base view and its AnyRes tiles (vLLM's grid shape,
    as its packing uses; unpadding may leave a tile no token, so the layout alone cannot tell)."""
    from vllm.model_executor.models.llava_next import get_anyres_image_grid_shape

    h, w = (int(x) for x in image_size)
    rows, cols = get_anyres_image_grid_shape((h, w), config.image_grid_pinpoints, config.vision_config.image_size)
    return 1 + rows * cols


def packed_layout(merge: Callable[..., Tensor], config: Any, image_size: Sequence[int]) -> Tensor:
    """long ``[P]``: where each LLM token of an image of ``image_size`` (h, w) comes from, as an index among its
    ``T * n`` tile tokens (tile-major, CLS dropped; the base view is tile 0), -1 for a newline.

    ``merge``: vLLM's ``LlavaNextForConditionalGeneration._merge_image_patch_embeddings``, run on the indices
    themselves with a newline of -1, so the order is exactly the one vLLM feeds the unpruned LLM.
    """
    vision = config.vision_config
    passes = tower_passes(config, image_size)
    n = (vision.image_size // vision.patch_size) ** 2
    index = torch.arange(passes * n, dtype=torch.float64).view(passes, n, 1)
    holder = SimpleNamespace(config=config, image_newline=torch.full((1,), -1.0, dtype=torch.float64))
    packed = merge(holder, torch.tensor([int(x) for x in image_size]), index, strategy="spatial_unpad")
    return packed[:, 0].round().long()


def unsupported(config: Any) -> str | None:
    """Why tokprune cannot prune this LLaVA-NeXT checkpoint's images (None: it can): it runs what the
    transformers adapter runs, a CLIP tower read at one layer with the CLS dropped from the features."""
    if type(config.vision_config).__name__ != "CLIPVisionConfig":
        return f"its vision tower is {type(config.vision_config).__name__}, and tokprune prunes through a CLIP tower"
    if not isinstance(config.vision_feature_layer, int):
        return f"it reads several tower layers ({config.vision_feature_layer}), and tokprune reads one"
    if config.vision_feature_select_strategy != "default":
        return (
            f"its features keep the CLS (vision_feature_select_strategy={config.vision_feature_select_strategy!r}),"
            " and tokprune prunes features without it ('default')"
        )
    return None


def placeholder_count(plan: ServingPlan, layout: Tensor) -> int:
    """Tokens an image of ``layout`` (:func:`packed_layout`) brings the pruned LLM: its kept real tokens
    (the strategy's budget over them) and every newline."""
    newlines = int((layout < 0).sum())
    return plan.kept_count(layout.numel() - newlines) + newlines


def image_rows(layout: Tensor, first_tile: int, n: int) -> tuple[Tensor, Tensor]:
    """The strategy row of one image: its real tokens in the LLM's order as (tower pass, index in the pass
    with CLS at 0), long ``[L]`` each; ``first_tile``: the image's base view among the stacked passes."""
    source = layout[layout >= 0]
    return first_tile + torch.div(source, n, rounding_mode="floor"), source % n + 1


def packed_keep(layout: Tensor, keep: Tensor) -> Tensor:
    """bool ``[P]``: which LLM tokens of an image stay, from the keep mask over its real tokens (bool ``[L]``);
    every newline stays (in its place: after the kept tokens of its grid row)."""
    newline = layout < 0
    rank = ((~newline).long().cumsum(0) - 1).clamp(min=0)
    return newline | keep[rank]


def classes(mixin: type, registry: Any) -> dict[str, type]:
    """The LLaVA-NeXT processor and model classes, built on ``mixin`` (the plugin's ``SpecProcessorMixin``) and
    registered with vLLM's multimodal ``registry``."""
    from vllm.model_executor.models import llava
    from vllm.model_executor.models.llava_next import (
        LlavaNextForConditionalGeneration,
        LlavaNextMultiModalProcessor,
        LlavaNextProcessingInfo,
    )

    merge = LlavaNextForConditionalGeneration._merge_image_patch_embeddings

    class TokpruneLlavaNextProcessor(mixin, LlavaNextMultiModalProcessor):
        tokprune_tower = "cls"
        tokprune_family = FAMILY

        def _get_prompt_updates(
            self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any
        ) -> Any:
            # the mixin cuts a run to the budget of all its tokens; here the newlines are no candidates
            updates = list(super(mixin, self)._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
            get = out_mm_kwargs.get if hasattr(out_mm_kwargs, "get") else lambda _m, _d: _d
            items = get("image", [])
            for i, update in enumerate(updates):
                if update.modality == "image" and callable(update.replacement):
                    updates[i] = type(update)(
                        modality="image", target=update.target, replacement=self._sized(update.replacement, items)
                    )
            return updates

        def _sized(self, stock: Callable[[int], Any], items: Any) -> Callable[[int], Any]:
            def replacement(item_idx: int) -> Any:
                tokens = stock(item_idx)
                item = items[item_idx] if item_idx < len(items) else {}
                field = item.get(SPEC_FIELD)
                plan = field_plan(decode_specs(field.data if field is not None else None, 1)[0], "cls", FAMILY, False)
                if not plan.prunes_images:
                    return tokens
                sizes = item.get("image_sizes")
                if sizes is None:  # image embeddings: no tiles to prune among
                    raise ServingSpecError(
                        f"tokprune spec {plan.spec!r}: {FAMILY} images given as embeddings cannot be pruned; send "
                        "the image itself, or {'tokprune': 'none'}"
                    )
                why = unsupported(self.info.get_hf_config())
                if why is not None:
                    raise ServingSpecError(
                        f"tokprune spec {plan.spec!r} cannot prune this {FAMILY} checkpoint's images: {why}; "
                        "send {'tokprune': 'none'}"
                    )
                layout = packed_layout(merge, self.info.get_hf_config(), sizes.data.tolist())
                if layout.numel() != len(tokens):  # vLLM's count and its packing disagree: never guess
                    raise VllmPluginError(
                        f"{FAMILY}: vLLM sizes this image to {len(tokens)} tokens and packs {layout.numel()}"
                    )
                return list(tokens)[: placeholder_count(plan, layout)]

            return replacement

    @registry.register_processor(
        TokpruneLlavaNextProcessor, info=LlavaNextProcessingInfo, dummy_inputs=llava.LlavaDummyInputsBuilder
    )
    class TokpruneLlavaNext(LlavaNextForConditionalGeneration):
        """vLLM's LLaVA-NeXT with the whole CLIP tower (CLS signals of any layer) and pruning before the
        projector, per image across its base view and tiles.

        Also loads checkpoints that name the tower as transformers 5 saves it (``vision_tower.embeddings.*``).
        """

        tokprune_prunes = False  # 1-D positions: vLLM numbers the shorter prompt itself
        hf_to_vllm_mapper = tower_names(LlavaNextForConditionalGeneration.hf_to_vllm_mapper)

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            check_engine_spec(vllm_config, "cls", FAMILY)
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._clip = unsupported(self.config) is None and full_depth(self, prefix)

        def embed_multimodal(self, **kwargs: object) -> Any:
            field = kwargs.pop(SPEC_FIELD, None)
            inputs = self._parse_and_validate_image_input(**kwargs)
            if inputs is None:
                return []
            pixels = inputs["pixel_values"] if inputs["type"] == "pixel_values" else None
            count = len(pixels) if pixels is not None else len(inputs["data"])
            specs = decode_specs(field, count)
            if pixels is None or not self._clip:
                if any(field_plan(s).prunes_images for s in specs):
                    # the processor refused these requests; reached only by a request it did not size
                    raise VllmPluginError(
                        f"tokprune cannot prune these {FAMILY} images: "
                        f"{unsupported(self.config) or 'they came as embeddings'}"
                    )
                return self._process_image_input(inputs)
            # unpruned images too: vLLM's own path would run the whole tower built here, past the feature layer
            return self._pruned_images(list(pixels), inputs["image_sizes"].tolist(), specs)

        def _pruned_images(self, pixels: list[Tensor], sizes: list[list[int]], specs: list[str]) -> list[Tensor]:
            """Each image's LLM rows ``[P'_i, D]``: the kept real tokens projected, newlines in their places."""
            cfg = self.config.vision_config
            n = (cfg.image_size // cfg.patch_size) ** 2
            layouts = [packed_layout(merge, self.config, size) for size in sizes]
            tiles = [tower_passes(self.config, size) for size in sizes]  # the processor may pad an image's passes
            hidden, captured = tower_states(self.vision_tower, torch.cat([p[:t] for p, t in zip(pixels, tiles)]))
            first = torch.tensor([0, *tiles[:-1]]).cumsum(0).tolist()
            rows = [image_rows(lay, f, n) for lay, f in zip(layouts, first)]
            states = hidden[self.config.vision_feature_layer]  # [T, 1+n, C]
            features = [states[tile.to(states.device), patch.to(states.device)] for tile, patch in rows]
            keeps: list[Tensor | None] = [None] * len(pixels)
            done: list[Tensor | None] = [None] * len(pixels)  # kept rows a step already projected
            for plan, index in item_groups(specs):
                if plan.prunes_images:
                    signals = self._signals(plan, hidden, captured, [rows[i] for i in index], [first[i] for i in index])
                    # the projector per token: DivPrune/CDPruner select on the projected tokens (their reference)
                    chosen, projected = plan.select_projected(
                        [features[i] for i in index], signals, self.multi_modal_projector
                    )
                    for i, keep, rows_out in zip(index, chosen, projected):
                        keeps[i], done[i] = keep, rows_out
            return [self._placed(f, lay, k, d) for f, lay, k, d in zip(features, layouts, keeps, done)]

        def _signals(
            self,
            plan: ServingPlan,
            hidden: list[Tensor],
            captured: dict[int, Tensor],
            rows: list[tuple[Tensor, Tensor]],
            first: list[int],
        ) -> Callable[[Tensor], VisionSignals]:
            """The signals of a group's images as the transformers adapter gives them (``encode_images``'
            ``per_image``): per image ``[1+L, C]``, the base view's CLS, then each token's own from its pass;
            rows padded with the image's first token."""
            cfg = self.config.vision_config
            device = hidden[0].device
            tile = torch.nn.utils.rnn.pad_sequence([t for t, _ in rows], batch_first=True, padding_value=-1)
            patch = torch.nn.utils.rnn.pad_sequence([p for _, p in rows], batch_first=True, padding_value=-1)
            base = torch.tensor(first)
            pad = tile < 0
            tile = torch.where(pad, base[:, None], tile).to(device)
            base = base.to(device)
            patch = torch.where(pad, 1, patch).to(device)
            declared = frozenset(s.resolve(cfg.num_hidden_layers) for s in plan.requires())

            def per_image(t: Tensor) -> Tensor:
                return torch.cat([t[base, :1], t[tile, patch]], dim=1)

            def build(lengths: Tensor) -> VisionSignals:
                def fetch(signal: Signal) -> Any:
                    if signal.kind == "qk":
                        q, k, _ = captured[signal.layer].chunk(3, dim=-1)
                        return per_image(q), per_image(k)
                    return per_image(hidden[signal.layer])

                return VisionSignals(
                    fetch, cfg.num_hidden_layers, cfg.num_attention_heads, declared=declared, lengths=lengths
                )

            return build

        def _placed(self, features: Tensor, layout: Tensor, keep: Tensor | None, projected: Tensor | None) -> Tensor:
            """An image's LLM rows: its kept real tokens ``features[keep]`` projected (``projected`` where the step
            projected them already), the newline vector on every newline slot, in the packed order (``layout``)."""
            keep = torch.ones(features.shape[0], dtype=torch.bool) if keep is None else keep.cpu()
            slots = packed_keep(layout, keep)
            if projected is None:
                projected = self.multi_modal_projector(features[keep.to(features.device)])
            newline = (layout < 0)[slots].to(projected.device)
            out = self.image_newline.to(projected.dtype).expand(newline.shape[0], -1).clone()
            out[~newline] = projected
            return out

    return {"TokpruneLlavaNext": TokpruneLlavaNext, "TokpruneLlavaNextProcessor": TokpruneLlavaNextProcessor}
