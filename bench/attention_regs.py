"""Registers, spills and barriers of every attention config row, compiled offline for a GPU on any machine.

A flash-attention tile lives in registers: a row that needs more than 255 per thread spills to local
memory (LDL/STL in the loop), and one that needs many allows few resident warps to hide latency. This
script compiles the forward, fused forward+JVP, dK/dV (also its variant adding dQ by atomics) and dQ
kernels (`kernels/attention/`) at every row of their config lists for `--arch` with Triton's bundled
ptxas (no GPU needed; see `bench/sass_count.py`) and prints per row: registers per thread, spill
instructions (LDL+STL), SASS instructions, block-wide barriers (BAR), shared memory and the resident
warps per SM (registers and shared memory). num_stages is the one the kernel's own shared-memory
pruning (`tuning.fit_smem`) keeps on an H100/H200.

Arguments are typed as a launch on contiguous [B, H, N, D] tensors specialises them: pointers 16-byte
aligned, the head-dim stride (1) a constant, the other strides of Q/K/V/O-like tensors multiples of D
(marked 16-divisible), LSE/Δ strides and H unmarked, `do_not_specialize` lengths plain i32.
Counts depend on the Triton version (the results in docs/results/attention.md name theirs).

    python -m vdistill.bench.attention_regs [--arch 90] [--head-dims 64 128] [--dtype bf16] [--out DIR]
    # or: vdistill bench attention-regs
"""

from __future__ import annotations

import argparse
import types
from unittest import mock

import torch

from vdistill.bench.sass_count import count, offline_result

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMEM_PER_BLOCK = 232448  # H100/H200 opt-in shared memory per block (227 KiB): what fit_smem prunes against
SMEM_PER_SM, SMEM_RESERVED = 233472, 1024  # 228 KiB per SM, 1 KiB of it reserved per resident block
FP32_POINTERS = {"LSE", "DELTA"}  # the other pointer arguments have the input dtype
FP32_SCALARS = {"qk_scale", "scale"}
UNALIGNED_STRIDES = {"slb", "slh"}  # LSE/Δ [B, H, Nq] strides: multiples of Nq, which may be odd


def kernels() -> dict[str, tuple]:
    """name -> (autotuned kernel, its config rows, fixed constexprs, fp32 pointer arguments)."""
    from vdistill.kernels.attention import bwd, fwd, fwd_jvp

    dkdv_fp32 = FP32_POINTERS | {"DQ"}  # dK/dV's DQ: the fp32 atomic accumulator (Δ when unused)
    return {"fwd": (fwd._attn_fwd_kernel, fwd.FWD_CONFIGS, {}, FP32_POINTERS),
            "fwd+jvp": (fwd_jvp._attn_fwd_jvp_kernel, fwd_jvp.JVP_CONFIGS, {}, FP32_POINTERS),
            "dk/dv": (bwd._attn_bwd_dkdv_kernel, bwd.DKDV_CONFIGS, {"ATOMIC_DQ": False}, dkdv_fp32),
            "dk/dv+dq": (bwd._attn_bwd_dkdv_dq_kernel, bwd.DKDV_DQ_CONFIGS, {"ATOMIC_DQ": True}, dkdv_fp32),
            "dq": (bwd._attn_bwd_dq_kernel, bwd.DQ_CONFIGS, {}, FP32_POINTERS)}


def signature(fn, dtype: str, fp32_pointers: set[str] = FP32_POINTERS) -> tuple[dict, dict, list[str]]:
    """(signature, constexprs, 16-divisible names) of a JITFunction's non-tuning arguments, by their names."""
    sig, const, divisible = {}, {}, []
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            if p.has_default:
                const[name] = p.default
        elif name in FP32_SCALARS:
            sig[name] = "fp32"
        elif p.do_not_specialize or name == "H":  # lengths and head counts: any value
            sig[name] = "i32"
        elif name.isupper():  # tensors
            sig[name] = "*fp32" if name in fp32_pointers else "*" + dtype
            divisible.append(name)
        elif name.startswith("s") and name.endswith("d"):  # head-dim stride 1: Triton makes an int 1 a constant
            sig[name], const[name] = "constexpr", 1
        elif name.startswith("s"):  # other strides: multiples of D (>= 16) except LSE's
            sig[name] = "i32"
            if name not in UNALIGNED_STRIDES:
                divisible.append(name)
        else:
            raise ValueError(f"{fn.__name__}: no type rule for argument {name!r}")
    return sig, const, divisible


def fitted_stages(kernel, cfg, head_dim: int, dtype: torch.dtype) -> int:
    """num_stages that the kernel's early_config_prune (tuning.fit_smem) leaves for cfg on an H100/H200."""
    from vdistill.kernels.attention import tuning

    q = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0),
                              element_size=lambda: torch.empty((), dtype=dtype).element_size())
    with mock.patch.object(tuning, "_smem_limit", lambda index: SMEM_PER_BLOCK):
        return kernel.early_config_prune([cfg], {"Q": q}, HEAD_DIM=head_dim)[0].num_stages


def compile_row(kernel, row: tuple, head_dim: int, dtype: str, arch: int, fixed: dict | None = None,
                fp32_pointers: set[str] = FP32_POINTERS) -> dict:
    """Compile one config row of an autotuned attention kernel (`fixed`: its other constexprs); its counts."""
    from vdistill.kernels.attention.fwd import lazy_tau
    from vdistill.kernels.attention.tuning import configs

    (cfg,) = configs([row])
    sig, const, divisible = signature(kernel.fn, dtype, fp32_pointers)
    const = const | (fixed or {}) | cfg.kwargs | {"HEAD_DIM": head_dim}
    if "LAZY_TAU" in sig:
        const["LAZY_TAU"] = lazy_tau(DTYPES[dtype])
    stages = fitted_stages(kernel, cfg, head_dim, DTYPES[dtype])
    c = count(kernel.fn, sig, const, cfg.num_warps, arch, stages=stages, divisible=divisible)
    blocks_by_smem = SMEM_PER_SM // (c["shared_bytes"] + SMEM_RESERVED)  # shared memory also caps residency
    warps = min(c["warps_per_sm"], blocks_by_smem * cfg.num_warps)
    return {"row": list(row), "head_dim": head_dim, "dtype": dtype, "stages": stages, "registers": c["registers"],
            "spills": c["spills"], "sass": c["sass"], "barriers": c["barriers"], "shared_bytes": c["shared_bytes"],
            "warps_per_sm": warps}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="compiled head dims")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--out", help="directory for the JSON result")
    args = ap.parse_args(argv)
    if args.arch < 80:
        ap.error(f"--arch must be a compute capability x10 >= 80 (80 = Ampere, 90 = Hopper), got {args.arch}")
    rows = []
    print(f"{'kernel':8s} {'D':>4s} {'row (M, N, warps, stages[, lazy[, pipe]])':44s} {'stg':>3s} {'regs':>4s} "
          f"{'spills':>6s} {'SASS':>6s} {'BAR':>4s} {'smem KB':>7s} {'warps/SM':>8s}")
    for d in args.head_dims:
        for name, (kernel, config_rows, fixed, fp32_pointers) in kernels().items():
            for row in config_rows:
                r = {"kernel": name, **compile_row(kernel, row, d, args.dtype, args.arch, fixed, fp32_pointers)}
                rows.append(r)
                print(f"{name:8s} {d:4d} {str(tuple(row)):44s} {r['stages']:3d} {r['registers']:4d} {r['spills']:6d} "
                      f"{r['sass']:6d} {r['barriers']:4d} {r['shared_bytes'] / 1024:7.1f} {r['warps_per_sm']:8d}")
    return offline_result("attention-regs", args.arch, argv, rows, args.out)


if __name__ == "__main__":
    main()
