"""Flash-attention backward in Triton (FlashAttention-2 §3.2 / Algorithm 2), from O and the saved LSE.

With P = exp(S − LSE) recomputed tile by tile (S = c·QKᵀ) and Δ = rowsum(dO⊙O):
    dV = PᵀdO,   dP = dO Vᵀ,   dS = P⊙(dP − Δ),   dQ = c·dS K,   dK = c·dSᵀQ.
Three launches: Δ (preprocess), dK/dV (one program per KV block, looping over query blocks), and
dQ (one program per query block, looping over KV blocks). Every program owns its output tile, so
no atomics and the result is deterministic; but the dQ kernel recomputes QKᵀ and dO·Vᵀ, which the dK/dV
kernel already computed (14 N²·D units of matmul instead of 10). `DQ_MODE = "atomic"` (env
VDISTILL_ATTN_DQ=atomic) instead adds each dK/dV program's share dS·K into an fp32 dQ with atomics, as
FlashAttention-2 does: no recomputation, the order of the additions (so dQ's last bits) varies from run to
run; `torch.use_deterministic_algorithms(True)` keeps the separate kernel. fp32 accumulators; exp2 with
log2(e) folded in. Any strides, any Nq/Nk (tails are masked).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vdistill.kernels.attention.tuning import KEY, LOG2E, configs, fit_smem, launch, n_bucket
from vdistill.kernels.dispatch import INTERPRET

# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first row is the conservative default. Every row compiles
# without register spills at D=128 bf16 on sm_90 (offline, Triton 3.9: docs/results/attention.md): the dK/dV
# rows hold [BLOCK_N, D] K, V, dK, dV tiles (64×128 spilled); the atomic-dQ variant also a [BLOCK_M, D] dQ
# share (32×128 spilled); dQ's 64×64 at 2 stages leaves shared memory for two programs per SM.
DKDV_CONFIGS = [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 4), (32, 64, 8, 3)]
DKDV_DQ_CONFIGS = [(64, 64, 8, 3), (32, 64, 8, 3), (64, 64, 8, 2), (16, 128, 8, 3)]
DQ_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 4), (128, 32, 8, 3)]
# "separate": the deterministic dQ kernel (default until a GPU run shows the atomic one faster); "atomic"
DQ_MODE = os.environ.get("VDISTILL_ATTN_DQ", "separate")


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, sdb, sdh, H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < N_Q
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * sdb + h * sdh + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, start_m, offs_m, N_Q,
    stride_qm, stride_dom, stride_dqm, qk_scale, MASK_M: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    """Accumulate one query block into the dK/dV tile (transposed scores: rows are keys); with ATOMIC_DQ also
    add its dS·K (unscaled) into the fp32 dQ rows."""
    qm = start_m + offs_m
    if MASK_M:
        valid = qm < N_Q
        q = tl.load(q_ptrs + qm[:, None] * stride_qm, mask=valid[:, None], other=0.0)
        do = tl.load(do_ptrs + qm[:, None] * stride_dom, mask=valid[:, None], other=0.0)
        lse = tl.load(lse_ptr + qm, mask=valid, other=float("inf"))  # p = 0 on padded rows
        delta = tl.load(delta_ptr + qm, mask=valid, other=0.0)
    else:
        q = tl.load(q_ptrs + qm[:, None] * stride_qm)
        do = tl.load(do_ptrs + qm[:, None] * stride_dom)
        lse = tl.load(lse_ptr + qm)
        delta = tl.load(delta_ptr + qm)
    s_t = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M], log2 units
    p_t = tl.exp2(s_t - lse[None, :] * 1.4426950408889634)
    dv = tl.dot(p_t.to(do.dtype), do, acc=dv)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, acc=dk)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k)
        dq_rows = dq_ptrs + qm[:, None] * stride_dqm
        if MASK_M:
            tl.atomic_add(dq_rows, dq, mask=valid[:, None], sem="relaxed")
        else:
            tl.atomic_add(dq_rows, dq, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["N_Q", "N_K", "NQ_KEY", "NK_KEY"])
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, qk_scale, scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    slb, slh, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, sdqb, sdqh, sdqn, sdqd,
    H, N_Q, N_K, NQ_KEY, NK_KEY,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n[:, None] < N_K

    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=mask_n, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=mask_n, other=0.0)
    q_ptrs = Q + b * sqb + h * sqh + offs_d[None, :] * sqd
    do_ptrs = DO + b * sdob + h * sdoh + offs_d[None, :] * sdod
    lse_ptr = LSE + b * slb + h * slh
    delta_ptr = DELTA + b * slb + h * slh
    dq_ptrs = DQ + b * sdqb + h * sdqh + offs_d[None, :] * sdqd

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, start_m, offs_m, N_Q, sqn, sdon,
                             sdqn, qk_scale, False, ATOMIC_DQ)
    if m_full < N_Q:
        dk, dv = _dkdv_block(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, m_full, offs_m, N_Q, sqn, sdon,
                             sdqn, qk_scale, True, ATOMIC_DQ)

    dk = dk * scale
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd, dk.to(DK.dtype.element_ty), mask=mask_n)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd, dv.to(DV.dtype.element_ty), mask=mask_n)


def _dkdv_autotuned(name: str, rows: list[tuple], reset: list[str] | None):
    return triton.autotune(
        configs=configs(rows), key=KEY, reset_to_zero=reset,
        prune_configs_by={"early_config_prune": fit_smem(name, lambda m, n, d: (2 * n * d, 2 * m * d))},
    )(_attn_bwd_dkdv)


_attn_bwd_dkdv_kernel = _dkdv_autotuned("_attn_bwd_dkdv_kernel", DKDV_CONFIGS, None)
# the atomic-dQ variant: autotuning runs it repeatedly, so its dQ accumulator is zeroed before each run
_attn_bwd_dkdv_dq_kernel = _dkdv_autotuned("_attn_bwd_dkdv_dq_kernel", DKDV_DQ_CONFIGS, ["DQ"])


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, offs_n, N_K, stride_kn, stride_vn, qk_scale, MASK_N: tl.constexpr):
    """Accumulate one KV block into the dQ tile."""
    kn = start_n + offs_n
    if MASK_N:
        valid = kn < N_K
        k = tl.load(k_ptrs + kn[:, None] * stride_kn, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs + kn[:, None] * stride_vn, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + kn[:, None] * stride_kn)
        v = tl.load(v_ptrs + kn[:, None] * stride_vn)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK_N:
        s = tl.where(valid[None, :], s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, acc=dq)


@triton.autotune(
    configs=configs(DQ_CONFIGS),
    key=KEY,
    prune_configs_by={"early_config_prune": fit_smem("_attn_bwd_dq_kernel", lambda m, n, d: (2 * m * d, 2 * n * d))},
)
@triton.jit(do_not_specialize=["N_Q", "N_K", "NQ_KEY", "NK_KEY"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, qk_scale, scale,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
    slb, slh, sdqb, sdqh, sdqn, sdqd,
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
    valid_m = offs_m < N_Q
    mask_m = valid_m[:, None]

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_m, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=mask_m, other=0.0)
    lse2 = tl.load(LSE + b * slb + h * slh + offs_m, mask=valid_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=valid_m, other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_d[None, :] * svd

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, offs_n, N_K, skn, svn, qk_scale, False)
    if n_full < N_K:
        dq = _dq_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, n_full, offs_n, N_K, skn, svn, qk_scale, True)

    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty), mask=mask_m)


def attention_bwd_triton(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. do/q/o [B, H, Nq, D], k/v [B, H, Nk, D], lse [B, H, Nq] fp32 -> (dQ, dK, dV).

    Inputs must already be validated; gradients take the layout of their primal.
    """
    if not scale > 0:  # masking with -inf and row maxima of unscaled scores assume c > 0
        raise ValueError(f"attention_bwd_triton: scale must be > 0 (op.attention folds scale <= 0 into k), got {scale}")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    lse = lse.contiguous()  # Δ is allocated contiguous and shares LSE's strides in the kernels
    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pre_m = 16 if INTERPRET else 64
    _bwd_preprocess_kernel[(triton.cdiv(Nq, pre_m), B * H)](
        o, do, delta, *o.stride(), *do.stride(), delta.stride(0), delta.stride(1), H, Nq,
        HEAD_DIM=D, BLOCK_M=pre_m,
    )
    qk_scale = scale * LOG2E
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), lse.stride(0), lse.stride(1))
    keys = (H, Nq, Nk, n_bucket(Nq), n_bucket(Nk))
    if DQ_MODE not in ("separate", "atomic"):
        raise ValueError(f"VDISTILL_ATTN_DQ must be separate or atomic, got {DQ_MODE!r}")
    atomic = DQ_MODE == "atomic" and not torch.are_deterministic_algorithms_enabled()
    dq_acc = torch.zeros((B, H, Nq, D), device=q.device, dtype=torch.float32) if atomic else delta
    dq_strides = dq_acc.stride() if atomic else (0, 0, 0, 0)
    launch(
        _attn_bwd_dkdv_dq_kernel if atomic else _attn_bwd_dkdv_kernel,
        lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * H),
        q, k, v, do, lse, delta, dk, dv, dq_acc, qk_scale, scale, *common, *dk.stride(), *dv.stride(), *dq_strides,
        *keys, HEAD_DIM=D, ATOMIC_DQ=atomic,
    )
    if atomic:
        dq.copy_(dq_acc.mul_(scale))
        return dq, dk, dv
    launch(
        _attn_bwd_dq_kernel, lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H),
        q, k, v, do, lse, delta, dq, qk_scale, scale, *common, *dq.stride(), *keys, HEAD_DIM=D,
    )
    return dq, dk, dv
