"""TrigFlow views of RF networks for rCM/sCM: velocities, time proposals, sampling times, w_φ(t).

Networks stay rectified-flow DiTs `net(x_s, s, text)` (RF time, s = 0 data); rCM works in
TrigFlow (t in [0, π/2], σ_d = 1), so every network is read through eq. (1) of
`models/parameterization.py`, F(x_t, t) = ((cos t − sin t)·x_t + v(x_t/(sin t + cos t), s(t))) /
(sin t + cos t), which is differentiable in both x_t and t (the JVP pass needs ∂F/∂t).

Time proposal (Lu & Song 2024, Sec. 4.1; σ_d = 1): tan t = exp(τ), τ ~ N(P_mean, P_std²); rCM's
public code can draw its DMD times from a shifted uniform RF schedule instead (`sample_shifted_trig_time`).
Few-step sampling (Song et al. 2023, Alg. 1, in TrigFlow): x0 = cos t_i·x − sin t_i·F, then
x = cos t_{i+1}·x0 + sin t_{i+1}·ε. With x_s = x_t/(sin t + cos t) this is exactly the RF
consistency sampler of `methods/sampling/samplers.py` at s_i = s(t_i), so exports store RF times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from vdistill.models.parameterization import guided, rf_time_from_trig, trig_time_from_rf, trig_velocity_from_rf

TrigVelocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # F(x_t [B, ...], t [B])
TimeProposal = Callable[[int, torch.device | str], torch.Tensor]  # (b, device) -> [b] TrigFlow times
T_MIN = 1e-4  # proposal times are clamped to [T_MIN, π/2 − T_MIN] so that cos t·sin t > 0


def trig_velocity(net: nn.Module, text: torch.Tensor) -> TrigVelocity:
    """F(x_t, t) of the RF network `net(x, s, text)` (eq. (1)); text [B, L, D] is fixed."""
    return lambda x_t, t: trig_velocity_from_rf(lambda x, s: net(x, s, text), x_t, t)


def trig_model(net: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """F(x_t, t, text): the TrigFlow network with the DiT's call signature (for `models.jvp.jvp`)."""
    return lambda x_t, t, text: trig_velocity_from_rf(lambda x, s: net(x, s, text), x_t, t)


def guided_trig_velocity(net: nn.Module, text: torch.Tensor, null_text: torch.Tensor, scale: float) -> TrigVelocity:
    """Teacher F(x_t, t) with classifier-free guidance of strength `scale` baked into dx_t/dt."""
    v = guided(net, text, null_text, scale)
    return lambda x_t, t: trig_velocity_from_rf(v, x_t, t)


def sample_trig_time(
    b: int, p_mean: float, p_std: float, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[b] TrigFlow times with tan t = exp(N(p_mean, p_std²)), clamped to [T_MIN, π/2 − T_MIN]."""
    if p_std < 0:
        raise ValueError(f"p_std must be >= 0, got {p_std}")
    tau = p_mean + p_std * torch.randn(b, generator=generator, device=device)
    return torch.atan(torch.exp(tau)).clamp(T_MIN, math.pi / 2 - T_MIN)


def sample_shifted_trig_time(b: int, shift: float, device: torch.device | str) -> torch.Tensor:
    """[b] TrigFlow times at RF times s = shift·u / (1 + (shift − 1)·u), u ~ U(0, 1) (the shifted
    schedule of Wan/SD3; shift 5 puts the median at s = 5/6), clamped like `sample_trig_time`."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = torch.rand(b, device=device, dtype=torch.float64)
    s = shift * u / (1 + (shift - 1) * u)
    return trig_time_from_rf(s).float().clamp(T_MIN, math.pi / 2 - T_MIN)


def check_mid_times(times: Sequence[float], arg: str) -> None:
    """Intermediate sampling times must be strictly decreasing in (0, π/2)."""
    ok = all(0 < t < math.pi / 2 for t in times) and all(a > b for a, b in zip(times, times[1:]))
    if not ok:
        raise ValueError(f"{arg} must be strictly decreasing times in (0, π/2), got {tuple(times)}")


def rf_sampling_times(mid_times: Sequence[float]) -> list[float]:
    """RF times [1, s(t_1), ...] of TrigFlow sampling from t_0 = π/2 through `mid_times`."""
    trig = torch.tensor([math.pi / 2, *mid_times], dtype=torch.float64)
    return rf_time_from_trig(trig).tolist()


class AdaptiveWeight(nn.Module):
    """Learned per-time loss weight w_φ(t) of sCM (Lu & Song 2024, eq. 9): Fourier features -> linear.

    forward(t [B]) -> w [B]; the weighted loss is exp(−w)·L + w, minimised by w = log L, so
    the per-time loss scales are equalised. Zero-initialised: starts as the unweighted loss.
    """

    def __init__(self, features: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(features, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features, generator=g))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        noise_level = torch.log(torch.tan(t.float())) / 4  # EDM-style c_noise of σ = tan t
        feats = math.sqrt(2) * torch.cos(noise_level[:, None] * self.freqs + self.phases)
        return self.linear(feats).squeeze(1)
