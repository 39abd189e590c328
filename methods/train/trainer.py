"""One trainer for every recipe (pretraining and distillation).

Per step: next batch -> recipe loss under autocast (`precision`; bf16 on CUDA by default) ->
backward -> grad clipping -> fused AdamW -> EMA update (`kernels.ema`, all tensors in one or a
few launches) -> optional auxiliary update (critic); a step whose gradient norm is not finite is skipped (no
update) and `max_bad_steps` such steps in a row stop the run. Every phase sits in an NVTX range; a capture window drives
`nsys --capture-range=cudaProfilerApi`. Checkpoints hold the student, optimiser, EMA, recipe
extra state, data position and all RNG states, written atomically, so a resumed run reproduces
the uninterrupted one exactly (on CPU bit for bit). Under torchrun the loss goes through DDP (or the
student, teacher and critic are sharded by FSDP2, `fsdp`, and checkpoints are distributed: each rank writes its
shards), each clip's tokens may be split over ranks (`context_parallel`), and rank 0 alone writes logs and exports
(`methods/train/distributed.py` has the conventions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vdistill.kernels.ema import EMA, EMAProfile
from vdistill.methods.recipes.base import Logs, Recipe
from vdistill.methods.train import distributed, run_folder
from vdistill.methods.train.checkpoint import (
    check_finite,
    checkpoint_path,
    checksum_path,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_weights,
)
from vdistill.methods.train.logs import RunLog, host_values
from vdistill.methods.train.profiling import CaptureWindow, nvtx_range
from vdistill.methods.train.sharded_checkpoint import read_sharded, save_sharded
from vdistill.methods.train.sharded_state import load_sharded_state, reseed, sharded_state
from vdistill.models import context_parallel
from vdistill.models.config_fields import check_fields
from vdistill.models.dit import VideoDiT

log = logging.getLogger("vdistill")


def cpu_bf16_is_native() -> bool:
    """oneDNN's own test for a fast bf16 path (AVX512 BW/VL/DQ, AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_emulated_bf16(device: torch.device, precision: str) -> None:
    """Warn that bf16 autocast on a CPU without oneDNN's bf16 path is emulated, far slower than fp32
    (docs/results/training-step.md)."""
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_is_native():
        log.warning(
            "precision bf16 on this CPU (%s, no AVX512/AMX bf16 path) is emulated, far slower than fp32 "
            "(`vdistill bench train-step` times both); use --set train.precision=fp32",
            torch.backends.cpu.get_cpu_capability(),
        )


ESTIMATE_AFTER = 4  # steps of a fit() call timed before the duration estimate (the first one not counted)
LONG_RUN_S = 1800  # a CPU run estimated longer than this without a time limit gets a warning


class TrainingDiverged(RuntimeError):
    """`max_bad_steps` training steps in a row had a non-finite gradient norm."""


@dataclass
class TrainConfig:
    steps: int = 1000  # optimiser steps
    batch_size: int = 32  # clips per optimiser step, over all ranks and micro-batches
    # micro-batches per step and rank, gradients accumulated (activation memory / grad_accum); rCM's critic
    # then trains on the last micro-batch's samples
    grad_accum: int = 1
    lr: float = 2e-4  # AdamW learning rate after the warm-up
    adam_betas: tuple[float, float] = (0.9, 0.99)  # AdamW (β1, β2)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 100  # linear LR warm-up
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    ema_sigma_rels: tuple[float, ...] = (0.05, 0.1)  # EDM2 power-EMA profiles; the first is exported
    log_every: int = 25  # steps between metrics.jsonl rows (and progress-bar updates)
    ckpt_every: int = 500  # steps between checkpoints (one is also written at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept in RUN/checkpoints (0 = all)
    seed: int = 0  # seeds the model initialisation, the data stream and the torch RNG
    device: str = "auto"  # "auto" = cuda if available else cpu; or cpu, cuda, cuda:N
    # autocast: "auto" = bf16 on CUDA, fp32 on CPU; "bf16" = bf16 on either (fast on CPUs with AMX, emulated
    # and slow on AVX2-only ones, which get a warning: `vdistill bench train-step`); "fp32" = off
    precision: str = "auto"
    profile_window: tuple[int, int] | None = None  # [start, stop) steps for cudaProfilerStart/Stop (docs/profiling.md)
    # recompute each DiT block's activations in the backward instead of keeping them (every trained DiT of
    # the recipe: the student, rCM's critic): one block input kept per block, ~1/3 more compute
    activation_checkpointing: bool = False
    # run every DiT block of the recipe (student, teacher, critic) through torch.compile: fewer kernel launches
    # for small, host-bound steps; forward-mode JVP passes stay eager (docs/profiling.md). Not with
    # context_parallel (its all-to-alls are not traced); tested in one process, not yet under DDP or FSDP2
    compile: bool = False
    # shard the student over the ranks with FSDP2 (torchrun only; docs/multi-gpu.md); refused by the recipes
    # that copy the student's weights into networks of their own (progressive, consistency with an EMA target)
    fsdp: bool = False
    # split each clip's tokens over groups of this many ranks (Ulysses; docs/multi-gpu.md): each group is one
    # data-parallel rank, so batch_size must divide over ranks / context_parallel
    context_parallel: int = 1
    tensorboard: bool = False  # also log to TensorBoard (RUN/tb)
    time_limit_s: float | None = None  # stop early (checkpointed and exported) once this much wall time has passed
    # every `eval_every` steps (0 = never) score EMA profile 0 with the trainer's `evaluator` (distillation:
    # accuracy and FD at 1, 2 and 4 steps) into metrics.jsonl; its time counts towards the time limit
    eval_every: int = 0
    eval_num: int = 64  # clips per in-training evaluation (balanced over the prompts)
    max_bad_steps: int = 10  # stop after this many consecutive steps skipped for a non-finite gradient norm (>= 1)

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("steps", "batch_size", "grad_accum", "eval_num", "max_bad_steps", "context_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum {self.grad_accum} must divide batch_size {self.batch_size}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 = off), got {self.eval_every}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "keep_checkpoints", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be in [0, 1), got {self.adam_betas}")
        if not self.ema_sigma_rels or min(self.ema_sigma_rels) <= 0:
            raise ValueError(f"ema_sigma_rels must be one or more numbers > 0, got {self.ema_sigma_rels}")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0 (or none: no limit), got {self.time_limit_s}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    def resolved_device(self) -> torch.device:
        """The device of this process; under torchrun with CUDA, the GPU of its LOCAL_RANK."""
        return distributed.resolve_device(self.device)


def _rng_state() -> dict:
    """All RNG states as tensors and plain containers, which `torch.load(weights_only=True)` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_dit_blocks(recipe: Recipe) -> None:
    """Turn on activation checkpointing in every trained DiT of `recipe` (frozen ones run without grad)."""
    dits = [m for m in recipe.modules() if isinstance(m, VideoDiT) and any(p.requires_grad for p in m.parameters())]
    if not dits:
        raise ValueError(f"activation_checkpointing: recipe {recipe.name!r} trains no DiT whose blocks could be "
                         "recomputed")
    for dit in dits:
        dit.checkpoint_blocks = True


def _compile_dit_blocks(recipe: Recipe, context_parallel_size: int) -> None:
    """Compile the blocks of every DiT of `recipe` (`VideoDiT.compile_blocks`)."""
    if context_parallel_size > 1:
        raise ValueError(f"train.compile with train.context_parallel={context_parallel_size}: context-parallel "
                         "blocks run eagerly; set one of them back (compile=false or context_parallel=1)")
    dits = [m for m in recipe.modules() if isinstance(m, VideoDiT)]
    if not dits:
        raise ValueError(f"train.compile: recipe {recipe.name!r} has no DiT to compile")
    for dit in dits:
        dit.compile_blocks = True


def autocast(device: torch.device, precision: str, sharded: bool):
    """The trainer's autocast (bf16 for "bf16", and for "auto" on CUDA). Sharded: without autocast's weight cache,
    which would keep a bf16 copy of each all-gathered trainable weight to the end of the region, so a whole bf16
    student and critic on every rank (docs/multi-gpu.md, "Memory per GPU"); each use casts again instead."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not sharded)
    return contextlib.nullcontext()


def _check_context_parallel(recipe: Recipe, size: int) -> None:
    """ValueError unless the ranks were split for `size` (before the data was built) and every DiT's heads divide."""
    if distributed.context_size() != size:
        raise ValueError(f"train.context_parallel={size}: call distributed.set_context_parallel({size}) before "
                         f"building the data (now {distributed.context_size()})")
    for module in recipe.modules():
        if isinstance(module, VideoDiT) and module.cfg.heads % size:
            raise ValueError(f"train.context_parallel={size} must divide the model's {module.cfg.heads} heads")


class _RecipeLoss(torch.nn.Module):
    """The recipe's loss as a module that owns the networks it trains, so that DDP can wrap it: one DDP
    forward per step however many times the recipe calls its student."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.trained = torch.nn.ModuleList(recipe.trained_by_loss())
        self.loss_of = recipe.loss

    def forward(self, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_of(batch, step)


class Trainer:
    """Runs `recipe` on batches from `data` (an iterator of `Batch` with state_dict/load_state_dict;
    under torchrun, each rank's share of the global batch)."""

    def __init__(self, recipe: Recipe, data, cfg: TrainConfig, run_dir: str | Path, run_config: dict | None = None):
        self.recipe, self.data, self.cfg = recipe, data, cfg
        self.run_dir = Path(run_dir)
        self.device = cfg.resolved_device()
        warn_if_emulated_bf16(self.device, cfg.precision)
        self.recipe.to(self.device)
        if cfg.activation_checkpointing:
            _checkpoint_dit_blocks(recipe)
        if cfg.compile:
            _compile_dit_blocks(recipe, cfg.context_parallel)
        _check_context_parallel(recipe, cfg.context_parallel)
        if distributed.data_world() > 1:  # weights come from rank 0 (DDP broadcasts); noise differs per data rank
            torch.manual_seed(cfg.seed * 1_000_003 + distributed.data_rank() + 1)
        self._sharded: list[torch.nn.Module] = []
        if cfg.fsdp:
            recipe.check_shardable()
            self._sharded = [distributed.shard(module) for module in recipe.trained_by_loss()]
            self.recipe_loss = _RecipeLoss(recipe)
            recipe.shard_auxiliary(distributed.shard)  # the frozen teacher and rCM's critic too
        else:
            self.recipe_loss = distributed.replicate(_RecipeLoss(recipe), self.device)
            recipe.replicate_auxiliary(lambda module: distributed.replicate(module, self.device))
        params = [p for p in recipe.student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the recipe's student has no trainable parameters")
        fused = self.device.type == "cuda" and not cfg.fsdp  # sharded (DTensor) parameters: foreach AdamW
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=cfg.adam_betas,
            weight_decay=cfg.weight_decay,
            fused=fused,
            foreach=not fused,
        )
        self.ema = EMA(recipe.student, [EMAProfile(sigma_rel=s) for s in cfg.ema_sigma_rels])
        self.step = 0
        self.skipped_steps = 0  # steps skipped for a non-finite gradient norm, in all
        self.bad_streak = 0  # ... of them, the consecutive ones up to now
        self.run_config = {"train": asdict(cfg), **(run_config or {})}
        self.export_meta: dict = {}  # extra metadata for exported weights (e.g. the student's sampler)
        # scores for the student with EMA profile 0 swapped in (see TrainConfig.eval_every); must not draw
        # from the global RNG, so that evaluating leaves training bit-identical
        self.evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The run's state (every rank must call: it gathers each rank's RNG state). Sharded (`fsdp`): the
        student, optimiser, EMA and recipe states as this rank's shards under "sharded" (`sharded_state.py`),
        which `save` writes as a distributed checkpoint."""
        rng_by_rank = distributed.gather_objects(_rng_state())
        state = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "bad_streak": self.bad_streak,
            "data": self.data.state_dict(),
            "rng": rng_by_rank[0],
            "world_size": len(rng_by_rank),
            **({"rng_by_rank": rng_by_rank} if len(rng_by_rank) > 1 else {}),
            "config": self.run_config,
        }
        if not self.cfg.fsdp:
            return {
                **state,
                "student": self.recipe.student.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(),
                "recipe": self.recipe.extra_state(),
            }
        return {**state, "rng_by_rank": rng_by_rank, "sharded": self._sharded_state()}

    def _sharded_state(self) -> dict:
        return sharded_state(self.recipe.student, self.optimizer, self.ema.state_dict(), self.recipe.extra_state())

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. A distributed checkpoint's (`fsdp`; from `load_checkpoint`) may come from another
        number of ranks: its shards are resharded, and the RNG streams, which are per rank, re-seeded."""
        world, written = distributed.world_size(), state.get("world_size", 1)
        if ("sharded" in state) != self.cfg.fsdp:
            how = "with" if "sharded" in state else "without"
            raise ValueError(f"cannot resume: the checkpoint was written {how} train.fsdp; resume the same way")
        if written != world and not self.cfg.fsdp:
            raise ValueError(
                f"cannot resume: the checkpoint was written by {written} ranks and this run has "
                f"{world}; each rank's noise stream is part of the state, so resume with the same number of ranks"
            )
        if self.cfg.fsdp:
            loaded = read_sharded(state["sharded"], self._sharded_state())
            local = load_sharded_state(self.recipe.student, self.optimizer, loaded)
        else:
            self.recipe.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["optimizer"])
            local = state
        self.ema.load_state_dict(local["ema"])
        self.recipe.load_extra_state(local["recipe"])
        self.data.load_state_dict(state["data"])  # the global stream's position: the same on every rank
        if written == world:
            _set_rng_state(state["rng_by_rank"][distributed.rank()] if "rng_by_rank" in state else state["rng"])
        else:
            reseed(self.cfg.seed, state["step"])
            if distributed.is_main():
                log.warning("resuming a checkpoint of %d ranks on %d: the student, optimiser and EMA are resharded "
                            "exactly, but each rank's RNG streams cannot carry over and are re-seeded from (seed, "
                            "step, rank), and the recipe's per-rank counters are rank 0's; the run continues, not as "
                            "it would have on %d ranks", written, world, written)
        self.step = state["step"]
        self.skipped_steps, self.bad_streak = state["skipped_steps"], state["bad_streak"]

    def save(self) -> Path:
        path = checkpoint_path(self.run_dir, self.step, sharded=self.cfg.fsdp)
        with nvtx_range("checkpoint"):
            state = self.state_dict()
            if self.cfg.fsdp:  # every rank writes its shards
                save_sharded(path, state)
            elif distributed.is_main():
                save_checkpoint(path, state)
            if distributed.is_main():
                prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        return path

    def resume(self, allow_changes: bool = False) -> None:
        """Load the newest valid checkpoint of the run (a damaged newer one is renamed `*.bad` with a warning),
        after checking that this run's settings may continue it (`run_folder.check_changes`); record the resume."""
        ckpts = list_checkpoints(self.run_dir)
        bad: list[tuple[Path, str]] = []
        for path in reversed(ckpts):
            try:
                state = load_checkpoint(path, map_location=self.device)
                break
            except (ValueError, FileNotFoundError) as e:
                bad.append((path, str(e)))
        else:
            reasons = "; ".join(reason for _, reason in bad)
            raise ValueError(f"--resume: no valid checkpoint in {self.run_dir / 'checkpoints'} ({reasons})")
        changes = run_folder.config_changes(state["config"], self.run_config)
        run_folder.check_changes(changes, allow_changes, path)
        if state["step"] > self.cfg.steps:
            raise ValueError(f"--resume: the checkpoint {path} is at step {state['step']}, past train.steps="
                             f"{self.cfg.steps}; set train.steps to at least {state['step']}")
        self.load_state_dict(state)
        distributed.barrier()  # every rank has read its checkpoint before rank 0 renames the bad ones
        if distributed.is_main():
            for damaged, reason in bad:  # renamed, not deleted: kept for a look, and no longer pruned as newer
                damaged.rename(damaged.with_name(damaged.name + ".bad"))
                if checksum_path(damaged).exists():
                    checksum_path(damaged).rename(damaged.with_name(damaged.name + ".bad.sha256"))
                log.warning("skipped the damaged checkpoint %s (renamed to %s.bad): %s", damaged, damaged.name, reason)
            run_folder.record_resume(self.run_dir, self.step, path, changes)
            log.info("resumed %s at step %d", path, self.step)

    def export(self) -> dict[str, Path]:
        """Write the raw student and EMA profile 0 as safetensors next to the checkpoints (rank 0 writes)."""
        meta = {"recipe": self.recipe.name, "step": self.step, "run_config": self.run_config, **self.export_meta}
        stem = self.recipe.export_stem
        paths = {"raw": self.run_dir / f"{stem}.safetensors", "ema": self.run_dir / f"{stem}_ema.safetensors"}
        student = self.recipe.student
        if self.cfg.fsdp:  # gather the whole weights to rank 0 (every rank takes part)
            raw = distributed.full_model_state(student)
            with distributed.ema_weights(self.ema, student):
                ema = distributed.full_model_state(student)
        elif distributed.is_main():
            raw = student.state_dict()
            with self.ema.swapped(student, profile=0):
                ema = {k: v.clone() for k, v in student.state_dict().items()}
        if distributed.is_main():
            check_finite(raw, paths["raw"])  # both checked before either is written
            check_finite(ema, paths["ema"])
            save_weights(paths["raw"], student, meta, state=raw)
            save_weights(paths["ema"], student, {**meta, "ema_sigma_rel": self.cfg.ema_sigma_rels[0]}, state=ema)
        return paths

    # ---- training ----------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device, self.cfg.precision, sharded=self.cfg.fsdp)

    def _lr(self, step: int) -> float:
        warm = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (step + 1) / warm) if warm > 0 else self.cfg.lr

    def _accumulating(self, last: bool):
        """No gradient all-reduce (DDP) or reduce-scatter (FSDP2) for the backward of a micro-batch other than
        the step's last."""
        for module in self._sharded:
            module.set_requires_gradient_sync(last)
        if last or not isinstance(self.recipe_loss, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.recipe_loss.no_sync()

    def train_step(self, step: int) -> Logs:
        """One optimiser step; its scalars to log, some left on the device (`logs.host_values` reads them). Its one
        host synchronisation is the finiteness of the gradient norm, which decides whether the step is taken."""
        with nvtx_range("data"):
            batch = next(self.data).to(self.device)
        accum, world = self.cfg.grad_accum, distributed.data_world()
        micro_batches = batch.split(accum, first_part=distributed.data_rank() * accum, count=world * accum)
        self.recipe.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, micro_logs = [], []
        for i, micro in enumerate(micro_batches):
            with self._accumulating(last=i == accum - 1):
                with nvtx_range("student_forward"), self._autocast():
                    loss, logs = self.recipe_loss(micro, step)
                with nvtx_range("student_backward"):
                    (loss / accum).backward()
            losses.append(loss.detach())
            micro_logs.append(logs)
        logs = {key: sum(m[key] for m in micro_logs) / accum for key in micro_logs[0]}
        with nvtx_range("optimizer"):
            clip = self.cfg.grad_clip or math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.recipe.student.parameters(), clip)
            if isinstance(grad_norm, DTensor):  # sharded gradients: the norm over all ranks' shards
                grad_norm = grad_norm.full_tensor()
            # the norm of the all-reduced (DDP) or fully reduced (FSDP) gradients: the same on every rank, so
            # every rank takes the same decision without a collective of its own
            norm = float(grad_norm)
            if not math.isfinite(norm):
                return self._skip_step(step, sum(losses) / accum, logs, norm)
            self.bad_streak = 0
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(step)
            self.optimizer.step()
        with nvtx_range("ema"):
            self.ema.update()
        with nvtx_range("auxiliary"), self._autocast():
            aux = self.recipe.auxiliary_step(batch, step)
        return {
            "loss": sum(losses) / accum, "grad_norm": norm, "lr": self._lr(step),
            "skipped_steps": float(self.skipped_steps), **logs, **aux,
        }

    def _skip_step(self, step: int, loss: torch.Tensor, logs: Logs, grad_norm: float) -> Logs:
        """Drop a step whose gradient norm is not finite: no optimiser, EMA or auxiliary update; its gradients
        are discarded. Raises once `max_bad_steps` steps in a row were skipped."""
        for module in self.recipe.trained_by_loss():
            module.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.bad_streak += 1
        log.warning("step %d: gradient norm %s is not finite; step skipped (%d in a row)", step, grad_norm,
                    self.bad_streak)
        if self.bad_streak >= self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_streak} consecutive steps (up to step {step}) had a non-finite gradient norm "
                f"(train.max_bad_steps={self.cfg.max_bad_steps}); stopping with the last checkpoint intact. "
                "Lower train.lr or lengthen train.warmup_steps"
            )
        return {
            "loss": loss, "grad_norm": grad_norm, "lr": self._lr(step),
            "skipped_steps": float(self.skipped_steps), **logs,
        }

    def _warn_if_long(self, seconds_per_step: float) -> None:
        """On a CPU, warn when the remaining steps would take more than LONG_RUN_S and no time limit is set."""
        remaining = seconds_per_step * (self.cfg.steps - self.step)
        if self.device.type == "cpu" and self.cfg.time_limit_s is None and remaining > LONG_RUN_S:
            log.warning("at %.1f s per step on this CPU the remaining %d steps take about %.1f h; "
                        "--set train.time_limit_s=SECONDS stops earlier (checkpointed and exported), "
                        "train.steps shortens the run", seconds_per_step, self.cfg.steps - self.step, remaining / 3600)

    def _evaluate(self, runlog: RunLog, bar: tqdm) -> None:
        """Rank 0 scores the EMA student while the other ranks wait; a sharded student's (or a context-parallel
        one's) forwards need every rank, so then all ranks run the (deterministic) evaluation and rank 0 writes."""
        together = self.cfg.fsdp or self.cfg.context_parallel > 1
        if not together and not distributed.is_main():
            distributed.barrier()
            return
        with nvtx_range("evaluate"), distributed.ema_weights(self.ema, self.recipe.student):
            scores = self.evaluator(self.recipe.student)
        if not together:
            distributed.barrier()
        if not distributed.is_main():
            return
        runlog.write(self.step, {f"eval_{k}": v for k, v in scores.items()})
        bar.write(f"step {self.step} EMA: " + " ".join(f"{k}={v:.4g}" for k, v in scores.items()))

    def fit(self, resume: bool = False, allow_changes: bool = False) -> list[dict]:
        """Train to `cfg.steps` in a new run folder, or continue its run (`resume`; `allow_changes`: with other
        settings than its checkpoint's, see `run_folder.check_changes`); returns the logged rows of this call."""
        run_folder.prepare(self.run_dir, resume)
        main = distributed.is_main()
        if main:
            run_folder.remove_stale_temporaries(self.run_dir)
        distributed.barrier()  # every rank has seen the folder as it was before rank 0 writes into it
        if resume:
            self.resume(allow_changes)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.run_config, indent=2, default=str))
        runlog = RunLog(self.run_dir, self.cfg.tensorboard, resume_step=self.step if resume else None, enabled=main)
        window = CaptureWindow(self.cfg.profile_window)
        rows: list[dict] = []
        start_time = time.perf_counter()
        first_step, after_first = self.step, 0.0
        bar = tqdm(
            total=self.cfg.steps, initial=self.step, desc=self.recipe.name, dynamic_ncols=True, disable=not main
        )
        try:
            with context_parallel.use(distributed.context_group()):  # DiT forwards split tokens (if set)
                while self.step < self.cfg.steps:
                    window.at_step(self.step)
                    with nvtx_range(f"step {self.step}"):
                        metrics = self.train_step(self.step)
                    self.step += 1
                    bar.update(1)
                    elapsed = time.perf_counter() - start_time
                    if self.step == first_step + 1:
                        after_first = elapsed  # the first step includes one-time costs (allocation, warm-up)
                    elif self.step == first_step + ESTIMATE_AFTER and main:
                        self._warn_if_long((elapsed - after_first) / (ESTIMATE_AFTER - 1))
                    out_of_time = self.cfg.time_limit_s is not None and distributed.any_rank(
                        elapsed > self.cfg.time_limit_s, self.device
                    )
                    last = self.step == self.cfg.steps or out_of_time
                    if self.step % self.cfg.log_every == 0 or last:
                        metrics = distributed.mean_over_ranks(host_values(metrics), self.device)
                        runlog.write(self.step, {**metrics, "wall_s": elapsed})
                        rows.append({"step": self.step, **metrics, "wall_s": elapsed})
                        bar.set_postfix(loss=f"{metrics['loss']:.4g}")
                    if self.evaluator is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                        self._evaluate(runlog, bar)
                    if self.step % self.cfg.ckpt_every == 0 or last:
                        self.save()
                    if out_of_time:
                        log.warning("time limit of %.0f s reached at step %d; stopping", self.cfg.time_limit_s,
                                    self.step)
                        break
        finally:
            window.close()
            bar.close()
            runlog.close()
        return rows
