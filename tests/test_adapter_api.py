"""tokprune.patch / unpatch / pruned on HF LLaVA: reversibility, isolation, validation errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, LlamaConfig, LlamaForCausalLM, StaticCache

import tokprune
from tokprune import Pipeline
from tokprune import hf_compat as hf
from tokprune.adapters import ModelAdapter, handle_of, registered_adapters
from tokprune.adapters.llava import LlavaAdapter, vision_transformer
from tokprune.errors import InputError, MissingCapabilityError, StrategyParamError, UnsupportedModelError
from tokprune.testing.equivalence import ProbeLastRow, ProbeVisionTopK, check_keep_all_identity
from tokprune.testing.models import VOCAB, tiny_llava, tiny_llava_config


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(seed=0)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _patched_attributes(model) -> list[str]:
    """Instance attributes a patch sets, and the forward hooks on q/k projections (HF adds its own elsewhere)."""
    found = [name for name in ("forward", "get_image_features") if name in model.model.__dict__]
    found += ["generate"] if "generate" in model.__dict__ else []
    found += [name for name, m in model.named_modules() if name.endswith(("q_proj", "k_proj")) and m._forward_hooks]
    return found


def test_builtin_adapter_is_registered_through_the_plugin_hook():
    adapters = registered_adapters()
    assert (LlavaAdapter, "builtin_families") in [(cls, source.name) for cls, source in adapters]
    assert all(issubclass(cls, ModelAdapter) for cls, _ in adapters)


@pytest.mark.parametrize(
    "spec",
    [
        Pipeline([ProbeVisionTopK(keep_ratio=1.0), ProbeLastRow(layer=2, keep_ratio=1.0)]),
        "topk(keep_ratio=1.0)+fastv(keep_ratio=1.0)",
        "none",
    ],
    ids=["probes", "topk+fastv", "none"],
)
def test_keep_everything_equals_unpatched_and_remove_restores(spec):
    check_keep_all_identity(spec)


def test_remove_leaves_no_trace(tiny):
    model, make_inputs = tiny
    inputs = make_inputs()
    before = _logits(model, inputs)
    with tokprune.pruned(model, "topk+fastv") as run:
        assert run.active and handle_of(model) is run
        assert _patched_attributes(model)
        pruned_logits = _logits(model, inputs)
    assert not run.active and handle_of(model) is None
    assert _patched_attributes(model) == []
    assert torch.equal(_logits(model, inputs), before)
    assert not torch.allclose(pruned_logits[:, -1], before[:, -1])
    run.remove()  # idempotent


def test_patch_is_per_instance():
    a, make_inputs = tiny_llava(seed=0)
    b, _ = tiny_llava(seed=0)
    inputs = make_inputs()
    reference = _logits(b, inputs)
    with tokprune.pruned(a, "topk(keep_ratio=0.25)"):
        assert _patched_attributes(b) == []
        assert torch.equal(_logits(b, inputs), reference)
        assert not torch.allclose(_logits(a, inputs)[:, -1], reference[:, -1])


def test_context_manager_removes_on_error(tiny):
    model, _ = tiny
    with pytest.raises(KeyError), tokprune.pruned(model, "fastv"):
        raise KeyError("boom")
    assert handle_of(model) is None


def test_patching_twice_is_an_error(tiny):
    model, _ = tiny
    with tokprune.pruned(model, "fastv"):
        with pytest.raises(RuntimeError, match=r"already patched with 'fastv\(.*handle.remove\(\)"):
            tokprune.patch(model, "topk")
    tokprune.patch(model, "topk").remove()
    tokprune.unpatch(model)  # no-op when not patched


def test_unsupported_model_names_what_is_expected():
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(UnsupportedModelError, match="expected a LlavaForConditionalGeneration, got LlamaForCausalLM"):
        tokprune.patch(llama, "fastv")


def test_cls_strategy_on_a_tower_feeding_cls_is_refused():
    config = tiny_llava_config()
    config.vision_feature_select_strategy = "full"
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config).eval()
    with pytest.raises(MissingCapabilityError, match="vision_feature_select_strategy='full'"):
        tokprune.patch(model, "cls_knee")
    tokprune.patch(model, "fastv").remove()  # LLM-stage strategies need no CLS
    assert handle_of(model) is None


@pytest.mark.parametrize("layer", [0, 4, 9])
def test_llm_layer_out_of_range(tiny, layer):
    model, _ = tiny
    spec = f"fastv(layer={layer})"
    error = StrategyParamError if layer else StrategyParamError  # layer=0 fails in the params, others at patch
    with pytest.raises(error, match=r"1\.\.3|>= 1"):
        tokprune.patch(model, spec)
    assert handle_of(model) is None and _patched_attributes(model) == []


def test_encoder_signal_out_of_range(tiny):
    # A built-in reading an encoder layer: the README's install has no example plugins (issue 23).
    model, _ = tiny
    with pytest.raises(StrategyParamError, match="out of range for 8 layers"):
        tokprune.patch(model, "cls_knee(layer=-20)")


def test_unsupported_attention_implementation():
    model, _ = tiny_llava(seed=0)
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='flex_attention'.*sdpa"):
        tokprune.patch(model, "fastv")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 2}, "generation mode 'beam_search'"),
        ({"num_beams": 2, "do_sample": True}, "generation mode 'beam_sample'"),
        ({"cache_implementation": "static"}, "cache_implementation='static'"),
        ({"prompt_lookup_num_tokens": 2}, "generation mode 'assisted_generation'"),
        ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions"),
    ],
)
def test_unsupported_generation_modes_fail_clearly(tiny, kwargs, message):
    model, make_inputs = tiny
    with tokprune.pruned(model, "fastv"), pytest.raises(UnsupportedModelError, match=message):
        model.generate(**make_inputs(), max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("spec", ["cls_knee+text_interact", "random(keep=5)+fastv", "prumerge_plus"])
def test_num_return_sequences_equals_the_prompts_repeated(tiny, spec):
    # Pruned image features do not fit generate()'s own expansion of pre-encoded images, so the adapter
    # repeats the inputs itself: same sequences, same order, same sampling draws as a repeated batch.
    model, make_inputs = tiny
    inputs = make_inputs()
    repeated = {k: v.repeat_interleave(3, dim=0) for k, v in inputs.items()}
    with tokprune.pruned(model, spec) as run:
        torch.manual_seed(3)
        got = model.generate(**inputs, do_sample=True, top_k=0, num_return_sequences=3, max_new_tokens=6)
        assert run.stats.visual_kept.shape == (6,)  # one row per returned sequence
        torch.manual_seed(3)
        expected = model.generate(**repeated, do_sample=True, top_k=0, max_new_tokens=6)
    assert torch.equal(got, expected)
    torch.manual_seed(3)
    with tokprune.pruned(model, spec):
        config = GenerationConfig(do_sample=True, top_k=0, num_return_sequences=3, max_new_tokens=6)
        assert torch.equal(model.generate(**inputs, generation_config=config), expected)
        assert config.num_return_sequences == 3  # the caller's object is not modified


def test_num_return_sequences_keep_all_equals_unpatched(tiny):
    model, make_inputs = tiny
    inputs = make_inputs()
    torch.manual_seed(0)
    expected = model.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=5)
    with tokprune.pruned(model, "topk(keep_ratio=1.0)+fastv(keep_ratio=1.0)"):
        torch.manual_seed(0)
        got = model.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=5)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("keyword", hf.CACHE_KEYWORDS)
def test_static_cache_passed_in_is_refused(tiny, keyword):
    model, make_inputs = tiny
    inputs = make_inputs()
    cache = StaticCache(config=model.config.text_config, max_cache_len=128)
    with tokprune.pruned(model, "fastv"), pytest.raises(UnsupportedModelError, match="StaticCache"):
        model.generate(**inputs, max_new_tokens=2, **{keyword: cache})


def test_decoding_with_a_foreign_cache_is_refused(tiny):
    model, make_inputs = tiny
    inputs = make_inputs()
    keyword = hf.cache_keyword(type(model).forward)  # the installed release's spelling
    with torch.no_grad():
        cache = hf.output_cache(model(**inputs, use_cache=True))  # unpatched prefill
        assert isinstance(cache, DynamicCache)
        with tokprune.pruned(model, "fastv"), pytest.raises(UnsupportedModelError, match="not filled by this"):
            model(input_ids=inputs["input_ids"][:, -1:], **{keyword: cache})


def test_right_padding_is_refused(tiny):
    model, make_inputs = tiny
    inputs = make_inputs((5, 2))
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    with tokprune.pruned(model, "fastv"), pytest.raises(InputError, match="left padding"):
        _logits(model, inputs)


def test_generate_returns_the_prompt_first_and_logits_keep_their_shape(tiny):
    model, make_inputs = tiny
    inputs = make_inputs()
    with tokprune.pruned(model, "topk(keep_ratio=0.25)+fastv", question_end=VOCAB.assistant_marker):
        out = model.generate(**inputs, max_new_tokens=3, pad_token_id=VOCAB.pad)
        logits = _logits(model, inputs)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :n], inputs["input_ids"]) and out.shape[1] == n + 3
    assert logits.shape == (*inputs["input_ids"].shape, VOCAB.size)


def test_question_end_accepts_a_tokenizer(tiny):
    class Tok:
        def encode(self, text, add_special_tokens=False):
            assert text == "ASSISTANT:"
            return VOCAB.assistant_marker

    model, _ = tiny
    with tokprune.pruned(model, "fastv", question_end=Tok()) as run:
        assert run._marker == VOCAB.assistant_marker
    with pytest.raises(StrategyParamError, match="question_end"):
        tokprune.patch(model, "fastv", question_end=3.5)
    with pytest.raises(StrategyParamError, match="llm_positions must be one of: keep, compact"):
        tokprune.patch(model, "fastv", llm_positions="renumber")


def test_concurrent_calls_on_one_handle_do_not_share_state(tiny):
    # Per-call state is passed down (hooks find their call through a context variable, per thread):
    # two threads generating on one patched model each get what they get alone.
    import threading

    model, make_inputs = tiny
    inputs = [make_inputs((5, 2), seeds=(0, 1)), make_inputs((8,), seeds=(2,))]
    spec = Pipeline([ProbeVisionTopK(ragged=True), ProbeLastRow(layer=2, ragged=True)])
    with tokprune.pruned(model, spec, question_end=VOCAB.assistant_marker):
        alone = [model.generate(**x, max_new_tokens=4, use_cache=c) for x, c in zip(inputs, (True, False))]
        results: list = [None, None]
        barrier = threading.Barrier(2)

        def work(i: int) -> None:
            barrier.wait()
            for _ in range(3):
                results[i] = model.generate(**inputs[i], max_new_tokens=4, use_cache=(i == 0))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for got, expected in zip(results, alone):
        assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("family", "working"),
    [("llava", "divprune, downsample, random"), ("llava_next", "divprune, random")],  # downsample needs one grid
    ids=["llava", "llava_next"],
)
def test_cls_strategies_on_a_tower_without_cls_are_refused_naming_what_works(family, working):
    from tokprune.testing.models import tiny_llava_next

    model, _ = tiny_llava(seed=0) if family == "llava" else tiny_llava_next(seed=0)
    vision_transformer(model.model.vision_tower).embeddings.class_embedding = None  # a tower without CLS
    with pytest.raises(MissingCapabilityError, match=rf"reads the CLS token's signals \(qk@-1\).*no CLS token; .*: {working} \("):
        tokprune.patch(model, "topk")
    assert handle_of(model) is None
    tokprune.patch(model, "random+fastv").remove()  # no CLS signal read: accepted
    tokprune.patch(model, "cdpruner(relevance=uniform)" if family == "llava" else "random").remove()


def test_the_cls_free_probe_passes_the_strategy_contract():
    from tokprune.testing.contract import check_strategy
    from tokprune.testing.equivalence import ProbeVisionNorm

    check_strategy(ProbeVisionNorm(ragged=True, extra=1))
