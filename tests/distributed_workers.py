"""Tiny-DiT trainers for the data-parallel and gradient-accumulation tests, and the process body of
tests/test_distributed.py (data-parallel training on CPU ranks joined by gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from vdistill.methods.data.batch import Batch
from vdistill.methods.data.batches import ShapesBatches
from vdistill.methods.data.text import WordTextEncoder
from vdistill.methods.recipes.base import Recipe
from vdistill.methods.recipes.rcm import RCMConfig
from vdistill.methods.recipes.registry import recipe_class
from vdistill.methods.sampling.generate import ModelBundle
from vdistill.methods.train import distributed
from vdistill.methods.train.presets import tiny
from vdistill.methods.train.trainer import Trainer
from vdistill.models.dit import build_dit

ROOT = Path(__file__).resolve().parents[1]

RCM_CONFIG = RCMConfig(tangent_warmup=2, dmd_start=1, target="ema", adaptive_weight=True, max_sim_steps=2)
# what FSDP can shard: the same without w_φ (kind "rcm-shardable"), and with the stop-grad target, rCM's default
RCM_SHARDABLE = replace(RCM_CONFIG, adaptive_weight=False)
RCM_STOPGRAD = replace(RCM_SHARDABLE, target="stopgrad")


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


class DenoiseNanOnRank1(Denoise):
    """`Denoise` whose loss is NaN on rank 1 alone at step 1 (one rank's bad sample)."""

    def loss(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        value, logs = super().loss(batch, step)
        return (value * float("nan") if distributed.rank() == 1 and step == 1 else value), logs


def tiny_dit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_dit("tiny")
    for p in model.parameters():  # the zero-initialised head would make every output 0
        p.data.normal_(0, 0.1)
    return model


def trainer(kind: str, run_dir: Path, steps: int, batch_size: int = 4, grad_accum: int = 1,
            fsdp: bool = False, context_parallel: int = 1) -> Trainer:
    """A tiny-DiT trainer: `kind` "denoise" (deterministic loss; "denoise-nan-rank1": NaN on rank 1 at step 1)
    or a distillation method of a random tiny
    teacher (guidance 2). rCM with critic, adaptive weight, EMA target and activation checkpointing
    ("rcm-shardable": without the adaptive weight, "rcm-stopgrad": nor the EMA target); progressive with a
    new stage, so a new teacher copied from the student, at every step. `fsdp`: the student sharded over
    the ranks; `context_parallel`: each clip's tokens split over groups of that many ranks."""
    run = tiny()
    train = replace(run.train, steps=steps, ckpt_every=2, log_every=1, batch_size=batch_size, grad_clip=0.05,
                    activation_checkpointing=kind.startswith("rcm"), grad_accum=grad_accum, fsdp=fsdp,
                    context_parallel=context_parallel)
    distributed.set_context_parallel(context_parallel)
    text = WordTextEncoder(dim=run.model.text_dim, max_len=run.text_max_len)
    data = ShapesBatches(run.data, text, train.batch_size, seed=train.seed)
    if kind == "denoise":  # with an in-training evaluation every 2 steps (rank 0 scores, the others wait)
        train = replace(train, eval_every=2)
        recipe = Denoise(tiny_dit())
    elif kind == "denoise-nan-rank1":
        recipe = DenoiseNanOnRank1(tiny_dit())
    else:
        recipe_cls = recipe_class(kind.partition("-")[0])
        teacher = ModelBundle(tiny_dit().eval(), text, run.data, 2.0, {})
        cfg = {"rcm": RCM_CONFIG, "rcm-shardable": RCM_SHARDABLE, "rcm-stopgrad": RCM_STOPGRAD}.get(kind)
        cfg = cfg or recipe_cls.Config()
        if kind == "progressive":
            cfg = replace(cfg, stage_steps=(1,))
        recipe = recipe_cls.from_teacher(teacher, cfg)
    t = Trainer(recipe, data, train, run_dir, run_config={"method": kind})
    if kind == "denoise":
        t.evaluator = lambda student: {"head_sum": float(student.head.weight.detach().sum())}
    return t


def final_state(t: Trainer) -> dict[str, torch.Tensor]:
    """Every trained tensor of a finished run: the student, its EMA and (rCM) the critic and w_φ; sharded
    tensors whole (every rank must call)."""
    state = {f"student.{k}": _whole(v) for k, v in t.recipe.student.state_dict().items()}
    with distributed.ema_weights(t.ema, t.recipe.student):
        state.update({f"ema.{k}": _whole(v).clone() for k, v in t.recipe.student.state_dict().items()})
    for name in ("critic", "weight"):
        module = getattr(t.recipe, name, None)
        if module is not None:
            state.update({f"{name}.{k}": _whole(v) for k, v in module.state_dict().items()})
    return state


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def fit(
    rank: int, world: int, port: int, kind: str, run_dir: str, steps: int, resume: bool, batch_size: int = 4,
    grad_accum: int = 1, fsdp: bool = False, context_parallel: int = 1,
) -> None:
    """Rank `rank` of `world`: train, then save this rank's final state as rank<r>.pt in `run_dir`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        t = trainer(kind, Path(run_dir), steps, batch_size, grad_accum, fsdp, context_parallel)
        rows = t.fit(resume=resume)
        first_x0 = getattr(t.recipe, "first_x0", None)
        sharded = {name: isinstance(next(getattr(t.recipe, name).blocks.parameters()), DTensor)
                   for name in ("student", "teacher", "critic") if getattr(t.recipe, name, None) is not None}
        torch.save({"state": final_state(t), "rows": rows, "first_x0": first_x0, "sharded": sharded},
                   Path(run_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_on_two_ranks(kind: str, run_dir: Path, steps: int, resume: bool = False, batch_size: int = 4,
                     grad_accum: int = 1, fsdp: bool = False, context_parallel: int = 1, ranks: int = 2) -> list[dict]:
    """Train on `ranks` ranks (2 unless told); [rank 0's {state, rows}, rank 1's, ...]."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = (ranks, free_port(), kind, str(run_dir), steps, resume, batch_size, grad_accum, fsdp, context_parallel)
    mp.spawn(fit, args=args, nprocs=ranks, join=True)
    return [torch.load(run_dir / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=lambda m, key=key: f"{key}: {m}", **tol)


def torchrun(*cli_args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node <ranks> -m vdistill.methods.cli ...` (on the GPUs where there are, else on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), "-m", "vdistill.methods.cli", *cli_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
