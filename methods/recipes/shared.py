"""Student/teacher set-up shared by the distillation recipes."""

from __future__ import annotations

import copy

from torch import nn


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode with gradients off (a teacher or a target network)."""
    return model.eval().requires_grad_(False)


def student_from(teacher: nn.Module) -> nn.Module:
    """A trainable copy of `teacher` (students start from the teacher's weights)."""
    return copy.deepcopy(teacher).train().requires_grad_(True)
