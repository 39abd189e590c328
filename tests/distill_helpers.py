"""Shared by the recipe tests: train a recipe with the real `Trainer` on the 2-D toy (and score its
samples) or on a tiny DiT (for exact-resume checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vdistill.methods.data.batches import ShapesBatches
from vdistill.methods.data.text import WordTextEncoder
from vdistill.methods.data.toy import ToyBatches, energy_distance, sliced_wasserstein, toy_data, toy_text
from vdistill.methods.recipes.base import Recipe
from vdistill.methods.sampling.generate import ModelBundle
from vdistill.methods.sampling.samplers import sample_consistency
from vdistill.methods.train.presets import tiny
from vdistill.methods.train.trainer import TrainConfig, Trainer
from vdistill.models.dit import VideoDiT

N_EVAL = 4000
DATA_SEED, NOISE_SEED = 123, 1  # the same seeds for every method and the teacher


def fit_toy(recipe: Recipe, run_dir: Path, steps: int, batch: int = 256, lr: float = 1e-3) -> Trainer:
    """Train `recipe` for `steps` steps on toy batches (CPU, fp32, no warm-up, one checkpoint at the end)."""
    cfg = TrainConfig(
        steps=steps, batch_size=batch, lr=lr, warmup_steps=0, grad_clip=0.0, log_every=steps, ckpt_every=steps,
        ema_sigma_rels=(0.05,), device="cpu",
    )
    trainer = Trainer(recipe, ToyBatches(batch, seed=7), cfg, run_dir)
    trainer.fit()
    return trainer


def distances(samples: torch.Tensor) -> dict[str, float]:
    """Sliced Wasserstein-2 and energy distance of samples [N_EVAL, 2] to fresh toy data (fixed seed)."""
    ref = toy_data(N_EVAL, seed=DATA_SEED)
    return {"sw": sliced_wasserstein(samples, ref), "energy": energy_distance(samples, ref)}


def toy_sample_consistency(model: torch.nn.Module, times: list[float]) -> torch.Tensor:
    """[N_EVAL, 2] multistep consistency samples from the same noise as `toy_sample_ode(..., seed=NOISE_SEED)`."""
    noise = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(NOISE_SEED))
    velocity = lambda x, s: model(x, s, toy_text(x.shape[0]))
    return sample_consistency(velocity, noise, times, torch.Generator().manual_seed(0))


@pytest.fixture(autouse=False, scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread (tiny matmuls on a shared 2-core box), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_dit_trainer(recipe_cls, cfg, run_dir: Path, steps: int, ckpt_every: int = 3) -> Trainer:
    """A `Trainer` running `recipe_cls.from_teacher(teacher, cfg)` from a seeded random tiny DiT teacher
    (guidance scale 2) on tiny moving-shapes batches; identical for identical arguments."""
    run = tiny()
    train = TrainConfig(
        steps=steps, batch_size=2, lr=1e-3, warmup_steps=0, log_every=1, ckpt_every=ckpt_every,
        ema_sigma_rels=(0.05,), device="cpu",
    )
    torch.manual_seed(0)
    text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
    teacher = ModelBundle(VideoDiT(run.model).eval(), text, run.data, 2.0, {})
    recipe = recipe_cls.from_teacher(teacher, cfg)
    return Trainer(recipe, ShapesBatches(run.data, text, train.batch_size, seed=0), train, run_dir)


class ConstantVelocity(torch.nn.Module):
    """v(x, s) = c for every x and s: a perfectly straight flow, which every ODE step integrates exactly."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.c = torch.nn.Parameter(torch.linspace(-1.0, 1.0, dim))

    def forward(self, x: torch.Tensor, time: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        return self.c.expand_as(x)
