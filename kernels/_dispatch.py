"""Where an op runs: compiled Triton on CUDA, Triton's interpreter on CPU when asked, else the reference.

`TRITON_INTERPRET=1` must be set before `kernels` is imported (Triton reads it when a kernel is
decorated). CI uses it to run the very same Triton code on CPU at small sizes.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS wheels of torch without triton
    HAS_TRITON = False


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when these tensors should go through the Triton kernel rather than the reference."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return INTERPRET and all(t.device.type == "cpu" for t in tensors)
