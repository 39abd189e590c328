"""Attention as `torch.library` custom ops, and the autograd.Function that differentiates them.

Three opaque ops, each with a fake (meta) implementation so `torch.compile` can trace them:
    vdistill::attention_fwd      (q, k, v, scale)               -> (O, LSE)
    vdistill::attention_fwd_jvp  (q, k, v, tq, tk, tv, scale)   -> (O, Ȯ, LSE)
    vdistill::attention_bwd      (dO, q, k, v, O, LSE, scale)   -> (dQ, dK, dV)
Each runs the Triton kernel where `kernels.dispatch.use_triton` says so (CUDA, or CPU under
TRITON_INTERPRET=1) and otherwise closed-form PyTorch math of the same contract (materialises
the Nq×Nk scores; CPU/testing only). The formulas are FlashAttention's (backward) and those of
`fwd_jvp.py` (tangent: Ṡ = c(Q̇Kᵀ + QK̇ᵀ), μ = rowsum(P⊙Ṡ), Ȯ = (P⊙Ṡ)V − μ⊙O + PV̇).

`AttentionFunction` wires them into autograd: `backward` uses the saved O and LSE.
`AttentionForwardADFunction` adds `jvp` (used by `torch.func.jvp` / `torch.autograd.forward_ad`
whenever the fused path of `op.attention` does not apply), which runs the one-pass
forward+tangent kernel. Derivatives beyond first order raise NotImplementedError.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from vdistill.kernels.attention.bwd import attention_bwd_triton
from vdistill.kernels.attention.bwd_select import attention_bwd_cuda
from vdistill.kernels.attention.fwd import attention_fwd_triton
from vdistill.kernels.attention.fwd_jvp import attention_fwd_jvp_triton
from vdistill.kernels.attention.tuning import padded_head_dim
from vdistill.kernels.dispatch import use_triton


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` cast and copied into a tensor with x's dtype and layout (the fake impls promise empty_like)."""
    out = torch.empty_like(x)
    out.copy_(value)
    return out


def _pad_head_dim(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Zero-pad the last dim to the compiled head dim 16/32/64/128 (a copy; only for other D <= 128)."""
    d_pad = padded_head_dim(ts[0].shape[-1])
    return [F.pad(t, (0, d_pad - t.shape[-1])) for t in ts]


def _math_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    ct = _compute_dtype(q)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)), lse


@torch.library.custom_op("vdistill::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """O [B, H, Nq, D] (q's dtype and layout) and LSE [B, H, Nq] (fp32) of softmax(scale·QKᵀ)V."""
    if use_triton(q, k, v):
        if padded_head_dim(q.shape[-1]) == q.shape[-1]:
            return attention_fwd_triton(q, k, v, scale)
        o, lse = attention_fwd_triton(*_pad_head_dim(q, k, v), scale)
        return _like(q, o[..., : q.shape[-1]]), lse
    p, lse = _math_probs(q, k, scale)
    return _like(q, torch.matmul(p, v.to(p.dtype))), lse.float()


@attention_fwd_op.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("vdistill::attention_fwd_jvp", mutates_args=())
def attention_fwd_jvp_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor, tv: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """O, its tangent Ȯ (both [B, H, Nq, D] in q's dtype and layout) and LSE [B, H, Nq] (fp32)."""
    if use_triton(q, k, v, tq, tk, tv):
        if padded_head_dim(q.shape[-1]) == q.shape[-1]:
            return attention_fwd_jvp_triton(q, k, v, tq, tk, tv, scale)
        o, t_o, lse = attention_fwd_jvp_triton(*_pad_head_dim(q, k, v, tq, tk, tv), scale)
        return _like(q, o[..., : q.shape[-1]]), _like(q, t_o[..., : q.shape[-1]]), lse
    p, lse = _math_probs(q, k, scale)
    ct = p.dtype
    vc = v.to(ct)
    sd = (torch.matmul(tq.to(ct), k.to(ct).transpose(-1, -2)) + torch.matmul(q.to(ct), tk.to(ct).transpose(-1, -2))) * scale
    ps = p * sd
    o = torch.matmul(p, vc)
    t_o = torch.matmul(ps, vc) - ps.sum(-1, keepdim=True) * o + torch.matmul(p, tv.to(ct))
    return _like(q, o), _like(q, t_o), lse.float()


@attention_fwd_jvp_op.register_fake
def _(q, k, v, tq, tk, tv, scale):
    return torch.empty_like(q), torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("vdistill::attention_bwd", mutates_args=())
def attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dQ, dK, dV) in the primals' dtypes, from dO, O and LSE (CUDA: `bwd_select.py`)."""
    if use_triton(do, q, k, v, o, lse):
        backward = attention_bwd_cuda if q.is_cuda else attention_bwd_triton
        if padded_head_dim(q.shape[-1]) == q.shape[-1]:
            return backward(do, q, k, v, o, lse, scale)
        grads = backward(*_pad_head_dim(do, q, k, v, o), lse, scale)
        return tuple(_like(p, g[..., : p.shape[-1]]) for p, g in zip((q, k, v), grads))
    ct = _compute_dtype(q)
    qc, kc, vc, doc = q.to(ct), k.to(ct), v.to(ct), do.to(ct)
    p = torch.exp(torch.matmul(qc, kc.transpose(-1, -2)) * scale - lse.to(ct).unsqueeze(-1))
    delta = (doc * o.to(ct)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(doc, vc.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kc) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qc) * scale
    dv = torch.matmul(p.transpose(-1, -2), doc)
    return _like(q, dq), _like(k, dk), _like(v, dv)


@attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _score_flops(q_shape, k_shape, per_score: int) -> int:
    """per_score FLOPs per (query, key, head-dim) triple: B·H·Nq·Nk·D·per_score."""
    b, h, nq, d = q_shape
    return per_score * b * h * nq * k_shape[2] * d


# FLOP counts for `torch.utils.flop_counter.FlopCounterMode` (MFU in `vdistill bench rcm-step`): model FLOPs,
# the matmuls the reference path runs (QKᵀ, PV; the JVP's six; the backward's four), not what a kernel
# recomputes (FlashAttention's papers count its backward as 10, with QKᵀ again)
@register_flop_formula(torch.ops.vdistill.attention_fwd)
def _(q, k, v, scale, *args, **kwargs) -> int:
    return _score_flops(q, k, 4)


@register_flop_formula(torch.ops.vdistill.attention_fwd_jvp)
def _(q, k, v, tq, tk, tv, scale, *args, **kwargs) -> int:
    return _score_flops(q, k, 12)


@register_flop_formula(torch.ops.vdistill.attention_bwd)
def _(do, q, k, v, o, lse, scale, *args, **kwargs) -> int:
    return _score_flops(q, k, 8)


def _tangent(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A missing tangent is zero: a stride-0 broadcast of one zero, so no memory is touched."""
    return like.new_zeros(()).expand(like.shape) if t is None else t


def _first_order_only(where: str, *tensors: torch.Tensor) -> None:
    """The custom ops have no derivative rules of their own (a forward-AD tangent on their inputs
    would be dropped silently), so refuse anything beyond first order instead of returning zeros."""
    level = torch._C._functorch.maybe_current_level()
    if (level is not None and level > 1) or any(fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"attention {where}: higher-order differentiation (nested torch.func transforms, forward-over-reverse) "
            "is not supported by the kernel; use vdistill.kernels.attention.attention_ref for that"
        )


class AttentionFunction(torch.autograd.Function):
    """softmax(scale·QKᵀ)V with reverse mode (`backward`). Returns (O, LSE); LSE is not differentiable."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_fwd_op(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, do: torch.Tensor, _dlse: torch.Tensor | None):
        q, k, v, o, lse = ctx.saved_tensors
        _first_order_only("backward", do, q, k, v, o)
        if torch.is_grad_enabled() and torch._C._functorch.maybe_current_level() is None:
            raise NotImplementedError("attention backward: double backward (create_graph=True) is not supported by the kernel")
        with torch.no_grad():  # torch.func.grad runs backward with grad on; the gradients need no graph
            dq, dk, dv = attention_bwd_op(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None


class AttentionForwardADFunction(AttentionFunction):
    """AttentionFunction plus `jvp` (one-pass forward+tangent kernel). Separate because Dynamo cannot
    trace a Function that defines `jvp`: compiled code and plain training use `AttentionFunction`."""

    @staticmethod
    def jvp(ctx, tq: torch.Tensor | None, tk: torch.Tensor | None, tv: torch.Tensor | None, _tscale):
        q, k, v = ctx.saved_tensors
        _first_order_only("jvp", q, k, v, *(t for t in (tq, tk, tv) if t is not None))
        _, t_o, _ = attention_fwd_jvp_op(q, k, v, _tangent(tq, q), _tangent(tk, k), _tangent(tv, v), ctx.scale)
        return t_o, None
