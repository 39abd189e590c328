"""Flash-attention forward in Triton: O = softmax(c·QKᵀ)V and the row log-sum-exp, in one pass.

Online softmax (Dao et al. 2022, FlashAttention-2 §3.1): per query block keep the running row max
m, the row sum l of the unnormalised probabilities P̃ = exp(S − m) and Õ = P̃V; when the max
grows by Δ, rescale l and Õ by α = exp(−Δ) (lazily: see `_new_max`). Epilogue O = Õ/l,
LSE = m + log l. Exponentials use exp2 with log2(e) folded into the scale. Accumulators are fp32;
`tl.dot` takes the input dtype (fp16/bf16 on tensor cores; fp32 inputs use TF32 on GPUs that have
it, so fp32 results there are TF32-accurate, not IEEE).

`PIPELINE` configs issue block j+1's QKᵀ before block j's softmax (FA3's intra-warpgroup overlap, by
hand), so the exponentials run while the tensor cores work; not yet timed on a GPU.

Layout: [B, H, N, D] with arbitrary strides (a transposed view of a [B, N, H, D] tensor is read
in place). Sequence lengths are masked, never assumed to be multiples of the block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vdistill.kernels.attention.tuning import KEY, LOG2E, configs, fit_smem, launch, n_bucket

# (BLOCK_M, BLOCK_N, num_warps, num_stages, LAZY_RESCALE[, PIPELINE]); the first row is the conservative default.
# Each tile eager and lazy (lazy adds block-wide barriers), 128×64 also software-pipelined; none spills on
# sm_90 at D=128 bf16 (168-252 registers, Triton 3.9 offline: `vdistill bench attention-regs`,
# docs/results/attention.md).
FWD_CONFIGS = [(128, 64, 8, 3, False), (128, 64, 8, 3, True), (128, 128, 8, 3, False), (128, 128, 8, 3, True),
               (64, 64, 4, 4, False), (64, 64, 4, 4, True), (128, 64, 8, 3, False, True), (128, 64, 8, 2, False, True)]


@triton.jit
def _new_max(m_i, m_block, LAZY: tl.constexpr, TAU: tl.constexpr):
    """Running row max (log2 units). LAZY keeps the stale max unless the block exceeds it by more than
    TAU, so exp2(s − m) stays ≤ 2^TAU (TAU = 8 for bf16/fp32; 4 for fp16, leaving P̃⊙Ṡ headroom below
    the fp16 maximum) and the O(BLOCK_M·D) accumulator rescale is skipped for most blocks
    (FlashAttention-4's conditional rescaling). O = Õ/l is exact either way."""
    m_cand = tl.maximum(m_i, m_block)
    if LAZY:
        m_cand = tl.where(m_cand - m_i > TAU, m_cand, m_i)
    return m_cand


@triton.jit
def _load_kv_rows(ptrs, kn, stride_n, N_K, MASK_N: tl.constexpr):
    """Rows kn of a [N_K, D] K or V block; rows past N_K read as 0 if MASK_N."""
    if MASK_N:
        rows = tl.load(ptrs + kn[:, None] * stride_n, mask=(kn < N_K)[:, None], other=0.0)
    else:
        rows = tl.load(ptrs + kn[:, None] * stride_n)
    return rows


@triton.jit
def _mask_scores(s, kn, N_K, MASK_N: tl.constexpr):
    if MASK_N:
        s = tl.where((kn < N_K)[None, :], s, float("-inf"))
    return s


@triton.jit
def _softmax_update(acc, l_i, m_i, s, v, qk_scale, LAZY: tl.constexpr, TAU: tl.constexpr):
    """The online-softmax update (FlashAttention-2 inner loop) with one KV block's scores S and its V."""
    m_new = _new_max(m_i, tl.max(s, 1) * qk_scale, LAZY, TAU)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])  # one FMA per score: log2(e)·c is folded into qk_scale
    l_i = l_i * alpha + tl.sum(p, 1)
    if LAZY:
        if tl.min(alpha, 0) < 1.0:  # block-uniform branch: most blocks skip the rescale
            acc = acc * alpha[:, None]
    else:
        acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc=acc)
    return acc, l_i, m_new


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_n, N_K, stride_kn, stride_vn, qk_scale,
    MASK_N: tl.constexpr, LAZY: tl.constexpr, TAU: tl.constexpr,
):
    """One KV block of the plain loop, masked only for the tail."""
    kn = start_n + offs_n
    k = _load_kv_rows(k_ptrs, kn, stride_kn, N_K, MASK_N)
    v = _load_kv_rows(v_ptrs, kn, stride_vn, N_K, MASK_N)
    s = _mask_scores(tl.dot(q, tl.trans(k)), kn, N_K, MASK_N)
    return _softmax_update(acc, l_i, m_i, s, v, qk_scale, LAZY, TAU)


@triton.autotune(
    configs=configs(FWD_CONFIGS),
    key=KEY,
    prune_configs_by={"early_config_prune": fit_smem("_attn_fwd_kernel", lambda m, n, d: (m * d, 2 * n * d))},
)
@triton.jit(do_not_specialize=["N_Q", "N_K", "NQ_KEY", "NK_KEY"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, qk_scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, slb, slh,
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
    k_ptrs = K + b * skb + h * skh + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    if PIPELINE:  # software pipelining: block j+1's QKᵀ is issued before block j's softmax, so they overlap
        if n_full > 0:
            s = tl.dot(q, tl.trans(_load_kv_rows(k_ptrs, offs_n, skn, N_K, False)))
            for start_n in range(BLOCK_N, n_full, BLOCK_N):
                s_next = tl.dot(q, tl.trans(_load_kv_rows(k_ptrs, start_n + offs_n, skn, N_K, False)))
                v = _load_kv_rows(v_ptrs, start_n - BLOCK_N + offs_n, svn, N_K, False)
                acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, qk_scale, LAZY_RESCALE, LAZY_TAU)
                s = s_next
            v = _load_kv_rows(v_ptrs, n_full - BLOCK_N + offs_n, svn, N_K, False)
            acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, qk_scale, LAZY_RESCALE, LAZY_TAU)
    else:
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_n, N_K, skn, svn, qk_scale, False, LAZY_RESCALE,
                LAZY_TAU,
            )
    if n_full < N_K:
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, n_full, offs_n, N_K, skn, svn, qk_scale, True, LAZY_RESCALE, LAZY_TAU,
        )

    o = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural log
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, o.to(O.dtype.element_ty), mask=mask_m[:, None])
    tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=mask_m)


def lazy_tau(dtype: torch.dtype) -> float:
    """Threshold (log2 units) of the lazy rescale, see `_new_max`."""
    return 4.0 if dtype == torch.float16 else 8.0


def attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. q [B, H, Nq, D], k/v [B, H, Nk, D] -> (O [B, H, Nq, D], LSE [B, H, Nq] fp32).

    Inputs must already be validated (`op._check_kernel_inputs`). O has q's layout.
    """
    if not scale > 0:  # masking with -inf and row maxima of unscaled scores assume c > 0
        raise ValueError(f"attention_fwd_triton: scale must be > 0 (op.attention folds scale <= 0 into k), got {scale}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)
    launch(
        _attn_fwd_kernel, grid,
        q, k, v, o, lse, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), lse.stride(0), lse.stride(1),
        H, Nq, Nk, n_bucket(Nq), n_bucket(Nk),
        HEAD_DIM=D, LAZY_TAU=lazy_tau(q.dtype),
    )
    return o, lse
