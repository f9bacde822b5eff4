"""The shipped tiny LLaVA: name resolution, offline loading in the llava-hf format, real accuracy,
attention implementations, left-padded batches, and a smoke run of the training entry point."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlamaModel,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tokprune import data, models
from tokprune.data import world
from tokprune.models import diagnostics, train

NAME = "tiny-llava-shapes"


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return models.path(NAME)


@pytest.fixture(scope="module")
def processor(ckpt):
    return AutoProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def model(ckpt):
    return LlavaForConditionalGeneration.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def held_out():
    return data.benchmark("test", n=100)


def _generate(model, processor, samples, **kw):
    enc = processor(text=[data.build_prompt(s.question) for s in samples], images=[s.image for s in samples],
                    return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False, **kw)
    return processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _accuracy(samples, predictions):
    return sum(data.score_answer(p, s) for s, p in zip(samples, predictions)) / len(samples)


def test_path_resolves_the_shipped_directory(ckpt):
    assert ckpt.is_dir() and ckpt.name == NAME
    assert models.path() == ckpt
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
              "chat_template.jinja", "generation_config.json", "MODEL_CARD.md"):
        assert (ckpt / f).is_file(), f
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < 20 * 2**20


def test_unknown_name_is_a_keyerror_naming_the_valid_ones():
    with pytest.raises(KeyError) as info:
        models.path("llava-1.5-7b")
    assert isinstance(info.value, models.UnknownModelError)
    assert NAME in str(info.value) and "llava-1.5-7b" in str(info.value)


def test_processor_is_llava_format(processor):
    assert isinstance(processor, LlavaProcessor)
    assert isinstance(processor.tokenizer, PreTrainedTokenizerFast)
    assert processor.tokenizer.padding_side == "left"
    s = data.benchmark("test", n=1)[0]
    enc = processor(text=data.build_prompt(s.question), images=s.image, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((enc["input_ids"] == image_id).sum()) == world.NUM_PATCHES
    assert enc["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert enc["pixel_values"].shape == (1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    # The image processor is a plain normalisation at model size: no crop, no resampling artefacts.
    assert torch.allclose(enc["pixel_values"], diagnostics.pixel_values_of([s]), atol=1e-6)
    # No question word maps to <unk>.
    assert processor.tokenizer.unk_token_id not in enc["input_ids"][0].tolist()


def test_chat_template_matches_the_llava15_prompt(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a red circle ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == data.build_prompt("is there a red circle ?")


def test_model_is_llava_hf_architecture(model):
    cfg = model.config
    assert isinstance(model.model.vision_tower, CLIPVisionModel)
    assert isinstance(model.model.language_model, LlamaModel)
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert model.model.vision_tower.embeddings.class_embedding.shape == (cfg.vision_config.hidden_size,)
    assert cfg.vision_config.image_size // cfg.vision_config.patch_size == world.GRID
    assert model.dtype == torch.float32  # stored as fp16, loaded as fp32 for CPU use


def test_loads_and_answers_offline_from_a_fresh_process(ckpt):
    # The README snippet, verbatim in spirit, with the hub switched off.
    code = textwrap.dedent("""
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        import tokprune.data, tokprune.models

        path = tokprune.models.path("tiny-llava-shapes")
        processor = AutoProcessor.from_pretrained(path)
        model = LlavaForConditionalGeneration.from_pretrained(path)
        sample = tokprune.data.benchmark("test", n=8)[2]
        inputs = processor(images=sample.image, text=tokprune.data.build_prompt(sample.question), return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=3)
        answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(sample.question, answer, sample.answer, sep="|")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    question, answer, truth = res.stdout.strip().splitlines()[-1].split("|")
    assert question.endswith("?") and answer.strip() == truth


def test_trained_model_beats_a_floor_random_weights_cannot(model, processor, held_out):
    # The shipped model scores ~97% (issue 4's target is 85%); random weights emit arbitrary words
    # (~0%) and the language prior alone (no image tokens) reaches ~31% on the full benchmark.
    acc = _accuracy(held_out, _generate(model, processor, held_out))
    random_model = LlavaForConditionalGeneration(model.config).eval()
    random_acc = _accuracy(held_out, _generate(random_model, processor, held_out))
    assert acc > 0.85, acc
    assert random_acc < 0.3, random_acc


def test_eager_and_sdpa_agree(ckpt, model, processor, held_out):
    eager = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    samples = held_out[:16]
    assert _generate(eager, processor, samples) == _generate(model, processor, samples)


def test_left_padded_batch_matches_single_items(model, processor, held_out):
    # Mixed question lengths force left padding inside the batch.
    samples = [held_out[i] for i in (0, 1, 2, 3, 5, 7)]
    assert len({len(s.question.split()) for s in samples}) > 1
    batched = _generate(model, processor, samples)
    single = [_generate(model, processor, [s])[0] for s in samples]
    assert batched == single


@pytest.fixture(scope="module")
def pruning(model, processor, held_out):
    return diagnostics.pruning_report(model, processor, held_out, keep=0.22)


def test_image_matters_and_top_cls_patches_keep_accuracy(pruning):
    full = pruning["full"]["overall"]
    assert pruning["none"]["overall"] < full - 0.15  # the answers do depend on the image
    assert pruning["top"]["overall"] >= 0.9 * full
    assert pruning["bottom"]["overall"] < pruning["top"]["overall"]


def test_pruning_is_discriminative(pruning):
    # Which patches are kept matters (issue 4): on the full test split top-22% keeps 92% of the accuracy,
    # a random 22% 72%.
    assert pruning["top"]["overall"] > pruning["random"]["overall"] + 0.1


def test_training_smoke_run_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    train.main(["--out", str(out), "--smoke"])
    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.hidden_size == train.build.SMOKE_SIZES.lm_hidden
    samples = data.benchmark("test", n=2)
    preds = _generate(model, processor, samples)
    assert len(preds) == 2


def test_training_conversations_supervise_only_the_answers():
    tokenizer = train.build.build_tokenizer()
    samples = train.vqa_samples(seed=5, step=0, batch=3, turns=4, describe=True)
    batch = train.vqa_batch(tokenizer, samples)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for b, s in enumerate(samples):
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        real = batch["attention_mask"][b].bool()
        assert int((ids == image_id).sum()) == world.NUM_PATCHES
        # The first turn is token for token the inference prompt (left padding aside).
        prompt = tokenizer(data.build_prompt(s.question).replace("<image>", "<image>" * world.NUM_PATCHES))["input_ids"]
        assert ids[real][:len(prompt)].tolist() == prompt
        supervised = tokenizer.decode(labels[labels != -100])
        answers = [a for _, a, _ in s.dialogue]
        assert supervised.split() == " </s> ".join(answers + [""]).split()
        assert s.dialogue[-1] == (world.CAPTION_REQUEST, s.caption, "caption")  # the caption turn comes last
        assert all(q != world.CAPTION_REQUEST for q, _, _ in s.dialogue[:-1])
    assert tokenizer.unk_token_id not in batch["input_ids"].flatten().tolist()


def test_background_masking_hides_only_background_image_tokens():
    tokenizer = train.build.build_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    samples = train.vqa_samples(seed=6, step=0, batch=64, turns=2)
    batch = train.vqa_batch(tokenizer, samples)
    is_image = batch["input_ids"] == image_id
    mask = train.mask_background(batch, samples, image_id, prob=0.5, gen=torch.Generator().manual_seed(0))
    assert torch.equal(mask[~is_image], batch["attention_mask"][~is_image])  # text and padding untouched
    kept = mask[is_image].view(len(samples), world.NUM_PATCHES).bool()
    objects = torch.stack([s.object_mask for s in samples])
    assert kept[objects].all()  # an object patch is never hidden
    hidden_rows = (~kept).any(dim=1)
    assert 0.3 < hidden_rows.float().mean() < 0.7  # about half the conversations lose some background
    assert (~kept).sum() > 0.1 * (~objects).sum()
    off = train.mask_background(batch, samples, image_id, prob=0.0, gen=torch.Generator().manual_seed(0))
    assert torch.equal(off, batch["attention_mask"])


@pytest.mark.parametrize("argv, message", [(["--turns", "0"], "--turns must be >= 1, got 0"),
                                           (["--drop-background", "1.5"], r"in \[0, 1\], got 1.5")])
def test_training_rejects_bad_recipe_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", *argv])
    assert re.search(message, capsys.readouterr().err)
    with pytest.raises(ValueError, match="turns must be >= 1"):
        world.make_dialogue(0, 0, turns=0)
