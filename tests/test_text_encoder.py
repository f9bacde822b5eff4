"""The CLIP text tower instruction-conditioned strategies read: given as an object or a path, refused clearly."""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune.errors import MissingCapabilityError
from tokprune.testing.models import VOCAB, tiny_llava, tiny_text_encoder
from tokprune.text_encoder import ClipTextEncoder, image_questions, resolve_text_encoder


def test_a_saved_clip_model_loads_by_path_and_embeds_what_the_object_does(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    encoder = tiny_text_encoder()
    config = CLIPConfig(
        text_config=encoder.text_model.config.to_dict(),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=encoder.text_model.config.projection_dim,
    )
    clip = CLIPModel(config).eval()
    clip.text_model.load_state_dict(encoder.text_model.text_model.state_dict())
    clip.text_projection.load_state_dict(encoder.text_model.text_projection.state_dict())
    clip.visual_projection.load_state_dict(encoder.visual_projection.state_dict())
    clip.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    loaded = resolve_text_encoder(tmp_path)
    texts = ["w7 w8", " ".join(["w9"] * 30)]
    with torch.no_grad():
        a, valid_a = encoder.embed_texts(texts)
        b, valid_b = loaded.embed_texts(texts)
    torch.testing.assert_close(a, b)
    assert torch.equal(valid_a, valid_b) and valid_a.sum(dim=1).tolist() == [1, 2]  # 32 tokens: two segments


def test_bad_text_encoders_are_refused_naming_the_choices():
    with pytest.raises(TypeError, match="ClipTextEncoder, the path of a saved CLIP model, or None; got int"):
        resolve_text_encoder(3)
    model, _ = tiny_llava()
    encoder = tiny_text_encoder()
    without_decode = ClipTextEncoder(encoder.text_model, encoder.tokenizer, encoder.visual_projection)
    with pytest.raises(MissingCapabilityError, match="no tokenizer saved with it; give ClipTextEncoder"):
        tokprune.patch(model, "cdpruner", text_encoder=without_decode)
    tokprune.patch(model, "cdpruner(relevance=cls)", text_encoder=without_decode).remove()  # nothing to read


def test_each_image_gets_its_own_samples_question():
    model, make_inputs = tiny_llava()
    inputs = make_inputs((3, 5))
    valid = inputs["attention_mask"].bool()
    texts, image_text = image_questions(
        inputs["input_ids"], valid, VOCAB.image, 64, VOCAB.assistant_marker, lambda ids: " ".join(map(str, ids))
    )
    assert image_text.tolist() == [0, 1]
    for text, row, mask in zip(texts, inputs["input_ids"], valid):
        ids = row[mask].tolist()
        assert text.split() == [str(i) for i in ids[3 + 64 : -2]]  # after <s> USER : <image>*64, before ASSISTANT :


def test_the_diagnostics_say_which_relevance_ran():
    model, make_inputs = tiny_llava()
    inputs = make_inputs((3, 5))
    for encoder, source in ((None, "cls"), (tiny_text_encoder(), "text")):
        with tokprune.pruned(model, "cdpruner", question_end=VOCAB.assistant_marker, text_encoder=encoder) as run:
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=2)
        assert run.stats.diagnostics["cdpruner.relevance_source"] == source
