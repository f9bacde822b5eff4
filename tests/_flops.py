"""The brute-force side of the FLOP-model tests: multiply-accumulates FlopCounterMode saw per module."""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode


def macs(counter: FlopCounterMode, prefix: str, *, convolutions: bool = False) -> int:
    """Multiply-accumulates the modules under ``prefix`` ran (each op once, at its outermost module);
    convolutions (the towers' patch embeddings) only with ``convolutions``."""
    counts = counter.get_flop_counts()
    total = 0
    for name, ops in counts.items():
        if name == prefix or name.startswith(prefix + "."):
            if any(other != name and name.startswith(other + ".") and other.startswith(prefix) for other in counts):
                continue  # a child of a module already summed
            total += sum(v for op, v in ops.items() if convolutions or "convolution" not in str(op))
    assert total % 2 == 0
    return total // 2
