"""Generate benchmark clips from an exported model: prompts -> text embeddings -> sampler -> clips.

A model file (safetensors from `Trainer.export`) carries its run config: the clip geometry, the
text encoder width/length and the guidance scale it was trained for. `ModelBundle` restores all
of it so that `sample`, `evaluate` and `demo` need only the path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vdistill.methods.data.shapes import COLOURS, DIRECTIONS, SHAPES, ShapesConfig, prompt_for
from vdistill.methods.data.text import WordTextEncoder
from vdistill.methods.sampling.samplers import consistency_times, sample_consistency, sample_rf
from vdistill.methods.train.checkpoint import load_dit
from vdistill.models.config_fields import from_dict
from vdistill.models.dit import VideoDiT
from vdistill.models.parameterization import guided


class NonFiniteOutput(ValueError):
    """A model produced NaN or inf values: nothing is written or scored from them."""


@dataclass
class ModelBundle:
    model: VideoDiT
    text: WordTextEncoder
    data: ShapesConfig
    cfg_scale: float
    meta: dict

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
        """The model in `path` with its clip geometry, text encoder and guidance; ValueError naming a metadata
        field of the wrong type or range."""
        model, meta = load_dit(path, device)
        try:
            run = meta.get("run_config", {})
            max_len, scale = run.get("text_max_len", 8), run.get("cfg_scale", 1.0)
            if not (isinstance(max_len, int) and not isinstance(max_len, bool) and max_len >= 1):
                raise ValueError(f"text_max_len must be an integer >= 1, got {max_len!r}")
            if not (isinstance(scale, int | float) and not isinstance(scale, bool) and math.isfinite(scale)):
                raise ValueError(f"cfg_scale must be a finite number, got {scale!r}")
            data = from_dict(ShapesConfig, run["data"]) if "data" in run else ShapesConfig()
            check_sampler(meta.get("sampler", {"kind": "ode"}))
        except (ValueError, AttributeError) as e:
            raise ValueError(f"weights file {path}: its metadata is not valid: {e}") from e
        if model.cfg.in_channels != data.clip_shape[0]:
            raise ValueError(f"model {path} takes {model.cfg.in_channels}-channel latents, not the moving-shapes "
                             f"benchmark's {data.clip_shape[0]}-channel clips: train it with --data (prepared shards) "
                             "and sample it with --vae (docs/data.md)")
        text = WordTextEncoder(dim=model.cfg.text_dim, max_len=max_len)
        return cls(model, text, data, float(scale), meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def check_sampler(spec) -> None:
    """ValueError unless `spec` is a sampler description `generate` can run (see its docstring)."""
    if not isinstance(spec, dict) or spec.get("kind") not in ("ode", "consistency"):
        raise ValueError(f"sampler must be {{'kind': 'ode' | 'consistency', ...}}, got {spec!r}")
    shift = spec.get("shift", 1.0)
    if not (isinstance(shift, int | float) and not isinstance(shift, bool) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"sampler shift must be a finite number > 0, got {shift!r}")
    stored = spec.get("times", {})
    if not isinstance(stored, dict):
        raise ValueError(f"sampler times must be {{steps: [RF times]}}, got {stored!r}")
    for steps, times in stored.items():
        ok = str(steps).isdigit() and isinstance(times, list) and len(times) == int(steps)
        if not ok or not all(isinstance(t, int | float) and not isinstance(t, bool) and 0 < t <= 1 for t in times):
            raise ValueError(f"sampler times for {steps} steps must be {steps} RF times in (0, 1], got {times!r}")


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
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not math.isfinite(scale):
        raise ValueError(f"cfg_scale must be a finite number, got {scale}")
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    device = bundle.device
    out = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        noise = sample_noise(bundle.data.clip_shape, seed, range(start, start + len(chunk))).to(device)
        prompts = [prompt_for(lab) for lab in chunk.tolist()]
        text = bundle.text.encode(prompts, device)
        velocity = guided(bundle.model, text, bundle.text.null(1, device), scale)
        spec = bundle.meta.get("sampler", {"kind": "ode"})
        clips = run_sampler(spec, velocity, noise, steps, solver, seed * 1_000_003 + start, shift).float()
        bad = (~torch.isfinite(clips)).flatten(1).any(1)
        if bad.any():  # checked before the clamp, which would turn an inf into a plausible ±1
            raise NonFiniteOutput(f"the model's output has NaN/inf values in {int(bad.sum())} of {len(chunk)} clips "
                                  f"(clips {start}..{start + len(chunk) - 1}, {steps} steps, guidance {scale}): its "
                                  "weights or the sampling options are bad; nothing was written")
        out.append(clips.clamp(-1, 1).cpu())
        if progress is not None:
            progress(len(chunk))
    return torch.cat(out)


def run_sampler(spec: dict, velocity, noise: torch.Tensor, steps: int, solver: str, seed: int, shift: float | None):
    """Integrate `velocity` from `noise` with the sampler `spec` of a model's export (see `generate`); `shift`
    replaces its grid (and a consistency model's stored times); `seed` seeds the re-noising."""
    grid_shift = float(spec.get("shift", 1.0)) if shift is None else shift
    if spec["kind"] == "ode":
        return sample_rf(velocity, noise, steps, solver, grid_shift)
    if spec["kind"] == "consistency":
        stored = spec.get("times", {}).get(str(steps)) if shift is None else None
        times = stored or consistency_times(steps, grid_shift)
        return sample_consistency(velocity, noise, times, torch.Generator().manual_seed(seed))
    raise ValueError(f"model file names an unknown sampler {spec!r}")

