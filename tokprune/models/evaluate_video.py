"""Held-out accuracy of the tiny Qwen2.5-VL on the clip world, unpruned and with video tokens kept by rule.

``python -m tokprune.models.evaluate_video [--n 400] [--markdown]`` prints accuracy per question type for
keep rules that need no pruning code: everything, only the first frame, only the last frame, the tokens that
hold a shape (an oracle), random tokens at the oracle's budget, and the frame-change rule (tokens of the
first frame plus those that differ most from the same position one frame earlier, at the oracle's budget).
Dropped tokens are masked out of the language model's attention while every kept token keeps its M-RoPE
position (equivalent to deleting them without renumbering, which is what a pruned Qwen2.5-VL does).

The answer is the greedy first token after the prompt (every answer is one word), read from one forward
pass; ``model.generate`` gives the same first token.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration

from tokprune.data import clips
from tokprune.models import build_qwen

KeepRule = Callable[[clips.Clip, torch.Tensor, torch.Generator], torch.Tensor]
"""``(clip, video token features [TOKENS_PER_CLIP, D], generator) -> bool keep [TOKENS_PER_CLIP]``."""


def positions_and_inputs(model: Qwen2_5_VLForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stock M-RoPE positions ``[3, B, L]`` of a batch (computed before any token is masked)."""
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=inputs["attention_mask"])
    return pos


def masked_forward(model: Qwen2_5_VLForConditionalGeneration, inputs: dict[str, torch.Tensor],
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[B, L, V]`` with video tokens where ``keep`` (``bool [B, TOKENS_PER_CLIP]``) is false masked
    out of attention, positions unchanged."""
    if keep is None:
        return model(**inputs).logits
    video = inputs["mm_token_type_ids"] == 2
    mask = inputs["attention_mask"].clone()
    mask[video] = mask[video] * keep.reshape(-1).to(mask.dtype)
    return model(**{**inputs, "attention_mask": mask, "position_ids": positions_and_inputs(model, inputs)}).logits


def first_token_answers(tokenizer: PreTrainedTokenizerFast, logits: torch.Tensor) -> list[str]:
    return tokenizer.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())


def video_features(model: Qwen2_5_VLForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The merged video tokens the language model sees, ``[B, TOKENS_PER_CLIP, D]``."""
    out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return torch.stack(list(out.pooler_output))


def keep_all(clip: clips.Clip, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.ones(clips.TOKENS_PER_CLIP, dtype=torch.bool)


def keep_frame(t: int) -> KeepRule:
    def rule(clip: clips.Clip, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        keep = torch.zeros(clips.FRAMES, clips.TOKENS_PER_FRAME, dtype=torch.bool)
        keep[t] = True
        return keep.reshape(-1)
    return rule


def keep_objects(clip: clips.Clip, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return clip.object_mask.reshape(-1)


def random_like_objects(clip: clips.Clip, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """As many random tokens as the clip has shape tokens."""
    k = int(clip.object_mask.sum())
    keep = torch.zeros(clips.TOKENS_PER_CLIP, dtype=torch.bool)
    keep[torch.randperm(clips.TOKENS_PER_CLIP, generator=gen)[:k]] = True
    return keep


def budget_keep(budget: float) -> tuple[KeepRule, KeepRule]:
    """``(change, random)`` rules keeping ``round(budget * TOKENS_PER_CLIP)`` tokens.

    ``change`` is the frame-difference rule (EVS's idea, computed here on the merged tokens): rank every
    token by ``1 - cos`` to the same position one frame earlier, the first frame's tokens ranked first.
    """
    k = max(1, round(budget * clips.TOKENS_PER_CLIP))

    def change(clip: clips.Clip, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        f = feats.reshape(clips.FRAMES, clips.TOKENS_PER_FRAME, -1)
        dis = 1 - torch.nn.functional.cosine_similarity(f[1:], f[:-1], dim=-1)
        score = torch.cat([torch.full((1, clips.TOKENS_PER_FRAME), 2.0), dis]).reshape(-1)
        keep = torch.zeros(clips.TOKENS_PER_CLIP, dtype=torch.bool)
        keep[score.topk(k).indices] = True
        return keep

    def rand(clip: clips.Clip, feats: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        keep = torch.zeros(clips.TOKENS_PER_CLIP, dtype=torch.bool)
        keep[torch.randperm(clips.TOKENS_PER_CLIP, generator=gen)[:k]] = True
        return keep

    return change, rand


@torch.no_grad()
def accuracy(model: Qwen2_5_VLForConditionalGeneration, tokenizer: PreTrainedTokenizerFast,
             samples: Sequence[clips.Clip], rule: KeepRule | None = None, batch: int = 50,
             seed: int = 0) -> dict[str, float]:
    """Accuracy by question type and ``overall`` (plus ``kept``: mean share of video tokens kept)."""
    gen = torch.Generator().manual_seed(seed)
    right: dict[str, list[bool]] = defaultdict(list)
    kept: list[float] = []
    for i in range(0, len(samples), batch):
        chunk = list(samples[i:i + batch])
        inputs = build_qwen.model_inputs(tokenizer, chunk)
        keep = None
        if rule is not None and all(s.is_video for s in chunk):
            feats = video_features(model, inputs)
            keep = torch.stack([rule(s, f, gen) for s, f in zip(chunk, feats)])
            kept.append(keep.float().mean().item())
        answers = first_token_answers(tokenizer, masked_forward(model, inputs, keep))
        for s, a in zip(chunk, answers):
            right[s.qtype].append(a == s.answer)
            right["overall"].append(a == s.answer)
    out = {k: sum(v) / len(v) for k, v in right.items()}
    out["kept"] = sum(kept) / len(kept) if kept else 1.0
    return out


def load(path: str | Path | None = None) -> tuple[Qwen2_5_VLForConditionalGeneration, PreTrainedTokenizerFast]:
    from transformers import AutoTokenizer

    from tokprune.models import path as model_path

    path = path or model_path("tiny-qwen2.5-vl-clips")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def table(model: Qwen2_5_VLForConditionalGeneration, tokenizer: PreTrainedTokenizerFast,
          samples: Sequence[clips.Clip], budgets: Sequence[float] = (0.25, 0.125)) -> list[tuple[str, dict[str, float]]]:
    rows: list[tuple[str, KeepRule | None]] = [
        ("all tokens", None), ("first frame only", keep_frame(0)), ("last frame only", keep_frame(clips.FRAMES - 1)),
        ("shape tokens (oracle)", keep_objects), ("random, oracle's count", random_like_objects),
    ]
    for b in budgets:
        change, rand = budget_keep(b)
        rows += [(f"frame change, {b:.1%}", change), (f"random, {b:.1%}", rand)]
    return [(name, accuracy(model, tokenizer, samples, rule)) for name, rule in rows]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the shipped one)")
    p.add_argument("--split", default="test", choices=sorted(clips.BENCHMARK_SEEDS))
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load(args.model)
    samples = clips.clip_benchmark(args.split, args.n)
    t0 = time.perf_counter()
    rows = table(model, tokenizer, samples)
    types = list(clips.VIDEO_QUESTION_TYPES)
    print(f"| video tokens kept | kept | overall | {' | '.join(types)} |")
    print("|---|---|---|" + "---|" * len(types))
    for name, acc in rows:
        cells = " | ".join(f"{acc[t]:.1%}" for t in types)
        print(f"| {name} | {acc['kept']:.1%} | {acc['overall']:.1%} | {cells} |")
    print(f"({args.n} `{args.split}` clips, {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
