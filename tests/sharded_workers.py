"""Process body of tests/test_sharded_checkpoint.py: sharded (FSDP2) trainers run one after another in one
process group (a start of the ranks costs more than a tiny run), each leaving what its checkpoint restores."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_workers import _whole, free_port, trainer
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from vdistill.methods.train import distributed
from vdistill.methods.train.trainer import Trainer


def whole_state(t: Trainer) -> dict[str, torch.Tensor]:
    """What a sharded trainer's checkpoint restores, gathered whole on rank 0 ({} elsewhere; every rank calls):
    the student, AdamW's state, every EMA profile, and (rCM) the EMA target, the critic and its AdamW state."""
    student = t.recipe.student
    state = {f"student.{k}": v for k, v in distributed.full_model_state(student).items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    adamw = get_optimizer_state_dict(student, t.optimizer, options=options).get("state", {})
    state.update({f"adamw.{name}.{k}": v for name, s in adamw.items() for k, v in s.items()})
    emas = [(f"ema{p}", t.ema, p) for p in range(len(t.ema.profiles))]
    target = getattr(t.recipe, "_target_ema", None)
    emas += [("target", target, 0)] if target is not None else []
    for tag, ema, profile in emas:
        with distributed.ema_weights(ema, student, profile):
            # copies: on one rank the gathered tensors are the parameters themselves, which the swap restores
            state.update({f"{tag}.{k}": v.clone() for k, v in distributed.full_model_state(student).items()})
    critic = getattr(t.recipe, "critic", None)
    if critic is not None:  # sharded too, or replicated
        state.update({f"critic.{k}": _whole(v) for k, v in critic.state_dict().items()})
        critic_adamw = t.recipe._critic_optimizer().state_dict()["state"]
        state.update({f"critic_adamw.{i}.{k}": _whole(v) for i, s in critic_adamw.items() for k, v in s.items()})
    return state if distributed.is_main() else {}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def fit_in_turn(rank: int, world: int, port: int, runs: list[tuple[str, str, int, bool]]) -> None:
    """Rank `rank` of `world`: each sharded run (kind, run_dir, steps, resume) of `runs` in turn; rank 0 then saves
    {rows, state (`whole_state`), step, warnings} as run_dir/whole.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logger = logging.getLogger("vdistill")
    try:
        for kind, run_dir, steps, resume in runs:
            logged = _Warnings()
            logger.addHandler(logged)
            try:
                t = trainer(kind, Path(run_dir), steps, fsdp=True)
                rows = t.fit(resume=resume)
            finally:
                logger.removeHandler(logged)
            state = whole_state(t)
            if rank == 0:
                torch.save({"rows": rows, "state": state, "step": t.step, "warnings": logged.messages},
                           Path(run_dir) / "whole.pt")
    finally:
        dist.destroy_process_group()


def fit_in_turn_on(ranks: int, runs: list[tuple[str, Path, int, bool]]) -> list[dict]:
    """`fit_in_turn` on `ranks` spawned ranks; rank 0's whole.pt of each run."""
    runs = [(kind, str(run_dir), steps, resume) for kind, run_dir, steps, resume in runs]
    mp.spawn(fit_in_turn, args=(ranks, free_port(), runs), nprocs=ranks, join=True)
    return [torch.load(Path(run[1]) / "whole.pt", weights_only=False) for run in runs]
