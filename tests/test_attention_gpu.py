"""Triton attention on CUDA: bf16/fp16 forward, tangent and gradients at long odd lengths.

Rule (DESIGN.md): err(kernel vs fp32 reference) <= 2·err(torch in the same dtype vs fp32 reference)
+ atol. The same-dtype torch baseline is SDPA (flash backend where available) for O and dQ/dK/dV,
and `torch.func.jvp` of attention written in that dtype for the tangent.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
import triton

from vdistill.kernels.attention import attention, attention_jvp, attention_ref, bwd_select, tuning
from vdistill.kernels.attention.fwd import FWD_CONFIGS
from vdistill.kernels.attention.fwd_jvp import JVP_CONFIGS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def no_autotuning(monkeypatch):
    """Each kernel's first config that fits (autotuning every odd shape would cost minutes of compiles);
    the benchmark checks the autotuned configs."""
    monkeypatch.setattr(tuning, "AUTOTUNE", False)


@pytest.fixture(params=[(False, False), (True, False), (True, True)], ids=["eager", "lazy", "lazy-pipelined"])
def rescale(request, monkeypatch):
    """Forward and forward+tangent kernels pinned to their default tile with eager or lazy rescale; their KV
    loops plain or software-pipelined."""
    lazy, pipeline = request.param
    for module, name, (m, n, w, s, _), extra in (
        ("vdistill.kernels.attention.fwd", "_attn_fwd_kernel", FWD_CONFIGS[0], {"PIPELINE": pipeline}),
        ("vdistill.kernels.attention.fwd_jvp", "_attn_fwd_jvp_kernel", JVP_CONFIGS[0], {"PIPELINE": pipeline}),
    ):
        kw = {"BLOCK_M": m, "BLOCK_N": n, "LAZY_RESCALE": lazy} | extra
        kernel = getattr(sys.modules[module], name)
        monkeypatch.setattr(kernel, "configs", [triton.Config(kw, num_warps=w, num_stages=s)])
    return lazy


SHAPES = [  # (B, H, Nq, Nk, D)
    (1, 2, 999, 999, 64),
    (1, 2, 1000, 1000, 128),
    (1, 1, 4097, 4097, 128),
    (2, 3, 999, 77, 64),  # cross-attention, short text
    (1, 2, 1, 17, 128),
    (2, 2, 257, 257, 24),  # zero-padded head dim (the `tiny` DiT)
]
ATOL = {torch.bfloat16: 2e-3, torch.float16: 5e-4}


def _qkv(shape, dtype, seed=0, bnhd=True):
    B, H, Nq, Nk, D = shape
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(n):
        if bnhd:  # the DiT's transposed view of [B, N, H, D]
            return torch.randn(B, n, H, D, device="cuda", generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, H, n, D, device="cuda", generator=g).to(dtype)

    return make(Nq), make(Nk), make(Nk)


def _f32(*ts):
    return tuple(t.float() for t in ts)


def _lowp(q, k, v):
    """Attention by torch entirely in the inputs' dtype (the same-precision tangent baseline)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(s, -1), v)


def _check(name, got, base, ref, atol):
    err = (got.float() - ref).abs().max().item()
    base_err = (base.float() - ref).abs().max().item()
    assert err <= 2 * base_err + atol, f"{name}: kernel err {err:.3g} vs torch same-dtype err {base_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward(shape, dtype, rescale):
    q, k, v = _qkv(shape, dtype)
    o = attention(q, k, v)
    assert o.stride() == q.stride()
    _check("O", o, F.scaled_dot_product_attention(q, k, v), attention_ref(*_f32(q, k, v)), ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_tangent(shape, dtype, rescale):
    q, k, v = _qkv(shape, dtype)
    tq, tk, tv = _qkv(shape, dtype, seed=1)
    with torch.no_grad():
        ref_o, ref_t = torch.func.jvp(attention_ref, _f32(q, k, v), _f32(tq, tk, tv))
        base_o, base_t = torch.func.jvp(_lowp, (q, k, v), (tq, tk, tv))
        o, t_o = attention_jvp(q, k, v, tq, tk, tv)
        fused_o, fused_t = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    _check("O (jvp kernel)", o, base_o, ref_o, ATOL[dtype])
    _check("tangent", t_o, base_t, ref_t, ATOL[dtype])
    _check("tangent via torch.func.jvp", fused_t, base_t, ref_t, ATOL[dtype])
    assert torch.equal(fused_o, o)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients(shape, dtype, backend, monkeypatch):
    monkeypatch.setattr(bwd_select, "BACKEND", backend)  # auto: PyTorch's flash backward on our O, LSE
    q, k, v = (t.requires_grad_() for t in _qkv(shape, dtype))
    do = _qkv(shape, dtype, seed=2, bnhd=False)[0]
    grads = torch.autograd.grad(attention(q, k, v), (q, k, v), do)
    base = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(attention_ref(qf, kf, vf), (qf, kf, vf), do.float())
    for name, g, b, r in zip(("dq", "dk", "dv"), grads, base, ref):
        _check(name, g, b, r, ATOL[dtype])


def test_fp32_inputs_are_tf32_accurate():
    """fp32 runs TF32 tensor-core dots (~1e-3 relative): forward, tangent and gradients."""
    shape = (1, 2, 999, 1000, 64)
    q, k, v = (t.requires_grad_() for t in _qkv(shape, torch.float32))
    tq, tk, tv = _qkv(shape, torch.float32, seed=1)
    f64 = lambda *ts: tuple(t.detach().double() for t in ts)
    ref_o, ref_t = torch.func.jvp(attention_ref, f64(q, k, v), f64(tq, tk, tv))
    rel = lambda got, want: ((got.double() - want).abs().max() / want.abs().max()).item()
    o = attention(q, k, v)
    assert rel(o, ref_o) < 5e-3
    with torch.no_grad():
        assert rel(attention_jvp(q, k, v, tq, tk, tv)[1], ref_t) < 5e-3
    do = torch.randn_like(o)
    refs = tuple(t.requires_grad_() for t in f64(q, k, v))
    attention_ref(*refs).backward(do.double())
    for got, want in zip(torch.autograd.grad(o, (q, k, v), do), refs):
        assert rel(got, want.grad) < 5e-3


def test_poisoned_output_fully_written(monkeypatch):
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: empty_like(*a, **kw).fill_(float("nan")))
    q, k, v = _qkv((1, 3, 1000, 999, 128), torch.bfloat16)
    with torch.no_grad():
        o, t_o = attention_jvp(q, k, v, *_qkv((1, 3, 1000, 999, 128), torch.bfloat16, seed=1))
    assert torch.isfinite(o).all() and torch.isfinite(t_o).all()
    assert torch.isfinite(attention(q, k, v)).all()
