"""The trainer's state of a sharded (`train.fsdp`) run as a distributed checkpoint holds it: every tensor that
belongs to the sharded student as a DTensor with its parameter's placements, so that it reshards on load.

The student and AdamW states come from torch.distributed.checkpoint's state-dict API (sharded, not gathered).
An EMA (`kernels.ema.EMA.state_dict`, the trainer's or a recipe's, e.g. rCM's EMA target) of the student's
parameters holds this rank's local shards: they are wrapped as DTensors like the parameters. The rest of the
recipe's extra state stays as it is: DTensors of its own sharded modules (rCM's critic and its optimiser),
tensors of replicated ones (the same on every rank), numbers (per rank).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from vdistill.methods.train import distributed

_EMA_KEYS = {"step", "profiles", "ema"}  # an EMA.state_dict()


def sharded_state(student: nn.Module, optimizer: torch.optim.Optimizer, ema: dict, recipe: dict) -> dict:
    """{student, optimizer, ema, recipe}: the sharded student's and its optimiser's states, the trainer's EMA
    state `ema` and the recipe's extra state `recipe`, their shards as DTensors (every rank calls)."""
    params = {name: p for name, p in student.named_parameters() if isinstance(p, DTensor)}
    return {
        "student": get_model_state_dict(student),
        "optimizer": get_optimizer_state_dict(student, optimizer),
        "ema": _ema_as_dtensors(ema, params),
        "recipe": _ema_as_dtensors(recipe, params),
    }


def _ema_as_dtensors(value, params: dict[str, DTensor]):
    """`value` with each EMA state over `params` (an `EMA.state_dict()` whose tensors are local shards of them)
    holding DTensors placed like the parameters."""
    if isinstance(value, dict) and value.keys() == _EMA_KEYS and _over(value["ema"], params):
        return {**value, "ema": [{name: _like(t, params[name]) for name, t in profile.items()}
                                 for profile in value["ema"]]}
    if isinstance(value, dict):
        return {key: _ema_as_dtensors(item, params) for key, item in value.items()}
    return value


def _over(profiles: list[dict], params: dict[str, DTensor]) -> bool:
    """The EMA's tensors are local shards of `params`, by name and shape."""
    return all(profile.keys() == params.keys() and all(t.shape == params[n].to_local().shape
                                                       for n, t in profile.items()) for profile in profiles)


def _like(local: torch.Tensor, param: DTensor) -> DTensor:
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def load_sharded_state(student: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """Load `sharded_state`'s student and optimiser parts (read into this run's shards) into `student` and
    `optimizer`; returns {ema, recipe} with the EMAs' local tensors, for `EMA.load_state_dict` and
    `load_extra_state` (the recipe's sharded modules take their DTensors as they are)."""
    set_model_state_dict(student, state["student"])
    set_optimizer_state_dict(student, optimizer, state["optimizer"])
    return {"ema": _ema_as_local(state["ema"]), "recipe": _ema_as_local(state["recipe"])}


def _ema_as_local(value):
    """`_ema_as_dtensors`' inverse."""
    if isinstance(value, dict) and value.keys() == _EMA_KEYS:
        return {**value, "ema": [{name: t.to_local() if isinstance(t, DTensor) else t for name, t in profile.items()}
                                 for profile in value["ema"]]}
    if isinstance(value, dict):
        return {key: _ema_as_local(item) for key, item in value.items()}
    return value


def reseed(seed: int, step: int) -> None:
    """Seed this rank's torch (CPU and CUDA), numpy and Python RNGs from (seed, step, data-parallel rank): the ranks
    of a context-parallel group share their streams, as at the start of a run."""
    value = int(np.random.SeedSequence([seed, step, distributed.data_rank()]).generate_state(1)[0])
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
