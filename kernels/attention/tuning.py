"""Autotuning and launching for the attention kernels: small config lists, shared-memory fitting, and
a fallback so that a config the installed Triton cannot compile never takes the op down.

Config rows are (BLOCK_M, BLOCK_N, num_warps, num_stages[, LAZY_RESCALE[, PIPELINE]]); the first row of every
list is the conservative default (eager rescale, moderate tiles) used when autotuning is off
(VDISTILL_ATTN_AUTOTUNE=0) or after a compile failure. Autotune keys: head dim, dtypes (added by
Triton) and the next power of two of Nq and Nk.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import triton

from vdistill.kernels.dispatch import INTERPRET

logger = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


def padded_head_dim(d: int) -> int:
    """The compiled head dim (16, 32, 64 or 128) that serves D <= 128; other D are zero-padded to it,
    which changes neither QKᵀ nor (after slicing the output) PV."""
    return max(16, triton.next_power_of_2(d))


AUTOTUNE = os.environ.get("VDISTILL_ATTN_AUTOTUNE", "1") != "0"
KEY = ["NQ_KEY", "NK_KEY", "HEAD_DIM"]


FLAGS = ("LAZY_RESCALE", "PIPELINE")  # optional trailing config-row entries, in this order


def configs(rows: list[tuple]) -> list[triton.Config]:
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages[, LAZY_RESCALE[, PIPELINE]]) rows;
    under the interpreter one 16×16 tile (so tiny test lengths span several blocks), lazy rescale on
    (tests pick other flags by replacing a kernel's configs)."""
    if INTERPRET:
        rows = [(16, 16, 1, 1, True)[: len(rows[0])]]
    out = []
    for m, n, w, s, *flags in rows:
        kw = {"BLOCK_M": m, "BLOCK_N": n} | dict(zip(FLAGS, flags))
        out.append(triton.Config(kw, num_warps=w, num_stages=s))
    return out


@functools.cache
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 166912))


_pinned: set[str] = set()  # kernels that failed to autotune: first fitting config only


def fit_smem(name: str, tiles: Callable[[int, int, int], tuple[int, int]]):
    """An `early_config_prune` that lowers num_stages until a config fits the device's shared memory.

    tiles(BLOCK_M, BLOCK_N, D) -> (elements resident for the whole loop, elements per pipeline stage).
    Without autotuning (or once `name` is pinned by `launch`) it keeps only the first fitting config.
    """

    def prune(cfgs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        q = named_args["Q"]
        d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        if not q.is_cuda or d is None:
            return cfgs[:1]
        limit = _smem_limit(q.device.index if q.device.index is not None else torch.cuda.current_device())
        fitted = []
        for c in cfgs:
            fixed, per_stage = tiles(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], d)
            stages = c.num_stages
            while stages > 1 and (fixed + stages * per_stage) * q.element_size() > limit:
                stages -= 1
            if (fixed + stages * per_stage) * q.element_size() <= limit:
                fitted.append(triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages))
        fitted = fitted or cfgs[-1:]
        return fitted if AUTOTUNE and name not in _pinned else fitted[:1]

    return prune


def n_bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two (so 32760 and 32768 share a config)."""
    return triton.next_power_of_2(max(int(n), 1))


def launch(kernel: triton.runtime.Autotuner, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs); if autotuning fails to compile some config (e.g. an older Triton),
    log it and pin the kernel to its first, conservative config for this and all later calls."""
    name = getattr(kernel.fn, "__name__", repr(kernel.fn))
    try:
        kernel[grid](*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any compiler error; a second failure is raised below
        if name in _pinned or len(kernel.configs) == 1:
            raise
        logger.warning("%s: autotuning failed (%s: %s); using its first config from now on", name,
                       type(exc).__name__, str(exc)[:200])
        _pinned.add(name)
        kernel.cache.clear()
        kernel[grid](*args, **kwargs)
