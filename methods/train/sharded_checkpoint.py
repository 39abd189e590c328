"""Distributed checkpoints of sharded (`train.fsdp`) runs: a directory per checkpoint, written by every rank.

`RUN/checkpoints/step_N/` holds the tensors of the state's "sharded" part through torch.distributed.checkpoint
(DCP): each rank writes its shards of the DTensors (student, AdamW and EMA states, a recipe's sharded networks);
plain tensors (of replicated modules: the same on every rank) are written once. `state.pt`
(rank 0, `torch.save`) holds the rest: step, data position, config, every rank's RNG state, and each rank's
"sharded" part with its tensors replaced by their DCP keys and placements (the non-tensor leaves, e.g. a rank's
counters, stay).
The ranks write into `.step_N.tmp/`; when all have finished, rank 0 writes `manifest.sha256` (the SHA-256 of
every file, `sha256sum -c` format, hashed by the ranks in parallel) and renames the directory into place,
so a directory under its final name without a matching manifest is torn or damaged. DCP reshards on load: a
checkpoint written by N ranks loads onto M. No code in a file runs: the files are read only after the
manifest matched, `state.pt` with `weights_only=True`, DCP's pickled `.metadata` first by an unpickler that
admits DCP's metadata classes alone, the tensor data by DCP with `weights_only=True`.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from vdistill.methods.train import distributed
from vdistill.methods.train.checkpoint import MANIFEST, _non_finite, _sha256, torch_load

STATE_FILE = "state.pt"
_REF = "__dcp_key__"  # a tensor's place in the tree stored in state.pt: {_REF: its DCP key[, "placements"]}


def _split(tree, prefix: str = ""):
    """({path: tensor}, the tree with each tensor replaced by {_REF: path}, and a DTensor's placements) of a nest
    of dicts, lists and tuples."""
    if isinstance(tree, DTensor):
        return {prefix: tree}, {_REF: prefix, "placements": [_placement_name(p) for p in tree.placements]}
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}, {_REF: prefix}
    if not isinstance(tree, dict | list | tuple):
        return {}, tree
    flat, skeleton = {}, {}
    for key, value in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
        part, skeleton[key] = _split(value, f"{prefix}/{key}" if prefix else str(key))
        flat.update(part)
    return flat, skeleton if isinstance(tree, dict) else type(tree)(skeleton.values())


def _join(skeleton, flat: dict):
    """`_split`'s inverse; a tensor missing from `flat` (not read) is None."""
    if isinstance(skeleton, dict):
        if _REF in skeleton:
            return flat.get(skeleton[_REF])
        return {key: _join(value, flat) for key, value in skeleton.items()}
    if isinstance(skeleton, list | tuple):
        return type(skeleton)(_join(value, flat) for value in skeleton)
    return skeleton


def save_sharded(path: str | Path, state: dict) -> None:
    """Write `state` as the distributed checkpoint directory `path` (see the module doc); every rank calls with its
    own `state`, whose "sharded" part holds its shards as DTensors. Refused on every rank when a rank's tensor is
    not finite (nothing written)."""
    path = Path(path)
    flat, skeleton = _split(state["sharded"])
    bad = [f"{name!r} of rank {r}" for r, name in enumerate(distributed.gather_objects(_non_finite(flat))) if name]
    if bad:
        raise ValueError(f"not writing {path}: tensor {', '.join(bad)} has non-finite values (NaN/inf); "
                         "the files already there are left as they were")
    skeletons = distributed.gather_objects(skeleton)
    tmp = path.with_name(f".{path.name}.tmp")
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # a write killed earlier
        tmp.mkdir(parents=True)
    distributed.barrier()
    dcp.save(flat, checkpoint_id=tmp)
    if distributed.is_main():
        torch.save({**state, "sharded": {"trees": skeletons}}, tmp / STATE_FILE)
    distributed.barrier()  # every rank's files are complete
    digests = _hash_share(tmp, sorted(p.name for p in tmp.iterdir()))
    if distributed.is_main():
        lines = "".join(f"{digest}  {name}\n" for share in digests for name, digest in share)
        (tmp / MANIFEST).write_text(lines)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    distributed.barrier()


def _hash_share(folder: Path, names: list[str]) -> list[list[tuple[str, str]]]:
    """Every rank's [(name, SHA-256, "" when unreadable)] of its share of `names` in `folder`, the shares split over
    the ranks."""
    mine = []
    for name in names[distributed.rank()::distributed.world_size()]:
        try:
            mine.append((name, _sha256(folder / name)))
        except OSError:  # not raised here: the other ranks would wait for this one at the gather
            mine.append((name, ""))
    return distributed.gather_objects(mine)


def verify_manifest(path: Path) -> None:
    """ValueError unless every file `manifest.sha256` lists is in `path` with its SHA-256; the files are hashed
    by all ranks together (every rank calls)."""
    try:
        listed = dict(reversed(line.split(maxsplit=1)) for line in (path / MANIFEST).read_text().splitlines())
        missing = sorted(name for name in listed if not (path / name).is_file())
        unlisted = sorted({STATE_FILE, ".metadata"} - listed.keys())
        error = (f"lacks {', '.join(missing)}: torn or damaged" if missing else
                 f"has a {MANIFEST} without {', '.join(unlisted)}" if unlisted else None)
    except (OSError, ValueError) as e:
        listed, error = {}, f"has no readable {MANIFEST} ({e}): its write did not finish, or it was damaged"
    errors = [e for e in distributed.gather_objects(error) if e]
    if errors:
        raise ValueError(f"checkpoint {path} {errors[0]}")
    names = sorted(listed)
    wrong = [name for share in _hash_share(path, names) for name, digest in share if digest != listed[name]]
    if wrong:
        raise ValueError(f"checkpoint {path}: {', '.join(wrong)} fail their checksums ({MANIFEST}): damaged or "
                         "changed after it was written")


def read_state(path: Path) -> dict:
    """The small state of a distributed checkpoint, on the CPU (after `verify_manifest`: every rank calls); its
    "sharded" part says where its tensors are, for `read_sharded` / `read_whole`."""
    verify_manifest(path)
    _metadata(path)  # refuses a .metadata holding anything but DCP's metadata classes
    state = torch_load(path / STATE_FILE)
    state["sharded"]["dir"] = str(path)
    return state


def read_sharded(sharded: dict, live: dict) -> dict:
    """This rank's "sharded" part of a checkpoint, resharded when it was written by another number of ranks: a
    tensor is read into the DTensor `live` (this run's tree of the same state) has in its place, else into one
    placed as when it was written (e.g. the state of an optimiser that has not stepped yet), and a plain tensor
    whole. The non-tensor leaves are this rank's when the number of ranks is the same, else rank 0's. Every rank
    calls."""
    path, trees = Path(sharded["dir"]), sharded["trees"]
    skeleton = trees[distributed.rank()] if len(trees) == distributed.world_size() else trees[0]
    targets = {k: v for k, v in _split(live)[0].items() if isinstance(v, DTensor)}
    stored = _metadata(path).state_dict_metadata
    missing = sorted(targets.keys() - stored.keys())
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors this run shards, e.g. {missing[:3]}")
    mesh = next((t.device_mesh for t in targets.values()), None)
    placed = {ref[_REF]: ref["placements"] for ref in _refs(skeleton) if "placements" in ref}
    flat = {}
    for key, meta in stored.items():
        if key in targets:
            flat[key] = targets[key]
        elif key in placed:
            flat[key] = torch.distributed.tensor.empty(meta.size, dtype=meta.properties.dtype, device_mesh=mesh,
                                                       placements=[_placement(p) for p in placed[key]])
        else:
            flat[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load(flat, checkpoint_id=path)
    return _join(skeleton, flat)


def _refs(skeleton):
    """The {_REF: ...} leaves of a tree from `_split`."""
    if isinstance(skeleton, dict) and _REF in skeleton:
        yield skeleton
    elif isinstance(skeleton, dict | list | tuple):
        for value in (skeleton.values() if isinstance(skeleton, dict) else skeleton):
            yield from _refs(value)


def _placement_name(placement) -> int | str:
    """A placement as `torch.load(weights_only=True)` reads it back: Shard(d) as d, Replicate() as "R"."""
    if type(placement) is Shard:
        return placement.dim
    return "R" if isinstance(placement, Replicate) else repr(placement)


def _placement(name: int | str):
    if isinstance(name, int):
        return Shard(name)
    if name == "R":
        return Replicate()
    raise ValueError(f"cannot place a tensor as {name} (only Shard and Replicate are re-created)")


def read_whole(sharded: dict, prefixes: tuple[str, ...]) -> dict:
    """Rank 0's "sharded" part of a checkpoint with the whole tensors whose keys start with one of `prefixes`
    (e.g. "student/"), the others None; in one process, without a process group."""
    path = Path(sharded["dir"])
    stored = _metadata(path).state_dict_metadata
    flat = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in stored.items()
            if key.startswith(prefixes)}
    with warnings.catch_warnings():  # DCP warns that it reads in one process, which is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, checkpoint_id=path, no_dist=True)
    return _join(sharded["trees"][0], flat)


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "StorageMeta",
                                              "TensorStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata and nothing else: a global outside its classes (and torch's dtypes) is refused."""

    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_CLASSES.get(module, ())
        allowed |= module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")
        return super().find_class(module, name)


def _metadata(path: Path):
    try:
        with open(path / ".metadata", "rb") as f:
            return _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"checkpoint {path}: its DCP metadata is unreadable or holds other objects: {e}") from e
