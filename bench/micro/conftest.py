"""pytest-benchmark set-up of the micro benchmarks: device, sizes, CUDA-synchronised timing, machine info.

The suite runs on CUDA when there is a GPU (the Triton kernels against their baselines at real
sizes) and on CPU otherwise (small sizes; every op dispatches to its PyTorch reference there, so a
CPU run checks that the benchmarks work, not how fast the kernels are). Each benchmark first checks
its provider's output against the reference, then times it; providers of one case share a
benchmark group, so pytest-benchmark's table shows them side by side.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from vdistill.bench.harness import run_meta


def pytest_configure(config) -> None:
    # torch.func.jvp registers its decompositions through torch.jit.script, deprecated in torch itself
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Add the GPU, the commit and the torch/Triton versions (bench/harness.py's run metadata) to every saved JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = run_meta(device, [])
    machine_info.update(gpu=meta["gpu"], torch=meta["torch"], triton=meta["triton"], vdistill_commit=meta["commit"])


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def timed(benchmark, device: torch.device):
    """timed(group, fn): time fn in benchmark `group`, synchronising CUDA after each call."""

    def run(group: str, fn: Callable[[], object]) -> None:
        benchmark.group = group
        if device.type == "cuda":

            def synced() -> None:
                fn()
                torch.cuda.synchronize(device)

            benchmark(synced)
        else:
            benchmark(fn)

    return run

