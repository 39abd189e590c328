"""Rectified-flow (flow-matching) pretraining of the teacher, with CFG dropout.

Convention: RF time s in [0, 1], s = 0 data (models/parameterization.py). Loss (Lipman et al.
2023; Liu et al. 2023): E ‖v_θ(x_s, s, c) - (ε - x0)‖², s from a logit-normal density (SD3,
Esser et al. 2024, eq. 19) or uniform; the text is replaced by the empty prompt with
probability `cfg_dropout` so the same network is also the unconditional model for CFG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vdistill.methods.recipes.base import Batch, Recipe
from vdistill.models.parameterization import rf_interpolate


@dataclass
class FlowMatchingConfig:
    cfg_dropout: float = 0.1  # probability of training on the empty prompt
    time_sampling: str = "logit_normal"  # or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.time_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"time_sampling must be 'logit_normal' or 'uniform', got {self.time_sampling!r}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


def sample_rf_time(b: int, cfg: FlowMatchingConfig, device: torch.device) -> torch.Tensor:
    """[B] RF times in (0, 1)."""
    if cfg.time_sampling == "uniform":
        return torch.rand(b, device=device)
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(b, device=device))


def drop_text(text: torch.Tensor, null_text: torch.Tensor, p: float) -> torch.Tensor:
    """Replace each sample's text by the empty prompt with probability p. text [B, L, D]."""
    if p == 0:
        return text
    keep = torch.rand(text.shape[0], device=text.device) >= p
    return torch.where(keep[:, None, None], text, null_text.expand_as(text))


class FlowMatching(Recipe):
    name = "pretrain"

    def __init__(self, student: torch.nn.Module, cfg: FlowMatchingConfig | None = None):
        super().__init__()
        self.student = student
        self.cfg = cfg or FlowMatchingConfig()

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = batch.x0
        eps = torch.randn_like(x0)
        s = sample_rf_time(x0.shape[0], self.cfg, x0.device)
        x_s, v = rf_interpolate(x0, eps, s)
        text = drop_text(batch.text, batch.null_text, self.cfg.cfg_dropout)
        pred = self.student(x_s, s, text)
        return (pred.float() - v).square().mean(), {}
