"""Fused TrigFlow noising with in-kernel Philox noise (the sCM tangent is in `kernels.scm_tangent`).

TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", Sec. 2; σ_d = 1):

    x_t = cos t·x0 + sin t·ε,          v = dx_t/dt = cos t·ε − sin t·x0,      ε ~ N(0, I).

`trigflow_noise` draws ε inside the kernel and writes x_t and v in one pass (reads x0 once), so ε
never has to be stored: `trigflow_eps` regenerates it from (seed, offset).

Noise stream (Triton path, CUDA or interpreter): element i (flat index inside sample b of a
[B, ...] tensor) takes n_(i mod 4) of the Philox4x32-10 call (Triton's `tl.philox`) with key
`seed` and counter (i // 4, b, offset mod 2³², offset // 2³²). Its outputs r0..r3 give
(n0, n1) = BoxMuller(r0, r1) and (n2, n3) = BoxMuller(r2, r3), where BoxMuller(a, b) =
ρ·(cos θ, sin θ), ρ = sqrt(−2 ln((a + ½)·2⁻³²)), θ = 2π·⌊b/2⁸⌋·2⁻²⁴ − π/4. So ε depends only on
(seed, offset, b, i) (up to the evaluation of ln/sin/cos below): not on the batch size, device or
launch configuration, and different offsets give independent streams
(tests/interp/test_trigflow_interp.py rebuilds it in NumPy). The CPU path without the interpreter
draws ε with `torch.randn` from a `torch.Generator` seeded by a hash of (seed, offset):
deterministic too, but a different stream from the Triton one.

The noising kernel is bound by instruction issue unless its math is cheap, so Box–Muller is
evaluated two ways. For float32/float64 outputs, and always in the interpreter: our own ln and
sin/cos (plain `tl` arithmetic, |error| < 1e-7 and 3e-8), so the interpreter reproduces the GPU's
stream. For float16/bfloat16 outputs on CUDA: the SFU approximations through libdevice's
fast_logf, fast_cosf and fast_sinf (about 2⁻²¹ absolute error on these arguments per the CUDA
programming guide's intrinsics table, far below half-precision rounding;
tests/test_kernels_gpu_fused.py checks the difference). cos t and sin t come from the same
polynomial after reducing t/2π to [0, 1) (|error| < 1e-7·(1 + |t|)), avoiding the Payne–Hanek
slow path of libdevice's precise cosf/sinf. SASS counts per element (`vdistill bench sass-count`):
docs/results/trigflow.md.

All math in float32 (float64 in the CPU reference for float64 inputs); outputs are written in x0's
dtype. A non-contiguous x0 is copied to contiguous memory first. Outputs carry no autograd history
(noise is a constant of the loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vdistill.kernels.dispatch import HAS_TRITON, INTERPRET, use_triton

__all__ = ["trigflow_eps", "trigflow_noise", "trigflow_noise_ref"]

NOISE_GROUP = 4096  # elements per program of the noising kernel (16 per thread)
NOISE_WARPS = 8

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _ln(u):
        # ln u for u in (0, 1], |error| < 1e-7: u = m·2^e with m in [√½, √2), ln m = 2·atanh(s),
        # s = (m − 1)/(m + 1), |s| < 0.172, series to s⁹ (next term < 1e-9). About 4× cheaper than libdevice.
        bits = u.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127
        m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
        big = m > 1.4142135
        m = tl.where(big, m * 0.5, m)
        e = tl.where(big, e + 1, e)
        s = (m - 1.0) / (m + 1.0)
        s2 = s * s
        ln_m = s * (2.0 + s2 * (0.6666666667 + s2 * (0.4 + s2 * (0.2857142857 + s2 * 0.2222222222))))
        return e.to(tl.float32) * 0.6931471805599453 + ln_m

    @triton.jit
    def _cos_sin_turn(u):
        # (cos θ, sin θ) for θ = 2πu − π/4, u in [0, 1): quadrant q = ⌊4u⌋ and a Taylor polynomial on
        # |x| ≤ π/4 (|error| < 3e-8); θ is uniform on the circle whenever u is uniform.
        y = u * 4.0
        q = y.to(tl.int32)
        x = (y - q.to(tl.float32) - 0.5) * 1.5707963267948966
        x2 = x * x
        sn = x * (1.0 + x2 * (-0.16666666667 + x2 * (0.0083333333333 + x2 * (-1.9841269841e-4 + x2 * 2.7557319224e-6))))
        cs = 1.0 + x2 * (-0.5 + x2 * (0.041666666667 + x2 * (-1.3888888889e-3 + x2 * 2.4801587302e-5)))
        odd = (q & 1) == 1  # quarter turn: (cos, sin) -> (−sin, cos)
        a = tl.where(odd, -sn, cs)
        b = tl.where(odd, cs, sn)
        half = q >= 2  # half turn: negate both
        return tl.where(half, -a, a), tl.where(half, -b, b)

    @triton.jit
    def _cos_sin(t):
        # (cos t, sin t) through _cos_sin_turn with t/2π + 1/8 reduced to [0, 1)
        u = t * 0.15915494309189535 + 0.125
        return _cos_sin_turn(u - tl.floor(u))

    @triton.jit
    def _box_muller(r_a, r_b, FAST: tl.constexpr):
        # two uint32 -> two independent N(0, 1): u1 in (0, 1] from 32 bits (radius ≤ 6.8), u2 in [0, 1) from 24 bits
        u1 = (r_a.to(tl.float32) + 0.5) * 2.3283064365386963e-10
        u2 = (r_b >> 8).to(tl.float32) * 5.960464477539063e-08
        if FAST:
            radius = tl.sqrt(-2.0 * libdevice.fast_logf(u1))
            # θ = 2πu2 − π/4, taken into [−π, π) where sin.approx/cos.approx are most accurate
            theta = (u2 - (u2 >= 0.625).to(tl.float32)) * 6.283185307179586 - 0.7853981633974483
            c = libdevice.fast_cosf(theta)
            s = libdevice.fast_sinf(theta)
        else:
            radius = tl.sqrt(-2.0 * _ln(u1))
            c, s = _cos_sin_turn(u2)
        return radius * c, radius * s

    @triton.jit(do_not_specialize=["seed", "off_lo", "off_hi"])
    def _trigflow_noise_kernel(
        x0_ptr, t_ptr, xt_ptr, v_ptr, eps_ptr,  # [B, n] contiguous; t [B]
        n, blocks_per_sample, seed, off_lo, off_hi,
        MODE: tl.constexpr,  # 0: x_t, v;  1: x_t, v, ε;  2: ε only
        Q: tl.constexpr,  # Philox calls per program (4·Q elements)
        FAST: tl.constexpr,  # hardware ln/sin/cos approximations (half-precision outputs on CUDA)
    ):
        pid = tl.program_id(0)
        b = pid // blocks_per_sample
        blk = pid % blocks_per_sample
        c0 = (blk * Q + tl.arange(0, Q)).to(tl.uint32)
        zero = c0 * 0
        r0, r1, r2, r3 = tl.philox(seed, c0, zero + b.to(tl.uint32), zero + off_lo.to(tl.uint32),
                                   zero + off_hi.to(tl.uint32))
        n0, n1 = _box_muller(r0, r1, FAST)
        n2, n3 = _box_muller(r2, r3, FAST)
        # element 4k + q takes normal q of counter k ([k, i, j] of the joins is element 4k + 2i + j).
        # Joining keeps the 4 values in one thread, and the contiguity hint of 4 below gives the
        # loads/stores the same layout: vector accesses and no shared-memory layout conversion.
        eps = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [4 * Q])
        idx = tl.max_contiguous(tl.multiple_of(blk * (4 * Q) + tl.arange(0, 4 * Q), 4), 4)
        mask = idx < n
        base = b.to(tl.int64) * n
        if MODE != 2:
            c, s = _cos_sin(tl.load(t_ptr + b).to(tl.float32))
            x0 = tl.load(x0_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            tl.store(xt_ptr + base + idx, (c * x0 + s * eps).to(xt_ptr.dtype.element_ty), mask=mask)
            tl.store(v_ptr + base + idx, (c * eps - s * x0).to(v_ptr.dtype.element_ty), mask=mask)
        if MODE != 0:
            tl.store(eps_ptr + base + idx, eps.to(eps_ptr.dtype.element_ty), mask=mask)

# ----------------------------------------------------------------------------------- checks


def _check_float(x: object, arg: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{arg} must be a floating-point tensor, got {x.dtype}")
    return x


def _check_batch(x: torch.Tensor, t: object, arg: str) -> torch.Tensor:
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{arg} must be [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    t = _check_float(t, "t")
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape ({x.shape[0]},) (one time per sample of {arg}), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"t is on {t.device}, {arg} on {x.device}")
    if x[0].numel() >= 2**31 - NOISE_GROUP:
        raise ValueError(f"{arg}: {x[0].numel()} elements per sample, the kernels support < 2**31")
    return t


def _check_stream(seed: object, offset: object) -> None:
    for name, val, hi in (("seed", seed, 2**63), ("offset", offset, 2**64)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
        if not 0 <= val < hi:
            raise ValueError(f"{name} must be in [0, 2**{hi.bit_length() - 1}), got {val}")


def _cpu_generator(seed: int, offset: int) -> torch.Generator:
    mixed = (seed * 0x9E3779B97F4A7C15 + offset * 0xBF58476D1CE4E5B9 + 1) % 2**64
    return torch.Generator(device="cpu").manual_seed(mixed)


def _bcast(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).view((-1,) + (1,) * (like.dim() - 1))


# ----------------------------------------------------------------------------------- noising


def trigflow_noise_ref(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference noising given ε: x0, eps [B, ...], t [B] -> (x_t, v) in x0's dtype.

    x_t = cos t·x0 + sin t·ε, v = cos t·ε − sin t·x0, computed in float32 (float64 for float64 x0).
    """
    x0 = _check_float(x0, "x0")
    t = _check_batch(x0, t, "x0")
    eps = _check_float(eps, "eps")
    if eps.shape != x0.shape or eps.device != x0.device:
        raise ValueError(f"eps must match x0: {tuple(eps.shape)} on {eps.device} vs {tuple(x0.shape)} on {x0.device}")
    compute = torch.float64 if x0.dtype == torch.float64 else torch.float32
    c, s = _bcast(torch.cos(t.to(compute)), x0, compute), _bcast(torch.sin(t.to(compute)), x0, compute)
    x, e = x0.to(compute), eps.to(compute)
    return (c * x + s * e).to(x0.dtype), (c * e - s * x).to(x0.dtype)


def _launch_noise(
    x0: torch.Tensor | None,
    t: torch.Tensor | None,
    xt: torch.Tensor | None,
    v: torch.Tensor | None,
    eps: torch.Tensor | None,
    seed: int,
    offset: int,
    mode: int,
    *,
    group: int = NOISE_GROUP,
    warps: int = NOISE_WARPS,
) -> None:
    """Launch the noising kernel; tensors a mode does not touch are replaced by any valid one.

    `group` (elements per program, a power of two; below 4·32·warps threads idle) and `warps`
    change the launch only: element i always takes normal i mod 4 of Philox counter ⌊i/4⌋, so the output is the same
    bit for bit (`bench/bench_trigflow.py` times the candidates).
    """
    some = next(x for x in (x0, xt, eps) if x is not None)
    B, n = some.shape[0], some[0].numel()
    if n == 0:
        return
    bps = triton.cdiv(n, group)
    fast = not INTERPRET and some.dtype in (torch.float16, torch.bfloat16)
    x0, t, xt, v, eps = (some if x is None else x for x in (x0, t, xt, v, eps))
    _trigflow_noise_kernel[(B * bps,)](
        x0, t, xt, v, eps, n, bps, seed, offset % 2**32, offset // 2**32,
        MODE=mode, Q=group // 4, FAST=fast, num_warps=warps,
    )


def trigflow_eps(
    like: torch.Tensor | Sequence[int],
    seed: int,
    offset: int = 0,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Regenerate the ε that `trigflow_noise(x0, t, seed=seed, offset=offset)` draws for an x0 like `like`.

    like: a tensor [B, ...] (its shape, dtype and device are used unless given) or a shape.
    Returns ε [B, ...]; dtype defaults to float32 for a shape. Bitwise equal to the ε of
    `trigflow_noise(..., return_eps=True)` for the same shape, dtype and device.
    """
    _check_stream(seed, offset)
    if isinstance(like, torch.Tensor):
        shape, dtype, device = like.shape, dtype or like.dtype, device or like.device
    else:
        shape, dtype, device = torch.Size(like), dtype or torch.float32, torch.device(device or "cpu")
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"like must describe [B, ...] with B >= 1, got shape {tuple(shape)}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    eps = torch.empty(shape, dtype=dtype, device=device)
    if use_triton(eps):
        _launch_noise(None, None, None, None, eps, seed, offset, mode=2)
        return eps
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    gen = _cpu_generator(seed, offset)
    return torch.randn(shape, generator=gen, dtype=compute).to(device=device, dtype=dtype)


def trigflow_noise(
    x0: torch.Tensor, t: torch.Tensor, *, seed: int, offset: int = 0, return_eps: bool = False
) -> tuple[torch.Tensor, ...]:
    """Fused TrigFlow noising with in-kernel ε: x0 [B, ...], t [B] -> (x_t, v) or (x_t, v, ε).

    ε ~ N(0, I) is drawn from (seed, offset) (see the module docstring for the stream) and can be
    regenerated by `trigflow_eps`. x_t = cos t·x0 + sin t·ε and v = cos t·ε − sin t·x0 are computed
    in float32 and written in x0's dtype, as is ε. t may be any float dtype.
    """
    x0 = _check_float(x0, "x0")
    t = _check_batch(x0, t, "x0")
    _check_stream(seed, offset)
    x0 = x0.detach().contiguous()
    if use_triton(x0, t):
        xt, v = torch.empty_like(x0), torch.empty_like(x0)
        eps = torch.empty_like(x0) if return_eps else None
        _launch_noise(x0, t.detach().contiguous(), xt, v, eps, seed, offset, mode=1 if return_eps else 0)
        return (xt, v, eps) if return_eps else (xt, v)
    eps = trigflow_eps(x0, seed=seed, offset=offset)
    with torch.no_grad():
        xt, v = trigflow_noise_ref(x0, t, eps)
    return (xt, v, eps) if return_eps else (xt, v)
