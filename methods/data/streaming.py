"""Stream shards of latents and text embeddings into training without loading them: `LazyShards` opens each shard's
header once (checks format, shapes and dtypes across shards) and reads the rows of a batch on demand, so memory holds
one batch, not the data set. It has `ShardDataset`'s interface, so `ShardLoader` shuffles over all shards (a full
permutation per epoch), gives each data-parallel rank a disjoint slice of every global batch and resumes exactly.
`LatentBatches` turns that into the trainer's `Batch`es, with the unconditional embedding `vdistill prepare` wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vdistill.methods.data.batch import Batch
from vdistill.methods.data.shards import ShardBatch, ShardLoader, shard_meta, shard_paths
from vdistill.methods.train import distributed

NULL_TEXT = "null_text.safetensors"  # `vdistill prepare`: the embedding CFG's unconditional branch uses


class LazyShards:
    """Rows of a set of shards read on demand: `batch(indices)` -> ShardBatch; `len()` from the headers."""

    def __init__(self, paths_or_dir: str | Path | Sequence[str | Path]) -> None:
        self.paths = [p for p in shard_paths(paths_or_dir) if p.name != NULL_TEXT]
        self.meta = [shard_meta(p) for p in self.paths]
        keys = ("latents_shape", "text_shape", "latents_dtype", "text_dtype", "has_text_mask")
        first = self.meta[0]
        for path, meta in zip(self.paths, self.meta):
            wrong = [f"{k} {meta.get(k)} (first shard {self.paths[0].name}: {first.get(k)})"
                     for k in keys if meta.get(k) != first.get(k)]
            if wrong:
                raise ValueError(f"{path}: differs from the other shards: {'; '.join(wrong)}")
        self.has_mask = bool(first["has_text_mask"])
        self.latent_shape = tuple(first["latents_shape"])
        self.text_shape = tuple(first["text_shape"])
        self._offsets = np.cumsum([0] + [m["n"] for m in self.meta])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def batch(self, indices: Sequence[int]) -> ShardBatch:
        """The rows at `indices` (global, in order), read shard by shard; ValueError naming a shard with
        non-finite rows."""
        shard_of = np.searchsorted(self._offsets, indices, side="right") - 1
        rows: dict[str, list] = {"latents": [], "text": [], "text_mask": []}
        order = []
        for s in np.unique(shard_of):
            local = [int(i) - int(self._offsets[s]) for i in np.asarray(indices)[shard_of == s]]
            names = ("latents", "text", "text_mask") if self.has_mask else ("latents", "text")
            with safe_open(str(self.paths[s]), framework="pt") as f:
                for name in names:
                    rows[name] += [f.get_slice(name)[i:i + 1] for i in local]
            order += [k for k, shard in enumerate(shard_of) if shard == s]
        back = np.argsort(order)  # rows were read grouped by shard: restore the order of `indices`
        latents = torch.cat([rows["latents"][k] for k in back])
        text = torch.cat([rows["text"][k] for k in back])
        if not (torch.isfinite(latents).all() and torch.isfinite(text).all()):
            raise ValueError(f"non-finite latents or text in shards {[self.paths[s].name for s in set(shard_of)]}")
        mask = torch.cat([rows["text_mask"][k] for k in back]) if self.has_mask else None
        return ShardBatch(latents, text, mask)


class LatentBatches:
    """The trainer's `Batch`es from a shard directory: a global batch of `batch_size` clips per step, each rank
    its slice; `null_text` from DIR/null_text.safetensors (else zeros, with a warning from the caller)."""

    def __init__(self, directory: str | Path, batch_size: int, seed: int = 0, device: str | torch.device = "cpu"):
        directory = Path(directory)
        self.dataset = LazyShards(directory)
        self.loader = ShardLoader(self.dataset, batch_size, seed=seed, part=distributed.shard_of(batch_size))
        self.device = device
        null = directory / NULL_TEXT
        length, dim = self.dataset.text_shape
        self.null = load_file(str(null))["text"][:1].float() if null.is_file() else torch.zeros(1, length, dim)
        self.null_is_zeros = not null.is_file()

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        b = self.loader.__next__()
        return Batch(b.latents.float(), b.text.float(), self.null, None).to(self.device)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
