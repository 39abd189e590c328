"""Reliability of the Triton EMA and attention paths under Triton's CPU interpreter (TRITON_INTERPRET=1).

EMA: a parameter whose storage, shape, dtype or layout changes after the EMA was built (`p.data = ...`,
`.to(memory_format=...)`) must be followed or refused by name, never averaged through stale address
tables. Attention: every finite scale is valid, also 0 (uniform weights) and negative ones.
"""

from __future__ import annotations

import pytest
import torch

from vdistill.kernels.attention import attention, attention_jvp, attention_ref
from vdistill.kernels.ema import EMA, ema_update_ref
from vdistill.kernels.ema_schedule import EMAProfile

PROFILES = [EMAProfile(beta=0.9), EMAProfile(beta=0.5)]


def _ema_linear() -> tuple[torch.nn.Linear, EMA]:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 3)
    ema = EMA(m, PROFILES, block=128)
    ema.update()
    assert ema._plans, "the Triton path did not run"
    return m, ema


def test_ema_new_storage_same_shape_is_followed():
    m, ema = _ema_linear()
    m.weight.data = torch.full((3, 3), 2.0)
    refs = [[t.clone() for t in ema.tensors(k)] for k in range(2)]
    betas = ema.betas()
    ema.update()
    for k, beta in enumerate(betas):
        ema_update_ref(refs[k], list(m.parameters()), beta)
        for got, want in zip(ema.tensors(k), refs[k]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_ema_reshaped_parameter_is_refused_by_name():
    m, ema = _ema_linear()
    before = [t.clone() for t in ema.tensors(0)]
    m.weight.data = torch.full((8, 8), 100.0)  # 64 elements where the EMA has 9: used to spill into bias
    with pytest.raises(ValueError, match=r"params\[weight\].*\(8, 8\).*\(3, 3\)"):
        ema.update()
    for got, want in zip(ema.tensors(0), before):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"params\[weight\]"):  # still refused, not forgotten
        ema.update()


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_ema_unsupported_dtype_after_construction_is_refused(dtype):
    m, ema = _ema_linear()
    before = [t.clone() for t in ema.tensors(0)]
    m.bias.data = m.bias.data.to(dtype)  # float64 was silently skipped (no launch for its dtype)
    with pytest.raises(TypeError, match=r"params\[bias\].*" + str(dtype).split(".")[1]):
        ema.update()
    for got, want in zip(ema.tensors(0), before):
        assert torch.equal(got, want)


def test_ema_supported_dtype_change_rebuilds_tables():
    m, ema = _ema_linear()
    m.weight.data = m.weight.data.to(torch.float16)
    refs = [t.clone() for t in ema.tensors(0)]
    beta = ema.betas()[0]
    ema.update()
    ema_update_ref(refs, list(m.parameters()), beta)
    assert sorted(p.dtype_code for p in ema._plans) == [0, 2]
    for got, want in zip(ema.tensors(0), refs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_ema_non_contiguous_parameters_are_refused_by_name():
    conv = torch.nn.Conv2d(3, 4, 3)
    ema = EMA(conv, PROFILES, block=128)
    ema.update()
    conv.to(memory_format=torch.channels_last)  # weight: new storage, permuted strides, same shape
    with pytest.raises(ValueError, match=r"params\[weight\] is not contiguous"):
        ema.update()
    m, ema = _ema_linear()
    m.weight.data = torch.randn(3, 3).t()  # same shape, transposed strides
    with pytest.raises(ValueError, match=r"params\[weight\] is not contiguous"):
        ema.update()


SCALES = [0.0, -0.5, -3.0]
SHAPES = [(1, 2, 17, 33, 16), (2, 1, 5, 1, 32)]  # (B, H, Nq, Nk, D): a masked KV tail, a single key


def _qkv(shape, seed=0):
    B, H, Nq, Nk, D = shape
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g) for n in (Nq, Nk, Nk))


def _close(got, want, what):
    err = (got.double() - want).abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=2e-5), f"{what}: max abs err {err:.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_attention_forward_non_positive_scale(shape, scale):
    q, k, v = _qkv(shape)
    want = attention_ref(q.double(), k.double(), v.double(), scale=scale)
    _close(attention(q, k, v, scale=scale), want, "O")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_attention_jvp_non_positive_scale(shape, scale):
    q, k, v = _qkv(shape)
    tq, tk, tv = _qkv(shape, seed=1)
    want_o, want_t = torch.func.jvp(
        lambda a, b, c: attention_ref(a, b, c, scale=scale), (q.double(), k.double(), v.double()),
        (tq.double(), tk.double(), tv.double()),
    )
    with torch.no_grad():
        o, t_o = attention_jvp(q, k, v, tq, tk, tv, scale=scale)
    _close(o, want_o, "O")
    _close(t_o, want_t, "tangent")
    with torch.no_grad():  # the forward-AD entry (sCM's path) folds the scale the same way
        o, t_o = torch.func.jvp(lambda a, b, c: attention(a, b, c, scale=scale), (q, k, v), (tq, tk, tv))
    _close(o, want_o, "func.jvp O")
    _close(t_o, want_t, "func.jvp tangent")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_attention_backward_non_positive_scale(shape, scale):
    q, k, v = (t.requires_grad_() for t in _qkv(shape))
    do = _qkv(shape, seed=2)[0]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention(q, k, v, scale=scale).backward(do)
    attention_ref(q64, k64, v64, scale=scale).backward(do.double())
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        _close(got, want, name)


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_kernel_launchers_refuse_non_positive_scale(scale):
    """The launchers take only c > 0 (the public op folds the sign into k): a direct call raises, not NaN."""
    from vdistill.kernels.attention.bwd import attention_bwd_triton
    from vdistill.kernels.attention.fwd import attention_fwd_triton
    from vdistill.kernels.attention.fwd_jvp import attention_fwd_jvp_triton

    q, k, v = _qkv(SHAPES[1])
    o, lse = attention_fwd_triton(q, k, v, 0.5)
    with pytest.raises(ValueError, match="attention_fwd_triton: scale must be > 0"):
        attention_fwd_triton(q, k, v, scale)
    with pytest.raises(ValueError, match="attention_fwd_jvp_triton: scale must be > 0"):
        attention_fwd_jvp_triton(q, k, v, q, k, v, scale)
    with pytest.raises(ValueError, match="attention_bwd_triton: scale must be > 0"):
        attention_bwd_triton(o, q, k, v, o, lse, scale)
