"""Kill a training run with SIGKILL at random moments, resume it after each kill, and check that it ends exactly
where an uninterrupted run ends: the same exported weights (bit for bit) and the same logged losses.

    python scripts/kill_resume.py --kills 20 --out /tmp/kills --json bench/results/kill_resume_cpu_YYYYMMDD.json

Each kill lands at a uniformly random moment of a run's expected duration (measured on the uninterrupted run),
so some land during start-up, some mid-step and some during a checkpoint write (a checkpoint every 2 steps);
a kill that leaves a temporary file behind is counted as one inside a write. docs/reliability.md has figures.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vdistill.bench.harness import run_meta
from vdistill.methods.train.checkpoint import list_checkpoints
from vdistill.methods.train.logs import read_metrics

EXPORTS = ("model.safetensors", "model_ema.safetensors")


def _command(out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vdistill.methods.cli", "pretrain", "--preset", "tiny", "--out", str(out),
            "--set", f"train.steps={steps}", "--set", "train.ckpt_every=2", "--set", "train.log_every=1", *extra]


def _restart_flag(out: Path) -> tuple[str, ...]:
    """--resume once a checkpoint exists; before that the killed run's files are replaced (--overwrite)."""
    return ("--resume",) if list_checkpoints(out) else ("--overwrite",)


def _temporaries(out: Path) -> list[str]:
    return [p.name for folder in (out, out / "checkpoints") if folder.is_dir() for p in folder.glob(".*.tmp")]


def _same_run(a: Path, b: Path) -> bool:
    for name in EXPORTS:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    losses = [[(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r] for run in (a, b)]
    return losses[0] == losses[1]


def kill_and_resume(out: Path, kills: int, steps: int, seed: int = 0) -> dict:
    """The experiment above in folder `out`; returns its record (kills, where they landed, the outcome)."""
    rng = random.Random(seed)
    reference, cut = out / "reference", out / "killed"
    start = time.perf_counter()
    subprocess.run(_command(reference, steps, "--overwrite"), check=True, capture_output=True)
    duration = time.perf_counter() - start
    landed = []
    for _ in range(kills):
        flag = _restart_flag(cut) if cut.exists() else ()
        proc = subprocess.Popen(_command(cut, steps, *flag), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, duration))
        finished = proc.poll() is not None
        proc.kill()
        proc.wait()
        rows = read_metrics(cut) if (cut / "metrics.jsonl").exists() else []
        landed.append({"after_step": rows[-1]["step"] if rows else 0, "finished_first": finished,
                       "inside_a_write": bool(_temporaries(cut))})
    subprocess.run(_command(cut, steps, *_restart_flag(cut)), check=True, capture_output=True)
    return {
        "kills": kills, "steps": steps, "seed": seed, "reference_s": round(duration, 1),
        "landed_mid_run": sum(not k["finished_first"] for k in landed),
        "inside_a_write": sum(k["inside_a_write"] for k in landed),
        "identical": _same_run(reference, cut), "by_kill": landed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs, each followed by a resume")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the tiny preset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--out", type=Path, required=True, help="scratch folder for the two runs")
    parser.add_argument("--json", type=Path, help="write the record here")
    args = parser.parse_args(argv)
    record = kill_and_resume(args.out, args.kills, args.steps, args.seed)
    summary = {k: v for k, v in record.items() if k != "by_kill"}
    print(json.dumps(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**run_meta(torch.device("cpu"), argv), **record}, indent=1))
    return 0 if record["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
