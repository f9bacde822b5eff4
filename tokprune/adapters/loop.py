"""The decoder loop: the replaced forward, the prefill (layers ``0..K-1`` see every token, ``K..`` only
the kept ones; each segment keeps its own padding mask and position offset), the LLM-stage steps and
decoding against the pruned cache (:class:`DecoderLoop`, mixed into the pruned decoder).

KV cache. Pruning happens once, at prefill. Without a cache (``use_cache=False``) ``generate`` re-runs
the whole sequence each step; the decision is then made on the prompt positions only (the prompt
length comes from the ``generate`` call) and the generated positions are always kept. By causality the
prompt positions' hidden states, q and k are those of the prefill, so both modes take the same decision
and generate the same tokens.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .. import hf_compat as hf
from ..errors import InputError, InternalError, UnsupportedModelError
from ..keptmap import token_columns, token_present, token_slots
from ..strategy import LLMAttention, LLMContext, PruningStrategy, TokenRole
from ._seq import Seq, add_feature_rows, packed_width, token_roles
from .assembly import _from_start, _scatter_back
from .call import (
    IMAGE_INPUTS,
    CallState,
    LayerKeys,
    _generated_count,
    _Segment,
    _Session,
    check_mask_width,
    check_no_visual_tokens,
    check_positions_follow,
    check_same_images,
)
from .features import ImageFeatures

__all__ = ["DecoderLoop"]


class DecoderLoop:
    """Forward, prefill, LLM steps and decoding (a part of :class:`~tokprune.adapters.decoder.PrunedDecoderAdapter`)."""

    # -- the replaced forward -------------------------------------------------------------------------

    def _forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        with self._active(CallState(self, self._outer_generate())) as call:
            return self._forward_call(
                call, input_ids, pixel_values, attention_mask, position_ids, inputs_embeds, mm_encoder_outputs, kwargs
            )

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
        # The cache arrives as cache= (transformers >= 5.24) or past_key_values= (older): take either, and
        # never let it fall through **kwargs unread (each decoding step would then run as a fresh prefill).
        past = hf.pop_cache(kwargs)
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise UnsupportedModelError(
                "output_attentions/output_hidden_states are not supported on a pruned model (the layers see "
                "different sequences); call handle.remove() to inspect the unpruned model"
            )
        if input_ids is None or inputs_embeds is not None:
            raise UnsupportedModelError(
                "a patched model needs input_ids and no inputs_embeds (tokprune finds the image and the question "
                "in the token ids)"
            )
        pre_encoded = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None and pre_encoded is not None:
            raise InputError("pass either pixel_values or mm_encoder_outputs (pre-encoded images), not both")
        return_dict = kwargs.get("return_dict", True)
        use_cache = kwargs.get("use_cache")
        use_cache = self._lm.config.use_cache if use_cache is None else use_cache
        cache = past
        if cache is not None:
            self._check_cache(cache)
        encoded = None
        if cache is not None and cache.get_seq_length() > 0:
            session = self._session(cache)
            given = {"pixel_values": pixel_values, **kwargs}
            if pre_encoded is not None:
                given["mm_encoder_outputs"] = pre_encoded
            check_same_images(session, given)
            hidden = self._decode(input_ids, attention_mask, position_ids, cache)
        else:
            if use_cache and cache is None:
                cache = hf.new_dynamic_cache(self._lm.config)
            # the prompts, for the text encoder and Family.placeholder_runs
            prompt_n = input_ids.shape[1] - _generated_count(call.generate, input_ids.shape[1])
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            call.prompt = (input_ids[:, :prompt_n], valid[:, :prompt_n])
            # before the family pops its own: its patch grid may need them
            given = {k: v for k, v in kwargs.items() if v is not None}  # generate() passes some on as None
            options = {**(call.generate.options if call.generate is not None else {}), **given}
            encoded, features = self._vision(call, pixel_values, pre_encoded, kwargs)
            if features is not None and features.cells is None:
                features.cells = self.patch_cells(features, options)
            pos = self.positions(input_ids, attention_mask, position_ids, kwargs)
            groups = self.attention_groups(input_ids, options)
            hidden = self._prefill(call, input_ids, attention_mask, pos, cache if use_cache else None, features, groups)
            if use_cache and cache is not None:  # what a later turn of the conversation must repeat unchanged
                images = {
                    **options,
                    "pixel_values": pixel_values if pixel_values is not None else options.get("pixel_values"),
                    **call.caller_inputs,
                }
                session = self._sessions[cache]
                session.images = {k: images[k] for k in IMAGE_INPUTS if images.get(k) is not None}
                if "input_ids" in call.caller_inputs:  # the family rewrote the placeholders: keep the caller's
                    session.tokens[0] = call.caller_inputs["input_ids"]
        out = hf.model_output(
            self._output_class, last_hidden_state=hidden, cache=cache if use_cache else past, image_features=encoded
        )
        return out if return_dict else out.to_tuple()

    # -- prefill ------------------------------------------------------------------------------------

    def _prefill(
        self,
        call: CallState,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        cache: Any,
        features: ImageFeatures | None,
        groups: Tensor | None = None,
    ) -> Tensor:
        """Run the prompt (and, without a cache, the tokens generated so far); returns ``[B, L, D]``.

        ``groups`` (long ``[B, n]``, :meth:`attention_groups`): each caller position's bidirectional group."""
        b, n = input_ids.shape
        device = input_ids.device
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        # (the right-padding check is read with the other input checks, in one sync: _vision_assembly)
        marker = self._marker
        if marker is not None and len(marker) > 0:
            if device not in self._marker_ids:
                self._marker_ids[device] = torch.as_tensor(list(marker), dtype=torch.long, device=device)
            marker = self._marker_ids[device]
        pos = position_ids  # [B, n] or [B, n, R] (the family's positions, see Family.positions)
        generated = _generated_count(call.generate, n)
        prompt_n = n - generated
        roles, marker_found = token_roles(input_ids[:, :prompt_n], valid[:, :prompt_n], self._image_token_id, marker)
        roles = torch.cat([roles, torch.full((b, generated), int(TokenRole.PROTECTED), device=device)], dim=1)
        embeds = self._lm.embed_tokens(input_ids)
        seq, image_sample = self._vision_assembly(input_ids, embeds, valid, pos, roles, prompt_n, features)
        seq, shift = self._stage_positions(
            seq, self._vision_mode(), torch.zeros(b, dtype=torch.long, device=device), valid.sum(dim=1)
        )
        segments = [_Segment(0, seq.valid, shift, bool(seq.valid.all()), self.text_positions(seq.pos))]
        visual_kept = ((seq.roles == TokenRole.IMAGE) & seq.valid).sum(dim=1)
        num_layers = len(self._lm.layers)
        layer_tokens = torch.zeros(b, num_layers, dtype=torch.long, device=device)
        layer_visual = torch.zeros_like(layer_tokens)
        llm_kept: dict[int, Tensor] = {}
        diagnostics: dict[str, Any] = dict(features.diagnostics or {}) if features is not None else {}
        if self._marker is not None:
            diagnostics["roles.marker_found"] = marker_found
        seq_valid_count = valid.sum(dim=1)
        deepstack = features.deepstack if features is not None else None
        # which image token each prompt position holds, to tell the stats which patches each cut kept
        slots = None
        if features is not None and (call.generate is None or not call.generate.prefilled):  # recorded once
            columns = torch.arange(n, device=input_ids.device)
            placeholders = (input_ids == self._image_token_id) & (columns < prompt_n)
            slots = token_slots(placeholders, features.token_counts, features.keep.shape[1])
        kept_layers: dict[int, Tensor] = {}
        kept_columns: dict[int, Tensor] = {}

        call.capture = {}
        try:
            inputs: dict[str, tuple[tuple[Tensor, Tensor], Any]] = {}  # this segment's, per attention kind
            for i, layer in enumerate(self._lm.layers):
                if i in self._llm_steps:
                    # layer j's RoPE and mask in this segment, for the step's scores
                    layer_inputs = functools.partial(
                        self._layer_inputs, inputs, seq=seq, all_valid=segments[-1].all_valid, groups=groups
                    )
                    if slots is not None:
                        kept_columns[i] = token_columns(seq.src, seq.valid & seq.prompt, slots, n)
                    seq, step_diag, full = self._llm_step(call, self._llm_steps[i], i, seq, layer_inputs, generated)
                    if slots is not None:
                        kept_layers[i] = token_present(seq.src, seq.valid & seq.prompt, slots, n)
                    diagnostics.update(step_diag)
                    mode = self._llm_steps[i].positions() or self.llm_positions  # a method's own choice wins
                    seq, shift = self._stage_positions(seq, mode, segments[-1].shift, seq_valid_count)
                    segments.append(_Segment(i, seq.valid, shift, full, self.text_positions(seq.pos)))
                    llm_kept[i] = (seq.valid & seq.prompt).sum(dim=1)
                    inputs = {}
                embeddings, mask = self._layer_inputs(inputs, i, seq, segments[-1].all_valid, groups)
                layer_tokens[:, i] = (seq.valid & seq.prompt).sum(dim=1)
                layer_visual[:, i] = ((seq.roles == TokenRole.IMAGE) & seq.valid).sum(dim=1)
                seq.hidden = hf.call_decoder_layer(
                    layer,
                    seq.hidden,
                    mask=mask,
                    position_ids=self.text_positions(seq.pos),
                    position_embeddings=embeddings,
                    cache=cache,
                )
                if deepstack is not None and i < len(deepstack):
                    seq.hidden = add_feature_rows(seq.hidden, seq.feature, seq.valid, deepstack[i])
        finally:
            call.capture = None
        hidden = self._lm.norm(seq.hidden)
        if cache is not None:
            session = _Session(segments=segments, seen=0, batch=b)
            session.extend(input_ids, valid, self.text_positions(pos))
            self._sessions[cache] = session
        if call.generate is None or not call.generate.prefilled:
            seq_len = valid[:, :prompt_n].sum(dim=1)
            self._record(
                self._stats(
                    seq_len,
                    visual_kept,
                    llm_kept,
                    layer_tokens,
                    layer_visual,
                    image_sample,
                    features,
                    diagnostics,
                    (kept_layers, kept_columns),
                )
            )
            if call.generate is not None:
                call.generate.prefilled = True
        return _scatter_back(hidden, seq, n)

    def _layer_inputs(
        self,
        inputs: dict[str, tuple[tuple[Tensor, Tensor], Any]],
        layer: int,
        seq: Seq,
        all_valid: bool,
        groups: Tensor | None = None,
    ) -> tuple[tuple[Tensor, Tensor], Any]:
        """RoPE cos/sin and mask of decoder ``layer`` in the current segment (prefill: no cached keys), built
        once per attention kind the family names for its layers (:meth:`layer_attention`) and kept in ``inputs``.
        ``groups``: each caller position's bidirectional group (long ``[B, n]``), read at the survivors' sources."""
        kind = self.layer_attention(layer)
        if kind not in inputs:
            embeddings = self.layer_rotary(kind, seq.hidden, seq.pos)
            held = None
            if groups is not None:  # inserted tokens (src -1) and padding belong to no group
                rows = torch.arange(seq.src.shape[0], device=seq.src.device)[:, None]
                held = torch.where(seq.valid & (seq.src >= 0), groups[rows, seq.src.clamp_min(0)], -1)
            keys = LayerKeys(seq.valid, self.text_positions(seq.pos), seq.valid.shape[1], all_valid, held)
            inputs[kind] = (embeddings, self.layer_mask_from(kind, keys, seq.hidden.dtype))
        return inputs[kind]

    # -- LLM stage ----------------------------------------------------------------------------------

    def _llm_step(
        self,
        call: CallState,
        step: PruningStrategy,
        k: int,
        seq: Seq,
        layer_inputs: Callable[[int], tuple[tuple[Tensor, Tensor], Any]],
        generated: int,
    ) -> tuple[Seq, dict[str, Any], bool]:
        """Decide with layer K-1's q/k on the prompt positions; keep generated ones; gather.

        ``layer_inputs(j)``: RoPE and mask of layer ``j`` on ``seq`` (:meth:`_layer_inputs`): the scores see what
        the layer's own mask lets it see (a sliding window, bidirectional blocks). Also returns whether the
        gathered rows are all full (no padding), read with the gather's width.
        """
        if call.capture is None:
            raise InternalError(f"the LLM step at layer {k} ran outside a prefill's capture window")
        attn = self._lm.layers[k - 1].self_attn
        b, n, _ = seq.hidden.shape
        q, raw_key = hf.qk_norms(
            attn,
            hf.query_heads(attn, call.capture.pop(("llm", k - 1, "q"))),
            call.capture.pop(("llm", k - 1, "k")).view(b, n, -1, attn.head_dim),
        )
        q, raw_key = q.transpose(1, 2), raw_key.transpose(1, 2)
        (cos, sin), mask = layer_inputs(k - 1)
        q, key = hf.apply_rope(q, raw_key, cos, sin)
        p = n - generated  # generated tokens are the last columns of every row
        hidden, valid = seq.hidden[:, :p], seq.valid[:, :p]

        def keys_from_start() -> Tensor:  # RoPE at each sample's positions minus its first (as run alone)
            kind = self.layer_attention(k - 1)
            start_cos, start_sin = self.layer_rotary(kind, hidden, _from_start(seq.pos[:, :p], valid))
            return hf.apply_rope(raw_key[:, :, :p], raw_key[:, :, :p], start_cos, start_sin)[1]

        def layer_attention() -> LLMAttention:  # layer K's own norm, q/k, RoPE and mask on the states entering it
            own_q, own_k = hf.layer_qk(self._lm.layers[k], hidden)
            (own_cos, own_sin), own_mask = layer_inputs(k)
            own_q, own_k = hf.apply_rope(own_q, own_k, own_cos[:, :p], own_sin[:, :p])
            scale = self._lm.layers[k].self_attn.scaling
            return LLMAttention(own_q, own_k, valid, scale=scale, layer_mask=_seen(own_mask, p))

        ctx = LLMContext(
            layer=k,
            roles=seq.roles[:, :p],
            hidden=hidden,
            attention=LLMAttention(q[:, :, :p], key[:, :, :p], valid, attn.scaling, keys_from_start, _seen(mask, p)),
            position_ids=self.text_positions(seq.pos)[:, :p],
            final_norm=self._lm.norm,
            layer_attention=layer_attention if hf.has_attention(self._lm.layers[k]) else None,
        )
        plan = step(ctx)
        keep = seq.valid.clone()
        keep[:, :p] &= plan.keep
        if plan.hidden is not None:  # merged states for the kept prompt positions, applied before the gather
            merged = torch.where(plan.keep[..., None], plan.hidden, seq.hidden[:, :p])
            seq = replace(seq, hidden=torch.cat([merged, seq.hidden[:, p:]], dim=1))
        # a schedule reports each of its layers under its own prefix (``pyramiddrop@8.keep_count``)
        prefix = step.name if len(step.llm_layers) == 1 else f"{step.name}@{k}"
        diagnostics = {f"{prefix}.{name}": value for name, value in plan.diagnostics.items()}
        keep &= seq.valid
        width, full = packed_width(keep)
        return seq.gather(keep, width), diagnostics, full

    # -- decoding with the pruned cache -------------------------------------------------------------

    def _decode(
        self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None, cache: Any
    ) -> Tensor:
        """New tokens against the pruned cache: each segment gets a mask sized to its own cache.

        ``input_ids`` ``[B, q]`` are the tokens after those the cache holds: one per decoding step, or a later
        turn of a conversation (``q > 1``, see docs/concepts.md, "Conversations"); ``attention_mask``, if given,
        covers the unpruned history and the new tokens (``[B, seen + q]``), as in HF.
        """
        session = self._session(cache)
        b, q = input_ids.shape
        if b != session.batch:
            raise UnsupportedModelError(f"batch size changed from {session.batch} to {b} while decoding")
        check_mask_width(session, attention_mask, q)
        device = input_ids.device
        new_valid = torch.ones(b, q, dtype=torch.bool, device=device)
        if attention_mask is not None:
            new_valid = attention_mask[:, -q:].bool()
        position_ids = self.decode_positions(position_ids, session.seen, b, q, device)
        if q > 1:  # a later turn: its first token must follow the cached ones (a stale offset would shift it)
            check_positions_follow(session, self.text_positions(position_ids), new_valid)
            check_no_visual_tokens(input_ids, self.visual_placeholders())
            self.check_later_turn(new_valid)
            if hf.has_sliding_layers(cache) and not bool(new_valid.all()):
                raise UnsupportedModelError(
                    "a later turn with padding among its new tokens (a batch of turns of different lengths) on a "
                    "cache with sliding-window layers: such a layer keeps its last sliding_window - 1 entries, "
                    "padding included, so a padded sample would see fewer of its own tokens than alone; pass "
                    "cache=DynamicCache() (no config: every layer keeps every key, tokprune applies the windows), "
                    "or give the samples' turns equal lengths"
                )
        hidden = self._lm.embed_tokens(input_ids)
        starts = {seg.start: seg for seg in session.segments}
        # Whether the new tokens are all valid: one read per step, and only while some segment's mask
        # could still be dropped (a segment with padding needs its mask anyway).
        new_all = attention_mask is None or (any(seg.all_valid for seg in session.segments) and bool(new_valid.all()))
        inputs: dict[str, tuple[tuple[Tensor, Tensor], Any]] = {}  # the segment's, per attention kind
        for i, layer in enumerate(self._lm.layers):
            if i in starts:
                seg = starts[i]
                seg.mask = torch.cat([seg.mask, new_valid], dim=1)
                seg.all_valid = seg.all_valid and new_all
                pos = position_ids - seg.shift.view(-1, *[1] * (position_ids.dim() - 1))
                if seg.positions is not None:
                    seg.positions = torch.cat([seg.positions, self.text_positions(pos)], dim=1)
                inputs = {}
            kind = self.layer_attention(i)
            if kind not in inputs:
                keys = LayerKeys(seg.mask, seg.positions, q, seg.all_valid)
                inputs[kind] = (self.layer_rotary(kind, hidden, pos), self.layer_mask_from(kind, keys, hidden.dtype))
            embeddings, mask = inputs[kind]
            held = hf.held_keys(cache, i, seg.mask.shape[1], q)
            if mask is not None and held < mask.shape[-1]:  # a sliding-window cache layer returns only its last keys
                mask = mask[..., -held:]
            hidden = hf.call_decoder_layer(
                layer,
                hidden,
                mask=mask,
                position_ids=self.text_positions(pos),
                position_embeddings=embeddings,
                cache=cache,
            )
        session.extend(input_ids, new_valid, self.text_positions(position_ids))
        return self._lm.norm(hidden)

    def _session(self, cache: Any) -> _Session:
        """The session of a cache this adapter's prefill filled; a clear error for any other cache."""
        session = self._sessions.get(cache)
        if session is None:
            raise UnsupportedModelError(
                "past_key_values was not filled by this patched model's prefill (a cache from another model, from "
                "another tokprune.patch of this one, or from the unpatched model); a pruned cache can only be "
                "continued by the patch that pruned it: run the whole conversation with an empty cache (a copy of "
                "a pruned cache is known to the patch only when made by handle.copy_cache(cache), not copy.deepcopy)"
            )
        return session

    def visual_placeholders(self) -> list[int]:
        """The token ids that stand for visual tokens in a prompt (the image's, and the video's where the
        family takes videos): a later turn on a pruned cache may bring none of them."""
        video = self.model_parts.video_token_id
        return [self._image_token_id] + ([video] if video is not None else [])

    def copy_cache(self, cache: Any) -> Any:
        """A copy of a cache this patch filled, which the patch continues like the original: to branch a
        conversation (two later turns from one history). ``copy.deepcopy(cache)`` copies the tensors but not
        what the patch knows about them (each layer's kept positions, the unpruned history), so the patch
        refuses to continue such a copy."""
        copied = copy.deepcopy(cache)
        self._sessions[copied] = self._session(cache).copy()
        return copied


def _seen(mask: Tensor | None, p: int) -> Tensor | None:
    """A layer's attention mask (``[B, 1, L, L]``, boolean or additive; None: causal + padding) as bool ``[B, p, p]``
    over the first ``p`` positions (the prompt's), what :class:`~tokprune.strategy.LLMAttention` reads."""
    if mask is None:
        return None
    seen = mask[:, 0, :p, :p]
    return seen if seen.dtype == torch.bool else seen == 0
