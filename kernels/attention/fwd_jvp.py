"""Flash-attention forward + tangent (forward-mode JVP) in ONE Triton pass with online softmax.

With S = c·QKᵀ, P = softmax(S), O = PV and tangents (Q̇, K̇, V̇):
    Ṡ = c(Q̇Kᵀ + QK̇ᵀ),   μ = rowsum(P⊙Ṡ),   Ȯ = (P⊙Ṡ)V − μ⊙O + PV̇.
Streaming over KV blocks with the unnormalised P̃ = exp(S − m): keep l = rowsum(P̃), Õ = P̃V,
T̃ = P̃V̇ + (P̃⊙Ṡ)V (one accumulator) and r = rowsum(P̃⊙Ṡ), all rescaled by the same α when the
running max m grows (lazily: see `fwd._new_max`).
Epilogue: O = Õ/l, μ = r/l, Ȯ = T̃/l − μO.
Per KV block: 6 tile matmuls (QKᵀ, Q̇Kᵀ, QK̇ᵀ, P̃V, P̃V̇, (P̃⊙Ṡ)V), one exp — 12·B·H·Nq·Nk·D FLOPs.
No Nq×Nk tensor is ever stored; extra memory is O and Ȯ plus an fp32 LSE per row.
Q and Q̇ are loaded once per program; fp32 accumulators; exp2 with log2(e) folded into the scale.
`PIPELINE` configs issue block j+1's three score matmuls before block j's softmax (FA3's
intra-warpgroup overlap, by hand); not yet timed on a GPU. Variants tried and not kept (TMA
descriptors, warp specialization, smaller tiles): docs/results/attention.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vdistill.kernels.attention.fwd import _new_max, lazy_tau
from vdistill.kernels.attention.tuning import KEY, LOG2E, configs, fit_smem, launch, n_bucket

# (BLOCK_M, BLOCK_N, num_warps, num_stages, LAZY_RESCALE[, PIPELINE]): two live [BLOCK_M, D] fp32
# accumulators favour narrow KV tiles; the first row is the conservative default. Only rows that fit sm_90
# without register spills at D=128 bf16 (222-255 registers, Triton 3.9 offline: `vdistill bench
# attention-regs`, docs/results/attention.md); 128×64, 64×64 and the 128×32 PIPELINE rows spilled. The
# PIPELINE row carries the next block's S and Ṡ through the loop; the autotuner keeps it only if it wins.
JVP_CONFIGS = [(128, 32, 8, 4, False), (128, 32, 8, 3, False), (128, 32, 8, 4, True), (64, 32, 4, 2, False),
               (128, 16, 8, 4, False), (128, 16, 8, 4, False, True)]


@triton.jit
def _load_rows(ptrs, kn, stride_n, N_K, MASK_N: tl.constexpr):
    """Rows kn of a [N_K, D] block (`ptrs` already offset by the columns); rows past N_K read as 0 if MASK_N."""
    if MASK_N:
        rows = tl.load(ptrs + kn[:, None] * stride_n, mask=(kn < N_K)[:, None], other=0.0)
    else:
        rows = tl.load(ptrs + kn[:, None] * stride_n)
    return rows


@triton.jit
def _jvp_scores(q, tq, k_ptrs, tk_ptrs, start_n, offs_n, N_K, stride_kn, stride_tkn, scale, MASK_N: tl.constexpr):
    """S = QKᵀ (unscaled; -inf past N_K) and Ṡ = c(Q̇Kᵀ + QK̇ᵀ) of one KV block; masked only for the tail."""
    kn = start_n + offs_n
    k = _load_rows(k_ptrs, kn, stride_kn, N_K, MASK_N)
    tk = _load_rows(tk_ptrs, kn, stride_tkn, N_K, MASK_N)
    kt = tl.trans(k)
    s = tl.dot(q, kt)
    sd = tl.dot(q, tl.trans(tk), acc=tl.dot(tq, kt)) * scale
    if MASK_N:
        s = tl.where((kn < N_K)[None, :], s, float("-inf"))
    return s, sd


@triton.jit
def _jvp_update(
    acc_o, acc_t, l_i, r_i, m_i, s, sd, v_ptrs, tv_ptrs, start_n, offs_n, N_K, stride_vn, stride_tvn, qk_scale,
    MASK_N: tl.constexpr, LAZY: tl.constexpr, TAU: tl.constexpr,
):
    """Online-softmax update of the accumulators with one KV block's scores (S, Ṡ) and its V, V̇."""
    kn = start_n + offs_n
    v = _load_rows(v_ptrs, kn, stride_vn, N_K, MASK_N)
    tv = _load_rows(tv_ptrs, kn, stride_tvn, N_K, MASK_N)
    m_new = _new_max(m_i, tl.max(s, 1) * qk_scale, LAZY, TAU)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])  # masked columns: p = 0, so Ṡ there never counts
    ps = p * sd
    l_i = l_i * alpha + tl.sum(p, 1)
    r_i = r_i * alpha + tl.sum(ps, 1)
    if LAZY:
        if tl.min(alpha, 0) < 1.0:  # block-uniform branch: most blocks skip the rescale
            acc_o = acc_o * alpha[:, None]
            acc_t = acc_t * alpha[:, None]
    else:
        acc_o = acc_o * alpha[:, None]
        acc_t = acc_t * alpha[:, None]
    p_lo = p.to(v.dtype)
    acc_o = tl.dot(p_lo, v, acc=acc_o)
    acc_t = tl.dot(ps.to(v.dtype), v, acc=tl.dot(p_lo, tv, acc=acc_t))
    return acc_o, acc_t, l_i, r_i, m_new


@triton.autotune(
    configs=configs(JVP_CONFIGS),
    key=KEY,
    prune_configs_by={"early_config_prune": fit_smem("_attn_fwd_jvp_kernel", lambda m, n, d: (2 * m * d, 4 * n * d))},
)
@triton.jit(do_not_specialize=["N_Q", "N_K", "NQ_KEY", "NK_KEY"])
def _attn_fwd_jvp_kernel(
    Q, K, V, TQ, TK, TV, O, TO, LSE, qk_scale, scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    stqb, stqh, stqn, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
    sob, soh, son, sod, stob, stoh, ston, stod, slb, slh,
    H, N_Q, N_K, NQ_KEY, NK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, LAZY_TAU: tl.constexpr, PIPELINE: tl.constexpr = False,
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
    tq = tl.load(TQ + b * stqb + h * stqh + offs_m[:, None] * stqn + offs_d[None, :] * stqd, mask=mask_m[:, None], other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_d[None, :] * skd
    tk_ptrs = TK + b * stkb + h * stkh + offs_d[None, :] * stkd
    v_ptrs = V + b * svb + h * svh + offs_d[None, :] * svd
    tv_ptrs = TV + b * stvb + h * stvh + offs_d[None, :] * stvd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    if PIPELINE:  # software pipelining: the score matmuls of block j+1 are issued before block j's softmax
        if n_full > 0:
            s, sd = _jvp_scores(q, tq, k_ptrs, tk_ptrs, 0, offs_n, N_K, skn, stkn, scale, False)
            for start_n in range(BLOCK_N, n_full, BLOCK_N):
                s_next, sd_next = _jvp_scores(q, tq, k_ptrs, tk_ptrs, start_n, offs_n, N_K, skn, stkn, scale, False)
                acc_o, acc_t, l_i, r_i, m_i = _jvp_update(
                    acc_o, acc_t, l_i, r_i, m_i, s, sd, v_ptrs, tv_ptrs, start_n - BLOCK_N, offs_n, N_K, svn, stvn,
                    qk_scale, False, LAZY_RESCALE, LAZY_TAU,
                )
                s, sd = s_next, sd_next
            acc_o, acc_t, l_i, r_i, m_i = _jvp_update(
                acc_o, acc_t, l_i, r_i, m_i, s, sd, v_ptrs, tv_ptrs, n_full - BLOCK_N, offs_n, N_K, svn, stvn,
                qk_scale, False, LAZY_RESCALE, LAZY_TAU,
            )
    else:
        for start_n in range(0, n_full, BLOCK_N):
            s, sd = _jvp_scores(q, tq, k_ptrs, tk_ptrs, start_n, offs_n, N_K, skn, stkn, scale, False)
            acc_o, acc_t, l_i, r_i, m_i = _jvp_update(
                acc_o, acc_t, l_i, r_i, m_i, s, sd, v_ptrs, tv_ptrs, start_n, offs_n, N_K, svn, stvn, qk_scale,
                False, LAZY_RESCALE, LAZY_TAU,
            )
    if n_full < N_K:
        s, sd = _jvp_scores(q, tq, k_ptrs, tk_ptrs, n_full, offs_n, N_K, skn, stkn, scale, True)
        acc_o, acc_t, l_i, r_i, m_i = _jvp_update(
            acc_o, acc_t, l_i, r_i, m_i, s, sd, v_ptrs, tv_ptrs, n_full, offs_n, N_K, svn, stvn, qk_scale,
            True, LAZY_RESCALE, LAZY_TAU,
        )

    inv_l = 1.0 / l_i
    o = acc_o * inv_l[:, None]
    t_o = acc_t * inv_l[:, None] - (r_i * inv_l)[:, None] * o
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, o.to(O.dtype.element_ty), mask=mask_m[:, None])
    tl.store(TO + b * stob + h * stoh + offs_m[:, None] * ston + offs_d[None, :] * stod, t_o.to(TO.dtype.element_ty), mask=mask_m[:, None])
    tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=mask_m)


def attention_fwd_jvp_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tq: torch.Tensor, tk: torch.Tensor, tv: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused kernel. q/tq [B, H, Nq, D], k/v/tk/tv [B, H, Nk, D] -> (O, Ȯ, LSE [B, H, Nq] fp32).

    Inputs must already be validated; tangents have the primals' shapes and dtype. O and Ȯ take q's layout.
    """
    if not scale > 0:  # masking with -inf and row maxima of unscaled scores assume c > 0
        raise ValueError(f"attention_fwd_jvp_triton: scale must be > 0 (op.attention folds scale <= 0 into k), got {scale}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = torch.empty_like(q)
    t_o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)
    launch(
        _attn_fwd_jvp_kernel, grid,
        q, k, v, tq, tk, tv, o, t_o, lse, scale * LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *tq.stride(), *tk.stride(), *tv.stride(),
        *o.stride(), *t_o.stride(), lse.stride(0), lse.stride(1),
        H, Nq, Nk, n_bucket(Nq), n_bucket(Nk),
        HEAD_DIM=D, LAZY_TAU=lazy_tau(q.dtype),
    )
    return o, t_o, lse
