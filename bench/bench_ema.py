"""Benchmark the fused multi-tensor EMA (`kernels.ema.EMA`) against `torch._foreach_lerp_`.

Parameter sets shaped like Wan2.1-1.3B (30 blocks of attention/FFN/modulation weights plus
embeddings and head: ≈1.4 B parameters in ≈400 tensors; `--quick`: 8 blocks). Cases, each timed
side by side in one run with `triton.testing.do_bench` (median, p20/p80):

  fp32-K1   fp32 params, one profile: ours vs `_foreach_lerp_`, and a device-to-device copy of the
            same parameter bytes (copy bandwidth = 2·bytes/time is the achievable ceiling).
  bf16-K1   bf16 params into fp32 EMA: ours vs `_foreach_lerp_` after `.float()` upcast copies, and
            vs `_foreach_mul_` + `_foreach_add_` with bf16 operands.
  fp32-K2   two profiles in one pass vs two `_foreach_lerp_` calls (and bf16-K2 likewise). By bytes
            moved the best possible ratio is 24/20 = 1.2x for fp32 params and 30/18 = 1.67x for bf16.

Bytes counted per element: params read once, every profile's EMA read and written once.
Each provider is checked against `ema_update_ref` (one step from the same state) before timing.
Goals (issue 5): fp32 ≥ 0.95× foreach speed and ≥ 85 % of copy bandwidth; bf16 ≥ 2.5× foreach with
upcast; two profiles ≥ 1.6× two foreach calls.

    python -m vdistill.bench.bench_ema [--quick] [--out bench/results]

Metadata, timing, checked providers and JSON output come from `bench/harness.py`. For a
CPU smoke run of the script's logic: `TRITON_INTERPRET=1 python -m vdistill.bench.bench_ema --device cpu --tiny`.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from vdistill.bench.harness import Timer, device_label, finish, make_timer, result_name, run_checked, run_meta
from vdistill.kernels.ema import EMA, ema_update_ref
from vdistill.kernels.ema_schedule import EMAProfile

BETAS = (0.999, 0.99)


def wan_like_shapes(blocks: int, dim: int = 1536, ffn: int = 8960, text_dim: int = 4096) -> list[tuple[int, ...]]:
    """Parameter shapes of a Wan2.1-1.3B-like DiT (13 tensors per block plus embeddings and head)."""
    shapes: list[tuple[int, ...]] = [(dim, 16, 1, 2, 2), (dim,), (dim, text_dim), (dim, dim), (dim, 256), (dim, dim),
                                     (6 * dim, dim)]
    for _ in range(blocks):
        shapes += [(dim, dim)] * 8  # self- and cross-attention q, k, v, o
        shapes += [(ffn, dim), (ffn,), (dim, ffn), (dim,), (6, dim)]
    shapes += [(64, dim), (64,)]
    return shapes


def _make_params(shapes, dtype, device, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype) for s in shapes]


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def _case_single(rows: list[dict], timer: Timer, name: str, shapes, dtype, device, k: int, with_copy: bool) -> None:
    params = _make_params(shapes, dtype, device)
    numel = sum(p.numel() for p in params)
    betas = BETAS[:k]
    ema = EMA(params, [EMAProfile(beta=b) for b in betas])
    refs = [[p.float().clone() for p in params] for _ in betas]

    def check_ours() -> float:
        ema.update()
        for r, b in zip(refs, betas):
            ema_update_ref(r, params, b)
        return max(_max_err(ema.tensors(i), refs[i]) for i in range(k))

    elem_bytes = params[0].element_size() + 8 * k
    run_checked(rows, timer, name, f"ours (one pass, K={k})", ema.update, check_ours, 1e-5, numel * elem_bytes)

    w = [1.0 - b for b in betas]
    if dtype == torch.float32:

        def foreach():
            for r, wk in zip(refs, w):
                torch._foreach_lerp_(r, params, wk)

        label = "foreach_lerp_" if k == 1 else f"{k}x foreach_lerp_"
        run_checked(rows, timer, name, label, foreach, lambda: 0.0, 0.0, numel * elem_bytes)
    else:

        def foreach_upcast():
            up = [p.float() for p in params]
            for r, wk in zip(refs, w):
                torch._foreach_lerp_(r, up, wk)

        label = "foreach_lerp_ + .float() upcast" if k == 1 else f"upcast + {k}x foreach_lerp_"
        run_checked(rows, timer, name, label, foreach_upcast, lambda: 0.0, 0.0, numel * elem_bytes)
        mixed = [[t.clone() for t in r] for r in refs]

        def foreach_mul_add():
            for m, b in zip(mixed, betas):
                torch._foreach_mul_(m, b)
                torch._foreach_add_(m, params, alpha=1.0 - b)

        def check_mul_add() -> float:
            want = [[t.clone() for t in m] for m in mixed]
            foreach_mul_add()
            for wt, b in zip(want, betas):
                ema_update_ref(wt, params, b)
            return max(_max_err(m, wt) for m, wt in zip(mixed, want))

        label = "foreach_mul_ + foreach_add_ (bf16 operand)" if k == 1 else f"{k}x foreach_mul_ + add_"
        run_checked(rows, timer, name, label, foreach_mul_add, check_mul_add, 1e-5, numel * elem_bytes)

    if with_copy:
        src = torch.empty(numel, dtype=dtype, device=device).normal_()
        dst = torch.empty_like(src)

        def check_copy() -> float:
            dst.copy_(src)
            return 0.0 if torch.equal(dst, src) else float("inf")

        run_checked(rows, timer, name, "device copy (same param bytes)", lambda: dst.copy_(src), check_copy, 0.0,
                   2 * numel * src.element_size())


def _ratio(rows: list[dict], case: str, num: str, den: str, key: str = "ms") -> float | None:
    a = next((r for r in rows if r["case"] == case and r["provider"].startswith(num) and key in r), None)
    b = next((r for r in rows if r["case"] == case and r["provider"].startswith(den) and key in r), None)
    if a is None or b is None:
        return None
    return a[key] / b[key]


def _goals(rows: list[dict]) -> list[dict]:
    speed_fp32 = _ratio(rows, "fp32-K1", "foreach_lerp_", "ours")
    bw = _ratio(rows, "fp32-K1", "ours", "device copy", key="gb_per_s")
    speed_bf16 = _ratio(rows, "bf16-K1", "foreach_lerp_ + .float()", "ours")
    speed_k2 = _ratio(rows, "fp32-K2", "2x foreach", "ours")
    speed_k2_bf16 = _ratio(rows, "bf16-K2", "upcast + 2x", "ours")
    out = []
    for name, value, target in (
        ("fp32 EMA speed vs foreach_lerp_", speed_fp32, 0.95),
        ("fp32 EMA bandwidth / copy bandwidth", bw, 0.85),
        ("bf16->fp32 EMA speed vs foreach_lerp_ with upcast", speed_bf16, 2.5),
        # bytes moved bound this at 24/20 = 1.2x for fp32 params (30/18 = 1.67x for bf16 params)
        ("two profiles one pass vs two foreach_lerp_ (fp32 params)", speed_k2, 1.6),
        ("two profiles one pass vs upcast + two foreach_lerp_ (bf16 params)", speed_k2_bf16, 1.6),
    ):
        out.append({"goal": name, "value": value, "target": target, "met": value is not None and value >= target})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 blocks (≈0.4 B params) instead of 30 (≈1.4 B)")
    parser.add_argument("--tiny", action="store_true", help="2 blocks of a 64-wide model: smoke test only")
    parser.add_argument("--out", default=None, help="directory for the JSON result (e.g. bench/results)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per provider (ms)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_ema: no CUDA device (use --device cpu --tiny for a smoke run)")
    t_start = time.time()
    blocks = 2 if args.tiny else 8 if args.quick else 30
    shapes = wan_like_shapes(blocks, dim=64, ffn=160, text_dim=96) if args.tiny else wan_like_shapes(blocks)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    rows: list[dict] = []
    timer = make_timer(device, args.rep_ms)
    cases = [("fp32-K1", torch.float32, 1), ("bf16-K1", torch.bfloat16, 1), ("fp32-K2", torch.float32, 2),
             ("bf16-K2", torch.bfloat16, 2)]
    for name, dtype, k in cases:
        _case_single(rows, timer, name, shapes, dtype, device, k, with_copy=name == "fp32-K1")
        gc.collect()  # free this case's parameters and EMA copies before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for case in sorted({r["case"] for r in rows}):
        base = next((r for r in rows if r["case"] == case and "ms" in r and not r["provider"].startswith("ours")), None)
        for r in rows:
            if r["case"] == case and "ms" in r and base is not None:
                r["baseline"] = base["provider"]
                r["speedup_vs_baseline"] = base["ms"] / r["ms"]
    goals = _goals(rows)
    result = {"meta": run_meta(device, argv), "n_params": n_params,
              "n_tensors": len(shapes), "rows": rows, "goals": goals, "wall_s": time.time() - t_start}
    print(f"EMA benchmark: {n_params / 1e9:.3f} B params in {len(shapes)} tensors on {result['meta']['gpu']}")
    print(f"{'case':9} {'provider':46} {'ms':>9} {'p20':>9} {'p80':>9} {'GB/s':>8} {'speedup':>8}  note")
    for r in rows:
        if "ms" in r:
            print(f"{r['case']:9} {r['provider']:46} {r['ms']:9.3f} {r['p20_ms']:9.3f} {r['p80_ms']:9.3f} "
                  f"{r['gb_per_s']:8.1f} {r.get('speedup_vs_baseline', float('nan')):8.2f}  max_err={r['max_err']:.2g}")
        else:
            print(f"{r['case']:9} {r['provider']:46} {'failed':>9}  {r['error']}")
    finish(result, args.out, result_name("ema", device_label(device)))
    return result


if __name__ == "__main__":
    main()
