"""Budget curves: the in-training evaluations (`vdistill distill ... --set train.eval_every=N`) of one or more runs,
plotted against the training step.

Each run's metrics.jsonl holds rows {"step": s, "eval_acc_all_<n>": a, "eval_fd_<n>": f} for the
sampling step counts n that were scored (1, 2, 4). The figure has one column per n: all-attribute
accuracy on top, FD (log scale) below, one line per run, so the step where a recipe peaks is read off directly.

    vdistill plot-evals runs/rcm runs/consistency --out curves.png [--reference 0.934]
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vdistill.methods.sampling.media import save_figure

_EVAL_KEY = re.compile(r"eval_(acc_all|fd)_(\d+)$")


def load_curves(run: Path) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """{sampling steps n: {"acc_all" | "fd": [(training step, value), ...]}} from `run`/metrics.jsonl."""
    metrics = Path(run) / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"run {run}: no metrics.jsonl (is it a run directory?)")
    curves: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{metrics}, line {number}: not JSON ({exc.msg})") from None
        for key, value in row.items():
            match = _EVAL_KEY.match(key)
            if match:
                metric, n = match.group(1), int(match.group(2))
                curves.setdefault(n, {"acc_all": [], "fd": []})[metric].append((row["step"], value))
    if not curves:
        raise ValueError(f"run {run}: metrics.jsonl has no in-training evaluations "
                         "(train with --set train.eval_every=N)")
    return dict(sorted(curves.items()))


def plot_curves(runs: list[Path], out: Path, reference: float | None = None, title: str | None = None) -> Path:
    """Plot the budget curves of `runs` into `out` (PNG); `reference` draws a horizontal accuracy line
    (e.g. the teacher's 50-step accuracy)."""
    if not runs:
        raise ValueError("runs: give at least one run directory")
    names = [Path(run).name for run in runs]
    if len(set(names)) < len(names):  # e.g. a/rcm and b/rcm: label by the paths as given
        names = [str(run) for run in runs]
    loaded = {name: load_curves(Path(run)) for name, run in zip(names, runs, strict=True)}
    steps = sorted({n for curves in loaded.values() for n in curves})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, axes = plt.subplots(2, len(steps), figsize=(3.6 * len(steps), 5.4), squeeze=False, sharex=True)
    for col, n in enumerate(steps):
        for name, curves in loaded.items():
            for row, metric in enumerate(("acc_all", "fd")):
                points = curves.get(n, {}).get(metric, [])
                if points:
                    axes[row, col].plot(*zip(*points, strict=True), marker="o", label=name)
        axes[0, col].set_title(f"{n} sampling step{'s' if n > 1 else ''}")
        if reference is not None:
            axes[0, col].axhline(reference, color="grey", linestyle="--", linewidth=1, label="reference")
        axes[1, col].set_xlabel("training step")
        axes[1, col].set_yscale("log")  # a collapsing run's FD is orders of magnitude above the others'
        axes[1, col].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20 ...: plain numbers
        axes[1, col].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes[1, col].yaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
    axes[0, 0].set_ylabel("all-attribute accuracy")
    axes[1, 0].set_ylabel("FD")
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)
