"""The accelerator the device suites (tests/test_device.py) run on: ``--device`` (default ``cuda``).

Those tests take the ``device`` fixture and are skipped when it is not available, so CPU CI runs none
of them and needs no GPU. ``pytest tests/test_device.py --device cpu`` runs them on the CPU (it checks
the suite itself, comparing the CPU with itself).
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cuda", help="device of tests/test_device.py: cuda (default), cpu, cuda:1...")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    name = request.config.getoption("--device")
    kind = torch.device(name).type
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (device suites run with --device on a machine that has one)")
    if kind not in ("cpu", "cuda"):
        pytest.skip(f"--device {name!r}: the device suites know cpu and cuda")
    if kind == "cuda":
        # fp32 results are compared with the CPU's: TF32 matmuls and convolutions would round at ~1e-3.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return name


@pytest.fixture(params=[torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def device_dtype(request: pytest.FixtureRequest, device: str) -> torch.dtype:
    """fp32 everywhere; bf16 and fp16 on CUDA only (half-precision CPU kernels are slow and incomplete)."""
    if request.param != torch.float32 and torch.device(device).type == "cpu":
        pytest.skip("half precision runs on CUDA only")
    return request.param
