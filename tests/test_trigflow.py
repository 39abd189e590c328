"""TrigFlow noising (reference path on CPU): determinism, statistics, math, errors."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from vdistill.kernels.trigflow import trigflow_eps, trigflow_noise, trigflow_noise_ref


def _x0_t(B: int = 3, shape=(4, 5, 7), dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((B, *shape), generator=g).to(dtype)
    t = torch.rand(B, generator=g, dtype=torch.float64) * (math.pi / 2)
    return x0, t


def test_noise_reproducible_from_seed_and_offset():
    x0, t = _x0_t()
    a = trigflow_noise(x0, t, seed=3, offset=10, return_eps=True)
    b = trigflow_noise(x0, t, seed=3, offset=10, return_eps=True)
    for u, w in zip(a, b):
        assert torch.equal(u, w)
    assert torch.equal(trigflow_eps(x0, seed=3, offset=10), a[2])
    assert torch.equal(trigflow_eps(tuple(x0.shape), seed=3, offset=10), a[2])
    assert not torch.equal(trigflow_eps(x0, seed=3, offset=11), a[2])
    assert not torch.equal(trigflow_eps(x0, seed=4, offset=10), a[2])
    xt, v = trigflow_noise(x0, t, seed=3, offset=10)
    assert torch.equal(xt, a[0]) and torch.equal(v, a[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_noise_matches_reference_and_keeps_dtype(dtype):
    x0, t = _x0_t(dtype=dtype)
    xt, v, eps = trigflow_noise(x0, t, seed=1, return_eps=True)
    assert xt.dtype == v.dtype == eps.dtype == dtype
    rxt, rv = trigflow_noise_ref(x0, t, eps)
    assert torch.equal(xt, rxt) and torch.equal(v, rv)


def test_reference_is_a_rotation_float64():
    x0, t = _x0_t(dtype=torch.float64)
    eps = torch.randn_like(x0)
    xt, v = trigflow_noise_ref(x0, t, eps)
    c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(c * xt - s * v, x0, rtol=1e-12, atol=1e-12)  # rotation by −t
    torch.testing.assert_close(s * xt + c * v, eps, rtol=1e-12, atol=1e-12)
    zero, _ = trigflow_noise_ref(x0, torch.zeros(3, dtype=torch.float64), eps)
    assert torch.equal(zero, x0)


def test_noise_moments_and_kolmogorov_smirnov():
    eps = trigflow_eps((4, 50_000), seed=11, offset=0).double().flatten()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)
    z = (eps - eps.mean()) / eps.std()
    assert abs((z**3).mean().item()) < 5 * math.sqrt(6 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(24 / n)
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-3


def test_noise_non_contiguous_input():
    x0, t = _x0_t()
    xt_view, _ = trigflow_noise(x0.transpose(1, 3), t, seed=2)
    xt_copy, _ = trigflow_noise(x0.transpose(1, 3).contiguous(), t, seed=2)
    assert torch.equal(xt_view, xt_copy)


def test_noise_errors():
    x0, t = _x0_t()
    with pytest.raises(TypeError, match="x0"):
        trigflow_noise(x0.long(), t, seed=0)
    with pytest.raises(TypeError, match="x0"):
        trigflow_noise(x0.numpy(), t, seed=0)
    with pytest.raises(ValueError, match="t must have shape"):
        trigflow_noise(x0, t[:2], seed=0)
    with pytest.raises(ValueError, match="t must have shape"):
        trigflow_noise(x0, t.view(3, 1), seed=0)
    with pytest.raises(TypeError, match="t must be a floating"):
        trigflow_noise(x0, torch.ones(3, dtype=torch.long), seed=0)
    with pytest.raises(ValueError, match="t is on"):
        trigflow_noise(x0, t.to("meta"), seed=0)
    with pytest.raises(ValueError, match="x0 must be"):
        trigflow_noise(torch.zeros(0, 3), torch.zeros(0), seed=0)
    with pytest.raises(ValueError, match="seed"):
        trigflow_noise(x0, t, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        trigflow_noise(x0, t, seed=1.5)
    with pytest.raises(ValueError, match="offset"):
        trigflow_noise(x0, t, seed=0, offset=-3)
    with pytest.raises(ValueError, match="eps must match"):
        trigflow_noise_ref(x0, t, x0[:, :2])
    with pytest.raises(TypeError, match="dtype"):
        trigflow_eps((2, 3), seed=0, dtype=torch.int32)
