"""Count the operators a piece of training runs, and the host synchronisations among them, per phase.

A step is host-bound when the CPU cannot queue kernels as fast as the GPU runs them: then what matters is
how many operators it dispatches (each a few µs of Python and dispatcher time; most launch a kernel, views
and forward AD's shape checks do not) and every point where the host waits for the device (reading a device
value: `.item()`, `float()`, `bool()`, `.tolist()`; data-dependent shapes such as `nonzero` or a boolean
mask; copies between host and device without `non_blocking`), after which the queue runs empty. `OpCounter`
sees every ATen operator below autograd (backward included) and charges it to the innermost `nvtx_range`
open at the time (`current_phase`).

Reads of a CPU tensor are counted as well: on a CPU run they are what would synchronise on a GPU, which is
how tests on CPU check that a step does not synchronise (`tests/test_host_syncs.py`).
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vdistill.methods.train.profiling import current_phase

ROOT = str(Path(__file__).resolve().parents[2]) + os.sep  # the package root (the repository)

aten = torch.ops.aten
# operators whose result the host needs before it can go on (value reads, data-dependent output shapes)
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.equal, aten.is_nonzero, aten.unique_dim,
           aten._unique2}
COPIES = {aten._to_copy, aten.copy_}
MASKED = {aten.index, aten.index_put, aten.index_put_}  # with a boolean mask: its nonzero() sets the shape
# operators that launch no kernel besides the views: shape checks of forward AD, lazily zero tangents, reshapes
NO_KERNEL = {aten.is_same_size, aten._has_same_storage_numel, aten._efficientzerotensor, aten._unsafe_view,
             aten.lift_fresh}
# Tensor methods that read values on the host without dispatching an operator for a CPU tensor
HOST_READS = ("tolist", "numpy")


class Sync(NamedTuple):
    phase: str  # the innermost nvtx_range
    op: str  # the operator or Tensor method
    site: str  # the innermost line of vdistill's code on the stack ("path:line")
    via: str  # the library file `site` called into, if any (e.g. torch/optim/optimizer.py)


def _devices(args, kwargs) -> set[str]:
    flat = list(args) + list(kwargs.values())
    return {a.device.type for a in flat if isinstance(a, torch.Tensor)}


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c: ...` → `c.ops[phase]` operators dispatched, `c.launches[phase]` those of them that
    run a kernel (not views or shape checks; a fused kernel counts once), `c.syncs[phase]` host synchronisations
    and `c.sync_sites` where each came from (`Sync`)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.launches: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.sync_sites: list[Sync] = []
        self._patched: list[str] = []

    def _sync(self, name: str) -> None:
        phase = current_phase()
        self.syncs[phase] += 1
        stack = [f for f in traceback.extract_stack() if f.filename != __file__]
        ours = [i for i, f in enumerate(stack) if f.filename.startswith(ROOT)]
        site = f"{stack[ours[-1]].filename[len(ROOT):]}:{stack[ours[-1]].lineno}" if ours else "?"
        called = stack[ours[-1] + 1].filename if ours and ours[-1] + 1 < len(stack) else ""
        self.sync_sites.append(Sync(phase, name, site, called.rsplit("site-packages/", 1)[-1]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        phase, packet = current_phase(), func.overloadpacket
        self.ops[phase] += 1
        if not func.is_view and packet not in NO_KERNEL:
            self.launches[phase] += 1
        if packet in SYNCING:
            self._sync(str(packet))
        elif packet in MASKED and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self._sync(f"{packet} (boolean mask)")
        elif packet in COPIES:
            devices = _devices(args, kwargs)
            target = kwargs.get("device")
            if target is not None:
                devices.add(torch.device(target).type)
            if len(devices) > 1 and not kwargs.get("non_blocking", False):
                self._sync(f"{packet} {'/'.join(sorted(devices))}")
        return func(*args, **kwargs)

    def __enter__(self):
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def read(tensor, *a, _original=original, _name=name, **k):
                if tensor.device.type == "cpu":  # a device tensor's read is counted as its copy to the host
                    self._sync(f"Tensor.{_name}")
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, read)
            self._patched.append(name)
        return super().__enter__()

    def __exit__(self, *exc):
        for name in self._patched:
            delattr(torch.Tensor, name)  # the inherited method shows again
        self._patched.clear()
        return super().__exit__(*exc)

    def total(self) -> tuple[int, int, int]:
        """(operators, kernel launches, synchronisations) over all phases."""
        return sum(self.ops.values()), sum(self.launches.values()), sum(self.syncs.values())
