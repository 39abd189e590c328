"""Offline ReFlow pairs: the teacher ODE from seeded noise to data, written to resumable shards.

Each shard `pairs_<k>.safetensors` (format of methods/data/shards.py) holds up to `shard_size` pairs:
``latents`` = [noise, teacher sample] concatenated on the channel axis, [N, 2C, T, H, W], and
``text`` [N, L, D], the embeddings of the pairs' prompts. The sample is the teacher's guided ODE
solution (RF, s = 1 -> 0, the teacher's own CFG scale and time shift, `steps` Euler/Heun steps)
clamped to the data range, exactly what `methods.sampling.generate.generate` returns (float32, or under bf16
autocast with `precision="bf16"`: faster on AMX CPUs, close to float32; docs/results/training-step.md).
Pair j of shard k has prompt number k·shard_size + j of the balanced
(shape, colour, direction) cycle and noise that depends only on (seed, k, j), so every shard is
reproducible; shards are written atomically and a rerun
skips the ones that exist, which makes an interrupted run resumable. Under torchrun rank r writes
shards r, r + ranks, ... (the same files one process writes). `methods.recipes.reflow` trains on them with
`--set method.pairs=DIR`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from tqdm import tqdm

from vdistill.methods.data.shapes import prompt_for
from vdistill.methods.data.shards import write_shard
from vdistill.methods.sampling.generate import ModelBundle, balanced_labels, generate, require_ode_sampler, sample_noise
from vdistill.methods.sampling.samplers import SOLVERS
from vdistill.methods.train import distributed
from vdistill.methods.train.trainer import warn_if_emulated_bf16

log = logging.getLogger("vdistill")


PRECISIONS = ("fp32", "bf16")


def shard_seed(seed: int, k: int) -> int:
    """Noise seed of shard k (noise of pair j = `sample_noise(..., shard_seed(seed, k), [j])`)."""
    return seed * 1_000_003 + k


def write_pairs(
    teacher: ModelBundle,
    out: str | Path,
    num: int,
    *,
    shard_size: int = 256,
    steps: int = 16,
    solver: str = "heun",
    seed: int = 0,
    batch_size: int = 64,
    precision: str = "fp32",
    source: str = "",
) -> list[Path]:
    """Write `num` teacher pairs to shards in `out`; returns all shard paths (existing ones are kept)."""
    for name, value in (("num", num), ("shard_size", shard_size), ("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    require_ode_sampler(teacher)
    warn_if_emulated_bf16(teacher.device, precision)
    out = Path(out)
    labels = balanced_labels(num)
    paths = [out / f"pairs_{k:05d}.safetensors" for k in range(math.ceil(num / shard_size))]
    mine = range(distributed.rank(), len(paths), distributed.world_size())
    total = sum(len(labels[k * shard_size : (k + 1) * shard_size]) for k in mine)
    bar = tqdm(total=total, desc="reflow-pairs", unit="pair", dynamic_ncols=True, disable=not distributed.is_main())
    with bar:
        for k in mine:
            path = paths[k]
            chunk = labels[k * shard_size : (k + 1) * shard_size]
            if path.is_file():
                log.info("reflow-pairs: %s exists, skipped", path)
                bar.update(len(chunk))
                continue
            with torch.autocast(teacher.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                clips = generate(teacher, chunk, steps, solver=solver, seed=shard_seed(seed, k), batch_size=batch_size,
                                 progress=bar.update)
            noise = sample_noise(teacher.data.clip_shape, shard_seed(seed, k), range(len(chunk)))
            text = teacher.text.encode([prompt_for(lab) for lab in chunk.tolist()])
            extra = {"kind": "reflow-pairs", "teacher": source, "steps": steps, "solver": solver, "seed": seed,
                     "precision": precision, "shard": k, "cfg_scale": teacher.cfg_scale}
            write_shard(path, torch.cat([noise, clips], dim=1), text, extra=extra)
            log.info("reflow-pairs: wrote %s (%d pairs)", path, len(chunk))
    distributed.barrier()  # every rank's shards are written
    return paths
