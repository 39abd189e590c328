"""Run logging: one JSON line per logged step (metrics.jsonl), optionally TensorBoard too."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("vdistill")


def _read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A last line that does not parse is the torn tail of a killed write:
    dropped with a warning; a bad line anywhere else is an error naming the file and line."""
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as e:
            if number == len(lines):
                log.warning("%s: dropping its torn last line %d (%s)", path, number, e)
                break
            raise ValueError(f"{path}, line {number}: corrupt metrics row ({e}): {line[:80]!r}") from e
        rows.append(row)
    return rows


class RunLog:
    """Append-only JSONL metrics file; on resume, lines past the resumed step are dropped. A disabled log
    (data-parallel ranks other than 0) touches no file."""

    def __init__(
        self, run_dir: str | Path, tensorboard: bool = False, resume_step: int | None = None, enabled: bool = True
    ):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [row for row in _read_rows(self.path) if row["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        elif resume_step is None:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("tensorboard logging needs `pip install vdistill[tensorboard]`") from e
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def host_values(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """The scalars as Python floats; those still on the device are read in one transfer (one wait for the GPU)."""
    on_device = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    if not on_device:
        return dict(metrics)
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in on_device]).tolist()
    return {**metrics, **dict(zip(on_device, values))}


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl ([] when there is none); a torn last line is dropped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    return _read_rows(path) if path.exists() else []
