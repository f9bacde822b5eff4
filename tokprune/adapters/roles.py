"""Token roles from the model's own chat template and tokenizer, not from prompt strings.

The roles (see :func:`._seq.token_roles`) need one thing a prompt does not say: where the question ends
and the template resumes (LLaVA-1.5's ``ASSISTANT:``, Qwen's ``<|im_end|>\\n<|im_start|>assistant\\n``).
We read it from the chat template: render one user turn whose text is a sentinel, tokenize the
rendering with offsets, and take the tokens that start after the sentinel: the *generation suffix*.
In a prompt, its last occurrence after the last image starts the trailing TEMPLATE span, which no
strategy drops unless it declares ``drops_template``.

Where it comes from, first match wins (:func:`resolve_marker`):

1. ``question_end`` as token ids: an explicit override;
2. ``question_end`` as a processor or tokenizer: the suffix of its chat template (a tokenizer without
   one: the ids of ``"ASSISTANT:"``, the LLaVA-1.5 layout);
3. nothing given: the tokenizer saved with the model (``from_pretrained``'s directory or the local hub
   cache; never downloaded), its chat template's suffix;
4. otherwise None: the question runs to the last prompt token (only that token is protected).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .. import hf_compat as hf
from ..errors import StrategyParamError

__all__ = ["ASSISTANT_MARKER", "resolve_marker", "template_marker"]

#: The LLaVA-1.5 assistant marker, for tokenizers without a chat template.
ASSISTANT_MARKER = "ASSISTANT:"
#: Stand-in question text; any word the tokenizer keeps apart from the template works.
_SENTINEL = "tokprunesentinel"


def template_marker(owner: Any) -> list[int] | None:
    """The token ids of ``owner``'s chat-template generation suffix, or None without a usable template.

    ``owner`` is a processor (its ``tokenizer`` tokenizes) or a tokenizer. A token straddling the end of
    the sentinel belongs to the question, so only tokens starting at or after it count.
    """
    tokenizer = getattr(owner, "tokenizer", owner)
    rendered = hf.chat_template_text(owner, _SENTINEL)
    if rendered is None and tokenizer is not owner:
        rendered = hf.chat_template_text(tokenizer, _SENTINEL)
    if rendered is None or _SENTINEL not in rendered:
        return None
    end = rendered.rindex(_SENTINEL) + len(_SENTINEL)
    try:
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return None
    suffix = [int(i) for i, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]) if start >= end]
    return suffix or None


def resolve_marker(question_end: Sequence[int] | Any | None, model: nn.Module) -> list[int] | None:
    """The assistant-marker ids for the roles (see the module docstring for the order)."""
    if question_end is None:
        tokenizer = hf.model_tokenizer(model)
        return template_marker(tokenizer) if tokenizer is not None else None
    tokenizer = getattr(question_end, "tokenizer", question_end)
    if hasattr(tokenizer, "encode"):
        found = template_marker(question_end)
        if found is not None:
            return found
        ids = tokenizer.encode(ASSISTANT_MARKER, add_special_tokens=False)
        if not ids:
            raise StrategyParamError(f"the tokenizer encodes {ASSISTANT_MARKER!r} to no tokens and has no chat template")
        return [int(i) for i in ids]
    if isinstance(question_end, (str, bytes)) or not isinstance(question_end, Sequence):
        raise StrategyParamError(
            "question_end must be a sequence of token ids (the assistant marker) or a tokenizer/processor; "
            f"got {type(question_end).__name__}"
        )
    ids = [int(i) for i in question_end]
    if not ids:
        raise StrategyParamError("question_end is empty; pass the assistant marker's token ids or None")
    return ids
