"""The batch every recipe receives: clips (or latents), their text embeddings and the empty prompt's."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


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
