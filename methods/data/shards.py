"""Real-data path: shards of precomputed latents and text embeddings.

A shard is one safetensors file holding
  ``latents``   [N, C, T, H, W]  floating (VAE latents, e.g. Wan2.1: C=16),
  ``text``      [N, L, D]        floating (text-encoder outputs, e.g. umT5: L=512, D=4096),
  ``text_mask`` [N, L] bool      optional (True = real token),
and header metadata ``format = "vdistill-shard"``, ``version``, and ``meta`` (JSON: N, shapes,
dtypes, plus any user fields). Writing is atomic (temporary file, then ``os.replace``), so a
crashed writer never leaves a truncated shard under the final name.

:class:`ShardDataset` validates every shard when it opens them (readable, format and version,
tensor names, ranks, N agreement, dtypes, finite values, metadata matching the tensors, and the
same C/T/H/W, L/D, dtypes and mask presence across shards) and raises a ``ValueError`` naming the
file and the problem. Shards are loaded into memory. :class:`ShardLoader` yields shuffled
batches with a resumable position.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "vdistill-shard"
VERSION = 1
SUFFIX = ".safetensors"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class ShardBatch:
    """latents [B, C, T, H, W], text [B, L, D], text_mask [B, L] bool or None."""

    latents: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor | None


def _check(name: str, latents: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> None:
    """Raise ValueError (prefixed by ``name``) unless the three tensors form a valid shard."""
    if latents.dim() != 5:
        raise ValueError(f"{name}: latents must be [N, C, T, H, W], got shape {list(latents.shape)}")
    if text.dim() != 3:
        raise ValueError(f"{name}: text must be [N, L, D], got shape {list(text.shape)}")
    if latents.shape[0] != text.shape[0]:
        raise ValueError(f"{name}: latents has N={latents.shape[0]} clips but text has N={text.shape[0]}")
    if latents.shape[0] == 0:
        raise ValueError(f"{name}: shard is empty (N=0)")
    for key, t in (("latents", latents), ("text", text)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name}: {key} must be floating point, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: {key} contains NaN or Inf values")
    if text_mask is not None:
        if text_mask.dtype != torch.bool:
            raise ValueError(f"{name}: text_mask must be bool, got {text_mask.dtype}")
        if tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"{name}: text_mask shape {list(text_mask.shape)} != text [N, L] "
                             f"{list(text.shape[:2])}")


def _describe(latents: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> dict:
    """The metadata fields that must agree with the stored tensors."""
    return {"n": latents.shape[0], "latents_shape": list(latents.shape[1:]),
            "text_shape": list(text.shape[1:]), "latents_dtype": str(latents.dtype),
            "text_dtype": str(text.dtype), "has_text_mask": text_mask is not None}


def write_shard(path: str | Path, latents: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None, extra: dict | None = None) -> Path:
    """Atomically write a shard: latents [N, C, T, H, W], text [N, L, D], text_mask [N, L] bool.

    ``extra``: JSON-serialisable fields stored in the metadata (e.g. the encoder names).
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"path: shard files must end in {SUFFIX}, got {path}")
    _check(str(path), latents, text, text_mask)
    meta = {**_describe(latents, text, text_mask), "extra": extra or {}}
    tensors = {"latents": latents.detach().cpu().contiguous(), "text": text.detach().cpu().contiguous()}
    if text_mask is not None:
        tensors["text_mask"] = text_mask.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        header = {"format": FORMAT, "version": str(VERSION), "meta": json.dumps(meta)}
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_shard(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """Load and validate one shard -> (latents, text, text_mask or None, meta)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: shard file does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            names = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in names}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    meta = _header_meta(path, header)
    missing = {"latents", "text"} - names
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {sorted(missing)}")
    unknown = names - {"latents", "text", "text_mask"}
    if unknown:
        raise ValueError(f"{path}: unexpected tensor(s) {sorted(unknown)}")
    latents, text, mask = tensors["latents"], tensors["text"], tensors.get("text_mask")
    _check(str(path), latents, text, mask)
    actual = _describe(latents, text, mask)
    wrong = {k: (meta.get(k), v) for k, v in actual.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(f"{path}: metadata disagrees with the tensors (meta, actual): {wrong}")
    return latents, text, mask, meta


def _header_meta(path: Path, header: dict) -> dict:
    """The JSON ``meta`` of a shard's safetensors header, after checking its format and version."""
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata format is {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version") != str(VERSION):
        raise ValueError(f"{path}: unsupported shard version {header.get('version')!r} "
                         f"(this reader reads {VERSION})")
    try:
        return json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: metadata 'meta' is missing or not JSON") from e


def shard_meta(path: str | Path) -> dict:
    """The metadata of one shard (N, shapes, dtypes, ``extra``), read from its header alone (no tensors
    loaded); `read_shard` checks it against the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return _header_meta(Path(path), header)


def shard_paths(paths_or_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    """A directory -> its ``*.safetensors`` files sorted by name; a path or list -> as given."""
    if isinstance(paths_or_dir, (str, Path)):
        p = Path(paths_or_dir)
        paths = sorted(p.glob(f"*{SUFFIX}")) if p.is_dir() else [p]
    else:
        paths = [Path(p) for p in paths_or_dir]
    if not paths:
        raise ValueError(f"paths_or_dir: no {SUFFIX} shards found in {paths_or_dir}")
    return paths


class ShardDataset:
    """All clips of a set of shards: ``ds[i]`` -> (latents [C, T, H, W], text [L, D], mask [L] or None)."""

    def __init__(self, paths_or_dir: str | Path | Sequence[str | Path]) -> None:
        self.paths = shard_paths(paths_or_dir)
        self._latents, self._text, self._mask, self.meta = [], [], [], []
        first = None
        for path in self.paths:
            latents, text, mask, meta = read_shard(path)
            sig = {"latents [C, T, H, W]": list(latents.shape[1:]), "text [L, D]": list(text.shape[1:]),
                   "latents dtype": str(latents.dtype), "text dtype": str(text.dtype),
                   "text_mask present": mask is not None}
            if first is None:
                first = (path, sig)
            for key, value in sig.items():
                if value != first[1][key]:
                    raise ValueError(f"{path}: {key} is {value} but {first[0]} has {first[1][key]}")
            self._latents.append(latents)
            self._text.append(text)
            self._mask.append(mask)
            self.meta.append(meta)
        self.has_mask = self._mask[0] is not None
        self._offsets = np.cumsum([0] + [t.shape[0] for t in self._latents])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of every clip."""
        return tuple(self._latents[0].shape[1:])

    @property
    def text_shape(self) -> tuple[int, int]:
        """(L, D) of every text embedding."""
        return tuple(self._text[0].shape[1:])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return shard, index - int(self._offsets[shard])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        s, i = self._locate(int(index))
        return self._latents[s][i], self._text[s][i], None if self._mask[s] is None else self._mask[s][i]

    def batch(self, indices: Sequence[int]) -> ShardBatch:
        """Stack clips at ``indices`` -> :class:`ShardBatch`."""
        items = [self[i] for i in indices]
        mask = torch.stack([it[2] for it in items]) if self.has_mask else None
        return ShardBatch(torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]), mask)


class ShardLoader:
    """Endless shuffled batches over a :class:`ShardDataset`, resumable exactly.

    Epoch e visits the clips in the order ``default_rng([seed, e]).permutation(N)`` (identity if
    ``shuffle=False``) in batches of ``batch_size``; a final partial batch is dropped.
    ``state_dict()`` = (epoch, position in the epoch). ``part`` keeps a slice of each batch (a
    data-parallel rank's share; ``batch_size`` stays the global size).
    """

    def __init__(
        self, dataset: ShardDataset, batch_size: int, seed: int = 0, shuffle: bool = True, part: slice = slice(None)
    ) -> None:
        if not 1 <= batch_size <= len(dataset):
            raise ValueError(f"batch_size must be in [1, {len(dataset)}] (the data set size), "
                             f"got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.part = part
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[ShardBatch]:
        return self

    def __next__(self) -> ShardBatch:
        if self.position + self.batch_size > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.dataset.batch(idx.tolist()[self.part])

    def state_dict(self) -> dict[str, int | bool]:
        """Position (epoch, position) plus the settings a resume must match."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "size": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue from ``state``; refuses one saved with other settings or another data set size."""
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("shuffle", self.shuffle),
                          ("size", len(self.dataset))):
            if state.get(key) != mine:
                raise ValueError(f"state: {key}={state.get(key)!r} does not match this loader's {mine!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
