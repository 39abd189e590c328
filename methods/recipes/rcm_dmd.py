"""rCM's score regulariser: DMD on few-step student samples, and the fake-score critic's loss.

Distribution matching distillation (Yin et al. 2024, eqs. 7-8; DMD2; rCM Sec. 3.2) in TrigFlow,
σ_d = 1. The student generates x̂ by a backward simulation of 1..N_max steps from pure noise at
t = π/2 (intermediate times from the DMD proposal, each no later than the previous one, or the
sampler's own N_max-step times; only the last step carries a gradient). x̂ is re-noised at
t_D ~ DMD proposal, x_D = cos t_D·x̂ + sin t_D·ε, and the KL gradient with respect to x̂ is
estimated from the two data predictions (score difference
s_fake − s_real = −cos t_D·(x0_fake − x0_real)/sin² t_D, with DMD's weight):

    ∇_x̂ = (x0_fake − x0_real) / mean|x̂ − x0_real|          (per sample, mean over elements)

where x0_real is the teacher's (with CFG) and x0_fake the critic's. It is applied through the
surrogate L = mean((x̂ − sg(x̂ − ∇))²), whose gradient is 2∇/D per element (D = elements per
sample). The critic (an RF network initialised from the teacher) tracks the score of the
student's samples by flow matching on detached x̂, at times from the same DMD proposal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vdistill.kernels.trigflow import trigflow_noise
from vdistill.methods.recipes.trigflow_student import TimeProposal, TrigVelocity, guided_trig_velocity, trig_velocity
from vdistill.models.parameterization import per_sample, rf_interpolate, rf_time_from_trig, trig_interpolate, trig_x0

WEIGHT_FLOOR = 1e-5  # lower bound of DMD's normaliser mean|x̂ − x0_real|


@torch.no_grad()
def simulate_to_last_step(
    student: TrigVelocity, noise: torch.Tensor, steps: int, draw_time: TimeProposal,
    mid_times: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the first `steps` − 1 steps of the student's sampler; returns (x_t, t) of the last step.

    noise [B, ...] is the state at t = π/2; each next time is min(`draw_time`(B, device), current t)
    (rCM), or the next of `mid_times` when given (the sampler's own schedule, DMD2's backward
    simulation); re-noising uses the global RNG. The caller evaluates the last step with gradients.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if mid_times is not None and len(mid_times) < steps - 1:
        raise ValueError(f"mid_times must hold at least steps - 1 = {steps - 1} times, got {tuple(mid_times)}")
    b = noise.shape[0]
    t = torch.full((b,), math.pi / 2, device=noise.device)
    x = noise
    for i in range(steps - 1):
        x0 = trig_x0(x, t, student(x, t).to(x.dtype))
        t = torch.minimum(draw_time(b, noise.device), t) if mid_times is None else torch.full_like(t, mid_times[i])
        x, _ = trig_interpolate(x0, torch.randn_like(x0), t)
    return x, t


def dmd_direction(x_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's gradient with respect to x̂: (x0_fake − x0_real) / mean|x̂ − x0_real|, all [B, ...]."""
    weight = (x_hat - x0_real).abs().flatten(1).mean(1).clamp_min(WEIGHT_FLOOR)
    return (x0_fake - x0_real) / per_sample(weight, x_hat)


def dmd_surrogate(x_hat: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Per-sample loss [B] mean((x̂ − sg(x̂ − direction))²), whose gradient in x̂ is 2·direction/D."""
    target = (x_hat - direction).detach()
    return (x_hat - target).square().flatten(1).mean(1)


def dmd_loss(
    x_hat: torch.Tensor,
    t_d: torch.Tensor,
    teacher: nn.Module,
    critic: nn.Module,
    text: torch.Tensor,
    null_text: torch.Tensor,
    cfg_scale: float,
    *,
    seed: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample DMD surrogate [B] for student samples x̂ [B, ...] (with grad) re-noised at t_d [B].

    Returns (loss [B] float32, direction [B, ...] float32). Noise ε comes from the fused TrigFlow
    kernel with (seed, offset); teacher and critic run without gradients.
    """
    x_d, _ = trigflow_noise(x_hat.detach(), t_d, seed=seed, offset=offset)
    with torch.no_grad():
        x0_real = trig_x0(x_d, t_d, guided_trig_velocity(teacher, text, null_text, cfg_scale)(x_d, t_d).to(x_d.dtype))
        x0_fake = trig_x0(x_d, t_d, trig_velocity(critic, text)(x_d, t_d).to(x_d.dtype))
        direction = dmd_direction(x_hat.detach().float(), x0_real.float(), x0_fake.float())
    return dmd_surrogate(x_hat.float(), direction), direction


def critic_loss(critic: nn.Module, x_hat: torch.Tensor, text: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the critic on student samples x̂ [B, ...] (detached) at TrigFlow times t [B].

    RF form (the critic is an RF network): s = s(t), x_s = (1 − s)·x̂ + s·ε, target v = ε − x̂.
    """
    x_hat = x_hat.detach()
    s = rf_time_from_trig(t)
    x_s, v = rf_interpolate(x_hat, torch.randn_like(x_hat), s)
    return (critic(x_s, s, text).float() - v.float()).square().mean()
