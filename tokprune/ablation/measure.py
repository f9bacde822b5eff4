"""Latency and memory measurement.

Latency comes from a forward hook on the top-level model, timed around one ``generate()`` call:

* **prefill** = from entering ``generate()`` to the end of the model's first forward (time to first token:
  tokenisation is excluded; the vision tower, projector, pruning and the LLM prefill are included);
* **decode per token** = (end of ``generate()`` - end of the first forward) / (number of forwards - 1),
  i.e. the mean time of one cached decoding step for the whole batch.

On CUDA each timestamp follows a ``torch.cuda.synchronize()``. Peak memory is
``torch.cuda.max_memory_allocated`` (reset per run) on GPU; on CPU the process's peak resident set size,
reset per run through ``/proc/self/clear_refs`` where Linux allows it (else the lifetime peak, flagged).
"""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["GenerateTimer", "PeakMemory", "Timing"]


@dataclass
class Timing:
    """One ``generate()`` call: seconds for prefill and all decode steps, and how many steps ran."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0


@dataclass
class GenerateTimer:
    """Hook a model's forward; ``with timer.measure() as t: model.generate(...)`` fills ``t``."""

    model: torch.nn.Module
    cuda: bool = False
    _marks: list[float] = field(default_factory=list)

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        self._marks.append(self._now())

    def measure(self) -> _Measure:
        return _Measure(self)


class _Measure:
    def __init__(self, timer: GenerateTimer) -> None:
        self.timer = timer
        self.timing = Timing()

    def __enter__(self) -> Timing:
        self.timer._marks = []
        self.handle = self.timer.model.register_forward_hook(self.timer._hook)
        self.start = self.timer._now()
        return self.timing

    def __exit__(self, *exc: Any) -> None:
        end = self.timer._now()
        self.handle.remove()
        marks = self.timer._marks
        if marks:
            self.timing.prefill_s = marks[0] - self.start
            self.timing.decode_s = end - marks[0]
            self.timing.decode_steps = len(marks) - 1


def _read_hwm_kb() -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak memory over a block: ``with PeakMemory(device) as pm: ...; pm.mb, pm.kind``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = 0.0
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            return self
        self.kind = "rss_peak_process"
        try:  # writing 5 resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            if _read_hwm_kb() is not None:
                self.kind = "rss_peak"
        except OSError:
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        kb = _read_hwm_kb() if self.kind == "rss_peak" else None
        if kb is None:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kb = maxrss // 1024 if sys.platform == "darwin" else maxrss  # macOS reports bytes
        self.mb = kb / 1024
