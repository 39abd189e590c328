"""Models side by side from the same noise and prompts: the table and figures of `vdistill demo` and
`vdistill quickstart`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vdistill.methods.data.shapes import prompt_for
from vdistill.methods.eval.evaluate import evaluate_model
from vdistill.methods.sampling.generate import ModelBundle, spread_labels
from vdistill.methods.sampling.media import save_comparison, save_comparison_gif

SPEED_KEY = ("s/clip: seconds of sampling per clip (scoring excluded); speed-up: against the first model at its most "
             "steps, measured in the same run")


def compare(models: dict[str, tuple[ModelBundle, Sequence[int]]], num: int, shown: int = 8,
            ) -> tuple[list[dict], dict[str, torch.Tensor], list[str]]:
    """Sample every model at each of its step counts ({name: (bundle, steps)}) from the same noise and prompts
    (`num` clips spread over the prompts), score them, and keep the first `shown` clips of each for figures.

    Returns (rows, columns, prompts): one metrics row per model and step count with `s_per_clip` and `speedup`
    against the first model's largest step count; {"model, N steps": clips [shown, 3, T, H, W]}; the shown prompts.
    """
    if not models or any(not steps for _, steps in models.values()):
        raise ValueError("models: expected at least one model, each with at least one step count")
    labels = spread_labels(num)
    shown = min(shown, num)
    columns, rows = {}, []
    for name, (bundle, steps) in models.items():
        def keep(n: int, clips: torch.Tensor, name: str = name) -> None:
            columns[f"{name}, {n} step{'s' if n > 1 else ''}"] = clips[:shown]

        rows += [{"model": name, **row, "s_per_clip": row["sample_s"] / num}
                 for row in evaluate_model(bundle, list(steps), num, labels=labels, on_clips=keep)]
    first = next(iter(models))
    reference = max((r for r in rows if r["model"] == first), key=lambda r: r["steps"])
    for row in rows:
        row["speedup"] = reference["sample_s"] / row["sample_s"]
    return rows, columns, [prompt_for(lab) for lab in labels[:shown].tolist()]


def save_figures(columns: dict[str, torch.Tensor], prompts: list[str], out: Path) -> list[Path]:
    """OUT/comparison.png (a row per prompt, a column per model and step count) and the same as a labelled GIF."""
    return [save_comparison(columns, prompts, out / "comparison.png"),
            save_comparison_gif(columns, prompts, out / "comparison.gif")]


def format_comparison(rows: list[dict]) -> str:
    """A plain-text table: model, steps, all-attribute accuracy, FD, seconds per clip and speed-up."""
    width = max(8, *(len(r["model"]) for r in rows))
    lines = [f"{'model':>{width}} | steps | acc_all |     fd | s/clip | speed-up"]
    lines += [f"{r['model']:>{width}} | {r['steps']:>5} | {r['acc_all']:>7.3f} | {r['fd']:>6.2f} | "
              f"{r['s_per_clip']:>6.3f} | {r['speedup']:>7.1f}x" for r in rows]
    return "\n".join(lines)
