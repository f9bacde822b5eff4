"""The adapter contract's ``tokens`` check: the LLM receives exactly the tokens the plan kept.

The other checks prove an adapter consistent with itself (keep-all == stock, batch == solo, cache ==
recompute); an adapter that feeds the LLM the wrong image rows passes them all. This one compares what
the decoder layers of the patched model receive with what the **stock** model's layers receive, row by
row, for a pipeline that prunes at both stages:

* **layer 0**: the rows at image positions are the stock model's projected image rows that the
  vision plan kept (the plan's keep mask, recorded by the probe itself, not what the adapter reports),
  in order, each with the stock rotary embedding of its own slot (the family's positions, kept); text
  rows are the stock ones at their slots; one strategy row per image, several images per sample;
* **the LLM step**: the roles the strategy saw are those of the kept rows' slots, and the text rows
  entering layer ``K`` are layer ``K-1``'s outputs at the positions the LLM plan kept, with their
  positions (image rows are compared by position only: DeepStack adds to them between layers);
* all of it in fp32 and bf16, on two batches in a row (state from the first call must not leak).

A family's placeholder rows that no plan drops (LLaVA-NeXT's row newlines) are named by its
:attr:`~tokprune.testing.adapters.TinyCase.fixed_image_rows`; every other placeholder is a strategy
token, image ``i``'s ``j``-th one being token ``j`` of the strategy's row ``i``.

:mod:`tokprune.testing.mutants` holds the wrong adapters this check must reject.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..adapters._seq import token_roles
from ..pipeline import Pipeline
from ..strategy import LLMContext, LLMPlan, TokenRole, VisionContext, VisionPlan
from .equivalence import ProbeLastRow, ProbeVisionNorm

if TYPE_CHECKING:
    from .adapters import TinyCase

__all__ = ["IMAGES_PER_SAMPLE", "SECOND_SEEDS", "accepts_compact", "check_tokens", "has_vision_stage"]

#: Images in every sample of the check's batches (several: a sample's images must stay apart).
IMAGES_PER_SAMPLE = 2
#: Seeds of the second batch: the same shapes as the first (seeds ``0, 1, 2``), other pixels and words.
SECOND_SEEDS = (4, 5, 6)
#: Largest difference allowed between a patched row and its stock row, relative to the rows' largest
#: magnitude (the projector runs on fewer rows; bf16 rounds differently): far below a wrong row's.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


class _VisionRecorder(ProbeVisionNorm):
    """The CLS-free vision probe, recording every plan it returns with the rows it was given."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.seen: list[tuple[Tensor, Tensor]] = []

    def plan(self, ctx: VisionContext) -> VisionPlan:
        plan = super().plan(ctx)
        self.seen.append((ctx.token_counts.clone(), plan.keep.clone()))
        return plan


class _LLMRecorder(ProbeLastRow):
    """The LLM probe, recording the roles it saw and the keep mask it returned."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.seen: list[tuple[Tensor, Tensor]] = []

    def plan(self, ctx: LLMContext) -> LLMPlan:
        plan = super().plan(ctx)
        self.seen.append((ctx.roles.clone(), plan.keep.clone()))
        return plan


@dataclass
class _Layer:
    """What one decoder layer received on the first forward (and, with ``output``, returned)."""

    hidden: Tensor | None = None
    cos: Tensor | None = None
    sin: Tensor | None = None
    output: Tensor | None = None


@dataclass
class _Capture:
    layers: dict[int, _Layer] = field(default_factory=dict)


@contextmanager
def _capture(
    decoder_layers: nn.ModuleList, inputs_of: tuple[int, ...], outputs_of: tuple[int, ...]
) -> Iterator[_Capture]:
    """Record the hidden states and rotary embedding given to some layers, and some layers' outputs."""
    cap = _Capture()
    handles = []

    def pre(i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            rec = cap.layers.setdefault(i, _Layer())
            if rec.hidden is None:
                rec.hidden = (args[0] if args else kwargs["hidden_states"]).detach().clone()
                rec.cos, rec.sin = (t.detach().clone() for t in kwargs["position_embeddings"])

        return hook

    def post(i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: tuple, output: Tensor | tuple) -> None:
            rec = cap.layers.setdefault(i, _Layer())
            if rec.output is None:
                rec.output = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    for i in inputs_of:
        handles.append(decoder_layers[i].register_forward_pre_hook(pre(i), with_kwargs=True))
    for i in outputs_of:
        handles.append(decoder_layers[i].register_forward_hook(post(i)))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


def _rows(t: Tensor, b: int, index: Tensor) -> Tensor:
    """Sample ``b``'s entries at sequence ``index`` of ``[B, L, ...]`` (rotary tables may lead with an axis dim)."""
    if t.dim() == 4:  # [R, B, L, hd]: one table per M-RoPE axis
        return t[:, min(b, t.shape[1] - 1), index]
    return t[min(b, t.shape[0] - 1), index]  # a batch of 1: positions shared by every sample


def _image_runs(image: Tensor) -> list[tuple[int, Tensor]]:
    """Each placeholder run (one image) in row-major order: ``(sample, slot indices)``."""
    runs = []
    for b in range(image.shape[0]):
        slots = torch.nonzero(image[b]).flatten()
        if slots.numel() == 0:
            continue
        cut = torch.nonzero(slots[1:] - slots[:-1] > 1).flatten() + 1
        runs += [(b, part) for part in torch.tensor_split(slots, cut.tolist())]
    return runs


def _close(what: str, got: Tensor, want: Tensor, tol: float) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    scale = max(float(want.float().abs().max()), 1e-6) if want.numel() else 1.0
    err = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
    if err > tol * scale:
        raise AssertionError(f"{what}: differs by {err:.3g} (tolerance {tol * scale:.3g})")


def _expected_slots(
    name: str,
    inputs: dict[str, Tensor],
    stock_hidden: Tensor,
    vision: tuple[Tensor, Tensor],
    image_token_id: int,
    fixed_rows: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """bool ``[B, n]``: the stock slots the LLM must receive after the vision stage."""
    counts, keep = vision
    valid = inputs["attention_mask"].bool()
    image = (inputs["input_ids"] == image_token_id) & valid
    runs = _image_runs(image)
    if keep.shape[0] != len(runs):
        raise AssertionError(
            f"{name}: the vision strategy saw {keep.shape[0]} rows for {len(runs)} images: it must see one row "
            "per image (were a sample's images merged, or split?)"
        )
    slots = valid & ~image
    for i, (b, run) in enumerate(runs):
        fixed = torch.zeros(run.numel(), dtype=torch.bool)
        if fixed_rows is not None:
            fixed = fixed_rows(stock_hidden[b, run]).cpu()
        tokens = run[~fixed]
        if int(counts[i]) != tokens.numel():
            raise AssertionError(
                f"{name}: the vision strategy's row {i} holds {int(counts[i])} tokens, image {i} brings "
                f"{tokens.numel()} (its placeholders that a plan may drop)"
            )
        slots[b, run[fixed]] = True
        slots[b, tokens[keep[i, : tokens.numel()].cpu()]] = True
    return slots


def _compare_rows(
    what: str,
    got: _Layer,
    want: _Layer,
    slots: Tensor,
    tol: float,
    content: Tensor | None = None,
    compact: bool = False,
) -> None:
    """Packed rows ``got`` (left-padded ``[B, W, ...]``) against ``want``'s rows at ``slots`` (bool ``[B, n]``).

    ``content`` (bool ``[B, n]``): the slots whose hidden states are compared (default: all of ``slots``);
    the rotary embedding is compared at every slot: ``want``'s at the row's own slot, or with ``compact``
    at the slots that follow the sample's first one contiguously (``want`` numbers its slots from there).
    """
    assert got.hidden is not None and want.hidden is not None and got.cos is not None and want.cos is not None
    count = slots.sum(dim=1)
    width = got.hidden.shape[1]
    if width != int(count.max()):
        raise AssertionError(f"{what}: the layer received {width} columns, expected {int(count.max())} (the most kept)")
    content = slots if content is None else content
    for b in range(slots.shape[0]):
        index = torch.nonzero(slots[b]).flatten()
        packed = torch.arange(width - index.numel(), width)
        check = content[b, index]
        _close(f"{what}: sample {b} rows", got.hidden[b, packed[check]], want.hidden[b, index[check]], tol)
        at = index[0] + torch.arange(index.numel()) if compact and index.numel() else index
        for part, g, w in (("cos", got.cos, want.cos), ("sin", got.sin, want.sin)):
            _close(f"{what}: sample {b} positions ({part})", _rows(g, b, packed), _rows(w, b, at), tol)


def has_vision_stage(adapter: type) -> bool:
    """Whether ``adapter`` accepts a vision-stage step (one reading no CLS signal) on its tiny model."""
    from ..errors import MissingCapabilityError
    from .adapters import _patch, tiny_case

    case = tiny_case(adapter)
    try:
        _patch(case.model, Pipeline([ProbeVisionNorm()]), case).remove()
    except MissingCapabilityError:
        return False
    return True


def check_tokens(adapter: type, patch_options: dict | None = None) -> None:
    """The LLM receives the kept projected rows, in order, at the family's positions (see the module docstring).

    Runs with the vision stage's positions kept, then renumbered (``vision_positions="compact"``, in fp32)
    where the family accepts it (1-D positions). ``patch_options`` go to ``patch``.
    """
    _check_tokens(adapter, "keep", (torch.float32, torch.bfloat16), patch_options)
    if accepts_compact(adapter):  # multi-axis positions: compact renumbering is refused at patch()
        _check_tokens(adapter, "compact", (torch.float32,), patch_options)


def accepts_compact(adapter: type) -> bool:
    """Whether ``adapter`` accepts ``vision_positions="compact"`` (1-D positions) on its tiny model."""
    from ..errors import StrategyParamError
    from .adapters import _patch, tiny_case

    case = tiny_case(adapter)
    try:
        _patch(case.model, "none", case, adapter=adapter, vision_positions="compact").remove()
    except StrategyParamError:
        return False
    return True


def _check_tokens(adapter: type, mode: str, dtypes: tuple[torch.dtype, ...], patch_options: dict | None) -> None:
    from .adapters import LENGTHS, _patch, tiny_case

    for dtype in dtypes:
        case = tiny_case(adapter)
        model = case.model.to(dtype)
        layers = model.get_decoder().layers
        k = case.llm_layer
        tol = TOLERANCE[dtype]
        vision, llm = _VisionRecorder(keep_ratio=0.5, ragged=True), _LLMRecorder(layer=k, ragged=True)
        steps = [vision, llm] if has_vision_stage(adapter) else [llm]
        batches = [case.make_inputs(LENGTHS, images=IMAGES_PER_SAMPLE)]
        batches.append(case.make_inputs(LENGTHS, seeds=SECOND_SEEDS, images=IMAGES_PER_SAMPLE))
        batches = [_cast(inputs, dtype) for inputs in batches]
        stock = []
        for inputs in batches:
            with torch.no_grad(), _capture(layers, (0,), ()) as cap:
                model(**inputs)
            stock.append(cap.layers[0])
        # one patch for both calls: per-call state left by the first must not reach the second
        options = {"vision_positions": mode, **(patch_options or {})}
        handle = _patch(model, Pipeline(steps), case, adapter=adapter, **options)
        try:
            for call, inputs in enumerate(batches):
                dtype_name = str(dtype).removeprefix("torch.")
                name = f"{adapter.__name__} ({adapter.name}, {dtype_name}, {mode} positions, call {call + 1})"
                # in place: a copy of a probe made by the adapter records into the same list
                vision.seen.clear()
                llm.seen.clear()
                with torch.no_grad(), _capture(layers, (0, k), (k - 1,)) as patched:
                    model(**inputs)
                _check_call(name, case, inputs, stock[call], patched, vision, llm, len(steps) == 2, tol, k, mode)
        finally:
            handle.remove()


def _cast(inputs: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {key: v.to(dtype) if v.is_floating_point() else v for key, v in inputs.items()}


def _check_call(
    name: str,
    case: TinyCase,
    inputs: dict[str, Tensor],
    stock: _Layer,
    patched: _Capture,
    vision: _VisionRecorder,
    llm: _LLMRecorder,
    vision_stage: bool,
    tol: float,
    k: int,
    mode: str,
) -> None:
    image_token_id = int(case.model.config.image_token_id)
    seen_vision, seen_llm = vision.seen, llm.seen
    runs = 1 if vision_stage else 0
    if len(seen_vision) != runs or len(seen_llm) != 1:
        raise AssertionError(
            f"{name}: one forward ran the vision strategy {len(seen_vision)} times (expected {runs}) and the LLM "
            f"one {len(seen_llm)} times (expected 1)"
        )
    assert stock.hidden is not None
    slots = inputs["attention_mask"].bool()
    if vision_stage:
        slots = _expected_slots(name, inputs, stock.hidden, seen_vision[0], image_token_id, case.fixed_image_rows)
    _compare_rows(f"{name}: layer 0", patched.layers[0], stock, slots, tol, compact=mode == "compact")

    # The LLM step: roles of the rows it saw, then what layer k receives.
    roles_seen, keep = seen_llm[0]
    valid = inputs["attention_mask"].bool()
    marker = case.question_end
    roles, _ = token_roles(inputs["input_ids"], valid, image_token_id, marker)
    count = slots.sum(dim=1)
    width = roles_seen.shape[1]
    for b in range(slots.shape[0]):
        want = roles[b, slots[b]]
        got = roles_seen[b, width - want.numel() :]
        if marker is None:  # without the marker the question/template split is the adapter's own reading
            want, got = want.clamp(max=TokenRole.QUESTION), got.clamp(max=TokenRole.QUESTION)
        if not torch.equal(got.cpu(), want.cpu()):
            raise AssertionError(
                f"{name}: sample {b}: the LLM strategy saw roles {got.tolist()}, the kept rows' are {want.tolist()}"
            )
        if bool((roles_seen[b, : width - int(count[b])] != TokenRole.PADDING).any()):
            raise AssertionError(f"{name}: sample {b}: padding columns do not carry the PADDING role")
    before, first = patched.layers[k - 1], patched.layers[0]
    # layer k's expected rows: layer k-1's output (text rows) with layer 0's positions, at the kept columns
    layer_k = _Layer(hidden=before.output, cos=first.cos, sin=first.sin)
    kept = keep.to(before.output.device) & (roles_seen != TokenRole.PADDING)
    text = kept & (roles_seen != TokenRole.IMAGE)
    _compare_rows(f"{name}: layer {k} (after the LLM step)", patched.layers[k], layer_k, kept, tol, content=text)
