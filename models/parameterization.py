"""Time conventions and the conversions between them (README.md, "Conventions").

Rectified flow (the teacher, Wan/SD3 convention), s in [0, 1] with s = 0 the data:
    x_s = (1 - s)·x0 + s·ε,          v = dx_s/ds = ε - x0,
    x0 = x_s - s·v,                  ε = x_s + (1 - s)·v.
TrigFlow (sCM / rCM, σ_d = 1), t in [0, π/2]:
    x_t = cos t·x0 + sin t·ε,        F = dx_t/dt = cos t·ε - sin t·x0.
The two describe the same path up to a scale: s = sin t / (sin t + cos t) and
x_s = x_t / (sin t + cos t). Substituting x0, ε of the RF solution into F gives
    F = ((cos t - sin t)·x_t + v(x_s, s)) / (sin t + cos t).                  (1)
Consistency function (Lu & Song 2024, eq. 6 with σ_d = 1): f(x_t, t) = cos t·x_t - sin t·F(x_t, t),
which satisfies f(x, 0) = x. Classifier-free guidance: v = v_u + w·(v_c - v_u).

Time tensors are per sample, shape [B]; they broadcast against [B, ...] data. Conversions
between the two clocks are done in float64 and cast back, since s is close to 0 or 1 at the ends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

HALF_PI = torch.pi / 2


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per sample, [B] -> [B, 1, ..., 1], so that it broadcasts against `like` [B, ...]."""
    if values.dim() != 1 or values.shape[0] != like.shape[0]:
        raise ValueError(f"time must have shape [B]={[like.shape[0]]}, got {list(values.shape)}")
    return values.reshape(-1, *([1] * (like.dim() - 1)))


# ---- rectified flow ---------------------------------------------------------------------------


def rf_interpolate(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_s = (1 - s)·x0 + s·ε and its velocity v = ε - x0. x0, eps [B, ...]; s [B]."""
    sb = per_sample(s, x0).to(x0.dtype)
    return (1 - sb) * x0 + sb * eps, eps - x0


def rf_x0(x_s: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Data prediction x0 = x_s - s·v from an RF velocity."""
    return x_s - per_sample(s, x_s).to(x_s.dtype) * v


def rf_eps(x_s: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Noise prediction ε = x_s + (1 - s)·v from an RF velocity."""
    return x_s + (1 - per_sample(s, x_s).to(x_s.dtype)) * v


def rf_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Velocity v = ε - x0 from a (data, noise) pair."""
    return eps - x0


# ---- TrigFlow -------------------------------------------------------------------------------------


def trig_interpolate(
    x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = cos t·x0 + sin t·ε and F = cos t·ε - sin t·x0. x0, eps [B, ...]; t [B]."""
    c, s = torch.cos(per_sample(t, x0).to(x0.dtype)), torch.sin(per_sample(t, x0).to(x0.dtype))
    return c * x0 + s * eps, c * eps - s * x0


def trig_x0(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """Data prediction x0 = cos t·x_t - sin t·F (equal to the consistency function)."""
    c, s = torch.cos(per_sample(t, x_t).to(x_t.dtype)), torch.sin(per_sample(t, x_t).to(x_t.dtype))
    return c * x_t - s * F


def trig_eps(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """Noise prediction ε = sin t·x_t + cos t·F."""
    c, s = torch.cos(per_sample(t, x_t).to(x_t.dtype)), torch.sin(per_sample(t, x_t).to(x_t.dtype))
    return s * x_t + c * F


def consistency_fn(x_t: torch.Tensor, t: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """f(x_t, t) = cos t·x_t - sin t·F(x_t, t); f(x, 0) = x exactly (boundary condition)."""
    return trig_x0(x_t, t, F)


# ---- clocks ---------------------------------------------------------------------------------------


def rf_time_from_trig(t: torch.Tensor) -> torch.Tensor:
    """s = sin t / (sin t + cos t), computed in float64."""
    t64 = t.double()
    return (torch.sin(t64) / (torch.sin(t64) + torch.cos(t64))).to(t.dtype)


def trig_time_from_rf(s: torch.Tensor) -> torch.Tensor:
    """t = atan2(s, 1 - s), the inverse of `rf_time_from_trig`, computed in float64."""
    s64 = s.double()
    return torch.atan2(s64, 1 - s64).to(s.dtype)


def rf_scale_from_trig(t: torch.Tensor) -> torch.Tensor:
    """x_s = x_t · k(t) with k(t) = 1 / (sin t + cos t)."""
    t64 = t.double()
    return (1 / (torch.sin(t64) + torch.cos(t64))).to(t.dtype)


def trig_velocity_from_rf(
    rf_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_t: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """TrigFlow velocity F(x_t, t) of an RF velocity model v(x_s, s), eq. (1).

    Written with differentiable torch ops (no float64 round trip) so that forward- and
    reverse-mode AD flow through it; the clock conversion is exact in the working precision.
    """
    tb = per_sample(t, x_t).to(x_t.dtype)
    c, s = torch.cos(tb), torch.sin(tb)
    denom = s + c
    rf_s = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    v = rf_model(x_t / denom, rf_s)
    return ((c - s) * x_t + v) / denom


# ---- classifier-free guidance ---------------------------------------------------------------------


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """v = v_u + w·(v_c - v_u). w = 1 is the conditional model; w = 0 the unconditional one."""
    return v_uncond + scale * (v_cond - v_uncond)


def guided(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    text: torch.Tensor,
    null_text: torch.Tensor,
    scale: float,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Wrap `model(x, time, text)` into `v(x, time)` with CFG of strength `scale`.

    Both branches run as one batch of 2B. With scale == 1 only the conditional branch runs.
    text, null_text: [B, L, D_text] (null_text may be [1, L, D_text] and is broadcast).
    """
    if scale == 1.0:
        return lambda x, time: model(x, time, text)

    def v(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        null = null_text.expand_as(text)
        out = model(torch.cat([x, x]), torch.cat([time, time]), torch.cat([text, null]))
        v_cond, v_uncond = out.chunk(2)
        return cfg_combine(v_cond, v_uncond, scale)

    return v
