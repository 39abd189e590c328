"""Output checks of the micro benchmarks: a provider is timed only after it matches the reference."""

from __future__ import annotations

import torch


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64 (normwise: robust to single rounding outliers in bf16)."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def tolerance(dtype: torch.dtype) -> float:
    """Normwise relative error allowed for an output computed in `dtype` (fp32 accumulation inside)."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """AssertionError naming the output unless got matches want within `tolerance(dtype)` (and want is not all
    zeros, which would make the check vacuous)."""
    assert bool(want.ne(0).any()), f"{name}: the reference is all zeros, nothing to check against"
    err, tol = relative_error(got, want), tolerance(dtype)
    assert err <= tol, f"{name}: relative error {err:.3g} against the reference exceeds {tol:g}"
