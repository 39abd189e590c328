"""Forward-mode AD through the whole DiT with respect to (x, time)."""

import pytest
import torch

from vdistill.models.dit import build_dit
from vdistill.models.jvp import jvp


def _setup(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_dit("tiny", **overrides).to(dtype)
    for p in model.parameters():  # randomise everything, incl. the zero-initialised head
        p.data.normal_(0, 0.2)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 3, 2, 4, 6, generator=g, dtype=dtype)
    time = torch.rand(2, generator=g, dtype=dtype)
    text = torch.randn(2, 3, 16, generator=g, dtype=dtype)
    dx = torch.randn(x.shape, generator=g, dtype=dtype)
    dtime = torch.randn(2, generator=g, dtype=dtype)
    return model, (x, time, text), (dx, dtime)


def _central_difference(f, h=1e-5):
    """Fourth-order central difference of a -> f(a) at 0: the time embedding has frequencies up
    to ~1000 (time_scale), so a second-order stencil's truncation error would exceed 1e-6."""
    return (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)


@pytest.mark.parametrize("backend", ["forward_ad", "func"])
@pytest.mark.parametrize("paths", [{}, {"absolute_positions": True, "pooled_text": True}])
def test_jvp_matches_central_finite_differences(backend, paths):
    model, (x, time, text), (dx, dtime) = _setup(**paths)
    out, tangent = jvp(model, (x, time, text), (dx, dtime), backend=backend)
    with torch.no_grad():
        fd = _central_difference(lambda a: model(x + a * dx, time + a * dtime, text))
        ref_out = model(x, time, text)
    rel = (tangent - fd).norm() / fd.norm()
    assert rel < 1e-6, rel
    assert torch.allclose(out, ref_out, atol=1e-12)


def test_backends_agree_and_match_func_jvp_of_plain_forward():
    model, (x, time, text), (dx, dtime) = _setup(seed=3)
    _, t_fwad = jvp(model, (x, time, text), (dx, dtime), backend="forward_ad")
    _, t_func = jvp(model, (x, time, text), (dx, dtime), backend="func")
    _, t_plain = torch.func.jvp(lambda a, b: model(a, b, text), (x, time), (dx, dtime))
    assert torch.allclose(t_fwad, t_plain, atol=1e-12, rtol=1e-10)
    assert torch.allclose(t_func, t_plain, atol=1e-12, rtol=1e-10)


def test_jvp_records_no_graph():
    model, primals, tangents = _setup(dtype=torch.float32)
    out, tangent = jvp(model, primals, tangents)
    assert out.grad_fn is None and tangent.grad_fn is None and not tangent.requires_grad


def test_jvp_time_only_tangent_is_time_derivative():
    model, (x, time, text), (_, dtime) = _setup(seed=5)
    _, tangent = jvp(model, (x, time, text), (torch.zeros_like(x), torch.ones_like(time)))
    with torch.no_grad():
        fd = _central_difference(lambda a: model(x, time + a, text))
    assert (tangent - fd).norm() / fd.norm() < 1e-6


def test_bad_tangents_raise():
    model, primals, (dx, dtime) = _setup()
    with pytest.raises(ValueError, match="dx"):
        jvp(model, primals, (dx[:1], dtime))
    with pytest.raises(ValueError, match="dtime"):
        jvp(model, primals, (dx, dtime[:1]))
    with pytest.raises(ValueError, match="backend"):
        jvp(model, primals, (dx, dtime), backend="numeric")
