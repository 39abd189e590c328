"""Rectified-flow (flow-matching) pretraining of the teacher, with CFG dropout.

Convention: RF time s in [0, 1], s = 0 data (models/parameterization.py). Loss (Lipman et al.
2023; Liu et al. 2023): E ‖v_θ(x_s, s, c) - (ε - x0)‖², s from a logit-normal density (SD3,
Esser et al. 2024, eq. 19) or uniform; the text is replaced by the empty prompt with
probability `cfg_dropout` so the same network is also the unconditional model for CFG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vdistill.methods.data.batch import Batch
from vdistill.methods.recipes.base import Logs, Recipe
from vdistill.methods.recipes.shared import check_time_sampling, sample_rf_time
from vdistill.models.config_fields import check_fields
from vdistill.models.parameterization import rf_interpolate


@dataclass
class FlowMatchingConfig:
    cfg_dropout: float = 0.1  # probability of training on the empty prompt
    time_sampling: str = "logit_normal"  # RF time density: logit_normal (SD3) or uniform
    logit_mean: float = 0.0  # mean of the logit-normal time density (> 0: more high-noise times)
    logit_std: float = 1.0  # standard deviation of the logit-normal time density (> 0)

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        check_time_sampling(self.time_sampling)
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


def drop_text(text: torch.Tensor, null_text: torch.Tensor, p: float) -> torch.Tensor:
    """Replace each sample's text by the empty prompt with probability p. text [B, L, D]."""
    if p == 0:
        return text
    keep = torch.rand(text.shape[0], device=text.device) >= p
    return torch.where(keep[:, None, None], text, null_text.expand_as(text))


class FlowMatching(Recipe):
    name = "pretrain"
    export_stem = "model"  # a teacher, not a student

    def __init__(self, student: torch.nn.Module, cfg: FlowMatchingConfig | None = None):
        super().__init__()
        self.student = student
        self.cfg = cfg or FlowMatchingConfig()

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, Logs]:
        x0 = batch.x0
        eps = torch.randn_like(x0)
        cfg = self.cfg
        s = sample_rf_time(x0.shape[0], cfg.time_sampling, x0.device, cfg.logit_mean, cfg.logit_std)
        x_s, v = rf_interpolate(x0, eps, s)
        text = drop_text(batch.text, batch.null_text, self.cfg.cfg_dropout)
        pred = self.student(x_s, s, text)
        return (pred.float() - v).square().mean(), {}
