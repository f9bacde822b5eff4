"""What every reference check shares: tiny random LLaVAs, the kept sets a patched model chose, the
reference's inputs read off the unpatched model, and the tally of agreements and near-ties.

A reference check runs a built-in's default spec inside a patched tiny LLaVA on a left-padded ragged batch
and records the tokens the strategy kept (the plan it returned, per sample). The reference side runs each
sample alone, unpadded, through the *unpatched* model (eager attention, ``output_attentions``), reads what
the authors' code reads (hidden states, attention maps, hooked q/k, the projector, the final norm) and
applies a small re-implementation of the authors' selection rule. The kept sets must be equal; where the
reference's own decision had a near-tie (a margin below ``NEAR_TIE``) a difference is reported, not failed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import tokprune
from tokprune import TokenRole
from tokprune.adapters.llava import vision_transformer
from tokprune.testing.models import VOCAB, tiny_llava

#: Seeds of the tiny models and question lengths of each batch (padding 27, 16, 0: wide apart).
SEEDS: tuple[int, ...] = (0, 1, 2, 3)
LENGTHS: tuple[int, ...] = (3, 14, 30)
#: A reference decision whose margin (score gap at the cut, between a greedy step's best and second best,
#: or between neighbours of an order the rule depends on) is below this is a near-tie: float rounding may
#: flip it. Our scores and the eager reference's differ by up to ~4e-9 on these models (fp32): 1e-7 is 25x that.
NEAR_TIE = 1e-7


@dataclass
class Case:
    """One sample: its model, its solo inputs and what the unpatched model computed on them."""

    model: Any
    seed: int
    index: int
    inputs: dict[str, Tensor]  #: the sample alone, unpadded (batch of 1)
    hidden: tuple[Tensor, ...]  #: LM hidden states, ``hidden[k]`` enters layer k, ``[1, L, D]``
    attentions: tuple[Tensor, ...]  #: LM attention probabilities per layer, ``[1, H, L, L]``
    tower_hidden: tuple[Tensor, ...]  #: vision tower hidden states (embeddings first), ``[1, 1+N, C]``
    tower_attentions: tuple[Tensor, ...]  #: vision tower attention per layer, ``[1, h, 1+N, 1+N]``
    tower_qk: dict[tuple[str, int], Tensor]  #: ``("q" | "k", layer)`` -> ``[1, 1+N, C]``
    lm_k: dict[int, Tensor]  #: LM layer -> its k_proj output ``[1, L, Hkv * hd]`` (before RoPE)

    @property
    def ids(self) -> Tensor:
        return self.inputs["input_ids"][0]

    @property
    def image_span(self) -> tuple[int, int]:
        where = (self.ids == VOCAB.image).nonzero().flatten()
        return int(where[0]), int(where[-1]) + 1

    @property
    def question_ids(self) -> list[int]:
        """The question's token ids: after the image, before ``ASSISTANT :``."""
        _, end = self.image_span
        return self.ids[end : len(self.ids) - len(VOCAB.assistant_marker)].tolist()


@dataclass
class Tally:
    """Agreement counts of one method across every case."""

    method: str
    cases: int = 0
    equal: int = 0
    near_ties: int = 0
    notes: list[str] = field(default_factory=list)

    def check(self, ours: list[int], reference: list[int], margin: float, where: str) -> None:
        self.cases += 1
        tie = margin < NEAR_TIE
        self.near_ties += tie
        if ours == reference:
            self.equal += 1
            return
        message = f"{self.method} {where}: ours {ours} != reference {reference} (margin {margin:.3g})"
        if not tie:
            raise AssertionError(message)
        self.notes.append(message)

    def report(self) -> str:
        line = f"reference: {self.method}: {self.equal}/{self.cases} kept sets equal, {self.near_ties} near-ties"
        print(line)
        for note in self.notes:
            print("  near-tie difference:", note)
        return line


def order_margin(scores: Tensor) -> float:
    """Smallest gap between neighbours of the sorted scores (a rule that depends on the whole order)."""
    top = scores.double().flatten().sort(descending=True).values
    return float((top[:-1] - top[1:]).min()) if top.numel() > 1 else math.inf


def topk_margin(scores: Tensor, k: int) -> float:
    """Gap between the k-th and (k+1)-th largest score (inf when nothing is dropped)."""
    if k >= scores.numel():
        return math.inf
    top = scores.double().sort(descending=True).values
    return float(top[k - 1] - top[k])


def _tower_hooks(model: Any, store: dict) -> list:
    hooks = []
    for i, layer in enumerate(vision_transformer(model.model.vision_tower).encoder.layers):
        for kind in ("q", "k"):
            proj = getattr(layer.self_attn, f"{kind}_proj")
            hooks.append(proj.register_forward_hook(lambda _m, _i, out, key=(kind, i): store.__setitem__(key, out)))
    return hooks


def cases(
    seeds: tuple[int, ...] = SEEDS, lengths: tuple[int, ...] = LENGTHS
) -> Iterator[tuple[Any, Callable, list[Case]]]:
    """Per seed: the eager tiny LLaVA, its ``make_inputs`` and one :class:`Case` per sample."""
    for seed in seeds:
        model, make_inputs = tiny_llava(seed=seed, attn_implementation="eager")
        norm = model.model.language_model.norm.weight
        with torch.no_grad():  # HF initialises ones, under which norm(h) and h have the same cosines (DART)
            norm.copy_(torch.linspace(0.2, 3.0, norm.numel()))
        out = []
        for i, q in enumerate(lengths):
            solo = make_inputs([q], seeds=[i])
            tower_qk: dict = {}
            lm_k: dict = {}
            hooks = _tower_hooks(model, tower_qk)
            for j, layer in enumerate(model.model.language_model.layers):
                hooks.append(
                    layer.self_attn.k_proj.register_forward_hook(
                        lambda _m, _i, o, j=j, lm_k=lm_k: lm_k.__setitem__(j, o)
                    )
                )
            try:
                with torch.no_grad():
                    tower = model.model.vision_tower(
                        solo["pixel_values"], output_hidden_states=True, output_attentions=True
                    )
                    lm = model(**solo, output_hidden_states=True, output_attentions=True)
            finally:
                for hook in hooks:
                    hook.remove()
            out.append(
                Case(
                    model,
                    seed,
                    i,
                    solo,
                    lm.hidden_states,
                    lm.attentions,
                    tower.hidden_states,
                    tower.attentions,
                    tower_qk,
                    lm_k,
                )
            )
        yield model, make_inputs, out


def kept_by_strategy(
    model: Any, make_inputs: Callable, spec: str, lengths: tuple[int, ...] = LENGTHS, **options: Any
) -> list[list[tuple[Tensor, Tensor]]]:
    """Run ``spec`` on the padded batch; per sample and per call of each step, ``(keep, image, valid)``:
    the plan's keep mask over the strategy's positions, which of them are image tokens and which are
    not padding (vision stage: every position, both)."""
    handle = tokprune.patch(model, spec, question_end=VOCAB.assistant_marker, **options)
    calls: list[tuple[Tensor, Tensor, Tensor]] = []
    try:
        steps = [s for s in (handle.pipeline.vision, *handle.pipeline.llm) if s is not None]
        for step in steps:
            original = step.plan

            def spy(ctx: Any, original: Callable = original) -> Any:
                plan = original(ctx)
                llm = hasattr(ctx, "roles")
                image = ctx.role_mask(TokenRole.IMAGE) if llm else ctx.token_valid
                valid = ctx.valid if llm else ctx.token_valid
                calls.append((plan.keep.clone(), image.clone(), valid.clone()))
                return plan

            step.plan = spy  # instance attribute: this patch's step only
        with torch.no_grad():
            model(**make_inputs(lengths))
    finally:
        for step in (handle.pipeline.vision, *handle.pipeline.llm):
            if step is not None:
                step.__dict__.pop("plan", None)
        handle.remove()
    b = len(lengths)
    return [[(keep[i], image[i], valid[i]) for keep, image, valid in calls] for i in range(b)]


def kept_image_ranks(per_call: list[tuple[Tensor, Tensor, Tensor]]) -> list[int]:
    """The image tokens kept after every call of a step, as indices into the sample's original image
    tokens (each later call sees only the previous call's survivors)."""
    alive: list[int] | None = None
    for keep, image, _ in per_call:
        kept = (keep[image]).nonzero().flatten().tolist()
        alive = kept if alive is None else [alive[r] for r in kept]
    assert alive is not None
    return alive


def rope(x: Tensor, model: Any, positions: Tensor) -> Tensor:
    """Llama's RoPE of ``x`` ``[1, H, L, hd]`` at ``positions`` ``[1, L]``."""
    cos, sin = model.model.language_model.rotary_emb(x, positions)
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
