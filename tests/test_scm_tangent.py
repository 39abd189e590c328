"""Fused sCM tangent and its per-sample normalisation vs float64 references (CPU path)."""

from __future__ import annotations

import math

import pytest
import torch

from vdistill.kernels.scm_tangent import scm_tangent, scm_tangent_ref


def _tangent_inputs(dtype=torch.float64, B: int = 3, shape=(6, 11)):
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn((B, *shape), generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]
    t = torch.rand(B, generator=g, dtype=torch.float64) * (math.pi / 2)
    return xs, t


@pytest.mark.parametrize("r", [0.0, 0.4, 1.0])
def test_tangent_float64_per_sample_loop(r):
    (f, dx, xt, df), t = _tangent_inputs()
    c = 0.1
    out, norm = scm_tangent(f, dx, xt, df, t, r, c)
    assert out.dtype == torch.float64
    for b in range(3):
        cb, sb = math.cos(t[b].item()), math.sin(t[b].item())
        g = -cb * cb * (f[b] - dx[b]) - r * cb * sb * (xt[b] + df[b])
        nb = math.sqrt(sum(v * v for v in g.flatten().tolist()))
        assert norm[b].item() == pytest.approx(nb, rel=1e-12)
        torch.testing.assert_close(out[b], g / (nb + c), rtol=1e-12, atol=1e-14)
        assert out[b].norm().item() == pytest.approx(nb / (nb + c), rel=1e-12)


def test_tangent_mixed_dtypes_promote():
    (f, dx, xt, df), t = _tangent_inputs(torch.float32)
    out, norm = scm_tangent(f.bfloat16(), dx, xt.half(), df, t.float(), 0.5)
    assert out.dtype == torch.float32 and norm.dtype == torch.float32
    ref, rnorm = scm_tangent_ref(f.bfloat16().double(), dx.double(), xt.half().double(), df.double(), t, 0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.double(), rnorm, rtol=1e-5, atol=1e-6)


def test_tangent_errors():
    (f, dx, xt, df), t = _tangent_inputs()
    with pytest.raises(ValueError, match="dxt_dt"):
        scm_tangent(f, dx[:, :3], xt, df, t, 1.0)
    with pytest.raises(ValueError, match="dF_dt"):
        scm_tangent(f, dx, xt, df.to("meta"), t, 1.0)
    with pytest.raises(TypeError, match="x_t"):
        scm_tangent(f, dx, xt.long(), df, t, 1.0)
    with pytest.raises(ValueError, match="t must have shape"):
        scm_tangent(f, dx, xt, df, t[:1], 1.0)
    with pytest.raises(TypeError, match="r must"):
        scm_tangent(f, dx, xt, df, t, float("nan"))
    with pytest.raises(ValueError, match="c must"):
        scm_tangent(f, dx, xt, df, t, 1.0, c=-0.1)
