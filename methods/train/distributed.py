"""Training on several ranks through torchrun: `DistributedDataParallel`, or FSDP2 sharding; context parallelism.

`torchrun --nproc_per_node N -m vdistill.methods.cli pretrain|distill ...` sets RANK / WORLD_SIZE / LOCAL_RANK;
the CLI then opens one process group (NCCL for CUDA tensors, gloo for CPU ones, so the same code is
tested on CPU). Conventions: `train.batch_size` is the global batch, each rank takes its slice of the
global batch the single-process run would draw; gradients are averaged by DDP (overlapped with the
backward); every rank keeps identical weights, optimiser and EMA states; rank 0 alone writes
checkpoints, logs, evaluations and exports; each rank's RNG state goes into the checkpoint, so a run
resumes exactly with the same number of ranks. The trainer's micro-batches (`grad_accum`) split each
rank's share further; every part of a step's batch draws its kernel noise from its own stream
(`Batch.part`). With `TrainConfig.fsdp` the student, the frozen teacher and rCM's critic are sharded by FSDP2
(`shard`) instead of replicated, and checkpoints are distributed (`sharded_checkpoint.py`: every rank writes its
shards; a resume may reshard onto another number of ranks): the forwards are then collectives, so every rank
must run the same sequence of them (rCM draws its simulation steps from the step, not the rank's RNG;
evaluations run on all ranks). With context parallelism
(`set_context_parallel`, `TrainConfig.context_parallel` = C) consecutive groups of C ranks split each clip's tokens
(`models/context_parallel.py`): the ranks of a group are one data-parallel rank (`data_rank`, `data_world`: same
clips, same noise, same seed), and gradients averaged over all ranks are exactly the data-parallel ones.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


_context = (None, 1)  # (process group of this rank's context-parallel group, its size C)


def set_context_parallel(size: int) -> None:
    """Split the ranks into consecutive groups of `size` that share each clip's tokens (every rank must call, before
    the data is built); 1 = none. ValueError unless `size` divides the ranks."""
    global _context
    world = world_size()
    if size < 1 or world % size:
        raise ValueError(f"context_parallel {size} must be >= 1 and divide the {world} ranks (torchrun "
                         "--nproc-per-node)")
    group = None
    if size > 1:
        for first in range(0, world, size):  # new_group is collective: every rank creates every group
            members = list(range(first, first + size))
            created = dist.new_group(members)
            group = created if rank() in members else group
    _context = (group, size)


def context_group() -> dist.ProcessGroup | None:
    return _context[0]


def context_size() -> int:
    return _context[1]


def data_rank() -> int:
    """This rank's index among the data-parallel ranks (the ranks of a context-parallel group share one)."""
    return rank() // context_size()


def data_world() -> int:
    return world_size() // context_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", rank()))


def launched_ranks() -> int:
    """The number of processes torchrun started (its WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group_from_env() -> Iterator[None]:
    """Open the process group torchrun describes for the duration (also of one rank: FSDP2 needs a group);
    without torchrun, nothing."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or dist.is_initialized():
        yield
        return
    backend = "cpu:gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    # ranks wait at a collective while rank 0 alone writes a checkpoint or evaluates: give that an hour, not
    # NCCL's default 10 minutes (a failed rank still ends the run at once: torchrun stops the others)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=1))
    try:
        yield
    finally:
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """`name` ("auto", "cpu", "cuda[:N]") as this process's device; under torchrun with CUDA, "auto" and
    "cuda" are the GPU of LOCAL_RANK (and another index is refused)."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if world_size() > 1:
        if name not in ("auto", "cuda"):
            raise ValueError(f"device {name!r}: under torchrun use 'auto' or 'cuda' (rank -> LOCAL_RANK)")
        return torch.device("cuda", local_rank())
    return torch.device("cuda" if name == "auto" else name)


def shard_of(global_batch: int) -> slice:
    """This data-parallel rank's part of a global batch of `global_batch` items; ValueError unless it divides
    evenly."""
    world = data_world()
    if global_batch % world:
        raise ValueError(f"batch_size {global_batch} is the global batch and must be divisible by the "
                         f"{world} data-parallel ranks")
    per_rank = global_batch // world
    return slice(data_rank() * per_rank, (data_rank() + 1) * per_rank)


def replicate(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` wrapped for gradient averaging across ranks (itself when single-process). Rank 0's weights
    are broadcast at wrapping; gradients are all-reduced in buckets during the backward of a loss computed
    through the returned module's forward, and live in those buckets (no second copy of the gradients)."""
    if world_size() == 1:
        return module
    ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True)


def shard(module: nn.Module) -> nn.Module:
    """`module` sharded over the ranks by FSDP2 (`fully_shard`), in place: each DiT block and each other child
    (embeddings, head) is its own unit (its full weights exist only while it runs, all-gathered just before;
    FSDP2 keeps the root unit's weights gathered after a forward without backward), then the rest of the module.
    Rank 0's weights are broadcast first, so every rank shards the same model. Returns `module`."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ValueError("fsdp: sharding needs a process group; launch with torchrun")
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
    for block in getattr(module, "blocks", ()):
        fully_shard(block)
    for name, child in module.named_children():  # embeddings, head: their own units, so that forwards without a
        if name != "blocks" and any(True for _ in child.parameters()):  # backward (a frozen teacher) free them
            fully_shard(child)
    fully_shard(module)
    return module


@contextlib.contextmanager
def ema_weights(ema, module: nn.Module, profile: int = 0) -> Iterator[nn.Module]:
    """`ema.swapped(module, profile)` that also holds for a sharded module: FSDP2 keeps the root's all-gathered
    weights after a forward without backward (and reuses them at the next forward), so the swap frees them
    on entry and on exit; the forwards inside then all-gather the swapped-in shards."""
    reshard(module)
    with ema.swapped(module, profile):
        try:
            yield module
        finally:
            reshard(module)


def reshard(module: nn.Module) -> None:
    """Free the all-gathered weights FSDP2 keeps after a forward without backward (no-op for an unsharded module),
    so that `module.parameters()` are the shards again."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict of a sharded module on rank 0, on CPU; {} on the other ranks.
    All ranks must call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each scalar averaged over the ranks (all ranks must call)."""
    if world_size() == 1 or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on some rank (all ranks must call)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
