"""NVTX ranges and an Nsight capture window.

Every trainer phase (and rCM's phases inside the student forward) runs inside `nvtx_range(name)`,
so an `nsys` timeline shows teacher, JVP pass, student forward/backward, optimiser and EMA blocks
per step. With the `nvtx` package (`pip install -e '.[profile]'`) the ranges go to an NVTX domain
"vdistill" (`nsys ... --nvtx-domain-include=vdistill`), one colour per phase, on CPU-only runs too
(nsys traces NVTX on the host); without it they go through `torch.cuda.nvtx` and need CUDA. With no
profiler attached a range costs about a microsecond of host time (docs/profiling.md).
`CaptureWindow(start, stop)` calls cudaProfilerStart/Stop around steps [start, stop), for
`nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

try:
    import nvtx

    DOMAIN = nvtx.get_domain("vdistill")
except ImportError:  # the optional `profile` extra
    DOMAIN = None

# colours of the phases (ranges named "<phase>" or "<phase> <detail>", e.g. "step 12"); others grey
PHASE_COLORS = {
    "step": "white", "data": "cyan", "student_forward": "green", "student_backward": "darkgreen",
    "optimizer": "orange", "ema": "yellow", "auxiliary": "purple", "checkpoint": "red", "evaluate": "blue",
    "teacher": "brown", "jvp": "magenta", "simulate": "pink", "student": "lime", "dmd": "violet", "critic": "navy",
}


@functools.lru_cache(maxsize=512)
def _attributes(name: str):
    return DOMAIN.get_event_attributes(message=name, color=PHASE_COLORS.get(name.split(" ")[0], "grey"))


_OPEN_RANGES: list[str] = []  # names of the ranges open now, innermost last (read by `current_phase`)


def current_phase() -> str:
    """The innermost open range's name ("" outside any)."""
    return _OPEN_RANGES[-1] if _OPEN_RANGES else ""


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Push/pop an NVTX range: in the "vdistill" domain with the nvtx package, else through
    `torch.cuda.nvtx` when CUDA is available; with neither only `current_phase` sees it."""
    if DOMAIN is not None:
        DOMAIN.push_range(_attributes(name))
        pop = DOMAIN.pop_range
    elif torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        pop = torch.cuda.nvtx.range_pop
    else:
        pop = None
    _OPEN_RANGES.append(name)
    try:
        yield
    finally:
        _OPEN_RANGES.pop()
        if pop is not None:
            pop()


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
