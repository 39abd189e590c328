"""Tiny-DiT trainers for the data-parallel and gradient-accumulation tests, and the process body of
tests/test_distributed.py (data-parallel training on CPU ranks joined by gloo)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from methods.batches import ShapesBatches
from methods.distill import distiller
from methods.generate import ModelBundle
from methods.presets import tiny
from methods.rcm import Config
from methods.recipe import Batch, Recipe
from methods.text import WordTextEncoder
from methods.trainer import Trainer
from models.dit import build_dit

RCM_CONFIG = Config(tangent_warmup=2, dmd_start=1, target="ema", adaptive_weight=True, max_sim_steps=2)


class Denoise(Recipe):
    """A loss without randomness (x0 back from x0 at a fixed time), so that N ranks with B/N clips each
    must train exactly as one process with B clips. Keeps the clips of its first batch (`first_x0`)."""

    name = "denoise"

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student
        self.first_x0: torch.Tensor | None = None

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.first_x0 is None:
            self.first_x0 = batch.x0.clone()
        s = torch.full((batch.x0.shape[0],), 0.5)
        return (self.student(batch.x0, s, batch.text).float() - batch.x0).square().mean(), {}


def tiny_dit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_dit("tiny")
    for p in model.parameters():  # the zero-initialised head would make every output 0
        p.data.normal_(0, 0.1)
    return model


def trainer(kind: str, run_dir: Path, steps: int, batch_size: int = 4, grad_accum: int = 1) -> Trainer:
    """A tiny-DiT trainer: `kind` "denoise" (deterministic loss) or a distillation method of a random tiny
    teacher (guidance 2). rCM with critic, adaptive weight, EMA target and activation checkpointing;
    progressive with a new stage, so a new teacher copied from the student, at every step."""
    run = tiny()
    train = replace(run.train, steps=steps, ckpt_every=2, log_every=1, batch_size=batch_size, grad_clip=0.05,
                    activation_checkpointing=kind == "rcm", grad_accum=grad_accum)
    text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
    data = ShapesBatches(run.data, text, train.batch_size, seed=train.seed)
    if kind == "denoise":  # with an in-training evaluation every 2 steps (rank 0 scores, the others wait)
        train = replace(train, eval_every=2)
        recipe = Denoise(tiny_dit())
    else:
        module = distiller(kind)
        teacher = ModelBundle(tiny_dit().eval(), text, run.data, 2.0, {})
        cfg = RCM_CONFIG if kind == "rcm" else module.Config()
        if kind == "progressive":
            cfg = replace(cfg, stage_steps=(1,))
        recipe = module.build_recipe(teacher, cfg)
    t = Trainer(recipe, data, train, run_dir, run_config={"method": kind})
    if kind == "denoise":
        t.evaluator = lambda student: {"head_sum": float(student.head.weight.detach().sum())}
    return t


def final_state(t: Trainer) -> dict[str, torch.Tensor]:
    """Every trained tensor of a finished run: the student, its EMA and (rCM) the critic and w_φ."""
    state = {f"student.{k}": v for k, v in t.recipe.student.state_dict().items()}
    with t.ema.swapped(t.recipe.student, profile=0):
        state.update({f"ema.{k}": v.clone() for k, v in t.recipe.student.state_dict().items()})
    for name in ("critic", "weight"):
        module = getattr(t.recipe, name, None)
        if module is not None:
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state


def fit(
    rank: int, world: int, port: int, kind: str, run_dir: str, steps: int, resume: bool, batch_size: int = 4,
    grad_accum: int = 1,
) -> None:
    """Rank `rank` of `world`: train, then save this rank's final state as rank<r>.pt in `run_dir`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        t = trainer(kind, Path(run_dir), steps, batch_size, grad_accum)
        rows = t.fit(resume=resume)
        first_x0 = getattr(t.recipe, "first_x0", None)
        torch.save({"state": final_state(t), "rows": rows, "first_x0": first_x0}, Path(run_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
