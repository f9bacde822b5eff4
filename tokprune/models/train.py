"""Train the tiny LLaVA on the shapes world: ``python -m tokprune.models.train --out DIR``.

The LLaVA recipe scaled down, with fixed step counts so a seed reproduces a run:

(a) CLIP-style contrastive pre-training of a small ``CLIPVisionModel`` against a small text tower on
    full scene captions, with hard negative captions (colours swapped between objects, a shape or a
    colour changed) so the tower must bind colour to shape and the CLS token summarises the objects,
    plus a discarded linear read-out of each patch's row, column, object colour and shape
    (``--aux-patch``) so those are readable per patch;
(b) projector + Llama LM from scratch on visual instruction data with answer-only loss, the tower tuned
    lightly (read-out kept on): multi-turn conversations about each image (``--turns`` questions, then a
    caption turn, ``--describe``), LLaVA's data format, so one pass over the image tokens supervises
    several answers, and the caption is the one answer that names shapes.

Diagnostics (linear probe, CLS attention on objects, top/random/bottom-22% pruning, eval time, and a
held-out learning curve by question type every ``--eval-every`` steps) are printed. The output
directory is a complete llava-hf checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from tokprune.data import world
from tokprune.data.world import Sample, SceneObject, build_prompt, caption
from tokprune.models import build, diagnostics

# Disjoint training streams; benchmark seeds (world.BENCHMARK_SEEDS) are above 1e9.
CLIP_STREAM, VQA_STREAM, PROBE_STREAM = 1, 2, 3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stream_seed(seed: int, stream: int) -> int:
    return seed * 10 + stream


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%, as a multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(opt: torch.optim.Optimizer, mult: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * mult


# ---------------------------------------------------------------- (a) contrastive pre-training

def negative_objects(objects: list[SceneObject], rng: random.Random) -> list[SceneObject]:
    """A minimally wrong version of a scene: one binding, attribute or position error."""
    objs = list(objects)
    colors_in = {o.color for o in objs}
    # Binding errors (swapped colours) are what a bag-of-attributes tower cannot reject: weight them up.
    kinds = ["shape", "color", "size", "pos"] + (["swap"] * 3 if len(colors_in) > 1 else [])
    kind = rng.choice(kinds)
    if kind == "swap":
        i, j = rng.sample([k for k in range(len(objs))], 2)
        while objs[i].color == objs[j].color:
            i, j = rng.sample(range(len(objs)), 2)
        objs[i], objs[j] = replace(objs[i], color=objs[j].color), replace(objs[j], color=objs[i].color)
        return objs
    i = rng.randrange(len(objs))
    o = objs[i]
    if kind == "shape":
        objs[i] = replace(o, shape=rng.choice([s for s in world.SHAPES if s != o.shape]))
    elif kind == "color":
        objs[i] = replace(o, color=rng.choice([c for c in world.COLORS if c != o.color]))
    elif kind == "size":
        objs[i] = replace(o, size="large" if o.size == "small" else "small")
    else:
        # Mirror the object horizontally so its caption position flips.
        objs[i] = replace(o, x0=world.IMAGE_SIZE - o.x0 - o.side)
    return objs


def caption_batch(tokenizer: PreTrainedTokenizerFast, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<s> caption </s>`` ids ``[B, T]`` and the index of each ``</s>`` ``[B]``."""
    seqs = [tokenizer(c)["input_ids"] + [tokenizer.eos_token_id] for c in captions]
    t = max(map(len, seqs))
    ids = torch.full((len(seqs), t), tokenizer.pad_token_id)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) - 1 for s in seqs])


def clip_loss(clip: CLIPModel, tokenizer: PreTrainedTokenizerFast, samples: list[Sample],
              rng: random.Random, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE; images also contrast against one hard negative caption per scene.

    ``pooled``: the vision tower's ``pooler_output`` ``[B, D]`` when the caller already ran it.
    """
    if pooled is None:
        pooled = clip.vision_model(pixel_values=diagnostics.pixel_values_of(samples)).pooler_output
    img = clip.visual_projection(pooled)
    captions = [s.caption for s in samples] + [caption(negative_objects(s.objects, rng)) for s in samples]
    ids, eos = caption_batch(tokenizer, captions)
    hidden = clip.text_model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).last_hidden_state
    txt = clip.text_projection(hidden[torch.arange(len(ids)), eos])
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    scale = clip.logit_scale.exp().clamp(max=100)
    b = len(samples)
    target = torch.arange(b)
    i2t = scale * img @ txt.T
    t2i = scale * txt[:b] @ img.T
    return 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target))


class PatchHeads(torch.nn.Module):
    """Linear read-outs from feature-layer patch tokens (training only, discarded).

    Predicts each patch's column and row, the colour and shape of the object covering it (or
    background), and whether it is an object's first patch in raster order. Position is free self-supervision;
    without it the tiny tower's features kept almost no position (a linear probe read left/right of
    object patches at 58%) and the LM could not answer position questions. The attribute targets make
    shape readable per patch, which the contrastive loss alone did not (shape probe ~40%, chance 33%).
    The first-patch flag gives every object exactly one marked token, whatever its size, for counting.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.sizes = (world.GRID, world.GRID, len(world.COLORS) + 1, len(world.SHAPES) + 1, 2)
        self.proj = torch.nn.Linear(hidden, sum(self.sizes))

    def loss(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``feats`` ``[B, N, D]``, ``targets`` ``[B, N, 5]`` -> mean cross-entropy of the read-outs."""
        logits = self.proj(feats).split(self.sizes, dim=-1)
        # Colour and shape are scored on object patches only: background patches (~85%) would
        # otherwise dominate and shape, the hard read-out, would barely be learned.
        on_object = targets[..., 2] > 0
        losses = []
        for i, lg in enumerate(logits):
            y = targets[..., i].masked_fill(~on_object, -100) if i in (2, 3) else targets[..., i]
            losses.append(F.cross_entropy(lg.flatten(0, 1), y.flatten(), ignore_index=-100))
        return sum(losses) / len(losses)


def patch_targets(samples: list[Sample]) -> torch.Tensor:
    """``[B, N, 5]`` long: column, row, colour id, shape id (0 = background), first-patch flag per patch.

    An object's patches are those holding any of its pixels (objects sit on the patch grid with empty
    patches between them, so no patch is shared); its first patch in raster order is flagged.
    """
    p, g = world.PATCH_SIZE, world.GRID
    colors, shapes = list(world.COLORS), list(world.SHAPES)
    out = torch.zeros(len(samples), g * g, 5, dtype=torch.long)
    out[..., 0] = torch.arange(g * g) % g
    out[..., 1] = torch.arange(g * g) // g
    for b, s in enumerate(samples):
        for obj in s.objects:
            m = np.zeros((world.IMAGE_SIZE, world.IMAGE_SIZE), dtype=bool)
            m[obj.y0:obj.y0 + obj.side, obj.x0:obj.x0 + obj.side] = world._shape_mask(obj.shape, obj.side)
            cells = torch.from_numpy(np.flatnonzero(m.reshape(g, p, g, p).any(axis=(1, 3))))
            out[b, cells, 2] = colors.index(obj.color) + 1
            out[b, cells, 3] = shapes.index(obj.shape) + 1
            out[b, cells[0], 4] = 1
    return out


def init_sincos_positions(tower: torch.nn.Module) -> None:
    """Start the learned position embeddings at a 2D sin-cos table (CLS: zero).

    Same parameters as any CLIP tower; only the starting point differs, at a scale comparable to the
    patch embeddings so position is not drowned out before training starts.
    """
    emb = tower.embeddings.position_embedding.weight
    d = emb.shape[1] // 4
    freq = 1.0 / (100.0 ** (torch.arange(d) / d))
    g = world.GRID
    cols = (torch.arange(g * g) % g).float()[:, None] * freq
    rows = (torch.arange(g * g) // g).float()[:, None] * freq
    table = torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=-1)
    with torch.no_grad():
        emb.zero_()
        emb[1:, : table.shape[1]] = table


def pretrain_clip(args: argparse.Namespace, sizes: build.Sizes, tokenizer: PreTrainedTokenizerFast
                  ) -> tuple[CLIPModel, PatchHeads | None]:
    cfg = CLIPConfig(text_config=build.caption_text_config(sizes, tokenizer).to_dict(),
                     vision_config=build.vision_config(sizes).to_dict(), projection_dim=sizes.projection_dim)
    clip = CLIPModel(cfg)
    # Built only when used: constructing it draws from the torch RNG and would change later inits.
    heads = PatchHeads(sizes.vision_hidden) if args.aux_patch > 0 else None
    if args.sincos_init:
        init_sincos_positions(clip.vision_model)
    params = list(clip.parameters()) + (list(heads.parameters()) if heads is not None else [])
    opt = torch.optim.AdamW(params, lr=args.clip_lr, weight_decay=0.05)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    rng = random.Random(args.seed)
    seed = stream_seed(args.seed, CLIP_STREAM)
    t0 = time.perf_counter()
    for step in range(args.clip_steps):
        set_lr(opt, lr_at(step, args.clip_steps, args.warmup))
        samples = world.generate_samples(args.clip_batch, seed, start=step * args.clip_batch)
        vis = clip.vision_model(pixel_values=diagnostics.pixel_values_of(samples), output_hidden_states=True)
        loss = clip_loss(clip, tokenizer, samples, rng, pooled=vis.pooler_output)
        aux = torch.zeros(())
        if heads is not None:
            aux = heads.loss(vis.hidden_states[-2][:, 1:], patch_targets(samples))
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_patch * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.clip_steps - 1:
            log(f"clip step {step}/{args.clip_steps} loss {loss.item():.3f} aux {aux.item():.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    return clip, heads


# ---------------------------------------------------------------- (b) visual instruction tuning

def vqa_batch(tokenizer: PreTrainedTokenizerFast, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Left-padded LLaVA-1.5 conversations with labels only on each answer and its ``</s>``.

    Every turn of ``sample.dialogue`` follows the image: ``USER: <image>\nq1 ASSISTANT: a1</s>USER: q2
    ASSISTANT: a2</s>...``, LLaVA's multi-turn format; the first turn is exactly the inference prompt.
    """
    expanded = "<image>" * world.NUM_PATCHES
    seqs, labels = [], []
    for s in samples:
        ids: list[int] = []
        lab: list[int] = []
        for t, (question, answer, _) in enumerate(s.dialogue):
            if t == 0:
                prompt = tokenizer(build_prompt(question).replace("<image>", expanded))["input_ids"]
            else:
                prompt = tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
            reply = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids += prompt + reply
            lab += [-100] * len(prompt) + reply
        seqs.append(ids)
        labels.append(lab)
    t = max(map(len, seqs))
    ids = torch.full((len(seqs), t), tokenizer.pad_token_id)
    lab = torch.full((len(seqs), t), -100)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for b, (s, y) in enumerate(zip(seqs, labels)):
        ids[b, t - len(s):] = torch.tensor(s)
        lab[b, t - len(s):] = torch.tensor(y)
        mask[b, t - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab,
            "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
            "pixel_values": diagnostics.pixel_values_of(samples)}


def mask_background(batch: dict[str, torch.Tensor], samples: list[Sample], image_token_id: int,
                    prob: float, gen: torch.Generator) -> torch.Tensor:
    """Attention mask ``[B, T]`` with part of the background image tokens hidden from the LM.

    With probability ``prob`` a conversation loses a uniformly drawn fraction of its background patches
    (object patches always stay; position ids stay the original ones, as a pruned model's do). Without
    it the LM counted by comparing attention mass on matching object tokens with the mass on the
    background, a mechanism that breaks as soon as background tokens are pruned (counting fell from 97%
    to 4% with only the object patches kept): the world's background carries no information, and this
    makes the model's mechanisms agree.
    """
    is_image = batch["input_ids"] == image_token_id  # [B, T], NUM_PATCHES per row in raster order
    objects = torch.stack([s.object_mask for s in samples])  # [B, N]
    b, n = objects.shape
    fraction = torch.rand(b, 1, generator=gen) * (torch.rand(b, 1, generator=gen) < prob)
    hidden = (torch.rand(b, n, generator=gen) < fraction) & ~objects
    mask = batch["attention_mask"].clone()
    mask[is_image] = (~hidden).reshape(-1).to(mask.dtype)
    return mask


def vqa_samples(seed: int, step: int, batch: int, turns: int, describe: bool = False) -> list[Sample]:
    """Step ``step``'s training batch: single questions, or ``turns``-turn dialogues about each scene
    (with a closing caption turn if ``describe``)."""
    if turns == 1 and not describe:
        return world.generate_samples(batch, seed, start=step * batch)
    return [world.make_dialogue(seed, i, turns, describe) for i in range(step * batch, (step + 1) * batch)]


def vqa_loss(model: LlavaForConditionalGeneration, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, object]:
    """Answer-only LM loss and the tower's output (hidden states included) from one tower pass.

    Mirrors ``LlavaModel.get_image_features`` (feature layer, CLS dropped, projector) so the tower runs
    once for both the VQA loss and the joint contrastive loss.
    """
    batch = dict(batch)
    cfg = model.config
    vis = model.model.vision_tower(pixel_values=batch.pop("pixel_values"), output_hidden_states=True)
    feats = model.model.multi_modal_projector(vis.hidden_states[cfg.vision_feature_layer][:, 1:])
    ids = batch.pop("input_ids")
    embeds = model.get_input_embeddings()(ids)
    is_image = (ids == cfg.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(is_image, feats.to(embeds.dtype))
    return model(inputs_embeds=embeds, **batch).loss, vis


def train_vqa(args: argparse.Namespace, model: LlavaForConditionalGeneration, clip: CLIPModel,
              heads: PatchHeads | None, tokenizer: PreTrainedTokenizerFast,
              processor: build.LlavaProcessor | None = None, held_out: list[Sample] | None = None) -> None:
    """Projector + LM (lr ``args.lr``) and tower (``args.tower_lr``) on VQA, plus
    ``args.joint_clip`` x the contrastive loss so the CLS token stays meaningful while the tower moves."""
    clip.vision_model = model.model.vision_tower  # share the tower: one set of weights
    tower = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    aux_params = [p for p in clip.parameters() if id(p) not in tower_ids]
    aux_params += list(heads.parameters()) if heads is not None else []
    groups = [{"params": rest, "lr": args.lr}]
    if args.tower_lr > 0:
        groups.append({"params": tower, "lr": args.tower_lr})
        if args.joint_clip > 0 or args.aux_patch > 0:
            groups.append({"params": aux_params, "lr": args.tower_lr})
    else:
        for p in tower:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    seed = stream_seed(args.seed, VQA_STREAM)
    rng = random.Random(args.seed + 1)
    drop_gen = torch.Generator().manual_seed(args.seed)  # its own stream: the other draws stay as they were
    model.train()
    t0 = time.perf_counter()
    running = None
    for step in range(args.vqa_steps):
        set_lr(opt, lr_at(step, args.vqa_steps, args.warmup))
        samples = vqa_samples(seed, step, args.vqa_batch, args.turns, args.describe)
        batch = vqa_batch(tokenizer, samples)
        if args.drop_background > 0:
            batch["attention_mask"] = mask_background(batch, samples, model.config.image_token_id,
                                                      args.drop_background, drop_gen)
        joint = args.tower_lr > 0 and (args.joint_clip > 0 or heads is not None)
        loss, vis = vqa_loss(model, batch) if joint else (model(**batch).loss, None)
        total = loss
        if args.joint_clip > 0 and args.tower_lr > 0:
            total = total + args.joint_clip * clip_loss(clip, tokenizer, samples, rng, pooled=vis.pooler_output)
        if heads is not None and args.tower_lr > 0:
            feats = vis.hidden_states[model.config.vision_feature_layer][:, 1:]
            total = total + args.aux_patch * heads.loss(feats, patch_targets(samples))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.vqa_steps - 1:
            log(f"vqa step {step}/{args.vqa_steps} vqa loss {running:.3f} total {total.item():.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
        if args.eval_every and held_out and (step + 1) % args.eval_every == 0:
            # A learning curve per question type shows which skill is missing (e.g. binding colour to
            # shape) long before the run ends.
            model.eval()
            acc = diagnostics.accuracy_by_type(
                held_out, diagnostics.first_token_answers(model, processor, held_out))
            log(f"vqa step {step + 1} held-out first-token accuracy "
                + json.dumps({k: round(v, 3) for k, v in acc.items()}))
            model.train()
    model.eval()


# ---------------------------------------------------------------- diagnostics and saving

def report_tower(tower: torch.nn.Module, samples: list[Sample], stage: str) -> dict[str, float]:
    tower.eval()
    out = diagnostics.linear_probe(tower, samples[:200])
    for layer in (-2, -1):
        stats = diagnostics.cls_stats(tower, samples, layer=layer)
        out.update({f"L{layer}_{k}": v for k, v in stats.items()})
    log(f"[{stage}] tower: " + json.dumps({k: round(v, 3) for k, v in out.items()}))
    return out


def report_model(model: LlavaForConditionalGeneration, processor: build.LlavaProcessor,
                 samples: list[Sample]) -> dict:
    model.eval()
    out: dict = {"majority": diagnostics.majority_rates(samples)}
    for layer in (-2, -1):
        rep = diagnostics.pruning_report(model, processor, samples, keep=0.22, layer=layer)
        out[f"prune22_L{layer}"] = rep
        full = rep["full"]["overall"]
        log(f"[vqa] keep 22% by CLS layer {layer}: " + ", ".join(
            f"{k} {v['overall']:.3f} ({v['overall'] / max(full, 1e-9):.0%})" for k, v in rep.items()))
    acc, secs = diagnostics.generate_eval(model, processor, samples)
    out["generate"] = acc
    out["generate_seconds"] = secs
    log(f"[vqa] generate accuracy {json.dumps({k: round(v, 3) for k, v in acc.items()})} in {secs:.1f}s "
        f"for {len(samples)} questions; majority {out['majority']}")
    return out


def save(model: LlavaForConditionalGeneration, processor: build.LlavaProcessor, out: Path, dtype: str) -> None:
    """Write the checkpoint with weights stored in ``dtype`` but loading as float32 by default.

    Half-precision storage halves the repo footprint; CPU users (the audience of this model) want fp32
    compute, so ``config.json`` declares float32 and ``from_pretrained`` upcasts on load.
    """
    model.generation_config = build.generation_config(processor.tokenizer)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    processor.save_pretrained(out)
    set_load_dtype(out, "float32")


def set_load_dtype(out: Path, dtype: str) -> None:
    """Declare the dtype ``from_pretrained(dtype="auto")`` loads the checkpoint in."""
    cfg_path = Path(out) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = dtype
    for sub in ("text_config", "vision_config"):
        if sub in cfg and "dtype" in cfg[sub]:
            cfg[sub]["dtype"] = dtype
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (tests)")
    p.add_argument("--clip-steps", type=int, default=300)
    p.add_argument("--clip-batch", type=int, default=32)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--vqa-steps", type=int, default=3200)
    p.add_argument("--vqa-batch", type=int, default=24)
    p.add_argument("--turns", type=int, default=6,
                   help="questions per training image, as a multi-turn conversation (1: single turn)")
    p.add_argument("--describe", action=argparse.BooleanOptionalAction, default=True,
                   help="end each training conversation with a caption turn (world.CAPTION_REQUEST)")
    p.add_argument("--drop-background", type=float, default=0.5,
                   help="share of training conversations that see a random fraction of background patches "
                        "masked (0: off); see mask_background")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tower-lr", type=float, default=1e-4)
    p.add_argument("--joint-clip", type=float, default=0.0,
                   help="weight of the contrastive loss kept during VQA training (0: off)")
    p.add_argument("--aux-patch", type=float, default=1.0,
                   help="weight of the patch read-out loss (position, colour, shape per patch; 0: off)")
    p.add_argument("--sincos-init", action=argparse.BooleanOptionalAction, default=False,
                   help="start position embeddings at 2D sin-cos")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--eval-n", type=int, default=500, help="held-out (val split) questions for diagnostics")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=400,
                   help="every N VQA steps, print held-out accuracy by type (0: off)")
    p.add_argument("--eval-every-n", type=int, default=200, help="held-out questions for --eval-every")
    # One thread: on a shared 2-core CPU, two torch threads per process spent ~3x the CPU per step
    # (measured 2.5 vs 0.75 core-seconds) while colleagues' jobs competed for the cores.
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.turns < 1:
        p.error(f"--turns must be >= 1, got {args.turns}")
    if not 0.0 <= args.drop_background <= 1.0:
        p.error(f"--drop-background is a probability in [0, 1], got {args.drop_background}")
    if args.smoke:
        args.clip_steps, args.clip_batch, args.vqa_steps, args.vqa_batch = 3, 8, 3, 4
        args.warmup, args.eval_n, args.log_every = 1, 8, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    sizes = build.SMOKE_SIZES if args.smoke else build.Sizes()
    t_start = time.perf_counter()
    log(f"args {vars(args)} sizes {asdict(sizes)}")

    tokenizer = build.build_tokenizer()
    processor = build.build_processor(tokenizer)
    # Diagnostics use the val split: held out from training, distinct from the shipped test split.
    held_out = world.benchmark("val", args.eval_n)

    clip, heads = pretrain_clip(args, sizes, tokenizer)
    metrics: dict = {"sizes": asdict(sizes), "args": {k: str(v) for k, v in vars(args).items()}}
    metrics["after_clip"] = report_tower(clip.vision_model, held_out, "clip")

    model = LlavaForConditionalGeneration(build.llava_config(sizes, tokenizer))
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    train_vqa(args, model, clip, heads, tokenizer, processor, held_out[:args.eval_every_n])
    del clip, heads
    metrics["after_vqa_tower"] = report_tower(model.model.vision_tower, held_out, "vqa")
    metrics["train_seconds"] = time.perf_counter() - t_start
    log(f"training wall time {metrics['train_seconds']:.0f}s")
    metrics["fp32"] = report_model(model, processor, held_out)

    save(model, processor, args.out, args.dtype)
    shipped = LlavaForConditionalGeneration.from_pretrained(args.out)
    metrics["shipped"] = report_model(shipped, processor, held_out)
    metrics["total_seconds"] = time.perf_counter() - t_start
    log(f"total wall time {metrics['total_seconds']:.0f}s; saved to {args.out}")
    return metrics


if __name__ == "__main__":
    main()
