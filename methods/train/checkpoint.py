"""Atomic checkpoints (training state) and exported weights (safetensors + config).

Training checkpoints are `torch.save` dicts written to a temporary file in the same directory and
renamed into place, so a crash never leaves a partial file under the final name; they hold tensors and
plain containers only and are read with `weights_only=True` (no code in a file runs). Each has a SHA-256
beside it (`step_N.pt.sha256`, `sha256sum -c` format), checked on load. Exported weights
are safetensors with the model config and provenance in the metadata, loadable without pickle. Neither
is written when a tensor holds a NaN or inf. Sharded (`train.fsdp`) runs write distributed checkpoint
directories instead, `step_N/` with a `manifest.sha256` inside (`sharded_checkpoint.py`); the functions here
list, prune, verify and load both forms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from vdistill.models.dit import DiTConfig, VideoDiT

log = logging.getLogger("vdistill")

CKPT_PATTERN = re.compile(r"step_(\d{8})(\.pt)?$")  # a file step_N.pt, or a distributed checkpoint step_N/
MANIFEST = "manifest.sha256"  # in a distributed checkpoint: the SHA-256 of each of its files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    """`write(tmp)` into a temporary file beside `path`, then rename it into place (mode 0666 less the umask,
    as `open` would give, not mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _non_finite(value, name: str = "") -> str | None:
    """The key path of the first floating-point tensor in a nest of dicts/lists/tuples with a NaN or inf."""
    if isinstance(value, torch.Tensor):
        if isinstance(value, DTensor):  # this rank's shard: a reduction over a DTensor would be a collective
            value = value.to_local()
        finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        return None if finite else name
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = _non_finite(item, f"{name}/{key}" if name else str(key))
        if found is not None:
            return found
    return None


def check_finite(state, path: str | Path) -> None:
    """Refuse to write `state` to `path` when a floating-point tensor in it holds a NaN or inf."""
    bad = _non_finite(state)
    if bad is not None:
        raise ValueError(f"not writing {path}: tensor {bad!r} has non-finite values (NaN/inf); "
                         "the files already there are left as they were")


def _sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checksum_path(path: str | Path) -> Path:
    """The checksum file of a checkpoint: beside a file, the manifest inside a directory."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else Path(f"{path}.sha256")


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save `state` to `path` atomically (write to a temp file, then rename), its SHA-256 beside it
    (written before the rename: a checkpoint never appears without one); refused when a tensor of `state` is
    not finite."""
    check_finite(state, path)
    path = Path(path)

    def write(tmp: str) -> None:
        torch.save(state, tmp)
        digest = f"{_sha256(tmp)}  {path.name}\n"
        _atomic_write(checksum_path(path), lambda t: Path(t).write_text(digest))

    _atomic_write(path, write)


def verify_checksum(path: Path) -> None:
    """ValueError when `path` does not match the SHA-256 written beside it; a warning when there is none."""
    stored = checksum_path(path)
    if not stored.is_file():
        log.warning("checkpoint %s has no checksum file (%s): not verified", path, stored.name)
        return
    expected = (stored.read_text().split() or [""])[0]
    actual = _sha256(path)
    if actual != expected:
        raise ValueError(f"checkpoint {path} fails its checksum (SHA-256 {actual[:16]}..., {stored.name} says "
                         f"{expected[:16]}...): it was damaged or changed after it was written")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint without running code stored in it (`weights_only`: tensors and plain
    containers only), after checking its SHA-256; clear errors for a missing, damaged, corrupt, unsafe or
    pre-`weights_only` file. A distributed checkpoint (directory) gives its small state, on the CPU, the tensors
    left where they are (`sharded_checkpoint.read_state`; under torchrun every rank must call)."""
    path = Path(path)
    if path.is_dir():
        from vdistill.methods.train.sharded_checkpoint import read_state

        return read_state(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verify_checksum(path)
    return torch_load(path, map_location)


def torch_load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """`torch.load(weights_only=True)` of a training checkpoint's state, every failure a ValueError naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # garbage, not an object outside the allow-list
            raise ValueError(f"checkpoint {path} is corrupt or not a torch checkpoint: {e}") from e
        raise ValueError(
            f"checkpoint {path} holds objects other than tensors and plain containers, which are not loaded (they "
            f"could run code); checkpoints written before vdistill stored its RNG states as tensors are refused "
            f"this way too: {e}"
        ) from e
    except Exception as e:  # torch raises several types for truncated/garbage files
        raise ValueError(f"checkpoint {path} is corrupt or not a torch checkpoint: {e}") from e
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"checkpoint {path} is not a vdistill training checkpoint (no 'step')")
    return state


def checkpoint_path(run_dir: str | Path, step: int, sharded: bool = False) -> Path:
    """RUN/checkpoints/step_N.pt, or the distributed checkpoint directory step_N (`sharded`)."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}{'' if sharded else '.pt'}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CKPT_PATTERN.search(p.name))


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old.is_dir():
            shutil.rmtree(old)
            continue
        old.unlink()
        checksum_path(old).unlink(missing_ok=True)


def save_weights(path: str | Path, model: VideoDiT, meta: dict | None = None, state: dict | None = None,
                 dtype: torch.dtype | None = torch.float32) -> None:
    """Export a DiT as safetensors (in `dtype`; None keeps each tensor's) with its config (and `meta`) in the header,
    atomically. `state`: the weights to write (default: the model's own state dict); refused when one is not finite."""
    state = model.state_dict() if state is None else state
    check_finite(state, path)
    tensors = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in state.items()}
    header = {"format": "vdistill-dit", "version": "1", "config": json.dumps(model.cfg.to_dict())}
    header.update({k: json.dumps(v) for k, v in (meta or {}).items()})
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=header))


def read_weights_meta(path: str | Path) -> dict:
    """The metadata of an exported DiT (config and provenance), decoded from JSON."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"weights file {path} is corrupt or not safetensors: {e}") from e
    if header.get("format") != "vdistill-dit":
        raise ValueError(
            f"weights file {path} is not a vdistill DiT export (format={header.get('format')!r})"
        )
    try:
        return {k: (v if k in ("format", "version") else json.loads(v)) for k, v in header.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"weights file {path}: its metadata is not valid JSON ({e})") from e


def load_dit(path: str | Path, device: str | torch.device = "cpu") -> tuple[VideoDiT, dict]:
    """Load an exported DiT, or a Wan2.1 transformer directory (models/wan_io.py): (model in eval mode, metadata).
    A config field of the wrong type and non-finite weights are refused, naming the field or tensor."""
    if Path(path).is_dir():
        from vdistill.models.wan_io import read_wan, transformer_dir, wan_layout

        model = read_wan(path, device=device)
        return model, {"source": {"path": str(path), "layout": wan_layout(transformer_dir(Path(path)))}}
    meta = read_weights_meta(path)
    try:
        model = VideoDiT(DiTConfig.from_dict(meta.get("config")))
    except ValueError as e:
        raise ValueError(f"weights file {path}: its model config is not valid: {e}") from e
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"weights file {path} is corrupt: {e}") from e
    bad = _non_finite(state)
    if bad is not None:
        raise ValueError(f"weights file {path}: tensor {bad!r} has non-finite values (NaN/inf); not loaded")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not match its config: missing {missing}, unexpected {unexpected}"
        )
    return model.to(device).eval(), meta


GROWABLE = ("absolute_positions", "pooled_text")  # zero-initialised paths --init may add


def init_from(model: VideoDiT, path: Path) -> None:
    """Copy an exported model's weights into `model`; the configs must match, except that `model`
    may add the zero-initialised paths in GROWABLE (the function is unchanged at step 0)."""
    start, _ = load_dit(path)
    added = {name: True for name in GROWABLE if getattr(model.cfg, name) and not getattr(start.cfg, name)}
    if replace(start.cfg, **added) != model.cfg:
        raise ValueError(f"--init {path}: its model config {start.cfg} differs from the run's {model.cfg}")
    model.load_state_dict(start.state_dict(), strict=not added)
