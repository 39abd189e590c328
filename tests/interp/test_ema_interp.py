"""Fused EMA kernel under Triton's interpreter vs the `torch._foreach_lerp_` reference."""

from __future__ import annotations

import pytest
import torch

from vdistill.kernels.ema import EMA, ema_update_ref
from vdistill.kernels.ema_schedule import EMAProfile

PROFILE_SETS = {
    1: [EMAProfile(beta=0.9)],
    2: [EMAProfile(sigma_rel=0.10), EMAProfile(beta=0.75)],
    3: [EMAProfile(sigma_rel=0.05), EMAProfile(beta=0.5), EMAProfile(sigma_rel=0.2)],
    4: [EMAProfile(sigma_rel=0.05), EMAProfile(beta=0.5), EMAProfile(sigma_rel=0.2), EMAProfile(beta=0.99)],
}
SHAPES = [(5, 60), (1,), (33,), (128,), (7, 37)]  # with block=128: full blocks, tails, tiny tensors


def _params(dtypes, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dt) for s, dt in zip(SHAPES, dtypes)]


def _run_and_compare(params, profiles, steps: int = 3) -> EMA:
    ema = EMA(params, profiles, block=128)
    refs = [[p.float().clone() for p in params] for _ in profiles]
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        betas = ema.betas()
        ema.update()
        for ref, beta in zip(refs, betas):
            ema_update_ref(ref, params, beta)
    assert ema._plans, "the Triton path did not run"
    for k in range(len(profiles)):
        for got, want in zip(ema.tensors(k), refs[k]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    return ema


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_ema_matches_lerp_reference(dtype, k):
    _run_and_compare(_params([dtype] * len(SHAPES)), PROFILE_SETS[k])


def test_mixed_dtypes_four_profiles():
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32]
    ema = _run_and_compare(_params(dtypes), PROFILE_SETS[4])
    assert len(ema._plans) == 3  # one launch per parameter dtype


def test_unaligned_parameter_storage():
    base = torch.randn(1 + 300)
    params = [base[1:].view(3, 100), torch.randn(40)]  # data_ptr not 16-byte aligned
    ema = _run_and_compare(params, PROFILE_SETS[2])
    assert not ema._plans[0].aligned


def test_follows_replaced_parameter_storage():
    params = _params([torch.float32] * len(SHAPES))
    ema = EMA(params, PROFILE_SETS[1], block=128)
    ema.update()
    params[2].data = torch.full_like(params[2], 3.0)  # new storage: the address table must be rebuilt
    ref = [t.clone() for t in ema.tensors(0)]
    ema_update_ref(ref, params, ema.betas()[0])
    ema.update()
    for got, want in zip(ema.tensors(0), ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_state_round_trip_then_identical_updates():
    params = _params([torch.bfloat16] * len(SHAPES))
    ema = _run_and_compare(params, PROFILE_SETS[2])
    other = EMA(params, PROFILE_SETS[2], block=128)
    other.load_state_dict({k: v for k, v in ema.state_dict().items()})
    ema.update()
    other.update()
    for k in range(2):
        for a, b in zip(ema.tensors(k), other.tensors(k)):
            assert torch.equal(a, b)
