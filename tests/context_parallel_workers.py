"""Process body of tests/test_context_parallel.py: a DiT's forward, gradients and JVP with its tokens split over
the ranks (gloo), saved per rank for the test to compare with one process."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from vdistill.models import context_parallel
from vdistill.models.dit import DiTConfig, VideoDiT
from vdistill.models.jvp import jvp

# 45 tokens (a (3, 3, 5) grid): not divisible by 2 or 4 ranks; 4 heads
CONFIG = DiTConfig(in_channels=4, dim=48, heads=4, layers=2, ffn_dim=64, text_dim=16, freq_dim=32,
                   absolute_positions=True, pooled_text=True)
X_SHAPE = (2, 4, 3, 6, 10)


def model_and_inputs(layers: int = CONFIG.layers) -> tuple[VideoDiT, tuple, tuple, torch.Tensor]:
    """A DiT with random weights (the head too), inputs (x, time, text), tangents (dx, dtime), an output weight."""
    torch.manual_seed(0)
    model = VideoDiT(replace(CONFIG, layers=layers))
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(X_SHAPE)
    inputs = (x, torch.rand(2), torch.randn(2, 7, CONFIG.text_dim))
    tangents = (torch.randn(X_SHAPE), torch.randn(2))
    return model, inputs, tangents, torch.randn(X_SHAPE)


def results(model: VideoDiT, inputs: tuple, tangents: tuple, weight: torch.Tensor, world: int = 1,
            every_variant: bool = True) -> dict:
    """out, d out (forward AD, and torch.func), the parameter gradients of sum(out·weight) (averaged over the
    ranks, as data-parallel training averages them), and those with activation checkpointing; without
    `every_variant` only the first of each (the interpreted kernels are slow)."""
    found = {"out": model(*inputs).detach()}
    for backend in ("forward_ad", "func")[:2 if every_variant else 1]:
        found[f"out_{backend}"], found[f"tangent_{backend}"] = jvp(model, inputs, tangents, backend=backend)
    for recompute in (False, True)[:2 if every_variant else 1]:
        model.zero_grad()
        model.checkpoint_blocks = recompute
        (model(*inputs) * weight).sum().backward()
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            if world > 1:
                dist.all_reduce(grad)
            found[f"grad{'_ckpt' if recompute else ''}.{name}"] = grad / world
    model.checkpoint_blocks = False
    return found


def run(rank: int, world: int, port: int, out_dir: str, every_variant: bool = True,
        layers: int = CONFIG.layers) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, inputs, tangents, weight = model_and_inputs(layers)
        with context_parallel.use(dist.group.WORLD):
            found = results(model, inputs, tangents, weight, world, every_variant)
            odd = VideoDiT(DiTConfig(in_channels=4, dim=48, heads=3, layers=1, ffn_dim=64, text_dim=16, freq_dim=32))
            try:
                odd(*inputs)
            except ValueError as e:
                found["heads_error"] = str(e)
        torch.save(found, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
