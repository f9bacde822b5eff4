"""Train the tiny Qwen2.5-VL on clips and frames of the shapes world: ``python -m tokprune.models.train_video --out DIR``.

One stage, stock transformers modules, fixed step counts so a seed reproduces a run:

* the whole ``Qwen2_5_VLForConditionalGeneration`` from scratch (tiny widths, Qwen2.5-VL's patch 14,
  temporal patch 2, 2x2 merge), AdamW, linear warm-up then cosine decay to 10%;
* each batch mixes clips (``--clips`` per step, the four temporal question types in rotation) and single
  frames asked as images (``--images`` per step, colour and existence questions), loss on the answers and
  ``</s>`` only; a clip is a LLaVA-style conversation (``--turns``): its own question first (exactly the
  benchmark prompt), then follow-up questions the same clip answers, so one pass over the video tokens
  supervises several answers (the fix that broke the tiny LLaVA's plateau; single-question training sat
  at 41% on held-out clips after 600 steps);
* a discarded linear read-out on the merged vision tokens (the tokens the language model sees) predicts
  the colour and the shape on each token's cell and the cell's row and column (``--aux``), as the tiny
  LLaVA's patch read-out did: it makes every token say what and where it is, so the language model
  learns time rather than vision;
* a second discarded read-out predicts each video token's frame index from the language model's hidden
  states after decoder layer ``--time-layer``. Qwen2.5-VL tells frames apart only through M-RoPE's
  temporal axis (the tower sees each frame alone); without this read-out the model answered from the
  frames pooled (held-out ``motion``/``frames``/``appear`` at chance after 440 steps of 4-turn training,
  ``change`` at 60%, i.e. colours of all frames mixed), with it the position is written into the tokens
  early and the later layers can use it;
* in ``--drop-background`` of the batches a random share of the clips' empty-cell tokens is masked out of
  the language model's attention (positions kept), as the tiny LLaVA's recipe does: the background
  carries no information, and a model that leans on it cannot be pruned.

Held-out (``val``) first-token accuracy by question type is printed every ``--eval-every`` steps; the
output directory is a complete checkpoint (fp16 weights, float32 on load) with its tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration

from tokprune.data import clips, world
from tokprune.models import build_qwen, evaluate_video

# Training streams, disjoint from the tiny LLaVA's (1, 2, 3); benchmark seeds are above 1e9.
CLIP_STREAM, IMAGE_STREAM = 4, 5


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


#: Classes of each read-out: colour (0 = empty cell), shape (0 = empty cell), row, column.
READOUTS = (len(world.COLORS) + 1, len(world.SHAPES) + 1, clips.CELLS, clips.CELLS)


def token_targets(samples: list[clips.Clip], video: bool) -> torch.Tensor:
    """``long [sum of tokens, 4]``: colour id and shape id (0 = empty cell), row and column of every merged
    vision token of the clips (``video``) or of the images, frames in order, cells in raster order."""
    colors, shapes = list(world.COLORS), list(world.SHAPES)
    rows = []
    for s in (s for s in samples if s.is_video == video):
        out = torch.zeros(len(s.frames), clips.CELLS, clips.CELLS, 4, dtype=torch.long)
        out[..., 2] = torch.arange(clips.CELLS)[:, None]
        out[..., 3] = torch.arange(clips.CELLS)[None, :]
        for tr in s.tracks:
            for t in range(len(s.frames)):
                if tr.cells[t] is not None:
                    r, c = tr.cells[t]
                    out[t, r, c, 0] = colors.index(tr.colors[t]) + 1
                    out[t, r, c, 1] = shapes.index(tr.shape) + 1
        rows.append(out.reshape(-1, 4))
    return torch.cat(rows)


def labels_of(inputs: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Loss on the answers only: each token right after ``assistant :`` and every ``</s>``."""
    ids = inputs["input_ids"]
    assistant, colon = tokenizer.convert_tokens_to_ids(["assistant", ":"])
    answer = torch.zeros_like(ids, dtype=torch.bool)
    answer[:, 2:] = (ids[:, :-2] == assistant) & (ids[:, 1:-1] == colon)
    return torch.where(answer | (ids == tokenizer.eos_token_id), ids, torch.full_like(ids, -100))


def conversation(clip: clips.Clip, turns: int, rng: np.random.Generator) -> str:
    """The text after the first prompt: the clip's answer, then up to ``turns - 1`` follow-up questions
    (:func:`tokprune.data.clips.follow_ups`) with their answers, LLaVA's multi-turn format. ``four`` (a
    shape shown in every frame: most distractors) is kept for a quarter of the follow-ups so it does not
    become the prior of ``frames``."""
    text = f" {clip.answer} </s>"
    if not clip.is_video or turns <= 1:
        return text
    extra = [q for q in clips.follow_ups(clip) if q[1] != "four" or rng.random() < 0.25]
    for k in rng.permutation(len(extra))[: turns - 1]:
        question, answer, _ = extra[int(k)]
        text += f" USER: {question} ASSISTANT: {answer} </s>"
    return text


def batch(args: argparse.Namespace, step: int) -> list[clips.Clip]:
    seed = args.seed * 10
    vids = [clips.make_clip(seed + CLIP_STREAM, step * args.clips + k,
                            clips.VIDEO_QUESTION_TYPES[(step * args.clips + k) % len(clips.VIDEO_QUESTION_TYPES)])
            for k in range(args.clips)]
    imgs = [clips.image_sample(seed + IMAGE_STREAM, step * args.images + k) for k in range(args.images)]
    return vids + imgs


def train(args: argparse.Namespace, model: Qwen2_5_VLForConditionalGeneration, tokenizer: PreTrainedTokenizerFast,
          held_out: list[clips.Clip]) -> None:
    head = torch.nn.Linear(model.config.text_config.hidden_size, sum(READOUTS))
    # (is_video, merged tokens) of each tower call: transformers encodes the images first, then the videos.
    captured: list[tuple[bool, torch.Tensor]] = []
    hook = model.model.visual.register_forward_hook(
        lambda m, a, kw, out: captured.append((bool((kw["grid_thw"][:, 0] > 1).any()), out.pooler_output)),
        with_kwargs=True,
    )
    # Frame index of each video token, read from the language model's hidden states after --time-layer.
    time_head = torch.nn.Linear(model.config.text_config.hidden_size, clips.FRAMES)
    params = list(model.parameters()) + list(head.parameters()) + list(time_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_at(step, args.steps, args.warmup)
        samples = batch(args, step)
        inputs = build_qwen.model_inputs(tokenizer, samples, [conversation(s, args.turns, rng) for s in samples])
        labels = labels_of(inputs, tokenizer)
        kwargs = dict(inputs)
        if rng.random() < args.drop_background:
            # Mask a random share of each clip's empty-cell tokens; positions from the unmasked batch.
            kwargs["position_ids"] = evaluate_video.positions_and_inputs(model, inputs)
            video = inputs["mm_token_type_ids"] == 2
            empty = ~torch.cat([s.object_mask.reshape(-1) for s in samples if s.is_video])
            share = torch.from_numpy(rng.uniform(0, 1, size=args.clips)).float().repeat_interleave(clips.TOKENS_PER_CLIP)
            drop = empty & (torch.from_numpy(rng.uniform(0, 1, size=empty.shape)).float() < share)
            mask = inputs["attention_mask"].clone()
            mask[video] = mask[video] * (~drop).to(mask.dtype)
            kwargs["attention_mask"] = mask
        captured.clear()
        out = model(**kwargs, labels=labels, output_hidden_states=args.time_layer > 0)
        feats = torch.cat([f for _, f in captured])
        targets = torch.cat([token_targets(samples, video) for video, _ in captured])
        aux = sum(F.cross_entropy(lg, targets[:, i]) for i, lg in enumerate(head(feats).split(READOUTS, -1))) / 4
        if args.time_layer > 0:
            hidden = out.hidden_states[args.time_layer][inputs["mm_token_type_ids"] == 2]
            frame = (torch.arange(clips.TOKENS_PER_CLIP) // clips.TOKENS_PER_FRAME).repeat(args.clips)
            aux = aux + F.cross_entropy(time_head(hidden), frame)
        loss = out.loss + args.aux * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.perf_counter() - t0
            log(f"step {step}/{args.steps} loss {out.loss.item():.3f} aux {aux.item():.3f} "
                f"({el / (step + 1):.2f} s/step, {el / 60:.1f} min)")
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            acc = evaluate_video.accuracy(model, tokenizer, held_out)
            model.train()
            log("val " + " ".join(f"{k} {v:.1%}" for k, v in acc.items() if k != "kept"))
    hook.remove()


def save(model: Qwen2_5_VLForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, out: Path, dtype: str) -> None:
    """fp16 weights on disk, ``config.json`` declaring float32 so ``from_pretrained`` upcasts for the CPU."""
    model.generation_config = build_qwen.generation_config(tokenizer)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    build_qwen.image_processor().save_pretrained(out)
    cfg_path = Path(out) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    for sub in ("text_config", "vision_config"):
        if sub in cfg and "dtype" in cfg[sub]:
            cfg[sub]["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (tests)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--clips", type=int, default=12, help="clips per step")
    p.add_argument("--images", type=int, default=4, help="single-frame questions per step")
    p.add_argument("--turns", type=int, default=4,
                   help="questions per training clip: its own, then follow-ups (tokprune.data.clips.follow_ups)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--aux", type=float, default=1.0, help="weight of the per-token colour/shape read-out (0: off)")
    p.add_argument("--time-layer", type=int, default=2,
                   help="read each video token's frame index from the LM's hidden states after this decoder layer "
                        "(0: off); see the module docstring")
    p.add_argument("--drop-background", type=float, default=0.5,
                   help="share of steps that mask a random share of the clips' empty-cell tokens (0: off)")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=200, help="held-out val clips for --eval-every")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not 0.0 <= args.drop_background <= 1.0:
        p.error(f"--drop-background is a probability in [0, 1], got {args.drop_background}")
    if args.smoke:
        args.steps, args.clips, args.images, args.warmup, args.eval_every, args.eval_n = 3, 4, 2, 1, 0, 8
        args.log_every, args.time_layer = 1, min(args.time_layer, build_qwen.SMOKE_SIZES.lm_layers)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = build_qwen.SMOKE_SIZES if args.smoke else build_qwen.Sizes()
    t_start = time.perf_counter()
    log(f"args {vars(args)} sizes {asdict(sizes)}")
    tokenizer = build_qwen.build_tokenizer()
    model = Qwen2_5_VLForConditionalGeneration(build_qwen.qwen_config(sizes, tokenizer))
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    held_out = clips.clip_benchmark("val", args.eval_n)
    model.train()
    train(args, model, tokenizer, held_out)
    model.eval()
    metrics = {"train_seconds": time.perf_counter() - t_start}
    log(f"training wall time {metrics['train_seconds']:.0f}s")
    save(model, tokenizer, args.out, args.dtype)
    shipped = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.out).eval()
    metrics["shipped_val"] = evaluate_video.accuracy(shipped, tokenizer, held_out)
    log("shipped val " + json.dumps(metrics["shipped_val"]))
    return metrics


if __name__ == "__main__":
    main()
