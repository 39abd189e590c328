"""3D rotary position embedding over (frame, row, column) token grids, Wan2.1 style, and an
absolute sinusoidal code of the same grid (optional, see DiTConfig.absolute_positions).

The head dim D is split into three even parts: rows and columns get 2·(D // 6) channels each and
frames the rest (for D = 128: 44 / 42 / 42). Each part rotates pairs of channels by
angle = position · θ^(-2i/d_part). Implemented with real cos/sin tables (no complex tensors) so
that forward- and reverse-mode AD pass through unchanged; the tables are full-width and signed so that a
rotation is x·cos + swap(x)·sin, four kernels (their forward-mode tangents four more) instead of eight.
"""

from __future__ import annotations

import math

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels given to (frames, rows, columns) for a head dim; all even."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be even and >= 6 for 3D RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(length: int, dim: int, theta: float, device: torch.device) -> torch.Tensor:
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    return torch.arange(length, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]


def rope_tables(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [N, D] for the tokens of a (T, H, W) grid in row-major order: channel pair (2i, 2i+1) holds
    (cos a_i, cos a_i) and (-sin a_i, sin a_i), a_i the pair's angle."""
    t, h, w = grid
    dt, dh, dw = rope_split(head_dim)
    device = torch.device(device)
    at = _axis_angles(t, dt, theta, device)[:, None, None, :].expand(t, h, w, dt // 2)
    ah = _axis_angles(h, dh, theta, device)[None, :, None, :].expand(t, h, w, dh // 2)
    aw = _axis_angles(w, dw, theta, device)[None, None, :, :].expand(t, h, w, dw // 2)
    angles = torch.cat([at, ah, aw], dim=-1).reshape(t * h * w, head_dim // 2)
    sin = angles.sin()
    return angles.cos().repeat_interleave(2, dim=-1).float(), torch.stack([-sin, sin], dim=-1).flatten(-2).float()


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Position code [length, dim]: sin/cos at geometric frequencies 1 ... 1/10000 (Vaswani Sec. 3.5)."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    code = torch.zeros(length, dim, dtype=torch.float64)
    code[:, 0::2] = torch.sin(pos * freq)
    code[:, 1::2] = torch.cos(pos * freq)
    return code.float()


def grid_position_code(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Absolute position code [N, 3·dim] of a (T, H, W) token grid in row-major order: the
    `sinusoidal_positions` code of the frame, row and column index, concatenated."""
    t, h, w = grid
    frames = sinusoidal_positions(t, dim)[:, None, None].expand(t, h, w, dim)
    rows = sinusoidal_positions(h, dim)[None, :, None].expand(t, h, w, dim)
    cols = sinusoidal_positions(w, dim)[None, None, :].expand(t, h, w, dim)
    return torch.cat([frames, rows, cols], dim=-1).reshape(t * h * w, 3 * dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, N, H, D] by the angles of the `rope_tables` cos/sin [N, D]:
    (x₁ cos − x₂ sin, x₂ cos + x₁ sin), rounded as the two products and their sum."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x₂, x₁) per pair
    return x * cos[None, :, None, :].to(x.dtype) + swapped * sin[None, :, None, :].to(x.dtype)
