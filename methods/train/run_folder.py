"""One run per run folder: start, overwrite or resume it on purpose, and record what a resume changed.

A new run needs a folder without another run's files (RUN_FILES); `overwrite` first removes those (and only
those: anything else in the folder is kept and named). `resume` needs a checkpoint. Resuming with settings
other than the checkpoint's is refused, except for the run's length and bookkeeping (FREE_ON_RESUME);
`allow_changes` accepts the others, but never a change of network, data geometry or recipe (FIXED), which
would make the checkpoint mean something else. Every resume appends its changes to RUN/resumes.jsonl.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from vdistill.methods.train import distributed
from vdistill.methods.train.checkpoint import CKPT_PATTERN, list_checkpoints

log = logging.getLogger("vdistill")

# what a run writes into its folder (`overwrite` removes these and nothing else)
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "resumes.jsonl", "method_config.json", "tb",
             "student.safetensors", "student_ema.safetensors", "model.safetensors", "model_ema.safetensors")
# settings a resume may change freely: when to stop, log, checkpoint and evaluate (the trajectory is the same),
# and compiling (the same up to rounding)
FREE_ON_RESUME = frozenset(f"train.{name}" for name in (
    "steps", "time_limit_s", "log_every", "ckpt_every", "keep_checkpoints", "tensorboard", "profile_window", "compile",
    "eval_every", "eval_num", "max_bad_steps",
))
FIXED = ("model", "data", "text_max_len", "method")  # network, data geometry, recipe (dotted prefixes; see _fixed)


def _is_stale_temporary(path: Path) -> bool:
    """A temporary file (or distributed checkpoint directory) of an atomic write that was killed before its rename
    (see checkpoint._atomic_write, sharded_checkpoint.save_sharded)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _entries(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if not _is_stale_temporary(p)) if run_dir.is_dir() else []


def prepare(run_dir: str | Path, resume: bool, overwrite: bool = False) -> None:
    """Check (and with `overwrite`, clear) `run_dir` for a new run or a resume; ValueError naming the folder
    and the way out otherwise. Every rank checks; rank 0 alone removes (the caller then waits at a barrier)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other (continue the run, or replace it)")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file, not a run folder")
    if resume:
        if not list_checkpoints(run_dir):
            raise ValueError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}, nothing to resume; start the "
                             "run without --resume (add --overwrite if the folder holds a run that never checkpointed)")
        return
    held = [p for p in _entries(run_dir) if p.name in RUN_FILES]
    if not held:
        return
    if not overwrite:
        ckpts = list_checkpoints(run_dir)
        what = f"checkpoints up to step {int(CKPT_PATTERN.search(ckpts[-1].name)[1])}" if ckpts else \
            ", ".join(p.name for p in held)
        raise ValueError(f"--out {run_dir} already holds a run ({what}); --resume continues it, --overwrite "
                         "replaces it, or choose another --out")
    if not distributed.is_main():
        return
    for path in held:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    kept = [p.name for p in _entries(run_dir)]
    log.warning("--overwrite: removed the previous run's files from %s%s", run_dir,
                f" (kept files it did not write: {', '.join(kept)})" if kept else "")


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Delete the temporary files of writes killed before their rename, and checksums whose checkpoint
    never arrived, in `run_dir` and its checkpoints folder."""
    run_dir = Path(run_dir)
    stale = [p for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir()
             for p in folder.iterdir() if _is_stale_temporary(p)]
    stale += [p for p in (run_dir / "checkpoints").glob("*.pt.sha256") if not p.with_suffix("").exists()]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if stale:
        log.warning("removed %d stale temporary file(s) of interrupted writes in %s: %s", len(stale), run_dir,
                    ", ".join(p.name for p in stale))


def _flat(value, prefix: str = "") -> dict[str, object]:
    """{dotted.key: leaf} of a JSON-like nest (dicts only; lists are leaves)."""
    if not (isinstance(value, dict) and value):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(saved: dict, now: dict) -> dict[str, list]:
    """{dotted key: [saved value, new value]} for every setting that differs (JSON-normalised)."""
    old, new = (_flat(json.loads(json.dumps(c, default=str))) for c in (saved, now))
    keys = sorted(old.keys() | new.keys())
    return {key: [old.get(key), new.get(key)] for key in keys if old.get(key) != new.get(key)}


def _fixed(key: str) -> bool:
    return any(key == name or (key.startswith(f"{name}.") and name != "method") for name in FIXED)


def check_changes(changes: dict[str, list], allow_changes: bool, checkpoint: Path) -> None:
    """ValueError for a resume whose changes are not allowed, naming each with its old and new value."""
    def listed(keys):
        return "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys)

    fixed = [k for k in changes if _fixed(k)]
    if fixed:
        raise ValueError(f"cannot resume from {checkpoint}: it was written for another network, data geometry or "
                         f"recipe ({listed(fixed)}); start a new run in another --out")
    guarded = [k for k in changes if k not in FREE_ON_RESUME]
    if guarded and not allow_changes:
        raise ValueError(f"cannot resume from {checkpoint} with other settings than it was written with "
                         f"({listed(guarded)}); pass --allow-changes to continue with the new ones (recorded in "
                         "resumes.jsonl), or resume with the old ones")


def record_resume(run_dir: str | Path, step: int, checkpoint: Path, changes: dict[str, list]) -> None:
    """Append this resume (its step, checkpoint and changed settings) to RUN/resumes.jsonl; log the changes."""
    row = {"step": step, "checkpoint": checkpoint.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "changed": changes}
    with open(Path(run_dir) / "resumes.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    for key, (old, new) in changes.items():
        log.info("resume at step %d: %s %r -> %r", step, key, old, new)
