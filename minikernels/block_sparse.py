"""Chapter 2: block-sparse FlashAttention.

The FlashAttention loop of chapter 1 visits every key block (or every block left of the causal
diagonal). Here each query block visits only the key blocks its ``BlockMask`` lists, so the work
and the bytes scale with the mask's density instead of with N^2:

    forward and dQ:  for each query block i, for t < kv_counts[i]: key block kv_indices[i, t]
    dK, dV:          for each key block j,   for t < q_counts[j]:   query block q_indices[j, t]

Blocks marked *full* need no element mask; *partial* blocks apply their ``block_size^2`` tile of
the element mask. Most partial tiles of real masks are diagonal bands (the causal diagonal, the far
edge of a sliding window): lo <= c - r <= hi at row r, column c of the tile, which the kernels draw
from two numbers instead of reading the tile; the others are read (from L2, mostly). Each row's visits
are listed full first, then band tiles, then the rest (``BlockMask.kernel_layout``), so every kernel
runs three loops: an unmasked one the compiler can pipeline, one that draws bands, one that reads tiles. The
kernels' tiles are cut from the mask's blocks (16 to 128), so a mask and the kernel can never disagree
about where blocks start: each visited block is streamed in pieces of STREAM keys (or, for dK/dV,
query rows), and a program may keep a SUB-row (SUB-key) part of a block resident. A query that
sees no key gets zeros.

The streamed tiles arrive through tensor descriptors (on a Hopper GPU, TMA: one instruction per tile
instead of an address per element) whenever the tensors allow it (unit stride along D, 16-byte aligned
rows); other layouts and older GPUs take the pointer loads. The dQ kernel also computes the backward's
delta = rowsum(dO * O) for its rows and writes it for the dK/dV kernel, which runs after it.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
import triton
import triton.language as tl

from ._alloc import empty
from ._backend import dot_options, is_interpreter, on_device_of, tma_ready
from ._validate import int32_addressable
from .flash import (
    LOG2E,
    TF32_FALLBACK,
    _check_scale,
    _compute_dtype,
    _head_dim_pad,
    check_attention_inputs,
    fit_shared_memory,
    once_differentiable,
    shared_memory_limit,
    smem_estimate,
    split_operands,
)
from .masks import BlockMask

MAX_BLOCK_SIZE = 128


@triton.jit
def _load_rows(base, idx, stride_n, stride_d, n_valid, d_ok, EVEN: tl.constexpr):
    # a [BLOCK, HEAD_DIM] tile of rows idx; masks only where the tile can overhang (ragged N or D)
    ptrs = base + idx[:, None] * stride_n + tl.arange(0, d_ok.shape[0])[None, :] * stride_d
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(idx[:, None] < n_valid) & d_ok[None, :], other=0.0)


@triton.jit
def _load_cols(base, idx, stride_n, stride_d, n_valid, d_ok, EVEN: tl.constexpr):
    # the transposed tile, [HEAD_DIM, BLOCK]
    ptrs = base + idx[None, :] * stride_n + tl.arange(0, d_ok.shape[0])[:, None] * stride_d
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(idx[None, :] < n_valid) & d_ok[:, None], other=0.0)


@triton.jit
def _tma_rows(desc, b, h, row0, STREAM: tl.constexpr, HEAD_DIM: tl.constexpr):
    # a [STREAM, HEAD_DIM] tile by the tensor memory accelerator: one instruction instead of a pointer
    # per element, and rows past N (or columns past D) arrive as zeros
    return desc.load([b, h, row0, 0]).reshape(STREAM, HEAD_DIM)


@triton.jit
def _bs_fwd_loop(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
                 kv_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_row, lo, hi, Nk, d_ok,
                 qk_scale, MASKED: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr, BLOCK: tl.constexpr,
                 SUB: tl.constexpr, STREAM: tl.constexpr, DOT_PREC: tl.constexpr):
    # visits lo..hi of this query block's list, each key block streamed as BLOCK // STREAM pieces of
    # STREAM keys: one flat loop, so the compiler can pipeline the loads across pieces and visits
    PER: tl.constexpr = BLOCK // STREAM
    offs_m = sub_row + tl.arange(0, SUB)  # this program's rows inside the mask's query block
    offs_s = tl.arange(0, STREAM)
    for t in range(lo * PER, hi * PER):
        piece = (t % PER) * STREAM + offs_s  # key offsets inside the block
        start = tl.load(kv_idx + t // PER) * BLOCK + (t % PER) * STREAM  # the one indirection
        cols = start + offs_s
        if TMA:
            kt = tl.trans(_tma_rows(k_src, b, hk, start, STREAM, d_ok.shape[0]))  # read STREAM*D
            v = _tma_rows(v_src, b, hk, start, STREAM, d_ok.shape[0])  # read STREAM*D
        else:
            kt = _load_cols(k_src, cols, stride_kn, stride_kd, Nk, d_ok, EVEN)  # read STREAM*D
            v = _load_rows(v_src, cols, stride_vn, stride_vd, Nk, d_ok, EVEN)  # read STREAM*D
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if MASKED == 1:  # a band tile, lo <= c - r <= hi: drawn from two numbers, nothing to read
            tid = tl.load(tile_idx + t // PER)
            c_r = piece[None, :] - offs_m[:, None]
            s = tl.where((c_r >= tl.load(TILE_LO + tid)) & (c_r <= tl.load(TILE_HI + tid)), s, float("-inf"))
        if MASKED == 2:  # any other partial block: its element mask (read BLOCK*STREAM bytes, mostly from L2)
            tile = tl.load(TILES + tl.load(tile_idx + t // PER).to(tl.int64) * BLOCK * BLOCK
                           + offs_m[:, None] * BLOCK + piece[None, :])
            s = tl.where(tile != 0, s, float("-inf"))
        if not EVEN:
            s = tl.where(cols[None, :] < Nk, s, float("-inf"))  # the ragged end of the keys
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if MASKED:  # a row may have seen no key yet: shift by 0 so exp2 gives 0, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # a full block shows every row at least one key
            m_safe = m_new
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _bs_fwd(Q, K, V, O, LSE, ORDER, KV_IDX, KV_CNT, KV_FULL, KV_BAND, TILE_IDX, TILES, TILE_LO, TILE_HI,
            stride_qb, stride_qh, stride_qn, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd,
            stride_ob, stride_oh, stride_on, stride_od,
            H, GROUP, Nq, Nk, D, max_visits, qk_scale,
            EVEN: tl.constexpr, TMA: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, STREAM: tl.constexpr,
            HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    # one program owns SUB rows of a query block (BLOCK // SUB programs per block); blocks are taken
    # in ORDER, the ones with the most visits first, so that short ones fill the last wave
    qb = tl.load(ORDER + tl.program_id(0) // (BLOCK // SUB))
    sub_row = tl.program_id(0) % (BLOCK // SUB) * SUB
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = qb * BLOCK + sub_row + tl.arange(0, SUB)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq
    d_ok = offs_d < D
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if TMA:  # K and V are tensor descriptors
        k_src, v_src = K, V
    else:
        k_src = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_src = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    m_i = tl.full([SUB], float("-inf"), tl.float32)
    l_i = tl.zeros([SUB], tl.float32)
    acc = tl.zeros([SUB, HEAD_DIM], tl.float32)
    kv_idx = KV_IDX + qb * max_visits
    tile_idx = TILE_IDX + qb * max_visits
    # visits [0, n_full) are full blocks, [n_full, n_band) band tiles, [n_band, n_visits) other partial ones
    n_full = tl.load(KV_FULL + qb)
    n_band = tl.load(KV_BAND + qb)
    n_visits = tl.load(KV_CNT + qb)
    acc, l_i, m_i = _bs_fwd_loop(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
                                 kv_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_row, 0, n_full, Nk, d_ok, qk_scale,
                                 0, EVEN, TMA, BLOCK, SUB, STREAM, DOT_PREC)  # no mask
    acc, l_i, m_i = _bs_fwd_loop(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
                                 kv_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_row, n_full, n_band, Nk, d_ok,
                                 qk_scale, 1, EVEN, TMA, BLOCK, SUB, STREAM, DOT_PREC)  # band tiles
    acc, l_i, m_i = _bs_fwd_loop(acc, l_i, m_i, q, k_src, v_src, b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
                                 kv_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_row, n_band, n_visits, Nk, d_ok,
                                 qk_scale, 2, EVEN, TMA, BLOCK, SUB, STREAM, DOT_PREC)  # other tiles
    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.log2(tl.where(empty_row, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_on
             + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Nq + rows, lse, mask=row_ok)


@triton.jit
def _bs_dq_loop(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
                kv_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_row, lo, hi, Nk, d_ok, qk_scale,
                MASKED: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr, BLOCK: tl.constexpr,
                SUB: tl.constexpr, STREAM: tl.constexpr, DOT_PREC: tl.constexpr):
    PER: tl.constexpr = BLOCK // STREAM  # pieces of STREAM keys per visited key block, as in the forward
    offs_s = tl.arange(0, STREAM)
    offs_m = sub_row + tl.arange(0, SUB)  # this program's rows inside the mask's query block
    for t in range(lo * PER, hi * PER):
        piece = (t % PER) * STREAM + offs_s
        start = tl.load(kv_idx + t // PER) * BLOCK + (t % PER) * STREAM
        cols = start + offs_s
        if TMA:
            kt = tl.trans(_tma_rows(k_src, b, hk, start, STREAM, d_ok.shape[0]))  # K^T [D, STREAM]
            vt = tl.trans(_tma_rows(v_src, b, hk, start, STREAM, d_ok.shape[0]))  # V^T [D, STREAM]
        else:
            kt = _load_cols(k_src, cols, stride_kn, stride_kd, Nk, d_ok, EVEN)  # K^T [D, STREAM]
            vt = _load_cols(v_src, cols, stride_vn, stride_vd, Nk, d_ok, EVEN)  # V^T [D, STREAM]
        p = tl.exp2(tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale - lse[:, None])  # [SUB rows, STREAM keys]
        if MASKED == 1:  # a band tile, lo <= c - r <= hi
            tid = tl.load(tile_idx + t // PER)
            c_r = piece[None, :] - offs_m[:, None]
            p = tl.where((c_r >= tl.load(TILE_LO + tid)) & (c_r <= tl.load(TILE_HI + tid)), p, 0.0)
        if MASKED == 2:
            tile = tl.load(TILES + tl.load(tile_idx + t // PER).to(tl.int64) * BLOCK * BLOCK
                           + offs_m[:, None] * BLOCK + piece[None, :])
            p = tl.where(tile != 0, p, 0.0)
        if not EVEN:
            p = tl.where(cols[None, :] < Nk, p, 0.0)
        ds = p * (tl.dot(do, vt, input_precision=DOT_PREC) - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)
    return dq


@triton.jit
def _bs_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, ORDER, KV_IDX, KV_CNT, KV_FULL, KV_BAND, TILE_IDX, TILES, TILE_LO,
               TILE_HI,
               stride_qb, stride_qh, stride_qn, stride_qd,
               stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd,
               stride_ob, stride_oh, stride_on, stride_od,
               stride_dob, stride_doh, stride_don, stride_dod,
               stride_dqb, stride_dqh, stride_dqn, stride_dqd,
               H, GROUP, Nq, Nk, D, max_visits, scale, qk_scale,
               EVEN: tl.constexpr, TMA: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
               STREAM: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    # one program owns SUB rows of a query block (BLOCK // SUB programs per block): a smaller
    # accumulator than the whole block, so the backward's five tiles fit in registers. Longest first.
    qb = tl.load(ORDER + tl.program_id(0) // (BLOCK // SUB))
    sub_row = tl.program_id(0) % (BLOCK // SUB) * SUB
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = qb * BLOCK + sub_row + tl.arange(0, SUB)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq
    d_ok = offs_d < D
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Nq + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # no key: P = 0
    # delta = rowsum(dO * O), the softmax Jacobian's term, computed here (one program owns each row)
    # and written for the dK/dV kernel, which runs next: no separate pass over O and dO
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_on
                + offs_d[None, :] * stride_od, mask=mask, other=0.0)  # read SUB*D
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * Nq + rows, delta, mask=row_ok)
    if TMA:
        k_src, v_src = K, V
    else:
        k_src = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_src = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([SUB, HEAD_DIM], tl.float32)
    kv_idx = KV_IDX + qb * max_visits
    tile_idx = TILE_IDX + qb * max_visits
    n_full = tl.load(KV_FULL + qb)  # full visits, then band tiles, then other partial ones
    n_band = tl.load(KV_BAND + qb)
    n_visits = tl.load(KV_CNT + qb)
    dq = _bs_dq_loop(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
                     kv_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_row, 0, n_full, Nk, d_ok, qk_scale, 0, EVEN, TMA,
                     BLOCK, SUB, STREAM, DOT_PREC)
    dq = _bs_dq_loop(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
                     kv_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_row, n_full, n_band, Nk, d_ok, qk_scale, 1, EVEN,
                     TMA, BLOCK, SUB, STREAM, DOT_PREC)
    dq = _bs_dq_loop(dq, q, do, lse, delta, k_src, v_src, b, hk, stride_kn, stride_kd, stride_vn, stride_vd,
                     kv_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_row, n_band, n_visits, Nk, d_ok, qk_scale, 2,
                     EVEN, TMA, BLOCK, SUB, STREAM, DOT_PREC)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + rows[:, None] * stride_dqn
             + offs_d[None, :] * stride_dqd, (dq * scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _bs_dkdv_loop(dk, dv, k, v, q_src, do_src, b, h, lse_base, delta_base, stride_qn, stride_qd, stride_don,
                  stride_dod, q_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_col, lo, hi, Nq, d_ok, qk_scale,
                  MASKED: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr, BLOCK: tl.constexpr,
                  SUB: tl.constexpr, STREAM: tl.constexpr, DOT_PREC: tl.constexpr):
    PER: tl.constexpr = BLOCK // STREAM  # pieces of STREAM query rows per visited query block
    offs_s = tl.arange(0, STREAM)
    offs_n = sub_col + tl.arange(0, SUB)  # this program's keys inside the mask's key block
    for t in range(lo * PER, hi * PER):
        piece = (t % PER) * STREAM + offs_s
        start = tl.load(q_idx + t // PER) * BLOCK + (t % PER) * STREAM
        rows = start + offs_s
        row_ok = rows < Nq
        if TMA:
            qt = tl.trans(_tma_rows(q_src, b, h, start, STREAM, d_ok.shape[0]))  # Q^T [D, STREAM]
            do = _tma_rows(do_src, b, h, start, STREAM, d_ok.shape[0])  # dO [STREAM, D]
        else:
            qt = _load_cols(q_src, rows, stride_qn, stride_qd, Nq, d_ok, EVEN)  # Q^T [D, STREAM]
            do = _load_rows(do_src, rows, stride_don, stride_dod, Nq, d_ok, EVEN)  # dO [STREAM, D]
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))  # rows past Nq get P = 0
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        pt = tl.exp2(tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale - lse[None, :])  # P^T [SUB, STREAM]
        if MASKED == 1:  # a band tile, lo <= c - r <= hi (c: this program's keys, r: the streamed rows)
            tid = tl.load(tile_idx + t // PER)
            c_r = offs_n[:, None] - piece[None, :]
            pt = tl.where((c_r >= tl.load(TILE_LO + tid)) & (c_r <= tl.load(TILE_HI + tid)), pt, 0.0)
        if MASKED == 2:
            tile = tl.load(TILES + tl.load(tile_idx + t // PER).to(tl.int64) * BLOCK * BLOCK
                           + piece[None, :] * BLOCK + offs_n[:, None])  # the tile, transposed
            pt = tl.where(tile != 0, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)  # dV += P^T dO
        dst = pt * (tl.dot(v, tl.trans(do), input_precision=DOT_PREC) - delta[None, :])  # dS^T
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PREC)  # dK += dS^T Q
    return dk, dv


@triton.jit
def _bs_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, ORDER, Q_IDX, Q_CNT, Q_FULL, Q_BAND, Q_TILE_IDX, TILES, TILE_LO,
                 TILE_HI,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                 stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                 H, HKV, GROUP, Nq, Nk, D, max_visits, scale, qk_scale,
                 EVEN: tl.constexpr, TMA: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
                 STREAM: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    # one program owns SUB keys of a key block (BLOCK // SUB programs per block), longest first
    kb = tl.load(ORDER + tl.program_id(0) // (BLOCK // SUB))
    sub_col = tl.program_id(0) % (BLOCK // SUB) * SUB
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    cols = kb * BLOCK + sub_col + tl.arange(0, SUB)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    kv_mask = (cols[:, None] < Nk) & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + cols[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + cols[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([SUB, HEAD_DIM], tl.float32)
    dv = tl.zeros([SUB, HEAD_DIM], tl.float32)
    q_idx = Q_IDX + kb * max_visits
    tile_idx = Q_TILE_IDX + kb * max_visits
    n_full = tl.load(Q_FULL + kb)  # full visits, then band tiles, then other partial ones
    n_band = tl.load(Q_BAND + kb)
    n_visits = tl.load(Q_CNT + kb)
    for g in range(0, GROUP):  # every query head that reads this k/v head
        h = hk * GROUP + g
        if TMA:
            q_src, do_src = Q, DO
        else:
            q_src = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            do_src = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + (b * H + h).to(tl.int64) * Nq
        delta_base = DELTA + (b * H + h).to(tl.int64) * Nq
        dk, dv = _bs_dkdv_loop(dk, dv, k, v, q_src, do_src, b, h, lse_base, delta_base, stride_qn, stride_qd,
                               stride_don, stride_dod, q_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_col, 0, n_full,
                               Nq, d_ok, qk_scale, 0, EVEN, TMA, BLOCK, SUB, STREAM, DOT_PREC)
        dk, dv = _bs_dkdv_loop(dk, dv, k, v, q_src, do_src, b, h, lse_base, delta_base, stride_qn, stride_qd,
                               stride_don, stride_dod, q_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_col, n_full,
                               n_band, Nq, d_ok, qk_scale, 1, EVEN, TMA, BLOCK, SUB, STREAM, DOT_PREC)
        dk, dv = _bs_dkdv_loop(dk, dv, k, v, q_src, do_src, b, h, lse_base, delta_base, stride_qn, stride_qd,
                               stride_don, stride_dod, q_idx, tile_idx, TILES, TILE_LO, TILE_HI, sub_col, n_band,
                               n_visits, Nq, d_ok, qk_scale, 2, EVEN, TMA, BLOCK, SUB, STREAM, DOT_PREC)
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + cols[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + cols[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


def _tuned_config(kernel: str, block: int, head_dim: int, elem_bytes: int) -> dict:
    """The configuration tuned on an H100 / H200 for a mask's block size (before fitting it to the device)."""
    big = block * head_dim >= 128 * 128
    if elem_bytes == 2 and head_dim <= 128:
        # 16-bit, D <= 128. The backward keeps 64-row parts of a block resident and streams 64-row
        # pieces in a 2-deep pipeline: its five live tiles fit in registers only at that size (whole
        # 128-blocks spill). The forward keeps a whole 128-row block in 8 warps and streams 64-key
        # pieces, capped at 128 registers a thread (it compiles to that without spilling) so that two
        # programs share an SM and one's loads and epilogue hide under the other's matrix work.
        # The sweeps behind these choices: book/notes/block_sparse.md.
        if kernel == "fwd":
            return {"SUB": min(block, 128), "STREAM": min(block, 64), "num_warps": 8, "num_stages": 2, "TMA": True,
                    "maxnreg": 128}
        return {"SUB": min(block, 64), "STREAM": min(block, 64), "num_warps": 4, "num_stages": 2, "TMA": True}
    # float32, or a head dim past 128: whole blocks; one stage in the backward, whose five live tiles
    # leave no room for a second copy of the streamed ones (fit_shared_memory takes them down to what
    # the device holds: on an H100, float32 blocks of 128 do not fit whole)
    return {"SUB": block, "STREAM": block, "num_warps": 8 if big else 4, "num_stages": 3 if kernel == "fwd" else 1,
            "TMA": False}


def smem_need(kernel: str, cfg: dict, head_dim: int, elem_bytes: int) -> int:
    """``flash.smem_estimate`` for one kernel at ``cfg`` and head dim ``head_dim``. Each kernel keeps
    two operands of SUB rows resident (the forward one) and streams two STREAM-row tiles, with the
    partial blocks' element-mask tile (SUB x STREAM bytes) and, in dK/dV, the streamed rows' lse and delta.
    Loads through tensor descriptors keep ``num_stages + 1`` copies of the streamed tiles (Triton 3.9 on
    sm_90 allocates up to that many across the kernels' three loops)."""
    sub, stream, stages = cfg["SUB"], cfg["STREAM"], cfg["num_stages"]
    head_dim = _head_dim_pad(head_dim)
    resident = (1 if kernel == "fwd" else 2) * sub * head_dim  # q (forward); q, dO (dQ); k, v (dK/dV)
    extra = sub * stream + (8 * stream if kernel == "dkdv" else 0)
    return smem_estimate(resident, (stream * head_dim, stream * head_dim), elem_bytes, stages, extra,
                         buffers=stages + 1 if cfg.get("TMA") else None, split=split_operands(cfg, elem_bytes))


def tile_config(kernel: str, block: int, head_dim: int, elem_bytes: int, smem_limit: int | None) -> dict:
    """The planning seam: the launch configuration of one kernel (``"fwd"``, ``"dq"`` or ``"dkdv"``) for a
    mask's block size, on a GPU whose programs may use ``smem_limit`` bytes of shared memory (None: no
    limit), for inputs of ``elem_bytes`` bytes (4: float32, 2: float16 / bfloat16) and head dim
    ``head_dim``. A pure function: the tuned configuration (``_tuned_config``), fitted to ``smem_limit``
    by ``flash.fit_shared_memory`` (fewer stages, then smaller SUB / STREAM pieces of the block).

    STREAM: the keys (forward, dQ) or query rows (dK/dV) streamed per step, a piece of the mask's
    block; SUB: the query rows (forward, dQ) or keys (dK/dV) one program keeps resident.
    """
    pad = _head_dim_pad(head_dim)
    return fit_shared_memory(_tuned_config(kernel, block, head_dim, elem_bytes),
                             lambda c: smem_need(kernel, c, pad, elem_bytes), smem_limit, ("STREAM", "SUB"),
                             resident="SUB", relaxed=TF32_FALLBACK if elem_bytes == 4 else None)


@functools.cache
def _planned(kernel: str, block: int, head_dim: int, elem_bytes: int, smem_limit: int | None) -> dict:
    return tile_config(kernel, block, head_dim, elem_bytes, smem_limit)  # planned once per launch shape


def _config(kernel: str, block: int, head_dim: int, elem_bytes: int) -> dict:
    """Launch configuration of one kernel ("fwd", "dq" or "dkdv") for a mask's block size: ``tile_config``
    for the current device's shared memory."""
    if is_interpreter():  # small pieces, so that the CPU tests exercise the piece and sub-block indexing
        return {"SUB": min(block, 16), "STREAM": min(block, 32), "num_warps": 4, "num_stages": 1, "TMA": True}
    return dict(_planned(kernel, block, head_dim, elem_bytes, shared_memory_limit()))


def _sources(cfg: dict, rows: int, head_dim: int, *ts: torch.Tensor) -> tuple[dict, tuple]:
    # the kernel's TMA flag and what it reads the streamed tensors through: descriptors of
    # [1, 1, rows, head_dim] tiles, or (inputs a descriptor cannot describe) the tensors themselves
    # (a descriptor cannot describe an empty tensor; nothing is read from one anyway)
    tma = cfg.get("TMA", False) and all(t.numel() > 0 for t in ts) and tma_ready(*ts)
    if not tma:
        return {**cfg, "TMA": False}, ts
    from triton.tools.tensor_descriptor import TensorDescriptor

    return cfg, tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, head_dim]) for t in ts)


def _even(bm: BlockMask, d: int) -> bool:
    # no tile overhangs the ends of Q, K or the head dim: the kernels may skip every bounds mask
    return bm.q_len % bm.block_size == 0 and bm.kv_len % bm.block_size == 0 and _head_dim_pad(d) == d


def _forward(q, k, v, bm: BlockMask, scale: float, cfg: dict | None = None):
    # cfg: an override of _config("fwd", ...), for tuning
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    o = empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:  # no query row (B, H or Nq is 0): nothing to launch
        return o, lse
    lay = bm.kernel_layout
    cfg = cfg or _config("fwd", bm.block_size, D, q.element_size())
    cfg, (k_src, v_src) = _sources(cfg, cfg["STREAM"], _head_dim_pad(D), k, v)
    _bs_fwd[(bm.n_q_blocks * (bm.block_size // cfg["SUB"]), B * H)](
        q, k_src, v_src, o, lse, lay["q_order"], lay["kv_indices"], bm.kv_counts.contiguous(), lay["kv_full"],
        lay["kv_band_end"], lay["tile_index"], lay["tiles"], lay["tile_lo"], lay["tile_hi"],
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, H // HKV, Nq, Nk, D, bm.kv_indices.shape[1],
        scale * LOG2E, EVEN=_even(bm, D), BLOCK=bm.block_size, HEAD_DIM=_head_dim_pad(D),
        **{**dot_options(q.dtype), **cfg})
    return o, lse


def _backward(q, k, v, o, lse, do, bm: BlockMask, scale: float, dq_cfg: dict | None = None,
              dkdv_cfg: dict | None = None):
    # dq_cfg, dkdv_cfg: overrides of _config("dq" / "dkdv", ...), for tuning
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    if q.numel() == 0:  # no query row reads k or v: their gradients are zero, and nothing is launched
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    pad = _head_dim_pad(D)
    delta = empty((B, H, Nq), dtype=torch.float32, device=q.device)  # written by the dQ kernel
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    lay = bm.kernel_layout
    bs = bm.block_size
    cfg = dq_cfg or _config("dq", bs, D, q.element_size())
    cfg, (k_src, v_src) = _sources(cfg, cfg["STREAM"], pad, k, v)
    _bs_bwd_dq[(bm.n_q_blocks * (bs // cfg["SUB"]), B * H)](
        q, k_src, v_src, o, do, dq, lse, delta, lay["q_order"], lay["kv_indices"], bm.kv_counts.contiguous(),
        lay["kv_full"], lay["kv_band_end"], lay["tile_index"], lay["tiles"], lay["tile_lo"], lay["tile_hi"],
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(), H, H // HKV, Nq, Nk, D,
        bm.kv_indices.shape[1], scale, scale * LOG2E,
        EVEN=_even(bm, D), BLOCK=bs, HEAD_DIM=pad, **{**dot_options(q.dtype), **cfg})
    if bm.n_kv_blocks == 0:  # no keys: dK and dV are empty
        return dq, dk, dv
    cfg = dkdv_cfg or _config("dkdv", bs, D, q.element_size())
    cfg, (q_src, do_src) = _sources(cfg, cfg["STREAM"], pad, q, do)
    _bs_bwd_dkdv[(bm.n_kv_blocks * (bs // cfg["SUB"]), B * HKV)](
        q_src, k, v, do_src, dk, dv, lse, delta, lay["kv_order"], lay["q_indices"], bm.q_counts.contiguous(),
        lay["q_full"], lay["q_band_end"], lay["q_tile_index"], lay["tiles"], lay["tile_lo"], lay["tile_hi"],
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), H, HKV, H // HKV, Nq, Nk, D,
        bm.q_indices.shape[1], scale, scale * LOG2E,
        EVEN=_even(bm, D), BLOCK=bs, HEAD_DIM=pad, **{**dot_options(q.dtype), **cfg})
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bm, scale):
        dtype = q.dtype
        work = _compute_dtype(dtype)
        qw, kw, vw = (int32_addressable(n, t.to(work)) for n, t in (("q", q), ("k", k), ("v", v)))
        with on_device_of(q):
            o, lse = _forward(qw, kw, vw, bm, scale)
        ctx.save_for_backward(qw, kw, vw, o, lse)
        ctx.graph_inputs = (q, k, v)  # for once_differentiable (no data is read from them)
        ctx.bm, ctx.scale, ctx.dtype = bm, scale, dtype
        return o.to(dtype)

    @staticmethod
    @once_differentiable  # the backward is kernels: a second derivative raises, never detaches
    def backward(ctx, do):
        qw, kw, vw, o, lse = ctx.saved_tensors
        with on_device_of(qw):
            dq, dk, dv = _backward(qw, kw, vw, o, lse, int32_addressable("grad of out", do.to(qw.dtype)), ctx.bm,
                                   ctx.scale)
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None, None


# --------------------------------------------------------------------------------------------------
# checking a BlockMask before a kernel reads it
# --------------------------------------------------------------------------------------------------

# (name, dtype) of a BlockMask's tensors. The kernels follow its indices without bounds checks, so a
# mask built by hand is checked here first: an index past the end would be an out-of-bounds read.
_MASK_TENSORS = (("kv_indices", torch.int32), ("kv_counts", torch.int32), ("partial", torch.bool),
                 ("tile_index", torch.int32), ("tiles", torch.bool), ("q_indices", torch.int32),
                 ("q_counts", torch.int32), ("q_partial", torch.bool), ("q_tile_index", torch.int32))

# id(mask) -> the signature of its tensors when their values were last checked (see _mask_signature)
_CHECKED: dict[int, tuple] = {}


def _check_mask_structure(bm: BlockMask, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
    """Types, shapes, dtypes and devices of ``bm``'s fields against q and k: no host sync. Returns the
    mask, or a copy whose tensors the kernels address as dense arrays made contiguous."""
    if not isinstance(bm, BlockMask):
        raise TypeError(f"block_mask must be a minikernels.masks.BlockMask, got {type(bm).__name__}")
    for name in ("q_len", "kv_len", "block_size"):
        value = getattr(bm, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"block_mask.{name} must be an int, got {type(value).__name__}")
    nq, nk = q.shape[2], k.shape[2]
    if (bm.q_len, bm.kv_len) != (nq, nk):
        raise ValueError(f"block_mask was built for q_len={bm.q_len}, kv_len={bm.kv_len}, "
                         f"but q has Nq={nq} and k has Nk={nk}")
    bs = bm.block_size
    if bs > MAX_BLOCK_SIZE:
        raise ValueError(f"block_mask.block_size={bs} is larger than the kernel's largest "
                         f"tile ({MAX_BLOCK_SIZE}); rebuild the mask with block_size 16, 32, 64 or 128")
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_mask.block_size must be a power of two from 16 to {MAX_BLOCK_SIZE}, got {bs}")
    for name, _ in _MASK_TENSORS:
        t = getattr(bm, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"block_mask.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"block_mask is on {t.device} (its {name}), q on {q.device}: build the mask with "
                             f"device={q.device.type!r}")
    for name, dtype in _MASK_TENSORS:
        t = getattr(bm, name)
        if t.dtype != dtype:
            raise TypeError(f"block_mask.{name} must have dtype {str(dtype).replace('torch.', '')}, "
                            f"got {str(t.dtype).replace('torch.', '')}")
    n_tiles = bm.tiles.shape[0] if bm.tiles.dim() == 3 else 0
    expected = {"tiles": (n_tiles, bs, bs)}
    for side, rows in (("kv_", bm.n_q_blocks), ("q_", bm.n_kv_blocks)):
        idx = getattr(bm, f"{side}indices")
        width = idx.shape[1] if idx.dim() == 2 else 1
        if idx.dim() != 2 or width < 1:
            raise ValueError(f"block_mask.{side}indices must be [{rows}, width >= 1], got shape {tuple(idx.shape)}")
        partial, tile = ("partial", "tile_index") if side == "kv_" else ("q_partial", "q_tile_index")
        expected.update({f"{side}indices": (rows, width), f"{side}counts": (rows,), partial: (rows, width),
                         tile: (rows, width)})
    for name, shape in expected.items():
        if tuple(getattr(bm, name).shape) != shape:
            raise ValueError(f"block_mask.{name} must have shape {shape} for q_len={bm.q_len}, kv_len={bm.kv_len} "
                             f"and block_size={bs}, got {tuple(getattr(bm, name).shape)}")
    # the kernels read the counts and the tiles as dense arrays: give them dense ones
    loose = {n: getattr(bm, n).contiguous() for n in ("kv_counts", "q_counts", "tiles")
             if not getattr(bm, n).is_contiguous()}
    return dataclasses.replace(bm, **loose) if loose else bm


def _mask_signature(bm: BlockMask) -> tuple:
    # Which tensors, and how often each was modified in place (torch's version counter): a mask whose
    # values were checked stays checked until one of its tensors changes. Inference tensors keep no
    # version counter: such a mask is checked once (a BlockMask is not meant to change in place).
    return tuple((t.data_ptr(), None if t.is_inference() else t._version)
                 for t in (getattr(bm, name) for name, _ in _MASK_TENSORS))


def _visit_errors(bm: BlockMask, side: str) -> list[str]:
    """What is wrong with one side's visit lists (host sync): counts outside [0, width], counted indices
    outside [0, n_other_blocks) or not increasing, tile numbers outside [0, n_tiles)."""
    idx, counts = getattr(bm, f"{side}indices"), getattr(bm, f"{side}counts")
    partial, tile = (bm.partial, bm.tile_index) if side == "kv_" else (bm.q_partial, bm.q_tile_index)
    n_other = bm.n_kv_blocks if side == "kv_" else bm.n_q_blocks
    other = "n_kv_blocks" if side == "kv_" else "n_q_blocks"
    n_tiles, width = bm.tiles.shape[0], idx.shape[1]
    c = counts.long()
    i = idx.long()
    counted = torch.arange(width, device=idx.device)[None, :] < c[:, None]
    zero = torch.zeros(1, dtype=torch.long, device=idx.device)
    bad = torch.stack([
        torch.cat([zero, c]).min(), torch.cat([zero, c]).max(),
        (counted & ((i < 0) | (i >= n_other))).sum(),
        (counted[:, 1:] & (i[:, 1:] <= i[:, :-1])).sum(),
        (counted & partial & ((tile < 0) | (tile >= n_tiles))).sum(),
        # the layout looks up every tile number (padding too) when there are tiles: none may be past the end
        (tile >= n_tiles).sum() if n_tiles else zero[0],
    ]).tolist()  # one host sync
    lo, hi, out_of_range, unordered, bad_tile, bad_any_tile = bad
    errors = []
    if lo < 0 or hi > width:
        errors.append(f"block_mask.{side}counts must lie in [0, {width}] (the width of {side}indices), "
                      f"got values in [{int(c.min())}, {int(c.max())}]")
    elif out_of_range:
        row = int((counted & ((i < 0) | (i >= n_other))).any(1).nonzero()[0])
        errors.append(f"block_mask.{side}indices must lie in [0, {other}={n_other}) where counted; row {row} "
                      f"lists {idx[row, :c[row]].tolist()}")
    elif unordered:
        row = int((counted[:, 1:] & (i[:, 1:] <= i[:, :-1])).any(1).nonzero()[0])
        errors.append(f"block_mask.{side}indices must increase along each row (each block once); row {row} "
                      f"lists {idx[row, :c[row]].tolist()}")
    name = "tile_index" if side == "kv_" else "q_tile_index"
    if bad_tile or bad_any_tile:
        errors.append(f"block_mask.{name} must lie in [0, {n_tiles}) (the number of tiles) for partial visits, "
                      f"and below {n_tiles} everywhere")
    return errors


def _check_mask_values(bm: BlockMask) -> None:
    """The values the kernels follow: both visit lists in bounds, and the key-side lists (read by the
    backward's dK/dV kernel) the same visits as the query-side ones (read by the forward and dQ)."""
    errors = _visit_errors(bm, "kv_") + _visit_errors(bm, "q_")
    if errors:
        raise ValueError("; ".join(errors))
    nkb, dev = bm.n_kv_blocks, bm.kv_indices.device

    def visits(idx, counts, partial, tile, by_query):
        counted = torch.arange(idx.shape[1], device=dev)[None, :] < counts.long()[:, None]
        rows = torch.arange(idx.shape[0], device=dev)[:, None].expand_as(idx)[counted]
        cols = idx.long()[counted]
        key = rows * nkb + cols if by_query else cols * nkb + rows  # (query block, key block), row-major
        key, order = key.sort()
        part = partial[counted][order]
        return key, part, torch.where(part, tile[counted][order], -1)

    kv = visits(bm.kv_indices, bm.kv_counts, bm.partial, bm.tile_index, True)
    qs = visits(bm.q_indices, bm.q_counts, bm.q_partial, bm.q_tile_index, False)
    if kv[0].shape != qs[0].shape or not all(bool(torch.equal(a, b)) for a, b in zip(kv, qs)):
        raise ValueError("block_mask's key-side lists (q_indices, q_counts, q_partial, q_tile_index; read by the "
                         "backward) must list the same visits, partial flags and tiles as its query-side lists "
                         "(kv_indices, kv_counts, partial, tile_index); build masks with minikernels.masks")


def _check_block_mask(bm: BlockMask, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
    """Check ``bm`` against q and k before any kernel follows its indices. The structure is checked on
    every call; the values once per mask (they need a host sync), and again if a tensor of the mask is
    changed in place. Returns the mask the kernels should read."""
    checked = _CHECKED.get(id(bm))
    if checked is not None and (bm.q_len, bm.kv_len) == (q.shape[2], k.shape[2]) \
            and bm.kv_indices.device == q.device and _mask_signature(bm) == checked:
        return bm  # checked before, and unchanged since: the common case costs a few attribute reads
    bm = _check_mask_structure(bm, q, k)
    sig = _mask_signature(bm)
    if _CHECKED.get(id(bm)) == sig:
        return bm
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("block_sparse_attention checks a new BlockMask's indices on the host, which cannot "
                           "happen while a CUDA graph is captured: call it once with this mask before capturing")
    _check_mask_values(bm)
    vars(bm).pop("kernel_layout", None)  # a layout cached before these values were checked is rebuilt from them
    if id(bm) not in _CHECKED:
        weakref.finalize(bm, _CHECKED.pop, id(bm), None)
    _CHECKED[id(bm)] = sig
    return bm


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                           scale: float | None = None) -> torch.Tensor:
    """Attention that visits only the tiles ``block_mask`` lists (forward and backward in Triton).

    q ``[B, H, Nq, D]``; k, v ``[B, Hkv, Nk, D]`` (grouped-query heads allowed), any strides;
    ``block_mask`` built for ``q_len = Nq``, ``kv_len = Nk`` with a block size of 16 to 128 (the
    kernels' tile), on the same device. One mask serves every batch and head. Element masks apply
    only on the partial blocks; a query that sees no key gets zeros. ``scale`` defaults to 1/sqrt(D).
    float16, bfloat16 or float32 (on the GPU, float32 products in 3-pass tf32, or single-pass tf32 on a
    GPU whose shared memory cannot hold the split operands: none on an H100 or H200), D up to 256; the
    pieces of a block each program keeps and streams are fitted to the device's shared memory
    (``tile_config``). Empty inputs (B, H, Nq or Nk = 0) give empty or zero outputs that stay in the
    autograd graph.
    Differentiable once: a gradient taken with ``create_graph=True`` cannot be differentiated again
    (backward through it raises a RuntimeError).

    The kernels follow the mask's indices without bounds checks, so the mask is checked first: the
    shapes, dtypes (int32 indices and counts, bool flags and tiles) and devices of its tensors on
    every call, and its values (counts within the width of the index lists, counted block indices in
    range and increasing, tile numbers in range, the key-side lists the same visits as the query-side
    ones) the first time a mask is used and again after any in-place change to its tensors. That value
    check reads the mask on the host: a device synchronisation, once per mask, which also means that
    a mask must be used once before a CUDA graph that uses it is captured. Masks from
    ``minikernels.masks`` always pass.
    """
    check_attention_inputs(q, k, v)
    block_mask = _check_block_mask(block_mask, q, k)
    scale = _check_scale(scale, q.shape[-1])
    # empty inputs go through the autograd function too, so that the output stays in the graph
    return _BlockSparseAttention.apply(q, k, v, block_mask, scale)
