"""Text conditioning: the encoder interface, a frozen word encoder, and precomputed embeddings.

The DiT cross-attends to text tokens [B, L, D]. Two sources implement :class:`TextEncoder`:

* :class:`WordTextEncoder` — for the moving-shapes benchmark: a fixed random vector per
  vocabulary word plus the sinusoidal position code of Vaswani et al. (2017, Sec. 3.5),
  zeros at padding. Deterministic from its seed, never trained (like a frozen T5 in Wan2.1).
* :class:`PrecomputedText` — the real-data path: embeddings computed offline by a large
  encoder (e.g. umT5) and looked up by prompt.

``null(B)`` is the embedding of the empty prompt, used for CFG dropout and the unconditional
branch (v = v_u + w (v_c - v_u)).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from vdistill.methods.data.shapes import COLOURS, DIRECTIONS, SHAPES
from vdistill.models.rope import sinusoidal_positions

VOCABULARY: tuple[str, ...] = ("a", "moving", *SHAPES, *COLOURS, *DIRECTIONS)


@runtime_checkable
class TextEncoder(Protocol):
    """Maps prompts to token embeddings [B, max_len, dim] float32."""

    dim: int
    max_len: int

    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Token embeddings [B, max_len, dim] float32 for ``prompts``."""
        ...

    def null(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Embedding of the empty prompt, repeated: [batch, max_len, dim] float32."""
        ...


class WordTextEncoder:
    """Frozen word-level encoder for the benchmark prompts.

    Token i of a prompt = E[word_i] + P[i]; E [V, dim] ~ N(0, 1) from ``seed``, P sinusoidal.
    Positions past the prompt are zero, so the empty prompt (and ``null``) is all zeros.
    """

    def __init__(self, dim: int = 64, max_len: int = 8, seed: int = 0,
                 vocabulary: tuple[str, ...] = VOCABULARY) -> None:
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even int >= 2, got {dim}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary has duplicate words")
        self.dim = dim
        self.max_len = max_len
        self.vocabulary = vocabulary
        self._index = {word: i for i, word in enumerate(vocabulary)}
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(vocabulary), dim, generator=gen)  # [V, dim]
        self.positions = sinusoidal_positions(max_len, dim)  # [L, dim]

    def tokens(self, prompt: str) -> list[int]:
        """Vocabulary ids of the words of ``prompt``; unknown or too many words -> ValueError."""
        words = prompt.lower().split()
        if len(words) > self.max_len:
            raise ValueError(f"prompts: {prompt!r} has {len(words)} words, max_len is {self.max_len}")
        unknown = [w for w in words if w not in self._index]
        if unknown:
            raise ValueError(f"prompts: unknown word(s) {unknown} in {prompt!r}; "
                             f"vocabulary: {list(self.vocabulary)}")
        return [self._index[w] for w in words]

    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Token embeddings [B, max_len, dim] float32; rows past each prompt's length are zero."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        out = torch.zeros(len(prompts), self.max_len, self.dim)
        for b, prompt in enumerate(prompts):
            ids = self.tokens(prompt)
            n = len(ids)
            out[b, :n] = self.table[ids] + self.positions[:n]
        return out.to(device) if device is not None else out

    def null(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Empty-prompt embedding [batch, max_len, dim]: zeros."""
        return torch.zeros(batch, self.max_len, self.dim, device=device)


class PrecomputedText:
    """Prompt -> embedding lookup for embeddings computed offline by a large text encoder.

    ``embeddings`` maps each prompt to [L_i, dim] (L_i <= max_len); shorter ones are zero-padded.
    The empty prompt "" is the null embedding if present, zeros otherwise.
    """

    def __init__(self, embeddings: Mapping[str, torch.Tensor], max_len: int | None = None) -> None:
        if not embeddings:
            raise ValueError("embeddings must not be empty")
        dims = {tuple(e.shape[1:]) for e in embeddings.values()}
        if any(e.dim() != 2 for e in embeddings.values()) or len(dims) != 1:
            raise ValueError(f"embeddings: every value must be [L, dim] with one dim, got {sorted(dims)}")
        longest = max(e.shape[0] for e in embeddings.values())
        self.max_len = longest if max_len is None else max_len
        if longest > self.max_len:
            raise ValueError(f"embeddings: a prompt has {longest} tokens > max_len={self.max_len}")
        self.dim = int(next(iter(dims))[0])
        self._table = {p: e.detach().float() for p, e in embeddings.items()}
        for p, e in self._table.items():
            if not torch.isfinite(e).all():
                raise ValueError(f"embeddings: non-finite values for prompt {p!r}")

    @classmethod
    def from_tensor(cls, prompts: list[str], embeddings: torch.Tensor) -> PrecomputedText:
        """Build from prompts and a stacked tensor [N, L, dim]."""
        if embeddings.dim() != 3 or embeddings.shape[0] != len(prompts):
            raise ValueError(f"embeddings: expected [{len(prompts)}, L, dim], got {list(embeddings.shape)}")
        return cls(dict(zip(prompts, embeddings, strict=True)), max_len=embeddings.shape[1])

    def _padded(self, e: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.max_len, self.dim)
        out[: e.shape[0]] = e
        return out

    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Embeddings [B, max_len, dim] float32; an unknown prompt -> ValueError."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        missing = [p for p in prompts if p not in self._table]
        if missing:
            raise ValueError(f"prompts: no precomputed embedding for {missing[:3]}")
        out = torch.stack([self._padded(self._table[p]) for p in prompts]) if prompts else \
            torch.zeros(0, self.max_len, self.dim)
        return out.to(device) if device is not None else out

    def null(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Empty-prompt embedding [batch, max_len, dim]: the stored "" entry, else zeros."""
        base = self._padded(self._table[""]) if "" in self._table else torch.zeros(self.max_len, self.dim)
        return base.expand(batch, -1, -1).contiguous().to(device or "cpu")
