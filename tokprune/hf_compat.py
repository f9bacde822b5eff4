"""The contact points between tokprune and ``transformers`` internals that every family shares.

What only one family touches (LLaVA's CLIP tower, LLaVA-NeXT's AnyRes packing, Qwen's M-RoPE index and
output classes) lives in that family's module, beside its adapter, built on the helpers here
(:func:`refuse`, :func:`parameters`, :func:`field_names`, :func:`declared_output`).

transformers renames and reshapes its internals between minor releases (5.24 renamed the cache keyword
from ``past_key_values`` to ``cache`` and replaced ``image_hidden_states`` by ``image_outputs``;
``create_causal_mask`` changed its signature four times in 5.x). So the adapters never touch those
internals directly: they go through the functions here, which detect each feature by its presence
(signatures, dataclass fields, attributes), never by comparing version numbers. What cannot be detected
is refused at ``patch()`` time by :func:`check_model`, naming the missing feature, the installed version
and the tested range, instead of misbehaving on the first forward.

Where transformers offers a public surface we use it (``GenerationConfig.update``); where the private
one is the most-changed API we avoid it (the 4-D attention mask is built here, see :func:`attention_mask`;
RoPE is applied here, see :func:`apply_rope`).

The tested range (:data:`TESTED_RANGE`) is the one ``pyproject.toml`` declares; the policy for raising
it is in docs/troubleshooting.md.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .errors import InputError, UnsupportedModelError

__all__ = [
    "BaseModelOutputWithPooling",
    "TESTED_MAX",
    "TESTED_MIN",
    "TESTED_RANGE",
    "UntestedTransformersWarning",
    "apply_rope",
    "attention_implementation",
    "attention_mask",
    "cache_from_kwargs",
    "cache_keyword",
    "call_decoder_layer",
    "chat_template_text",
    "check_model",
    "declared_output",
    "decoder_features",
    "field_names",
    "generation_config",
    "has_attention",
    "has_sliding_layers",
    "held_keys",
    "model_output",
    "model_image_processor",
    "model_tokenizer",
    "new_dynamic_cache",
    "older_than",
    "parameters",
    "qk_modules",
    "qk_norms",
    "query_heads",
    "refuse",
    "returned_dataclasses",
    "rotary_embeddings",
    "transformers_version",
]

#: Oldest transformers release the whole suite passes on (checked by CI's "minimum" leg).
TESTED_MIN = "5.6.0"
#: First minor release *not* tested yet: raised only after CI's canary passes on it.
TESTED_MAX = "5.26"
TESTED_RANGE = f">={TESTED_MIN},<{TESTED_MAX}"

#: The cache keyword, newest spelling first (5.24 renamed ``past_key_values`` to ``cache``).
CACHE_KEYWORDS = ("cache", "past_key_values")
#: The image-features field of the LLaVA model outputs, newest first (5.24: ``image_outputs``).
IMAGE_FIELDS = ("image_outputs", "image_hidden_states")


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is outside :data:`TESTED_RANGE` (every feature tokprune needs was found)."""


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _release(version: str) -> tuple[int, ...]:
    """``"5.24.0.dev0"`` -> ``(5, 24, 0)``: the release numbers, enough to compare with our bounds."""
    from packaging.version import Version

    return Version(version).release


def in_tested_range(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) lies in :data:`TESTED_RANGE`."""
    v = _release(version or transformers_version())
    return _release(TESTED_MIN) <= v < _release(TESTED_MAX)


def refuse(feature: str, detail: str = "") -> UnsupportedModelError:
    suffix = f" ({detail})" if detail else ""
    return UnsupportedModelError(
        f"transformers {transformers_version()} lacks a feature tokprune needs: {feature}{suffix}. "
        f"tokprune is tested with transformers{TESTED_RANGE}; install a version in that range "
        f"(pip install 'transformers{TESTED_RANGE}') or see docs/troubleshooting.md"
    )


# -- signatures and keywords -------------------------------------------------------------------------


def parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    # inspect.signature follows __wrapped__, so transformers' renaming decorators show the real parameters.
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def cache_keyword(fn: Callable) -> str | None:
    """The name under which ``fn`` takes the KV cache (``"cache"`` or ``"past_key_values"``), or None."""
    params = parameters(fn)
    return next((name for name in CACHE_KEYWORDS if name in params), None)


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed under either spelling (None if neither); both at once is an error."""
    given = [name for name in CACHE_KEYWORDS if kwargs.get(name) is not None]
    if len(given) > 1:
        raise InputError(f"pass the cache once: got both {given[0]}= and {given[1]}=")
    return kwargs.get(given[0]) if given else None


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Like :func:`cache_from_kwargs`, removing both spellings from ``kwargs``."""
    cache = cache_from_kwargs(kwargs)
    for name in CACHE_KEYWORDS:
        kwargs.pop(name, None)
    return cache


# -- model outputs -----------------------------------------------------------------------------------


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def model_output(cls: type, *, last_hidden_state: Tensor, cache: Any, image_features: Any) -> Any:
    """Instantiate a LLaVA-style model output with whatever the installed layout calls its fields.

    ``image_features`` is the image encoder's output (a ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` holds one ``[n_i, D]`` tensor per image, or None). Layouts with ``image_outputs``
    get it as is; older ones (``image_hidden_states``) get the features the LLM saw, packed ``[S, D]``.
    Layouts without an image field (Qwen2.5-VL's before 5.24) get none.
    """
    fields = field_names(cls)
    cache_field = next((name for name in CACHE_KEYWORDS if name in fields), None)
    image_field = next((name for name in IMAGE_FIELDS if name in fields), None)
    if cache_field is None:
        raise refuse(f"{cls.__name__} with a cache field", f"fields: {sorted(fields)}")
    values = {"last_hidden_state": last_hidden_state, cache_field: cache}
    if image_field == "image_hidden_states" and image_features is not None:
        values[image_field] = torch.cat(list(image_features.pooler_output))
    elif image_field is not None:
        values[image_field] = image_features
    return cls(**values)


def output_cache(output: Any) -> Any:
    """The cache held by a model output, under either spelling."""
    for name in CACHE_KEYWORDS:
        if name in field_names(type(output)):
            return getattr(output, name)
    raise refuse(f"a cache field on {type(output).__name__}")


# -- tokenizers and chat templates ----------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _tokenizer_at(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError):  # no tokenizer files there (a model built from a config)
        return None


def model_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved with ``model`` (where ``from_pretrained`` loaded it from), or None.

    Only local files are read (the directory or the hub cache): patching never downloads. A model built
    from a config has no ``name_or_path`` and gets None.
    """
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return _tokenizer_at(str(name)) if name else None


@functools.lru_cache(maxsize=8)
def _image_processor_at(name: str) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError):  # none saved there (a model built from a config)
        return None


def model_image_processor(model: nn.Module) -> Any:
    """The image processor saved with ``model`` (local files only, as :func:`model_tokenizer`), or None."""
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return _image_processor_at(str(name)) if name else None


def chat_template_text(owner: Any, text: str) -> str | None:
    """One user turn (an image, then ``text``) rendered by ``owner``'s chat template with the generation prompt.

    ``owner`` is a processor or a tokenizer; None when it has no chat template (or no
    ``apply_chat_template``). The content list uses transformers' documented message format.
    """
    if not getattr(owner, "chat_template", None) or not callable(getattr(owner, "apply_chat_template", None)):
        return None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    rendered = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return rendered if isinstance(rendered, str) else None


# -- generation ----------------------------------------------------------------------------------------


def generation_config(model: nn.Module, config: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The effective generation config of a ``generate`` call and the remaining model kwargs.

    The public ``GenerationConfig.update`` (which returns the keywords it did not consume) instead of
    ``GenerationMixin._prepare_generation_config``, whose signature moves between releases.
    """
    import copy

    base = config if config is not None else model.generation_config
    effective = copy.deepcopy(base)
    model_kwargs = effective.update(**kwargs)
    return effective, model_kwargs


def new_dynamic_cache(config: Any) -> Any:
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=config)


def held_keys(cache: Any, layer: int, keys: int, query_length: int) -> int:
    """How many of ``keys`` (the cached ones and ``query_length`` new ones) decoder ``layer``'s attention gets
    back from ``cache``: all of them, except on a sliding-window cache layer (``DynamicCache(config=...)`` of a
    model with sliding layers), which keeps only its last ``sliding_window - 1`` before the new ones."""
    layers = getattr(cache, "layers", None)
    if not layers or layer >= len(layers) or not getattr(layers[layer], "is_sliding", False):
        return keys
    window = getattr(layers[layer], "sliding_window", None)
    return keys if window is None else min(keys - query_length, window - 1) + query_length


def has_sliding_layers(cache: Any) -> bool:
    """Whether ``cache`` has sliding-window layers (which keep only their last keys: :func:`held_keys`)."""
    return any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", None) or ())


def is_dynamic_cache(cache: Any) -> bool:
    from transformers.cache_utils import DynamicCache

    return isinstance(cache, DynamicCache) and not getattr(cache, "is_compileable", False)


# -- attention masks and RoPE -------------------------------------------------------------------------


def attention_implementation(config: Any) -> str | None:
    """The attention implementation a (text) config selects (``"sdpa"``, ``"eager"``, ...)."""
    return getattr(config, "_attn_implementation", None)


def attention_mask(
    key_valid: Tensor, query_length: int, dtype: torch.dtype, implementation: str, all_valid: bool | None = None
) -> Tensor | None:
    """The 4-D causal + padding mask the decoder layers' attention takes, built here.

    Query ``i`` sits at key position ``K - Q + i`` (the queries are the last ``Q`` of ``K`` keys, as
    with a cache) and attends to key ``j`` when ``j`` is at or before it and ``key_valid[b, j]``. This
    is what ``create_causal_mask`` builds for a full-attention model; building it here takes the most
    changed API of transformers 5.x out of our path. Like transformers, returns None when nothing is
    masked beyond causality (sdpa then uses its own causal kernel).

    Args:
        key_valid: bool ``[B, K]``: which keys (cached and new) are not padding.
        query_length: ``Q <= K``.
        dtype: the attention's compute dtype (eager masks are additive in it).
        implementation: ``"sdpa"`` (boolean mask, True = attend) or ``"eager"`` (additive float mask).
        all_valid: whether every key is valid, when the caller already knows (None: read it from
            ``key_valid``, which synchronises with the device).

    Returns:
        ``[B, 1, Q, K]`` or None.
    """
    b, k = key_valid.shape
    if implementation == "sdpa" and (query_length == 1 or query_length == k):
        if all_valid is None:
            all_valid = bool(key_valid.all())
        if all_valid:
            return None
    offset = k - query_length
    q_pos = torch.arange(query_length, device=key_valid.device)[:, None] + offset
    k_pos = torch.arange(k, device=key_valid.device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & key_valid[:, None, None, :]
    if implementation == "sdpa":
        return allowed
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=key_valid.device), torch.finfo(dtype).min)


def rotary_embeddings(language_model: nn.Module, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE ``(cos, sin)`` ``[B, L, head_dim]`` for ``position_ids`` ``[B, L]`` from the model's own module."""
    return language_model.rotary_emb(hidden, position_ids=position_ids)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ``q``/``k`` ``[B, H, L, head_dim]`` by ``cos``/``sin`` ``[B, L, r]`` (Llama's RoPE).

    ``r < head_dim`` (partial rotary, ``partial_rotary_factor``: Qwen3.5, Qwen3-Next): the first ``r`` channels
    of each head are rotated and the rest pass unchanged, as those models' own ``apply_rotary_pos_emb``."""
    cos, sin = cos[:, None], sin[:, None]
    r = cos.shape[-1]

    def rotate(x: Tensor) -> Tensor:
        turned = x[..., :r] * cos + _rotate_half(x[..., :r]) * sin
        return turned if r == x.shape[-1] else torch.cat([turned, x[..., r:]], dim=-1)

    return rotate(q), rotate(k)


# -- calling layers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderFeatures:
    """How the installed transformers calls one decoder layer of a language model."""

    cache_keyword: str  #: ``"cache"`` or ``"past_key_values"``


@functools.cache
def _decoder_features(layer_cls: type) -> DecoderFeatures | None:
    params = parameters(layer_cls.forward)
    keyword = next((name for name in CACHE_KEYWORDS if name in params), None)
    needed = {"hidden_states", "attention_mask", "position_ids", "position_embeddings"}
    if keyword is None or not needed <= set(params) | {"kwargs"}:
        return None
    return DecoderFeatures(cache_keyword=keyword)


def decoder_features(layer: nn.Module) -> DecoderFeatures:
    features = _decoder_features(type(layer))
    if features is None:
        raise refuse(
            f"{type(layer).__name__}.forward taking hidden_states, attention_mask, position_ids, "
            f"position_embeddings and a cache keyword ({' or '.join(CACHE_KEYWORDS)})",
            f"signature: {list(parameters(type(layer).forward))}",
        )
    return features


def qk_modules(attn: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs are the query and key projections of a decoder attention (``q_proj``,
    ``k_proj``), ``[B, L, heads * head_dim]``; :func:`qk_norms` applies the q/k norms some attentions have after
    them. (Hooking the norms instead reads a layout that depends on the model: Qwen3 normalises ``[B, L, H, D]``,
    Gemma 3 the transposed ``[B, H, L, D]``.)"""
    return attn.q_proj, attn.k_proj


def qk_norms(attn: nn.Module, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """``q``/``k`` ``[B, L, heads, head_dim]`` through the attention's per-head norms where it has them
    (``q_norm``/``k_norm``: Qwen3, Gemma 3), as its forward applies them before RoPE; unchanged otherwise.
    Detected by the attributes, so a family gains norms without a code change."""
    norms = tuple(getattr(attn, name, None) for name in ("q_norm", "k_norm"))
    if all(isinstance(m, nn.Module) for m in norms):
        return norms[0](q), norms[1](k)
    return q, k


def query_heads(attn: nn.Module, q: Tensor) -> Tensor:
    """``q_proj``'s output ``[B, L, width]`` as query heads ``[B, L, H, head_dim]``. A gated attention (Qwen3.5)
    projects each head's query and its output gate side by side (``width = 2 * H * head_dim``, as wide as
    twice ``o_proj``'s input): the query is each head's first half."""
    b, n, width = q.shape
    out = getattr(attn, "o_proj", None)
    if isinstance(out, nn.Linear) and width == 2 * out.in_features:
        return q.view(b, n, -1, 2 * attn.head_dim)[..., : attn.head_dim]
    return q.view(b, n, -1, attn.head_dim)


def layer_qk(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """The query and key decoder ``layer`` computes from ``hidden`` ``[B, L, D]``, before RoPE:
    ``([B, H, L, head_dim], [B, Hkv, L, head_dim])``; its input norm, ``q_proj``/``k_proj`` and, where the
    attention has them, its q/k norms (Qwen3, Gemma 3), as the layer's own forward applies them."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    b, n, _ = hidden.shape
    q, k = qk_norms(attn, query_heads(attn, attn.q_proj(x)), attn.k_proj(x).view(b, n, -1, attn.head_dim))
    return q.transpose(1, 2), k.transpose(1, 2)


def has_attention(layer: nn.Module) -> bool:
    """Whether decoder ``layer`` has softmax attention (a ``self_attn`` with q/k an LLM-stage step can score
    with); a linear-attention (Gated DeltaNet, Mamba) layer has none."""
    return isinstance(getattr(layer, "self_attn", None), nn.Module)


def call_decoder_layer(
    layer: nn.Module,
    hidden: Tensor,
    *,
    mask: Tensor | None,
    position_ids: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    cache: Any,
) -> Tensor:
    """One decoder layer on ``hidden`` ``[B, L, D]``; returns ``[B, L, D]``, updating ``cache`` if given."""
    keyword = decoder_features(layer).cache_keyword
    out = layer(
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=cache is not None,
        position_embeddings=position_embeddings,
        **{keyword: cache},
    )
    return out[0] if isinstance(out, tuple) else out


def older_than(minimum: str | None) -> bool:
    """Whether the installed transformers is older than ``minimum`` (None: never)."""
    return minimum is not None and _release(transformers_version()) < _release(minimum)


# -- declared outputs -----------------------------------------------------------------------------------


def returned_dataclasses(fn: Callable, module: Any) -> list[type]:
    import typing

    hints = typing.get_type_hints(fn, globalns=vars(module))
    return [t for t in typing.get_args(hints.get("return")) if dataclasses.is_dataclass(t)]


def declared_output(module_name: str, model_class: str) -> type:
    """The output dataclass ``model_class.forward`` declares (the multimodal one, with ``image_outputs``)."""
    import importlib

    module = importlib.import_module(module_name)
    returned = returned_dataclasses(getattr(module, model_class).forward, module)
    if not returned:
        raise refuse(f"{model_class}.forward returning a model-output dataclass")
    return returned[0]


# -- patch-time check -----------------------------------------------------------------------------------


def check_model(language_model: nn.Module, output_cls: type, *, image_field: bool = True) -> None:
    """Refuse at ``patch()`` time when the installed transformers lacks something the adapter needs.

    Raises :class:`~tokprune.errors.UnsupportedModelError` naming the missing feature, the installed
    version and the tested range (``image_field=False``: the family's output may lack an image field,
    as Qwen2.5-VL's did before 5.24); warns with :class:`UntestedTransformersWarning` when every feature is
    there but the version is outside the tested range.
    """
    from transformers import GenerationConfig

    if not language_model.layers:
        raise refuse("a language model with decoder layers")
    decoder_features(language_model.layers[0])
    if not isinstance(getattr(language_model, "rotary_emb", None), nn.Module):
        raise refuse(f"a model-level rotary embedding ({type(language_model).__name__}.rotary_emb)")
    fields = field_names(output_cls)
    has_image = any(name in fields for name in IMAGE_FIELDS)
    if not any(name in fields for name in CACHE_KEYWORDS) or (image_field and not has_image):
        raise refuse(
            f"{output_cls.__name__} with a cache field ({' or '.join(CACHE_KEYWORDS)}) and an image field "
            f"({' or '.join(IMAGE_FIELDS)})",
            f"fields: {sorted(fields)}",
        )
    if not callable(getattr(GenerationConfig, "update", None)) or not callable(
        getattr(GenerationConfig, "get_generation_mode", None)
    ):
        raise refuse("GenerationConfig.update and GenerationConfig.get_generation_mode")
    scored = [layer for layer in language_model.layers if has_attention(layer)]
    if not scored:
        raise refuse("a language model with at least one softmax-attention layer (self_attn)")
    attn = scored[0].self_attn
    for name in ("q_proj", "k_proj", "head_dim", "scaling"):
        if not hasattr(attn, name):
            raise refuse(f"{type(attn).__name__}.{name}")
    if not in_tested_range():
        warnings.warn(
            f"transformers {transformers_version()} is outside the range tokprune was tested with "
            f"({TESTED_RANGE}); every feature tokprune needs was found, but check results against the unpruned "
            "model (docs/troubleshooting.md)",
            UntestedTransformersWarning,
            stacklevel=4,  # the caller of patch()
        )
