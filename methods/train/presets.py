"""Run presets: Python functions returning a complete, resolved run config.

Pretraining (`RunConfig`, `PRESETS`): `tiny` is for tests (seconds on CPU); `shapes` trains the moving-shapes
teacher (minutes on one GPU). Distillation (`DistillRun`, `DISTILL_PRESETS`): `shapes` is each recipe's
benchmark budget for the `small` teacher, `tiny` a few steps of batch 2 on the CPU for tests and smoke runs.
The CLI's `--preset` choices come from these dicts; `--set SECTION.KEY=VALUE` overrides any field
(`methods/train/config.py`) and the resolved config is written as JSON next to the run's outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vdistill.methods.data.shapes import ShapesConfig
from vdistill.methods.recipes.pretrain import FlowMatchingConfig
from vdistill.methods.recipes.registry import recipe_class
from vdistill.methods.train.trainer import TrainConfig
from vdistill.models.dit import DiTConfig, dit_config


@dataclass
class RunConfig:
    """A pretraining run: the teacher's architecture, its data, the trainer and the flow-matching loss."""

    model: DiTConfig  # the teacher's architecture (models/dit.py)
    data: ShapesConfig  # clip geometry of the moving-shapes benchmark
    train: TrainConfig  # the trainer's settings
    method: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)  # the flow-matching loss
    text_max_len: int = 8  # text tokens per prompt (the text width is model.text_dim)
    cfg_scale: float = 3.0  # guidance used when sampling/evaluating this run's model

    def to_dict(self) -> dict:
        return asdict(self)


def tiny() -> RunConfig:
    """Tiny DiT on 3×4×16×16 clips: a CPU test of the whole pipeline."""
    data = ShapesConfig(
        frames=4, height=16, width=16, size_min=5.0, size_max=6.0, speed_min=1.0, speed_max=1.5
    )
    train = TrainConfig(
        steps=20, batch_size=4, lr=1e-3, warmup_steps=0, log_every=1, ckpt_every=10, device="cpu"
    )
    return RunConfig(model=dit_config("tiny"), data=data, train=train)


def shapes() -> RunConfig:
    """The shipped teacher: `small` DiT (3.3 M params) on 3×8×32×32 clips, 512 tokens each."""
    train = TrainConfig(steps=8000, batch_size=128, lr=3e-4, warmup_steps=200, log_every=50, ckpt_every=1000)
    # absolute positions and pooled text: the direction word needs both (DiTConfig)
    model = dit_config("small", absolute_positions=True, pooled_text=True)
    return RunConfig(model=model, data=ShapesConfig(), train=train)


PRESETS: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "shapes": shapes}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()


@dataclass
class DistillRun:
    """A distillation run: the trainer's settings and the recipe's options (the teacher file sets the rest)."""

    train: TrainConfig  # the trainer's settings
    method: Any  # the recipe's options (its Config dataclass)

    def to_dict(self) -> dict:
        return {"train": asdict(self.train), "method": asdict(self.method)}


def shapes_distill(method: str) -> DistillRun:
    """Each recipe's budget for the moving-shapes `small` teacher (cut short with `train.time_limit_s`)."""
    train = TrainConfig(steps=2000, batch_size=64, lr=1e-4, warmup_steps=100, log_every=50, ckpt_every=500)
    if method == "rcm":  # a JVP pass, DMD and a critic update per step: half the batch
        train = replace(train, batch_size=32, log_every=25)
    return DistillRun(train, recipe_class(method).Config())


TINY_METHOD_OPTIONS: dict[str, dict] = {  # each recipe's cheapest schedule, for a few-step smoke run
    "reflow": {"pair_steps": 2, "pair_solver": "euler"},
    "progressive": {"teacher_steps": 4, "stage_steps": (1,)},  # stages 4->2->1 at steps 0, 1
    "consistency": {"intervals": 4, "solver": "euler"},
    "rcm": {"tangent_warmup": 1, "max_sim_steps": 2},
}


def tiny_distill(method: str) -> DistillRun:
    """A few steps of batch 2 on the CPU: tests and smoke runs of the whole distillation path (seconds)."""
    train = TrainConfig(steps=3, batch_size=2, lr=1e-4, warmup_steps=0, log_every=1, ckpt_every=2, device="cpu",
                        eval_num=4)
    return DistillRun(train, recipe_class(method).Config(**TINY_METHOD_OPTIONS[method]))


DISTILL_PRESETS: dict[str, Callable[[str], DistillRun]] = {"shapes": shapes_distill, "tiny": tiny_distill}


def distill_preset(name: str, method: str) -> DistillRun:
    if name not in DISTILL_PRESETS:
        raise ValueError(f"unknown distillation preset {name!r}; choose from {sorted(DISTILL_PRESETS)}")
    return DISTILL_PRESETS[name](method)
