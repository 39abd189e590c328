"""Shared benchmark harness: run metadata, `do_bench` timing (median, p20, p80), checked providers, JSON.

Every `bench/bench_*.py` script records the same metadata (GPU, date, commit, torch/Triton
versions, argv), times with `triton.testing.do_bench` on CUDA (median with p20/p80 from its
quantiles; on CPU a few wall-clock runs, for smoke tests only), checks each provider before timing
it, records a provider's failure in its row instead of crashing, and writes one JSON per run.

The commit comes from `git rev-parse HEAD`; where that fails (the device machine receives the
tree without `.git`) it falls back to the `VDISTILL_COMMIT` environment variable, else "unknown".
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

Timing = tuple[float, float, float]  # (median, p20, p80) in ms
Timer = Callable[[Callable[[], object]], Timing]


def git_commit() -> str:
    """HEAD's commit hash, else `$VDISTILL_COMMIT`, else "unknown"."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        if proc.stdout.strip():
            return proc.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("VDISTILL_COMMIT") or "unknown"


def run_meta(device: torch.device, argv: list[str] | None) -> dict:
    """GPU name ("cpu" off CUDA), UTC date, commit, torch and Triton versions, and the argv (sys.argv[1:] if None)."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "argv": list(sys.argv[1:] if argv is None else argv),
    }


def do_bench_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> Timing:
    """`triton.testing.do_bench` of fn on the current CUDA device: (median, p20, p80) in ms."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def capture_graph(fn: Callable[[], object], calls: int, stream: torch.cuda.Stream | None = None,
                  warmup_calls: int = 3) -> Callable[[], None]:
    """The replay of a CUDA graph of `calls` back-to-back fn() calls, captured on `stream` (a new side stream if
    None) after `warmup_calls` calls there (compiles, allocations). fn must not synchronise with the host.
    The returned bound method keeps the graph (and its memory pool) alive."""
    side = torch.cuda.Stream() if stream is None else stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    return graph.replay


def graph_bench_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float, calls: int = 20) -> Timing:
    """fn timed by replaying a CUDA graph of `calls` back-to-back calls: per-call (median, p20, p80) in ms
    of GPU time alone. Plain `do_bench` of a ~30 µs kernel behind Python argument checks times the host
    (the GPU idles between calls); the graph removes host work for every provider alike."""
    med, p20, p80 = do_bench_ms(capture_graph(fn, calls), warmup_ms, rep_ms)
    return med / calls, p20 / calls, p80 / calls


def _graph_or_plain(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> Timing:
    try:
        return graph_bench_ms(fn, warmup_ms, rep_ms)
    except RuntimeError as exc:  # not capturable: say so, time plain calls
        print(f"warning: CUDA-graph capture failed ({str(exc)[:120]}); timing plain calls", flush=True)
        return do_bench_ms(fn, warmup_ms, rep_ms)


def cpu_bench_ms(fn: Callable[[], object], runs: int = 3, warmup: int = 1) -> Timing:
    """Wall-clock (median, min, max) in ms over `runs` calls after `warmup` calls (CPU smoke runs only)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def make_timer(device: torch.device, rep_ms: int, graphs: bool = False) -> Timer:
    """A timer for `device`: do_bench with `rep_ms` (warm-up rep_ms/4, at least 5 ms) on CUDA, of CUDA-graph
    replays with `graphs` (`graph_bench_ms`), else `cpu_bench_ms`."""
    if device.type == "cuda":
        bench = _graph_or_plain if graphs else do_bench_ms
        return lambda fn: bench(fn, max(5, rep_ms // 4), rep_ms)
    return cpu_bench_ms


def run_checked(rows: list[dict], timer: Timer, case: str, provider: str, fn: Callable[[], object],
                check: Callable[[], float], tol: float, nbytes: float) -> dict | None:
    """Check one provider (max error <= tol), then time it; append its row and return it (None on failure).

    Row keys: case, provider, bytes, max_err, ms, p20_ms, p80_ms, gb_per_s (nbytes / ms), or error.
    """
    row: dict = {"case": case, "provider": provider, "bytes": nbytes}
    try:
        err = check()
        row["max_err"] = err
        if not err <= tol:
            raise AssertionError(f"max error {err:.3g} > tolerance {tol:.3g}")
        med, p20, p80 = timer(fn)
        row.update(ms=med, p20_ms=p20, p80_ms=p80, gb_per_s=nbytes / med / 1e6)
    except Exception as exc:  # noqa: BLE001 - recorded, the other providers still run
        row["error"] = f"{type(exc).__name__}: {exc}"
    rows.append(row)
    return row if "ms" in row else None


def finish(result: dict, out_dir: str | Path | None, filename: str) -> None:
    """Print result["goals"] (goal, value, target, met) and result["wall_s"]; write the JSON if out_dir is set."""
    for g in result["goals"]:
        value = "n/a" if g["value"] is None else f"{g['value']:.2f}"
        print(f"goal: {g['goal']}: {value} (target >= {g['target']}) {'MET' if g['met'] else 'NOT MET'}")
    print(f"wall time {result['wall_s']:.1f} s")
    if out_dir:
        write_json(out_dir, filename, result)


def result_name(what: str, where: str) -> str:
    """Result file name `<what>_<where>_<YYYYMMDDTHHMMSSZ>.json` (bench/results/README.md's scheme): `what` the
    benchmark in hyphenated words, `where` the machine (`H200`, `cpu`, `sm90`); see `device_label`."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{what}_{where.replace('_', '-').replace(' ', '-')}_{stamp}.json"


def device_label(device: torch.device | str) -> str:
    """`H200` for an "NVIDIA H200" (the GPU's name without its vendor), `cpu` for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).removeprefix("NVIDIA ").replace(" ", "-")


def write_json(out_dir: str | Path, filename: str, result: dict, indent: int = 2) -> Path:
    """Write result as JSON to out_dir/filename (directory created), print and return the path."""
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent))
    print(f"wrote {path}")
    return path
