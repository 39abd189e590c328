"""RF samplers on a problem with an exact answer: Gaussian data N(0, σ²).

For x0 ~ N(0, σ²) the marginal of x_s = (1-s)x0 + sε is N(0, a(s)) with a = (1-s)²σ² + s², the
exact velocity is v(x, s) = x·(s - (1-s)σ²)/a(s), and the ODE from s = 1 maps x1 to σ·x1.
"""

import pytest
import torch

from vdistill.methods.sampling.samplers import rf_time_grid, sample_rf

SIGMA = 0.3


def velocity(x, s):
    s = s.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return x * (s - (1 - s) * SIGMA**2) / ((1 - s) ** 2 * SIGMA**2 + s**2)


def _error(steps, solver, shift=1.0):
    x1 = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample_rf(velocity, x1, steps, solver, shift)
    return (out - SIGMA * x1).abs().max().item()


def test_euler_converges_and_heun_beats_euler():
    errs = [_error(n, "euler") for n in (4, 16, 64)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.05
    assert _error(16, "heun") < _error(16, "euler") / 5


def test_time_grid():
    grid = rf_time_grid(10, shift=3.0)
    assert grid[0] == 1 and grid[-1] == 0 and torch.all(grid[1:] < grid[:-1])
    assert torch.allclose(rf_time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="steps"):
        rf_time_grid(0)
    with pytest.raises(ValueError, match="shift"):
        rf_time_grid(4, shift=0)


def test_unknown_solver():
    with pytest.raises(ValueError, match="solver"):
        sample_rf(velocity, torch.randn(2, 3), 4, "rk45")
