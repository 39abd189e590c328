"""One flow-matching training step of a preset's DiT (forward, backward, AdamW) per autocast precision.

Answers "is `--precision bf16` worth it on this machine?": faster on CPUs with AMX / AVX512-BF16, much
slower on AVX2-only CPUs, where bf16 is emulated (measured: docs/results/training-step.md). Both runs
use the same model, batch and inputs; the ratio is fp32 time / bf16 time from the same run.
`--activation-checkpointing` also times each precision with every DiT block recomputed in the backward,
and every row records the activation memory its forward keeps for the backward (`saved_mib`: the
storages the autograd graph saves plus the block inputs a recomputation starts from, each counted once)
and, on CUDA, the peak allocated memory.

    python -m vdistill.bench.bench_train_step --preset shapes --batch-size 32 --device cpu --out bench/results
    python -m vdistill.bench.bench_train_step --precisions fp32 --activation-checkpointing --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch

from vdistill.bench.harness import cpu_bench_ms, device_label, do_bench_ms, finish, result_name, run_meta
from vdistill.methods.train.presets import RunConfig, preset
from vdistill.methods.train.trainer import cpu_bf16_is_native
from vdistill.models.dit import VideoDiT


def fixed_inputs(run: RunConfig, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x, time, text, target): seeded random inputs shaped like the run's clips."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *run.data.clip_shape, generator=gen).to(device)
    time_ = torch.rand(batch, generator=gen).to(device)
    text = torch.randn(batch, run.text_max_len, run.model.text_dim, generator=gen).to(device)
    return x, time_, text, torch.randn(x.shape, generator=gen).to(device)


def step_fn(run: RunConfig, model: VideoDiT, batch: int, precision: str, device: torch.device):
    """A closure running one training step on `fixed_inputs`."""
    x, time_, text, target = fixed_inputs(run, batch, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = (model(x, time_, text).float() - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def saved_mib(model: VideoDiT, run: RunConfig, batch: int, precision: str, device: torch.device) -> float:
    """MiB of distinct storages one forward keeps for the backward: what the autograd graph saves, and the
    inputs of every block (all a checkpointed block keeps)."""
    x, time_, text, _ = fixed_inputs(run, batch, device)
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def keep_inputs(block, args) -> None:
        for arg in args:
            for t in arg if isinstance(arg, tuple) else (arg,):
                keep(t)

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    hooks = [block.register_forward_pre_hook(keep_inputs) for block in model.blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x, time_, text).float().square().mean()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(n for ptr, n in storages.items() if ptr not in params) / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="shapes", help="run preset whose model and clip size to time")
    parser.add_argument("--batch-size", type=int, default=32, help="clips per step")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--runs", type=int, default=3, help="timed steps per precision on CPU")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="autocast precisions to time (bf16 is slow on AVX2-only CPUs)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="also time each precision with the DiT blocks recomputed in the backward")
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
    for precision in args.precisions:
        for recompute in (False, True) if args.activation_checkpointing else (False,):
            model.checkpoint_blocks = recompute
            step = step_fn(run, model, args.batch_size, precision, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            med, p20, p80 = do_bench_ms(step, 50, 500) if device.type == "cuda" else cpu_bench_ms(step, args.runs)
            row = {"precision": precision, "recompute": recompute, "ms": med, "p20_ms": p20, "p80_ms": p80,
                   "clips_per_s": args.batch_size / med * 1e3,
                   "saved_mib": saved_mib(model, run, args.batch_size, precision, device)}
            if device.type == "cuda":
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            rows.append(row)
            print(f"{precision}{' recompute' if recompute else ''}: {med:.0f} ms/step, "
                  f"{row['clips_per_s']:.1f} clips/s, {row['saved_mib']:.0f} MiB kept for the backward")
    goals = []
    plain = {r["precision"]: r for r in rows if not r["recompute"]}
    if len(plain) == 2:
        speedup = plain["fp32"]["ms"] / plain["bf16"]["ms"]
        print(f"bf16 autocast speed-up: {speedup:.2f}x")
        goals.append({"goal": "bf16 step faster than fp32", "value": speedup, "target": 1.0, "met": speedup > 1.0})
    result = {
        "meta": {**run_meta(device, argv), "threads": torch.get_num_threads(),
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "onednn_bf16": cpu_bf16_is_native()},
        "preset": args.preset, "batch_size": args.batch_size, "rows": rows,
        "goals": goals,
        "wall_s": time.time() - t_start,
    }
    finish(result, args.out, result_name("train-step", device_label(device)))
    return result


if __name__ == "__main__":
    main()
