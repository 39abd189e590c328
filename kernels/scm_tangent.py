"""Fused sCM training tangent with per-sample normalisation (Lu & Song 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models"; TrigFlow, σ_d = 1).

With the tangent warm-up factor r and the tangent normalisation of sCM, per sample b:

    g = −cos²t·(F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + dF⁻/dt),      ĝ = g / (‖g‖₂ + c),

the norm over all non-batch dimensions. Two launches: per-block partial sums of g² (written to
a [B, blocks] buffer: deterministic, no atomics), then a pass that reduces each sample's partials
in a fixed order and writes ĝ (g is recomputed rather than stored).

All math in float32 (float64 in the CPU reference for float64 inputs); ĝ is written in the
promoted input dtype. Non-contiguous inputs are copied to contiguous memory first; outputs carry
no autograd history (the sCM target is a constant of the loss).
"""

from __future__ import annotations

import functools

import torch

from vdistill.kernels.dispatch import HAS_TRITON, use_triton
from vdistill.kernels.trigflow import _bcast, _check_batch, _check_float

__all__ = ["scm_tangent", "scm_tangent_ref"]

TANGENT_BLOCK = 4096
TANGENT_WARPS = 8
REDUCE_BLOCK = 1024

if HAS_TRITON:
    import triton
    import triton.language as tl

    from vdistill.kernels.trigflow import _cos_sin

    @triton.jit
    def _scm_g(f_ptr, dx_ptr, xt_ptr, df_ptr, t_ptr, b, base, idx, mask, r):
        c, s = _cos_sin(tl.load(t_ptr + b).to(tl.float32))
        f = tl.load(f_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        dx = tl.load(dx_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(xt_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        df = tl.load(df_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        return -(c * c) * (f - dx) - (r * c * s) * (xt + df)

    @triton.jit
    def _scm_sumsq_kernel(f_ptr, dx_ptr, xt_ptr, df_ptr, t_ptr, partial_ptr, n, blocks_per_sample, r,
                          BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // blocks_per_sample
        idx = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        g = _scm_g(f_ptr, dx_ptr, xt_ptr, df_ptr, t_ptr, b, b.to(tl.int64) * n, idx, mask, r)
        g = tl.where(mask, g, 0.0)
        tl.store(partial_ptr + pid, tl.sum(g * g, axis=0))

    @triton.jit
    def _scm_normalize_kernel(f_ptr, dx_ptr, xt_ptr, df_ptr, t_ptr, partial_ptr, out_ptr, norm_ptr,
                              n, blocks_per_sample, r, c_eps,
                              BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // blocks_per_sample
        blk = pid % blocks_per_sample
        acc = tl.zeros([RBLOCK], dtype=tl.float32)
        for i in range(0, blocks_per_sample, RBLOCK):  # same order in every program: same norm
            k = i + tl.arange(0, RBLOCK)
            acc += tl.load(partial_ptr + b * blocks_per_sample + k, mask=k < blocks_per_sample, other=0.0)
        norm = tl.sqrt(tl.sum(acc, axis=0))
        if blk == 0:
            tl.store(norm_ptr + b, norm)
        idx = blk * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        base = b.to(tl.int64) * n
        g = _scm_g(f_ptr, dx_ptr, xt_ptr, df_ptr, t_ptr, b, base, idx, mask, r)
        tl.store(out_ptr + base + idx, (g / (norm + c_eps)).to(out_ptr.dtype.element_ty), mask=mask)


def _check_tangent_inputs(tensors: dict[str, object], t: object, r: object, c: object) -> tuple[torch.Tensor, torch.dtype]:
    """Validate the four [B, ...] inputs, t, r and c; -> (t, the promoted dtype of the inputs = ĝ's dtype)."""
    for name, x in tensors.items():
        _check_float(x, name)
    first, ref = next(iter(tensors.items()))
    for name, x in tensors.items():
        if x.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, {first} {tuple(ref.shape)}: all must match")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device}, {first} on {ref.device}")
    t = _check_batch(ref, t, first)
    for name, val in (("r", r), ("c", c)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or val != val or abs(val) == float("inf"):
            raise TypeError(f"{name} must be a finite float, got {val!r}")
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    return t, functools.reduce(torch.promote_types, (x.dtype for x in tensors.values()))


def scm_tangent_ref(
    F_minus: torch.Tensor,
    dxt_dt: torch.Tensor,
    x_t: torch.Tensor,
    dF_dt: torch.Tensor,
    t: torch.Tensor,
    r: float,
    c: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference sCM tangent: inputs [B, ...] (same shape), t [B] -> (g/(‖g‖+c) [B, ...], ‖g‖ [B]).

    g = −cos²t·(F⁻ − dx_t/dt) − r·cos t·sin t·(x_t + dF⁻/dt), in float32 (float64 if any input is
    float64); ĝ in the promoted input dtype, ‖g‖ in the compute dtype.
    """
    named = {"F_minus": F_minus, "dxt_dt": dxt_dt, "x_t": x_t, "dF_dt": dF_dt}
    t, out_dtype = _check_tangent_inputs(named, t, r, c)
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    cos, sin = _bcast(torch.cos(t.to(compute)), F_minus, compute), _bcast(torch.sin(t.to(compute)), F_minus, compute)
    f, dx, xt, df = (x.to(compute) for x in (F_minus, dxt_dt, x_t, dF_dt))
    g = -(cos * cos) * (f - dx) - (r * cos * sin) * (xt + df)
    norm = g.flatten(1).square().sum(dim=1).sqrt()
    return (g / (_bcast(norm, g, compute) + c)).to(out_dtype), norm


def scm_tangent(
    F_minus: torch.Tensor,
    dxt_dt: torch.Tensor,
    x_t: torch.Tensor,
    dF_dt: torch.Tensor,
    t: torch.Tensor,
    r: float,
    c: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused sCM tangent and its per-sample normalisation (module docstring): -> (ĝ, ‖g‖).

    F_minus, dxt_dt, x_t, dF_dt: [B, ...] of one shape, any float dtypes; t [B]; r the tangent
    warm-up factor; c the normalisation constant. ĝ [B, ...] in the promoted input dtype, ‖g‖ [B]
    float32 (the Triton path computes in float32 throughout).
    """
    named = {"F_minus": F_minus, "dxt_dt": dxt_dt, "x_t": x_t, "dF_dt": dF_dt}
    t, out_dtype = _check_tangent_inputs(named, t, r, c)
    if not use_triton(F_minus, dxt_dt, x_t, dF_dt, t):
        with torch.no_grad():
            return scm_tangent_ref(F_minus, dxt_dt, x_t, dF_dt, t, r, c)
    f, dx, xt, df = (x.detach().contiguous() for x in (F_minus, dxt_dt, x_t, dF_dt))
    B = f.shape[0]
    n = f[0].numel()
    out = torch.empty(f.shape, dtype=out_dtype, device=f.device)
    norm = torch.zeros(B, dtype=torch.float32, device=f.device)
    if n == 0:
        return out, norm
    bps = triton.cdiv(n, TANGENT_BLOCK)
    partial = torch.empty(B * bps, dtype=torch.float32, device=f.device)
    tc = t.detach().contiguous()
    _scm_sumsq_kernel[(B * bps,)](f, dx, xt, df, tc, partial, n, bps, float(r), BLOCK=TANGENT_BLOCK,
                                  num_warps=TANGENT_WARPS)
    _scm_normalize_kernel[(B * bps,)](f, dx, xt, df, tc, partial, out, norm, n, bps, float(r), float(c),
                                      BLOCK=TANGENT_BLOCK, RBLOCK=REDUCE_BLOCK, num_warps=TANGENT_WARPS)
    return out, norm
