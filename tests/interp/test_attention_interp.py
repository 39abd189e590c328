"""The Triton attention kernels under Triton's CPU interpreter (run with TRITON_INTERPRET=1).

fp32 kernels against float64 references (tolerances an fp32 kernel deserves: sums of <= 100 terms,
so ~1e-6 relative; a masking or rescaling bug shows up at 1e-2 or worse), fp16 with the rule
err(kernel vs fp32 ref) <= 2·err(torch fp16 vs fp32 ref) + atol. bf16 dots are wrong in the
interpreter (DESIGN.md), so bf16 is tested on the GPU only. Outputs are poisoned with NaN before
each call so that an unwritten element fails the test.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import triton

from vdistill.kernels.attention import attention, attention_jvp, attention_ref

SHAPES = [  # (B, H, Nq, Nk, D): odd lengths, cross-attention, every supported small head dim
    (1, 1, 1, 1, 16),
    (2, 3, 17, 17, 32),
    (1, 2, 33, 97, 64),
    (1, 1, 97, 33, 16),
    (2, 1, 97, 1, 32),
]
LAYOUTS = ["contiguous", "bnhd", "d_strided"]
ATOL, RTOL = 2e-5, 1e-4  # fp32 kernel vs float64 reference


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every float tensor the launchers allocate starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


@pytest.fixture(params=[(True, False), (False, False), (True, True)], ids=["lazy", "eager", "lazy-pipelined"])
def rescale(request, monkeypatch):
    """Run the forward and forward+tangent kernels with the lazy (default) or the eager rescale, and their KV
    loops plain or software-pipelined."""
    lazy, pipeline = request.param
    tile = {"BLOCK_M": 16, "BLOCK_N": 16, "LAZY_RESCALE": lazy}
    for module, name, extra in (
        ("vdistill.kernels.attention.fwd", "_attn_fwd_kernel", {"PIPELINE": pipeline}),
        ("vdistill.kernels.attention.fwd_jvp", "_attn_fwd_jvp_kernel", {"PIPELINE": pipeline}),
    ):
        kernel = getattr(sys.modules[module], name)
        monkeypatch.setattr(kernel, "configs", [triton.Config(tile | extra, num_warps=1, num_stages=1)])
    return lazy


def _tensor(B, H, N, D, layout, dtype, g):
    """A [B, H, N, D] tensor with the given memory layout."""
    if layout == "bnhd":  # the DiT's transposed view of [B, N, H, D]
        return torch.randn(B, N, H, D, generator=g).to(dtype).transpose(1, 2)
    if layout == "d_strided":  # neither N nor D has unit stride
        return torch.randn(B, H, D, 2 * N, generator=g).to(dtype).transpose(2, 3)[:, :, ::2]
    return torch.randn(B, H, N, D, generator=g).to(dtype)


def _qkv(shape, layout="contiguous", dtype=torch.float32, seed=0):
    B, H, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(seed)
    return tuple(_tensor(B, H, n, D, layout, dtype, g) for n in (Nq, Nk, Nk))


def _f64(*ts):
    return tuple(t.double() for t in ts)


def _close(got, want, what):
    err = (got.double() - want).abs().max().item()
    assert torch.allclose(got.double(), want, rtol=RTOL, atol=ATOL), f"{what}: max abs err {err:.3g}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_lse(shape, layout, rescale):
    from vdistill.kernels.attention.ops import attention_fwd_op

    q, k, v = _qkv(shape, layout)
    c = 0.3
    o, lse = attention_fwd_op(q, k, v, c)
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * c
    _close(o, attention_ref(*_f64(q, k, v), scale=c), "O")
    _close(lse, torch.logsumexp(s, -1), "LSE")
    _close(attention(q, k, v, scale=c), attention_ref(*_f64(q, k, v), scale=c), "public O")


@pytest.mark.parametrize("layout", ["contiguous", "bnhd"])
@pytest.mark.parametrize("shape", SHAPES)
def test_tangent_against_func_jvp_and_finite_differences(shape, layout, rescale):
    q, k, v = _qkv(shape, layout)
    tq, tk, tv = _qkv(shape, layout, seed=1)
    o, t_o = attention_jvp(q, k, v, tq, tk, tv)
    ref = lambda a, b, d: attention_ref(a, b, d)
    want_o, want_t = torch.func.jvp(ref, _f64(q, k, v), _f64(tq, tk, tv))
    _close(o, want_o, "O")
    _close(t_o, want_t, "tangent vs func.jvp")
    h = 1e-6
    (qd, kd, vd), (tqd, tkd, tvd) = _f64(q, k, v), _f64(tq, tk, tv)
    fd = (ref(qd + h * tqd, kd + h * tkd, vd + h * tvd) - ref(qd - h * tqd, kd - h * tkd, vd - h * tvd)) / (2 * h)
    _close(t_o, fd, "tangent vs central differences")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_score_range(dtype, rescale):
    """Scores spanning ~±60 (log2 units): the running max jumps past the lazy threshold repeatedly."""
    shape = (1, 2, 33, 97, 32)
    q, k, v = _qkv(shape, "bnhd", dtype=dtype)
    tq, tk, tv = _qkv(shape, "bnhd", dtype=dtype, seed=1)
    ramp = torch.linspace(0.2, 4.0, 97, dtype=dtype)[:, None]  # later keys score ever higher
    k = (k * ramp).to(dtype)
    q = (q * 4).to(dtype)
    want_o, want_t = torch.func.jvp(attention_ref, _f64(q, k, v), _f64(tq, tk, tv))
    o, t_o = attention_jvp(q, k, v, tq, tk, tv)
    scale = want_t.abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # fp16 operands: P̃ and P̃⊙Ṡ rounded to fp16
    assert (o.double() - want_o).abs().max() <= tol, "O"
    assert (t_o.double() - want_t).abs().max() <= tol * max(scale, 1.0), "tangent"
    assert (attention(q, k, v).double() - want_o).abs().max() <= tol, "forward kernel O"


@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])  # dQ by its own kernel, or by atomics in dK/dV's
@pytest.mark.parametrize("layout", ["contiguous", "bnhd", "d_strided"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients(shape, layout, dq_mode, monkeypatch):
    from vdistill.kernels.attention import bwd

    monkeypatch.setattr(bwd, "DQ_MODE", dq_mode)
    q, k, v = (t.requires_grad_() for t in _qkv(shape, layout))
    do = _qkv(shape, layout, seed=2)[0]
    attention(q, k, v).backward(do)
    refs = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    attention_ref(*refs).backward(do.double())
    for name, x, want in zip(("dq", "dk", "dv"), (q, k, v), refs):
        if layout != "d_strided":  # dense inputs get gradients in their own layout (no copies)
            assert x.grad.stride() == x.stride()
        _close(x.grad, want.grad, name)


def test_forward_ad_paths_agree_with_reference(monkeypatch):
    """torch.func.jvp and forward_ad (fused one-pass path), partial tangents, and the
    AttentionForwardADFunction fallback taken when the inputs also require grad."""
    module = sys.modules["vdistill.kernels.attention.op"]
    fused_calls = []
    fused = module._fused_forward_ad
    monkeypatch.setattr(module, "_fused_forward_ad", lambda *a: fused_calls.append(fused(*a)) or fused_calls[-1])
    shape = (1, 2, 17, 33, 32)
    q, k, v = _qkv(shape, "bnhd")
    tq, tk, tv = _qkv(shape, "bnhd", seed=1)
    want = torch.func.jvp(attention_ref, _f64(q, k, v), _f64(tq, tk, tv))[1]
    with torch.no_grad():
        _close(torch.func.jvp(attention, (q, k, v), (tq, tk, tv))[1], want, "func.jvp")
    want_q = torch.func.jvp(lambda a: attention_ref(a, *_f64(k, v)), _f64(q), _f64(tq))[1]
    with fwAD.dual_level():
        _close(fwAD.unpack_dual(attention(*map(fwAD.make_dual, (q, k, v), (tq, tk, tv)))).tangent, want, "forward_ad")
        _close(fwAD.unpack_dual(attention(fwAD.make_dual(q, tq), k, v)).tangent, want_q, "q tangent only")
        qg = q.detach().requires_grad_()
        out = attention(fwAD.make_dual(qg, tq), k, v)
        _close(fwAD.unpack_dual(out).tangent, want_q, "fallback tangent")
    assert [r is not None for r in fused_calls] == [True, True, True, False]  # func.jvp, forward_ad x2, fallback
    out.sum().backward()
    ref_q = q.detach().double().requires_grad_()
    attention_ref(ref_q, *_f64(k, v)).sum().backward()
    _close(qg.grad, ref_q.grad, "fallback gradient")


def _lowp(q, k, v):
    """Attention computed by torch entirely in the inputs' dtype (the same-precision baseline)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(s, -1), v)


def test_fp16_within_twice_torch_error():
    shape = (1, 2, 33, 97, 64)
    q, k, v = _qkv(shape, "bnhd", dtype=torch.float16)
    tq, tk, tv = _qkv(shape, "bnhd", dtype=torch.float16, seed=1)
    f32 = lambda *ts: tuple(t.float() for t in ts)
    ref_o, ref_t = torch.func.jvp(attention_ref, f32(q, k, v), f32(tq, tk, tv))
    base_o, base_t = torch.func.jvp(_lowp, (q, k, v), (tq, tk, tv))
    o, t_o = attention_jvp(q, k, v, tq, tk, tv)
    for name, got, base, ref in (("O", o, base_o, ref_o), ("tangent", t_o, base_t, ref_t)):
        err, base_err = (got.float() - ref).abs().max(), (base.float() - ref).abs().max()
        assert err <= 2 * base_err + 1e-3, f"{name}: kernel err {err:.3g}, torch fp16 err {base_err:.3g}"


def test_tiny_dit_jvp_kernel_equals_reference(monkeypatch):
    """Model-level JVP of the `tiny` DiT (head dim 24, zero-padded to 32) with the Triton kernel vs the reference."""
    from vdistill.models import layers
    from vdistill.models.dit import build_dit
    from vdistill.models.jvp import jvp

    torch.manual_seed(0)
    model = build_dit("tiny").eval()
    for p in model.parameters():  # the output head is zero-initialised: give it weights
        p.data.normal_(0, 0.2)
    x, dx = torch.randn(1, 3, 2, 4, 4), torch.randn(1, 3, 2, 4, 4)
    time, dtime, text = torch.rand(1), torch.ones(1), torch.randn(1, 5, 16)
    got = {b: jvp(model, (x, time, text), (dx, dtime), backend=b) for b in ("func", "forward_ad")}
    monkeypatch.setattr(layers, "attention", attention_ref)
    want = jvp(model, (x, time, text), (dx, dtime), backend="func")
    for backend, (out, tangent) in got.items():
        assert want[1].abs().max() > 1e-3
        torch.testing.assert_close(out, want[0], rtol=1e-4, atol=1e-5, msg=f"{backend}: output")
        torch.testing.assert_close(tangent, want[1], rtol=1e-4, atol=1e-4, msg=f"{backend}: tangent")


@pytest.mark.parametrize("d", [8, 24, 48])
def test_padded_head_dims(d):
    """Head dims the kernels are not compiled for run zero-padded: O, tangent, gradients (DiT `tiny`: 24)."""
    shape = (1, 2, 17, 33, d)
    q, k, v = (t.requires_grad_() for t in _qkv(shape, "bnhd"))
    tq, tk, tv = _qkv(shape, "bnhd", seed=1)
    with torch.no_grad():
        o, t_o = attention_jvp(q, k, v, tq, tk, tv)
    want_o, want_t = torch.func.jvp(attention_ref, _f64(q, k, v), _f64(tq, tk, tv))
    _close(o, want_o, "O")
    _close(t_o, want_t, "tangent")
    out = attention(q, k, v)
    assert out.shape == q.shape and out.stride() == q.stride()
    do = torch.randn_like(out)
    refs = tuple(t.detach().double().requires_grad_() for t in (q, k, v))
    attention_ref(*refs).backward(do.double())
    for name, x, got, want in zip(("dq", "dk", "dv"), (q, k, v), torch.autograd.grad(out, (q, k, v), do), refs):
        assert got.stride() == x.stride()
        _close(got, want.grad, name)


def test_kernel_refuses_unsupported_head_dim_and_dtype():
    q, k, v = _qkv((1, 1, 4, 4, 160))
    with pytest.raises(ValueError, match="head dim"):
        attention(q, k, v)
    q, k, v = _qkv((1, 1, 4, 4, 16))
    with pytest.raises(TypeError, match="float64"):
        attention(q.double(), k.double(), v.double())


def test_flop_counts_of_the_custom_ops_equal_the_reference_paths():
    """FlopCounterMode sees each custom op as one node: its registered formula must give the reference's count."""
    from torch.utils.flop_counter import FlopCounterMode

    from vdistill.kernels.attention import attention_ref

    q, k, v = (t.requires_grad_() for t in _qkv((2, 3, 33, 17, 32)))
    counts = []
    for fn in (attention, attention_ref):
        with FlopCounterMode(display=False) as train:
            fn(q, k, v).sum().backward()
        with torch.no_grad(), FlopCounterMode(display=False) as jvp:
            torch.func.jvp(fn, (q.detach(), k.detach(), v.detach()), (q.detach(), k.detach(), v.detach()))
        counts.append((train.get_total_flops(), jvp.get_total_flops()))
    assert counts[0] == counts[1] == (12 * 2 * 3 * 33 * 17 * 32, 12 * 2 * 3 * 33 * 17 * 32)
