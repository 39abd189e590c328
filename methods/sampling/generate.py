"""Generate benchmark clips from an exported model: prompts -> text embeddings -> sampler -> clips.

A model file (safetensors from `Trainer.export`) carries its run config: the clip geometry, the
text encoder width/length and the guidance scale it was trained for. `ModelBundle` restores all
of it so that `sample`, `evaluate` and `demo` need only the path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vdistill.methods.data.shapes import COLOURS, DIRECTIONS, SHAPES, ShapesConfig, prompt_for
from vdistill.methods.data.text import WordTextEncoder
from vdistill.methods.sampling.samplers import consistency_times, sample_consistency, sample_rf
from vdistill.methods.train.checkpoint import load_dit
from vdistill.models.dit import VideoDiT
from vdistill.models.parameterization import guided


@dataclass
class ModelBundle:
    model: VideoDiT
    text: WordTextEncoder
    data: ShapesConfig
    cfg_scale: float
    meta: dict

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
        model, meta = load_dit(path, device)
        run = meta.get("run_config", {})
        text = WordTextEncoder(dim=model.cfg.text_dim, max_len=run.get("text_max_len", 8))
        data = ShapesConfig(**run["data"]) if "data" in run else ShapesConfig()
        return cls(model, text, data, float(run.get("cfg_scale", 1.0)), meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def require_ode_sampler(teacher: ModelBundle) -> None:
    """ValueError unless `teacher` is sampled by an ODE (a flow teacher or an ODE student): the recipes that
    integrate the teacher's ODE need one."""
    kind = teacher.meta.get("sampler", {"kind": "ode"}).get("kind")
    if kind != "ode":
        raise ValueError(f"teacher must be a flow (ODE) model to distil from, but its export says sampler {kind!r}")


def balanced_labels(n: int) -> torch.Tensor:
    """[n, 3] labels cycling through all 72 (shape, colour, direction) combinations."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    combos = torch.cartesian_prod(torch.arange(len(SHAPES)), torch.arange(len(COLOURS)), torch.arange(len(DIRECTIONS)))
    return combos[torch.arange(n) % len(combos)]


def sample_noise(shape: tuple[int, ...], seed: int, indices: range) -> torch.Tensor:
    """[len(indices), *shape] standard normal noise; sample i depends only on (seed, i)."""
    gens = (torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices)
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def spread_labels(n: int) -> torch.Tensor:
    """[n, 3] distinct-as-possible labels for small n: the 72 combinations taken with stride 29
    (coprime to 72), so even 8 or 16 clips mix shapes, colours and directions."""
    combos = balanced_labels(72)
    return combos[(torch.arange(n) * 29) % len(combos)]


@torch.no_grad()
def generate(
    bundle: ModelBundle,
    labels: torch.Tensor,
    steps: int,
    *,
    cfg_scale: float | None = None,
    solver: str = "euler",
    seed: int = 0,
    batch_size: int = 128,
    shift: float | None = None,
    progress: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Clips [n, 3, T, H, W] in [-1, 1] for labels [n, 3], with the sampler the model was exported for.

    `bundle.meta["sampler"]` selects it: {"kind": "ode"} (teacher, ReFlow, progressive students:
    Euler/Heun on the shifted grid) or {"kind": "consistency", "times": {steps: [RF times]}}
    (consistency and rCM students). `shift` replaces the exported time grid by the SD3/Wan grid
    with this shift (> 1 spends more steps at high noise). Noise for sample i depends only on (seed, i).
    Sampling runs in float32 on every device, so CPU and GPU evaluations of one model agree up
    to rounding. `progress(k)` is called after each batch of k clips (e.g. a tqdm bar's `update`).
    """
    scale = bundle.cfg_scale if cfg_scale is None else cfg_scale
    device = bundle.device
    out = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        noise = sample_noise(bundle.data.clip_shape, seed, range(start, start + len(chunk))).to(device)
        prompts = [prompt_for(lab) for lab in chunk.tolist()]
        text = bundle.text.encode(prompts, device)
        velocity = guided(bundle.model, text, bundle.text.null(1, device), scale)
        clips = _run_sampler(bundle, velocity, noise, steps, solver, seed * 1_000_003 + start, shift)
        out.append(clips.float().clamp(-1, 1).cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out)


def _run_sampler(bundle: ModelBundle, velocity, noise: torch.Tensor, steps: int, solver: str, seed: int,
                 shift: float | None):
    spec = bundle.meta.get("sampler", {"kind": "ode"})
    if shift is not None and shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    grid_shift = float(spec.get("shift", 1.0)) if shift is None else shift
    if spec["kind"] == "ode":
        return sample_rf(velocity, noise, steps, solver, grid_shift)
    if spec["kind"] == "consistency":
        stored = spec.get("times", {}).get(str(steps)) if shift is None else None
        times = stored or consistency_times(steps, grid_shift)
        return sample_consistency(velocity, noise, times, torch.Generator().manual_seed(seed))
    raise ValueError(f"model file names an unknown sampler {spec!r}")

