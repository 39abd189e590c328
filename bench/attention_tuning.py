"""`vdistill bench attention`'s control of the attention kernels' autotuners: a per-config sweep (each row of a
kernel's autotune list pinned alone), the plain or software-pipelined KV loop of the fused kernel, and a longer
autotune benchmark time. Every change to a kernel's Autotuner is undone after each call."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import triton

if TYPE_CHECKING:
    from vdistill.bench.bench_attention import Provider, Runner

# --sweep: kernel -> (module in kernels/attention, its Autotuner, its config-row list, the op that times it)
KERNELS = {
    "fwd": ("fwd", "_attn_fwd_kernel", "FWD_CONFIGS", "fwd"),
    "fwd_jvp": ("fwd_jvp", "_attn_fwd_jvp_kernel", "JVP_CONFIGS", "fwd+jvp"),
    "bwd_dkdv": ("bwd", "_attn_bwd_dkdv_kernel", "DKDV_CONFIGS", "bwd"),
    "bwd_dq": ("bwd", "_attn_bwd_dq_kernel", "DQ_CONFIGS", "bwd"),
    "bwd_dkdv_dq": ("bwd", "_attn_bwd_dkdv_dq_kernel", "DKDV_DQ_CONFIGS", "bwd"),  # dK/dV with atomic dQ
}


def kernel_autotuner(name: str) -> triton.runtime.Autotuner:
    module, attr, _, _ = KERNELS[name]
    return getattr(importlib.import_module(f"vdistill.kernels.attention.{module}"), attr)


class KernelState:
    """An autotune state of one kernel's own (configs, pruner, tuning cache), swapped in around each call: the
    first call tunes within `configs`, later calls reuse that choice; the kernel's own state (and the launch
    fallback's set of pinned kernels) is restored after every call."""

    def __init__(self, kernel: triton.runtime.Autotuner, configs: list[triton.Config], prune: Callable | None = None):
        self.kernel, self.configs, self.prune, self.cache = kernel, configs, prune, {}

    @contextlib.contextmanager
    def active(self):
        tuning = importlib.import_module("vdistill.kernels.attention.tuning")
        k = self.kernel
        saved, pinned = (k.configs, k.cache, k.early_config_prune), set(tuning._pinned)
        k.configs, k.cache = self.configs, self.cache
        if self.prune is not None:
            k.early_config_prune = self.prune
        try:
            yield
        finally:
            k.configs, k.cache, k.early_config_prune = saved
            tuning._pinned.clear()
            tuning._pinned.update(pinned)

    def call(self, fn: Callable[[], object]):
        with self.active():
            return fn()

    def chosen(self) -> str | None:
        """The config the first call settled on (num_stages as fitted to shared memory), if any."""
        return next((str(c) for c in self.cache.values()), None)


def pinned_state(kernel: triton.runtime.Autotuner, config: triton.Config) -> KernelState:
    """`kernel` run with `config` alone. Two list entries make the Autotuner call its pruner (one config skips
    it); the kernel's own pruner, shown `config` only, lowers num_stages to fit shared memory and returns that
    one config, which is then used without benchmarking."""
    prune = kernel.early_config_prune
    only = (lambda cfgs, nargs, **kw: prune([config], nargs, **kw)) if prune else (lambda cfgs, nargs, **kw: [config])
    return KernelState(kernel, [config, config], only)


def loop_state(pipelined: bool) -> KernelState:
    """The fused forward+tangent kernel limited to its configs with (or without) the software-pipelined KV loop,
    autotuned afresh within them."""
    kernel = kernel_autotuner("fwd_jvp")
    chosen = [c for c in kernel.configs if c.kwargs.get("PIPELINE", False) == pipelined]
    if not chosen:  # the interpreter's single config: set the flag on it
        first = kernel.configs[0]
        chosen = [triton.Config(first.kwargs | {"PIPELINE": pipelined}, num_warps=first.num_warps,
                                num_stages=first.num_stages)]
    return KernelState(kernel, chosen)


def sweep_configs() -> dict[str, list[triton.Config]]:
    """Every row of each kernel's autotune list, read from its module now, as a triton.Config (built here, not
    taken from the Autotuner: under the interpreter that holds one 16×16 config)."""
    tuning = importlib.import_module("vdistill.kernels.attention.tuning")
    out = {}
    for name, (module, _, rows, _) in KERNELS.items():
        out[name] = [triton.Config({"BLOCK_M": m, "BLOCK_N": n} | dict(zip(tuning.FLAGS, flags)), num_warps=w,
                                   num_stages=s)
                     for m, n, w, s, *flags in getattr(importlib.import_module(f"vdistill.kernels.attention.{module}"),
                                                       rows)]
    return out


def config_label(c: triton.Config) -> str:
    """`128x64 w8 s3 +LAZY_RESCALE`: tile, warps, stages and the flags that are on."""
    flags = "".join(f" +{k}" for k, v in c.kwargs.items() if k not in ("BLOCK_M", "BLOCK_N") and v)
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}{flags}"


def sweep_kernels(runner: Runner, shape: str, dims, graphs: bool, ops: dict[str, Provider | Exception]) -> None:
    """Per kernel named in ops: the op that runs it (ops[kernel]) checked and timed with each of the kernel's
    configs pinned alone, the configs interleaved; rows in runner.sweep_rows (kernel, config, config_used, ms,
    TFLOP/s of the op)."""
    for kernel_name, cfgs in sweep_configs().items():
        if kernel_name not in ops:
            continue
        op, spec, kernel = KERNELS[kernel_name][3], ops[kernel_name], kernel_autotuner(kernel_name)
        states = {f"#{i} {config_label(c)}": pinned_state(kernel, c) for i, c in enumerate(cfgs)}
        if isinstance(spec, Exception):  # the op itself failed (e.g. its forward): every config records it
            providers = dict.fromkeys(states, spec)
        else:
            fn, check = spec
            providers = {label: (lambda s=s, f=fn: s.call(f), lambda s=s, c=check: s.call(c))
                         for label, s in states.items()}
        for row in runner.op(shape, dims, op, providers, graphs, rows=runner.sweep_rows, extra={"kernel": kernel_name}):
            row["config"] = row["provider"]
            row["config_used"] = states[row["provider"]].chosen()


@contextlib.contextmanager
def autotune_rep(rep_ms: float | None):
    """The attention kernels' autotuners time each config with do_bench(warmup=rep_ms/4, rep=rep_ms) instead of
    Triton's default benchmarker (warmup 25 ms, rep 100 ms): a steadier choice. The Autotuner reads its
    `do_bench` attribute (a cached property, Triton >= 3.1); it is shadowed here and restored on exit."""
    if rep_ms is None:
        yield
        return
    from triton.testing import do_bench

    bench = lambda kernel_call, quantiles: do_bench(kernel_call, warmup=max(1.0, rep_ms / 4), rep=rep_ms,
                                                     quantiles=quantiles)
    kernels_ = [kernel_autotuner(name) for name in KERNELS]
    saved = [vars(k).get("do_bench") for k in kernels_]
    for k in kernels_:
        k.do_bench = bench
    try:
        yield
    finally:
        for k, old in zip(kernels_, saved):
            if old is None:
                vars(k).pop("do_bench", None)
            else:
                k.do_bench = old


def best_configs() -> dict:
    return {name: {str(key): str(cfg) for key, cfg in getattr(kernel_autotuner(name), "cache", {}).items()}
            for name in KERNELS}
