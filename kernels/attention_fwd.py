"""Flash-attention forward in Triton: O = softmax(c·QKᵀ)V and the row log-sum-exp, in one pass.

Online softmax (Dao et al. 2022, FlashAttention-2 §3.1): per query block keep the running row max
m, the row sum l of the unnormalised probabilities P̃ = exp(S − m) and Õ = P̃V; when the max
grows by Δ, rescale l and Õ by α = exp(−Δ). Epilogue O = Õ/l, LSE = m + log l. Exponentials use
exp2 with log2(e) folded into the scale. Accumulators are fp32; `tl.dot` takes the input dtype
(fp16/bf16 on tensor cores; fp32 inputs use TF32 on GPUs that have it, so fp32 results there are
TF32-accurate, not IEEE).

Layout: [B, H, N, D] with arbitrary strides (a transposed view of a [B, N, H, D] tensor is read
in place). Sequence lengths are masked, never assumed to be multiples of the block.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels._dispatch import INTERPRET

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
AUTOTUNE = os.environ.get("VDISTILL_ATTN_AUTOTUNE", "1") != "0"


def configs(specs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Autotune configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) rows.

    Under the interpreter one small config (so that tiny test lengths span several blocks);
    with VDISTILL_ATTN_AUTOTUNE=0 only the first row (no autotuning, fastest start-up).
    """
    if INTERPRET:
        specs = [(16, 16, 1, 1)]
    elif not AUTOTUNE:
        specs = specs[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in specs]


def prune_for_head_dim(cfgs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop 128×128 tiles for D=128 (they spill registers); keep at least one config."""
    d = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM"))
    kept = [c for c in cfgs if not (d is not None and d >= 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64)]
    return kept or cfgs[:1]


def n_bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two (so 32760 and 32768 share a config)."""
    return triton.next_power_of_2(max(int(n), 1))


# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first row is the no-autotune default.
FWD_CONFIGS = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)]


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_n, N_K, stride_kn, stride_vn, qk_scale, MASK_N: tl.constexpr):
    """One KV block of the online softmax (FlashAttention-2 inner loop), masked only for the tail."""
    kn = start_n + offs_n
    if MASK_N:
        valid = kn < N_K
        k = tl.load(k_ptrs + kn[:, None] * stride_kn, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs + kn[:, None] * stride_vn, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + kn[:, None] * stride_kn)
        v = tl.load(v_ptrs + kn[:, None] * stride_vn)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
    if MASK_N:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None])
    return acc, l_i, m_new


@triton.autotune(
    configs=configs(FWD_CONFIGS),
    key=["NQ_KEY", "NK_KEY", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": prune_for_head_dim},
)
@triton.jit(do_not_specialize=["N_Q", "N_K", "NQ_KEY", "NK_KEY"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, qk_scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, slb, slh,
    H, N_Q, N_K, NQ_KEY, NK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < N_Q

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_m[:, None], other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_n, N_K, skn, svn, qk_scale, False)
    if n_full < N_K:
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, n_full, offs_n, N_K, skn, svn, qk_scale, True)

    o = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, o.to(O.dtype.element_ty), mask=mask_m[:, None])
    tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=mask_m)


def attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. q [B, H, Nq, D], k/v [B, H, Nk, D] -> (O [B, H, Nq, D], LSE [B, H, Nq] fp32).

    Inputs must already be validated (`kernels.attention._check_kernel_inputs`). O has q's layout.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), lse.stride(0), lse.stride(1),
        H, Nq, Nk, n_bucket(Nq), n_bucket(Nk),
        HEAD_DIM=D,
    )
    return o, lse

