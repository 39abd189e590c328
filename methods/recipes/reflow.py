"""ReFlow: distil a rectified-flow teacher by straightening its ODE couplings.

Liu, Gong & Liu 2023, "Flow Straight and Fast" (Sec. 2.2, the reflow procedure; eq. (1) with the
coupling (X0, X1) replaced by the teacher's): a noise ε is carried to data x̂0 by the teacher ODE,
and the student, initialised from the teacher, regresses the straight line between them:

    L = E_{(ε, x̂0), s} d( v_θ((1 - s)·x̂0 + s·ε, s, c),  ε - x̂0 ).

Convention: RF time s in [0, 1], s = 0 data, s = 1 noise, v = dx/ds (models/parameterization.py);
the teacher ODE runs from s = 1 to s = 0 with CFG at the teacher's scale, so the student
(sampled with scale 1) has the guidance baked in. d is the MSE or the pseudo-Huber distance.

Pairs come online (one teacher ODE solve per batch, `pair_steps` Euler/Heun steps) or offline from
shards written by `vdistill reflow-pairs` (`method.pairs=DIR`, methods/data/reflow_pairs.py), whose latents hold
[noise, data] along the channel axis. In offline mode the recipe reads its own shuffled, resumable
shard loader (its position is part of `extra_state`) and only takes the empty-prompt embedding from
the trainer's batches; `from_teacher` first checks every shard's header against the teacher's clip
geometry, text shape and guidance. Repeated rectification (k-rectified flow): pass the (k-1)-rectified
student's export as the teacher; its guidance is already baked in (scale 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vdistill.methods.data.batch import Batch
from vdistill.methods.data.shards import ShardDataset, ShardLoader, shard_meta, shard_paths
from vdistill.methods.recipes.base import DistillRecipe, Logs
from vdistill.methods.recipes.losses import check_loss, regression_loss
from vdistill.methods.recipes.shared import check_time_sampling, frozen, sample_rf_time, student_from
from vdistill.methods.sampling.generate import ModelBundle
from vdistill.methods.sampling.samplers import SOLVERS, sample_rf
from vdistill.methods.train import distributed
from vdistill.models.config_fields import check_fields
from vdistill.models.parameterization import guided, rf_interpolate


@dataclass
class ReFlowConfig:
    pair_steps: int = 6  # teacher ODE steps per online pair (Heun: 2·6 - 1 = 11 guided teacher calls)
    pair_solver: str = "heun"  # euler | heun
    shift: float = 1.0  # time-grid shift of the teacher ODE and of the student's sampler
    pairs: str | None = None  # directory of pair shards from `vdistill reflow-pairs`; None = online pairs
    time_sampling: str = "uniform"  # s on the line: uniform (Liu et al.) or logit_normal
    loss: str = "l2"  # l2 | pseudo_huber
    huber_c: float | None = None  # pseudo-Huber c; None = 0.00054·sqrt(elements per sample)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.pair_steps < 1:
            raise ValueError(f"pair_steps must be >= 1, got {self.pair_steps}")
        if self.pair_solver not in SOLVERS:
            raise ValueError(f"pair_solver must be one of {SOLVERS}, got {self.pair_solver!r}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        check_time_sampling(self.time_sampling)
        check_loss(self.loss, self.huber_c)


class ReFlow(DistillRecipe):
    """Student v_θ (a copy of `teacher`) learns ε - x̂0 on the lines between teacher ODE pairs."""

    name = "reflow"
    Config = ReFlowConfig
    integrates_teacher_ode = True

    @classmethod
    def from_teacher(cls, teacher: ModelBundle, cfg: ReFlowConfig) -> ReFlow:
        """Offline pairs are checked against the teacher's clip geometry, text encoder and guidance here, before
        any run file is written."""
        if cfg.pairs is not None:
            check_pairs(cfg.pairs, teacher.data.clip_shape, (teacher.text.max_len, teacher.text.dim), teacher.cfg_scale)
        return super().from_teacher(teacher, cfg)

    @classmethod
    def sampler_meta(cls, cfg: ReFlowConfig) -> dict:
        return {"kind": "ode", "shift": cfg.shift}

    def __init__(self, teacher: nn.Module, cfg: ReFlowConfig, teacher_scale: float = 1.0):
        super().__init__()
        self.cfg, self.teacher_scale = cfg, teacher_scale
        self.student = student_from(teacher)
        self.teacher = frozen(teacher)
        self.loader: ShardLoader | None = None

    @torch.no_grad()
    def online_pairs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, teacher sample, text): the teacher ODE from fresh noise [B, ...] at s = 1 to s = 0."""
        noise = torch.randn_like(batch.x0)
        velocity = guided(self.teacher, batch.text, batch.null_text, self.teacher_scale)
        data = sample_rf(velocity, noise, self.cfg.pair_steps, self.cfg.pair_solver, self.cfg.shift)
        return noise, data.float(), batch.text

    def _pair_loader(self, global_batch: int) -> ShardLoader:
        """Shuffled pair batches of `global_batch` pairs; each data-parallel rank reads its share."""
        part = distributed.shard_of(global_batch)
        return ShardLoader(ShardDataset(self.cfg.pairs), global_batch, seed=0, part=part)

    def offline_pairs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, teacher sample, text) of the next shuffled batch of pair shards."""
        if self.loader is None:
            self.loader = self._pair_loader(batch.x0.shape[0] * distributed.data_world())
        pairs = next(self.loader)
        noise, data = pairs.latents.to(batch.x0.device, torch.float32).chunk(2, dim=1)
        return noise, data, pairs.text.to(batch.text.device, batch.text.dtype)

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, Logs]:
        noise, data, text = self.offline_pairs(batch) if self.cfg.pairs else self.online_pairs(batch)
        s = sample_rf_time(data.shape[0], self.cfg.time_sampling, data.device)
        x_s, target = rf_interpolate(data, noise, s)
        pred = self.student(x_s, s, text)
        return regression_loss(pred, target, self.cfg.loss, self.cfg.huber_c), {}

    def extra_state(self) -> dict:
        return {"pairs": self.loader.state_dict()} if self.loader is not None else {}

    def load_extra_state(self, state: dict) -> None:
        unknown = set(state) - {"pairs"}
        if unknown:
            raise ValueError(f"recipe 'reflow' got extra state it does not know: {sorted(unknown)}")
        if "pairs" in state:
            if not self.cfg.pairs:
                raise ValueError("the checkpoint was trained on offline pairs but this run has no `pairs` directory")
            self.loader = self._pair_loader(int(state["pairs"]["batch_size"]))
            self.loader.load_state_dict(state["pairs"])


def check_pairs(pairs: str, clip_shape: tuple[int, ...], text_shape: tuple[int, int], scale: float) -> None:
    """ValueError unless every pair shard in `pairs` holds [noise, data] clips of `clip_shape` [C, T, H, W]
    (2·C channels), text embeddings of `text_shape` [L, D], made at guidance `scale`; headers only."""
    c, *rest = clip_shape
    want = {"latents_shape": [2 * c, *rest], "text_shape": list(text_shape)}
    for path in shard_paths(pairs):
        meta = shard_meta(path)
        for key, shape in want.items():
            if meta.get(key) != shape:
                raise ValueError(
                    f"pairs: shard {path} holds {key} {meta.get(key)}, but this teacher/student needs {shape} "
                    f"(clips {list(clip_shape)} as [noise, data], text [L, D] {list(text_shape)})"
                )
        made_at = meta.get("extra", {}).get("cfg_scale", scale)
        if made_at != scale:
            raise ValueError(
                f"pairs: shard {path} was generated with guidance {made_at}, but this run distils the teacher "
                f"at guidance {scale} (make pairs at that scale or drop --teacher-cfg)"
            )
