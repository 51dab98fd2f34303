"""The backward: dQ (with delta = rowsum(dO * O)) over each query block's key blocks, then dK and dV
over each key block's query blocks, recomputing P from the saved log-sum-exp; and their launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._backend import dot_options
from .._common import LOG2E, base2_lse_for_backward, head_dim_pad
from ..masks import BlockMask
from .loads import load_cols, load_rows, tma_rows
from .plan import batch_slices_of, even_tiles, launch_config, launch_fitted, streamed_sources


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
            kt = tl.trans(tma_rows(k_src, b, hk, start, STREAM, d_ok.shape[0]))  # K^T [D, STREAM]
            vt = tl.trans(tma_rows(v_src, b, hk, start, STREAM, d_ok.shape[0]))  # V^T [D, STREAM]
        else:
            kt = load_cols(k_src, cols, stride_kn, stride_kd, Nk, d_ok, EVEN)  # K^T [D, STREAM]
            vt = load_cols(v_src, cols, stride_vn, stride_vd, Nk, d_ok, EVEN)  # V^T [D, STREAM]
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
    lse = base2_lse_for_backward(lse)  # no key: P = 0
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
            qt = tl.trans(tma_rows(q_src, b, h, start, STREAM, d_ok.shape[0]))  # Q^T [D, STREAM]
            do = tma_rows(do_src, b, h, start, STREAM, d_ok.shape[0])  # dO [STREAM, D]
        else:
            qt = load_cols(q_src, rows, stride_qn, stride_qd, Nq, d_ok, EVEN)  # Q^T [D, STREAM]
            do = load_rows(do_src, rows, stride_don, stride_dod, Nq, d_ok, EVEN)  # dO [STREAM, D]
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))  # rows past Nq get P = 0
        lse = base2_lse_for_backward(lse)
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


def launch_backward(q, k, v, o, lse, do, bm: BlockMask, scale: float, dq_cfg: dict | None = None,
              dkdv_cfg: dict | None = None):
    # dq_cfg, dkdv_cfg: overrides of launch_config("dq" / "dkdv", ...), for tuning
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    if q.numel() == 0:  # no query row reads k or v: their gradients are zero, and nothing is launched
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    pad = head_dim_pad(D)
    delta = empty((B, H, Nq), dtype=torch.float32, device=q.device)  # written by the dQ kernel
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    lay = bm.kernel_layout
    bs = bm.block_size

    def launch_dq(cfg):
        for lo, hi in batch_slices_of(B, H):
            run, (k_src, v_src) = streamed_sources(cfg, cfg["STREAM"], pad, k[lo:hi], v[lo:hi])
            _bs_bwd_dq[(bm.n_q_blocks * (bs // run["SUB"]), (hi - lo) * H)](
                q[lo:hi], k_src, v_src, o[lo:hi], do[lo:hi], dq[lo:hi], lse[lo:hi], delta[lo:hi], lay["q_order"],
                lay["kv_indices"], bm.kv_counts.contiguous(), lay["kv_full"], lay["kv_band_end"], lay["tile_index"],
                lay["tiles"], lay["tile_lo"], lay["tile_hi"], *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                *do.stride(), *dq.stride(), H, H // HKV, Nq, Nk, D, bm.kv_indices.shape[1], scale, scale * LOG2E,
                EVEN=even_tiles(bm, D), BLOCK=bs, HEAD_DIM=pad, **{**dot_options(q.dtype), **run})

    def launch_dkdv(cfg):
        for lo, hi in batch_slices_of(B, HKV):
            run, (q_src, do_src) = streamed_sources(cfg, cfg["STREAM"], pad, q[lo:hi], do[lo:hi])
            _bs_bwd_dkdv[(bm.n_kv_blocks * (bs // run["SUB"]), (hi - lo) * HKV)](
                q_src, k[lo:hi], v[lo:hi], do_src, dk[lo:hi], dv[lo:hi], lse[lo:hi], delta[lo:hi], lay["kv_order"],
                lay["q_indices"], bm.q_counts.contiguous(), lay["q_full"], lay["q_band_end"], lay["q_tile_index"],
                lay["tiles"], lay["tile_lo"], lay["tile_hi"], *q.stride(), *k.stride(), *v.stride(), *do.stride(),
                *dk.stride(), *dv.stride(), H, HKV, H // HKV, Nq, Nk, D, bm.q_indices.shape[1], scale,
                scale * LOG2E, EVEN=even_tiles(bm, D), BLOCK=bs, HEAD_DIM=pad, **{**dot_options(q.dtype), **run})

    launch_fitted(("dq", bs, pad, q.element_size()), dq_cfg or launch_config("dq", bs, D, q.element_size()), launch_dq)
    if bm.n_kv_blocks == 0:  # no keys: dK and dV are empty
        return dq, dk, dv
    launch_fitted(("dkdv", bs, pad, q.element_size()), dkdv_cfg or launch_config("dkdv", bs, D, q.element_size()),
            launch_dkdv)
    return dq, dk, dv
