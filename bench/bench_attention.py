"""Benchmark the Triton attention kernels (forward, forward+JVP, backward) against PyTorch.

One run times, side by side on the same inputs:
  fwd      ours (`kernels.attention`) vs SDPA flash / cuDNN / memory-efficient backends
  fwd+jvp  ours (`attention_jvp`, `kernels/attention/fwd_jvp.py`, one fused pass), ours through `torch.func.jvp` (same
           kernel), ours through the autograd.Function fallback (forward kernel + fused kernel), vs
           `torch.func.jvp` over SDPA's math backend (only where the Nq×Nk scores fit) and the
           `jvp_flash_attention` package (if importable); and the fused kernel restricted to its plain
           or to its software-pipelined KV-loop configs ("plain loop", "pipelined loop"; each
           autotuned within its own configs), so both loops are compared in the same run
  bwd      ours (default: the Triton backward), ours with PyTorch's flash backward fed with our O
           and LSE ("ours (flash bwd)", VDISTILL_ATTN_BWD=auto), vs the three SDPA backends
           (backward only: the forward graph is built once)
Rows: ms (median, p20, p80 of `triton.testing.do_bench`), TFLOP/s from 4·B·H·Nq·Nk·D (fwd),
12·… (fwd+jvp), 10·… (bwd), peak extra memory (max_memory_allocated over the call minus before).
Every provider is checked against an fp32 reference (chunked over query rows, so it fits at 32k
tokens) before it is timed; failures are recorded, never fatal. Inputs are transposed views of
[B, N, H, D] tensors (the DiT's layout), bf16 by default.

    python -m vdistill.bench.bench_attention [--quick] [--out bench/results] [--dtype bf16|fp16]

Budget on an H200: full run (4 shapes, autotuning included) ~150 s; --quick (Wan 480p shape, no
autotuning) ~60 s. CPU smoke test of the script's logic:
`TRITON_INTERPRET=1 python -m vdistill.bench.bench_attention --device cpu --tiny`.
Metadata, timing primitives and JSON output come from `bench/harness.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

from vdistill.bench.harness import (
    Timer,
    Timing,
    cpu_bench_ms,
    device_label,
    do_bench_ms,
    result_name,
    run_meta,
    write_json,
)

SHAPES = {  # name: (B, H, Nq, Nk, D)
    "wan1.3b-480p": (1, 12, 32760, 32760, 128),
    "b2h16-8k-d64": (2, 16, 8192, 8192, 64),
    "4k-d128": (1, 12, 4096, 4096, 128),
    "cross-32760x512": (1, 12, 32760, 512, 128),
}
QUICK = ["wan1.3b-480p"]
TINY = {"tiny-97x33": (1, 2, 97, 33, 16), "tiny-cross": (2, 1, 17, 40, 32)}
FLOPS = {"fwd": 4, "fwd+jvp": 12, "bwd": 10}
MATH_SCORE_BYTES = 4.5e9  # torch.func.jvp over math attention only where one fp32 Nq×Nk fits this
TOL = 5e-2  # max |err| <= TOL · max |ref| (bf16 math-backend tangents reach ~1e-2; a masking bug gives ~1)


def _timer(device: torch.device, rep_ms: int) -> Timer:
    """do_bench with rep_ms grown to >= 12 calls (p20/p80 stay meaningful at 32k tokens), capped at 1.5 s."""
    if device.type != "cuda":
        return lambda fn: cpu_bench_ms(fn, warmup=0)

    def cuda_time(fn: Callable[[], object]) -> Timing:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one_ms = (time.perf_counter() - t0) * 1e3
        rep = min(max(rep_ms, 12 * one_ms), 1500)
        return do_bench_ms(fn, max(5, rep // 5), rep)

    return cuda_time


def _peak_extra_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def reference(q, k, v, tq, tk, tv, do, scale: float, rows: int = 2048) -> dict[str, torch.Tensor]:
    """fp32 O, Ȯ (the tangent formula of `kernels/attention/fwd_jvp.py`) and dQ, dK, dV, chunked over query
    rows (no full Nq×Nk)."""
    f = lambda t: t.float()
    q, k, v, tq, tk, tv, do = map(f, (q, k, v, tq, tk, tv, do))
    out = {name: torch.zeros_like(t) for name, t in (("o", q), ("t_o", q), ("dq", q), ("dk", k), ("dv", v))}
    for i in range(0, q.shape[2], rows):
        sl = slice(i, i + rows)
        qc, tqc, doc = q[:, :, sl], tq[:, :, sl], do[:, :, sl]
        p = torch.softmax(torch.matmul(qc, k.transpose(-1, -2)) * scale, -1)
        o = torch.matmul(p, v)
        ps = p * (torch.matmul(tqc, k.transpose(-1, -2)) + torch.matmul(qc, tk.transpose(-1, -2))) * scale
        out["o"][:, :, sl] = o
        out["t_o"][:, :, sl] = torch.matmul(ps, v) - ps.sum(-1, keepdim=True) * o + torch.matmul(p, tv)
        ds = p * (torch.matmul(doc, v.transpose(-1, -2)) - (doc * o).sum(-1, keepdim=True))
        out["dq"][:, :, sl] = torch.matmul(ds, k) * scale
        out["dk"] += torch.matmul(ds.transpose(-1, -2), qc) * scale
        out["dv"] += torch.matmul(p.transpose(-1, -2), doc)
    return out


def _err(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    """Worst max-abs error relative to the reference's max magnitude, over the compared tensors."""
    return max(((g.float() - w).abs().max() / w.abs().max().clamp_min(1e-12)).item() for g, w in zip(got, want))


class Runner:
    """Checks, times and records providers; one provider's failure never stops the run."""

    def __init__(self, device: torch.device, rep_ms: int):
        self.device, self.timer, self.rows = device, _timer(device, rep_ms), []

    def run(self, shape: str, dims, op: str, provider: str, fn: Callable[[], object],
            check: Callable[[], float]) -> None:
        B, H, Nq, Nk, D = dims
        row = {"shape": shape, "B": B, "H": H, "Nq": Nq, "Nk": Nk, "D": D, "op": op, "provider": provider}
        try:
            t0 = time.perf_counter()
            row["rel_err"] = check()  # first call: compiles / autotunes
            row["first_call_s"] = time.perf_counter() - t0
            if not row["rel_err"] <= TOL:
                raise AssertionError(f"relative error {row['rel_err']:.3g} > {TOL}")
            med, p20, p80 = self.timer(fn)
            row.update(ms=med, p20_ms=p20, p80_ms=p80, tflops=FLOPS[op] * B * H * Nq * Nk * D / med / 1e9)
            row["peak_extra_mb"] = _peak_extra_mb(fn, self.device)
        except Exception as exc:  # noqa: BLE001 - recorded; the other providers still run
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.rows.append(row)


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return fn


def _function_jvp(q, k, v, tq, tk, tv, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback forward-AD path (forward kernel, then AttentionForwardADFunction.jvp's fused kernel),
    timed to justify routing plain forward AD to the one-pass kernel instead."""
    import torch.autograd.forward_ad as fwAD

    from vdistill.kernels.attention.ops import AttentionForwardADFunction

    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in ((q, tq), (k, tk), (v, tv))]
        out = fwAD.unpack_dual(AttentionForwardADFunction.apply(*duals, scale)[0])
        return out.primal, out.tangent


def _with_bwd_backend(name: str, fn: Callable[[], object]):
    """fn() with kernels.attention.bwd_select.BACKEND set to name (ours: the default, Triton)."""
    select = importlib.import_module("vdistill.kernels.attention.bwd_select")
    old, select.BACKEND = select.BACKEND, name
    try:
        return fn()
    finally:
        select.BACKEND = old


@contextlib.contextmanager
def _jvp_loop_only(pipelined: bool):
    """The fused forward+tangent kernel limited to its configs with (or without) the software-pipelined
    KV loop, autotuned afresh within them; its configs and tuning cache are restored afterwards."""
    kernel = importlib.import_module("vdistill.kernels.attention.fwd_jvp")._attn_fwd_jvp_kernel
    saved, saved_cache = kernel.configs, dict(kernel.cache)
    chosen = [c for c in saved if c.kwargs.get("PIPELINE", False) == pipelined]
    if not chosen:  # the interpreter's single config: set the flag on it
        first = saved[0]
        chosen = [triton.Config(first.kwargs | {"PIPELINE": pipelined}, num_warps=first.num_warps,
                                num_stages=first.num_stages)]
    kernel.configs = chosen
    kernel.cache.clear()
    try:
        yield
    finally:
        kernel.configs = saved
        kernel.cache.clear()
        kernel.cache.update(saved_cache)


def bench_shape(runner: Runner, name: str, dims, dtype: torch.dtype, device: torch.device) -> None:
    from torch.nn.attention import SDPBackend

    from vdistill.kernels.attention import attention, attention_jvp

    B, H, Nq, Nk, D = dims
    scale = D**-0.5
    g = torch.Generator(device=device).manual_seed(0)
    make = lambda n: torch.randn(B, n, H, D, device=device, generator=g).to(dtype).transpose(1, 2)
    q, k, v, tq, tk, tv, do = make(Nq), make(Nk), make(Nk), make(Nq), make(Nk), make(Nk), make(Nq)
    ref = reference(q, k, v, tq, tk, tv, do, scale)
    run = lambda op, prov, fn, check: runner.run(name, dims, op, prov, fn, check)
    sdpa = {"sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
            "sdpa-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION)}

    with torch.no_grad():
        fwd = {"ours": lambda: attention(q, k, v)}
        fwd.update({prov: (lambda f=f: f(q, k, v)) for prov, f in sdpa.items()})
        for prov, fn in fwd.items():
            run("fwd", prov, fn, lambda fn=fn: _err((fn(),), (ref["o"],)))

        jvps = {
            "ours (attention_jvp)": lambda: attention_jvp(q, k, v, tq, tk, tv),
            "ours (torch.func.jvp)": lambda: torch.func.jvp(attention, (q, k, v), (tq, tk, tv)),
            "ours (Function fwd + jvp)": lambda: _function_jvp(q, k, v, tq, tk, tv, scale),
        }
        if B * H * Nq * Nk * 4 <= MATH_SCORE_BYTES:
            math = _sdpa(SDPBackend.MATH)
            jvps["torch.func.jvp(sdpa-math)"] = lambda: torch.func.jvp(math, (q, k, v), (tq, tk, tv))
        else:
            runner.rows.append({"shape": name, "op": "fwd+jvp", "provider": "torch.func.jvp(sdpa-math)",
                                "error": f"skipped: one fp32 Nq×Nk score tensor is {B * H * Nq * Nk * 4 / 1e9:.0f} GB"})
        try:
            from jvp_flash_attention.jvp_attention import attention as jvp_fa

            jvps["jvp_flash_attention"] = lambda: torch.func.jvp(jvp_fa, (q, k, v), (tq, tk, tv))
        except ImportError:
            pass
        for prov, fn in jvps.items():
            run("fwd+jvp", prov, fn, lambda fn=fn: _err(fn(), (ref["o"], ref["t_o"])))
        fused = jvps["ours (attention_jvp)"]
        for prov, pipelined in (("ours (plain loop)", False), ("ours (pipelined loop)", True)):
            with _jvp_loop_only(pipelined):
                run("fwd+jvp", prov, fused, lambda: _err(fused(), (ref["o"], ref["t_o"])))

    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    bwd = {"ours": attention, "ours (flash bwd)": attention}
    bwd.update(sdpa)
    for prov, f in bwd.items():
        try:
            out = f(*inputs)
        except Exception as exc:  # noqa: BLE001 - e.g. a backend that does not take this shape
            runner.rows.append({"shape": name, "op": "bwd", "provider": prov, "error": f"{type(exc).__name__}: {exc}"})
            continue
        fn = lambda out=out: torch.autograd.grad(out, inputs, do, retain_graph=True)
        if prov == "ours (flash bwd)":
            fn = lambda fn=fn: _with_bwd_backend("auto", fn)
        run("bwd", prov, fn, lambda fn=fn: _err(fn(), (ref["dq"], ref["dk"], ref["dv"])))
        del out


def _best_configs() -> dict:
    mod = lambda name: importlib.import_module(f"vdistill.kernels.attention.{name}")
    bwd = mod("bwd")
    kernels_ = {"fwd": mod("fwd")._attn_fwd_kernel, "fwd+jvp": mod("fwd_jvp")._attn_fwd_jvp_kernel,
                "bwd_dkdv": bwd._attn_bwd_dkdv_kernel, "bwd_dq": bwd._attn_bwd_dq_kernel}
    return {name: {str(key): str(cfg) for key, cfg in getattr(k, "cache", {}).items()} for name, k in kernels_.items()}


def _print_table(rows: list[dict]) -> None:
    print(f"{'shape':<18} {'op':<8} {'provider':<28} {'ms':>9} {'p20':>9} {'p80':>9} {'TFLOP/s':>8} {'MiB':>8}  note")
    for r in rows:
        if "ms" in r:
            mem = "-" if r.get("peak_extra_mb") is None else f"{r['peak_extra_mb']:.0f}"
            print(f"{r['shape']:<18} {r['op']:<8} {r['provider']:<28} {r['ms']:>9.3f} {r['p20_ms']:>9.3f} "
                  f"{r['p80_ms']:>9.3f} {r['tflops']:>8.1f} {mem:>8}  err {r['rel_err']:.1e}")
        else:
            print(f"{r['shape']:<18} {r['op']:<8} {r['provider']:<28} {'failed':>9}  {r['error'][:90]}")


def _summary(rows: list[dict]) -> dict:
    """Goal ratios per shape: fwd+jvp / cuDNN fwd, ours fwd / flash fwd, ours bwd / flash bwd, pipelined / plain
    loop fwd+jvp."""
    ms = {(r["shape"], r["op"], r["provider"]): r["ms"] for r in rows if "ms" in r}
    out = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        get = lambda op, prov, shape=shape: ms.get((shape, op, prov))
        pairs = {"fwd+jvp / sdpa-cudnn fwd": (get("fwd+jvp", "ours (attention_jvp)"), get("fwd", "sdpa-cudnn")),
                 "ours fwd / sdpa-flash fwd": (get("fwd", "ours"), get("fwd", "sdpa-flash")),
                 "ours bwd / sdpa-flash bwd": (get("bwd", "ours"), get("bwd", "sdpa-flash")),
                 "pipelined / plain loop fwd+jvp": (get("fwd+jvp", "ours (pipelined loop)"),
                                                    get("fwd+jvp", "ours (plain loop)"))}
        out[shape] = {k: (a / b if a and b else None) for k, (a, b) in pairs.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Wan 480p shape only, no autotuning (first config)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU/interpreter smoke test of the script)")
    p.add_argument("--shapes", nargs="*", choices=sorted(SHAPES), help="subset of the benchmark shapes")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="input dtype (default bf16)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with TRITON_INTERPRET=1 and --tiny)")
    p.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time per provider in ms")
    p.add_argument("--no-autotune", action="store_true", help="use each kernel's first config (no autotuning)")
    p.add_argument("--out", default="bench/results", help="directory for the JSON result file")
    args = p.parse_args(argv)
    if args.quick or args.no_autotune:
        os.environ["VDISTILL_ATTN_AUTOTUNE"] = "0"  # read when kernels is first imported
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu --tiny with TRITON_INTERPRET=1 for a smoke test")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device.type == "cpu":
        dtype = torch.float32  # the interpreter's bf16 dots are wrong
    shapes = TINY if args.tiny else {n: SHAPES[n] for n in (QUICK if args.quick else args.shapes or SHAPES)}

    t0 = time.perf_counter()
    runner = Runner(device, args.rep_ms)
    for name, dims in shapes.items():
        bench_shape(runner, name, dims, dtype, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {**run_meta(device, argv), "dtype": str(dtype),
              "autotune": os.environ.get("VDISTILL_ATTN_AUTOTUNE", "1") != "0", "rows": runner.rows,
              "summary": _summary(runner.rows), "best_configs": _best_configs(),
              "flash_bwd_state": dict(importlib.import_module("vdistill.kernels.attention.bwd_select")._flash_state),
              "wall_s": time.perf_counter() - t0}
    _print_table(runner.rows)
    for shape, ratios in result["summary"].items():
        print(shape, "  ".join(f"{k}: {'-' if v is None else f'{v:.2f}x'}" for k, v in ratios.items()))
    print(f"wall {result['wall_s']:.1f} s")
    write_json(args.out, result_name("attention", device_label(device)), result,
               indent=1)
    return result


if __name__ == "__main__":
    main()
