"""Attention entry point: softmax(c·QKᵀ)V in [B, H, N, D] layout, with backward and forward-mode AD.

Every attention layer of the models calls `attention` here. Dispatch (`kernels/dispatch.py`): CUDA
tensors run the Triton kernels (`fwd.py`, `fwd_jvp.py`, `bwd.py`, wired through `ops.py`); CPU
tensors run `attention_ref`, or the same Triton code interpreted when TRITON_INTERPRET=1 was set
before import.

Forward-mode AD: an autograd.Function's `jvp` runs only after a full forward, so `attention` looks
for forward-AD tangents on its inputs itself (`torch.autograd.forward_ad` duals, also how
`torch.func.jvp` presents them) and, when there is one forward-AD level and no reverse-mode graph
to record (sCM's JVP pass runs under no_grad), returns O and Ȯ from the one-pass kernel as a dual:
6 tile matmuls per KV block (12·B·H·Nq·Nk·D FLOPs, one sweep over K, V) instead of a forward plus
an LSE-reusing `jvp` (14·B·H·Nq·Nk·D, two sweeps). Inputs that also require grad go through
`AttentionForwardADFunction` (correct, one forward more); without tangents, and under
torch.compile (Dynamo cannot trace a Function with `jvp`), it is `AttentionFunction`. Nested
transforms (second order) raise NotImplementedError.
Backward on CUDA: `bwd_select.py` (our Triton backward, or PyTorch's flash backward on our O and LSE).
Kernel precision: fp32 accumulators; fp32 inputs use TF32 tensor-core dots on GPU.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.autograd.forward_ad as fwAD

from vdistill.kernels.attention.ops import AttentionForwardADFunction, AttentionFunction, attention_fwd_jvp_op
from vdistill.kernels.attention.tuning import MAX_HEAD_DIM
from vdistill.kernels.dispatch import use_triton

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree in B, H or D")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})")
    if not q.dtype.is_floating_point:
        raise TypeError(f"attention: q, k, v must be floating point, got dtype {q.dtype}")
    if q.shape[3] == 0:
        raise ValueError("attention: head dim D = q.shape[3] must be at least 1, got 0")
    if k.shape[2] == 0:
        raise ValueError("attention: k and v must have at least one token (Nk = 0: softmax over nothing)")


def _check_kernel_inputs(q: torch.Tensor) -> None:
    """What the Triton kernels support beyond `_check`: head dim, dtype, a non-empty query."""
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim D = q.shape[3] = {q.shape[3]} is not supported by the kernel (D <= {MAX_HEAD_DIM})")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"attention: q dtype {q.dtype} is not supported by the kernel; use float16, bfloat16 or float32")
    if q.shape[2] == 0:
        raise ValueError("attention: q must have at least one token (Nq = 0)")


def _check_tangents(primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...]) -> None:
    for name, p, t in zip(("tq", "tk", "tv"), primals, tangents):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention_jvp: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != p.shape:
            raise ValueError(f"attention_jvp: {name} has shape {tuple(t.shape)}, its primal {tuple(p.shape)}")
        if t.dtype != p.dtype:
            raise TypeError(f"attention_jvp: {name} has dtype {t.dtype}, its primal {p.dtype}")
        if t.device != p.device:
            raise ValueError(f"attention_jvp: {name} is on {t.device}, its primal on {p.device}")


def _scale(q: torch.Tensor, scale: float | None) -> float:
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _fold_scale(k: torch.Tensor, tk: torch.Tensor | None, c: float) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(k', tk', c') with c' > 0 and c'·QK'ᵀ = c·QKᵀ, for the kernels: they mask padded keys with -inf
    before scaling and take row maxima of unscaled scores, both valid only for c > 0. c < 0: (−K, −K̇, −c);
    c = 0: (0·K, 0·K̇, 1), uniform weights. Autograd and forward AD see the negation/product, so
    gradients and tangents need no other change; O keeps q's layout."""
    if c > 0:
        return k, tk, c
    sign = -1.0 if c < 0 else 0.0
    return k * sign, None if tk is None else tk * sign, abs(c) if c < 0 else 1.0


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Plain-PyTorch attention. q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D].

    Materialises the Nq×Nk score matrix (computed in float32 for half inputs): for tests and CPU.
    """
    _check(q, k, v)
    c = _scale(q, scale)
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * c
    return torch.matmul(torch.softmax(s, dim=-1), v.to(compute)).to(q.dtype)


def _records_grad(t: torch.Tensor) -> bool:
    """Whether autograd records `t`, also seen through torch.func's wrapper (which hides requires_grad)."""
    while True:
        if t.requires_grad:
            return True
        if not torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
        t = torch._C._functorch.get_unwrapped(t)


def _fused_forward_ad(unpacked: list, c: float) -> torch.Tensor | None:
    """O as a forward-AD dual computed by the one-pass kernel, or None when that path does not apply."""
    if torch._C._functorch.maybe_current_level() not in (None, 1):
        return None  # nested transforms (jvp of jvp, vmap, grad): let AttentionForwardADFunction compose them
    primals = [u.primal for u in unpacked]
    if torch.is_grad_enabled() and any(_records_grad(p) for p in primals):
        return None  # O must also record a reverse-mode graph
    tangents = [u.primal.new_zeros(()).expand(u.primal.shape) if u.tangent is None else u.tangent for u in unpacked]
    o, t_o, _ = attention_fwd_jvp_op(*primals, *tangents, c)
    return fwAD.make_dual(o, t_o)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Attention O = softmax(scale·QKᵀ)V. q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D].

    Any strides (e.g. `x.transpose(1, 2)` of a [B, N, H, D] tensor, read without a copy), Nq ≠ Nk
    allowed; scale defaults to 1/√D and may be any finite number (≤ 0 costs the kernel path a copy
    of k). The kernel path takes fp16, bf16 or fp32 and D <= 128; D in (16, 32, 64, 128) runs in
    place, other D are zero-padded to the next of those (a copy).
    Differentiable by `.backward()`, `torch.func.jvp` and `torch.autograd.forward_ad`, and
    traceable by `torch.compile`. O has q's dtype and memory layout.
    """
    _check(q, k, v)
    c = _scale(q, scale)
    if not use_triton(q, k, v):
        return attention_ref(q, k, v, scale=c)
    _check_kernel_inputs(q)
    k, _, c = _fold_scale(k, None, c)
    if torch.compiler.is_compiling():
        return AttentionFunction.apply(q, k, v, c)[0]
    unpacked = [fwAD.unpack_dual(t) for t in (q, k, v)]
    if all(u.tangent is None for u in unpacked):
        return AttentionFunction.apply(q, k, v, c)[0]
    fused = _fused_forward_ad(unpacked, c)
    if fused is not None:
        return fused
    return AttentionForwardADFunction.apply(q, k, v, c)[0]


def attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, Ȯ): attention and its directional derivative along tangents (tq, tk, tv), in one pass.

    q/tq [B, H, Nq, D], k/v/tk/tv [B, H, Nk, D] -> two [B, H, Nq, D] tensors (q's dtype and layout).
    Tangents must match their primals in shape, dtype and device. On the kernel path this is the
    fused Triton kernel; its outputs carry no reverse-mode graph (like sCM's JVP pass, call it under
    `torch.no_grad()`; backpropagating through them raises). On the reference path it is
    `torch.func.jvp` of `attention_ref`.
    """
    _check(q, k, v)
    _check_tangents((q, k, v), (tq, tk, tv))
    c = _scale(q, scale)
    if not use_triton(q, k, v, tq, tk, tv):
        return torch.func.jvp(lambda a, b, d: attention_ref(a, b, d, scale=c), (q, k, v), (tq, tk, tv))
    _check_kernel_inputs(q)
    k, tk, c = _fold_scale(k, tk, c)
    o, t_o, _ = attention_fwd_jvp_op(q, k, v, tq, tk, tv, c)
    return o, t_o
