"""The InternVL family: HF ``InternVLForConditionalGeneration`` (InternVL 2.5 / 3 / 3.5 in the HF-native layout):
an InternViT tower with a CLS token, a pixel shuffle, an MLP projector, a Qwen2 / Llama language model.

* ``pixel_values`` is ``[T, 3, H, W]``: one entry per **tower pass**. The processor crops each image into
  tiles (plus a thumbnail, last) and turns each video frame into an image, then drops the grouping
  (``num_patches``); each image is one run of placeholders, ``N`` per pass. Under the default
  ``budget_scope="image"`` the family reads the runs from the prompt (:meth:`Family.placeholder_runs`) and
  makes one strategy row per image: its passes' tokens in order, the thumbnail's CLS as its CLS (as
  LLaVA-NeXT's base view), ``lengths`` its own; so only ``ragged_vision`` strategies run there. Under
  ``budget_scope="tile"`` every pass is its own row (a fixed ``N``: every strategy runs);
* the vision stage sees each pass's tokens after the pixel shuffle (``[T, N, 4C]`` for a ratio of 0.5, one
  raster of ``side * downsample_ratio`` per side); the projector (``multi_modal_projector``) runs on the
  kept ones only;
* the tower has a CLS token at index 0 of every pass, dropped before the shuffle
  (``vision_feature_select_strategy="default"``); CLS-reading strategies run: each token is
  ``1 / downsample_ratio^2`` patches, which :attr:`EncodedImages.groups` names (the model's own shuffle run
  on patch indices), so the strategy reads its CLS signals per token. A tower without a CLS (a checkpoint
  whose embeddings carry no ``cls_token``, run with ``"full"``) goes through the core's CLS refusal;
* positions are 1-D; every decoder layer is full causal attention (sliding-window text configs are refused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import hf_compat as hf
from ..errors import InputError, MissingCapabilityError, UnsupportedModelError
from ..keptmap import raster_cells
from ..stats import FlopModel, kv_width, mlp_matrices
from ._tiny import VOCAB, TinyCase, left_padded, prompt_ids, random_model
from .clip import class_names
from .family import EncodedImages, Family, FamilyParts, ForwardOptions, TowerSignals
from .features import ImageFeatures
from .video import expand_items

__all__ = ["InternVLAdapter", "output_class", "tiny_internvl"]

MODEL_CLASS = "InternVLForConditionalGeneration"


# -- transformers contact points -------------------------------------------------------------------------


def output_class() -> type:
    """The output dataclass of ``InternVLModel.forward``."""
    return hf.declared_output("transformers.models.internvl.modeling_internvl", "InternVLModel")


def _llm_strategies() -> str:
    from ..registry import available

    return ", ".join(available(stage="llm")) or "none registered"


class InternVLAdapter(Family):
    """HF ``InternVLForConditionalGeneration``: InternViT (CLS at 0), pixel shuffle, MLP projector, Qwen2/Llama."""

    name = "internvl"
    budget_scopes = ("image", "tile")
    min_transformers = "5.24.0"

    @classmethod
    def mismatch(cls, model: nn.Module) -> str:
        if MODEL_CLASS not in class_names(model):
            return f"expected a {MODEL_CLASS}, got {type(model).__name__}"
        inner = getattr(model, "model", None)
        if not all(hasattr(inner, name) for name in ("vision_tower", "multi_modal_projector", "language_model")):
            return f"expected vision_tower, multi_modal_projector and language_model in {type(inner).__name__}"
        tower = inner.vision_tower
        if not (hasattr(tower, "embeddings") and hasattr(getattr(tower, "encoder", None), "layer")):
            return f"expected an InternViT tower (embeddings, encoder.layer), got {type(tower).__name__}"
        return ""

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa") -> TinyCase:
        model, make_inputs = tiny_internvl(seed=seed, attn_implementation=attn_implementation)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)

    def parts(self) -> FamilyParts:
        self.inner = self.model.model
        self.tower = self.inner.vision_tower
        config, vision, lm = self.model.config, self.tower.config, self.inner.language_model
        kinds = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise UnsupportedModelError(
                f"this {self.name} language model has layer_types {sorted(kinds)} (use_sliding_window="
                f"{getattr(lm.config, 'use_sliding_window', None)!r}); tokprune runs InternVL's decoder layers with "
                "full causal attention only (InternVL's released checkpoints: use_sliding_window=false)"
            )
        self.ratio = float(config.downsample_ratio)
        self.scale = int(round(1 / self.ratio))  # patches per token side
        rows, cols = (s // p for s, p in zip(vision.image_size, vision.patch_size))
        self.side = rows // self.scale  # tokens per side of one pass
        self.tokens = self.side * (cols // self.scale)
        self.cls = isinstance(getattr(self.tower.embeddings, "cls_token", None), nn.Parameter)
        # under budget_scope="image" a row is an image: its passes, a number of them per image
        self.variable_image_tokens = self.budget_scope == "image"
        self._check_fixed_size()
        d = lm.config.hidden_size
        c4 = vision.hidden_size * self.scale**2
        flops = FlopModel(
            d=d,
            m=lm.config.intermediate_size,
            c=vision.hidden_size,
            mv=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            vision_tokens=rows * cols + int(self.cls),
            mlp_matrices=mlp_matrices(lm.layers[0].mlp),
            kv_dim=kv_width(lm.config),
            vision_mlp_matrices=mlp_matrices(self.tower.encoder.layer[0].mlp),
            projector_macs=c4 * d + d * d,  # linear_1 (shuffled width -> d), linear_2 (d -> d)
        )
        return FamilyParts(
            inner=self.inner,
            language_model=lm,
            image_token_id=config.image_token_id,
            tokens_per_image=self.tokens,
            flops=flops,
            output_class=output_class(),
            tower=TowerSignals(self.tower.encoder.layer, vision.num_attention_heads, self.cls, attention="attention"),
        )

    def check_pipeline(self) -> None:
        step = self.pipeline.vision
        config = self.model.config
        layer, select = config.vision_feature_layer, config.vision_feature_select_strategy
        if not isinstance(layer, int):
            raise MissingCapabilityError(
                f"{step.short_spec()} needs one vision feature layer, but this {self.name} model has "
                f"vision_feature_layer={layer!r}; one int (InternVL's -1) works; LLM-stage strategies work on it: "
                f"{_llm_strategies()}"
            )
        self._select(select)

    def _check_fixed_size(self) -> None:
        """Refuse, under ``budget_scope="image"``, a vision step that cuts rows of one fixed size (before the
        core's generic refusal, so that the message names the scope that works)."""
        step = self.pipeline.vision
        if not self.variable_image_tokens or step is None or step.ragged_vision:
            return
        from ..registry import available, describe

        ragged = [
            n for n in available(stage="vision") if describe(n).cls.ragged_vision and not describe(n).cls.temporal
        ]
        raise MissingCapabilityError(
            f"{step.short_spec()} cuts rows of one fixed size, but under budget_scope='image' an {self.name} image "
            "is its tiles and thumbnail, a number of tower passes per image; use budget_scope='tile' (every pass "
            f"one row of {self.tokens} tokens), or a vision strategy that cuts per image: {', '.join(ragged)}"
        )

    def _select(self, select: object) -> None:
        """The CLS is dropped before the shuffle (``"default"``) where the tower has one, else every token is
        a patch (``"full"``); the other pairings do not run in the model itself."""
        want = "default" if self.cls else "full"
        if select != want:
            what = "has a CLS token at index 0" if self.cls else "has no CLS token"
            raise MissingCapabilityError(
                f"this {self.name} tower {what}, so vision_feature_select_strategy must be {want!r} for its patches "
                f"to make a square raster for the pixel shuffle; got {select!r}"
            )

    def check_inputs(self, pixel_values: Tensor | None, options: ForwardOptions) -> None:
        if self.pipeline.vision is None or pixel_values is None:
            return
        config = self.model.config
        layer = options.get("vision_feature_layer")
        select = options.get("vision_feature_select_strategy")
        if (layer is not None and layer != config.vision_feature_layer) or (
            select is not None and select != config.vision_feature_select_strategy
        ):
            raise InputError(
                f"the vision stage runs on the model's vision_feature_layer={config.vision_feature_layer!r} and "
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}; got "
                f"vision_feature_layer={layer!r}, vision_feature_select_strategy={select!r} for this call"
            )

    def encode_images(self, pixel_values: Tensor, options: ForwardOptions) -> EncodedImages:
        """The tower on every pass, the feature layer without CLS, the model's own pixel shuffle; one row per
        pass, or per image (its passes) under ``budget_scope="image"``."""
        layer = self.model.config.vision_feature_layer
        # every layer's states are kept only where needed (24 layers of every tile are a lot of memory)
        hidden = self.cls and any(signal.kind == "hidden" for signal in self.pipeline.requires())
        pixels = pixel_values.to(self.inner.dtype)
        out = self.tower(pixel_values=pixels, output_hidden_states=hidden or layer != -1, return_dict=True)
        chosen = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        chosen = chosen[:, int(self.cls) :]
        t, patches, c = chosen.shape
        side = int(round(patches**0.5))
        shuffled = self.inner.pixel_shuffle(chosen.reshape(t, side, side, c), scale_factor=self.ratio)
        features = shuffled.reshape(t, -1, shuffled.shape[-1])  # [T, N, C * scale^2]
        # the same shuffle on patch indices: which patches make each token (the strategy's CLS signals per token)
        index = torch.arange(patches, device=features.device).view(1, side, side, 1)
        groups = self.inner.pixel_shuffle(index, scale_factor=self.ratio).reshape(self.tokens, -1)  # [N, scale^2]
        states = list(out.hidden_states) if hidden else []
        passes = self._passes(t, features.device)
        if passes is None:
            return EncodedImages(features, grid=(self.side, self.tokens // self.side), states=states, groups=groups)
        return image_rows(features, states, groups, passes, patches, cls=self.cls)

    def _passes(self, passes: int, device: torch.device) -> Tensor | None:
        """Tower passes of each image (long ``[I]``) from the prompt's placeholder runs, under
        ``budget_scope="image"``; None where every pass is a row (``"tile"``, one pass per image, or no prompt:
        ``get_image_features`` called directly)."""
        runs = self.placeholder_runs() if self.budget_scope == "image" else None
        if runs is None:
            return None
        per_image = torch.div(runs, self.tokens, rounding_mode="floor").to(device)
        whole, total, single = torch.stack(
            [(runs % self.tokens == 0).all().long(), per_image.sum(), (per_image == 1).all().long()]
        ).tolist()
        if not whole or total != passes:
            raise InputError(
                f"the prompts' image placeholder runs ({runs.tolist()} tokens) are not whole tower passes of "
                f"{self.tokens} tokens for the {passes} passes in pixel_values"
            )
        return None if single else per_image

    def project(self, features: Tensor) -> Tensor:
        return self.inner.multi_modal_projector(features)

    def stock_features(self, encoded: hf.BaseModelOutputWithPooling, options: ForwardOptions) -> ImageFeatures:
        """``pooler_output`` is ``[T, N, D]``, one entry per tower pass: one row per image (its passes) under
        ``budget_scope="image"``, as the vision stage makes them, so that the stats count the same images."""
        per_pass = list(encoded.pooler_output)
        passes = self._passes(len(per_pass), per_pass[0].device) if per_pass else None
        if passes is None:
            return ImageFeatures.unpruned(per_pass)
        out = ImageFeatures.unpruned(list(torch.cat(per_pass).split((passes * self.tokens).tolist())))
        out.tower_runs = passes
        return out

    def repeat_item_inputs(self, inputs: ForwardOptions, copies: int) -> dict[str, Tensor]:
        """``pixel_values`` has a row per tower pass: each prompt's passes ``copies`` times in a row (repeating
        the rows one by one would pair prompts with other prompts' passes)."""
        pixels, ids = inputs.get("pixel_values"), inputs.get("input_ids")
        if not isinstance(pixels, Tensor) or not isinstance(ids, Tensor):
            return {}
        per_prompt = (ids == self.model.config.image_token_id).sum(dim=1).to(pixels.device)
        passes = torch.full((pixels.shape[0],), self.tokens, device=pixels.device)
        _, rows = expand_items(passes, per_prompt, torch.ones_like(passes), copies)
        return {"pixel_values": pixels[rows]}

    def patch_cells(self, features: ImageFeatures, options: ForwardOptions) -> Tensor | None:
        """Each token's ``(pass, 0, row, col)`` on its pass's raster (the pass within its image, for image rows);
        -1 past a row's tokens."""
        rows, cols = self.side, self.tokens // self.side
        width = features.keep.shape[1]
        if features.tower_runs is None:
            return raster_cells(features.keep.shape[0], rows, cols) if rows * cols == width else None
        j = torch.arange(width, device=features.keep.device)
        within = j % self.tokens
        cell = torch.stack([j // self.tokens, torch.zeros_like(j), within // cols, within % cols], dim=1)
        valid = j[None, :] < (features.tower_runs.to(j.device) * self.tokens)[:, None]
        return torch.where(valid[..., None], cell[None], torch.full_like(cell[None], -1))


def image_rows(
    features: Tensor, states: list[Tensor], groups: Tensor, passes: Tensor, patches: int, cls: bool
) -> EncodedImages:
    """One row per image from per-pass tokens.

    ``features`` ``[T, N, F]`` (passes in prompt order), ``passes`` long ``[I]`` (per image), ``groups`` long
    ``[N, G]`` (one pass's patches of each token), ``patches``: ``P`` per pass (CLS excluded), ``cls``: the
    tower has one, at 0. Row ``i`` holds its passes' tokens in order (``[I, K*N, F]``, padded past
    ``passes[i] * N``); its CLS signals come from its last pass (the thumbnail, InternVL's global view, where
    an image is tiled), each token's from its own pass (``rows``: ``[T, 1+P, C]`` -> ``[I, 1+K*P, C]``).
    """
    n = features.shape[1]
    k, device = int(passes.max()), features.device
    first = passes.cumsum(0) - passes  # each image's first pass

    def source(width: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(pass [I, K*width], index in it [K*width], valid [I, K*width])`` of ``width`` items per pass."""
        j = torch.arange(k * width, device=device)
        valid = (j // width)[None, :] < passes[:, None]
        return torch.where(valid, first[:, None] + j // width, first[:, None]), j % width, valid

    tile, slot, valid = source(n)
    rows = features[tile, slot] * valid[..., None].to(features.dtype)
    ptile, patch, _ = source(patches)
    thumbnail = first + passes - 1

    def per_image(state: Tensor) -> Tensor:
        return torch.cat([state[thumbnail, :1], state[ptile, patch + 1]], dim=1)

    offsets = torch.arange(k, device=device)[:, None, None] * patches  # pass p's patches follow the earlier ones'
    return EncodedImages(
        rows,
        lengths=passes * n,
        states=states,
        rows=per_image if cls else None,
        tower_runs=passes,
        groups=(groups[None] + offsets).reshape(k * n, -1),
    )


# -- the tiny case ---------------------------------------------------------------------------------------


def tiny_internvl(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Callable[..., dict[str, Tensor]]]:
    """A random-weight tiny ``InternVLForConditionalGeneration``: InternViT of 8 layers, 32 px / 4 px patches
    (64 patches and a CLS per pass), pixel shuffle 0.5 (16 tokens per pass), Qwen2; and ``make_inputs``.

    ``make_inputs(question_lengths=(5, 3), seeds=None, images=None, tiles=1)``: sample ``i`` (drawn from
    ``seeds[i]``, default ``i``) has ``images`` images (None: ``1 + (seed + 1) % 2``, so samples differ),
    image ``k`` of it ``1 + (seed + k) % tiles`` passes in one placeholder run (as the processor tiles);
    ``pixel_values`` ``[passes, 3, 32, 32]`` in prompt order.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 8, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 4, "initializer_range": 0.08}  # fmt: skip
    text = {"model_type": "qwen2", "vocab_size": VOCAB.size, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "pad_token_id": VOCAB.pad, "bos_token_id": VOCAB.bos,
            "eos_token_id": VOCAB.eos, "initializer_range": 0.08, "tie_word_embeddings": False}  # fmt: skip
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=VOCAB.image, image_seq_length=16,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = random_model(InternVLForConditionalGeneration, config, seed, attn_implementation, dtype)
    # HF starts the CLS token and the position embeddings at zero (a trained model has neither): draw them,
    # so that the CLS query and the patches' positions are not ties a ranking breaks by rounding.
    emb, gen = model.model.vision_tower.embeddings, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb.cls_token.copy_(torch.randn(emb.cls_token.shape, generator=gen))
        emb.position_embeddings.copy_(0.5 * torch.randn(emb.position_embeddings.shape, generator=gen))
    tokens = config.image_seq_length

    def make_inputs(
        question_lengths: Sequence[int] = (5, 3), seeds: Sequence[int] | None = None, images: int | None = None,
        tiles: int = 1,
    ) -> dict[str, Tensor]:  # fmt: skip
        seeds = list(range(len(question_lengths))) if seeds is None else list(seeds)
        rows, pixels = [], []
        for q, s in zip(question_lengths, seeds):
            gen = torch.Generator().manual_seed(s * 1009 + q)
            count = 1 + (s + 1) % 2 if images is None else int(images)
            passes = [1 + (s + k) % max(1, tiles) for k in range(count)]
            words = torch.randint(VOCAB.first_word, VOCAB.size, (q,), generator=gen).tolist()
            rows.append(prompt_ids([tokens * p for p in passes], words))
            pixels += [torch.randn(3, 32, 32, generator=gen) for _ in range(sum(passes))]
        out = left_padded(rows)
        if pixels:
            out["pixel_values"] = torch.stack(pixels).to(dtype)
        return out

    return model, make_inputs
