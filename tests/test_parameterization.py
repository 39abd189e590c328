"""Conversions between rectified-flow, TrigFlow and x0/ε parameterizations (float64)."""

import math

import pytest
import torch

from vdistill.models import parameterization as P

torch.manual_seed(0)


def _data(b=5, shape=(3, 4, 6)):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    eps = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    return x0, eps


def test_rf_round_trip():
    x0, eps = _data()
    s = torch.rand(5, dtype=torch.float64)
    x_s, v = P.rf_interpolate(x0, eps, s)
    assert torch.allclose(P.rf_x0(x_s, s, v), x0, atol=1e-12, rtol=0)
    assert torch.allclose(P.rf_eps(x_s, s, v), eps, atol=1e-12, rtol=0)
    assert torch.allclose(P.rf_velocity(x0, eps), v, atol=0, rtol=0)


def test_trig_round_trip():
    x0, eps = _data()
    t = torch.rand(5, dtype=torch.float64) * P.HALF_PI
    x_t, F = P.trig_interpolate(x0, eps, t)
    assert torch.allclose(P.trig_x0(x_t, t, F), x0, atol=1e-12, rtol=0)
    assert torch.allclose(P.trig_eps(x_t, t, F), eps, atol=1e-12, rtol=0)


def test_clock_round_trip_and_path_identity():
    x0, eps = _data()
    t = torch.linspace(0, P.HALF_PI, 5, dtype=torch.float64)
    s = P.rf_time_from_trig(t)
    assert torch.allclose(P.trig_time_from_rf(s), t, atol=1e-12, rtol=0)
    x_t, _ = P.trig_interpolate(x0, eps, t)
    x_s, _ = P.rf_interpolate(x0, eps, s)
    k = P.rf_scale_from_trig(t).reshape(-1, 1, 1, 1)
    assert torch.allclose(x_t * k, x_s, atol=1e-12, rtol=0)


def test_consistency_boundary_condition():
    x, F = _data()
    out = P.consistency_fn(x, torch.zeros(5, dtype=torch.float64), F)
    assert torch.equal(out, x)


def test_trig_velocity_of_rf_teacher_matches_ode_finite_difference():
    """F of a converted RF teacher equals d/dt of x_t along the teacher's own ODE."""
    w = torch.randn(3, 3, dtype=torch.float64) * 0.5

    def rf_model(x_s, s):  # a smooth nonlinear velocity field v(x_s, s)
        return torch.tanh(torch.einsum("ij,bj...->bi...", w, x_s)) * (1 + s.reshape(-1, 1, 1, 1))

    x_t = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.6, 1.0, 1.4], dtype=torch.float64)
    F = P.trig_velocity_from_rf(rf_model, x_t, t)

    # Follow the RF ODE dx_s/ds = v from s(t) to s(t+h) and map back to TrigFlow coordinates.
    def trig_point_after(h):
        s0, s1 = P.rf_time_from_trig(t), P.rf_time_from_trig(t + h)
        x_s = x_t * P.rf_scale_from_trig(t).reshape(-1, 1, 1, 1)
        n = 2000
        for i in range(n):  # RK4 in s
            a = s0 + (s1 - s0) * i / n
            ds = ((s1 - s0) / n).reshape(-1, 1, 1, 1)
            hs = (s1 - s0) / n
            k1 = rf_model(x_s, a)
            k2 = rf_model(x_s + ds / 2 * k1, a + hs / 2)
            k3 = rf_model(x_s + ds / 2 * k2, a + hs / 2)
            k4 = rf_model(x_s + ds * k3, a + hs)
            x_s = x_s + ds / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x_s / P.rf_scale_from_trig(t + h).reshape(-1, 1, 1, 1)

    h = 1e-4
    fd = (trig_point_after(h) - trig_point_after(-h)) / (2 * h)
    assert torch.allclose(F, fd, atol=1e-7, rtol=1e-6), (F - fd).abs().max()


def test_cfg():
    vc, vu = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(P.cfg_combine(vc, vu, 1.0), vc, atol=1e-6)
    assert torch.equal(P.cfg_combine(vc, vu, 0.0), vu)
    assert torch.allclose(P.cfg_combine(vc, vu, 3.0), vu + 3 * (vc - vu))

    def model(x, time, text):
        return x * text.mean(dim=(1, 2)).reshape(-1, 1) + time.reshape(-1, 1)

    x, time = torch.randn(2, 3), torch.rand(2)
    text, null = torch.randn(2, 4, 5), torch.zeros(1, 4, 5)
    v = P.guided(model, text, null, 2.5)(x, time)
    ref = P.cfg_combine(model(x, time, text), model(x, time, null.expand(2, 4, 5)), 2.5)
    assert torch.allclose(v, ref)


def test_bad_time_shape():
    x0, eps = _data()
    with pytest.raises(ValueError, match="time must have shape"):
        P.rf_interpolate(x0, eps, torch.rand(3, dtype=torch.float64))
    assert math.isclose(P.HALF_PI, math.pi / 2)
