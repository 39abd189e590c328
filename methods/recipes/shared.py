"""What the recipes share: student/teacher set-up and the RF time distributions of flow-matching losses."""

from __future__ import annotations

import copy

import torch
from torch import nn

TIME_SAMPLINGS = ("logit_normal", "uniform")


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with gradients off (a teacher or a target network)."""
    return model.eval().requires_grad_(False)


def student_from(teacher: nn.Module) -> nn.Module:
    """A trainable copy of `teacher` (students start from the teacher's weights)."""
    return copy.deepcopy(teacher).train().requires_grad_(True)


def check_time_sampling(kind: str) -> None:
    if kind not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {kind!r}")


def sample_rf_time(
    b: int, kind: str, device: torch.device, logit_mean: float = 0.0, logit_std: float = 1.0
) -> torch.Tensor:
    """[B] RF times in (0, 1): uniform, or logit-normal (SD3, Esser et al. 2024, eq. 19)."""
    if kind == "uniform":
        return torch.rand(b, device=device)
    return torch.sigmoid(logit_mean + logit_std * torch.randn(b, device=device))
