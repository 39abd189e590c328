"""Benchmark the Triton attention kernels (forward, forward+JVP, backward) against PyTorch and flash-attn.

One run times, side by side on the same inputs:
  fwd      ours (`kernels.attention`) vs SDPA flash / cuDNN / memory-efficient backends, and flash-attn's own
           kernels where installed: FA2 (`flash_attn.flash_attn_func`) and FA3 (`flash_attn_interface`, Hopper)
  fwd+jvp  ours (`attention_jvp`, `kernels/attention/fwd_jvp.py`, one fused pass), ours through `torch.func.jvp` (same
           kernel), ours through the autograd.Function fallback (forward kernel + fused kernel), vs
           `torch.func.jvp` over SDPA's math backend (only where the Nq×Nk scores fit) and the
           `jvp_flash_attention` package (if importable); and the fused kernel restricted to its plain
           or to its software-pipelined KV-loop configs ("plain loop", "pipelined loop"; each
           autotuned within its own configs), so both loops are compared in the same run
  bwd      ours (default: the Triton backward), ours with PyTorch's flash backward fed with our O
           and LSE ("ours (flash bwd)", VDISTILL_ATTN_BWD=auto), ours with dQ added by atomics in the dK/dV
           kernel ("ours (atomic dQ)", VDISTILL_ATTN_DQ=atomic), vs the three SDPA backends and FA2 / FA3
           (backward only: the forward graph is built once)
Rows: ms (median, p20, p80), TFLOP/s from 4·B·H·Nq·Nk·D (fwd), 12·… (fwd+jvp), 10·… (bwd), peak extra
memory (max_memory_allocated over the call minus before). Every provider is checked against an fp32
reference (chunked over query rows, so it fits at 32k tokens) before it is timed; failures are recorded,
never fatal; a provider that is not installed is recorded as skipped, with the reason. Inputs are
transposed views of [B, N, H, D] tensors (the DiT's layout), bf16 by default.

Timing: all providers of one op are timed in --rounds interleaved rounds (each round times every provider
once with a short `triton.testing.do_bench`, the order rotating), so clock or thermal drift biases none of
them; ms is the median of the round medians, p20/p80 the medians of the rounds' p20/p80, `round_ms` the
round medians. --cuda-graphs (auto: shapes of at most GRAPH_SCORES score elements B·H·Nq·Nk, where the
host's op call costs as much as the kernel) times replays of a CUDA graph of GRAPH_CALLS back-to-back calls
instead (GPU time only; L2 is warm after the first call); each row's `timing` says which. --sweep times
every row of each kernel's autotune list (fwd.py FWD_CONFIGS, fwd_jvp.py JVP_CONFIGS, bwd.py DKDV_CONFIGS /
DQ_CONFIGS, the atomic-dQ dK/dV kernel's DKDV_DQ_CONFIGS) pinned alone, through its op (bwd rows: the whole
backward, the other kernel tuned).
--autotune-rep sets the autotuner's per-config benchmark time (Triton's default: 100 ms).

    python -m vdistill.bench.bench_attention [--quick] [--out bench/results] [--dtype bf16|fp16]
        [--rounds 5] [--cuda-graphs auto|on|off] [--autotune-rep MS] [--sweep]

Budget on an H200 (before rounds, flash-attn and the sweep): full run (4 shapes, autotuning included)
~150 s; --quick (Wan 480p shape, no autotuning) ~60 s. CPU smoke test of the script's logic:
`TRITON_INTERPRET=1 python -m vdistill.bench.bench_attention --device cpu --tiny`.
Metadata, timing primitives and JSON output come from `bench/harness.py`.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vdistill.bench.attention_tuning import autotune_rep, best_configs, loop_state, sweep_kernels
from vdistill.bench.harness import (
    Timing,
    capture_graph,
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
GRAPH_SCORES = 2**28  # --cuda-graphs auto: graphs up to this B·H·Nq·Nk (4k-d128 and the cross shape; ≲ 0.3 ms)
GRAPH_CALLS = 10  # op calls captured back to back in one graph (one replay)
FLASH = {"flash-attn2": "flash_attn", "flash-attn3": "flash_attn_interface"}  # provider: module with flash_attn_func

Provider = tuple[Callable[[], object], Callable[[], float]]  # (the timed call, its check: relative error)
Spec = Provider | str | Exception  # a provider, the reason it is skipped, or the error that stopped it


def aggregate_rounds(samples: list[Timing]) -> dict:
    """Per-round (median, p20, p80) -> ms: median of the round medians; p20_ms / p80_ms: medians of the
    rounds' p20 / p80 (the spread of single calls); round_ms: the round medians (drift shows there)."""
    med = statistics.median
    return {"ms": med(s[0] for s in samples), "p20_ms": med(s[1] for s in samples),
            "p80_ms": med(s[2] for s in samples), "round_ms": [s[0] for s in samples]}


def interleave(units: dict[str, Callable[[], Timing]], rounds: int) -> dict[str, dict]:
    """Time every provider once per round (units[name]() -> that round's Timing), round r starting at the r-th
    provider, then aggregate each (`aggregate_rounds`). A provider whose round raises drops out: {"error": ...}."""
    names, samples, errors = list(units), {name: [] for name in units}, {}
    for r in range(rounds):
        start = r % max(len(names), 1)
        for name in names[start:] + names[:start]:
            if name in errors:
                continue
            try:
                samples[name].append(units[name]())
            except Exception as exc:  # noqa: BLE001 - recorded; the others go on
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return {name: {"error": errors[name]} if name in errors else aggregate_rounds(samples[name]) for name in names}


def _round_plan(one_ms: float, rep_ms: float, rounds: int) -> tuple[float, float]:
    """(warmup, rep) in ms of one round: the provider's budget (rep_ms grown to >= 12 calls so p20/p80 stay
    meaningful at 32k tokens, capped at 1.5 s) split over the rounds, at least 3 calls a round."""
    rep = max(min(max(rep_ms, 12 * one_ms), 1500) / rounds, 3 * one_ms)
    return max(1.0, rep / 4), rep


def _one_call_ms(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


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
    """Checks, times (interleaved rounds) and records providers; one provider's failure never stops the run."""

    def __init__(self, device: torch.device, rep_ms: int, rounds: int = 5):
        self.device, self.rep_ms, self.rounds = device, rep_ms, max(1, rounds)
        self.rows: list[dict] = []
        self.sweep_rows: list[dict] = []
        # the stream graphs are captured on; bwd providers build their forward on it (backward ops run on the
        # forward's stream, so that is the only way their backward can be captured)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def op(self, shape: str, dims, op: str, providers: dict[str, Spec], graphs: bool = False,
           rows: list[dict] | None = None, extra: dict | None = None) -> list[dict]:
        """Check every provider (its first call also compiles / autotunes), then time those that pass in
        interleaved rounds. In place of (fn, check): a str is the reason it is skipped, an exception its error.
        Returns the new rows."""
        B, H, Nq, Nk, D = dims
        rows = self.rows if rows is None else rows
        new, live = [], {}
        for prov, spec in providers.items():
            row = {"shape": shape, "B": B, "H": H, "Nq": Nq, "Nk": Nk, "D": D, "op": op, "provider": prov,
                   **(extra or {})}
            new.append(row)
            if isinstance(spec, str):
                row["skipped"] = spec
                continue
            if isinstance(spec, Exception):
                self._fail(row, spec)
                continue
            fn, check = spec
            try:
                t0 = time.perf_counter()
                row["rel_err"] = check()
                row["first_call_s"] = time.perf_counter() - t0
                if not row["rel_err"] <= TOL:
                    raise AssertionError(f"relative error {row['rel_err']:.3g} > {TOL}")
                live[prov] = fn
            except Exception as exc:  # noqa: BLE001 - recorded; the other providers still run
                self._fail(row, exc)
        by_name = {r["provider"]: r for r in new}
        units = {}
        for prov, fn in live.items():
            try:
                units[prov] = self._unit(fn, by_name[prov], graphs)
            except Exception as exc:  # noqa: BLE001
                self._fail(by_name[prov], exc)
        for prov, res in interleave(units, self.rounds).items():
            row = by_name[prov]
            row.update(res)
            if "error" in res:
                continue
            row["tflops"] = FLOPS[op] * B * H * Nq * Nk * D / res["ms"] / 1e9
            try:
                row["peak_extra_mb"] = _peak_extra_mb(live[prov], self.device)
            except Exception as exc:  # noqa: BLE001
                row["peak_extra_mb"] = None
                row["peak_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        units.clear()  # frees the graphs' memory pools
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        rows.extend(new)
        return new

    def _fail(self, row: dict, exc: Exception) -> None:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _unit(self, fn: Callable[[], object], row: dict, graphs: bool) -> Callable[[], Timing]:
        """One round's timing of fn: a short do_bench of fn, or of a CUDA graph's replay (per call)."""
        if self.device.type != "cuda":
            row["timing"] = "wall-clock"
            return lambda: cpu_bench_ms(fn, runs=1, warmup=0)
        call, calls = fn, 1
        row["timing"] = "do_bench"
        if graphs:
            try:
                call, calls = capture_graph(fn, GRAPH_CALLS, self.stream, warmup_calls=2), GRAPH_CALLS
                row["timing"], row["graph_calls"] = "cuda-graph", calls
            except Exception as exc:  # noqa: BLE001 - not capturable: say why, time plain calls
                row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                torch.cuda.synchronize()
        warmup, rep = _round_plan(_one_call_ms(call), self.rep_ms, self.rounds)
        return lambda: tuple(t / calls for t in do_bench_ms(call, warmup, rep))


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return fn


def _flash_wrapper(flash_attn_func: Callable) -> Callable[..., torch.Tensor]:
    """attention(q, k, v, scale) on [B, H, N, D] through a flash-attn `flash_attn_func`, which takes and returns
    [B, N, H, D] (our inputs are transposed views of such tensors: no copy). FA3 returns (out, lse) in some
    versions, out alone in others."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        res = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                              causal=False)
        out = res[0] if isinstance(res, (tuple, list)) else res
        return out.transpose(1, 2)

    return attend


def flash_providers(dtype: torch.dtype | None = None, head_dim: int | None = None) -> dict[str, Callable | str]:
    """FA2 / FA3 as `_flash_wrapper`s where importable and usable for dtype / head_dim (fp16, bf16; D <= 256),
    else the reason they are skipped."""
    out: dict[str, Callable | str] = {}
    for name, module in FLASH.items():
        try:
            func = importlib.import_module(module).flash_attn_func
        except Exception as exc:  # noqa: BLE001 - not installed, or a build that does not load: skipped
            out[name] = f"{module}.flash_attn_func not importable ({type(exc).__name__}: {str(exc)[:120]})"
            continue
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            out[name] = f"fp16/bf16 only, not {dtype}"
        elif head_dim is not None and head_dim > 256:
            out[name] = f"head dim <= 256 only, not {head_dim}"
        else:
            out[name] = _flash_wrapper(func)
    return out


def _function_jvp(q, k, v, tq, tk, tv, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback forward-AD path (forward kernel, then AttentionForwardADFunction.jvp's fused kernel),
    timed to justify routing plain forward AD to the one-pass kernel instead."""
    import torch.autograd.forward_ad as fwAD

    from vdistill.kernels.attention.ops import AttentionForwardADFunction

    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in ((q, tq), (k, tk), (v, tv))]
        out = fwAD.unpack_dual(AttentionForwardADFunction.apply(*duals, scale)[0])
        return out.primal, out.tangent


def _with(settings: dict[str, str], fn: Callable[[], object]):
    """fn() with run-time switches of kernels/attention set, e.g. {"bwd_select.BACKEND": "auto"} (the flash
    backward), {"bwd.DQ_MODE": "atomic"}; restored afterwards."""
    saved = []
    try:
        for setting, value in settings.items():
            module, attr = setting.split(".")
            mod = importlib.import_module(f"vdistill.kernels.attention.{module}")
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, value)
        return fn()
    finally:
        for mod, attr, old in reversed(saved):
            setattr(mod, attr, old)


def bench_shape(runner: Runner, name: str, dims, dtype: torch.dtype, device: torch.device, graphs: bool = False,
                sweep: bool = False) -> None:
    from torch.nn.attention import SDPBackend

    from vdistill.kernels.attention import attention, attention_jvp

    B, H, Nq, Nk, D = dims
    scale = D**-0.5
    g = torch.Generator(device=device).manual_seed(0)
    make = lambda n: torch.randn(B, n, H, D, device=device, generator=g).to(dtype).transpose(1, 2)
    q, k, v, tq, tk, tv, do = make(Nq), make(Nk), make(Nk), make(Nq), make(Nk), make(Nk), make(Nq)
    ref = reference(q, k, v, tq, tk, tv, do, scale)
    run = lambda op, providers, **kw: runner.op(name, dims, op, providers, graphs, **kw)
    check_o = lambda fn: (fn, lambda: _err((fn(),), (ref["o"],)))
    check_jvp = lambda fn: (fn, lambda: _err(fn(), (ref["o"], ref["t_o"])))
    check_grads = lambda fn: (fn, lambda: _err(fn(), (ref["dq"], ref["dk"], ref["dv"])))
    sdpa = {"sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
            "sdpa-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION)}
    flash = flash_providers(dtype, D)
    with_scale = lambda f: (lambda q, k, v: f(q, k, v, scale))

    with torch.no_grad():
        fwd = {"ours": check_o(lambda: attention(q, k, v))}
        fwd.update({prov: check_o(lambda f=f: f(q, k, v)) for prov, f in sdpa.items()})
        fwd.update({prov: f if isinstance(f, str) else check_o(lambda f=f: f(q, k, v, scale))
                    for prov, f in flash.items()})
        run("fwd", fwd)

        fused = lambda: attention_jvp(q, k, v, tq, tk, tv)
        jvps = {
            "ours (attention_jvp)": check_jvp(fused),
            "ours (torch.func.jvp)": check_jvp(lambda: torch.func.jvp(attention, (q, k, v), (tq, tk, tv))),
            "ours (Function fwd + jvp)": check_jvp(lambda: _function_jvp(q, k, v, tq, tk, tv, scale)),
        }
        if B * H * Nq * Nk * 4 <= MATH_SCORE_BYTES:
            math = _sdpa(SDPBackend.MATH)
            jvps["torch.func.jvp(sdpa-math)"] = check_jvp(lambda: torch.func.jvp(math, (q, k, v), (tq, tk, tv)))
        else:
            jvps["torch.func.jvp(sdpa-math)"] = f"one fp32 Nq×Nk score tensor is {B * H * Nq * Nk * 4 / 1e9:.0f} GB"
        try:
            from jvp_flash_attention.jvp_attention import attention as jvp_fa

            jvps["jvp_flash_attention"] = check_jvp(lambda: torch.func.jvp(jvp_fa, (q, k, v), (tq, tk, tv)))
        except ImportError as exc:
            jvps["jvp_flash_attention"] = f"not importable ({exc})"
        for prov, pipelined in (("ours (plain loop)", False), ("ours (pipelined loop)", True)):
            state = loop_state(pipelined)
            jvps[prov] = check_jvp(lambda s=state: s.call(fused))
        run("fwd+jvp", jvps)

        if sweep:
            sweep_kernels(runner, name, dims, graphs, {"fwd": fwd["ours"], "fwd_jvp": jvps["ours (attention_jvp)"]})

    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    # with graphs, each forward is built on the capture stream: the backward's ops run on their forward's stream
    side = runner.stream if graphs else None

    def backward(f: Callable, settings: dict[str, str] | None = None) -> Provider | Exception:
        """(dQ, dK, dV) of the graph of one f(q, k, v) built here (under `_with(settings)`), checked; the
        exception if f fails."""
        try:
            if side is None:
                out = f(*inputs)
            else:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = f(*inputs)
                torch.cuda.current_stream().wait_stream(side)
        except Exception as exc:  # noqa: BLE001 - e.g. a backend that does not take this shape
            return exc
        fn = lambda: torch.autograd.grad(out, inputs, do, retain_graph=True)
        return check_grads(fn if settings is None else lambda: _with(settings, fn))

    triton_bwd, atomic = {"bwd_select.BACKEND": "triton"}, {"bwd_select.BACKEND": "triton", "bwd.DQ_MODE": "atomic"}
    bwd = {"ours": backward(attention), "ours (flash bwd)": backward(attention, {"bwd_select.BACKEND": "auto"}),
           "ours (atomic dQ)": backward(attention, atomic)}
    bwd.update({prov: backward(f) for prov, f in sdpa.items()})
    bwd.update({prov: f if isinstance(f, str) else backward(with_scale(f)) for prov, f in flash.items()})
    run("bwd", bwd)
    bwd.clear()  # frees the forward graphs
    if sweep:
        separate = backward(attention, triton_bwd)
        sweep_kernels(runner, name, dims, graphs,
                      {"bwd_dkdv": separate, "bwd_dq": separate, "bwd_dkdv_dq": backward(attention, atomic)})


def _print_table(rows: list[dict], sweep: bool = False) -> None:
    width = 52 if sweep else 28
    first = "kernel config" if sweep else "provider"
    print(f"{'shape':<18} {'op':<8} {first:<{width}} {'ms':>9} {'p20':>9} {'p80':>9} {'TFLOP/s':>8} {'MiB':>8}  note")
    for r in rows:
        label = f"{r['kernel']} {r['provider']}" if sweep else r["provider"]
        head = f"{r['shape']:<18} {r['op']:<8} {label:<{width}}"
        if "ms" in r:
            mem = "-" if r.get("peak_extra_mb") is None else f"{r['peak_extra_mb']:.0f}"
            graph = " (graph)" if r.get("timing") == "cuda-graph" else ""
            print(f"{head} {r['ms']:>9.3f} {r['p20_ms']:>9.3f} {r['p80_ms']:>9.3f} {r['tflops']:>8.1f} {mem:>8}  "
                  f"err {r['rel_err']:.1e}{graph}")
        else:
            print(f"{head} {'skipped' if 'skipped' in r else 'failed':>9}  {r.get('skipped', r.get('error', ''))[:90]}")


def _summary(rows: list[dict]) -> dict:
    """Goal ratios per shape: fwd+jvp / cuDNN fwd, ours fwd / flash fwd, ours bwd / flash bwd, atomic / separate
    dQ bwd, pipelined / plain loop fwd+jvp, ours / FA3 (fwd, bwd)."""
    ms = {(r["shape"], r["op"], r["provider"]): r["ms"] for r in rows if "ms" in r}
    out = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        get = lambda op, prov, shape=shape: ms.get((shape, op, prov))
        pairs = {"fwd+jvp / sdpa-cudnn fwd": (get("fwd+jvp", "ours (attention_jvp)"), get("fwd", "sdpa-cudnn")),
                 "ours fwd / sdpa-flash fwd": (get("fwd", "ours"), get("fwd", "sdpa-flash")),
                 "ours bwd / sdpa-flash bwd": (get("bwd", "ours"), get("bwd", "sdpa-flash")),
                 "atomic dQ / ours bwd": (get("bwd", "ours (atomic dQ)"), get("bwd", "ours")),
                 "pipelined / plain loop fwd+jvp": (get("fwd+jvp", "ours (pipelined loop)"),
                                                    get("fwd+jvp", "ours (plain loop)")),
                 "ours fwd / flash-attn3 fwd": (get("fwd", "ours"), get("fwd", "flash-attn3")),
                 "ours bwd / flash-attn3 bwd": (get("bwd", "ours"), get("bwd", "flash-attn3"))}
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
    p.add_argument("--rep-ms", type=int, default=60,
                   help="do_bench time per provider in ms, split over the rounds (default 60)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved timing rounds: each times every provider of an op once (default 5)")
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help=f"time CUDA-graph replays of {GRAPH_CALLS} calls (no host overhead); auto (default): "
                        f"shapes with B·H·Nq·Nk <= 2^{GRAPH_SCORES.bit_length() - 1}")
    p.add_argument("--autotune-rep", type=float, metavar="MS",
                   help="autotuner benchmark time per config in ms (default: Triton's, 100)")
    p.add_argument("--sweep", action="store_true",
                   help="also time every autotune config of each kernel pinned alone (table + JSON 'sweep')")
    p.add_argument("--no-autotune", action="store_true", help="use each kernel's first config (no autotuning)")
    p.add_argument("--out", default="bench/results", help="directory for the JSON result file")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.autotune_rep is not None and not 0 < args.autotune_rep < math.inf:
        p.error(f"--autotune-rep must be a finite number of ms > 0, got {args.autotune_rep}")
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
    runner = Runner(device, args.rep_ms, args.rounds)
    graph_shapes = []
    with autotune_rep(args.autotune_rep):
        for name, dims in shapes.items():
            B, H, Nq, Nk, _ = dims
            graphs = device.type == "cuda" and (args.cuda_graphs == "on" or (
                args.cuda_graphs == "auto" and B * H * Nq * Nk <= GRAPH_SCORES))
            if graphs:
                graph_shapes.append(name)
            bench_shape(runner, name, dims, dtype, device, graphs, args.sweep)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = {**run_meta(device, argv), "dtype": str(dtype),
              "autotune": os.environ.get("VDISTILL_ATTN_AUTOTUNE", "1") != "0", "autotune_rep_ms": args.autotune_rep,
              "rounds": runner.rounds, "cuda_graphs": args.cuda_graphs, "graph_shapes": graph_shapes,
              "rows": runner.rows, "sweep": runner.sweep_rows,
              "summary": _summary(runner.rows), "best_configs": best_configs(),
              "flash_bwd_state": dict(importlib.import_module("vdistill.kernels.attention.bwd_select")._flash_state),
              "wall_s": time.perf_counter() - t0}
    _print_table(runner.rows)
    if runner.sweep_rows:
        print("\nper-config sweep (each config pinned alone; bwd rows time the whole backward)")
        _print_table(runner.sweep_rows, sweep=True)
    for shape, ratios in result["summary"].items():
        print(shape, "  ".join(f"{k}: {'-' if v is None else f'{v:.2f}x'}" for k, v in ratios.items()))
    print(f"wall {result['wall_s']:.1f} s")
    write_json(args.out, result_name("attention", device_label(device)), result,
               indent=1)
    return result


if __name__ == "__main__":
    main()
