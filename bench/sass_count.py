"""Static instruction counts of the bandwidth-bound kernels, compiled for a GPU on any machine.

An elementwise kernel is memory-bound only while it issues few enough instructions per element:
an SM sub-partition issues one warp instruction per cycle, so at N SASS instructions per element
a whole H100/H200 (528 sub-partitions, ~1.9 GHz) needs at least N·elements / (528·32·1.9e9)
seconds; compare it with bytes / bandwidth. Counts and budgets: docs/results/trigflow.md.

This script compiles the TrigFlow kernels with Triton for `--arch` (no GPU needed: Triton's wheel
carries ptxas, nvdisasm and cuobjdump), disassembles them and prints per kernel: SASS
instructions in total and per element (straight-line kernels: static = executed, except the
tangent's reduce loop), SFU (MUFU) instructions per element, register spills (LDL/STL),
registers per thread and the resident warps per SM they allow, and the widths of the global
loads/stores; for bf16 noising also at the other launch configurations (elements per program /
warps) that `bench/bench_trigflow.py` times. Pointers are marked 16-byte aligned, as Triton does
at launch for aligned tensors.

    python -m vdistill.bench.sass_count [--arch 90] [--out bench/results]    # or: vdistill bench sass-count
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import tempfile

import torch

from vdistill.bench.bench_trigflow import LAUNCHES
from vdistill.bench.harness import result_name, run_meta, write_json
from vdistill.kernels import trigflow
from vdistill.kernels.scm_tangent import REDUCE_BLOCK, TANGENT_BLOCK, TANGENT_WARPS

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _kernels() -> list[tuple[str, str, object, dict, dict, int, int]]:
    """(name, dtype, jit function, signature, constexprs, elements per program, warps) per case."""
    from vdistill.kernels.scm_tangent import _scm_normalize_kernel, _scm_sumsq_kernel  # defined only with Triton

    cases = []
    for dtype, name in DTYPES.items():
        ptr = "*" + name
        sig = {"x0_ptr": ptr, "t_ptr": "*fp32", "xt_ptr": ptr, "v_ptr": ptr, "eps_ptr": ptr, "n": "i32",
               "blocks_per_sample": "i32", "seed": "i64", "off_lo": "i64", "off_hi": "i64",
               "MODE": "constexpr", "Q": "constexpr", "FAST": "constexpr"}
        const = {"MODE": 0, "Q": trigflow.NOISE_GROUP // 4, "FAST": dtype != torch.float32}
        cases.append(("noise x_t, v", name, trigflow._trigflow_noise_kernel, sig, const,
                      trigflow.NOISE_GROUP, trigflow.NOISE_WARPS))
        if dtype == torch.bfloat16:  # the other launches that bench/bench_trigflow.py times
            for group, warps in LAUNCHES:
                if (group, warps) != (trigflow.NOISE_GROUP, trigflow.NOISE_WARPS):
                    cases.append((f"  launch {group}/{warps} warps", name, trigflow._trigflow_noise_kernel, sig,
                                  {**const, "Q": group // 4}, group, warps))
    ins = {k: "*bf16" for k in ("f_ptr", "dx_ptr", "xt_ptr", "df_ptr")}
    sig = {**ins, "t_ptr": "*fp32", "partial_ptr": "*fp32", "n": "i32", "blocks_per_sample": "i32",
           "r": "fp32", "BLOCK": "constexpr"}
    cases.append(("sCM tangent: sum of squares", "bf16", _scm_sumsq_kernel, sig,
                  {"BLOCK": TANGENT_BLOCK}, TANGENT_BLOCK, TANGENT_WARPS))
    sig = {**ins, "t_ptr": "*fp32", "partial_ptr": "*fp32", "out_ptr": "*bf16", "norm_ptr": "*fp32", "n": "i32",
           "blocks_per_sample": "i32", "r": "fp32", "c_eps": "fp32", "BLOCK": "constexpr", "RBLOCK": "constexpr"}
    cases.append(("sCM tangent: normalise", "bf16", _scm_normalize_kernel, sig,
                  {"BLOCK": TANGENT_BLOCK, "RBLOCK": REDUCE_BLOCK},
                  TANGENT_BLOCK, TANGENT_WARPS))
    return cases


def _cuda_tool(name: str) -> str:
    """Path of nvdisasm/cuobjdump: Triton's bundled copy, else PATH."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = bundled if os.path.exists(bundled) else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: neither in Triton's wheel nor on PATH")
    return found


def resident_warps(regs: int, warps: int) -> int:
    """Warps per SM (sm_80/sm_90) for a kernel of `regs` registers per thread and `warps` per program.

    64K registers per SM, allocated per warp in units of 256 (8 per thread); at most 64 warps and
    32 programs per SM; shared memory unused.
    """
    per_warp = -(-regs // 8) * 8 * 32
    programs = min(32, 65536 // (per_warp * warps), 64 // warps)
    return programs * warps


def count(fn, signature: dict, constexprs: dict, warps: int, arch: int, stages: int | None = None,
          divisible: list[str] | None = None) -> dict:
    """Compile one kernel for sm_`arch`; SASS opcode histogram and PTX global-access widths.

    `stages`: num_stages (Triton's default if None). `divisible`: the argument names marked 16-divisible
    (None: every pointer and i32 argument, as Triton marks aligned pointers and multiples of 16 at launch).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch-time default; silences Triton 3.9
    if divisible is None:
        divisible = [k for k, v in signature.items() if v.startswith("*") or v == "i32"]
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(signature) if k in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": warps} | ({} if stages is None else {"num_stages": stages})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_cuda_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_cuda_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    opcodes = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    access = collections.Counter(re.findall(r"\b((?:ld|st)\.global[\w.]*)", compiled.asm["ptx"]))
    return {"sass": sum(opcodes.values()), "mufu": opcodes["MUFU"], "spills": opcodes["LDL"] + opcodes["STL"],
            "registers": regs, "warps_per_sm": resident_warps(regs, warps), "global_access": dict(access),
            "barriers": opcodes["BAR"], "shared_bytes": compiled.metadata.shared}  # BAR: block-wide barriers


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    ap.add_argument("--out", help="directory for the JSON result")
    args = ap.parse_args(argv)
    if args.arch < 80:
        ap.error(f"--arch must be a compute capability x10 >= 80 (80 = Ampere, 90 = Hopper), got {args.arch}")
    if not trigflow.HAS_TRITON:
        raise RuntimeError("Triton is not installed")
    rows = []
    header = ("kernel", "dtype", "SASS", "per elem", "MUFU/elem", "spills", "regs", "warps/SM")
    print("{:30s} {:5s} {:>6s} {:>9s} {:>9s} {:>6s} {:>5s} {:>8s}  global accesses".format(*header))
    for name, dtype, fn, sig, const, per_program, warps in _kernels():
        c = count(fn, sig, const, warps, args.arch)
        per_thread = per_program / (32 * warps)
        row = {"kernel": name, "dtype": dtype, **c, "elements_per_thread": per_thread,
               "sass_per_element": c["sass"] / per_thread, "mufu_per_element": c["mufu"] / per_thread}
        rows.append(row)
        print(f"{name:30s} {dtype:5s} {c['sass']:6d} {row['sass_per_element']:9.1f} {row['mufu_per_element']:9.2f} "
              f"{c['spills']:6d} {c['registers']:5d} {c['warps_per_sm']:8d}  {c['global_access']}")
    return offline_result("sass-count", args.arch, argv, rows, args.out)


def offline_result(what: str, arch: int, argv: list[str] | None, rows: list[dict], out: str | None) -> dict:
    """The JSON of an offline compile (meta with the target), written under `out` if given."""
    result = {"meta": {**run_meta(torch.device("cpu"), argv), "target": f"sm_{arch} (offline)"}, "rows": rows}
    if out:
        write_json(out, result_name(what, f"sm{arch}"), result)
    return result


if __name__ == "__main__":
    main()
