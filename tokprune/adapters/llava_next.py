"""The LLaVA-NeXT family: HF ``LlavaNextForConditionalGeneration`` (AnyRes tiles, CLIP tower, 1-D RoPE LM).

Shared with every family (:mod:`.decoder`): generate() checks, assembly, the pruned decoder loop, stats.
This file knows only LLaVA-NeXT:

* each image is a base view plus AnyRes tiles (their number follows ``image_sizes``); the tower runs
  once per tile; the LLM sees the base view's ``N`` tokens, then the tiles' grid unpadded to the image's
  aspect ratio with an ``image_newline`` token after each row. :func:`~tokprune.hf_compat.anyres_layout`
  gives that order from the model's own packing;
* the vision stage prunes **per image across base and tiles** by default (``budget_scope="image"``):
  the strategy sees one row per image (``lengths`` = its base + tile tokens, newlines excluded), with
  the base view's CLS as the image's CLS (the q/k and hidden signals of each token come from its own
  tile), so budgets count the image's own tokens. With ``budget_scope="tile"`` every tower pass (the
  base view and each tile) is its own row, with its own CLS and the tile's tokens the LLM sees (after
  unpadding), so budgets count per tile as VisionZip's and VisionPruner's LLaVA-NeXT code do; the
  plans are mapped back to the image, each row's extra tokens following the image's kept tokens
  (docs/adapters.md, "Budgets on tiled images"). Only ``ragged_vision`` strategies run;
* **newline tokens** are not visual content and are never pruned: they stay as row separators after
  the kept tokens of their row (an all-dropped row leaves its newline). They count as visual tokens
  in the stats (the LLM processes them);
* positions are 1-D; the decoder layers are called through :mod:`tokprune.hf_compat`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import MissingCapabilityError
from ..pipeline import Pipeline
from ..stats import FlopModel, kv_width, mlp_matrices
from ..strategy import Signal, VisionContext, VisionPlan, VisionSignals
from .decoder import CallState, PrunedDecoderAdapter, PrunedImageFeatures, VisionOut

__all__ = ["LlavaNextAdapter"]

_LANGUAGE_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model")


def _class_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


class LlavaNextAdapter(PrunedDecoderAdapter):
    """HF ``LlavaNextForConditionalGeneration`` with a CLIP tower (AnyRes tiles and newline tokens)."""

    name = "llava_next"
    variable_image_tokens = True
    budget_scopes = ("image", "tile")

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        if "LlavaNextForConditionalGeneration" not in _class_names(model):
            return f"expected a LlavaNextForConditionalGeneration, got {type(model).__name__}"
        inner = getattr(model, "model", None)
        if "CLIPVisionModel" not in _class_names(getattr(inner, "vision_tower", None)):
            return f"expected a CLIPVisionModel vision tower, got {type(getattr(inner, 'vision_tower', None)).__name__}"
        lm = getattr(inner, "language_model", None)
        if not _class_names(lm) & set(_LANGUAGE_MODELS):
            return f"expected a language model among {', '.join(_LANGUAGE_MODELS)}, got {type(lm).__name__}"
        return ""

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> Any:
        from ..testing.adapters import TinyCase
        from ..testing.models import VOCAB, tiny_llava_next

        model, make_inputs = tiny_llava_next(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)

    def __init__(self, model: nn.Module, pipeline: Pipeline, **options: Any) -> None:
        super().__init__(model, pipeline, **options)  # options: see tokprune.patch
        self._inner = model.model
        self._tower = self._inner.vision_tower
        self._lm = self._inner.language_model
        self._config = model.config
        self._output_class = hf.llava_next_output_class()
        hf.check_model(self._lm, self._tower, self._output_class)
        hf.check_anyres(self._inner)
        self._vit = hf.vision_transformer(self._tower)
        self._image_token_id = self._config.image_token_id
        self._init_decoder()
        self._signals = self._check_vision()
        tower_cfg = self._tower.config
        self._tokens_per_image = (tower_cfg.image_size // tower_cfg.patch_size) ** 2  # per tile (the base view)
        self._flops = FlopModel(
            d=self._lm.config.hidden_size,
            m=self._lm.config.intermediate_size,
            c=tower_cfg.hidden_size,
            mv=tower_cfg.intermediate_size,
            vision_layers=tower_cfg.num_hidden_layers,
            vision_tokens=1 + self._tokens_per_image,  # per tower pass (one per tile)
            mlp_matrices=mlp_matrices(self._lm.layers[0].mlp),
            kv_dim=kv_width(self._lm.config),
        )

    def _check_vision(self) -> frozenset[Signal]:
        step = self.pipeline.vision
        if step is None:
            return frozenset()
        layer, select = self._config.vision_feature_layer, self._config.vision_feature_select_strategy
        if not isinstance(layer, int) or select != "default":
            raise MissingCapabilityError(
                f"{step.name!r} runs in vision feature space with the CLS token at index 0; this model has "
                f"vision_feature_layer={layer!r}, vision_feature_select_strategy={select!r} (supported: one int "
                "layer and 'default')"
            )
        self._check_cls(getattr(self._vit.embeddings, "class_embedding", None) is not None)
        return frozenset(s.resolve(self._tower.config.num_hidden_layers) for s in self.pipeline.requires())

    def _install_family(self) -> None:
        if self.pipeline.vision is None:
            return
        original = self._inner.get_image_features

        @functools.wraps(original)  # generate() routes pixel_values and image_sizes by this signature
        def get_image_features(pixel_values: Tensor, image_sizes: Tensor, *args: Any, **kwargs: Any) -> Any:
            with self._active(CallState(self)) as call:
                return PrunedImageFeatures.of(self._run_vision(call, pixel_values, image_sizes))

        self._state.set_attribute(self._inner, "get_image_features", get_image_features)
        self._hook_encoder_signals(self._vit.encoder.layers)

    # -- the vision stage -----------------------------------------------------------------------------

    def _vision(
        self, call: CallState, pixel_values: Tensor | None, encoded: Any, options: dict
    ) -> tuple[Any, VisionOut | None]:
        image_sizes = options.pop("image_sizes", None)
        layer = options.pop("vision_feature_layer", None)
        select = options.pop("vision_feature_select_strategy", None)
        if encoded is not None:  # pre-encoded by generate() through get_image_features
            return self._pre_encoded(encoded)
        if pixel_values is None or pixel_values.shape[0] == 0:
            return None, None
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values (the processor returns both)")
        if self.pipeline.vision is None:  # the unpatched tower, projector and packing
            encoded = self._inner.get_image_features(
                pixel_values, image_sizes, vision_feature_layer=layer, vision_feature_select_strategy=select, return_dict=True
            )
            out = VisionOut.unpruned(encoded.pooler_output)
            out.tower_runs = torch.tensor(hf.anyres_tiles(self._config, image_sizes), device=out.keep.device)
            return encoded, out
        out = self._run_vision(call, pixel_values, image_sizes)
        return PrunedImageFeatures.of(out), out

    def _run_vision(self, call: CallState, pixel_values: Tensor, image_sizes: Tensor) -> VisionOut:
        """Tower per tile, one strategy row per image (base + tiles), projector on the kept, newlines back."""
        step = self.pipeline.vision
        assert step is not None
        cfg, n = self._tower.config, self._tokens_per_image
        tiles = hf.anyres_tiles(self._config, image_sizes)
        if pixel_values.dim() == 5:  # [I, max_tiles, 3, H, W], padded with empty tiles
            pixel_values = torch.cat([p[:t] for p, t in zip(pixel_values, tiles)])
        vit = self._vit
        x = vit.pre_layrnorm(vit.embeddings(pixel_values.to(vit.embeddings.patch_embedding.weight.dtype)))
        hidden = [x]
        call.capture = {}
        try:
            for encoder_layer in vit.encoder.layers:
                x = hf.call_vision_layer(encoder_layer, x)
                hidden.append(x)
            captured = call.capture
        finally:
            call.capture = None
        layout = hf.anyres_layout(self._inner, tiles, n, image_sizes, "default")  # per image, -1 = newline
        packed, packed_valid = _pad(layout, fill=-2)  # [I, P]
        newline = packed == -1
        first_tile = torch.tensor([0, *tiles[:-1]], device=packed.device).cumsum(0)  # each image's base tile
        # The strategy's row of image i: its non-newline tokens in LLM order, as (tile, patch) sources.
        source, source_valid = _pad([lay[lay >= 0] for lay in layout], fill=0)
        tile = first_tile[:, None] + source // n
        patch = source % n + 1  # +1: index 0 of every tile is its CLS
        lengths = source_valid.sum(dim=1)

        def per_image(t: Tensor) -> Tensor:
            """``[T, 1+N, C]`` (per tile) -> ``[I, 1+L, C]``: the base CLS, then the image's tokens."""
            return torch.cat([t[first_tile, :1], t[tile, patch]], dim=1)

        def fetch(signal: Signal) -> Any:
            if signal.kind == "qk":
                q, k = captured[("vision", signal.layer, "q")], captured[("vision", signal.layer, "k")]
                return per_image(q), per_image(k)
            return per_image(hidden[signal.layer])

        features = hidden[self._config.vision_feature_layer][tile, patch]  # [I, L, C]
        if self.budget_scope == "tile":
            plan = self._plan_per_tile(hidden, captured, tile, patch, source_valid)
        else:
            signals = VisionSignals(
                fetch, cfg.num_hidden_layers, cfg.num_attention_heads, declared=self._signals, lengths=lengths
            )
            plan = step(VisionContext(features=features, signals=signals, lengths=lengths))
        chosen = plan.features if plan.features is not None else features
        projector = self._inner.multi_modal_projector
        projected = projector(chosen[plan.keep])
        has_extra = plan.extra is not None and plan.extra.shape[1] > 0
        extra = projector(plan.extra) if has_extra else None
        # Back to the LLM's order: each non-newline slot takes its token's decision, newlines are kept.
        rank = ((~newline & packed_valid).long().cumsum(dim=1) - 1).clamp(min=0)
        keep = packed_valid & (newline | plan.keep.gather(1, rank.clamp(max=plan.keep.shape[1] - 1)))
        kept_newline = newline[keep]
        kept = self._inner.image_newline.to(projected.dtype).expand(kept_newline.shape[0], -1).clone()
        kept[~kept_newline] = projected
        diagnostics = {f"{step.name}.{k}": v for k, v in plan.diagnostics.items()}
        runs = torch.tensor(tiles, device=keep.device)
        extra_valid = plan.extra_valid if has_extra else None
        num_extra = 0 if extra is None else (extra.shape[1] if extra_valid is None else extra_valid.sum(dim=1))
        mapped = (keep & ~newline).sum(dim=1) + num_extra  # newlines are not projected
        return VisionOut(
            kept,
            keep,
            extra,
            diagnostics,
            packed_valid.sum(dim=1),
            runs,
            projected=mapped,
            extra_valid=extra_valid,
        )

    def _plan_per_tile(
        self, hidden: list[Tensor], captured: dict, tile: Tensor, patch: Tensor, valid: Tensor
    ) -> VisionPlan:
        """``budget_scope="tile"``: the strategy's rows are the tower passes, its plan mapped back per image.

        ``tile``/``patch``/``valid`` (``[I, L]``) name each image token's tower pass and index in it (CLS
        at 0). Each row is one pass: its CLS, then those of its tokens the LLM sees, in raster order
        (unpadding drops some), so ``lengths`` is per pass. Returns the plan in image rows: ``keep`` and
        ``features`` ``[I, L]``; ``extra`` ``[I, K*E, C]`` with ``extra_valid``, each image's rows' extra
        tokens in row order (K: the most rows of one image); diagnostics stay per row, with
        ``row_image`` (long ``[R]``) naming each row's image.
        """
        step = self.pipeline.vision
        assert step is not None
        cfg = self._tower.config
        rows = _tile_rows(tile, patch, valid, hidden[0].shape[0], self._tokens_per_image)

        def per_row(t: Tensor) -> Tensor:
            """``[T, 1+N, C]`` (per pass) -> ``[R, 1+W, C]``: each row's CLS, then its tokens."""
            return torch.cat([t[rows.tile, :1], t[rows.tile[:, None], rows.patch]], dim=1)

        def fetch(signal: Signal) -> Any:
            if signal.kind == "qk":
                q, k = captured[("vision", signal.layer, "q")], captured[("vision", signal.layer, "k")]
                return per_row(q), per_row(k)
            return per_row(hidden[signal.layer])

        signals = VisionSignals(
            fetch, cfg.num_hidden_layers, cfg.num_attention_heads, declared=self._signals, lengths=rows.lengths
        )
        features = hidden[self._config.vision_feature_layer][rows.tile[:, None], rows.patch]  # [R, W, C]
        plan = step(VisionContext(features=features, signals=signals, lengths=rows.lengths))
        row, slot = rows.row_of_tile[tile], rows.slot
        keep = plan.keep[row, slot] & valid
        mapped = None if plan.features is None else plan.features[row, slot]
        extra, extra_valid = None, None
        if plan.extra is not None and plan.extra.shape[1] > 0:
            extra, extra_valid = _extra_per_image(plan.extra, plan.extra_valid, rows.row_image, tile.shape[0])
        diagnostics = {**plan.diagnostics, "row_image": rows.row_image}
        return VisionPlan(keep=keep, features=mapped, extra=extra, extra_valid=extra_valid, diagnostics=diagnostics)


@dataclass(frozen=True)
class _TileRows:
    """The per-pass rows of ``budget_scope="tile"`` and how image tokens map onto them (R rows)."""

    tile: Tensor  #: long ``[R]``: the tower pass of each row (passes left with no token get none)
    patch: Tensor  #: long ``[R, W]``: each row's tokens as indices into its pass (CLS at 0), raster order
    lengths: Tensor  #: long ``[R]``: real tokens of each row (the rest of ``patch`` is padding)
    row_image: Tensor  #: long ``[R]``: the image each row belongs to
    row_of_tile: Tensor  #: long ``[T]``: the row of each pass (0 for a pass with no token)
    slot: Tensor  #: long ``[I, L]``: each image token's index within its row (0 where invalid)


def _tile_rows(tile: Tensor, patch: Tensor, valid: Tensor, num_passes: int, n: int) -> _TileRows:
    """Rows of ``budget_scope="tile"`` from the image rows' sources (pure index arithmetic).

    ``tile``, ``patch`` (long ``[I, L]``): each image token's pass and index in it (1..n); ``valid``
    (bool ``[I, L]``). Within a pass, the LLM's order (rows of the unpadded grid) is the pass's raster
    order, so a row lists its pass's present tokens by ascending index.
    """
    device = tile.device
    present = torch.zeros(num_passes, n + 1, dtype=torch.bool, device=device)
    present[tile[valid], patch[valid]] = True
    present = present[:, 1:]  # [T, n]: the pass's tokens the LLM sees
    counts = present.sum(dim=1)
    used = (counts > 0).nonzero().flatten()  # [R]
    width = int(counts.max())
    order = torch.sort((~present[used]).to(torch.int8), dim=1, stable=True).indices[:, :width] + 1  # [R, W]
    lengths = counts[used]
    row_of_tile = torch.zeros(num_passes, dtype=torch.long, device=device)
    row_of_tile[used] = torch.arange(used.numel(), device=device)
    image_of_tile = torch.zeros(num_passes, dtype=torch.long, device=device)
    image_of_tile[tile[valid]] = torch.arange(tile.shape[0], device=device)[:, None].expand_as(tile)[valid]
    rank = present.long().cumsum(dim=1) - 1  # [T, n]: index of each present token within its row
    slot = torch.where(valid, rank[tile, patch - 1], 0)
    return _TileRows(used, order, lengths, image_of_tile[used], row_of_tile, slot)


def _extra_per_image(
    extra: Tensor, extra_valid: Tensor | None, row_image: Tensor, num_images: int
) -> tuple[Tensor, Tensor]:
    """Per-row extra tokens ``[R, E, C]`` gathered per image: ``([I, K*E, C], valid bool [I, K*E])``.

    Rows of one image are contiguous (passes are image-major); image ``i``'s slots hold its rows' extra
    tokens in row order, K being the most rows of one image; a row's invalid extras stay invalid.
    """
    r, e, _ = extra.shape
    per_image = torch.bincount(row_image, minlength=num_images)  # [I]
    first = per_image.cumsum(0) - per_image
    most = int(per_image.max())
    k = torch.arange(most * e, device=extra.device)
    local, which = k // e, k % e  # [K*E]
    rows = (first[:, None] + local[None, :]).clamp(max=r - 1)  # [I, K*E]
    valid = local[None, :] < per_image[:, None]
    if extra_valid is not None:
        valid = valid & extra_valid[rows, which[None, :]]
    return extra[rows, which[None, :]], valid


def _pad(rows: list[Tensor], fill: int) -> tuple[Tensor, Tensor]:
    """Ragged long rows -> ``([I, W] padded with fill, bool [I, W] valid)``."""
    width = max(int(r.numel()) for r in rows)
    out = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)
    lengths = torch.tensor([r.numel() for r in rows], device=out.device)
    return out[:, :width], torch.arange(width, device=out.device)[None, :] < lengths[:, None]
