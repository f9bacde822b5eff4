"""The lmms-eval model ``tokprune_llava``, offline: its request handler on a llava-hf checkpoint.

lmms-eval itself is optional and heavy; these tests drive the wrapper with duck-typed requests. The tests
marked ``lmms_eval`` run only where lmms-eval is importable (they resolve the model through lmms-eval's
own registry and answer its ``Instance`` objects).
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import tokprune
from tokprune.errors import UnknownStrategyError
from tokprune.integrations import lmms_eval as wrapper
from tokprune.integrations.lmms_eval import Request, TokpruneLlavaCore

SPEC = "cls_knee+text_interact"
UNTIL = {"until": ["</s>", "\n"], "max_new_tokens": 5}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The embedded trained model when it is there, else a random-weight checkpoint of the same layout."""
    from tokprune import models

    shipped = models.path()
    if (shipped / "config.json").exists():
        return str(shipped)
    from transformers import LlavaForConditionalGeneration

    from tokprune.models import build

    folder = tmp_path_factory.mktemp("tiny-llava-random")
    tokenizer = build.build_tokenizer()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build.llava_config(build.Sizes(), tokenizer)).eval()
    model.generation_config = build.generation_config(tokenizer)
    model.save_pretrained(folder)
    build.build_processor(tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def samples():
    from tokprune.data import world

    return world.generate_samples(5, seed=4321)  # questions of different lengths: ragged padding


def requests_for(model: TokpruneLlavaCore, samples, gen_kwargs=UNTIL, task="shapes") -> list[Request]:
    model.task_dict = {task: {"test": dict(enumerate(samples))}}
    return [
        Request((s.question, dict(gen_kwargs), lambda doc: [doc.image], i, task, "test")) for i, s in enumerate(samples)
    ]


def direct_answers(checkpoint: str, spec: str, samples, max_new_tokens: int) -> list[str]:
    """Each sample alone through ``model.generate`` of an independently loaded and patched model."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokprune.data import world

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    tok = processor.tokenizer
    answers = []
    with tokprune.pruned(model, spec, question_end=processor), torch.no_grad():
        for s in samples:
            inputs = processor(text=[world.build_prompt(s.question)], images=[s.image], return_tensors="pt")
            out = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            answers.append(text.split("\n")[0].strip())
    return answers


def test_the_module_imports_without_lmms_eval():
    code = (
        "import sys; sys.modules['lmms_eval'] = None\n"  # makes `import lmms_eval` raise ImportError
        "import tokprune.integrations.lmms_eval as m\n"
        "assert m.TokpruneLlava is m.TokpruneLlavaCore\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_chat_prompt_is_llava_15s(checkpoint):
    model = TokpruneLlavaCore(pretrained=checkpoint, device="cpu")
    assert model.build_prompt("what color is the circle ?", 1) == "USER: <image>\nwhat color is the circle ? ASSISTANT:"
    assert model.build_prompt("<image>\nhow many ?", 1) == "USER: <image>\nhow many ? ASSISTANT:"


@pytest.mark.parametrize("spec", [SPEC, "none"])
def test_generate_until_with_batch_size_2_equals_direct_generate(checkpoint, samples, spec):
    model = TokpruneLlavaCore(pretrained=checkpoint, strategy=spec, batch_size=2, device="cpu")
    answers = model.generate_until(requests_for(model, samples))
    assert answers == direct_answers(checkpoint, spec, samples, UNTIL["max_new_tokens"])
    solo = TokpruneLlavaCore(pretrained=checkpoint, strategy=spec, batch_size=1, device="cpu")
    assert solo.generate_until(requests_for(solo, samples)) == answers


def test_the_pruning_log_reports_each_requests_budget(checkpoint, samples):
    model = TokpruneLlavaCore(pretrained=checkpoint, strategy="topk(keep=20)", batch_size=2, device="cpu")
    model.generate_until(requests_for(model, samples))
    assert sorted(entry["doc_id"] for entry in model.pruning_log) == list(range(len(samples)))
    assert {entry["visual_kept"] for entry in model.pruning_log} == {20}
    assert all(entry["visual_total"] > 20 for entry in model.pruning_log)


def test_generation_settings_split_batches_and_results_keep_request_order(checkpoint, samples):
    model = TokpruneLlavaCore(pretrained=checkpoint, strategy=SPEC, batch_size=4, device="cpu")
    mixed = requests_for(model, samples)
    mixed[1] = Request((samples[1].question, {"max_new_tokens": 1}, *mixed[1].args[2:]))
    answers = model.generate_until(mixed)
    reference = model.generate_until(requests_for(model, samples))
    assert [a for i, a in enumerate(answers) if i != 1] == [a for i, a in enumerate(reference) if i != 1]
    assert len(answers[1].split()) <= 1


def test_model_args_are_checked_before_loading(checkpoint):
    with pytest.raises(UnknownStrategyError, match="cls_kne"):
        TokpruneLlavaCore(pretrained="/nonexistent", strategy="cls_kne")
    with pytest.raises(TypeError, match="unknown model_args \\['strategie'\\]"):
        TokpruneLlavaCore(pretrained=checkpoint, strategie="fastv")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        TokpruneLlavaCore(pretrained=checkpoint, batch_size="auto")
    quoted = TokpruneLlavaCore(pretrained=checkpoint, strategy='"fastv(layer=2, keep_ratio=0.5)"', device="cpu")
    assert str(quoted.pipeline) == "fastv(layer=2, keep_ratio=0.5, keep=none, query=last)"


def test_loglikelihood_and_non_image_inputs_fail_clearly(checkpoint, samples):
    model = TokpruneLlavaCore(pretrained=checkpoint, device="cpu")
    with pytest.raises(NotImplementedError, match="generate_until tasks only"):
        model.loglikelihood([])
    model.task_dict = {"video": {"test": {0: "clip.mp4"}}}
    with pytest.raises(NotImplementedError, match="image tasks"):
        model.generate_until([Request(("q", {}, lambda doc: [doc], 0, "video", "test"))])


# -- the lmms-eval glue, against a stand-in lmms_eval package --------------------------------------------


@pytest.fixture
def fake_lmms_eval(monkeypatch):
    """Just enough of lmms-eval 0.7's modules: the ``lmms`` base class and the v2 model registry."""
    import abc
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None

    class Registry:
        def __init__(self):
            self.manifests = {}

        def register_manifest(self, manifest, overwrite=False):
            self.manifests[manifest.model_id] = manifest

    class lmms(abc.ABC):  # noqa: N801 - lmms-eval's name
        def __init__(self):
            self._rank, self._world_size, self.task_dict = 0, 1, {}
            self.cache_hook = types.SimpleNamespace(calls=[], add_partial=lambda *a: self.cache_hook.calls.append(a))

        @abc.abstractmethod
        def generate_until(self, requests): ...

    modules = {
        "lmms_eval": types.ModuleType("lmms_eval"),
        "lmms_eval.api": types.ModuleType("lmms_eval.api"),
        "lmms_eval.api.model": types.SimpleNamespace(lmms=lmms),
        "lmms_eval.models": types.SimpleNamespace(MODEL_REGISTRY_V2=Registry(), AVAILABLE_MODELS={}),
        "lmms_eval.models.registry_v2": types.SimpleNamespace(ModelManifest=ModelManifest),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


def test_with_lmms_eval_the_class_is_an_lmms_and_registers(fake_lmms_eval, checkpoint, samples):
    cls = wrapper.TokpruneLlava
    assert issubclass(cls, fake_lmms_eval["lmms_eval.api.model"].lmms) and issubclass(cls, TokpruneLlavaCore)
    assert f"{cls.__module__}.{cls.__qualname__}" == wrapper.CLASS_PATH
    assert wrapper.lmms_eval_manifest().simple_class_path == wrapper.CLASS_PATH
    wrapper.register_with_lmms_eval()
    registry = fake_lmms_eval["lmms_eval.models"].MODEL_REGISTRY_V2
    assert registry.manifests["tokprune_llava"].simple_class_path == wrapper.CLASS_PATH
    model = cls(pretrained=checkpoint, strategy=SPEC, batch_size=2, device="cpu")
    answers = model.generate_until(requests_for(model, samples[:2]))
    assert sorted(call[2] for call in model.cache_hook.calls) == sorted(answers)  # lmms-eval's cache is fed


def test_the_class_follows_the_installed_lmms_eval(fake_lmms_eval, monkeypatch):
    """A class built on one lmms-eval is never handed to another: the real registry refuses a class not derived
    from its own ``lmms`` (CI's leg l met that when a class built on the stand-in was cached for the process)."""
    first = wrapper.TokpruneLlava
    assert wrapper.TokpruneLlava is first  # built once per lmms-eval

    class other_lmms(fake_lmms_eval["lmms_eval.api.model"].lmms):  # noqa: N801 - another install's base class
        pass

    monkeypatch.setitem(sys.modules, "lmms_eval.api.model", types.SimpleNamespace(lmms=other_lmms))
    second = wrapper.TokpruneLlava
    assert issubclass(second, other_lmms) and second is not first
    monkeypatch.setitem(sys.modules, "lmms_eval.api.model", None)  # lmms-eval gone: the plain core
    assert wrapper.TokpruneLlava is TokpruneLlavaCore


def test_the_lmms_eval_entry_point_is_declared_and_installed():
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["lmms_eval.models"]
    assert declared == {"tokprune_llava": "tokprune.integrations.lmms_eval:lmms_eval_manifest"}
    assert "tokprune.integrations" in pyproject["tool"]["setuptools"]["packages"]
    installed = {ep.name: ep.value for ep in md.entry_points(group="lmms_eval.models")}
    if "tokprune_llava" not in installed:
        pytest.skip("tokprune's installed metadata predates the entry point: reinstall (pip install -e .)")
    assert installed["tokprune_llava"] == declared["tokprune_llava"]


# -- with the real lmms-eval, where it is installed ---------------------------------------------------------


def test_real_lmms_eval_resolves_and_runs_tokprune_llava(checkpoint, samples):
    pytest.importorskip("lmms_eval.models")
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    cls = get_model("tokprune_llava")
    model = cls.create_from_arg_string(
        f"pretrained={checkpoint},strategy={SPEC}", {"batch_size": 2, "device": "cpu", "max_batch_size": None}
    )
    model.task_dict = {"shapes": {"test": dict(enumerate(samples))}}
    instances = [
        Instance(
            "generate_until",
            (s.question, dict(UNTIL), lambda doc: [doc.image], i, "shapes", "test"),
            idx=0,
            metadata={"task": "shapes", "doc_id": i, "repeats": 1},
        )
        for i, s in enumerate(samples)
    ]
    results = model.generate_until(instances)  # GenerationResults: text plus the budget in token_counts
    texts = [getattr(r, "text", r) for r in results]
    assert texts == direct_answers(checkpoint, SPEC, samples, UNTIL["max_new_tokens"])
    if hasattr(results[0], "token_counts"):
        budgets = [r.token_counts.to_dict() for r in results]
        logged = {e["doc_id"]: e["visual_kept"] for e in model.pruning_log}  # batches run sorted by length
        assert [b["visual_kept"] for b in budgets] == [logged[i] for i in range(len(samples))]
        assert all(b["visual_kept"] < b["visual_total"] and b["output_tokens"] >= 1 for b in budgets)


# -- lmms-eval swallowing errors ---------------------------------------------------------------------------


def test_main_fails_loudly_when_lmms_eval_logs_an_error_and_returns(fake_lmms_eval):
    import logging

    def cli():  # what lmms-eval 0.7 does with filelock 4.x: log the error, return normally (exit 0)
        logging.getLogger("lmms-eval").error("Error during evaluation: module 'filelock' has no attribute '_api'")
        return {"results": {}}

    with pytest.raises(wrapper.LmmsEvalFailedError, match=r"logged 1 error.*filelock"):
        wrapper.main([], cli=cli)


def test_main_fails_loudly_when_the_model_was_never_asked(fake_lmms_eval):
    with pytest.raises(wrapper.LmmsEvalFailedError, match="without asking tokprune_llava for a single answer"):
        wrapper.main([], cli=lambda: {"results": {}})


def test_main_returns_lmms_evals_result_when_it_answered(fake_lmms_eval, checkpoint, samples):
    def cli():
        model = wrapper.TokpruneLlava(pretrained=checkpoint, strategy="none", batch_size=2, device="cpu")
        return model.generate_until(requests_for(model, samples[:2]))

    answers = [getattr(a, "text", a) for a in wrapper.main([], cli=cli)]
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)


def test_real_lmms_eval_cli_offline_equals_tokprune_run_and_logs_the_budget(tmp_path):
    """lmms-eval's own CLI on the embedded benchmark as a local task: same answers as `tokprune run`."""
    pytest.importorskip("lmms_eval.models")
    import json
    import os

    n, spec = 6, "cls_knee+text_interact"
    task = wrapper.write_shapes_task(tmp_path / "task", split="test", n=n, max_new_tokens=3)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf")  # datasets' cache of the local JSONL stays in the test's folder
    lmms_out = tmp_path / "lmms"
    args = [sys.executable, "-m", "tokprune.integrations.lmms_eval", "--model", "tokprune_llava"]
    args += ["--model_args", f"strategy={spec}", "--include_path", str(tmp_path / "task"), "--tasks", task]
    args += ["--batch_size", "4", "--device", "cpu", "--log_samples", "--output_path", str(lmms_out)]
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (samples_file,) = lmms_out.rglob(f"*samples_{task}.jsonl")
    logged = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda r: r["doc_id"])
    assert len(logged) == n

    run_out = tmp_path / "run"
    args = [sys.executable, "-m", "tokprune", "run", f"strategies=[{spec}]", "baseline=false", "budget.targets=[]"]
    args += [f"limit={n}", "dataset.split=test", "max_new_tokens=3", "plot=false", f"output_dir={run_out}"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = [json.loads(line) for line in (run_out / "results.jsonl").read_text().splitlines()]
    expected = sorted(row["predictions"], key=lambda p: p["index"])

    assert [r["filtered_resps"].strip() for r in logged] == [p["prediction"].strip() for p in expected]
    for r, p in zip(logged, expected):
        (counts,) = r["token_counts"]
        for key in ("visual_total", "visual_kept", "visual_after_vision", "tokens_layer_avg", "visual_layer_avg"):
            assert counts[key] == p[key], (key, counts, p)
        assert counts["flops_ratio"] == pytest.approx(p["flops_ratio"], rel=1e-6)
        assert counts["input_tokens"] == p["seq_len"]


# -- other families: any registered family's checkpoint, its own chat template ------------------------------


#: a vision cut and an LLM cut every family runs (Qwen's and the SigLIP towers have no CLS), before decoder layer 1,
#: or 2 where layer 0 is linear attention and has no scores to read (Qwen3.5's)
FAMILY_LAYER = {"qwen3_5": 2, "qwen3_5_moe": 2}


def family_spec(family: str) -> str:
    return f"random(keep_ratio=0.5)+fastv(layer={FAMILY_LAYER.get(family, 1)}, keep_ratio=0.5)"


#: what each family's own chat template renders around one image and the question
FAMILY_MARKER = {
    "llava_next": "USER: <image>\nhow many ?",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>how many ?",
    "qwen3_5": "<|vision_start|><|image_pad|><|vision_end|>how many ?",
    "qwen3_5_moe": "<|vision_start|><|image_pad|><|vision_end|>how many ?",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>how many ?",
    "smolvlm": "User:<image>how many ?",
    "llava_onevision": "<|im_start|>user\n<image>\nhow many ?",
    "gemma3": "<start_of_turn>user\n<start_of_image>how many ?",
    "internvl": "<|im_start|>user\n<IMG_CONTEXT>\nhow many ?",
}


@pytest.fixture(scope="module", params=list(FAMILY_MARKER))
def family_checkpoint(request, tmp_path_factory) -> tuple[str, str]:
    """A tiny saved checkpoint of the family, with its tokenizer, processor and chat template."""
    from tokprune import hf_compat as hf
    from tokprune.adapters import adapter_registry
    from tokprune.loading import torchvision_imports
    from tokprune.testing import checkpoints, family_checkpoints

    family = request.param
    cls = adapter_registry()[family].cls
    if hf.older_than(cls.min_transformers):
        pytest.skip(f"{family} is tested from transformers {cls.min_transformers}")
    if family == "smolvlm":
        pytest.importorskip("num2words", reason="transformers' SmolVLM processor needs num2words (the test extra)")
        if hf.older_than("5.24.0") and not torchvision_imports():
            pytest.skip("transformers before 5.24 builds no image processor without torchvision (AutoImageProcessor "
                        "needs it), so SmolVLM's processor cannot load here (docs/index.md)")  # fmt: skip
    name = f"save_tiny_{family}"
    save = getattr(checkpoints, name, None) or getattr(family_checkpoints, name)
    return family, str(save(tmp_path_factory.mktemp(family)))


def test_other_families_load_prompt_with_their_template_and_prune(family_checkpoint, samples):
    family, path = family_checkpoint
    model = TokpruneLlavaCore(pretrained=path, strategy=family_spec(family), batch_size=2, device="cpu")
    assert model.handle.name == family and model.pipeline is model.handle.pipeline
    prompt = model.build_prompt("<image>\nhow many ?", 1)
    assert FAMILY_MARKER[family] in prompt and prompt.count("<image>") <= 1
    answers = model.generate_until(requests_for(model, samples))
    assert len(answers) == len(samples) and all(isinstance(a, str) for a in answers)
    log = sorted(model.pruning_log, key=lambda e: e["doc_id"])
    assert all(0 < e["visual_after_vision"] < e["visual_total"] for e in log)  # one image each, half kept
    assert all(0 < e["flops_ratio"] < 1 and e["visual_kept"] < e["visual_after_vision"] for e in log)
    # batch == solo through the wrapper, for this family too
    solo = TokpruneLlavaCore(pretrained=path, strategy=family_spec(family), batch_size=1, device="cpu")
    assert solo.generate_until(requests_for(solo, samples)) == answers


def test_a_checkpoint_no_family_prunes_is_refused_by_the_wrapper(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokprune.errors import UnsupportedModelError

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"The families that work: .*llava \("):
        TokpruneLlavaCore(pretrained=str(tmp_path), device="cpu")
