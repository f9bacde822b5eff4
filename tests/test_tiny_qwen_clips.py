"""The shipped tiny Qwen2.5-VL of the clip world: name resolution, offline loading with plain transformers,
held-out accuracy on clips (seconds), the chat template, keeping frames matters, and the training entry
point's smoke run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration

from tokprune import models
from tokprune.data import clips
from tokprune.models import build_qwen, evaluate_video, train_video

NAME = "tiny-qwen2.5-vl-clips"


@pytest.fixture(scope="module")
def ckpt():
    return models.path(NAME)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def model(ckpt):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def held_out():
    return clips.clip_benchmark("test", 80)


def test_the_checkpoint_is_complete_small_and_fp16_on_disk(ckpt):
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "preprocessor_config.json", "MODEL_CARD.md"):
        assert (ckpt / f).is_file(), f
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < 8 * 2**20
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as fh:
        assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}


def test_loads_as_stock_qwen2_5_vl_in_float32(model, tokenizer):
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and model.dtype == torch.float32
    v = model.config.vision_config
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size) == (clips.PATCH, clips.TEMPORAL_PATCH, clips.MERGE)
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and tokenizer.padding_side == "left"
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_chat_template_renders_the_prompt_before_expansion(tokenizer):
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "which shape appeared last ?"}]}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == build_qwen.build_prompt("which shape appeared last ?", tokens=1)


def test_the_image_processor_config_reproduces_our_pixels(ckpt):
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(ckpt)
    sample = clips.image_sample(0, 0)
    torch.testing.assert_close(proc(images=sample.frames, return_tensors="pt")["pixel_values"],
                               clips.clip_pixels(sample)[0], atol=1e-5, rtol=0)


def test_held_out_accuracy_is_far_above_chance_and_generate_agrees(model, tokenizer, held_out):
    acc = evaluate_video.accuracy(model, tokenizer, held_out)
    # Chance is 25% (motion, frames), 33% (appear), 20% (change), 26% overall; the card reports 400 clips.
    assert acc["overall"] > 0.4 and acc["change"] > 0.6, acc
    batch = held_out[:16]
    inputs = build_qwen.model_inputs(tokenizer, batch)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    generated = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    first = evaluate_video.first_token_answers(tokenizer, evaluate_video.masked_forward(model, inputs))
    assert [g.split()[0] for g in generated] == first


def test_masking_nothing_is_the_stock_forward(model, tokenizer, held_out):
    inputs = build_qwen.model_inputs(tokenizer, held_out[:6])
    with torch.no_grad():
        stock = model(**inputs).logits
        masked = evaluate_video.masked_forward(model, inputs, torch.ones(6, clips.TOKENS_PER_CLIP, dtype=torch.bool))
    torch.testing.assert_close(masked, stock, atol=1e-4, rtol=1e-4)


def test_which_frames_are_kept_matters(model, tokenizer, held_out):
    # Every question's answer changes after the first frame: the first frame alone must fall well below all frames.
    full = evaluate_video.accuracy(model, tokenizer, held_out)["overall"]
    first = evaluate_video.accuracy(model, tokenizer, held_out, evaluate_video.keep_frame(0))["overall"]
    assert first < full - 0.2, (first, full)


def test_loads_and_answers_offline_from_a_fresh_process():
    code = textwrap.dedent("""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        import tokprune.models
        from tokprune.data import clips
        from tokprune.models.build_qwen import model_inputs

        path = tokprune.models.path("tiny-qwen2.5-vl-clips")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
        clip = clips.clip_benchmark("test", 4)[3]
        inputs = model_inputs(tokenizer, [clip])
        out = model.generate(**inputs, max_new_tokens=3)
        print(clip.question, tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), sep="|")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    question, answer = res.stdout.strip().splitlines()[-1].split("|")
    assert question.endswith("?") and answer.strip()


def test_training_entry_point_smoke(tmp_path):
    metrics = train_video.main(["--out", str(tmp_path / "ckpt"), "--smoke"])
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and "shipped_val" in metrics
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert loaded.dtype == torch.float32
