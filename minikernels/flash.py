"""Chapter 1: FlashAttention, forward and backward (Dao et al. 2022; Dao 2023).

    O = softmax(Q K^T * scale) V,   one (batch, head) at a time, Q [Nq, D], K and V [Nk, D]

Standard attention writes S = QK^T and P = softmax(S) to device memory: Theta(N^2) bytes. Here a
program keeps one block of BLOCK_M query rows on chip and streams K and V past it in blocks of
BLOCK_N keys, folding each block into a running (max m, sum l, output acc) with the online-softmax
rule of chapter 0. Per (batch, head) it reads Q once, K and V once per query block, and writes O and
the logsumexp once: no N^2 term ever reaches memory.

The backward recomputes P block by block from the saved logsumexp (lse) instead of storing it:

    P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q

with delta_i = rowsum(dO_i * O_i) (= rowsum(P_i * dP_i), the softmax Jacobian's correction term).
Two kernels share that work without atomics: one owns a block of keys and accumulates dK, dV over
all query blocks (and all query heads of a grouped-query group); the other owns a block of queries
and accumulates dQ over the key blocks.

Causal masking is aligned to the bottom right as in FlashAttention-2: query i sees keys
j <= i + Nk - Nq. Each loop is split into blocks that need no mask (every key visible to every
row) and the few blocks on the diagonal or at the ragged end that do. A query that sees no key gets
zeros and a logsumexp of -inf.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import planning
from ._alloc import empty
from ._autograd import once_differentiable
from ._backend import dot_options, is_interpreter, on_device_of
from ._common import (
    LOG2E,
    MAX_GRID_YZ,
    TF32_FALLBACK,
    base2_lse_for_backward,
    batch_slices,
    compute_dtype,
    fit_shared_memory,
    head_dim_pad,
    launch_fitting,
    natural_lse,
    online_softmax_step,
    shared_memory_limit,
    smem_estimate,
    split_operands,
)
from ._validate import check_attention_inputs, check_scale, int32_addressable

# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _query_block(CAUSAL: tl.constexpr):
    # Under a causal mask the last query blocks see the most keys. Handing them out first (the GPU
    # starts programs in launch order) leaves the short ones to fill the last wave, not the long ones.
    if CAUSAL:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    return tl.program_id(0)


@triton.jit
def _fwd_block_loop(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    rows, lo, hi, Nk, D, causal_offset, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd  # K^T block [D, BLOCK_N]
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd  # V block [BLOCK_N, D]
        if MASKED:
            kt = tl.load(kt_ptrs, mask=(cols[None, :] < Nk) & d_ok[:, None], other=0.0)  # read BLOCK_N*D
            v = tl.load(v_ptrs, mask=(cols[:, None] < Nk) & d_ok[None, :], other=0.0)  # read BLOCK_N*D
        elif EVEN_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # logits in base 2: exp(x) = 2^(x log2 e)
        if MASKED:
            visible = cols[None, :] < Nk
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            s = tl.where(visible, s, float("-inf"))
        # a masked block may leave a row with no visible key so far (m = -inf): only those need the guard
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, MAY_BE_EMPTY=MASKED, DOT_PREC=DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qn, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_on, stride_od,
              H, GROUP, Nq, Nk, D, qk_scale,
              CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    start_m = _query_block(CAUSAL) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP  # grouped-query attention: GROUP query heads share one k/v head
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq
    d_ok = offs_d < D
    q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # read BLOCK_M*D, once

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    causal_offset = Nk - Nq  # bottom-right alignment: query i sees keys j <= i + Nk - Nq
    if CAUSAL:
        # keys every row of this block sees, rounded down to whole blocks; then the diagonal band
        full_hi = tl.minimum(start_m + causal_offset + 1, Nk)
        full_hi = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), Nk)
    else:
        full_hi = Nk // BLOCK_N * BLOCK_N
        hi = Nk
    acc, l_i, m_i = _fwd_block_loop(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    rows, 0, full_hi, Nk, D, causal_offset, qk_scale,
                                    False, CAUSAL, EVEN_D, BLOCK_N, HEAD_DIM, DOT_PREC)
    acc, l_i, m_i = _fwd_block_loop(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    rows, full_hi, hi, Nk, D, causal_offset, qk_scale,
                                    True, CAUSAL, EVEN_D, BLOCK_N, HEAD_DIM, DOT_PREC)

    empty_row = l_i == 0.0  # saw no key: output 0, logsumexp -inf
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = natural_lse(m_i, l_i)
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + rows[:, None] * stride_on + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])  # write BLOCK_M*D
    tl.store(LSE + bh.to(tl.int64) * Nq + rows, lse, mask=row_ok)  # write BLOCK_M (natural log)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_od,
               stride_dob, stride_doh, stride_don, stride_dod, H, Nq, D,
               BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    # delta_i = rowsum(dO_i * O_i): read 2*Nq*D, write Nq. Row offsets in 64 bits: varlen attention
    # runs this on all its packed tokens as one [1, H, total, D] view, whose rows * stride can pass 2^31
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (rows[:, None] < Nq) & (offs_d[None, :] < D)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows64[:, None] * stride_on
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows64[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Nq + rows64, tl.sum(o * do, axis=1), mask=rows < Nq)


@triton.jit
def _bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd,
                   stride_don, stride_dod, cols, lo, hi, Nq, D, causal_offset, qk_scale,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Nq
        qt = tl.load(q_base + rows[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                     mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # Q^T block [D, BLOCK_M]
        do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # dO block [BLOCK_M, D]
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))  # +inf: rows that do not exist get P = 0
        lse = base2_lse_for_backward(lse)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale  # S^T [BLOCK_N, BLOCK_M], base 2
        pt = tl.exp2(st - lse[None, :])  # P^T recomputed from the saved logsumexp
        if MASKED:
            if CAUSAL:
                pt = tl.where(cols[:, None] <= rows[None, :] + causal_offset, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)  # dV += P^T dO
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # dP^T = V dO^T
        dst = pt * (dpt - delta[None, :])  # dS^T
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PREC)  # dK += dS^T Q
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   H, HKV, GROUP, Nq, Nk, D, scale, qk_scale,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = (cols[:, None] < Nk) & (offs_d[None, :] < D)
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + cols[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)  # read BLOCK_N*D, once
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + cols[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    causal_offset = Nk - Nq
    if CAUSAL:
        # query rows that see some key of this block start at start_n - offset; rows from
        # start_n + BLOCK_N - 1 - offset on see all of them (no mask needed)
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), Nq)
        full_lo = tl.cdiv(full_lo, BLOCK_M) * BLOCK_M
        full_lo = tl.maximum(full_lo, lo)
    else:
        lo = 0
        full_lo = 0
    for g in range(0, GROUP):  # every query head that reads this k/v head contributes to dK, dV
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + (b * H + h).to(tl.int64) * Nq
        delta_base = DELTA + (b * H + h).to(tl.int64) * Nq
        dk, dv = _bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd,
                                stride_don, stride_dod, cols, lo, full_lo, Nq, D, causal_offset, qk_scale,
                                True, CAUSAL, BLOCK_M, HEAD_DIM, DOT_PREC)
        dk, dv = _bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd,
                                stride_don, stride_dod, cols, full_lo, Nq, Nq, D, causal_offset, qk_scale,
                                False, CAUSAL, BLOCK_M, HEAD_DIM, DOT_PREC)
    dk = dk * scale  # S = scale * Q K^T
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + cols[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + cols[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                 rows, lo, hi, Nk, D, causal_offset, qk_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < Nk
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # K^T [D, BLOCK_N]
        vt = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # V^T [D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)  # dP = dO V^T
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)  # dQ += dS K
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                 H, GROUP, Nq, Nk, D, scale, qk_scale,
                 CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    start_m = _query_block(CAUSAL) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Nq + rows, mask=row_ok, other=float("inf"))
    lse = base2_lse_for_backward(lse)  # no key: P = 0
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + rows, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    causal_offset = Nk - Nq
    if CAUSAL:
        full_hi = tl.maximum(tl.minimum(start_m + causal_offset + 1, Nk), 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), Nk)
    else:
        full_hi = Nk // BLOCK_N * BLOCK_N
        hi = Nk
    dq = _bwd_dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                      rows, 0, full_hi, Nk, D, causal_offset, qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM, DOT_PREC)
    dq = _bwd_dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                      rows, full_hi, hi, Nk, D, causal_offset, qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM, DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + rows[:, None] * stride_dqn
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask)


# The block loops and the launch order, under public names for the variable-length kernels (varlen.py),
# which run them inside each sequence of a packed batch.
query_block, fwd_block_loop, bwd_dkdv_loop, bwd_dq_loop = _query_block, _fwd_block_loop, _bwd_dkdv_loop, _bwd_dq_loop


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------

# Every configuration below is the one tuned for a Hopper GPU (H100, H200: 227 KiB of shared memory per
# program), then fitted to the shared memory of the device at hand: ``fit_shared_memory`` steps it down
# (fewer pipeline stages, then smaller tiles) until its estimated need fits, so the same code runs on
# any GPU and every dtype; on Hopper every tuned configuration fits as it is.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def _tuned_config(kernel: str, head_dim: int, elem_bytes: int) -> dict:
    """The configuration tuned on an H100 / H200 (tools/tune_flash.py for 16-bit; the run and its numbers:
    book/notes/flash_decode.md). fp32 tiles are twice the bytes of 16-bit ones, so they get smaller tiles."""
    if kernel == "fwd":  # BLOCK_M query rows resident, BLOCK_N keys streamed
        if elem_bytes == 4:
            if head_dim <= 128:
                return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
            return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
        if head_dim <= 64:
            return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
        if head_dim <= 128:
            return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if kernel == "dkdv":  # BLOCK_N keys resident, BLOCK_M query rows streamed
        if elem_bytes == 4:
            if head_dim <= 128:
                return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
            return {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
        if head_dim <= 64:
            return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
        if head_dim <= 128:
            return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    if kernel == "dq":  # BLOCK_M query rows resident, BLOCK_N keys streamed
        if elem_bytes == 4:
            if head_dim <= 128:
                return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
            return {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
        if head_dim <= 128:
            return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    raise ValueError(f"kernel must be 'fwd', 'dkdv' or 'dq', got {kernel!r}")


def smem_need(kernel: str, cfg: dict, head_dim: int, elem_bytes: int) -> int:
    """``smem_estimate`` for one of the three kernels at ``cfg`` and head dim ``head_dim``."""
    m, n, d = cfg["BLOCK_M"], cfg["BLOCK_N"], head_dim_pad(head_dim)
    split = split_operands(cfg, elem_bytes)
    if kernel == "fwd":  # Q resident; K^T and V streamed
        return smem_estimate(m * d, (n * d, n * d), elem_bytes, cfg["num_stages"], split=split)
    if kernel == "dkdv":  # K and V resident; Q^T and dO streamed (with their rows' lse and delta)
        return smem_estimate(2 * n * d, (m * d, m * d), elem_bytes, cfg["num_stages"], extra=8 * m, split=split)
    return smem_estimate(2 * m * d, (n * d, n * d), elem_bytes, cfg["num_stages"], split=split)  # dq


def tile_config(kernel: str, head_dim: int, elem_bytes: int, smem_limit: int | None) -> dict:
    """The planning seam: tiles, warps and pipeline stages of the ``"fwd"``, ``"dkdv"`` or ``"dq"``
    kernel on a GPU whose programs may use ``smem_limit`` bytes of shared memory (None: no limit), for
    inputs of ``elem_bytes`` bytes (4: float32, 2: float16 / bfloat16) and head dim ``head_dim``. A
    pure function: the tuned configuration, fitted to ``smem_limit`` by ``fit_shared_memory``."""
    pad = head_dim_pad(head_dim)
    resident = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
    streamed = "BLOCK_M" if kernel == "dkdv" else "BLOCK_N"
    return fit_shared_memory(_tuned_config(kernel, pad, elem_bytes),
                             lambda c: smem_need(kernel, c, pad, elem_bytes), smem_limit,
                             (streamed, resident), resident=resident,
                             relaxed=TF32_FALLBACK if elem_bytes == 4 else None)


@functools.cache
def _planned(kernel: str, head_dim: int, elem_bytes: int, smem_limit: int | None) -> dict:
    return tile_config(kernel, head_dim, elem_bytes, smem_limit)  # planned once per launch shape


def _default_config(kernel: str, head_dim: int, elem_bytes: int) -> dict:
    if is_interpreter():
        return dict(_INTERPRETER_CONFIG)
    return _planned(kernel, head_dim, elem_bytes, shared_memory_limit())


def launch_config(kernel: str, head_dim: int, elem_bytes: int) -> dict:
    """The configuration the ``"fwd"``, ``"dkdv"`` or ``"dq"`` kernel launches with: ``tile_config`` for
    the current device (small tiles under the interpreter), or the planning override
    ``"flash.<kernel>"`` (``minikernels.planning``)."""
    return dict(planning.decide(f"flash.{kernel}", lambda d, e: _default_config(kernel, d, e), head_dim, elem_bytes))


def _launch(key, cfg: dict, launch) -> None:
    # a configuration the compiler finds too large for this GPU's shared memory steps down (fewer stages,
    # then smaller tiles); the resident tile is BLOCK_N in dK/dV and BLOCK_M elsewhere
    resident, streamed = ("BLOCK_N", "BLOCK_M") if key[0] == "dkdv" else ("BLOCK_M", "BLOCK_N")
    launch_fitting(key, cfg, launch, (streamed, resident), resident=resident,
                   relaxed=TF32_FALLBACK if key[2] == 4 else None)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------

def _batch_slices(batch: int, heads: int) -> list[tuple[int, int]]:
    # the grids put (batch, head) on their second axis; every kernel addresses q, k, v, o and their
    # gradients through batch strides and the logsumexp and delta rows by (batch, head), so a slice of
    # the batch is a set of views
    return batch_slices(batch, heads, planning.decide("flash.max_grid_y", MAX_GRID_YZ), "flash_attention")


def launch_forward(q, k, v, causal: bool, scale: float, cfg: dict | None = None):
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    o = empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:  # no query row (B, H or Nq is 0): nothing to launch
        return o, lse
    cfg = cfg or launch_config("fwd", D, q.element_size())  # cfg: an override, for tools/tune_flash.py
    pad = head_dim_pad(D)

    def launch(cfg):
        for lo, hi in _batch_slices(B, H):
            _attn_fwd[(triton.cdiv(Nq, cfg["BLOCK_M"]), (hi - lo) * H)](
                q[lo:hi], k[lo:hi], v[lo:hi], o[lo:hi], lse[lo:hi], *q.stride(), *k.stride(), *v.stride(),
                *o.stride(), H, H // HKV, Nq, Nk, D, scale * LOG2E, CAUSAL=causal, EVEN_D=(pad == D),
                HEAD_DIM=pad, **{**dot_options(q.dtype), **cfg})

    _launch(("fwd", pad, q.element_size(), causal), cfg, launch)
    return o, lse


def row_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O), fp32 [B, H, Nq]: the softmax-Jacobian term every attention backward needs."""
    B, H, Nq, D = o.shape
    delta = empty((B, H, Nq), dtype=torch.float32, device=o.device)  # every row written by _bwd_delta
    if delta.numel() == 0:
        return delta
    for lo, hi in _batch_slices(B, H):
        _bwd_delta[(triton.cdiv(Nq, 64), (hi - lo) * H)](o[lo:hi], do[lo:hi], delta[lo:hi], *o.stride(),
                                                         *do.stride(), H, Nq, D, BLOCK_M=64,
                                                         HEAD_DIM=head_dim_pad(D))
    return delta


def launch_backward(q, k, v, o, lse, do, causal: bool, scale: float, dkdv_cfg: dict | None = None,
              dq_cfg: dict | None = None):
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    if q.numel() == 0:  # no query row reads k or v: their gradients are zero, and nothing is launched
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    pad = head_dim_pad(D)
    delta = row_delta(o, do)
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)

    def launch_dkdv(cfg):
        for lo, hi in _batch_slices(B, HKV):
            _attn_bwd_dkdv[(triton.cdiv(Nk, cfg["BLOCK_N"]), (hi - lo) * HKV)](
                q[lo:hi], k[lo:hi], v[lo:hi], do[lo:hi], dk[lo:hi], dv[lo:hi], lse[lo:hi], delta[lo:hi],
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), H, HKV,
                H // HKV, Nq, Nk, D, scale, scale * LOG2E, CAUSAL=causal, HEAD_DIM=pad,
                **{**dot_options(q.dtype), **cfg})

    def launch_dq(cfg):
        for lo, hi in _batch_slices(B, H):
            _attn_bwd_dq[(triton.cdiv(Nq, cfg["BLOCK_M"]), (hi - lo) * H)](
                q[lo:hi], k[lo:hi], v[lo:hi], do[lo:hi], dq[lo:hi], lse[lo:hi], delta[lo:hi], *q.stride(),
                *k.stride(), *v.stride(), *do.stride(), *dq.stride(), H, H // HKV, Nq, Nk, D, scale,
                scale * LOG2E, CAUSAL=causal, HEAD_DIM=pad, **{**dot_options(q.dtype), **cfg})

    if Nk > 0:  # (no key: dK and dV are empty)
        _launch(("dkdv", pad, q.element_size(), causal), dkdv_cfg or launch_config("dkdv", D, q.element_size()),
                launch_dkdv)
    _launch(("dq", pad, q.element_size(), causal), dq_cfg or launch_config("dq", D, q.element_size()), launch_dq)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        dtype = q.dtype
        work = compute_dtype(dtype)
        qw, kw, vw = (int32_addressable(n, t.to(work)) for n, t in (("q", q), ("k", k), ("v", v)))
        with on_device_of(q):
            o, lse = launch_forward(qw, kw, vw, causal, scale)
        ctx.save_for_backward(qw, kw, vw, o, lse)
        ctx.graph_inputs = (q, k, v)  # for once_differentiable (no data is read from them)
        ctx.causal, ctx.scale, ctx.dtype = causal, scale, dtype
        ctx.mark_non_differentiable(lse)
        return o.to(dtype), lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, _dlse):
        qw, kw, vw, o, lse = ctx.saved_tensors
        with on_device_of(qw):
            dq, dk, dv = launch_backward(qw, kw, vw, o, lse, int32_addressable("grad of out", do.to(qw.dtype)),
                                         ctx.causal, ctx.scale)
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: float | None = None, return_lse: bool = False):
    """softmax(q k^T * scale) v, computed tile by tile in Triton (forward and backward).

    q: ``[B, H, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` with Hkv dividing H (grouped-query attention);
    any strides; float16, bfloat16 or float32 (on the GPU, float32 products in 3-pass tf32: near float32;
    single-pass tf32 on a GPU whose shared memory cannot hold the split operands, which no H100 or
    H200 configuration needs). D up to 256. Tiles are fitted to the device's shared memory
    (``tile_config``).
    ``causal`` masks bottom-right aligned: query i sees keys j <= i + Nk - Nq; a query that sees no key
    gets zeros. ``scale`` defaults to 1/sqrt(D). With ``return_lse=True`` returns ``(out, lse)``, the
    natural-log logsumexp of each row's scaled logits, ``[B, H, Nq]`` float32 (-inf for a row with no
    key; not differentiable). Empty inputs (B, H, Nq or Nk = 0) give empty or zero outputs that stay in
    the autograd graph. Differentiable once: a gradient taken with ``create_graph=True`` cannot be
    differentiated again (backward through it raises a RuntimeError).
    """
    check_attention_inputs(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    scale = check_scale(scale, q.shape[-1])
    # empty inputs (B, H, Nq or Nk = 0) go through the autograd function too, so that the output stays
    # in the graph: its backward gives zero gradients of the inputs' shapes
    out, lse = _FlashAttention.apply(q, k, v, causal, scale)
    return (out, lse) if return_lse else out
