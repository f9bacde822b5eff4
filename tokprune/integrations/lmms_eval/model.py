"""The ``tokprune_llava`` model: a tokprune-patched checkpoint answering lmms-eval's requests, batched.

Re-exported by :mod:`tokprune.integrations.lmms_eval`, whose docstring says how lmms-eval finds it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

MODEL_NAME = "tokprune_llava"
CLASS_PATH = "tokprune.integrations.lmms_eval.TokpruneLlava"
IMAGE_TOKEN = "<image>"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Request:
    """A minimal stand-in for lmms-eval's ``Instance``: only ``args`` is read.

    ``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``, as lmms-eval builds it for
    ``generate_until``; ``doc_to_visual(model.task_dict[task][split][doc_id])`` gives the images.
    """

    args: tuple


@dataclass
class _Item:
    index: int
    context: str
    gen_kwargs: dict[str, Any]
    visuals: list[Any]
    doc_id: Any
    task: Any
    prompt: str = ""
    key: str = field(default="", repr=False)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _as_list(value: Any) -> list[Any]:
    """Flatten lmms-eval's visuals (a visual, a list, or a list of lists) into one list, dropping None."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _as_list(item)]
    return [value]


class TokpruneLlavaCore:
    """A checkpoint of any registered family patched with a tokprune pipeline, answering lmms-eval requests.

    The model loads through ``AutoModelForImageTextToText`` and its processor through ``AutoProcessor``
    (:mod:`tokprune.loading`: a checkpoint no registered family prunes is refused, naming the families);
    each prompt is the family's own chat template over the request's images, then its text.

    Args:
        pretrained: a local checkpoint directory, a hub id, or the name of a model shipped with tokprune
            (``tiny-llava-shapes``, the default).
        strategy: the pipeline spec (``"cls_knee+text_interact"``; ``"none"`` evaluates the unpruned model).
        batch_size: prompts per ``generate`` call (lmms-eval passes ``--batch_size``). Samples are
            batched with left padding; tokprune's batch == solo guarantee makes results independent of it.
        device: ``cpu``, ``cuda``, ``cuda:1``...; default: cuda when available.
        dtype: one of ``auto``, ``float32``, ``bfloat16``, ``float16``.
        max_new_tokens: used when a task's generation kwargs give none.
        vision_positions: ``method`` (default: each method's reference choice), ``keep`` or ``compact``;
        llm_positions: ``keep`` (default) or ``compact``; see ``tokprune.patch``.
        chat_template: a Jinja template overriding the processor's, given the context as one string with
            ``<image>`` placeholders (default: the processor's, given the images then the text as transformers'
            message parts; without one, LLaVA-1.5's ``USER: ... ASSISTANT:``).
        attn_implementation: ``sdpa`` (default) or ``eager``.
        use_cache: generate with the KV cache (pruning happens once, at prefill).
        revision: hub revision of ``pretrained``.
        model, processor: already loaded objects, instead of ``pretrained`` (programmatic use).

    After each batch, :attr:`pruning_log` gets one entry per request with its budget (visual tokens
    kept, tokens and visual tokens averaged over LLM layers, prefill FLOPs ratio, prompt and answer
    lengths). Under lmms-eval >= 0.7.3 the same fields also land in lmms-eval's samples files, in each
    sample's ``token_counts`` (run with ``--log_samples``).
    """

    is_simple = True
    #: Requests answered by any instance in this process (``python -m tokprune.integrations.lmms_eval`` fails
    #: a run that asked for none).
    answered_in_process: ClassVar[int] = 0

    def __init__(
        self,
        pretrained: str | None = None,
        strategy: str = "none",
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int = 128,
        vision_positions: str = "method",
        llm_positions: str = "keep",
        chat_template: str | None = None,
        attn_implementation: str | None = None,
        use_cache: bool = True,
        revision: str | None = None,
        model: Any = None,
        processor: Any = None,
        max_batch_size: int | None = None,  # lmms-eval passes it; batches are fixed-size here
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise TypeError(
                f"{MODEL_NAME}: unknown model_args {sorted(unknown)}; valid: pretrained, strategy, batch_size, "
                "device, dtype, max_new_tokens, vision_positions, llm_positions, chat_template, "
                "attn_implementation, use_cache, revision"
            )
        import torch

        from tokprune import patch, strategies

        self.task_dict: dict = getattr(self, "task_dict", {})
        self._rank, self._world_size = 0, 1
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.use_cache = bool(use_cache)
        self.pipeline = strategies.get(_unquote(str(strategy)))  # fails here, before loading, on a bad spec
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            model, processor = _load(pretrained, dtype, attn_implementation, revision)
        elif processor is None:
            raise TypeError(f"{MODEL_NAME}: pass processor= together with model=")
        self._model = model.to(self._device).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"  # batched generation continues from the right edge
        self.chat_template = chat_template
        self.handle = patch(
            self._model,
            self.pipeline,
            vision_positions=None if vision_positions == "method" else vision_positions,
            llm_positions=llm_positions,
            question_end=processor,
        )
        self.pruning_log: list[dict[str, Any]] = []

    # -- what lmms-eval reads -----------------------------------------------------------------------

    @property
    def model(self) -> Any:
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> Any:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answer ``generate_until`` requests, ``batch_size`` at a time; results in request order."""
        return [text for text, _ in self._answer(requests)]

    def _answer(self, requests: Sequence[Any]) -> list[tuple[str, dict[str, Any]]]:
        """Each request's answer and its budget record (see :attr:`pruning_log`), in request order."""
        items = [self._parse(i, request) for i, request in enumerate(requests)]
        results: list[tuple[str, dict[str, Any]]] = [("", {})] * len(items)
        for batch in _batches(items, self.batch_size):
            texts, budgets = self._generate(batch)
            for item, text, budget in zip(batch, texts, budgets):
                results[item.index] = (text, budget)
                TokpruneLlavaCore.answered_in_process += 1
                hook = getattr(self, "cache_hook", None)
                if hook is not None:
                    hook.add_partial("generate_until", (item.context, item.gen_kwargs), text)
        return results

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            f"{MODEL_NAME} answers generate_until tasks only: LLM-stage strategies drop prompt positions, "
            "so the continuation's log-likelihood is not defined on a pruned prompt"
        )

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} does not implement multi-round generation")

    # -- helpers --------------------------------------------------------------------------------------

    def build_prompt(self, context: str, num_images: int) -> str:
        """The chat-formatted prompt: the family's template over ``num_images`` images then the context (its
        ``<image>`` marks, LLaVA's convention in lmms-eval contexts, taken out: the template places each
        family's own placeholders). With ``chat_template=``: the context as one string, ``<image>``
        placeholders prepended when it has none."""
        from tokprune.loading import chat_prompt

        if not self.chat_template:
            text = context.replace(IMAGE_TOKEN, "").strip() if num_images else context
            return chat_prompt(self.processor, text, num_images)
        if num_images and IMAGE_TOKEN not in context:
            context = " ".join([IMAGE_TOKEN] * num_images) + "\n" + context
        messages = [{"role": "user", "content": context}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def _parse(self, index: int, request: Any) -> _Item:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
        visuals = _as_list(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
        unsupported = [type(v).__name__ for v in visuals if not hasattr(v, "convert")]
        if unsupported:
            raise NotImplementedError(f"{MODEL_NAME} evaluates image tasks; doc {doc_id!r} gave {unsupported}")
        item = _Item(index, context, dict(gen_kwargs or {}), visuals, doc_id, task)
        item.prompt = self.build_prompt(context, len(visuals))
        # Only requests with identical generation settings share a generate() call.
        item.key = json.dumps(item.gen_kwargs, sort_keys=True, default=str)
        return item

    def _generate(self, batch: list[_Item]) -> tuple[list[str], list[dict[str, Any]]]:
        import torch

        kwargs = dict(batch[0].gen_kwargs)
        until = _as_list(kwargs.pop("until", None))
        temperature = float(kwargs.pop("temperature", 0) or 0)
        do_sample = bool(kwargs.pop("do_sample", False)) or temperature > 0
        # One list of images per prompt (SmolVLM's processor needs the nesting; the others accept it).
        images = [[v.convert("RGB") for v in item.visuals] for item in batch]
        inputs = self.processor(
            text=[item.prompt for item in batch], images=images if any(images) else None, return_tensors="pt",
            padding=True,
        ).to(self._device)  # fmt: skip
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            out = self._model.generate(
                **inputs,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=kwargs.pop("top_p", None) if do_sample else None,
                num_beams=int(kwargs.pop("num_beams", 1) or 1),
                max_new_tokens=int(kwargs.pop("max_new_tokens", self.max_new_tokens)),
                use_cache=self.use_cache,
                pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        budgets = self._log(batch, (new != pad_id).sum(dim=1).tolist())
        return [_cut(text, until).strip() for text in texts], budgets

    def _log(self, batch: list[_Item], new_tokens: list[int]) -> list[dict[str, Any]]:
        """One budget record per request of the batch, appended to :attr:`pruning_log` and returned."""
        stats = self.handle.stats
        records = []
        for i, item in enumerate(batch):
            record: dict[str, Any] = {"task": item.task, "doc_id": item.doc_id, "output_tokens": int(new_tokens[i])}
            if stats is not None:
                # The columns of `tokprune run`: visual_kept is what the last decoder layer processed
                # (after every stage), visual_after_vision what entered the LLM.
                record.update(
                    input_tokens=int(stats.seq_len[i]),
                    visual_total=int(stats.visual_total),
                    visual_kept=int(stats.layer_visual[i, -1]),
                    visual_after_vision=int(stats.visual_kept[i]),
                    tokens_layer_avg=float(stats.tokens_layer_avg[i]),
                    visual_layer_avg=float(stats.visual_layer_avg[i]),
                    flops_ratio=float(stats.flops_ratio[i]),
                )
            records.append(record)
        self.pruning_log.extend(records)
        return records


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or (isinstance(value, float) and value != number):
        raise ValueError(f"{MODEL_NAME}: {name} must be a positive integer, got {value!r}")
    return number


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first stop sequence."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _batches(items: list[_Item], size: int) -> Iterator[list[_Item]]:
    """Requests grouped by generation settings, longest prompt first (padding waste and OOMs show early)."""
    groups: dict[str, list[_Item]] = {}
    for item in items:
        groups.setdefault(item.key, []).append(item)
    for group in groups.values():
        group.sort(key=lambda item: -len(item.prompt))
        for start in range(0, len(group), size):
            yield group[start : start + size]


def _load(pretrained: str | None, dtype: str, attn_implementation: str | None, revision: str | None) -> tuple:
    from pathlib import Path

    import torch

    from tokprune import loading, models

    if dtype not in DTYPES:
        raise ValueError(f"{MODEL_NAME}: dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    source = pretrained or models.DEFAULT_MODEL
    if source in models.names() and not Path(source).exists():
        source = str(models.path(source))
    options: dict[str, Any] = {"revision": revision} if revision else {}
    model = loading.load_model(
        source,
        dtype="auto" if dtype == "auto" else getattr(torch, dtype),
        attn_implementation=attn_implementation or "sdpa",
        **options,
    )
    return model, loading.load_processor(source, **options)


# -- the lmms-eval side, imported only when lmms-eval asks for it ---------------------------------------


def tokprune_llava_class() -> type:
    """``TokpruneLlava``: :class:`TokpruneLlavaCore` on the installed lmms-eval's ``lmms`` base class (built once
    per base class, on first use); the plain core where lmms-eval is not installed."""
    try:
        from lmms_eval.api.model import lmms
    except ImportError:
        return TokpruneLlavaCore
    return _on_lmms_base(lmms)


# Keyed by the base class, not built once per process: a class cached on one lmms-eval (a test's stand-in,
# say) must never be handed to another, whose registry refuses a class not derived from its own ``lmms``.
@functools.cache
def _on_lmms_base(lmms: type) -> type:
    try:  # lmms-eval >= 0.7.3: per-request token counts land in its samples files
        from lmms_eval.api.instance import GenerationResult, TokenCounts
    except ImportError:
        GenerationResult = None  # noqa: N806
    else:
        BudgetCounts = _budget_counts_class(TokenCounts)  # noqa: N806

    class TokpruneLlava(TokpruneLlavaCore, lmms):
        __doc__ = TokpruneLlavaCore.__doc__

        def generate_until(self, requests: Sequence[Any]) -> list[Any]:
            answers = self._answer(requests)
            if GenerationResult is None:
                return [text for text, _ in answers]
            return [
                GenerationResult(
                    text=text,
                    token_counts=BudgetCounts(
                        input_tokens=record.get("input_tokens"),
                        output_tokens=record.get("output_tokens"),
                        budget={k: record[k] for k in BUDGET_FIELDS if k in record},
                    ),
                )
                for text, record in answers
            ]

    TokpruneLlava.__module__, TokpruneLlava.__qualname__ = "tokprune.integrations.lmms_eval", "TokpruneLlava"
    return TokpruneLlava


#: Budget fields written into lmms-eval's per-sample ``token_counts`` (beside its input/output token counts).
BUDGET_FIELDS = (
    "visual_total",
    "visual_kept",
    "visual_after_vision",
    "tokens_layer_avg",
    "visual_layer_avg",
    "flops_ratio",
)


def _budget_counts_class(token_counts_cls: type) -> type:
    """lmms-eval's ``TokenCounts`` extended with a request's pruning budget.

    lmms-eval logs ``token_counts.to_dict()`` for every sample; a subclass whose ``to_dict`` adds the
    budget puts kept tokens, equivalent tokens (tokens averaged over LLM layers) and the prefill FLOPs
    ratio into lmms-eval's own samples files, next to each answer.
    """

    @dataclass
    class BudgetCounts(token_counts_cls):  # type: ignore[misc, valid-type]
        budget: dict[str, Any] = field(default_factory=dict)

        def to_dict(self) -> dict[str, Any]:
            return {**super().to_dict(), **self.budget}

    return BudgetCounts


def lmms_eval_manifest() -> Any:
    """The ``lmms_eval.models`` entry point: a ``ModelManifest`` naming :data:`CLASS_PATH`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register_with_lmms_eval() -> None:
    """Register ``tokprune_llava`` in every registry the installed lmms-eval has (new and legacy)."""
    import lmms_eval.models as lmms_models

    registry = getattr(lmms_models, "MODEL_REGISTRY_V2", None)
    if registry is not None:
        registry.register_manifest(lmms_eval_manifest(), overwrite=True)
    else:  # before the v2 registry: a name -> class-name table plus the decorator registry
        from lmms_eval.api.registry import register_model

        register_model(MODEL_NAME)(tokprune_llava_class())
    available = getattr(lmms_models, "AVAILABLE_MODELS", None)
    if isinstance(available, dict):
        available.setdefault(MODEL_NAME, "TokpruneLlava")
