"""tokprune's vLLM classes, one module per family (each ``classes(mixin, registry)``), and the M-RoPE
placement the Qwen families share (:mod:`.mrope`). Built on first use by
:mod:`tokprune.integrations.vllm_plugin`, which holds the spec's path and every shared vLLM contact point."""
