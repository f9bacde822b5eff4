"""tokprune.hf_compat: every transformers contact point, on whichever layout the installed release has."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import re
import warnings

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokprune
from tokprune import hf_compat as hf
from tokprune.adapters.llava_next import check_anyres
from tokprune.adapters.qwen2_5_vl import check_mrope
from tokprune.adapters.qwen2_5_vl import output_class as qwen25_output
from tokprune.adapters.qwen3_vl import check_deepstack
from tokprune.adapters.qwen3_vl import output_class as qwen3_output
from tokprune.errors import InputError, UnsupportedModelError
from tokprune.testing.models import tiny_llava


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(seed=0)


# -- pure pieces --------------------------------------------------------------------------------------


def _loop_mask(valid: torch.Tensor, q: int) -> torch.Tensor:
    b, k = valid.shape
    out = torch.zeros(b, 1, q, k, dtype=torch.bool)
    for bi in range(b):
        for i in range(q):
            for j in range(k):
                out[bi, 0, i, j] = bool(valid[bi, j]) and j <= k - q + i
    return out


@pytest.mark.parametrize("q", [1, 3, 7])
def test_attention_mask_is_causal_and_padding_aware(q):
    valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    expected = _loop_mask(valid, q)
    assert torch.equal(hf.attention_mask(valid, q, torch.float32, "sdpa"), expected)
    eager = hf.attention_mask(valid, q, torch.bfloat16, "eager")
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager == 0, expected)
    assert bool((eager[~expected] == torch.finfo(torch.bfloat16).min).all())


def test_attention_mask_skips_when_only_causality_masks():
    full = torch.ones(2, 5, dtype=torch.bool)
    assert hf.attention_mask(full, 5, torch.float32, "sdpa") is None  # sdpa's causal kernel
    assert hf.attention_mask(full, 1, torch.float32, "sdpa") is None  # one query sees every key
    assert hf.attention_mask(full, 2, torch.float32, "sdpa") is not None  # two new queries: causal between them
    assert hf.attention_mask(full, 5, torch.float32, "eager") is not None  # eager has no causal kernel


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attention_mask_equals_transformers_own(tiny, implementation):
    from transformers.masking_utils import create_causal_mask

    model, _ = tiny
    config = model.config.text_config
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
        embeds = torch.zeros(2, 5, config.hidden_size)
        # Spelled as the installed release wants it: the signature changed four times in 5.x.
        params = inspect.signature(create_causal_mask).parameters
        kwargs = {"inputs_embeds" if "inputs_embeds" in params else "input_embeds": embeds}
        kwargs[hf.cache_keyword(create_causal_mask)] = None
        if "cache_position" in params:
            kwargs["cache_position"] = torch.arange(5)
        theirs = create_causal_mask(config=config, attention_mask=valid, **kwargs)
    finally:
        config._attn_implementation = previous
    ours = hf.attention_mask(valid, 5, torch.float32, implementation)
    assert torch.equal(ours, theirs)


def test_apply_rope_equals_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    cos, sin = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    for ours, theirs in zip(hf.apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_cache_from_kwargs_takes_either_spelling_and_refuses_both():
    cache = object()
    assert hf.cache_from_kwargs({"cache": cache}) is cache
    assert hf.cache_from_kwargs({"past_key_values": cache}) is cache
    assert hf.cache_from_kwargs({"cache": None, "past_key_values": cache}) is cache
    assert hf.cache_from_kwargs({}) is None
    with pytest.raises(ValueError, match="both cache= and past_key_values="):
        hf.cache_from_kwargs({"cache": cache, "past_key_values": object()})


def test_model_output_fills_the_old_layout():
    @dataclasses.dataclass
    class OldLayout:  # transformers <= 5.23: past_key_values + image_hidden_states (packed projected features)
        last_hidden_state: torch.Tensor
        past_key_values: object = None
        image_hidden_states: torch.Tensor | None = None

    per_image = [torch.ones(3, 4), torch.zeros(2, 4)]
    encoded = hf.BaseModelOutputWithPooling(pooler_output=per_image)
    cache, hidden = object(), torch.randn(1, 2, 4)
    out = hf.model_output(OldLayout, last_hidden_state=hidden, cache=cache, image_features=encoded)
    assert out.past_key_values is cache and out.last_hidden_state is hidden
    assert torch.equal(out.image_hidden_states, torch.cat(per_image))
    assert (
        hf.model_output(OldLayout, last_hidden_state=hidden, cache=None, image_features=None).image_hidden_states
        is None
    )


def test_model_output_fills_the_new_layout():
    @dataclasses.dataclass
    class NewLayout:  # transformers >= 5.24: cache + image_outputs (the encoder output itself)
        last_hidden_state: torch.Tensor
        cache: object = None
        image_outputs: object = None

    encoded = hf.BaseModelOutputWithPooling(pooler_output=[torch.ones(3, 4)])
    out = hf.model_output(NewLayout, last_hidden_state=torch.zeros(1), cache="c", image_features=encoded)
    assert out.cache == "c" and out.image_outputs is encoded


def test_declared_range_is_the_tested_range():
    requirements = importlib.metadata.requires("tokprune") or []
    declared = [r for r in requirements if r.replace(" ", "").startswith("transformers") and "extra" not in r]
    assert len(declared) == 1, declared
    bounds = set(declared[0].replace(" ", "").removeprefix("transformers").split(","))
    assert bounds == set(hf.TESTED_RANGE.split(",")), (declared, hf.TESTED_RANGE)


def test_installed_transformers_is_in_the_tested_range_or_the_canary():
    # Outside the range only on CI's canary leg, which sets TOKPRUNE_CANARY=1 and never fails the build.
    import os

    if os.environ.get("TOKPRUNE_CANARY"):
        pytest.skip("canary leg: the newest transformers, ignoring our cap")
    assert hf.in_tested_range(), (hf.transformers_version(), hf.TESTED_RANGE)


# -- the patched model --------------------------------------------------------------------------------


def test_pruned_output_carries_the_kept_image_features(tiny):
    model, make_inputs = tiny
    inputs = make_inputs((5, 3))
    with tokprune.pruned(model, "topk(keep=5)") as run, torch.no_grad():
        out = model.model(**inputs)
        keep = model.model.get_image_features(pixel_values=inputs["pixel_values"]).keep  # deterministic
    kept = run.stats.visual_kept.tolist()
    assert keep.sum(dim=1).tolist() == kept == [5, 5]
    with torch.no_grad():  # unpatched again: every patch's projected feature
        full = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert [f.shape[0] for f in full] == [model.config.image_seq_length] * 2
    expected = [f[k] for f, k in zip(full, keep)]  # the kept patches' own features, in raster order
    fields = {f.name for f in dataclasses.fields(out)}
    if "image_outputs" in fields:  # transformers >= 5.24: the encoder output, one entry per image
        assert torch.equal(out.image_outputs.keep, keep)
        for got, want in zip(out.image_outputs.pooler_output, expected, strict=True):
            torch.testing.assert_close(got, want)
    else:  # older: the packed features the LLM saw
        torch.testing.assert_close(out.image_hidden_states, torch.cat(expected))


@pytest.mark.parametrize("keyword", hf.CACHE_KEYWORDS)
def test_generate_reads_a_filled_cache_under_either_keyword(tiny, keyword):
    # a filled cache is a conversation's history (tests/test_conversations.py): the same prompt again brings
    # no new token, which is refused, whichever keyword carried the cache
    model, make_inputs = tiny
    inputs = make_inputs()
    with tokprune.pruned(model, "fastv") as run, torch.no_grad():
        cache = hf.output_cache(model(**inputs, use_cache=True))
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() > 0
        with pytest.raises(InputError, match="the pruned cache already holds"):
            model.generate(**inputs, max_new_tokens=2, **{keyword: cache})
        assert run.active


@pytest.mark.parametrize("keyword", hf.CACHE_KEYWORDS)
def test_decoding_step_reads_the_cache_under_either_keyword(tiny, keyword):
    """A decoding step must extend the pruned cache (a missed keyword would silently re-run a prefill)."""
    model, make_inputs = tiny
    inputs = make_inputs((5, 3))
    n = inputs["input_ids"].shape[1]
    with tokprune.pruned(model, "topk(keep=6)+fastv(keep_ratio=0.5)"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old spelling is deprecated on new releases
        # Reference: generate without a cache re-runs the sequence, deciding on the prompt positions only.
        ref = model.generate(
            **inputs, max_new_tokens=2, use_cache=False, output_logits=True, return_dict_in_generate=True
        )
        cache = hf.output_cache(model(**inputs, use_cache=True))
        seen = cache.get_seq_length()
        step = ref.sequences[:, n : n + 1]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
        logits = model(input_ids=step, attention_mask=mask, **{keyword: cache}).logits
        assert cache.get_seq_length() == seen + 1  # appended to, not rebuilt
    torch.testing.assert_close(logits[:, -1], ref.logits[1], rtol=1e-4, atol=1e-4)


# -- refusing what is missing ----------------------------------------------------------------------------


def test_patch_refuses_a_decoder_layer_without_a_cache_keyword(tiny, monkeypatch):
    model, _ = tiny
    layer_cls = type(model.model.language_model.layers[0])

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None):
        raise AssertionError("never called")

    monkeypatch.setattr(layer_cls, "forward", forward)
    hf._decoder_features.cache_clear()
    try:
        with pytest.raises(UnsupportedModelError) as info:
            tokprune.patch(model, "fastv")
    finally:
        monkeypatch.undo()
        hf._decoder_features.cache_clear()
    message = str(info.value)
    assert "cache keyword" in message and hf.transformers_version() in message and hf.TESTED_RANGE in message
    assert tokprune.adapters.handle_of(model) is None  # nothing was touched
    assert "forward" not in model.model.__dict__


def test_patch_refuses_an_output_without_an_image_field(tiny, monkeypatch):
    @dataclasses.dataclass
    class Stripped:
        last_hidden_state: torch.Tensor
        cache: object = None

    model, _ = tiny
    import tokprune.adapters.llava as llava_family

    monkeypatch.setattr(llava_family, "output_class", lambda: Stripped)
    with pytest.raises(UnsupportedModelError, match=r"Stripped with a cache field .* and an image field"):
        tokprune.patch(model, "fastv")
    assert tokprune.adapters.handle_of(model) is None


def test_patch_warns_outside_the_tested_range(tiny, monkeypatch):
    model, _ = tiny
    monkeypatch.setattr(hf, "transformers_version", lambda: "99.1.0")
    with pytest.warns(hf.UntestedTransformersWarning, match="99.1.0 is outside"):
        handle = tokprune.patch(model, "fastv")
    handle.remove()


def test_model_tokenizer_and_chat_template_are_read_locally():
    from transformers import LlavaForConditionalGeneration

    import tokprune.models
    from tokprune.testing.models import tiny_llava

    built, _ = tiny_llava(seed=0)
    assert hf.model_tokenizer(built) is None  # built from a config: nothing saved, nothing downloaded
    model = LlavaForConditionalGeneration.from_pretrained(tokprune.models.path("tiny-llava-shapes"))
    tokenizer = hf.model_tokenizer(model)
    assert tokenizer is not None and tokenizer.encode("ASSISTANT:", add_special_tokens=False)
    rendered = hf.chat_template_text(tokenizer, "what?")
    assert rendered is not None and rendered.index("<image>") < rendered.index("what?") < rendered.index("ASSISTANT:")
    assert hf.chat_template_text(object(), "what?") is None


def test_family_features_are_detected_and_refused_by_name():
    class Inner(torch.nn.Module):
        def pack_image_features(self, image_features, image_sizes):  # no image_newline
            return image_features

        def get_rope_index(self, input_ids):  # no mm_token_type_ids / image_grid_thw
            return input_ids

        def get_image_features(self, pixel_values) -> BaseModelOutputWithPooling:  # no deepstack_features
            return BaseModelOutputWithPooling()

    with pytest.raises(UnsupportedModelError, match=r"Inner\.pack_image_features\(.*image_newline\).*tested with"):
        check_anyres(Inner())
    with pytest.raises(UnsupportedModelError, match=r"Inner\.get_rope_index\(.*mm_token_type_ids.*tested with"):
        check_mrope(Inner(), torch.nn.Module())  # the signature is checked before the rotary probe
    assert qwen25_output().__name__.endswith("OutputWithPast")
    assert qwen3_output().__name__.endswith("OutputWithPast")
    with pytest.raises(UnsupportedModelError, match=r"Inner\.get_image_features returning .*deepstack_features"):
        check_deepstack(Inner())
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    check_deepstack(Qwen3VLModel.__new__(Qwen3VLModel))  # the stock one declares them (no weights built)


def test_attention_mask_trusts_the_callers_all_valid():
    # The adapter decides "no padding" once per segment; the mask builder then reads nothing back.
    full = torch.ones(2, 5, dtype=torch.bool)
    assert hf.attention_mask(full, 1, torch.float32, "sdpa", all_valid=True) is None
    assert torch.equal(hf.attention_mask(full, 1, torch.float32, "sdpa", all_valid=False), _loop_mask(full, 1))


def test_production_code_never_imports_the_test_kit():
    """tokprune.testing builds on the adapters, never the other way round (one import direction)."""
    import ast
    from pathlib import Path

    package = Path(tokprune.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if "testing" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                if "testing" in module.split("."):
                    offenders.append(f"{path.relative_to(package)}:{node.lineno} {module}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(package)}:{node.lineno}" for a in node.names if ".testing" in a.name]
    assert offenders == []


def test_hf_compat_holds_only_what_every_family_shares():
    """Family contact points live with their family (adapter, transformers contact points, tiny builder)."""
    from tokprune.adapters import registered_adapters

    family_words = ("llava", "qwen", "anyres", "mrope", "deepstack", "clip", "vision_transformer")
    public = [name for name in dir(hf) if not name.startswith("_")]
    assert [name for name in public if any(word in name.lower() for word in family_words)] == []
    for cls, _ in registered_adapters():
        module = importlib.import_module(cls.__module__)
        assert callable(getattr(cls, "tiny", None)) and module.__name__.startswith("tokprune.adapters.")


def test_tokprune_adapters_reports_whether_the_installed_release_is_tested(capsys, monkeypatch):
    from tokprune import cli

    monkeypatch.setattr(hf, "transformers_version", lambda: "5.25.0")  # the newest release tested
    assert cli.main(["adapters"]) == 0
    assert re.search(r"^llava .*>= 5\.6\.0: yes, tested ", capsys.readouterr().out, re.M)
    monkeypatch.setattr(hf, "transformers_version", lambda: hf.TESTED_MAX + ".0")  # the first one not tested
    assert cli.main(["adapters"]) == 0
    assert re.search(rf"^llava .*: yes, untested \({re.escape(hf.TESTED_MAX)}\.0\)", capsys.readouterr().out, re.M)
