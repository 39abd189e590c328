"""Clear errors on the reference (CPU) path of the attention op: a bad argument is a ValueError or
TypeError that names it, never a raw torch error or ZeroDivisionError. The Triton path of the same
fixes (non-positive scales, EMA parameter changes) is tested in tests/interp/test_reliability_interp.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vdistill.kernels.attention import attention, attention_jvp, attention_ref
from vdistill.kernels.ema import EMA
from vdistill.kernels.ema_schedule import EMAProfile


def _qkv(d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, n, d, generator=g).to(dtype) for n in (3, 5, 5))


@pytest.mark.parametrize("fn", [attention, attention_ref], ids=["attention", "attention_ref"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_dtypes_raise_type_error(fn, dtype):
    q, k, v = _qkv(dtype=dtype)
    with pytest.raises(TypeError, match=r"q, k, v must be floating point.*" + str(dtype).split(".")[1]):
        fn(q, k, v)


def test_integer_dtypes_raise_type_error_in_jvp():
    q, k, v = _qkv(dtype=torch.int64)
    with pytest.raises(TypeError, match="floating point"):
        attention_jvp(q, k, v, q, k, v)


@pytest.mark.parametrize("scale", [None, 0.5])
@pytest.mark.parametrize("fn", [attention, attention_ref], ids=["attention", "attention_ref"])
def test_zero_head_dim_raises_value_error(fn, scale):
    q, k, v = _qkv(d=0)
    with pytest.raises(ValueError, match=r"head dim D = q.shape\[3\]"):
        fn(q, k, v, scale=scale)


@pytest.mark.parametrize("scale", [0.0, -0.7])
def test_reference_path_non_positive_scale(scale):
    """The reference the interpreter tests compare against: scale 0 is uniform weights, a negative
    scale is softmax of the negated scores."""
    q, k, v = _qkv(dtype=torch.float64)
    if scale:
        want = torch.softmax(-abs(scale) * (q @ k.transpose(-1, -2)), -1) @ v
    else:
        want = v.mean(2, keepdim=True).expand_as(q)
    torch.testing.assert_close(attention(q, k, v, scale=scale), want)


def test_ema_reshaped_parameter_is_refused_on_the_reference_path():
    m = torch.nn.Linear(3, 3)
    ema = EMA(m, [EMAProfile(beta=0.9)])
    m.weight.data = torch.full((8, 8), 100.0)
    with pytest.raises(ValueError, match=r"params\[weight\].*\(8, 8\)"):
        ema.update()


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 1e-1}
SCALES = st.one_of(
    st.none(),
    st.floats(-8.0, 8.0),
    st.sampled_from([0.0, -0.0, 3, float("nan"), float("inf"), -float("inf"), True, "0.5", 1j]),
)


@st.composite
def _arguments(draw):
    """q, k, v with random sizes (zeros included), ranks, dtypes and strides, mostly consistent."""
    B, H, Nq, Nk, D = (draw(st.integers(0, 3)) for _ in range(5))
    shapes = [[B, H, Nq, D], [B, H, Nk, D], [B, H, Nk, D]]
    if draw(st.booleans()):  # one inconsistent tensor: another size or rank
        i, j = draw(st.integers(0, 2)), draw(st.integers(0, 3))
        shapes[i] = shapes[i][:3] if draw(st.booleans()) else [*shapes[i][:j], shapes[i][j] + 1, *shapes[i][j + 1:]]
    dtypes = [draw(st.sampled_from(DTYPES))] * 3
    if draw(st.integers(0, 4)) == 0:
        dtypes[draw(st.integers(0, 2))] = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    out = []
    for shape, dtype in zip(shapes, dtypes):
        layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
        if layout == "transposed" and len(shape) == 4:  # a [B, N, H, D] buffer seen as [B, H, N, D]
            t = torch.randn(shape[0], shape[2], shape[1], shape[3], generator=g).transpose(1, 2)
        elif layout == "sliced":  # every other element of the last dim
            t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
        else:
            t = torch.randn(*shape, generator=g)
        out.append(t.to(dtype))
    return (*out, draw(SCALES))


def _naive(q, k, v, scale):
    """softmax(c·QKᵀ)V in float64, written out without the op under test."""
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    s = c * (q.double() @ k.double().transpose(-1, -2))
    w = torch.exp(s - s.amax(-1, keepdim=True))
    return (w / w.sum(-1, keepdim=True)) @ v.double()


@pytest.mark.parametrize("fn", [attention, attention_ref], ids=["attention", "attention_ref"])
@settings(max_examples=300, deadline=None)
@given(args=_arguments())
def test_argument_checks_property(fn, args):
    """Any arguments give the reference result or a ValueError/TypeError, never another exception."""
    q, k, v, scale = args
    try:
        out = fn(q, k, v, scale=scale)
    except (ValueError, TypeError) as e:
        assert str(e).startswith("attention: "), f"unclear message: {e}"
        return
    assert out.shape == q.shape and out.dtype == q.dtype
    want = _naive(q, k, v, scale)
    tol = TOL[q.dtype]
    err = (out.double() - want).abs().max().item() if out.numel() else 0.0
    assert torch.allclose(out.double(), want, rtol=tol, atol=tol), f"max abs err {err:.3g}"
