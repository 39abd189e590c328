"""Fused TrigFlow noising and sCM tangent kernels under Triton's interpreter vs the references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from vdistill.kernels.scm_tangent import TANGENT_BLOCK, scm_tangent, scm_tangent_ref
from vdistill.kernels.trigflow import NOISE_GROUP, _launch_noise, trigflow_eps, trigflow_noise, trigflow_noise_ref


def _x0_t(B: int = 3, shape=(3, NOISE_GROUP // 3 + 5), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((B, *shape), generator=g).to(dtype)  # 4101 per sample: one full group + a tail
    t = torch.rand(B, generator=g) * (math.pi / 2)
    return x0, t


def test_kernel_noise_reproducible_and_regenerable():
    x0, t = _x0_t()
    xt, v, eps = trigflow_noise(x0, t, seed=5, offset=2**33 + 7, return_eps=True)
    again = trigflow_noise(x0, t, seed=5, offset=2**33 + 7)
    assert torch.equal(again[0], xt) and torch.equal(again[1], v)
    assert torch.equal(trigflow_eps(x0, seed=5, offset=2**33 + 7), eps)
    assert torch.equal(trigflow_eps(x0[:2], seed=5, offset=2**33 + 7), eps[:2])  # independent of B
    for other in (trigflow_eps(x0, seed=5, offset=7), trigflow_eps(x0, seed=6, offset=2**33 + 7)):
        assert (other != eps).float().mean() > 0.99


@pytest.mark.parametrize("group, warps", [(512, 1), (1024, 4), (2 * NOISE_GROUP, 8)])
def test_kernel_noise_launch_config_changes_nothing(group, warps):
    x0, t = _x0_t()
    want = trigflow_noise(x0, t, seed=3, offset=11, return_eps=True)
    got = [torch.empty_like(x0) for _ in range(3)]
    _launch_noise(x0, t, *got, seed=3, offset=11, mode=1, group=group, warps=warps)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "dtype, atol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]
)
def test_kernel_noise_matches_reference(dtype, atol):
    x0, t = _x0_t(dtype=dtype)
    xt, v, eps = trigflow_noise(x0, t, seed=9, return_eps=True)
    assert xt.dtype == v.dtype == eps.dtype == dtype
    eps32 = trigflow_eps(x0, seed=9, dtype=torch.float32)
    # same fp32 ε rounded once to dtype; the interpreter rounds fp32 -> bf16 towards zero (1 ulp)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(eps, eps32.to(dtype), rtol=ulp, atol=0)
    rxt, rv = trigflow_noise_ref(x0.float(), t, eps32)  # fp32 reference, one rounding to dtype
    torch.testing.assert_close(xt.float(), rxt, rtol=atol, atol=atol)
    torch.testing.assert_close(v.float(), rv, rtol=atol, atol=atol)


def test_kernel_noise_statistics():
    eps = trigflow_eps((2, 3 * NOISE_GROUP), seed=1234, offset=1).double().flatten()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n)
    z = (eps - eps.mean()) / eps.std()
    assert abs((z**3).mean().item()) < 5 * math.sqrt(6 / n)
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(24 / n)
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-3
    # the four normals of one Philox call land in different quarters of a group: no correlation
    q = eps.view(-1, 4, NOISE_GROUP // 4)
    corr = torch.corrcoef(q.transpose(0, 1).reshape(4, -1))
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 5 / math.sqrt(q[:, 0].numel())


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 4, (torch.float16, torch.float32, torch.float16, torch.float32)])
def test_kernel_tangent_matches_reference(dtypes):
    B, n = 3, TANGENT_BLOCK + 37  # two blocks per sample, the second one partial
    g = torch.Generator().manual_seed(3)
    f, dx, xt, df = (torch.randn(B, n, generator=g).to(dt) for dt in dtypes)
    t = torch.rand(B, generator=g) * (math.pi / 2)
    out, norm = scm_tangent(f, dx, xt, df, t, 0.6, 0.1)
    ref, rnorm = scm_tangent_ref(*(x.double() for x in (f, dx, xt, df)), t.double(), 0.6, 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(norm.double(), rnorm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_kernel_tangent_half_output_and_odd_shape():
    g = torch.Generator().manual_seed(8)
    f, dx, xt, df = (torch.randn(2, 5, 3, 7, generator=g).half() for _ in range(4))
    t = torch.tensor([0.3, 1.2])
    out, norm = scm_tangent(f, dx, xt, df, t, 1.0)
    ref, rnorm = scm_tangent_ref(f, dx, xt, df, t, 1.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(norm, rnorm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def _philox4x32_10(c: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Philox4x32-10 (Salmon et al. 2011) in NumPy uint64 arithmetic, key = (seed lo, seed hi)."""
    mask = np.uint64(0xFFFFFFFF)
    c = [x.astype(np.uint64) for x in c]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p2 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p2 >> np.uint64(32)) ^ c[1] ^ k0, p2 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c


def test_kernel_noise_follows_documented_stream():
    seed, offset, B, n = 12_345_678_901, 2**32 + 3, 2, 4 * 9 + 3
    got = trigflow_eps((B, n), seed, offset).double().numpy()
    i = np.arange(n)
    for b in range(B):
        ctr = [i // 4, np.full(n, b), np.full(n, offset % 2**32), np.full(n, offset // 2**32)]
        r = _philox4x32_10(ctr, seed)
        normals = []
        for a, bb in ((r[0], r[1]), (r[2], r[3])):
            rho = np.sqrt(-2 * np.log((a.astype(np.float64) + 0.5) * 2.0**-32))
            theta = 2 * np.pi * (bb >> np.uint64(8)).astype(np.float64) * 2.0**-24 - np.pi / 4
            normals += [rho * np.cos(theta), rho * np.sin(theta)]
        want = np.choose(i % 4, normals)
        np.testing.assert_allclose(got[b], want, rtol=2e-6, atol=2e-6)
