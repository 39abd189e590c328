"""Where an op runs: compiled Triton on CUDA, Triton's interpreter on CPU when asked, else the reference.

`TRITON_INTERPRET=1` must be set before `kernels` is imported (Triton reads it when a kernel is
decorated). CI uses it to run the very same Triton code on CPU at small sizes.

`reference_kernels()` (or `VDISTILL_KERNELS=reference` in the environment) sends every op to
its PyTorch reference, on any device: the baseline of the end-to-end benchmarks, and a way to
rule the kernels out when a run misbehaves.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS wheels of torch without triton
    HAS_TRITON = False

_env_choice = os.environ.get("VDISTILL_KERNELS", "triton")
if _env_choice not in ("triton", "reference"):
    raise ValueError(f"VDISTILL_KERNELS must be 'triton' or 'reference', got {_env_choice!r}")
_force_reference = _env_choice == "reference"


@contextlib.contextmanager
def reference_kernels(enabled: bool = True) -> Iterator[None]:
    """Within the block, every kernel op runs its PyTorch reference (when `enabled`)."""
    global _force_reference
    previous, _force_reference = _force_reference, enabled
    try:
        yield
    finally:
        _force_reference = previous


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when these tensors should go through the Triton kernel rather than the reference."""
    if not HAS_TRITON or _force_reference:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return INTERPRET and all(t.device.type == "cpu" for t in tensors)
