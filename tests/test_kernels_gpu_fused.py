"""Fused EMA, TrigFlow noising and sCM tangent compiled on CUDA vs their references (GPU only)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vdistill.kernels.ema import EMA, ema_update_ref
from vdistill.kernels.ema_schedule import EMAProfile
from vdistill.kernels.scm_tangent import scm_tangent, scm_tangent_ref
from vdistill.kernels.trigflow import trigflow_eps, trigflow_noise, trigflow_noise_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ema_cuda_matches_lerp(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1536, 1536), (8960,), (1,), (33, 7), (4097,)]
    params = [torch.randn(s, generator=g, device="cuda").to(dtype) for s in shapes]
    profiles = [EMAProfile(sigma_rel=0.05), EMAProfile(beta=0.9), EMAProfile(sigma_rel=0.1)]
    ema = EMA(params, profiles)
    refs = [[p.float().clone() for p in params] for _ in profiles]
    for _ in range(3):
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, device="cuda").to(dtype))
        betas = ema.betas()
        ema.update()
        for r, b in zip(refs, betas):
            ema_update_ref(r, params, b)
    assert ema._plans
    for k in range(len(profiles)):
        for got, want in zip(ema.tensors(k), refs[k]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_cuda_matches_reference_and_is_normal(dtype):
    x0 = torch.randn(4, 3, 17, 129, device="cuda").to(dtype)
    t = torch.rand(4, device="cuda") * (math.pi / 2)
    xt, v, eps = trigflow_noise(x0, t, seed=3, offset=5, return_eps=True)
    assert torch.equal(trigflow_eps(x0, seed=3, offset=5), eps)
    eps32 = trigflow_eps(x0, seed=3, offset=5, dtype=torch.float32)
    rxt, rv = trigflow_noise_ref(x0.float(), t, eps32)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(xt.float(), rxt, rtol=tol, atol=tol)
    torch.testing.assert_close(v.float(), rv, rtol=tol, atol=tol)
    big = trigflow_eps((2, 1 << 20), seed=9, device="cuda").double()
    assert abs(big.mean().item()) < 5 / math.sqrt(big.numel())
    assert abs(big.var().item() - 1) < 5 * math.sqrt(2 / big.numel())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_noise_uses_the_same_stream(dtype):
    """Half-precision outputs take the hardware ln/sin/cos: the float32 stream up to their rounding."""
    fast = trigflow_eps((2, 1 << 20), seed=9, dtype=dtype, device="cuda").double()
    exact = trigflow_eps((2, 1 << 20), seed=9, dtype=torch.float32, device="cuda").double()
    rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -10
    assert ((fast - exact).abs() <= rounding * exact.abs() + 1e-3).all()
    assert abs(fast.mean().item()) < 5 / math.sqrt(fast.numel())
    assert abs(fast.var().item() - 1) < 5 * math.sqrt(2 / fast.numel())


def test_noise_stream_same_on_gpu_and_in_interpreter(tmp_path):
    """The documented Philox stream: compiled CUDA and the CPU interpreter draw the same ε."""
    path = tmp_path / "eps.pt"
    code = (
        "import torch; from kernels.trigflow import trigflow_eps; "
        f"torch.save(trigflow_eps((2, 4099), seed=7, offset=2**32 + 5), {str(path)!r})"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).resolve().parents[1])
    cpu = torch.load(path)
    gpu = trigflow_eps((2, 4099), seed=7, offset=2**32 + 5, device="cuda").cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-5)


def test_tangent_cuda_matches_reference():
    g = torch.Generator(device="cuda").manual_seed(2)
    ins = [torch.randn(3, 5, 4099, generator=g, device="cuda").bfloat16() for _ in range(4)]
    t = torch.rand(3, device="cuda") * (math.pi / 2)
    out, norm = scm_tangent(*ins, t, 0.5, 0.1)
    ref, rnorm = scm_tangent_ref(*(x.double() for x in ins), t.double(), 0.5, 0.1)
    torch.testing.assert_close(norm.double(), rnorm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=1e-4)
