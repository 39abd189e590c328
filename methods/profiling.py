"""NVTX ranges and an Nsight capture window, no-ops without CUDA.

Every trainer phase runs inside `nvtx_range(name)`, so an `nsys` timeline shows teacher, student
forward/backward, optimiser and EMA blocks per step. `CaptureWindow(start, stop)` calls
cudaProfilerStart/Stop around steps [start, stop), for
`nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Push/pop an NVTX range when CUDA is available; otherwise do nothing."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


class CaptureWindow:
    """Start the CUDA profiler at step `start` and stop it at step `stop` (exclusive)."""

    def __init__(self, window: tuple[int, int] | None):
        if window is not None and not (0 <= window[0] < window[1]):
            raise ValueError(f"profile window must be (start, stop) with 0 <= start < stop, got {window}")
        self.window = window
        self.active = False

    def at_step(self, step: int) -> None:
        if self.window is None or not torch.cuda.is_available():
            return
        if step == self.window[0] and not self.active:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            self.active = True
        elif step == self.window[1] and self.active:
            self.close()

    def close(self) -> None:
        if self.active:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            self.active = False
