"""Run logging: one JSON line per logged step (metrics.jsonl), optionally TensorBoard too."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("vdistill")


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
            kept = [
                ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
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


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []
