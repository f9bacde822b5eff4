"""The public family protocol: what a model family tells tokprune, and nothing more.

A family subclasses :class:`Family`, sets ``name`` and implements :meth:`~Family.mismatch`,
:meth:`~Family.tiny` and :meth:`~Family.parts`; a family with a vision stage also implements
:meth:`~Family.encode_images` (and :meth:`~Family.project` when its tower's features are not yet in the
LLM's space). Everything else has a default a family overrides only when its model differs:

================================  ================================================================
the family provides               the core owns (``decoder``, ``loop``, ``assembly``, ``generate``, ``stats``)
================================  ================================================================
``mismatch``: is this my model?   the patch of the model's forward, ``generate`` and
``parts``: the model's pieces     ``get_image_features`` (reversible, this instance only)
``encode_images``: one padded     the capture of the tower's q/k on ``TowerSignals.layers``,
batch, per-image lengths, the     the strategy's :class:`~tokprune.strategy.VisionContext` and
tower's states                    its call, diagnostics
``encode_videos`` (video only)    a prompt's images and videos joined in prompt order (``items``)
``project``: features -> LLM      pre-encoded features (``generate``), their checks
``place_plan`` (optional): the    the assembly: kept rows into their placeholders, extra tokens,
plan in the LLM's token order     roles, position modes
``stock_features``: the model's   the decoder loop, the LLM-stage steps, KV-cache sessions
own output, one row per image
``positions`` ...: where image    stats and FLOPs, the kept-token map
tokens sit, which positions they
take (1-D or M-RoPE)
``layer_attention`` / ``_rotary``
/ ``_mask_from``: per decoder layer
``attention_groups``: bidirectional
blocks; ``llm_cut_refusal``;
``check_later_turn`` (optional)
``tiny``: a tiny test case
================================  ================================================================

A family's own state lives in attributes it names itself (set in :meth:`~Family.parts`); the core's
public attributes are ``model``, ``pipeline``, ``budget_scope``, ``text_encoder``, ``vision_positions``,
``llm_positions``, ``stats``, ``history`` and ``model_parts`` (what :meth:`~Family.parts` returned); while
:meth:`~Family.encode_images` runs, ``placeholder_runs()`` gives the lengths of the call's image placeholder
runs (for a family whose inputs do not say which tower passes make one image: InternVL's tiles).
docs/adapters.md ("Adding a family") walks through a complete one (SmolVLM).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..stats import FlopModel
from ..strategy import PruningStrategy, VisionContext, VisionPlan
from ._tiny import TinyCase
from .call import LayerKeys
from .decoder import PrunedDecoderAdapter
from .features import ImageFeatures

__all__ = ["EncodedImages", "Family", "FamilyParts", "ForwardOptions", "LayerKeys", "TowerSignals", "projected_count"]

#: The forward's (or ``get_image_features``') keyword arguments besides ``pixel_values``: ``image_sizes``,
#: ``image_grid_thw``, ``vision_feature_layer``... (values as the caller gave them).
ForwardOptions = Mapping[str, object]


@dataclass(frozen=True)
class TowerSignals:
    """What the vision tower offers the strategies that read it (:class:`~tokprune.strategy.Signal`).

    Every signal is read relative to a CLS token at index 0 of each tower pass; a tower without one
    (``cls=False``) offers none, and the core refuses, at ``patch()``, the vision steps that need one.
    """

    #: Encoder layers in order; for the ``qk`` signals a step declares the core hooks the query and key of
    #: each layer's attention module (its ``attention`` attribute): ``q_norm`` / ``k_norm`` where it has them
    #: (the q/k the layer attends with), else ``q_proj`` / ``k_proj``. Empty: no q/k signals.
    layers: Sequence[nn.Module] = ()
    heads: int = 0  #: attention heads of an encoder layer
    cls: bool = False  #: a CLS token at index 0 of every pass
    depth: int | None = None  #: encoder layers (None: ``len(layers)``)
    attention: str = "self_attn"  #: the attribute of an encoder layer holding its attention (InternViT: ``attention``)

    @property
    def num_layers(self) -> int:
        return len(self.layers) if self.depth is None else self.depth


@dataclass(frozen=True)
class FamilyParts:
    """The pieces of one model the core drives, returned once by :meth:`Family.parts`."""

    #: The module whose ``forward`` the core replaces; it takes ``input_ids``, ``pixel_values``,
    #: ``attention_mask``, ``position_ids``, ``mm_encoder_outputs`` and the cache, and has
    #: ``get_image_features`` (replaced while a vision step runs, so that ``generate``'s pre-encoding prunes).
    inner: nn.Module
    language_model: nn.Module  #: ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``
    image_token_id: int  #: the placeholder id of image tokens in ``input_ids``
    tokens_per_image: int  #: tokens one unpruned tower pass brings (0: no fixed count)
    flops: FlopModel  #: the model's FLOP model (:mod:`tokprune.stats`)
    output_class: type  #: the dataclass ``inner.forward`` returns
    tower: TowerSignals = field(default_factory=TowerSignals)
    #: The tower's final norm, which a CLIP text tower compares image tokens in (``cdpruner(relevance=text)``);
    #: None: instruction-conditioned steps run their documented stand-in.
    text_norm: nn.Module | None = None
    #: Whether ``output_class`` must have an image field (Qwen2.5-VL's lacked one before transformers 5.24).
    image_field: bool = True
    #: The placeholder id of video tokens, for a family that takes video (``inner.get_video_features``,
    #: ``pixel_values_videos``; :meth:`Family.encode_videos`); None: images only.
    video_token_id: int | None = None


@dataclass
class EncodedImages:
    """One call's images as the tower left them: one padded batch, one row per image (what
    :meth:`Family.encode_images` returns). A family needing more for :meth:`Family.place_plan` subclasses it."""

    #: ``[I, L, C]``: the tokens a vision strategy chooses among, in the LLM's order (padded past ``lengths``).
    features: Tensor
    lengths: Tensor | None = None  #: long ``[I]``: real tokens of each row; None: ``L`` each
    grid: tuple[int, int] | None = None  #: ``(rows, cols)`` when every row is one raster of ``rows*cols``
    #: The tower's hidden states, embeddings first (``depth + 1`` of ``[T, 1+N, C]``, CLS at 0, one row per
    #: tower pass): the ``hidden`` signals. Empty: the tower offers none.
    states: Sequence[Tensor] = ()
    #: ``[T, 1+N, C]`` per pass -> ``[I, 1+L, C]`` per strategy row (None: a pass is a row).
    rows: Callable[[Tensor], Tensor] | None = None
    #: long ``[L, G]``: where the family merges ``G`` tower patches into each token before the strategy (a
    #: pixel shuffle), the patches (indices among a row's patches, CLS excluded) of each token; the
    #: strategy's derived CLS signals are then per token (:attr:`~tokprune.strategy.VisionSignals.groups`).
    #: None: a token is a patch.
    groups: Tensor | None = None
    tower_runs: Tensor | None = None  #: long ``[I]``: tower passes per image (None: one each)
    tower_flops: Tensor | None = None  #: fp64 ``[I]``: tower FLOPs per image, where the family counts them
    #: Per decoder layer ``[I, L, D]`` rows added after that layer to the image tokens (DeepStack), gathered
    #: with the plan's keep mask; None: none.
    deepstack: Sequence[Tensor] | None = None
    #: ``[I, L, D]``: every row's tokens through the projector, where the vision step projected them all to
    #: choose (:meth:`~tokprune.strategy.VisionContext.projected`, DivPrune and CDPruner); set by the core
    #: after the plan. :meth:`Family.place_plan` then takes the kept rows from it. None: not computed.
    projected_rows: Tensor | None = None
    video: bool = False  #: the rows are videos (:meth:`Family.encode_videos`); diagnostics get a ``video.`` prefix
    #: The q/k the core captured on ``TowerSignals.layers`` while :meth:`Family.encode_images` ran, by
    #: ``(layer, "q" | "k")``: set by the core.
    qk: dict[tuple[int, str], Tensor] = field(default_factory=dict)


def projected_count(images: EncodedImages, extra: Tensor | None, extra_valid: Tensor | None) -> Tensor:
    """long ``[I]``: tokens the projector maps per image when the step projected every row to choose
    (:attr:`EncodedImages.projected_rows`): each row's real tokens, plus its extra tokens (projected apart)."""
    rows, width = images.features.shape[:2]
    real = images.lengths if images.lengths is not None else torch.full((rows,), width, device=images.features.device)
    if extra is None:
        return real
    return real + (extra.shape[1] if extra_valid is None else extra_valid.sum(dim=1))


class Family(PrunedDecoderAdapter):
    """Base class of a model family (see the module docstring for who does what).

    Class attributes: ``name`` (``[a-z][a-z0-9_]*``), ``variable_image_tokens`` (images differ in token
    count: only ``ragged_vision`` strategies run), ``one_d_positions`` (False for M-RoPE: ``compact`` is
    refused), ``budget_scopes`` (add ``"tile"`` where :attr:`budget_scope` means something),
    ``min_transformers``.
    """

    # -- matching and the tiny case -----------------------------------------------------------------------

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        """Why this family does not understand ``model``, in one line; "" when it does."""
        return f"not a model {cls.name!r} understands"

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase | None:
        """A tiny random model of this family and inputs for it (the adapter contract's case)."""
        return None

    # -- the model's pieces ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def parts(self) -> FamilyParts:
        """The pieces of ``self.model`` the core drives; refuse here (an :class:`~tokprune.errors.UnsupportedModelError`
        from :func:`tokprune.hf_compat.refuse`) what the installed transformers lacks. Called once, at ``patch()``."""

    def check_pipeline(self) -> None:
        """Refuse, at ``patch()``, a vision step this model cannot run (naming what works); called only when the
        pipeline has one. Default: every step the core accepts runs."""

    def check_inputs(self, pixel_values: Tensor | None, options: ForwardOptions) -> None:
        """Refuse a call's inputs before anything runs (a missing ``image_sizes``, videos...); default: none."""

    # -- the vision stage --------------------------------------------------------------------------------

    #: Whether this family has a vision stage (set by the core: True when it implements :meth:`encode_images`).
    has_vision_stage: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.has_vision_stage = cls.encode_images is not Family.encode_images

    def encode_images(self, pixel_values: Tensor, options: ForwardOptions) -> EncodedImages:
        """Run the tower on this call's images: one padded row per image, before the projector."""
        raise NotImplementedError(f"{type(self).__name__}.encode_images")

    def encode_videos(self, pixel_values_videos: Tensor, options: ForwardOptions) -> EncodedImages:
        """A family taking video (``FamilyParts.video_token_id``): the tower on this call's videos, one padded row
        per video (``video=True``); the core joins them with the images in prompt order."""
        raise NotImplementedError(f"{type(self).__name__}.encode_videos")

    def stock_video_features(
        self, encoded: hf.BaseModelOutputWithPooling, options: ForwardOptions
    ) -> ImageFeatures:
        """The model's own ``get_video_features`` output (no vision step) as keep-all features, one row per video."""
        out = ImageFeatures.unpruned(encoded.pooler_output)
        out.videos = torch.ones(out.keep.shape[0], dtype=torch.bool, device=out.keep.device)
        return out

    def project(self, features: Tensor) -> Tensor:
        """The projector per token, ``[..., C] -> [..., D]``; default: the identity (features already in LLM space)."""
        return features

    def plan_images(self, step: PruningStrategy, images: EncodedImages, ctx: VisionContext) -> VisionPlan:
        """The vision step's plan for ``images``; default ``step(ctx)`` (one strategy row per image)."""
        return step(ctx)

    def place_plan(self, images: EncodedImages, plan: VisionPlan) -> ImageFeatures:
        """The plan as the LLM receives it: kept rows (chosen, or the plan's merged ``features``) and extra
        tokens projected; DeepStack rows kept with them. Override where the LLM's tokens are not the rows."""
        has_extra = plan.extra is not None and plan.extra.shape[1] > 0
        deepstack = None if images.deepstack is None else [rows[plan.keep] for rows in images.deepstack]
        extra = self.project(plan.extra) if has_extra else None
        projected = None  # the projector's tokens per image where they are not the kept ones
        if plan.features is None and images.projected_rows is not None:  # the step projected every token to choose
            kept = images.projected_rows[plan.keep]
            projected = projected_count(images, extra, plan.extra_valid if has_extra else None)
        else:
            chosen = plan.features if plan.features is not None else images.features
            kept = self.project(chosen[plan.keep])
        return ImageFeatures(
            kept=kept,
            keep=plan.keep,
            extra=extra,
            extra_valid=plan.extra_valid if has_extra else None,
            lengths=images.lengths,
            tower_runs=images.tower_runs,
            tower_flops=images.tower_flops,
            deepstack=deepstack,
            projected=projected,
        )

    def stock_features(self, encoded: hf.BaseModelOutputWithPooling, options: ForwardOptions) -> ImageFeatures:
        """The model's own ``get_image_features`` output (no vision step) as keep-all features, one row per
        image; default: ``pooler_output`` is one ``[N_i, D]`` per image. A model returning one entry per
        sample must split it here: the core never merges or splits images itself."""
        return ImageFeatures.unpruned(encoded.pooler_output)

    def repeat_item_inputs(self, inputs: ForwardOptions, copies: int) -> dict[str, Tensor]:
        """The call's inputs with one row per image or video (not per prompt), repeated for
        ``generate(num_return_sequences=copies)``: each prompt's items ``copies`` times in a row, as the repeated
        prompts need them (the core repeats every per-prompt tensor itself). Default: none."""
        return {}

    def patch_cells(self, features: ImageFeatures, options: ForwardOptions) -> Tensor | None:
        """Each image token's cell on its image's patch grid, long ``[I, N, 4]`` ``(tile, frame, row, col)``
        (:mod:`tokprune.keptmap`); None: the family gives no grid (kept maps then hold token indices only)."""
        return None

    # -- positions (1-D by default; a family with multi-axis RoPE overrides these four) ---------------------

    def positions(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, options: ForwardOptions
    ) -> Tensor:
        """Prefill position ids, long ``[B, n]`` (or ``[B, n, R]``): the caller's, else ``arange`` (HF's default)."""
        b, n = input_ids.shape
        pos = torch.arange(n, device=input_ids.device)[None, :] if position_ids is None else position_ids
        return pos.expand(b, n).long()

    def decode_positions(self, position_ids: Tensor | None, seen: int, b: int, q: int, device: torch.device) -> Tensor:
        """Position ids of ``q`` new tokens after ``seen`` (unpruned) ones, long ``[B, q]`` (or ``[B, q, R]``)."""
        if position_ids is None:
            position_ids = torch.arange(seen, seen + q, device=device)[None, :]
        return position_ids.expand(b, q).long()

    def rotary(self, hidden: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE ``(cos, sin)`` ``[B, L, head_dim]`` for positions ``pos`` (``hidden`` gives dtype and device)."""
        return hf.rotary_embeddings(self.model_parts.language_model, hidden, pos)

    def text_positions(self, pos: Tensor) -> Tensor:
        """The 1-D position ids ``[B, L]`` a decoder layer and ``LLMContext.position_ids`` get."""
        return pos
