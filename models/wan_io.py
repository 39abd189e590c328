"""Read and write Wan2.1 transformer directories (diffusers or original Wan-AI layout) as VideoDiT weights.

Reading builds the model on the meta device and assigns each tensor as it is read from the safetensors files
(converted to the requested dtype one tensor at a time), so a 14B checkpoint costs about one copy of its weights
in host memory. Only safetensors are read: pickled .pth/.bin files can run code.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from vdistill.models import wan_format
from vdistill.models.dit import DiTConfig, VideoDiT

SHARD_BYTES = 5 * 1024**3  # diffusers' default max_shard_size
WEIGHTS_NAME = "diffusion_pytorch_model"


def wan_layout(directory: Path) -> str | None:
    """"diffusers" or "wan" for a Wan2.1 transformer directory (or a pipeline directory's transformer/), None for a
    directory whose config.json names neither."""
    config = directory / "config.json"
    if not config.is_file():
        return None
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{config} is not a valid JSON object: {e}") from e
    return wan_format.CLASS_NAMES.get(name)


def transformer_dir(path: Path) -> Path:
    """`path` itself, or its transformer/ folder when `path` is a whole diffusers pipeline (model_index.json)."""
    return path / "transformer" if (path / "model_index.json").is_file() else path


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a transformer directory: those its *.safetensors.index.json lists, or its one
    .safetensors file; ValueError naming what is missing or refused."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{indexes[0]} lists shards that are missing: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if len(files) == 1:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".ckpt"))
    if not files and pickles:
        raise ValueError(f"{directory} holds only pickled weights {pickles}; vdistill reads safetensors (pickles can "
                         "run code): convert them once with safetensors.torch.save_file")
    raise ValueError(f"{directory}: expected one .safetensors file or a *.safetensors.index.json, found "
                     f"{[f.name for f in files]}")


def read_wan(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> VideoDiT:
    """A Wan2.1 T2V transformer directory (either layout) as a VideoDiT in eval mode, in the checkpoint's dtype or
    `dtype`; ValueError naming any field or tensor that does not map, and any non-finite tensor."""
    directory = transformer_dir(Path(path))
    layout = wan_layout(directory)
    if layout is None:
        raise ValueError(f"{path} is not a Wan2.1 transformer directory (no config.json with _class_name "
                         f"{' or '.join(wan_format.CLASS_NAMES)})")
    config = json.loads((directory / "config.json").read_text())
    try:
        cfg = wan_format.config_from(config, layout)
    except KeyError as e:
        raise ValueError(f"{directory}/config.json lacks the field {e}") from e
    names = wan_format.name_map(cfg, layout)
    state, unknown = {}, []
    for file in weight_files(directory):
        for key, tensor in read_safetensors(file, wanted=names):
            if tensor is None:
                unknown.append(key)
            else:
                state[names[key]] = _converted(tensor, names[key], cfg, dtype, device, file)
    if unknown:
        raise ValueError(f"{directory}: {wan_format.unmapped(sorted(unknown))}")
    missing = sorted(set(names.values()) - set(state))
    if missing:
        raise ValueError(f"{directory}: tensors missing for {len(missing)} VideoDiT parameters, e.g. "
                         f"{[wan_format.their_name(n, layout) for n in missing[:5]]}")
    with torch.device("meta"):
        model = VideoDiT(cfg)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{directory}: tensor shapes do not match its config.json: {e}") from e
    return model.eval()


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors(file: Path, wanted) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, tensor) for each tensor in a safetensors file, read with plain reads into fresh tensors (a memory map
    would keep the file's pages resident beside the copies: ~1.9x the weights at peak instead of ~1x); tensors not
    in `wanted` are named with None and not read. ValueError for a file that is not valid safetensors."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            start = 8 + size
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if name not in wanted:
                    yield name, None
                    continue
                begin, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
                raw = tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor.view(torch.uint8)
                if raw.numel() != end - begin:
                    raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {entry['shape']}")
                f.seek(start + begin)
                if f.readinto(raw.numpy()) != end - begin:
                    raise ValueError(f"tensor {name!r} is cut short")
                yield name, tensor
    except (ValueError, KeyError, TypeError, OSError) as e:  # JSON errors are ValueErrors
        raise ValueError(f"weights file {file} is not valid safetensors: {e}") from e


def _converted(tensor: torch.Tensor, ours: str, cfg: DiTConfig, dtype, device, file: Path) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"weights file {file}: tensor for {ours!r} has non-finite values (NaN/inf); not loaded")
    if wan_format.is_head(ours):
        tensor = wan_format.head_rows(tensor, cfg, to_videodit=True)
    return tensor.to(device=device, dtype=dtype or tensor.dtype).contiguous()


def write_diffusers(model: VideoDiT, out: str | Path, extra: dict[str, dict] | None = None,
                    shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `model` as a diffusers `WanTransformer3DModel` directory (config.json and safetensors, sharded with an
    index above `shard_bytes`), plus `extra` JSON files ({file name: content}); atomic: the directory appears
    complete or not at all. ValueError for non-finite weights or a config diffusers cannot express."""
    out = Path(out)
    config = {**wan_format.diffusers_config(model.cfg), **_diffusers_version()}
    state = {}
    for ours, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"parameter {ours!r} has non-finite values (NaN/inf); nothing written")
        tensor = tensor.detach().cpu()
        state[wan_format.their_name(ours, "diffusers")] = (
            wan_format.head_rows(tensor, model.cfg, to_videodit=False) if wan_format.is_head(ours) else tensor
        ).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging, old = (out.parent / f".{out.name}.{os.getpid()}.{tag}" for tag in ("tmp", "old"))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()  # mode 0777 less the umask, as the final directory should have
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_shards(state, staging, shard_bytes)
        for name, content in (extra or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2) + "\n")
        if out.exists():
            out.rename(old)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def _write_shards(state: dict[str, torch.Tensor], directory: Path, shard_bytes: int) -> None:
    shards, size = [{}], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"{WEIGHTS_NAME}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _diffusers_version() -> dict:
    """{"_diffusers_version": the installed one}, or nothing without diffusers (from_pretrained does not need it)."""
    try:
        import diffusers
    except ImportError:
        return {}
    return {"_diffusers_version": diffusers.__version__}
