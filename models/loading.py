"""`load_model`: any model vdistill can use, as a VideoDiT whose forward(x, s, text) takes RF time s in [0, 1].

Formats: a vdistill .safetensors export (with its config in the metadata), a diffusers `WanTransformer3DModel`
directory (or a whole diffusers pipeline directory: its transformer/), and an original Wan-AI Wan2.1 directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vdistill.models.dit import VideoDiT
from vdistill.models.wan_io import read_wan, transformer_dir, wan_layout


def model_format(path: str | Path) -> str:
    """"vdistill", "diffusers" or "wan"; ValueError saying what `path` is instead."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors model file (nor a Wan2.1 transformer directory)")
        return "vdistill"
    if path.is_dir():
        layout = wan_layout(transformer_dir(path))
        if layout is None:
            raise ValueError(f"{path} is a directory but not a Wan2.1 transformer (a config.json with _class_name "
                             "WanTransformer3DModel, diffusers, or WanModel, the original Wan-AI layout)")
        return layout
    raise FileNotFoundError(f"model {path} does not exist")


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> VideoDiT:
    """The model at `path` (see `model_format`) in eval mode, in its stored dtype or `dtype`, on `device`."""
    if model_format(path) == "vdistill":
        from vdistill.methods.train.checkpoint import load_dit

        model, _ = load_dit(path, device)
        return model if dtype is None else model.to(dtype)
    return read_wan(path, dtype, device)
