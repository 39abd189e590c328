"""A compact Wan2.1-style video DiT (velocity prediction for rectified flow).

x [B, C, T, H, W] -> Conv3d patchify (patch (pt, ph, pw)) -> N = T/pt · H/ph · W/pw tokens ->
blocks (adaLN self-attention with 3D RoPE and q/k-norm, cross-attention to text, GELU FFN) ->
modulated LayerNorm -> zero-initialised linear head -> unpatchify to x's shape.
Time: RF time s in [0, 1] (0 = data), scaled by `time_scale` (Wan uses 1000) into a sinusoidal
embedding -> MLP (+ optionally the projected mean text token) -> a 6·dim projection shared by all
blocks. Text: [B, L, text_dim] -> MLP -> dim, the cross-attention context.
Every op supports backward and forward-mode AD (JVP with respect to x and time).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vdistill.models import context_parallel
from vdistill.models.config_fields import check_fields, from_dict
from vdistill.models.layers import DiTBlock, layer_norm, modulate, upcast
from vdistill.models.rope import grid_position_code, rope_split, rope_tables

POSITION_CODE_DIM = 32  # sinusoidal channels per axis of the absolute position code


@dataclass
class DiTConfig:
    in_channels: int = 16  # latent channels (Wan2.1 VAE: 16)
    patch: tuple[int, int, int] = (1, 2, 2)  # (frames, rows, columns) per token
    dim: int = 1536  # model width
    heads: int = 12  # head dim = dim / heads
    layers: int = 30  # DiT blocks
    ffn_dim: int = 8960  # hidden width of each block's GELU FFN
    text_dim: int = 4096  # width of the text encoder's token embeddings (umT5-XXL: 4096)
    freq_dim: int = 256  # sinusoidal time-embedding width
    time_scale: float = 1000.0  # s in [0, 1] is embedded as s · time_scale
    rope_theta: float = 10000.0  # RoPE base θ
    eps: float = 1e-6  # epsilon of the layer and RMS norms
    # Add a learned projection of a fixed sinusoidal (frame, row, column) code to the patch tokens.
    # RoPE alone is relative: from pure noise the network cannot tell frame 0 from frame 7, so at high
    # noise it cannot predict a frame-dependent mean. Wan2.1 has none (diagnosis: docs/results/first-teacher.md).
    absolute_positions: bool = False
    # Add a linear projection of the mean text token to the time embedding (the pooled-text adaLN
    # input of SD3/Flux; Wan2.1 has none). Cross-attention can starve a word (a softmax weight near 0
    # has a gradient near 0); this path carries every word into every block's modulation with no
    # softmax in between (diagnosis: docs/results/first-teacher.md, "Third look").
    pooled_text: bool = False
    # Pad text embeddings shorter than this with zero tokens (None: use them as given). Wan2.1 pads every prompt to
    # 512 umT5 tokens and attends to the padding without a mask, so a Wan model needs 512 to match its release.
    text_len: int | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        self.patch = tuple(self.patch)
        if min(self.patch) < 1:
            raise ValueError(f"patch must be three positive ints (t, h, w), got {self.patch}")
        small = [n for n in ("in_channels", "dim", "heads", "layers", "ffn_dim", "text_dim", "freq_dim")
                 if getattr(self, n) < 1]
        if small:
            raise ValueError(f"DiTConfig: {', '.join(f'{n}={getattr(self, n)}' for n in small)} must be >= 1")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even (sine and cosine halves), got {self.freq_dim}")
        if self.text_len is not None and self.text_len < 1:
            raise ValueError(f"text_len must be None or >= 1, got {self.text_len}")
        if min(self.time_scale, self.rope_theta, self.eps) <= 0:
            raise ValueError(f"time_scale, rope_theta and eps must be > 0, got {self.time_scale}, {self.rope_theta}, "
                             f"{self.eps}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        rope_split(self.dim // self.heads)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DiTConfig:
        """The config stored in a model file or checkpoint; ValueError naming a wrong or unknown field."""
        return from_dict(cls, values)


DIT_CONFIGS: dict[str, DiTConfig] = {
    # unit tests on CPU
    "tiny": DiTConfig(
        in_channels=3, patch=(1, 2, 2), dim=48, heads=2, layers=2, ffn_dim=96, text_dim=16, freq_dim=32
    ),
    # the moving-shapes benchmark (3×8×32×32 clips -> 8·8·8 = 512 tokens)
    "small": DiTConfig(
        in_channels=3, patch=(1, 4, 4), dim=192, heads=3, layers=6, ffn_dim=512, text_dim=64, freq_dim=128
    ),
    # benchmark shapes of the real models
    "wan-1.3b": DiTConfig(),
    "wan-14b": DiTConfig(dim=5120, heads=40, layers=40, ffn_dim=13824),
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """A registry config by name, with field overrides (e.g. layers=2)."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT size {name!r}; choose from {sorted(DIT_CONFIGS)}")
    return DiTConfig(**{**DIT_CONFIGS[name].to_dict(), **overrides})


def sinusoidal_embedding(x: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """[B] -> [B, dim] of scale·x with cos in the first half and sin in the second, computed in float64 as Wan2.1
    does (at 1000·s a float32 argument is off by up to ~3e-5 rad); returned in float32 (float64 for float64 x)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=x.device) / half)
    args = (x.double() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(torch.promote_types(x.dtype, torch.float32))


class VideoDiT(nn.Module):
    """Wan2.1-style DiT. forward(x [B,C,T,H,W], time [B], text [B,L,text_dim]) -> velocity, x's shape."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.text_embed = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.position_embed = None
        if cfg.absolute_positions:
            # zero-initialised: a model without the path loads and behaves unchanged
            self.position_embed = nn.Linear(3 * POSITION_CODE_DIM, cfg.dim)
            nn.init.zeros_(self.position_embed.weight)
            nn.init.zeros_(self.position_embed.bias)
        self.text_pool = None
        if cfg.pooled_text:
            self.text_pool = nn.Linear(cfg.text_dim, cfg.dim)  # zero-initialised like position_embed
            nn.init.zeros_(self.text_pool.weight)
            nn.init.zeros_(self.text_pool.bias)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.eps) for _ in range(cfg.layers)
        )
        self.head_modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.head = nn.Linear(cfg.dim, cfg.in_channels * math.prod(cfg.patch))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._code_cache: dict[tuple, torch.Tensor] = {}
        # activation checkpointing (a training switch, not part of the config): with grad enabled each block
        # keeps only its input and recomputes its activations in the backward; no_grad and JVP passes unchanged
        self.checkpoint_blocks = False

    @property
    def compile_blocks(self) -> bool:
        """Whether the blocks run through torch.compile (a speed switch: the same function, fewer kernel launches);
        forward-mode AD passes and context-parallel shards run them eagerly."""
        return all(block.compiled for block in self.blocks)

    @compile_blocks.setter
    def compile_blocks(self, on: bool) -> None:
        for block in self.blocks:
            block.compiled = on

    def token_grid(self, x_shape: torch.Size | tuple[int, ...]) -> tuple[int, int, int]:
        """(T', H', W') token grid for an input of shape [B, C, T, H, W]; ValueError if it does not tile."""
        if len(x_shape) != 5:
            raise ValueError(f"x must be [B, C, T, H, W], got shape {tuple(x_shape)}")
        if x_shape[1] != self.cfg.in_channels:
            raise ValueError(f"x has {x_shape[1]} channels, the model expects {self.cfg.in_channels}")
        dims = x_shape[2:]
        if any(d % p for d, p in zip(dims, self.cfg.patch)):
            raise ValueError(f"x's (T, H, W) = {tuple(dims)} must be divisible by the patch {self.cfg.patch}")
        return tuple(d // p for d, p in zip(dims, self.cfg.patch))

    def _rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(grid, self.cfg.head_dim, self.cfg.rope_theta, device)
        return self._rope_cache[key]

    def _position_code(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        key = (grid, str(device))
        if key not in self._code_cache:
            self._code_cache[key] = grid_position_code(grid, POSITION_CODE_DIM).to(device)
        return self._code_cache[key]

    def forward(self, x: torch.Tensor, time: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        grid = self.token_grid(x.shape)
        b = x.shape[0]
        if time.shape != (b,):
            raise ValueError(f"time must have shape [B]=[{b}], got {list(time.shape)}")
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != self.cfg.text_dim:
            raise ValueError(f"text must be [B={b}, L, text_dim={self.cfg.text_dim}], got {list(text.shape)}")
        if self.cfg.text_len is not None:
            text = self._pad_text(text)

        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        if self.position_embed is not None:
            tokens = tokens + self.position_embed(self._position_code(grid, x.device).to(tokens.dtype))
        temb = self.time_embed(
            sinusoidal_embedding(time, self.cfg.freq_dim, self.cfg.time_scale).to(x.dtype)
        )
        if self.text_pool is not None:
            temb = temb + self.text_pool(text.to(x.dtype).mean(1))
        time_mod = self.time_proj(temb).unflatten(1, (6, self.cfg.dim))  # (B, 6, dim)
        context = self.text_embed(text.to(x.dtype))  # (B, L, dim)
        rope = self._rope(grid, x.device)
        group = context_parallel.active_group()
        shard = None if group is None else context_parallel.TokenShard.of(group, tokens.shape[1])
        if shard is not None:  # this rank's tokens and their position codes
            tokens, rope = shard.split(tokens), tuple(shard.split(table, dim=0) for table in rope)
        recompute = self.checkpoint_blocks and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # no RNG inside a block: nothing to preserve for the recomputation
                args = (tokens, time_mod, context, rope, shard)
                tokens = checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)
            else:
                tokens = block(tokens, time_mod, context, rope, shard)

        shift, scale = (upcast(self.head_modulation) + upcast(temb)[:, None]).to(tokens.dtype).unbind(1)
        out = self.head(modulate(layer_norm(tokens, self.cfg.eps), shift[:, None], scale[:, None]))
        if shard is not None:
            out = shard.gather(out)
        return self._unpatchify(out, grid)

    def _pad_text(self, text: torch.Tensor) -> torch.Tensor:
        """text [B, L, text_dim] with zero tokens appended up to cfg.text_len; ValueError if L is longer."""
        missing = self.cfg.text_len - text.shape[1]
        if missing < 0:
            raise ValueError(f"text has {text.shape[1]} tokens, more than the model's text_len {self.cfg.text_len}")
        return torch.cat([text, text.new_zeros(text.shape[0], missing, text.shape[2])], dim=1) if missing else text

    def _unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, C·pt·ph·pw) -> (B, C, T, H, W)."""
        (t, h, w), (pt, ph, pw) = grid, self.cfg.patch
        out = out.reshape(out.shape[0], t, h, w, self.cfg.in_channels, pt, ph, pw)
        out = out.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(out.shape[0], self.cfg.in_channels, t * pt, h * ph, w * pw)


def build_dit(name_or_cfg: str | DiTConfig, device: torch.device | str = "cpu", **overrides) -> VideoDiT:
    """Build a DiT from a registry name or config. device="meta" allocates nothing (benchmarks)."""
    cfg = dit_config(name_or_cfg, **overrides) if isinstance(name_or_cfg, str) else name_or_cfg
    with torch.device(device):
        return VideoDiT(cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DIT_CONFIGS", "DiTConfig", "VideoDiT", "build_dit", "count_params", "dit_config"]
