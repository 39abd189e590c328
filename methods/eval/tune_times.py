"""`vdistill tune-times`: choose a consistency student's intermediate sampling times on a tuning seed.

Multistep consistency sampling jumps to the data, re-noises to an intermediate time and jumps
again; where those times sit moves few-step accuracy by several points, and the best place
depends on the student (a sharper 1-step student wants a lower middle time). For each step count
n the sweep scores the grids `consistency_times(n, shift)` (the first n points of the shifted RF
grid; at n = 2 the middle time is shift / (1 + shift)) on `num` clips drawn from the tuning seed,
picks the most accurate grid (ties: the lower FD), and writes a copy of the export whose sampler
stores the chosen times, which `vdistill sample/evaluate` then use by default. The choice is
made on the tuning seed; report the tuned copy with `vdistill evaluate` on another seed (its
default, 0), since the best of several noisy scores is biased upwards on the seed it was picked on.

    vdistill tune-times --model runs/cd/student_ema.safetensors --out runs/cd/student_tuned.safetensors
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vdistill.methods.eval.evaluate import evaluate_model
from vdistill.methods.sampling.generate import ModelBundle
from vdistill.methods.sampling.media import save_figure
from vdistill.methods.sampling.samplers import consistency_times
from vdistill.methods.train.checkpoint import save_weights

TUNING_SEED = 1  # `vdistill evaluate` reports on seed 0 by default
DEFAULT_SHIFTS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # 2-step middle times 0.2 ... 0.8
HEADER_KEYS = ("format", "version", "config")  # written by save_weights itself


def check_tuning_args(bundle: ModelBundle, steps: Sequence[int], shifts: Sequence[float], num: int) -> None:
    """ValueError naming the argument if the sweep cannot run on `bundle`."""
    kind = bundle.meta.get("sampler", {"kind": "ode"})["kind"]
    if kind != "consistency":
        raise ValueError(
            f"--model samples with the {kind!r} sampler; tune-times tunes consistency students "
            "(for ODE models pick a grid shift with `vdistill evaluate --shift`)"
        )
    if not steps or min(steps) < 2:
        raise ValueError(f"--steps must be step counts >= 2 (1 step has no intermediate time), got {list(steps)}")
    if not shifts or min(shifts) <= 0:
        raise ValueError(f"--shifts must be positive grid shifts, got {list(shifts)}")
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")


def best_rows(rows: list[dict]) -> dict[int, dict]:
    """{n: the row with the highest all-attribute accuracy at n steps (ties: the lower FD)}."""
    best: dict[int, dict] = {}
    for row in rows:
        held = best.get(row["steps"])
        if held is None or (row["acc_all"], -row["fd"]) > (held["acc_all"], -held["fd"]):
            best[row["steps"]] = row
    return best


def sweep(
    bundle: ModelBundle, steps: Sequence[int], shifts: Sequence[float], num: int, seed: int = TUNING_SEED
) -> list[dict]:
    """One evaluation row per (n, shift), with the sampling times it used."""
    check_tuning_args(bundle, steps, shifts, num)
    rows = []
    for n in steps:
        for shift in shifts:
            (row,) = evaluate_model(bundle, [n], num, seed=seed, shift=shift)
            rows.append({"shift": shift, "times": consistency_times(n, shift), "seed": seed, **row})
    return rows


def write_tuned(bundle: ModelBundle, source: Path, out: Path, rows: list[dict]) -> dict[str, list[float]]:
    """Write `bundle` (loaded from `source`) to `out` with the best times of `rows` stored in its sampler."""
    chosen = {str(n): row["times"] for n, row in sorted(best_rows(rows).items())}
    sampler = dict(bundle.meta["sampler"])
    sampler["times"] = {**sampler.get("times", {}), **chosen}
    meta = {k: v for k, v in bundle.meta.items() if k not in HEADER_KEYS}
    meta.update(sampler=sampler, tuned_times={"source": str(source), "seed": rows[0]["seed"], "chosen": chosen})
    save_weights(out, bundle.model, meta)
    return chosen


def plot_sweep(rows: list[dict], out: Path, title: str | None = None) -> Path:
    """All-attribute accuracy (top) and FD (bottom) against the grid shift, one line per step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(5.0, 5.4), sharex=True)
    for n in sorted({r["steps"] for r in rows}):
        mine = [r for r in rows if r["steps"] == n]
        for ax, metric in zip(axes, ("acc_all", "fd"), strict=True):
            ax.plot([r["shift"] for r in mine], [r[metric] for r in mine], marker="o", label=f"{n} steps")
        chosen = best_rows(mine)[n]
        axes[0].plot([chosen["shift"]], [chosen["acc_all"]], marker="*", markersize=12, color="black")
    axes[0].set_ylabel("all-attribute accuracy")
    axes[1].set_ylabel("FD")
    axes[1].set_xscale("log")
    shifts = sorted({r["shift"] for r in rows})
    axes[1].set_xticks(shifts, [f"{s:g}" for s in shifts])
    axes[1].minorticks_off()
    axes[1].set_xlabel("grid shift (2 steps: middle RF time = shift / (1 + shift))")
    axes[0].legend(fontsize=8)
    axes[0].set_title(title or f"sampling-time sweep (seed {rows[0]['seed']}; star: chosen)", fontsize=9)
    return save_figure(fig, out)
