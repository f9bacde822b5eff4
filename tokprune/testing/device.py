"""The strategy contract on an accelerator: the same fabricated batches, moved to a device.

``check_on_device(spec, "cuda")`` runs every strategy of ``spec`` on the contract's batches in fp32,
bf16 and fp16 on the device: plans must be valid (the contract's shape, dtype, finiteness and
non-empty checks), live on the device, and in fp32 keep what the same strategy keeps on the CPU, up to
near-ties that different kernels may round the other way (``min_agreement`` of the positions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .contract import DTYPES, Batch, ContractFailure, LLMBatch, VisionBatch, _check_plan, make_batch, resolve, run

__all__ = ["check_on_device", "to_device"]


def to_device(batch: Batch, device: str | torch.device) -> Batch:
    """``batch`` with every tensor on ``device`` (the CPU-drawn values, so plans are comparable)."""
    if isinstance(batch, VisionBatch):

        def move(value: Any) -> Any:
            return tuple(v.to(device) for v in value) if isinstance(value, tuple) else value.to(device)

        signals = {s: move(v) for s, v in batch.signals.items()}
        return dataclasses.replace(batch, features=batch.features.to(device), signals=signals)
    if isinstance(batch, LLMBatch):
        return dataclasses.replace(
            batch,
            roles=batch.roles.to(device),
            hidden=batch.hidden.to(device),
            q=batch.q.to(device),
            k=batch.k.to(device),
        )
    raise TypeError(f"expected a VisionBatch or LLMBatch, got {type(batch).__name__}")


def check_on_device(strategy_or_spec: Any, device: str | torch.device, *, min_agreement: float = 0.98) -> None:
    """Every strategy of ``strategy_or_spec`` on ``device``, in every contract dtype (see the module doc).

    Strategies with a ``seed`` parameter draw from a device generator, so their fp32 plans are only
    checked for validity, not against the CPU's.

    Raises:
        ContractFailure: listing every failure.
    """
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    device = torch.device(device)
    failures = []
    for strategy in resolve(strategy_or_spec):
        for dtype in DTYPES:
            label = f"device[{device}, {dtype}]"
            try:
                cpu_batch = make_batch(strategy, dtype=dtype)
                batch = to_device(cpu_batch, device)
                plan = run(strategy, batch, label)
                _check_plan(strategy, batch, plan, label)
                if plan.keep.device.type != device.type:
                    raise ContractFailure(f"{strategy.spec()}: {label}: keep is on {plan.keep.device}")
                if dtype == torch.float32 and not hasattr(strategy.params, "seed"):
                    reference = run(strategy, cpu_batch, label).keep
                    agree = float((plan.keep.cpu() == reference).float().mean())
                    if agree < min_agreement:
                        raise ContractFailure(
                            f"{strategy.spec()}: {label}: keep agrees with the CPU plan on {agree:.1%} of positions "
                            f"< {min_agreement:.0%}"
                        )
            except ContractFailure as exc:
                failures.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - a crash on the device is a failure too, reported with its type
                failures.append(f"{strategy.spec()}: {label}: raised {type(exc).__name__}: {exc}")
    if failures:
        raise ContractFailure(f"{len(failures)} device check(s) failed:\n" + "\n".join(failures))
