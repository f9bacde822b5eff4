"""Data parallelism under ``torchrun``: shard the questions across ranks, gather on every rank.

Each rank evaluates questions ``rank, rank + world, ...`` (a strided shard, so question types stay
balanced across ranks); records carry their dataset index, so the gathered, re-sorted list is exactly what
one process produces (the adapter guarantees that batch composition does not change a sample's
tokens). Every rank receives all records and computes the same metrics; only rank 0 writes files and
prints. Backend: nccl when running on CUDA, gloo otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Dist", "init"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """Dataset indices this rank evaluates."""
        return list(range(self.rank, n, self.world_size))

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (a one-element list without torchrun)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init(device: str) -> Dist:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1); otherwise a single-process stand-in.

    ``device`` is the config's device; on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    if not cuda:
        # Ranks on one CPU share its cores; oversubscribed OpenMP threads make everything slower.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank, world, local_rank, backend)
