"""Shared argument checks: every error names the bad value and what would be accepted."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(name: str, t: object, ndim: int | tuple[int, ...], shape_doc: str) -> Tensor:
    """Raise ``ValueError`` unless ``t`` is a tensor with one of the ranks in ``ndim``."""
    ranks = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(t, Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dim() not in ranks:
        raise InputError(
            f"{name} must have shape {shape_doc} (rank {' or '.join(map(str, ranks))}), "
            f"got shape {tuple(t.shape)} (rank {t.dim()})"
        )
    return t


def check_float(name: str, t: Tensor) -> Tensor:
    if t.dtype not in FLOAT_DTYPES:
        raise InputError(f"{name} must be a floating tensor (one of {[str(d) for d in FLOAT_DTYPES]}), got {t.dtype}")
    return t


def check_bool(name: str, t: Tensor) -> Tensor:
    if t.dtype != torch.bool:
        raise InputError(f"{name} must be a bool tensor (True = kept/real), got {t.dtype}")
    return t


def check_same_leading(name: str, t: Tensor, ref_name: str, ref: Tensor, dims: int) -> None:
    if tuple(t.shape[:dims]) != tuple(ref.shape[:dims]):
        raise InputError(
            f"{name} leading shape {tuple(t.shape[:dims])} must equal {ref_name} leading shape "
            f"{tuple(ref.shape[:dims])}"
        )


def check_lengths(lengths: object, b: int, n: int) -> None:
    """``lengths`` of ragged rows: an integer ``[B]`` tensor with every entry in ``[0, n]``."""
    check_tensor("lengths", lengths, 1, "[B]")
    if lengths.shape[0] != b or lengths.dtype not in (torch.int32, torch.int64):
        raise InputError(
            f"lengths must be an integer tensor of shape [{b}], got {lengths.dtype} {tuple(lengths.shape)}"
        )
    if bool(((lengths < 0) | (lengths > n)).any()):
        raise InputError(
            f"lengths must lie in [0, {n}] (the row width), got min {int(lengths.min())} max {int(lengths.max())}"
        )


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


def score_dtype(t: Tensor) -> torch.dtype:
    """fp64 stays fp64; every other float (fp32/bf16/fp16) is scored in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
