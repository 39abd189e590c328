"""Attention entry point: softmax(c·QKᵀ)V in [B, H, N, D] layout.

Every attention layer of the models calls `attention` here, so the Triton kernel can replace the
reference without touching the model. The reference is plain PyTorch and therefore supports
autograd and forward-mode AD (`torch.func.jvp`, `torch.autograd.forward_ad`).
"""

from __future__ import annotations

import math

import torch


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
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


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Plain-PyTorch attention. q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D].

    Materialises the Nq×Nk score matrix (computed in float32 for half inputs): for tests and CPU.
    """
    _check(q, k, v)
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * c
    return torch.matmul(torch.softmax(s, dim=-1), v.to(compute)).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Attention O = softmax(scale·QKᵀ)V. q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D]."""
    return attention_ref(q, k, v, scale=scale)


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
    """(O, dO) for tangents (tq, tk, tv) of (q, k, v)."""
    return torch.func.jvp(lambda a, b, c: attention_ref(a, b, c, scale=scale), (q, k, v), (tq, tk, tv))
