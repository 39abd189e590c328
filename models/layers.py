"""Building blocks of the Wan-style DiT: RMS norm, self/cross attention with q/k-norm, FFN, block.

Every attention goes through `kernels.attention`, so the whole network supports backward and
forward-mode AD on CPU (reference) and GPU (Triton). Norms compute in float32 (float64 stays
float64) and return the input dtype, so that q, k and v reach the attention kernel in one dtype
under autocast.
"""

from __future__ import annotations

import functools

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from vdistill.kernels.attention import attention
from vdistill.models.context_parallel import TokenShard
from vdistill.models.rope import apply_rope


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 for numerically sensitive math; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight over the last dim (weight optional)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = upcast(x)
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * upcast(self.weight)
        return y.to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters, in float32, returning x's dtype."""
    return F.layer_norm(upcast(x), x.shape[-1:], eps=eps).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift, with shift/scale [B, 1, D] broadcast over tokens."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention with RMS q/k-norm over the full width; self (RoPE) or cross (no RoPE)."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(
        self,
        x: torch.Tensor,  # (B, N, dim)
        context: torch.Tensor | None = None,  # (B, L, dim) for cross-attention
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # rope_tables' cos/sin (N, head_dim)
        shard: TokenShard | None = None,  # context parallelism: x holds this rank's tokens (self-attention only)
    ) -> torch.Tensor:
        src = x if context is None else context
        b, n, _ = x.shape
        q, k = self._queries_keys(x, src)
        v = self.v(src).unflatten(-1, (self.heads, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dtype = v.dtype
        q, k = q.to(dtype), k.to(dtype)
        if shard is not None:  # Ulysses: all tokens of H/C heads in, this rank's tokens of all heads out
            q, k, v = (shard.heads_to_all_tokens(t) for t in (q, k, v))
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        if shard is not None:
            out = shard.all_tokens_to_heads(out)
        return self.o(out.reshape(b, n, -1))

    def _queries_keys(self, x: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.heads, -1))  # (B, N, H, Dh)
        k = self.norm_k(self.k(src)).unflatten(-1, (self.heads, -1))  # (B, M, H, Dh)
        return q, k

    def cross_weights(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention probabilities (B, H, N, L) of queries x (B, N, dim) over context (B, L, dim):
        a diagnostic (which text tokens each head reads), not used by forward."""
        q, k = self._queries_keys(x, context)
        logits = upcast(q).transpose(1, 2) @ upcast(k).permute(0, 2, 3, 1)
        return (logits * q.shape[-1] ** -0.5).softmax(-1)


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Wan2.1 block: adaLN-modulated self-attention, cross-attention to text, adaLN-modulated FFN.

    The 6 modulation vectors (shift/scale/gate for attention and FFN) are the model-wide time
    projection plus this block's learned bias, as in Wan2.1.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.self_attn = Attention(dim, heads, eps=eps)
        self.norm_cross = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, heads, eps=eps)
        self.ffn = FeedForward(dim, ffn_dim)
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.compiled = False  # run through torch.compile where it can (`VideoDiT.compile_blocks`)

    def forward(
        self,
        x: torch.Tensor,  # (B, N, dim)
        time_mod: torch.Tensor,  # (B, 6, dim)
        context: torch.Tensor,  # (B, L, dim)
        rope: tuple[torch.Tensor, torch.Tensor],
        shard: TokenShard | None = None,  # context parallelism (models/context_parallel.py)
    ) -> torch.Tensor:
        if self.compiled and shard is None and not _forward_ad(x, time_mod, context):
            return _compiled_block_forward()(self, x, time_mod, context, rope)
        return self._forward(x, time_mod, context, rope, shard)

    def _forward(self, x, time_mod, context, rope, shard=None) -> torch.Tensor:
        mod = (upcast(self.modulation) + upcast(time_mod)).to(x.dtype)
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unbind(1)
        h = modulate(layer_norm(x, self.eps), shift_a[:, None], scale_a[:, None])
        x = x + gate_a[:, None] * self.self_attn(h, rope=rope, shard=shard)
        x = x + self.cross_attn(self.norm_cross(x), context=context)
        h = modulate(layer_norm(x, self.eps), shift_f[:, None], scale_f[:, None])
        return x + gate_f[:, None] * self.ffn(h)


def _forward_ad(*tensors: torch.Tensor) -> bool:
    """Whether a forward-mode AD pass is running on these inputs (dual tensors, or inside torch.func): Dynamo
    cannot trace those (pytorch/pytorch#160508), so blocks run eagerly there (docs/profiling.md)."""
    if torch._C._functorch.maybe_current_level() is not None:
        return True
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


@functools.cache
def _compiled_block_forward():
    """`DiTBlock._forward` through torch.compile: one compiled program shared by every block (their weights
    are its inputs), compiled on first use for each shape and grad mode."""
    return torch.compile(DiTBlock._forward)
