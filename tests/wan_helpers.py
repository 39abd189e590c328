"""Tiny random Wan2.1 transformers for the interop tests (diffusers' `WanTransformer3DModel`; no downloads), and the
original Wan-AI layout of their weights, written here from diffusers' own converter's names (checked against it)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

CHANNELS, TEXT_DIM = 4, 32
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=CHANNELS,
            out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)


def tiny_wan(seed: int = 0) -> WanTransformer3DModel:
    """2 layers, 2 heads x 24 (RoPE split 8/8/8), every parameter re-drawn: several start at zero."""
    model = WanTransformer3DModel(**TINY).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1:].numel() ** 0.5)
            else:  # biases, norm gains, modulation tables
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if "norm" in name else 0.0))
    return model


# diffusers name -> original Wan name (the inverse of diffusers' TRANSFORMER_KEYS_RENAME_DICT for T2V)
_TO_ORIGINAL = [
    (r"condition_embedder\.time_embedder\.linear_(\d)", lambda m: f"time_embedding.{2 * int(m[1]) - 2}"),
    (r"condition_embedder\.text_embedder\.linear_(\d)", lambda m: f"text_embedding.{2 * int(m[1]) - 2}"),
    (r"condition_embedder\.time_proj", lambda m: "time_projection.1"),
    (r"\.attn1\.", lambda m: ".self_attn."), (r"\.attn2\.", lambda m: ".cross_attn."),
    (r"\.to_out\.0\.", lambda m: ".o."), (r"\.to_([qkv])\.", lambda m: f".{m[1]}."),
    (r"\.ffn\.net\.0\.proj\.", lambda m: ".ffn.0."), (r"\.ffn\.net\.2\.", lambda m: ".ffn.2."),
    (r"\.norm2\.", lambda m: ".norm3."),
    (r"^(blocks\.\d+)\.scale_shift_table$", lambda m: f"{m[1]}.modulation"),
    (r"^scale_shift_table$", lambda m: "head.modulation"), (r"^proj_out\.", lambda m: "head.head."),
]


def original_state(model: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in model.state_dict().items():
        for pattern, repl in _TO_ORIGINAL:
            key = re.sub(pattern, repl, key)
        out[key] = tensor.clone()
    return out


def original_config(**overrides) -> dict:
    """config.json of the original release for TINY (fields the release leaves out are spelled here)."""
    return {"_class_name": "WanModel", "model_type": "t2v", "patch_size": [1, 2, 2], "text_len": 512,
            "in_dim": CHANNELS, "dim": 48, "ffn_dim": 64, "freq_dim": 32, "text_dim": TEXT_DIM, "out_dim": CHANNELS,
            "num_heads": 2, "num_layers": 2, "eps": 1e-6, **overrides}


def save_original(model: WanTransformer3DModel, directory: Path, **config) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(original_config(**config)))
    save_file(original_state(model), str(directory / "diffusion_pytorch_model.safetensors"))
    return directory


def diffusers_forward(model, x: torch.Tensor, s: torch.Tensor, text: torch.Tensor, text_len: int = 512):
    """diffusers' forward at RF time s (its timestep is 1000·s, formed in float64: in float32 1000·s is off by up
    to 3e-5) with the text zero-padded to `text_len` tokens, as Wan's pipeline pads it."""
    padded = torch.cat([text, text.new_zeros(text.shape[0], text_len - text.shape[1], text.shape[2])], dim=1)
    return model(x, 1000 * s.double(), padded, return_dict=False)[0]


def float64_time_sinusoid(model):
    """`model` with diffusers' time sinusoid (cos first, frequencies 10000^(-i/half)) computed in float64."""
    half = model.config.freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)

    def sinusoid(t):
        args = t.double()[:, None] * freqs
        return torch.cat([args.cos(), args.sin()], dim=-1).float()

    model.condition_embedder.timesteps_proj.forward = sinusoid
    return model
