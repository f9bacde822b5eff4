"""`tokprune run` on a checkpoint of each family tokprune ships (a tiny one saved with its tokenizer, processor
and chat template), a few questions, two pipelines each; and the error a checkpoint no registered family prunes
gets (naming the families that work)."""

from __future__ import annotations

import json

import pytest

from tokprune import hf_compat as hf
from tokprune.ablation import runner
from tokprune.ablation.config import ConfigError, load_config
from tokprune.adapters import adapter_registry
from tokprune.testing import checkpoints, family_checkpoints

#: family -> (checkpoint saver, a vision step it runs: Qwen's and the SigLIP towers have no CLS, the decoder
#: layer FastV prunes before: Qwen3.5's layer 0 is linear attention, no scores to read); every registered family (test below)
FAMILIES = {
    "llava": (checkpoints.save_tiny_llava, "topk(keep_ratio=0.5)", 1),
    "qwen2_5_vl": (checkpoints.save_tiny_qwen2_5_vl, "random(keep_ratio=0.5)", 1),
    "qwen3_vl": (checkpoints.save_tiny_qwen3_vl, "random(keep_ratio=0.5)", 1),
    "llava_next": (checkpoints.save_tiny_llava_next, "topk(keep_ratio=0.5)", 1),
    "smolvlm": (checkpoints.save_tiny_smolvlm, "random(keep_ratio=0.5)", 1),
    "qwen3_5": (family_checkpoints.save_tiny_qwen3_5, "random(keep_ratio=0.5)", 2),
    "qwen3_5_moe": (family_checkpoints.save_tiny_qwen3_5_moe, "random(keep_ratio=0.5)", 2),
    "llava_onevision": (family_checkpoints.save_tiny_llava_onevision, "random(keep_ratio=0.5)", 1),
    "gemma3": (family_checkpoints.save_tiny_gemma3, "random(keep_ratio=0.5)", 1),
    "internvl": (family_checkpoints.save_tiny_internvl, "topk(keep_ratio=0.5)", 1),
}


def _saved(tmp_path_factory, family: str) -> str:
    cls = adapter_registry()[family].cls
    if hf.older_than(cls.min_transformers):
        pytest.skip(f"{family} is tested from transformers {cls.min_transformers}")
    if family == "smolvlm":
        pytest.importorskip("num2words", reason="transformers' SmolVLM processor needs num2words (the test extra)")
    save = FAMILIES[family][0]
    return str(save(tmp_path_factory.mktemp(family)))


def _study(model: str, out, *extra: str):
    base = [f"model={model}", f"output_dir={out}", "limit=3", "batch_size=2", "device=cpu", "budget.targets=[]",
            "sweep={}", "plot=false", "max_new_tokens=2"]  # fmt: skip
    return load_config(None, [*base, *extra])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_tiny_study_runs_on_each_familys_checkpoint(tmp_path_factory, tmp_path, family):
    model = _saved(tmp_path_factory, family)
    _, spec, layer = FAMILIES[family]
    cfg = _study(model, tmp_path, f"strategies=[{spec}, {spec}+fastv(layer={layer}, keep_ratio=0.5)]")
    rows = runner.run_ablation(cfg, progress=False, echo=None).rows
    assert [r["role"] for r in rows] == ["baseline", "unmatched", "unmatched"]
    assert all(r["versions"]["adapter"]["name"] == family for r in rows[1:])
    base, vision, both = (r["metrics"] for r in rows)
    assert base["flops_rel"] == pytest.approx(1.0) and vision["visual_kept_mean"] < base["visual_kept_mean"]
    assert both["flops_rel"] < vision["flops_rel"] < 1
    for row in rows:
        assert row["metrics"]["n"] == 3 and len(row["predictions"]) == 3
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in written] == [r["key"] for r in rows]
    assert (tmp_path / "summary.md").is_file()


def test_every_family_tokprune_ships_has_a_checkpoint_study_above():
    """Driven by the registry: a family added to tokprune.adapters without a tiny saved checkpoint here fails,
    by name (plugin families registered elsewhere are theirs to test)."""
    shipped = {name for name, info in adapter_registry().items() if info.cls.__module__.startswith("tokprune.")}
    assert not shipped - set(FAMILIES), f"families without a saved-checkpoint study: {sorted(shipped - set(FAMILIES))}"


def test_a_checkpoint_no_family_prunes_is_refused_naming_the_families(tmp_path_factory, tmp_path, monkeypatch):
    # An image-text checkpoint whose family is not registered: SmolVLM's, with SmolVLM made to refuse it.
    model = _saved(tmp_path_factory, "smolvlm")
    smolvlm = adapter_registry()["smolvlm"].cls
    monkeypatch.setattr(smolvlm, "mismatch", classmethod(lambda cls, m: "pretend this family is not installed"))
    with pytest.raises(ConfigError) as caught:
        runner.run_ablation(_study(model, tmp_path, "strategies=[none]"), progress=False, echo=None)
    text = str(caught.value)
    assert "SmolVLMForConditionalGeneration" in text and "no registered family prunes" in text
    for name in adapter_registry():
        assert f"{name} (" in text


def test_a_text_only_checkpoint_is_refused_naming_the_families(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(folder)  # fmt: skip
    checkpoints.train_bpe_tokenizer(("<pad>",)).save_pretrained(folder)
    with pytest.raises(ConfigError) as caught:
        runner.run_ablation(_study(str(folder), tmp_path / "out", "strategies=[none]"), progress=False, echo=None)
    text = str(caught.value)
    assert "not an image-text-to-text checkpoint" in text and "The families that work: " in text and "llava (" in text
