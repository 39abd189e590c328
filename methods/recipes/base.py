"""The interface every training recipe implements, and the batch it receives.

A recipe owns its networks (the student, and e.g. a frozen teacher or a critic) and turns a batch
into a scalar loss for the student. The trainer owns everything generic: device placement,
autocast, the student's optimiser, clipping, EMA, checkpoints, logs and profiling ranges.
Recipes with networks of their own to train (rCM's critic) do it in `auxiliary_step`, with their
own optimiser, and put its state in `state_dict` so that resume stays exact; under torchrun they
compute those losses through the modules `replicate_auxiliary` hands them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass
class Batch:
    x0: torch.Tensor  # (B, C, T, H, W) clean clips or latents
    text: torch.Tensor  # (B, L, D_text) text embeddings
    null_text: torch.Tensor  # (1, L, D_text) embedding of the empty prompt (CFG)
    labels: torch.Tensor | None = None  # (B, 3) attributes, synthetic data only
    # (index, count): this batch is part `index` of the `count` equal parts of a training step's global batch
    # (data-parallel ranks x micro-batches, set by the trainer); each part draws kernel noise from its own stream
    part: tuple[int, int] = (0, 1)

    def to(self, device: torch.device) -> Batch:
        return replace(
            self,
            x0=self.x0.to(device, non_blocking=True),
            text=self.text.to(device, non_blocking=True),
            null_text=self.null_text.to(device, non_blocking=True),
            labels=None if self.labels is None else self.labels.to(device, non_blocking=True),
        )

    def noise_offset(self, index: int) -> int:
        """Counter offset of noise stream `index` (e.g. the step) for this part: independent across parts,
        `index` itself for a step's whole batch."""
        part, count = self.part
        return index * count + part

    def split(self, n: int, first_part: int, count: int) -> list[Batch]:
        """`n` equal micro-batches, parts first_part .. first_part + n - 1 of `count`."""
        if self.x0.shape[0] % n:
            raise ValueError(f"grad_accum {n} must divide the batch of {self.x0.shape[0]} clips each rank gets")
        chunks = [t.chunk(n) if t is not None else [None] * n for t in (self.x0, self.text, self.labels)]
        return [
            Batch(x0, text, self.null_text, labels, (first_part + i, count))
            for i, (x0, text, labels) in enumerate(zip(*chunks))
        ]


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

    def check_shardable(self) -> None:
        """ValueError when FSDP2 (`TrainConfig.fsdp`) cannot shard this recipe's student: e.g. a recipe that
        copies the student's weights into another network of its own."""

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
