"""One flow-matching training step of a preset's DiT (forward, backward, AdamW) per autocast precision.

Answers "is `--precision bf16` worth it on this machine?": on CPUs with AMX / AVX512-BF16 the
bf16 autocast step is about 2x faster than fp32; on AVX2-only CPUs bf16 is emulated, 11x slower. Both runs
use the same model, batch and inputs; the ratio is fp32 time / bf16 time from the same run.

    python bench/bench_train_step.py --preset shapes --batch-size 32 --device cpu --out bench/results
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.harness import cpu_bench_ms, do_bench_ms, finish, run_meta, utc_stamp
from methods.presets import RunConfig, preset
from methods.trainer import cpu_bf16_is_native
from models.dit import VideoDiT


def step_fn(run: RunConfig, model: VideoDiT, batch: int, precision: str, device: torch.device):
    """A closure running one training step on fixed random inputs shaped like the run's clips."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *run.data.clip_shape, generator=gen).to(device)
    time_ = torch.rand(batch, generator=gen).to(device)
    text = torch.randn(batch, run.text_max_len, run.model.text_dim, generator=gen).to(device)
    target = torch.randn(x.shape, generator=gen).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (model(x, time_, text).float() - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="shapes", help="run preset whose model and clip size to time")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per step")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--runs", type=int, default=3, help="timed steps per precision on CPU")
    parser.add_argument("--out", default=None, help="directory for the JSON result (e.g. bench/results)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.runs < 1:
        raise SystemExit(f"--batch-size and --runs must be >= 1, got {args.batch_size}, {args.runs}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train_step: no CUDA device (use --device cpu)")
    t_start = time.time()
    run = preset(args.preset)
    torch.manual_seed(0)
    model = VideoDiT(run.model).to(device)
    rows = []
    for precision in ("fp32", "bf16"):
        step = step_fn(run, model, args.batch_size, precision, device)
        med, p20, p80 = do_bench_ms(step, 50, 500) if device.type == "cuda" else cpu_bench_ms(step, args.runs)
        rows.append({"precision": precision, "ms": med, "p20_ms": p20, "p80_ms": p80,
                     "clips_per_s": args.batch_size / med * 1e3})
        print(f"{precision}: {med:.0f} ms/step, {rows[-1]['clips_per_s']:.1f} clips/s")
    speedup = rows[0]["ms"] / rows[1]["ms"]
    print(f"bf16 autocast speed-up: {speedup:.2f}x")
    result = {
        "meta": {**run_meta(device, argv), "threads": torch.get_num_threads(),
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "onednn_bf16": cpu_bf16_is_native()},
        "preset": args.preset, "batch_size": args.batch_size, "rows": rows,
        "goals": [{"goal": "bf16 step faster than fp32", "value": speedup, "target": 1.0, "met": speedup > 1.0}],
        "wall_s": time.time() - t_start,
    }
    finish(result, args.out, f"train_step_{device.type}_{utc_stamp('%Y%m%dT%H%M%S')}.json")
    return result


if __name__ == "__main__":
    main()
