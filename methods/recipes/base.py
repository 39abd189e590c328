"""The interface every training recipe implements.

A recipe owns its networks (the student, and e.g. a frozen teacher or a critic) and turns a batch
into a scalar loss for the student. The trainer owns everything generic: device placement,
autocast, the student's optimiser, clipping, EMA, checkpoints, logs and profiling ranges.
Recipes with networks of their own to train (rCM's critic) do it in `auxiliary_step`, with their
own optimiser, and put its state in `extra_state` so that resume stays exact; under torchrun they
compute those losses through the modules `replicate_auxiliary` hands them.

A distillation recipe (`DistillRecipe`) also says how it is built from a teacher and how its student
samples: `registry.RECIPES` maps each method name to its class, and `methods/train/runs.py` drives any of
them the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vdistill.methods.data.batch import Batch
from vdistill.methods.sampling.generate import require_ode_sampler

if TYPE_CHECKING:
    from vdistill.methods.sampling.generate import ModelBundle

# scalars to log: Python numbers, or 0-d tensors left on the device, which the trainer reads on the host only
# at the steps it logs (reading one waits for the GPU to finish all queued work)
Logs = dict[str, "torch.Tensor | float"]


class Recipe(nn.Module):
    """Base class: subclasses set `name` and `student` and implement `loss`."""

    name: str = "recipe"
    export_stem: str = "student"  # exports: <stem>.safetensors (raw) and <stem>_ema.safetensors
    student: nn.Module

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, Logs]:
        """Scalar loss for the student at training step `step`, and scalars to log (no host reads of device
        values: a step that never waits for the GPU lets the host queue the next kernels while it runs)."""
        raise NotImplementedError

    def trained_by_loss(self) -> list[nn.Module]:
        """The networks `loss` trains (their gradients are averaged across data-parallel ranks)."""
        return [self.student]

    def check_shardable(self) -> None:
        """ValueError when FSDP2 (`TrainConfig.fsdp`) cannot shard this recipe's student: e.g. a recipe that
        copies the student's weights into another network of its own."""

    def shard_auxiliary(self, shard) -> None:
        """Called once by the trainer under `TrainConfig.fsdp` with `shard(module) -> module` (FSDP2, in place), so
        that no rank holds a whole network: shards the frozen `teacher`, if the recipe has one; recipes with
        networks of their own (rCM's critic) shard those too."""
        teacher = getattr(self, "teacher", None)
        if isinstance(teacher, nn.Module):
            shard(teacher)

    def replicate_auxiliary(self, wrap) -> None:
        """Called once by the trainer with `wrap(module) -> module` (DDP under torchrun, else identity):
        recipes that train networks of their own in `auxiliary_step` compute those losses through the
        wrapped modules so that every rank applies the same update."""

    def auxiliary_step(self, batch: Batch, step: int) -> Logs:
        """Optional extra update after the student's (e.g. a critic); returns scalars to log."""
        return {}

    def extra_state(self) -> dict:
        """State beyond the student's weights that a resume needs (e.g. a critic's optimiser)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"recipe {self.name!r} got extra state it does not know: {sorted(state)}")


class DistillRecipe(Recipe):
    """A recipe whose student is distilled from a teacher. Subclasses set `Config` (the dataclass of the
    method's options, each with a one-line comment: `vdistill distill METHOD --help` lists them) and implement
    `__init__(teacher_model, cfg, teacher_scale)` and `sampler_meta`."""

    Config: ClassVar[type]
    integrates_teacher_ode: ClassVar[bool] = False  # the recipe steps the teacher's ODE: it needs a flow teacher

    @classmethod
    def from_teacher(cls, teacher: ModelBundle, cfg: Any) -> DistillRecipe:
        """The recipe for a loaded teacher bundle (its model, text encoder, data geometry and guidance scale);
        the student starts from the teacher's weights. Checks of the teacher go here, before any file is written."""
        if cls.integrates_teacher_ode:
            require_ode_sampler(teacher)
        return cls(teacher.model, cfg, teacher.cfg_scale)

    @classmethod
    def sampler_meta(cls, cfg: Any) -> dict:
        """Stored in the student's export: how `generate` samples it ({"kind": "ode", ...} or
        {"kind": "consistency", "times": {...}})."""
        raise NotImplementedError
