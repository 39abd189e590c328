"""Benchmark fused TrigFlow noising and the fused sCM tangent against eager and compiled PyTorch.

Noising of x0 [8, 16, 21, 60, 104] (Wan 480p, 81 frames, batch 8) in bf16, side by side:

  ours       `kernels.trigflow.trigflow_noise`: ε drawn in-kernel (Philox), x_t and v in one pass;
  eager      the same math in PyTorch: ε = torch.randn (fp32), x_t = cos t·x0 + sin t·ε,
             v = cos t·ε − sin t·x0 in fp32, cast to x0's dtype;
  compiled   `torch.compile` of that eager function (Inductor draws ε with Philox inline; bf16 only).

Bandwidth floor: read x0, write x_t and v (6 bytes per element in bf16) at the device-to-device
copy bandwidth measured in the same run (1 GiB copy, plain calls); "% floor" = floor time / provider time. The
sCM tangent ĝ = g/(‖g‖+c) (four bf16 inputs in, one out: floor 10 bytes per element) is timed
against its eager expression. Each provider is checked before timing: noising through the
rotation identities x0 = cos t·x_t − sin t·v and ε = sin t·x_t + cos t·v (ε's mean and std), ours
also against `trigflow_noise_ref` on the regenerated ε; the tangent against `scm_tangent_ref`.
Where the Triton kernel runs, the bf16 case also times the bare kernel at each launch configuration
(`LAUNCHES`: elements per program × warps, the default's included), each required to write the same
bits as the default launch. On CUDA every provider is timed as CUDA-graph replays (`--no-graphs`:
plain calls), so that a ~30 µs kernel is not measured by the Python checks in front of it.
Goals (issue 5): noising ≥ 3× `torch.compile` and ≥ 70 % of the floor.

    python -m vdistill.bench.bench_trigflow [--quick] [--out bench/results]

Metadata, timing, checked providers and JSON output come from `bench/harness.py`. CPU smoke
run of the script's logic: `TRITON_INTERPRET=1 python -m vdistill.bench.bench_trigflow --device cpu --tiny`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from vdistill.bench.harness import device_label, finish, make_timer, result_name, run_checked, run_meta
from vdistill.kernels.dispatch import use_triton
from vdistill.kernels.scm_tangent import scm_tangent, scm_tangent_ref
from vdistill.kernels.trigflow import (
    NOISE_GROUP,
    NOISE_WARPS,
    _launch_noise,
    trigflow_eps,
    trigflow_noise,
    trigflow_noise_ref,
)

WAN_SHAPE = (8, 16, 21, 60, 104)
TINY_SHAPE = (2, 3, 5, 7, 11)
# (elements per program, warps) of the noising launch sweep (bf16): 16 to 64 elements per thread
LAUNCHES = ((2048, 4), (4096, 4), (4096, 8), (8192, 4), (8192, 8), (16384, 8))
NOMINAL_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}  # HBM peak, TB/s (for reference only)


def noise_eager(x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TrigFlow noising as a user would write it in PyTorch (fp32 math, output in x0's dtype)."""
    eps = torch.randn(x0.shape, device=x0.device, dtype=torch.float32)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    c, s = torch.cos(t.float()).view(shape), torch.sin(t.float()).view(shape)
    x = x0.float()
    return (c * x + s * eps).to(x0.dtype), (c * eps - s * x).to(x0.dtype)


def tangent_eager(f, dx, xt, df, t, r: float, c: float):
    """sCM tangent and normalisation as eager PyTorch (fp32 math)."""
    shape = (-1,) + (1,) * (f.dim() - 1)
    cos, sin = torch.cos(t.float()).view(shape), torch.sin(t.float()).view(shape)
    g = -(cos * cos) * (f.float() - dx.float()) - (r * cos * sin) * (xt.float() + df.float())
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    return (g / (norm.view(shape) + c)).to(f.dtype), norm


def _check_rotation(x0: torch.Tensor, t: torch.Tensor, xt: torch.Tensor, v: torch.Tensor) -> float:
    """Max |x0 − (cos t·x_t − sin t·v)|; raises if ε = sin t·x_t + cos t·v is not ≈ N(0, 1)."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    c, s = torch.cos(t.float()).view(shape), torch.sin(t.float()).view(shape)
    xt, v = xt.float(), v.float()
    eps = s * xt + c * v
    n = eps.numel()
    mean, std = eps.mean().item(), eps.std().item()
    if abs(mean) > 6 / math.sqrt(n) + 0.01 or abs(std - 1) > 6 * math.sqrt(2 / n) + 0.01:
        raise AssertionError(f"recovered eps has mean {mean:.4f}, std {std:.4f}")
    return (c * xt - s * v - x0.float()).abs().max().item()


def _copy_bandwidth(device: torch.device, timer, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    med, _, _ = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / med / 1e6  # GB/s


def _bench_noise(rows, timer, shape, dtype, device, compile_ok: bool, sweep: bool) -> None:
    case = f"noise {list(shape)} {str(dtype).replace('torch.', '')}"
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(shape, generator=g, device=device).to(dtype)
    t = torch.rand(shape[0], generator=g, device=device) * (math.pi / 2)
    nbytes = x0.numel() * 3 * x0.element_size()
    tol = 1e-4 if dtype == torch.float32 else 0.1  # x0 rebuilt from x_t, v rounded to dtype

    def check_ours() -> float:
        xt, v = trigflow_noise(x0, t, seed=1, offset=0)
        eps = trigflow_eps(x0, seed=1, offset=0, dtype=torch.float32)
        rxt, rv = trigflow_noise_ref(x0, t, eps)
        scale = 1e-5 if dtype == torch.float32 else 2.0**-7
        bad = ((xt.float() - rxt.float()).abs() > scale * (1 + rxt.float().abs())).sum().item()
        bad += ((v.float() - rv.float()).abs() > scale * (1 + rv.float().abs())).sum().item()
        if bad:
            raise AssertionError(f"{bad} elements differ from trigflow_noise_ref beyond one rounding")
        return _check_rotation(x0, t, xt, v)

    counter = iter(range(1, 10**9))
    run_checked(rows, timer, case, "ours (fused, in-kernel Philox)",
         lambda: trigflow_noise(x0, t, seed=1, offset=next(counter)), check_ours, tol, nbytes)
    run_checked(rows, timer, case, "eager (torch.randn + fp32 math)", lambda: noise_eager(x0, t),
         lambda: _check_rotation(x0, t, *noise_eager(x0, t)), tol, nbytes)
    if compile_ok:
        compiled = torch.compile(noise_eager, dynamic=False)
        run_checked(rows, timer, case, "torch.compile(eager)", lambda: compiled(x0, t),
             lambda: _check_rotation(x0, t, *compiled(x0, t)), tol, nbytes)
    if sweep:
        _sweep_launches(rows, timer, case, x0, t, nbytes)


def _sweep_launches(rows, timer, case: str, x0: torch.Tensor, t: torch.Tensor, nbytes: int) -> None:
    """Time the bare noising kernel at each (elements per program, warps), the default's included; each output
    must equal the public function's bitwise."""
    want = trigflow_noise(x0, t, seed=1, offset=0)
    for group, warps in LAUNCHES:
        out = [torch.empty_like(x0), torch.empty_like(x0)]

        def launch(group=group, warps=warps, out=out):
            _launch_noise(x0, t, *out, None, seed=1, offset=0, mode=0, group=group, warps=warps)

        def differing(launch=launch, out=out) -> float:
            launch()
            return float(sum((a != b).sum().item() for a, b in zip(out, want, strict=True)))

        per_thread = group // (32 * warps)
        default = " (default)" if (group, warps) == (NOISE_GROUP, NOISE_WARPS) else ""
        run_checked(rows, timer, case, f"launch {group} elem/{warps} warps ({per_thread}/thread){default}",
                    launch, differing, 0.0, nbytes)


def _bench_tangent(rows, timer, shape, dtype, device) -> None:
    case = f"sCM tangent {list(shape)} {str(dtype).replace('torch.', '')}"
    g = torch.Generator(device=device).manual_seed(1)
    ins = [torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(4)]
    t = torch.rand(shape[0], generator=g, device=device) * (math.pi / 2)
    r, c = 0.7, 0.1
    nbytes = ins[0].numel() * 5 * ins[0].element_size()
    want, want_norm = scm_tangent_ref(*ins, t, r, c)

    def check(fn) -> Callable[[], float]:
        def err() -> float:
            out, norm = fn()
            e_out = (out.float() - want.float()).abs().max().item() / want.float().abs().max().item()
            e_norm = ((norm.float() - want_norm.float()).abs() / want_norm.float()).max().item()
            return max(e_out, e_norm)

        return err

    ours = lambda: scm_tangent(*ins, t, r, c)
    eager = lambda: tangent_eager(*ins, t, r, c)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    run_checked(rows, timer, case, "ours (fused, 2 launches)", ours, check(ours), tol, nbytes)
    run_checked(rows, timer, case, "eager", eager, check(eager), tol, nbytes)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the bf16 Wan shape (no fp32 variant)")
    parser.add_argument("--tiny", action="store_true", help=f"shape {list(TINY_SHAPE)}: smoke test only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--out", default=None, help="directory for the JSON result (e.g. bench/results)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per provider (ms)")
    parser.add_argument("--no-graphs", action="store_true",
                        help="time plain calls (host work included) instead of CUDA-graph replays")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_trigflow: no CUDA device (use --device cpu --tiny for a smoke run)")
    t_start = time.time()
    timer = make_timer(device, args.rep_ms, graphs=not args.no_graphs)
    shape = TINY_SHAPE if args.tiny else WAN_SHAPE
    rows: list[dict] = []
    # the floor from plain calls: a 1 GiB copy is long enough to hide the host, and a captured copy_ becomes
    # a slower graph memcpy node (docs/results/trigflow.md)
    copy_gbps = _copy_bandwidth(device, make_timer(device, args.rep_ms), 2**20 if args.tiny else 2**30)
    configs = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float32]
    for dtype in configs:  # torch.compile only for the bf16 goal case: a cold compile costs 10-30 s
        main = dtype == torch.bfloat16
        _bench_noise(rows, timer, shape, dtype, device, compile_ok=main and not args.no_compile,
                     sweep=main and use_triton(torch.empty(0, device=device)))
    _bench_tangent(rows, timer, shape, torch.bfloat16, device)
    meta = run_meta(device, argv)
    nominal = next((v for k, v in NOMINAL_TBPS.items() if k in meta["gpu"]), None)
    for row in rows:
        if "ms" in row:
            floor_ms = row["bytes"] / (copy_gbps * 1e6)
            row["pct_of_copy_floor"] = 100 * floor_ms / row["ms"]
            if nominal:
                row["pct_of_nominal_peak"] = 100 * (row["bytes"] / (nominal * 1e9)) / row["ms"]
        base = next((r for r in rows if r["case"] == row["case"] and r["provider"].startswith("torch.compile")
                     and "ms" in r), None) or next((r for r in rows if r["case"] == row["case"]
                                                    and r["provider"].startswith("eager") and "ms" in r), None)
        if base is not None and "ms" in row:
            row["baseline"] = base["provider"]
            row["speedup_vs_baseline"] = base["ms"] / row["ms"]
    goals = []
    main_case = f"noise {list(shape)} bfloat16"
    ours = next((r for r in rows if r["case"] == main_case and r["provider"].startswith("ours") and "ms" in r), None)
    comp = next((r for r in rows if r["case"] == main_case and r["provider"].startswith("torch.compile")
                 and "ms" in r), None)
    goals.append({"goal": "noising speed vs torch.compile", "target": 3.0,
                  "value": comp["ms"] / ours["ms"] if ours and comp else None})
    goals.append({"goal": "noising fraction of bandwidth floor", "target": 0.7,
                  "value": ours["pct_of_copy_floor"] / 100 if ours else None})
    for gl in goals:
        gl["met"] = gl["value"] is not None and gl["value"] >= gl["target"]
    result = {"meta": meta, "copy_gb_per_s": copy_gbps, "rows": rows, "goals": goals,
              "wall_s": time.time() - t_start}
    print(f"TrigFlow benchmark on {meta['gpu']}; device copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"{'case':40} {'provider':38} {'ms':>9} {'p20':>9} {'p80':>9} {'GB/s':>8} {'%floor':>7} {'speedup':>8}")
    for r in rows:
        if "ms" in r:
            speedup = r.get("speedup_vs_baseline", float("nan"))
            print(f"{r['case']:40} {r['provider']:38} {r['ms']:9.4f} {r['p20_ms']:9.4f} {r['p80_ms']:9.4f} "
                  f"{r['gb_per_s']:8.1f} {r['pct_of_copy_floor']:7.1f} {speedup:8.2f}")
        else:
            print(f"{r['case']:40} {r['provider']:38} {'failed':>9}  {r['error']}")
    finish(result, args.out, result_name("trigflow", device_label(device)))
    return result


if __name__ == "__main__":
    main()
