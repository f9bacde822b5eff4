"""Integrations with other tools. Each module imports its tool lazily: ``tokprune`` never depends on them.

* :mod:`tokprune.integrations.lmms_eval`: the ``tokprune_llava`` model for lmms-eval (``pip install
  tokprune[lmms]``): any registered pipeline on a llava-hf checkpoint, batched.
* :mod:`tokprune.integrations.vllm_plugin`: tokprune inside vLLM (the ``vllm.general_plugins`` entry point):
  fixed-budget vision-stage specs per request or engine-wide, on Qwen2.5-VL, Qwen3-VL and LLaVA-1.5
  (docs/serving.md); every contact with vLLM's internals is in that module.
* :mod:`tokprune.integrations.cpu_torchvision`: the CPU recipe's step that makes PyPI's CUDA torchvision
  importable beside a CPU torch (``python -m tokprune.integrations.cpu_torchvision install``).
"""
