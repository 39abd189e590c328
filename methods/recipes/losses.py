"""Regression distances shared by the distillation recipes.

`l2`: mean squared error over all elements. `pseudo_huber`: per sample
d(x, y) = sqrt(‖x - y‖² + c²) - c (Song & Dhariwal 2023, "Improved Techniques for Training
Consistency Models", Sec. 3.3), averaged over the batch, with c = 0.00054·sqrt(d) by default
(d = elements per sample), the paper's choice for d = 3·64·64 scaled to other sizes.
"""

from __future__ import annotations

import math

import torch

LOSSES = ("l2", "pseudo_huber")


def check_loss(kind: str, huber_c: float | None) -> None:
    """ValueError unless `kind` is a known distance and `huber_c` (if set) is positive."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    if huber_c is not None and huber_c <= 0:
        raise ValueError(f"huber_c must be > 0 or None, got {huber_c}")


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float | None = None):
    """Scalar distance between pred and target [B, ...], computed in float32."""
    check_loss(kind, huber_c)
    diff = pred.float() - target.float()
    if kind == "l2":
        return diff.square().mean()
    per_sample = diff.flatten(1).square().sum(dim=1)
    c = huber_c if huber_c is not None else 0.00054 * math.sqrt(diff[0].numel())
    return (torch.sqrt(per_sample + c * c) - c).mean()
