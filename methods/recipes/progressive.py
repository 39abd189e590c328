"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) on the rectified-flow ODE.

Convention: RF time s in [0, 1], s = 0 data, v = dx/ds (models/parameterization.py). DDIM on
this path is exactly the Euler step of dx/ds = v, so the paper's two DDIM teacher steps become two
Euler steps on the teacher's grid g = rf_time_grid(2N, shift) (with the SD3/Wan shift) and the
student's one step spans two teacher intervals. For a student of N steps, i ~ U{0..N-1},
s = g[2i], s' = g[2i+1], s'' = g[2i+2], x_s = (1 - s)·x0 + s·ε:

    x' = x_s + (s' - s)·v_T(x_s, s),   x'' = x' + (s'' - s')·v_T(x', s'),
    L = d( v_θ(x_s, s),  (x'' - x_s) / (s'' - s) ),

i.e. the student's single Euler step from s lands where the teacher's two steps land (the
paper's x-space target, eq. in Alg. 2, expressed as the velocity of that jump).

Stages halve the step count: teacher_steps -> teacher_steps/2 -> ... -> final_steps, lasting
`stage_steps[k]` training steps each. The student carries over from stage to stage; the teacher
of stage k+1 is a frozen copy of the student at the end of stage k (kept in `extra_state`, so a
resumed run is exact). CFG is baked in at stage 1: the original teacher runs with its guidance
scale, later teachers (guided students) with scale 1.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from vdistill.methods.data.batch import Batch
from vdistill.methods.recipes.base import DistillRecipe, Logs
from vdistill.methods.recipes.losses import check_loss, regression_loss
from vdistill.methods.recipes.shared import frozen, student_from
from vdistill.methods.sampling.samplers import ode_step, rf_time_grid
from vdistill.models.config_fields import check_fields
from vdistill.models.parameterization import guided, per_sample, rf_interpolate

log = logging.getLogger("vdistill")


@dataclass
class ProgressiveConfig:
    teacher_steps: int = 64  # Euler steps of the original teacher's grid
    final_steps: int = 1  # student steps after the last stage (teacher_steps / 2^stages)
    stage_steps: tuple[int, ...] = (250, 250, 250, 250, 400, 600)  # training steps per stage (one value: all)
    shift: float = 1.0  # time-grid shift of the teacher grid and the student's sampler
    loss: str = "l2"  # l2 | pseudo_huber
    huber_c: float | None = None  # pseudo-Huber c; None = 0.00054·sqrt(elements per sample)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.final_steps < 1 or self.teacher_steps <= self.final_steps:
            raise ValueError(
                f"need teacher_steps > final_steps >= 1, got teacher_steps={self.teacher_steps}, "
                f"final_steps={self.final_steps}"
            )
        ratio = self.teacher_steps // self.final_steps
        if self.teacher_steps % self.final_steps or ratio & (ratio - 1):
            raise ValueError(
                f"teacher_steps / final_steps must be a power of two, got {self.teacher_steps} / {self.final_steps}"
            )
        if len(self.stage_steps) not in (1, self.stages) or any(n < 1 for n in self.stage_steps):
            raise ValueError(
                f"stage_steps must be one positive value or {self.stages} (one per stage "
                f"{self.teacher_steps}->{self.final_steps}), got {self.stage_steps}"
            )
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        check_loss(self.loss, self.huber_c)

    @property
    def stages(self) -> int:
        return (self.teacher_steps // self.final_steps).bit_length() - 1

    def student_steps(self, stage: int) -> int:
        """Steps of the student trained in `stage` (0-based)."""
        return self.teacher_steps >> (stage + 1)

    def stage_at(self, step: int) -> int:
        """The stage that training step `step` belongs to (the last stage goes on to the end)."""
        lengths = self.stage_steps * self.stages if len(self.stage_steps) == 1 else self.stage_steps
        end = 0
        for stage, n in enumerate(lengths):
            end += n
            if step < end:
                return stage
        return self.stages - 1


class Progressive(DistillRecipe):
    """Student v_θ matches two Euler steps of the current teacher with one step of twice the size."""

    name = "progressive"
    Config = ProgressiveConfig
    integrates_teacher_ode = True

    @classmethod
    def sampler_meta(cls, cfg: ProgressiveConfig) -> dict:
        return {"kind": "ode", "shift": cfg.shift}

    def __init__(self, teacher: nn.Module, cfg: ProgressiveConfig, teacher_scale: float = 1.0):
        super().__init__()
        self.cfg, self.teacher_scale = cfg, teacher_scale
        self.student = student_from(teacher)
        self.teacher = frozen(teacher)
        self.stage = 0

    def _new_teacher(self) -> None:
        """The next stage's teacher: a frozen copy of the student as it is now."""
        self.teacher = frozen(copy.deepcopy(self.student))
        self.stage += 1

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, Logs]:
        while self.stage < self.cfg.stage_at(step):
            self._new_teacher()
            log.info("progressive: stage %d at step %d, %d-step student", self.stage, step, self._steps())
        x0 = batch.x0
        n = self._steps()
        grid = rf_time_grid(2 * n, self.cfg.shift, x0.device)
        i = torch.randint(n, (x0.shape[0],), device=x0.device)
        s, s_mid, s_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        x_s, _ = rf_interpolate(x0, torch.randn_like(x0), s)
        with torch.no_grad():
            scale = self.teacher_scale if self.stage == 0 else 1.0
            velocity = guided(self.teacher, batch.text, batch.null_text, scale)
            x_two = ode_step(velocity, ode_step(velocity, x_s, s, s_mid), s_mid, s_next)
            target = (x_two.float() - x_s) / per_sample(s_next - s, x0)
        pred = self.student(x_s, s, batch.text)
        loss = regression_loss(pred, target, self.cfg.loss, self.cfg.huber_c)
        return loss, {"stage": float(self.stage), "student_steps": float(n)}

    def _steps(self) -> int:
        return self.cfg.student_steps(self.stage)

    def check_shardable(self) -> None:
        raise ValueError(
            f"fsdp: {self.name} cannot shard its student yet (each stage copies the student's weights into a new "
            "teacher); use data parallelism (torchrun without train.fsdp)"
        )

    def extra_state(self) -> dict:
        return {"stage": self.stage, "teacher": self.teacher.state_dict() if self.stage > 0 else None}

    def load_extra_state(self, state: dict) -> None:
        if set(state) != {"stage", "teacher"}:
            raise ValueError(f"recipe 'progressive' expects extra state {{stage, teacher}}, got {sorted(state)}")
        if state["stage"] > 0:
            self.stage = state["stage"] - 1
            self._new_teacher()
            self.teacher.load_state_dict(state["teacher"])
