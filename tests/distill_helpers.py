"""Shared by the recipe tests: train a recipe on the 2-D toy with the real `Trainer`, and score samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from methods.recipe import Recipe
from methods.samplers import sample_consistency
from methods.toy import ToyBatches, energy_distance, sliced_wasserstein, toy_data, toy_text
from methods.trainer import TrainConfig, Trainer

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
