"""ODE samplers for the rectified-flow teacher (Euler, Heun) on a shifted time grid.

RF convention (models/parameterization.py): noise at s = 1, data at s = 0, dx/ds = v(x, s).
Grid: s_i = shift·u / (1 + (shift - 1)·u) with u uniform from 1 to 0 (the timestep shift of
SD3/Wan; shift = 1 is uniform). Heun is Euler plus a trapezoidal correction (EDM, Karras et al.
2022, Alg. 1), except on the last step into s = 0 where it falls back to Euler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vdistill.models.parameterization import per_sample

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # v(x [B,...], s [B]) -> [B,...]
SOLVERS = ("euler", "heun")


def rf_time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """[steps + 1] RF times from 1 (noise) down to 0 (data)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).float().to(device)


@torch.no_grad()
def sample_rf(
    velocity: Velocity,
    noise: torch.Tensor,
    steps: int,
    solver: str = "euler",
    shift: float = 1.0,
) -> torch.Tensor:
    """Integrate dx/ds = v from s = 1 (x = noise [B, ...]) to s = 0; returns the data sample."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    grid = rf_time_grid(steps, shift, noise.device)
    x = noise
    b = noise.shape[0]
    for i in range(steps):
        x = ode_step(velocity, x, grid[i].expand(b), grid[i + 1].expand(b), solver, to_zero=i == steps - 1)
    return x


def ode_step(
    velocity: Velocity, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, solver: str = "euler",
    to_zero: bool = False,
) -> torch.Tensor:
    """One Euler or Heun step of dx/ds = v from per-sample times s [B] to s_next [B]; x [B, ...].

    Heun's correction is skipped (Euler) where s_next == 0, as in `sample_rf`; `to_zero`: the caller knows
    that s_next is 0 for every sample (a sampler's last step), so the correction is not computed at all (the
    step never reads s_next on the host, which would wait for the GPU). Used by the distillation recipes for
    their teacher steps (progressive, consistency).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    h = per_sample(s_next - s, x).to(x.dtype)
    v = velocity(x, s)
    x_euler = x + h * v
    if solver == "euler" or to_zero:
        return x_euler
    x_heun = x + h * 0.5 * (v + velocity(x_euler, s_next))
    last = (s_next == 0).reshape_as(h)
    return torch.where(last, x_euler, x_heun)


@torch.no_grad()
def sample_consistency(
    velocity: Velocity,
    noise: torch.Tensor,
    times: list[float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) in RF coordinates.

    At each RF time s_i (times[0] is usually 1, pure noise) the student's data prediction
    x0 = x_s - s·v(x_s, s) — the consistency function, exact at s = 0 — is re-noised to s_{i+1}
    with fresh noise: x = (1 - s_{i+1})·x0 + s_{i+1}·ε. Returns the last x0 prediction.
    `generator` (CPU) makes the re-noising reproducible.
    """
    if not times or any(not 0 < s <= 1 for s in times) or any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be a non-empty, strictly decreasing list in (0, 1], got {times}")
    b = noise.shape[0]
    x = noise
    for i, s in enumerate(times):
        s_vec = torch.full((b,), s, device=noise.device)
        x0 = x - s * velocity(x, s_vec).to(x.dtype)
        if i + 1 < len(times):
            eps = torch.randn(noise.shape, generator=generator).to(noise.device, noise.dtype)
            x = (1 - times[i + 1]) * x0 + times[i + 1] * eps
    return x0


def consistency_times(steps: int, shift: float = 1.0) -> list[float]:
    """Default RF times for `steps`-step consistency sampling: the first `steps` points of the ODE grid."""
    return rf_time_grid(steps, shift)[:-1].tolist()
