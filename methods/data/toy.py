"""A 2-D toy where distillation quality is exact and cheap: a mixture of 8 Gaussians on a ring.

Everything speaks the video model's interface — `model(x [B, 2], time [B], text [B, L, D])`,
RF convention (s = 0 data, v = ε - x0) — so the recipes run unchanged on it; the text is
ignored (the toy is unconditional, CFG scale 1). Quality is measured with the sliced
Wasserstein-2 distance and the energy distance to fresh data samples (same seeds for every
method). `toy_teacher()` trains (and caches) a flow-matching MLP teacher in a few seconds on CPU.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from vdistill.methods.data.batch import Batch
from vdistill.methods.sampling.samplers import sample_rf
from vdistill.models.dit import sinusoidal_embedding
from vdistill.models.parameterization import rf_interpolate

TOY_TEXT = torch.zeros(1, 1, 1)  # placeholder conditioning: (1, L=1, D=1), broadcast per batch


def toy_data(n: int, seed: int = 0, modes: int = 8, radius: float = 2.0, std: float = 0.15) -> torch.Tensor:
    """n samples [n, 2] from `modes` Gaussians evenly spaced on a circle of `radius`."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(modes, (n,), generator=g)
    angle = 2 * math.pi * k.double() / modes
    centres = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return (centres + std * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def toy_text(b: int) -> torch.Tensor:
    return TOY_TEXT.expand(b, 1, 1)


class ToyVelocityNet(nn.Module):
    """MLP v(x, s) for 2-D data; `text` is accepted and ignored (interface of the video DiT)."""

    def __init__(self, hidden: int = 256, depth: int = 4, freq_dim: int = 32):
        super().__init__()
        self.freq_dim = freq_dim
        layers: list[nn.Module] = [nn.Linear(2 + freq_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, time: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        temb = sinusoidal_embedding(time, self.freq_dim, 100.0).to(x.dtype)
        return self.net(torch.cat([x, temb], dim=-1))


class ToyBatches:
    """Endless toy `Batch`es (x0 [B, 2], placeholder text) for the `Trainer`; batch k depends only on
    (seed, k), and the position is resumable like the video batch sources."""

    def __init__(self, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.position = batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        x0 = toy_data(self.batch_size, seed=self.seed * 1_000_003 + self.position)
        self.position += 1
        return Batch(x0, toy_text(self.batch_size), TOY_TEXT)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between equal-size point sets [n, d] (random directions, fixed seed)."""
    if a.shape != b.shape:
        raise ValueError(f"point sets must have the same shape, got {list(a.shape)} and {list(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a.double() @ dirs, dim=0)
    pb, _ = torch.sort(b.double() @ dirs, dim=0)
    return float((pa - pb).square().mean().sqrt())


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| between point sets [n, d], [m, d]."""
    a, b = a.double(), b.double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def train_toy_flow(model: nn.Module, steps: int = 3000, batch: int = 512, lr: float = 2e-3, seed: int = 0) -> nn.Module:
    """Flow-matching training of `model` on the toy data (CPU, seconds)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        x0 = toy_data(batch, seed=seed * 100_003 + step)
        eps = torch.randn_like(x0)
        s = torch.rand(batch)
        x_s, v = rf_interpolate(x0, eps, s)
        loss = (model(x_s, s, toy_text(batch)) - v).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@functools.lru_cache(maxsize=2)
def _cached_teacher(steps: int, seed: int) -> dict:
    model = train_toy_flow(ToyVelocityNet(), steps=steps, seed=seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def toy_teacher(steps: int = 3000, seed: int = 0) -> ToyVelocityNet:
    """A trained flow-matching teacher for the toy (trained once per process, then copied)."""
    model = ToyVelocityNet()
    model.load_state_dict(_cached_teacher(steps, seed))
    return model.eval().requires_grad_(False)


def toy_sample_ode(model: nn.Module, n: int, steps: int, seed: int = 1, solver: str = "euler") -> torch.Tensor:
    """n samples [n, 2] from `model` with the RF ODE sampler from seeded noise."""
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return sample_rf(lambda x, s: model(x, s, toy_text(x.shape[0])), noise, steps, solver)
