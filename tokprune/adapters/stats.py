"""The prefill's :class:`~tokprune.stats.PruneStats`: counts and FLOPs per sample and per image
(:class:`StatsRecorder`, mixed into the pruned decoder), copied to the host in one transfer per dtype."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..keptmap import KeptMap, take_merges
from ..stats import PruneStats
from .features import VisionOut

__all__ = ["StatsRecorder"]


class StatsRecorder:
    """Stats of one prefill (a part of :class:`~tokprune.adapters.decoder.PrunedDecoderAdapter`)."""

    # -- stats --------------------------------------------------------------------------------------

    def _stats(
        self,
        seq_len: Tensor,
        visual_kept: Tensor,
        llm_kept: dict[int, Tensor],
        layer_tokens: Tensor,
        layer_visual: Tensor,
        image_sample: Tensor,
        features: VisionOut | None,
        diagnostics: dict[str, Any],
        kept: tuple[dict[int, Tensor], dict[int, Tensor]] = ({}, {}),
    ) -> PruneStats:
        """Counts and FLOPs per sample, and per image (``image_sample`` long ``[I]``: each image's sample);
        ``kept``: the image tokens left after each LLM cut and their columns before it (:mod:`tokprune.keptmap`)."""
        fm = self._flops
        b, num_layers = layer_tokens.shape
        # index_add_, not bincount: CUDA's bincount reads the largest value on the host
        images = torch.zeros(b, dtype=torch.long, device=image_sample.device).index_add_(
            0, image_sample, torch.ones_like(image_sample)
        )
        runs = images
        if features is not None and features.tower_runs is not None:
            runs = torch.zeros_like(images).index_add_(0, image_sample, features.tower_runs.to(images.dtype))
        image_tokens = features.token_counts if features is not None else image_sample.new_zeros(0)
        image_kept = features.kept_counts if features is not None else image_sample.new_zeros(0)
        visual_unpruned = torch.zeros_like(seq_len).index_add_(0, image_sample, image_tokens.to(seq_len.dtype))
        # Unpruned, the projector maps every tower pass's N patches (LLaVA-NeXT's stock packing projects
        # each tile whole, then unpads); Qwen2.5-VL (N = 0 here) counts its merger with the tower.
        full_projected = runs * self._tokens_per_image if self._tokens_per_image else visual_unpruned
        projected = full_projected
        if self.pipeline.vision is not None:
            projected = visual_kept
            if features is not None and features.projected is not None:
                mapped = features.projected.to(visual_kept)
                projected = torch.zeros_like(visual_kept).index_add_(0, image_sample, mapped)
        tower = fm.vision(runs)
        if features is not None and features.tower_flops is not None:
            tower = torch.zeros_like(tower).index_add_(0, image_sample, features.tower_flops.to(tower))
        unpruned = fm.llm(seq_len[:, None].expand(-1, num_layers)) + tower + fm.projector(full_projected)
        pruned = fm.llm(layer_tokens) + tower + fm.projector(projected)
        named = {
            "visual_kept": visual_kept,
            "seq_len": seq_len,
            "layer_tokens": layer_tokens,
            "layer_visual": layer_visual,
            "flops_pruned": pruned,
            "flops_unpruned": unpruned,
            "images": images,
            "visual_unpruned": visual_unpruned,
            "image_sample": image_sample,
            "image_tokens": image_tokens,
            "image_kept": image_kept,
        }
        named.update((("llm", k), v) for k, v in llm_kept.items())
        if features is not None:
            named["vision_keep"] = features.keep
            named.update((("kept", k), v) for k, v in kept[0].items())
            named.update((("column", k), v) for k, v in kept[1].items())
        named.update((("diag", k), v) for k, v in diagnostics.items() if isinstance(v, Tensor))
        if features is not None and features.grid_thw is not None:
            named["frames"] = features.grid_thw[:, 0].to(image_tokens.device, torch.long)
            if features.videos is not None:
                named["videos"] = features.videos
        cpu = _to_host(named)
        image_tokens = cpu["image_tokens"]
        host_diagnostics = {k: cpu[("diag", k)] if isinstance(v, Tensor) else v for k, v in diagnostics.items()}
        kept_map = None
        if features is not None:
            kept_map = KeptMap(
                image_sample=cpu["image_sample"],
                tokens=image_tokens,
                vision=cpu["vision_keep"],
                cells=features.cells,
                layers={k: cpu[("kept", k)] for k in kept[0]},
                columns={k: cpu[("column", k)] for k in kept[1]},
            )
            # merge diagnostics become the map's merges (and stay out of the per-sample records)
            steps = {
                s.name if len(s.llm_layers) == 1 else f"{s.name}@{k}": k for s in self.pipeline.llm for k in s.llm_layers
            }
            vision = self.pipeline.vision.name if self.pipeline.vision is not None else None
            take_merges(kept_map, host_diagnostics, vision, steps)
        frames, frame_kept = cpu.get("frames"), None
        if frames is not None and features is not None and features.cells is not None:
            frame_kept = _frame_kept(features.cells, cpu["vision_keep"], frames)
        return PruneStats(
            # the largest image's count when images differ (LLaVA-1.5: every image's N)
            visual_total=int(image_tokens.max()) if image_tokens.numel() else self._tokens_per_image,
            visual_kept=cpu["visual_kept"],
            llm_kept={k: cpu[("llm", k)] for k in llm_kept},
            seq_len=cpu["seq_len"],
            layer_tokens=cpu["layer_tokens"],
            layer_visual=cpu["layer_visual"],
            flops_pruned=cpu["flops_pruned"],
            flops_unpruned=cpu["flops_unpruned"],
            images=cpu["images"],
            diagnostics=host_diagnostics,
            visual_unpruned=cpu["visual_unpruned"],
            image_sample=cpu["image_sample"],
            image_tokens=image_tokens,
            image_kept=cpu["image_kept"],
            flop_model=fm,
            kept=kept_map,
            image_frames=frames,
            image_video=cpu.get("videos"),
            frame_kept=frame_kept,
        )


def _frame_kept(cells: Tensor, keep: Tensor, frames: Tensor) -> Tensor:
    """long ``[I, T]``: tokens of each frame of each item the vision stage kept (0 past an item's frames),
    from the items' cells (long ``[I, N, 4]``, column 1 the frame, -1 past its tokens) and keep (bool ``[I, N]``)."""
    frame = cells[..., 1].to(torch.long)
    width = min(frame.shape[1], keep.shape[1])
    frame, keep = frame[:, :width], keep[:, :width].cpu()
    out = torch.zeros(frame.shape[0], int(frames.max()) if frames.numel() else 0, dtype=torch.long)
    return out.scatter_add_(1, frame.clamp_min(0), (keep & (frame >= 0)).long())


def _to_host(tensors: dict[Any, Tensor]) -> dict[Any, Tensor]:
    """Every tensor copied to the CPU with one transfer per dtype (each copy waits for the device).

    Tensors already on the CPU are only detached; the others are flattened, joined per dtype, copied
    once and cut back into their shapes.
    """
    out: dict[Any, Tensor] = {}
    groups: dict[tuple[torch.device, torch.dtype], list[Any]] = {}
    for key, value in tensors.items():
        value = value.detach()
        if value.device.type == "cpu":
            out[key] = value
        else:
            groups.setdefault((value.device, value.dtype), []).append(key)
    for keys in groups.values():
        parts = [tensors[k].detach() for k in keys]
        flat = torch.cat([p.reshape(-1) for p in parts]).cpu()
        for key, part, piece in zip(keys, parts, flat.split([p.numel() for p in parts])):
            out[key] = piece.view(part.shape)
    return out
