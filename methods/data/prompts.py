"""Prompts-only data: `vdistill prepare --prompts FILE` -> OUT/prompts/prompts-NNNNNN.safetensors, umT5 embeddings of
captions without videos (the terms that need prompts only: DMD's student simulation, rCM's critic). Each file holds
``text`` [N, L, D] (zero past each caption) and ``text_mask`` [N, L], with the captions and settings in its header;
written atomically, skipped by a rerun made from the same captions, rank r of a torchrun job takes files r, r + world,
... . They live in a subfolder, so a directory of video shards (`--data`) is unchanged by them. `PromptShards` reads
them back by rows on demand.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

PROMPTS = "prompts"  # the subfolder of OUT
FORMAT = "vdistill-prompts"


def read_prompts(path: Path) -> list[str]:
    """Captions from a .txt (one per non-empty line), a .jsonl or a .csv with a ``caption`` (or ``prompt``) field."""
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        bad = [i for i, r in enumerate(rows, 1) if not isinstance(r, dict) or not {"caption", "prompt"} & set(r)]
        if bad:
            raise ValueError(f"--prompts {path}: rows {bad[:5]} have no caption (or prompt) field")
        prompts = [str(r.get("caption", r.get("prompt"))).strip() for r in rows]
    if not prompts or not all(prompts):
        raise ValueError(f"--prompts {path}: no prompts, or an empty one")
    return prompts


def prepare_prompts(prompts: list[str], out: Path, encoders, text_len: int, shard_size: int, dtype: torch.dtype,
                    rank: int = 0, world: int = 1) -> dict:
    """Write this rank's prompt files to OUT/prompts; returns {written, skipped_shards, prompts}."""
    folder = out / PROMPTS
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"text_len": text_len, "shard_size": shard_size, "dtype": str(dtype)}
    groups = [prompts[i:i + shard_size] for i in range(0, len(prompts), shard_size)]
    mine = list(range(rank, len(groups), world))
    counts = {"written": 0, "skipped_shards": 0, "prompts": 0}
    for index in tqdm(mine, desc=f"prompts (rank {rank})", unit="shard"):
        path = folder / f"prompts-{index:06d}.safetensors"
        header = _header(path) if path.is_file() else {}  # {} also for a torn file: written again
        if header and header.get("settings") != json.dumps(settings):
            raise ValueError(f"{path} was written with {header.get('settings')}, not {settings}: use another --out")
        if header.get("captions") == json.dumps(groups[index]):
            counts["skipped_shards"] += 1
            continue
        text, mask = encoders.encode_text(groups[index])
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"text": text.to(dtype).cpu().contiguous(), "text_mask": mask.cpu().contiguous()}, str(tmp),
                  metadata={"format": FORMAT, "captions": json.dumps(groups[index]), "settings": json.dumps(settings)})
        tmp.replace(path)
        counts["written"] += 1
        counts["prompts"] += len(groups[index])
    return counts


def _header(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # a torn or foreign file: written again
        return {}


class PromptShards:
    """The prompt files of OUT/prompts (or a list of them): `len()`, `captions`, `batch(indices)` -> (text, mask)."""

    def __init__(self, directory: str | Path | Sequence[Path]) -> None:
        if isinstance(directory, (str, Path)):
            directory = Path(directory)
            folder = directory / PROMPTS if (directory / PROMPTS).is_dir() else directory
            self.paths = sorted(folder.glob("prompts-*.safetensors"))
        else:
            self.paths = list(directory)
        if not self.paths:
            raise ValueError(f"no prompts-*.safetensors in {directory} (vdistill prepare --prompts)")
        headers = [_header(p) for p in self.paths]
        for path, header in zip(self.paths, headers):
            if header.get("format") != FORMAT or header.get("settings") != headers[0].get("settings"):
                raise ValueError(f"{path}: not a prompt file, or written with other settings than {self.paths[0]}")
        self.captions = [c for h in headers for c in json.loads(h["captions"])]
        self._offsets = np.cumsum([0] + [len(json.loads(h["captions"])) for h in headers])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """text [B, L, D] and mask [B, L] of the prompts at `indices`, in that order."""
        text, mask = [], []
        for i in indices:
            s = int(np.searchsorted(self._offsets, i, side="right")) - 1
            row = int(i) - int(self._offsets[s])
            with safe_open(str(self.paths[s]), framework="pt") as f:
                text.append(f.get_slice("text")[row:row + 1])
                mask.append(f.get_slice("text_mask")[row:row + 1])
        return torch.cat(text), torch.cat(mask)
