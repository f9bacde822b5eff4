"""Integrations with other tools. Each module imports its tool lazily: ``tokprune`` never depends on them.

* :mod:`tokprune.integrations.lmms_eval`: the ``tokprune_llava`` model for lmms-eval (``pip install
  tokprune[lmms]``): any registered pipeline on a checkpoint of any registered family, batched; an offline
  task from the embedded benchmark; ``python -m tokprune.integrations.lmms_eval``, which fails loudly where
  lmms-eval would log an error and exit 0.
* :mod:`tokprune.integrations.vllm_plugin`: tokprune inside vLLM (the ``vllm.general_plugins`` entry point):
  fixed-budget vision-stage specs per request or engine-wide, on Qwen2.5-VL, Qwen3-VL, LLaVA-1.5 and
  LLaVA-NeXT (docs/serving.md). Its ``PIECES`` lists every vLLM name tokprune touches, checked at engine
  start; each family's classes live in :mod:`tokprune.integrations.vllm_families`.
* :mod:`tokprune.integrations.cpu_torchvision`: the CPU recipe's step that makes PyPI's CUDA torchvision
  importable beside a CPU torch (``python -m tokprune.integrations.cpu_torchvision install``).
"""
