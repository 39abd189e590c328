"""The interface every training recipe implements, and the batch it receives.

A recipe owns its networks (the student, and e.g. a frozen teacher or a critic) and turns a batch
into a scalar loss for the student. The trainer owns everything generic: device placement,
autocast, the student's optimiser, clipping, EMA, checkpoints, logs and profiling ranges.
Recipes with networks of their own to train (rCM's critic) do it in `auxiliary_step`, with their
own optimiser, and put its state in `state_dict` so that resume stays exact; under torchrun they
compute those losses through the modules `replicate_auxiliary` hands them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Batch:
    x0: torch.Tensor  # (B, C, T, H, W) clean clips or latents
    text: torch.Tensor  # (B, L, D_text) text embeddings
    null_text: torch.Tensor  # (1, L, D_text) embedding of the empty prompt (CFG)
    labels: torch.Tensor | None = None  # (B, 3) attributes, synthetic data only

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.x0.to(device, non_blocking=True),
            self.text.to(device, non_blocking=True),
            self.null_text.to(device, non_blocking=True),
            None if self.labels is None else self.labels.to(device, non_blocking=True),
        )


class Recipe(nn.Module):
    """Base class: subclasses set `name` and `student` and implement `loss`."""

    name: str = "recipe"
    student: nn.Module

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss for the student at training step `step`, and scalars to log."""
        raise NotImplementedError

    def trained_by_loss(self) -> list[nn.Module]:
        """The networks `loss` trains (their gradients are averaged across data-parallel ranks)."""
        return [self.student]

    def replicate_auxiliary(self, wrap) -> None:
        """Called once by the trainer with `wrap(module) -> module` (DDP under torchrun, else identity):
        recipes that train networks of their own in `auxiliary_step` compute those losses through the
        wrapped modules so that every rank applies the same update."""

    def auxiliary_step(self, batch: Batch, step: int) -> dict[str, float]:
        """Optional extra update after the student's (e.g. a critic); returns scalars to log."""
        return {}

    def extra_state(self) -> dict:
        """State beyond the student's weights that a resume needs (e.g. a critic's optimiser)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"recipe {self.name!r} got extra state it does not know: {sorted(state)}")
