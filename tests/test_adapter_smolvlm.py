"""The SmolVLM family (docs/adapters.md, "Adding a family"): one row per image although the model's own
image features come per sample, CLS-reading strategies and image splitting refused naming what works,
Idefics3 on the same code path."""

from __future__ import annotations

import pytest
import torch

import tokprune
from tokprune.adapters import ImageFeatures
from tokprune.adapters.smolvlm import SmolVLMAdapter, tiny_smolvlm
from tokprune.errors import InputError, MissingCapabilityError
from tokprune.testing.adapters import CHECKS, TinyCase
from tokprune.testing.models import VOCAB
from tokprune.testing.tokens import check_tokens


@pytest.fixture(scope="module")
def case():
    return SmolVLMAdapter.tiny()


def test_the_stock_features_per_sample_are_cut_into_images(case):
    inputs = case.make_inputs([5, 3], images=2)
    stock = case.model.model.get_image_features(inputs["pixel_values"]).pooler_output
    # one entry per sample from transformers 5.24 (per image before): the family cuts either into images
    assert len(stock) in (2, 4) and sum(entry.shape[0] for entry in stock) == 4 * 16
    with tokprune.pruned(case.model, "none", question_end=case.question_end) as run, torch.no_grad():
        case.model(**inputs)
    assert run.stats.images.tolist() == [2, 2] and run.stats.image_tokens.tolist() == [16] * 4


def test_a_family_reading_the_per_sample_output_as_per_image_is_refused(case):
    class Merged(SmolVLMAdapter):  # the docs' default reading: pooler_output taken as one entry per image
        def stock_features(self, encoded, options):
            return ImageFeatures.unpruned(encoded.pooler_output)

    inputs = case.make_inputs([5, 3], images=2)
    if len(case.model.model.get_image_features(inputs["pixel_values"]).pooler_output) == 4:
        pytest.skip("this transformers returns pooler_output per image: reading it per image is right here")
    with tokprune.pruned(case.model, "none", adapter=Merged, question_end=case.question_end), torch.no_grad():
        with pytest.raises(InputError, match=r"2 of 2 images \(\[32, 32\] tokens\) span placeholder runs"):
            case.model(**inputs)
        case.model(**case.make_inputs([5, 3], images=1))  # one image per sample: nothing to merge


def test_cls_reading_strategies_are_refused_naming_those_that_work(case):
    with pytest.raises(MissingCapabilityError, match=r"^cls_knee reads the CLS token's signals .*smolvlm vision tower "
                       r"has no CLS token; vision strategies that read no CLS signal: .*divprune"):
        tokprune.patch(case.model, "cls_knee", question_end=case.question_end)
    assert tokprune.adapters.handle_of(case.model) is None


def test_image_splitting_is_refused_at_patch(case, monkeypatch):
    from tokprune.adapters import smolvlm

    monkeypatch.setattr(smolvlm.hf, "model_image_processor", lambda model: type("P", (), {"do_image_splitting": True}))
    with pytest.raises(MissingCapabilityError, match=r"do_image_splitting=True.*do_image_splitting=False"):
        tokprune.patch(case.model, "divprune", question_end=case.question_end)
    tokprune.patch(case.model, "fastv", question_end=case.question_end).remove()  # the LLM stage still runs


class Idefics3(SmolVLMAdapter):
    """The family on ``Idefics3ForConditionalGeneration`` (its tiny case only differs)."""

    @classmethod
    def tiny(cls, seed=0, attn_implementation="sdpa"):
        model, make_inputs = tiny_smolvlm(seed=seed, attn_implementation=attn_implementation, idefics3=True)
        return TinyCase(model, make_inputs, pad_token_id=VOCAB.pad, question_end=VOCAB.assistant_marker)


def test_idefics3_is_the_same_code_path():
    model = Idefics3.tiny().model
    assert type(model).__name__ == "Idefics3ForConditionalGeneration" and SmolVLMAdapter.matches(model)
    check_tokens(Idefics3)
    for name in ("keep_all", "batch_solo"):
        CHECKS[name](Idefics3)
