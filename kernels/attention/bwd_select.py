"""Which attention backward runs on CUDA: our Triton kernels, or PyTorch's FlashAttention-2 backward
fed with our O and LSE.

Both compute the same formulas from the same O and LSE (FlashAttention-2 Algorithm 2; Δ = rowsum(dO⊙O)
uses our O), so both are exact. The Triton backward is the default: faster on the H200 from 8k tokens
and on cross-attention (slower at 4k), deterministic (no atomics), and it takes fp32. Measured on an
H200: docs/results/attention.md (backward). The choice, VDISTILL_ATTN_BWD:
  "triton" (default) always the Triton kernels.
  "auto"            fp16/bf16 -> the flash backward, validated once per process against the Triton
                    kernels on the first call (any error or disagreement -> Triton from then on);
                    fp32, or torch.use_deterministic_algorithms(True) -> Triton.
  "sdpa-flash"      always the flash backward (errors are raised).
`BACKEND` may also be set at run time (the benchmark times both).
"""

from __future__ import annotations

import logging
import os

import torch

from vdistill.kernels.attention.bwd import attention_bwd_triton

logger = logging.getLogger(__name__)

BACKEND = os.environ.get("VDISTILL_ATTN_BWD", "triton")
_flash_state: dict[str, bool] = {}  # "validated" -> True (use it) / False (disabled)


def _flash_bwd(do, q, k, v, o, lse, scale: float):
    """aten's flash-attention backward; q/k/v/o/do in [B, H, N, D] (any strides with unit D stride)."""
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)  # dropout 0: the RNG state is never read
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, False, seed, offset, scale=scale
    )
    # the op's fake implementation promises each gradient in its primal's layout
    return tuple(g if g.stride() == p.stride() else torch.empty_like(p).copy_(g) for g, p in zip(grads, (q, k, v)))


def _agree(got, want) -> bool:
    return all(
        bool((g.float() - w.float()).abs().max() <= 0.02 * w.float().abs().max() + 1e-3) for g, w in zip(got, want)
    )


def attention_bwd_cuda(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) for do/q/o [B, H, Nq, D], k/v [B, H, Nk, D], lse [B, H, Nq] fp32, by `BACKEND`."""
    if BACKEND not in ("auto", "triton", "sdpa-flash"):
        raise ValueError(f"VDISTILL_ATTN_BWD must be auto, triton or sdpa-flash, got {BACKEND!r}")
    if BACKEND == "sdpa-flash":
        return _flash_bwd(do, q, k, v, o, lse, scale)
    half = q.dtype in (torch.float16, torch.bfloat16) and all(t.stride(-1) == 1 for t in (do, q, k, v, o))
    if BACKEND == "triton" or not half or torch.are_deterministic_algorithms_enabled():
        return attention_bwd_triton(do, q, k, v, o, lse, scale)
    if _flash_state.get("validated") is False:
        return attention_bwd_triton(do, q, k, v, o, lse, scale)
    try:
        grads = _flash_bwd(do, q, k, v, o, lse, scale)
    except (RuntimeError, TypeError, NotImplementedError) as exc:  # e.g. a GPU or torch build without it
        logger.warning("flash-attention backward unavailable (%s); using the Triton backward", str(exc)[:200])
        _flash_state["validated"] = False
        return attention_bwd_triton(do, q, k, v, o, lse, scale)
    if "validated" not in _flash_state:
        ours = attention_bwd_triton(do, q, k, v, o, lse, scale)
        _flash_state["validated"] = _agree(grads, ours)
        if not _flash_state["validated"]:
            logger.warning("flash-attention backward disagrees with the Triton backward; using the Triton one")
            return ours
    return grads
