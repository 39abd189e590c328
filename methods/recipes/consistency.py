"""Consistency distillation (Song, Dhariwal, Chen & Sutskever 2023, Algorithm 2) on the RF schedule.

Convention: RF time s in [0, 1], s = 0 data, v = dx/ds (models/parameterization.py). The schedule
is the shifted ODE grid s_0 = 1 > s_1 > ... > s_N = 0 (rf_time_grid(N, shift)). The consistency
function is the student's data prediction

    f_θ(x, s) = x - s·v_θ(x, s)            (rf_x0; f_θ(x, 0) = x exactly: the boundary condition
                                            of the paper's eq. (5) holds by construction).

With n ~ U{0..N-1}, s = s_n, s' = s_{n+1} < s, x_s = (1 - s)·x0 + s·ε, the teacher takes one
Euler or Heun step of its guided ODE (CFG at the teacher's scale, baked into the student),
x̂_{s'} = x_s + (s' - s)·v_T, and (eq. (7) with λ = 1)

    L = d( f_θ(x_s, s),  f_θ⁻(x̂_{s'}, s') ),

θ⁻ the target network: the stop-grad student for `target_decay = 0` (Song & Dhariwal 2023,
"Improved Techniques", Sec. 3.2) or an EMA θ⁻ <- μ·θ⁻ + (1 - μ)·θ with μ = target_decay (the
original CD). The EMA target is a frozen copy held by the recipe, updated in `auxiliary_step` right
after the optimiser step (`kernels.ema.ema_update_ref`, one multi-tensor lerp) and saved in
`extra_state` for exact resume; it is distinct from the trainer's power EMA, which is what gets
exported. d is the MSE or the pseudo-Huber distance. Sampling: multistep consistency sampling
(Alg. 1) at RF times from the same grid (`methods.sampling.samplers.sample_consistency`).

Segments (multistep consistency models, Heek, Hoogeboom & Salimans 2024): with `segments = K > 1`
the grid is cut into K runs of N/K intervals with ends e_0 = 1 > e_1 > ... > e_K = 0, and the
student maps a point of the segment (e_{k+1}, e_k] to the teacher's ODE point at its end e_{k+1}:

    f_θ(x, s) = x + (e_{k+1} - s)·v_θ(x, s)      (f_θ(x, e_{k+1}) = x: the boundary condition per segment).

The loss is unchanged; the target time s' never leaves the segment of s. Such a student samples
deterministically by Euler steps on the same shifted grid (`sampler_meta` exports {"kind": "ode"}):
K steps land on the segment ends exactly, 2K steps take each jump in two halves along its chord.
Use the Euler solver (the default of `sample`/`evaluate`): Heun would average the velocities of two
different jumps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from vdistill.kernels.ema import ema_update_ref
from vdistill.methods.data.batch import Batch
from vdistill.methods.recipes.base import DistillRecipe, Logs
from vdistill.methods.recipes.losses import check_loss, regression_loss
from vdistill.methods.recipes.shared import frozen, student_from
from vdistill.methods.sampling.samplers import SOLVERS, consistency_times, ode_step, rf_time_grid
from vdistill.models.config_fields import check_fields
from vdistill.models.parameterization import guided, per_sample, rf_interpolate


@dataclass
class ConsistencyConfig:
    intervals: int = 32  # N: number of adjacent-time intervals of the schedule
    solver: str = "heun"  # the teacher's one ODE step: euler | heun
    shift: float = 1.0  # time-grid shift of the schedule and of the sampling times
    # μ in [0, 1) of the EMA target network (Song et al. 2023); 0 = stop-grad student, which can collapse
    # (decay sweep: docs/results/distillation.md)
    target_decay: float = 0.99
    loss: str = "l2"  # l2 | pseudo_huber
    huber_c: float | None = None  # pseudo-Huber c; None = 0.00054·sqrt(elements per sample)
    sample_steps: tuple[int, ...] = (1, 2, 4)  # step counts whose sampling times go into the export
    segments: int = 1  # K > 1: multistep consistency, the student jumps to the end of its segment (docstring)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.intervals < 1:
            raise ValueError(f"intervals must be >= 1, got {self.intervals}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0 <= self.target_decay < 1:
            raise ValueError(f"target_decay must be in [0, 1), got {self.target_decay}")
        if not self.sample_steps or any(n < 1 for n in self.sample_steps):
            raise ValueError(f"sample_steps must be positive step counts, got {self.sample_steps}")
        if self.segments < 1 or self.intervals % self.segments:
            raise ValueError(f"segments must be >= 1 and divide intervals={self.intervals}, got {self.segments}")
        check_loss(self.loss, self.huber_c)


def consistency_output(
    model: nn.Module, x: torch.Tensor, s: torch.Tensor, text: torch.Tensor, end: torch.Tensor
) -> torch.Tensor:
    """f(x, s) = x + (end - s)·v(x, s, text) for x [B, ...], s and end [B]: equals x at s = end, and is the
    data prediction x - s·v for end = 0."""
    jump = per_sample(end - s, x)
    return x + jump * model(x, s, text).float()


class Consistency(DistillRecipe):
    """Student f_θ matches the target network's f at the teacher's one-step neighbour."""

    name = "consistency"
    Config = ConsistencyConfig
    integrates_teacher_ode = True

    @classmethod
    def sampler_meta(cls, cfg: ConsistencyConfig) -> dict:
        if cfg.segments > 1:
            return {"kind": "ode", "shift": cfg.shift, "segments": cfg.segments}
        times = {str(n): consistency_times(n, cfg.shift) for n in cfg.sample_steps}
        return {"kind": "consistency", "shift": cfg.shift, "times": times}

    def __init__(self, teacher: nn.Module, cfg: ConsistencyConfig, teacher_scale: float = 1.0):
        super().__init__()
        self.cfg, self.teacher_scale = cfg, teacher_scale
        self.student = student_from(teacher)
        self.teacher = frozen(teacher)
        self.target = frozen(copy.deepcopy(self.student)) if cfg.target_decay > 0 else None

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, Logs]:
        x0 = batch.x0
        grid = rf_time_grid(self.cfg.intervals, self.cfg.shift, x0.device)
        n = torch.randint(self.cfg.intervals, (x0.shape[0],), device=x0.device)
        s, s_prev = grid[n], grid[n + 1]
        per_segment = self.cfg.intervals // self.cfg.segments
        end = grid[(n // per_segment + 1) * per_segment]
        x_s, _ = rf_interpolate(x0, torch.randn_like(x0), s)
        with torch.no_grad():
            velocity = guided(self.teacher, batch.text, batch.null_text, self.teacher_scale)
            x_prev = ode_step(velocity, x_s, s, s_prev, self.cfg.solver).float()
            target_net = self.target if self.target is not None else self.student
            target = consistency_output(target_net, x_prev, s_prev, batch.text, end)
        pred = consistency_output(self.student, x_s, s, batch.text, end)
        return regression_loss(pred, target, self.cfg.loss, self.cfg.huber_c), {}

    def check_shardable(self) -> None:
        if self.target is not None:
            raise ValueError(
                f"fsdp: {self.name} with target_decay > 0 cannot shard its student yet (its EMA target network is "
                "a whole copy updated from the student's weights); use data parallelism (torchrun without train.fsdp)"
            )

    def auxiliary_step(self, batch: Batch, step: int) -> Logs:
        if self.target is not None:
            ema_update_ref(list(self.target.parameters()), list(self.student.parameters()), self.cfg.target_decay)
        return {}

    def extra_state(self) -> dict:
        return {"target": self.target.state_dict()} if self.target is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if set(state) != ({"target"} if self.target is not None else set()):
            raise ValueError(
                f"recipe 'consistency' (target_decay={self.cfg.target_decay}) cannot resume from extra state "
                f"{sorted(state)}"
            )
        if self.target is not None:
            self.target.load_state_dict(state["target"])
