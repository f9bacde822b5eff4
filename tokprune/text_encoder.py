"""The instruction read through a CLIP text tower, for instruction-conditioned vision strategies.

CDPruner's relevance (``Theia-4869/CDPruner`` at ``9541616c40fcd5625de1cdb8ea6c33c129eb7864``,
``llava/model/multimodal_encoder/clip_encoder.py`` L38-48 and L79-96) compares each patch's CLIP image
embedding with the instruction's CLIP text embeddings:

* text: the question tokenized by CLIP's tokenizer, zero-padded to a multiple of the text tower's
  ``max_position_embeddings`` (77) and cut into segments of that length, each embedded by
  ``CLIPTextModelWithProjection`` (``text_embeds``, one per segment);
* patches: the tower's ``post_layernorm`` and the CLIP ``visual_projection`` applied to the features
  the projector receives (``hidden_states[vision_feature_layer][:, 1:]``).

LLaVA ships neither the text tower nor the visual projection: the user passes them, as a
:class:`ClipTextEncoder` or the path of a saved CLIP model (``tokprune.patch(..., text_encoder=...)``).
The adapter finds each image's question in the prompt (the QUESTION token role) and decodes it with
the language model's tokenizer (or the encoder's ``decode``) before CLIP tokenizes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import PluginError
from .strategy import TextCondition, TokenRole

__all__ = ["ClipTextEncoder", "image_questions", "resolve_text_encoder"]


class ClipTextEncoder:
    """A CLIP text tower, its tokenizer and the matching image projection.

    Args:
        text_model: a ``CLIPTextModelWithProjection`` (its output's ``text_embeds`` are used).
        tokenizer: the CLIP tokenizer (called as ``tokenizer(text=[...])``, returning ``input_ids`` and
            ``attention_mask`` lists).
        visual_projection: the CLIP image projection (``C -> E``) of the vision tower's checkpoint.
        decode: turns the language model's question token ids into text; None: the adapter uses the
            tokenizer saved with the patched model (refused at ``patch()`` when there is none).
    """

    def __init__(
        self,
        text_model: nn.Module,
        tokenizer: Callable[..., dict],
        visual_projection: nn.Module,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.visual_projection = visual_projection
        self.decode = decode
        self.segment = int(text_model.config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, path: str | Path, decode: Callable[[list[int]], str] | None = None) -> ClipTextEncoder:
        """From a saved ``CLIPModel`` (text and vision projections, tokenizer beside it); local files only."""
        from transformers import AutoTokenizer, CLIPModel, CLIPTextModelWithProjection

        clip = CLIPModel.from_pretrained(str(path), local_files_only=True)
        text = CLIPTextModelWithProjection(clip.config.text_config)
        text.text_model.load_state_dict(clip.text_model.state_dict())
        text.text_projection.load_state_dict(clip.text_projection.state_dict())
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(text.eval(), tokenizer, clip.visual_projection, decode)

    @property
    def source(self) -> str:
        return type(self.text_model).__name__

    def embed_texts(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """CLIP text embeddings of each text's segments: ``([Q, M, E], valid bool [Q, M])``.

        Each text is tokenized alone and zero-padded to a multiple of the segment length, as the
        reference does; every segment of every text runs through the text tower in one batch.
        """
        encoded = [self.tokenizer(text=[t]) for t in texts]
        rows, masks, owner = [], [], []
        for q, enc in enumerate(encoded):
            ids, mask = list(enc["input_ids"][0]), list(enc["attention_mask"][0])
            pad = -len(ids) % self.segment
            ids, mask = ids + [0] * pad, mask + [0] * pad
            for start in range(0, len(ids), self.segment):
                rows.append(ids[start : start + self.segment])
                masks.append(mask[start : start + self.segment])
                owner.append(q)
        device = next(self.text_model.parameters()).device
        out = self.text_model(
            input_ids=torch.tensor(rows, device=device), attention_mask=torch.tensor(masks, device=device)
        ).text_embeds
        owner_t = torch.tensor(owner, device=device)
        first = torch.searchsorted(owner_t, owner_t)  # segments of one text are consecutive
        slot = torch.arange(len(owner), device=device) - first
        m = int(slot.max()) + 1 if owner else 1
        embeds = out.new_zeros(len(texts), m, out.shape[-1])
        valid = torch.zeros(len(texts), m, dtype=torch.bool, device=device)
        embeds[owner_t, slot] = out
        valid[owner_t, slot] = True
        return embeds, valid

    def embed_patches(self, features: Tensor, post_layernorm: nn.Module) -> Tensor:
        """Each patch in the joint space, fp32 ``[B, N, E]``: ``visual_projection(post_layernorm(features))``."""
        normed = post_layernorm(features)
        weight = next(self.visual_projection.parameters())
        return self.visual_projection(normed.to(weight.dtype)).float()

    def condition(
        self, features: Tensor, post_layernorm: nn.Module, texts: Sequence[str], image_text: Tensor
    ) -> TextCondition:
        """The :class:`TextCondition` of ``features`` ``[I, N, C]`` whose image ``i`` asks ``texts[image_text[i]]``."""
        embeds, valid = self.embed_texts(texts)
        index = image_text.to(embeds.device)
        return TextCondition(
            patches=self.embed_patches(features, post_layernorm),
            text=embeds[index].float(),
            text_valid=valid[index],
            source=self.source,
        )


def resolve_text_encoder(value: object) -> ClipTextEncoder | None:
    """``patch()``'s ``text_encoder``: None, a :class:`ClipTextEncoder`, or the path of a saved CLIP model."""
    if value is None or isinstance(value, ClipTextEncoder):
        return value
    if isinstance(value, (str, Path)):
        return ClipTextEncoder.from_pretrained(value)
    raise PluginError(
        f"text_encoder must be a tokprune.text_encoder.ClipTextEncoder, the path of a saved CLIP model, or None; "
        f"got {type(value).__name__}"
    )


def image_questions(
    input_ids: Tensor,
    valid: Tensor,
    image_token_id: int,
    tokens_per_image: int,
    marker: Sequence[int] | None,
    decode: Callable[[list[int]], str],
) -> tuple[list[str], Tensor]:
    """Each sample's question as text, and each image's sample: ``(texts [B], image_text long [I])``.

    ``input_ids``/``valid`` ``[B, L]`` are the left-padded prompts; the question is the QUESTION role
    (text after the image, up to the assistant ``marker``), decoded by ``decode``; every image brings
    ``tokens_per_image`` placeholders (LLaVA-1.5's fixed count).
    """
    from .adapters._seq import token_roles

    roles, _ = token_roles(input_ids, valid, image_token_id, marker)
    question = (roles == int(TokenRole.QUESTION)) | (roles == int(TokenRole.PROTECTED)) & (marker is None)
    texts = [decode(row[mask].tolist()).strip() for row, mask in zip(input_ids, question)]
    images = ((input_ids == image_token_id) & valid).sum(dim=1) // tokens_per_image
    return texts, torch.repeat_interleave(torch.arange(len(texts), device=input_ids.device), images)
