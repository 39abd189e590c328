"""Run presets: Python functions returning a complete, resolved `RunConfig`.

`tiny` is for tests (seconds on CPU); `shapes` trains the moving-shapes teacher (minutes on one
GPU). The CLI's `--preset` choices come from `PRESETS`; any field can be overridden from the
command line and the resolved config is written as JSON next to the run's outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from vdistill.methods.data.shapes import ShapesConfig
from vdistill.methods.recipes.pretrain import FlowMatchingConfig
from vdistill.methods.train.trainer import TrainConfig
from vdistill.models.dit import DiTConfig, dit_config


@dataclass
class RunConfig:
    model: DiTConfig
    data: ShapesConfig
    train: TrainConfig
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
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
