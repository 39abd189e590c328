"""Context parallelism (DeepSpeed-Ulysses): each clip's tokens split over the ranks of a group.

Inside `use(group)` every `VideoDiT` forward keeps N/C of its tokens on each of the C ranks (padded to a multiple of
C; rank r holds tokens [r·n, (r+1)·n)). Token-wise layers (norms, modulation, projections, FFN, cross-attention to the
replicated text) run on the local tokens as they are; self-attention exchanges them all-to-all so that each rank
holds all N tokens of H/C heads, runs the unchanged attention kernel (forward, backward, fused JVP) on exactly the N
real tokens (the padding is cut before and restored after), and exchanges back. The head's output is all-gathered,
so every rank returns the whole prediction.

All three collectives are autograd Functions with a `jvp` (forward-mode tangents take the same, linear, exchange)
and a backward. Gradient convention: every rank of a group computes the same loss from the same clips and noise; the
gather's backward sums the ranks' output gradients, so each rank's parameter gradients are C times the part due to
its own tokens, and averaging them over the group (DDP / FSDP average over all ranks) gives exactly the gradient of
the single-process loss. Evidence and the layout of data-parallel × context-parallel ranks: docs/multi-gpu.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

_group: dist.ProcessGroup | None = None


@contextlib.contextmanager
def use(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Within the block, DiT forwards split their tokens over `group` (None or a one-rank group: not at all)."""
    global _group
    previous, _group = _group, group
    try:
        yield
    finally:
        _group = previous


def active_group() -> dist.ProcessGroup | None:
    return _group if _group is not None and dist.get_world_size(_group) > 1 else None


def _exchange(x: torch.Tensor, group: dist.ProcessGroup, split_dim: int, cat_dim: int) -> torch.Tensor:
    """All-to-all: chunk i of `x` along `split_dim` goes to rank i; the received chunks are joined along `cat_dim`."""
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=split_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=cat_dim)


class _AllToAll(torch.autograd.Function):
    """`_exchange` with backward (the reverse exchange) and forward-mode AD (the same exchange of the tangent)."""

    @staticmethod
    def forward(x, group, split_dim, cat_dim):
        return _exchange(x, group, split_dim, cat_dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.group, ctx.split_dim, ctx.cat_dim = inputs

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.cat_dim, ctx.split_dim), None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        return _exchange(tangent, ctx.group, ctx.split_dim, ctx.cat_dim)


def _gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class _GatherTokens(torch.autograd.Function):
    """[B, n, ...] per rank -> [B, C·n, ...] on every rank; backward: the ranks' gradients summed, this rank's part."""

    @staticmethod
    def forward(x, group):
        return _gather(x, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.group = inputs
        ctx.rank, ctx.local = dist.get_rank(ctx.group), x.shape[1]

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter; the output is small (one clip's pixels)
        return grad.narrow(1, ctx.rank * ctx.local, ctx.local), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _gather(tangent, ctx.group)


@dataclass(frozen=True)
class TokenShard:
    """This rank's share of a sequence of `tokens` tokens: [rank·local, (rank+1)·local) of the sequence padded to
    size·local."""

    group: dist.ProcessGroup
    size: int
    rank: int
    tokens: int

    @classmethod
    def of(cls, group: dist.ProcessGroup, tokens: int) -> TokenShard:
        return cls(group, dist.get_world_size(group), dist.get_rank(group), tokens)

    @property
    def local(self) -> int:
        return math.ceil(self.tokens / self.size)

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of x along `dim` (the sequence: 1 of [B, N, ...], 0 of a table [N, ...])."""
        pad = self.size * self.local - self.tokens
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - dim - 1) + (0, pad))
        return x.narrow(dim, self.rank * self.local, self.local)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence [B, N, ...] on every rank from each rank's [B, local, ...]."""
        return _GatherTokens.apply(x, self.group).narrow(1, 0, self.tokens)

    def heads_to_all_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, local, H, D] per rank -> [B, N, H/size, D]: all real tokens of this rank's heads."""
        if x.shape[2] % self.size:
            raise ValueError(f"context parallelism over {self.size} ranks needs heads divisible by {self.size}, got "
                             f"{x.shape[2]} heads")
        return _AllToAll.apply(x, self.group, 2, 1).narrow(1, 0, self.tokens)

    def all_tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `heads_to_all_tokens`: [B, N, H/size, D] -> [B, local, H, D]."""
        pad = self.size * self.local - self.tokens
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return _AllToAll.apply(x, self.group, 1, 2)
