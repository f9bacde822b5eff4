"""tokprune.loading without torchvision: a processor that carries a video processor (Qwen-VL, SmolVLM) is
built without it, turns images and text into the inputs the model expects, and refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tokprune.errors import UnsupportedModelError
from tokprune.loading import chat_prompt, load_processor, torchvision_imports
from tokprune.testing.checkpoints import save_tiny_qwen2_5_vl

pytestmark = pytest.mark.skipif(torchvision_imports(), reason="torchvision imports here: the full processor loads")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load_processor(save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen")))


def test_the_images_only_processor_expands_each_images_placeholder_to_its_grid(qwen):
    assert type(qwen).__name__ == "Qwen2_5_VLProcessor" and qwen.video_processor is None
    images = [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (48, 32), "blue")]  # 4x4 and 4x6 merged tokens
    prompts = [chat_prompt(qwen, "what color ?", 1), chat_prompt(qwen, "how many ?", 1)]
    qwen.tokenizer.padding_side = "left"
    out = qwen(text=prompts, images=[[im] for im in images], return_tensors="pt", padding=True)
    pad = qwen.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_image = (out["image_grid_thw"].prod(dim=-1) // 4).tolist()
    assert (out["input_ids"] == pad).sum(dim=1).tolist() == per_image == [16, 24]
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(dim=-1).sum())
    assert torch.equal(out["attention_mask"].sum(dim=1), (out["input_ids"] != qwen.tokenizer.pad_token_id).sum(dim=1))


def test_the_images_only_processor_refuses_videos_and_tokenized_chat(qwen):
    with pytest.raises(UnsupportedModelError, match="without its video processor.*torchvision"):
        qwen(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[torch.zeros(4, 3, 32, 32)])
    with pytest.raises(NotImplementedError, match="renders chat text only"):
        qwen.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    rendered = qwen.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
