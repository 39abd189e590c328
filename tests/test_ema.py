"""EMA (reference path on CPU): β schedule, profiles, state round-trip, swap, input errors."""

from __future__ import annotations

import io
import math

import pytest
import torch

from vdistill.kernels.ema import EMA, ema_update_ref
from vdistill.kernels.ema_schedule import (
    GAMMA_AT_MAX,
    SIGMA_REL_MAX,
    EMAProfile,
    gamma_to_sigma_rel,
    power_beta,
    sigma_rel_to_gamma,
)

PROFILE_SETS = {
    1: [EMAProfile(sigma_rel=0.05)],
    2: [EMAProfile(sigma_rel=0.10), EMAProfile(beta=0.9)],
    3: [EMAProfile(sigma_rel=0.05), EMAProfile(beta=0.99), EMAProfile(sigma_rel=0.15)],
}


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (33,), (2, 3, 4), (1,)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.29, 0.3])
def test_gamma_solves_edm2_relation(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma >= GAMMA_AT_MAX
    assert math.isclose(gamma_to_sigma_rel(gamma), sigma_rel, rel_tol=1e-12)
    t = sigma_rel**-2  # the relation as a cubic: γ³ + 7γ² + (16 − t)γ + (12 − t) = 0
    residual = gamma**3 + 7 * gamma**2 + (16 - t) * gamma + (12 - t)
    assert abs(residual) <= 1e-9 * max(1.0, t * abs(gamma), gamma**3)
    assert gamma_to_sigma_rel(gamma * 1.01 + 0.01) < sigma_rel  # on the decreasing branch


def test_betas_follow_direct_formula():
    profiles = PROFILE_SETS[3]
    ema = EMA([torch.zeros(3)], profiles)
    for n in range(12):
        got = ema.betas(n)
        for prof, b in zip(profiles, got):
            want = prof.beta if prof.sigma_rel is None else (1.0 - 1.0 / (n + 1)) ** (prof.gamma + 1.0)
            assert b == pytest.approx(want, rel=1e-15, abs=0)
    assert power_beta(0, 7.0) == 0.0
    assert ema.betas() == ema.betas(0)


def test_power_ema_first_update_copies_params():
    p = torch.randn(50)
    ema = EMA([p], [EMAProfile(sigma_rel=0.1)])
    p.add_(torch.randn(50))
    ema.update()
    assert torch.equal(ema.tensors(0)[0], p)
    assert ema.step == 1


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ema_matches_float64_recurrence(dtype, k):
    params = _params(dtype)
    profiles = PROFILE_SETS[k]
    ema = EMA(params, profiles)
    want = [[p.double() for p in params] for _ in profiles]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(dtype))
        for kk, beta in enumerate(ema.betas()):
            want[kk] = [beta * e + (1 - beta) * p.double() for e, p in zip(want[kk], params)]
        ema.update()
    for kk in range(k):
        for got, ref in zip(ema.tensors(kk), want[kk]):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_ema_update_ref_upcasts_half_params():
    p = [torch.randn(10).bfloat16()]
    e = [torch.zeros(10)]
    ema_update_ref(e, p, 0.25)
    torch.testing.assert_close(e[0], 0.75 * p[0].float(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="ema_tensors"):
        ema_update_ref(e, p + p, 0.5)


def test_state_dict_round_trip_is_exact():
    params = _params(torch.bfloat16)
    profiles = PROFILE_SETS[2]
    ema = EMA(params, profiles)
    for _ in range(3):
        for p in params:
            p.add_(1.0)
        ema.update()
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = EMA(_params(torch.bfloat16, seed=5), profiles)
    other.load_state_dict(torch.load(buf))
    assert other.step == ema.step == 3
    for k in range(2):
        for a, b in zip(ema.tensors(k), other.tensors(k)):
            assert torch.equal(a, b)
    other._params = params
    ema.update()
    other.update()
    for a, b in zip(ema.tensors(1), other.tensors(1)):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_mismatch():
    ema = EMA(_params(torch.float32), PROFILE_SETS[2])
    state = ema.state_dict()
    with pytest.raises(ValueError, match="profiles"):
        EMA(_params(torch.float32), PROFILE_SETS[1]).load_state_dict(state)
    with pytest.raises(ValueError, match="names"):
        EMA(_params(torch.float32)[:3], PROFILE_SETS[2]).load_state_dict(state)
    with pytest.raises(ValueError, match="missing key"):
        ema.load_state_dict({"step": 0})


def test_module_names_copy_to_and_swapped_restore():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(torch.bfloat16)
    ema = EMA(model, [EMAProfile(beta=0.5), EMAProfile(sigma_rel=0.1)])
    assert ema.names == [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    before = [p.detach().clone() for p in model.parameters()]
    with ema.swapped(model, profile=0):
        for p, e in zip(model.parameters(), ema.tensors(0)):
            assert torch.equal(p, e.to(torch.bfloat16))
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(model, profile=1):
        raise RuntimeError("boom")
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    target = [torch.empty_like(p) for p in model.parameters()]
    ema.copy_to(target, profile=1)
    for t, e in zip(target, ema.tensors(1)):
        assert torch.equal(t, e.to(torch.bfloat16))


def test_input_errors():
    p = [torch.randn(4)]
    with pytest.raises(ValueError, match="params"):
        EMA([], PROFILE_SETS[1])
    with pytest.raises(TypeError, match=r"params\[0\]"):
        EMA([torch.arange(4)], PROFILE_SETS[1])
    with pytest.raises(TypeError, match=r"params\[1\]"):
        EMA([torch.randn(2), "x"], PROFILE_SETS[1])
    with pytest.raises(TypeError, match="params"):
        EMA(torch.randn(3), PROFILE_SETS[1])
    with pytest.raises(ValueError, match="contiguous"):
        EMA([torch.randn(4, 4).t()], PROFILE_SETS[1])
    with pytest.raises(ValueError, match=r"params\[1\]"):
        EMA([torch.randn(2), torch.randn(2, device="meta")], PROFILE_SETS[1])
    with pytest.raises(ValueError, match="profiles"):
        EMA(p, [])
    with pytest.raises(ValueError, match="profiles"):
        EMA(p, [EMAProfile(beta=0.5)] * 5)
    with pytest.raises(TypeError, match=r"profiles\[0\]"):
        EMA(p, [0.99])
    with pytest.raises(ValueError, match="exactly one"):
        EMAProfile(sigma_rel=0.1, beta=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        EMAProfile()
    with pytest.raises(ValueError, match="beta"):
        EMAProfile(beta=1.0)
    with pytest.raises(ValueError, match="sigma_rel"):
        EMAProfile(sigma_rel=0.0)
    with pytest.raises(ValueError, match="sigma_rel"):
        EMAProfile(sigma_rel=SIGMA_REL_MAX * 1.01)
    ema = EMA(p, PROFILE_SETS[2])
    with pytest.raises(ValueError, match="profile"):
        ema.tensors(2)
    with pytest.raises(ValueError, match="target"):
        ema.copy_to([torch.zeros(5)])
