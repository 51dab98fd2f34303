"""The backward's parallel passes: dV (``_la_dv``, or fused with the reverse state pass in
``_la_dfused``), dQ and dK (``_la_dqdk``), and the rate's gradient for mk.ssd (``_la_rate_grads``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._common import launch_fitting, sm_count
from .common import block, chunk_cumsum, decay_mask, per_step_args, tile_opts
from .plan import (
    BWD_TILES,
    dqdk_unroll_v,
    fused_fits,
    fused_max_dk,
    fused_segments,
    heads_per_program,
    state_grad_segments,
)
from .states import reverse_segment_starts, state_grads


@triton.jit
def _la_dv(Q, K, G, W, V, DO, DHS, DVO, DW_PART,
           stride_qb, stride_qh, stride_qn, stride_qd,
           stride_kb, stride_kh, stride_kn, stride_kd,
           stride_gb, stride_gh, stride_gn,
           stride_wb, stride_wh, stride_wn,
           stride_vb, stride_vh, stride_vn, stride_vd,
           stride_dob, stride_doh, stride_don, stride_dod,
           stride_dvb, stride_dvh, stride_dvn, stride_dvd,
           H, N, DK, DV, NT,
           HAS_DECAY: tl.constexpr, HAS_W: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
           DOT_PREC: tl.constexpr):
    # dV_c = (Q K^T * M)^T dO + (K * exp(b_C - b)) dS_c, every chunk at once. A^T = K Q^T is its own
    # product rather than tl.trans of Q K^T: a transposed dot result feeding a dot is what Triton
    # 3.4-3.7.0 miscompiles on Hopper (fla-org/flash-linear-attention#640).
    # With HAS_W the kernels saw the values w_t v_t: the gradient of v_t is then w_t dV_t, and w_t's
    # is v_t . dV_t, summed here over this program's block of Dv (DW_PART[iv, bh, t]).
    ic, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b_idx, h = bh // H, bh % H
    offs_c = tl.arange(0, C)
    offs_v = iv * BV + tl.arange(0, BV)
    v_ok = offs_v < DV
    rows = (ic * C + offs_c).to(tl.int64)
    row_ok = rows < N
    tile_ok = row_ok[:, None] & v_ok[None, :]
    q_base = Q + b_idx.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b_idx.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    dhs_base = DHS + (bh.to(tl.int64) * NT + ic) * DK * DV
    b, b_last = chunk_cumsum(G, b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh, stride_gn,
                              rows, row_ok, C, HAS_DECAY)
    at = tl.zeros([C, C], tl.float32)
    dv = tl.zeros([C, BV], tl.float32)
    for k0 in range(0, DK, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < DK
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_k[None, :] * stride_qd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read C*BK
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_k[None, :] * stride_kd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read C*BK
        ds = tl.load(dhs_base + offs_k[:, None] * DV + offs_v[None, :],
                     mask=k_ok[:, None] & v_ok[None, :], other=0.0)  # read BK*BV
        at += tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # A^T[s, t] = k_s . q_t
        dv += tl.dot(k, ds, input_precision=DOT_PREC)
    do = tl.load(DO + b_idx.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + rows[:, None] * stride_don + offs_v[None, :] * stride_dod, mask=tile_ok, other=0.0)  # read C*BV
    at = at * decay_mask(b, C, True)
    dv = dv * tl.exp(b_last - b)[:, None] + tl.dot(at.to(do.dtype), do, input_precision=DOT_PREC)
    if HAS_W:
        v = tl.load(V + b_idx.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + rows[:, None] * stride_vn
                    + offs_v[None, :] * stride_vd, mask=tile_ok, other=0.0).to(tl.float32)  # read C*BV
        tl.store(DW_PART + (iv * tl.num_programs(2) + bh).to(tl.int64) * N + rows, tl.sum(v * dv, 1),
                 mask=row_ok)  # write C
        dv *= tl.load(W + b_idx.to(tl.int64) * stride_wb + h.to(tl.int64) * stride_wh + rows * stride_wn,
                      mask=row_ok, other=0.0)[:, None]  # read C
    tl.store(DVO + b_idx.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh + rows[:, None] * stride_dvn
             + offs_v[None, :] * stride_dvd, dv.to(DVO.dtype.element_ty), mask=tile_ok)  # write C*BV


@triton.jit
def _la_dfused(Q, K, G, W, V, DO, S_IN, DHS, DVO, DW_PART, S_OUT,
               stride_qb, stride_qh, stride_qn, stride_qd,
               stride_kb, stride_kh, stride_kn, stride_kd,
               stride_gb, stride_gh, stride_gn,
               stride_wb, stride_wh, stride_wn,
               stride_vb, stride_vh, stride_vn, stride_vd,
               stride_dob, stride_doh, stride_don, stride_dod,
               stride_dvb, stride_dvh, stride_dvn, stride_dvd,
               H, N, DK, DV, NT, SEG_CHUNKS,
               HAS_DECAY: tl.constexpr, HAS_S_IN: tl.constexpr, STORE_FINAL: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    # _la_dstates and _la_dv in one reverse walk (the weighted backward, mk.ssd's), as _la_fused is
    # the forward's: one program per [Dk, BV] block of one (batch, head)'s state gradient walks its
    # segment's chunks from the last, from S_IN (the gradient of the state at the segment's end;
    # segments numbered from the sequence's end, as in _la_dstates) or zeros, with dS in registers.
    # At each chunk it writes dS for _la_dqdk, as _la_dstates does (the 16-bit copy), and uses that
    # copy at once for the chunk's dV, as _la_dv would after reading it back:
    #     dV_c = (Q K^T * M)^T dO + (K * exp(b_C - b)) dS,   then   dS = exp(b_C) dS + (Q * exp(b))^T dO.
    # The whole of Dk is one tile (BK >= DK): dV needs every row of dS. The values' weights W are
    # always there (the one walk serves mk.ssd only): dV_c is of w_t v_t, so dv_t = w_t dV_t and
    # dw_t = v_t . dV_t, summed over this program's block of Dv (DW_PART[iv, bh, t]).
    iv = tl.program_id(0)
    n_seg = tl.cdiv(NT, SEG_CHUNKS)
    bh, seg = tl.program_id(1) // n_seg, tl.program_id(1) % n_seg
    b_idx, h = bh // H, bh % H
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok, v_ok = offs_k < DK, offs_v < DV
    tile_ok = k_ok[:, None] & v_ok[None, :]
    q_base = Q + b_idx.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b_idx.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    do_base = DO + b_idx.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    dv_base = DVO + b_idx.to(tl.int64) * stride_dvb + h.to(tl.int64) * stride_dvh
    g_base = b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    tile = offs_k[:, None] * DV + offs_v[None, :]  # states are [.., DK, DV], contiguous
    seg_state = (bh.to(tl.int64) * n_seg + n_seg - 1 - seg) * DK * DV  # S_IN, S_OUT: [B*H, n_seg, DK, DV]
    if HAS_S_IN:
        dS = tl.load(S_IN + seg_state + tile, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], tl.float32)
    first = seg * SEG_CHUNKS
    last = tl.minimum(first + SEG_CHUNKS, NT)
    for i in range(0, last - first):
        c = last - 1 - i
        ds = dS.to(DHS.dtype.element_ty)
        tl.store(DHS + (bh.to(tl.int64) * NT + c) * DK * DV + tile, ds, mask=tile_ok)  # write DK*BV
        rows = (c * C + offs_c).to(tl.int64)
        row_ok = rows < N
        row_tile_ok = row_ok[:, None] & v_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_k[None, :] * stride_qd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read C*DK
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_k[None, :] * stride_kd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read C*DK
        do = tl.load(do_base + rows[:, None] * stride_don + offs_v[None, :] * stride_dod,
                     mask=row_tile_ok, other=0.0)  # read C*BV
        b, b_last = chunk_cumsum(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
        # A^T = K Q^T as its own product, not a transposed Q K^T (see _la_dv)
        at = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * decay_mask(b, C, True)
        dv = tl.dot(k, ds, input_precision=DOT_PREC) * tl.exp(b_last - b)[:, None]
        dv += tl.dot(at.to(do.dtype), do, input_precision=DOT_PREC)
        v = tl.load(V + b_idx.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + rows[:, None] * stride_vn
                    + offs_v[None, :] * stride_vd, mask=row_tile_ok, other=0.0).to(tl.float32)  # read C*BV
        tl.store(DW_PART + (iv * (tl.num_programs(1) // n_seg) + bh).to(tl.int64) * N + rows,
                 tl.sum(v * dv, 1), mask=row_ok)  # write C
        dv *= tl.load(W + b_idx.to(tl.int64) * stride_wb + h.to(tl.int64) * stride_wh + rows * stride_wn,
                      mask=row_ok, other=0.0)[:, None]  # read C
        tl.store(dv_base + rows[:, None] * stride_dvn + offs_v[None, :] * stride_dvd, dv.to(DVO.dtype.element_ty),
                 mask=row_tile_ok)  # write C*BV
        q_in = (q * tl.exp(b)[:, None]).to(q.dtype)  # q decayed back to the chunk's start
        dS = dS * tl.exp(b_last) + tl.dot(tl.trans(q_in), do, input_precision=DOT_PREC)
    if STORE_FINAL and seg == 0:  # the segment at the sequence's start: the initial state's gradient
        tl.store(S_OUT + bh.to(tl.int64) * DK * DV + tile, dS, mask=tile_ok)


@triton.jit
def _dqdk_v_block(iv, v_base, do_base, HS, DHS, state_base, rows, row_ok, offs_k, k_ok, q_or_k, w, row_scale,
                  a, grad, row_dot, state_dot, stride_vn, stride_vd, stride_don, stride_dod, DV,
                  FOR_Q: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_W: tl.constexpr, BV: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    # _la_dqdk's products over Dv block iv: dA (or dA^T); the state term of the gradient, added
    # straight into the sum over heads (its per-row decay factor row_scale folded into dO's, or
    # V's, rows first); its dot with the rows of Q (or K), for the decay's gradient; and, for dK
    # with a decay, <S_c, dS_c> per row of the Dk block
    offs_v = iv * BV + tl.arange(0, BV)
    tile_ok = row_ok[:, None] & (offs_v < DV)[None, :]
    state_ok = k_ok[:, None] & (offs_v < DV)[None, :]
    v = tl.load(v_base + rows[:, None] * stride_vn + offs_v[None, :] * stride_vd, mask=tile_ok,
                other=0.0).to(tl.float32)  # read C*BV
    if HAS_W:
        v = v * w[:, None]
    do = tl.load(do_base + rows[:, None] * stride_don + offs_v[None, :] * stride_dod, mask=tile_ok,
                 other=0.0)  # read C*BV
    tile = state_base + offs_k[:, None] * DV + offs_v[None, :]
    if FOR_Q:
        s = tl.load(HS + tile, mask=state_ok, other=0.0)  # read BK*BV
        a += tl.dot(do, tl.trans(v.to(do.dtype)), input_precision=DOT_PREC)  # dA[t, s] = do_t . v_s
        do_in = (do.to(tl.float32) * row_scale[:, None]).to(do.dtype)  # dO_t exp(b_t)
        grad = tl.dot(do_in, tl.trans(s), grad, input_precision=DOT_PREC)
        # q_t . (dO_t S^T) = dO_t . (q_t S), without the [C, BK] term itself
        row_dot += tl.sum(do.to(tl.float32) * tl.dot(q_or_k, s, input_precision=DOT_PREC), 1)
    else:
        ds = tl.load(DHS + tile, mask=state_ok, other=0.0)  # read BK*BV
        a += tl.dot(v.to(do.dtype), tl.trans(do), input_precision=DOT_PREC)  # dA^T
        v_out = (v * row_scale[:, None]).to(do.dtype)  # v_s exp(b_C - b_s): what of step s reaches S_end
        grad = tl.dot(v_out, tl.trans(ds), grad, input_precision=DOT_PREC)
        # k_s . (v_out_s dS^T) = v_out_s . (k_s dS)
        row_dot += tl.sum(v_out.to(tl.float32) * tl.dot(q_or_k, ds, input_precision=DOT_PREC), 1)
        if HAS_DECAY:
            s = tl.load(HS + tile, mask=state_ok, other=0.0)  # read BK*BV
            state_dot += tl.sum(s.to(tl.float32) * ds.to(tl.float32), 1)
    return a, grad, row_dot, state_dot


@triton.jit
def _la_dqdk(Q, K, V, G, W, DO, HS, DHS, DQK, DG_PART, DG_Q,
             stride_qb, stride_qh, stride_qn, stride_qd,
             stride_kb, stride_kh, stride_kn, stride_kd,
             stride_vb, stride_vh, stride_vn, stride_vd,
             stride_gb, stride_gh, stride_gn,
             stride_wb, stride_wh, stride_wn,
             stride_dob, stride_doh, stride_don, stride_dod,
             H, H_QK, N, DK, DV, NT, HEADS,
             FOR_Q: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_W: tl.constexpr, ADD_DG_Q: tl.constexpr,
             C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, UNROLL_V: tl.constexpr,
             DOT_PREC: tl.constexpr):
    # FOR_Q: dQ_c = (dO V^T * M) K + exp(b) dO S_c^T; else dK_c = (V dO^T * M^T) Q + exp(b_C - b) V dS_c^T;
    # every chunk at once (dA^T = V dO^T is its own product, see _la_dv). Two launches, one for each:
    # together their products and tiles do not fit one program's registers.
    # Then the decay's gradient, inside the chunk only (b is chunk-local): dL/db_t = q_t . dq_t -
    # k_t . dk_t, plus <dS_c, S_end of c> for b_C, summed from t to the chunk's end (each launch its
    # own terms). Summing over chunk-local terms keeps the error of a long sequence from piling up,
    # as a global sum of q.dq - k.dk would.
    # Q and K have H_QK heads (H, or 1 that all H heads read, as mk.ssd's C and B): a program takes
    # HEADS consecutive heads that read one Q and K, loads its Q and K block once and sums their
    # gradients in registers; DQK is [B * H_QK * (H / H_QK / HEADS), N, DK], one sum per group of
    # HEADS. No head's own [C, BK] gradient is formed: both products go straight into the sum (the
    # accumulator of tl.dot), and q_t . dq_t comes from [C, C] and [C, BV] tiles instead, through
    # q_t . (a_ts k_s) = a_ts (q_t . k_s) with Q K^T computed once for all the heads, and
    # q_t . (dO_t S^T) = dO_t . (q_t S) (and the same with K for dK). That leaves one [C, BK] float32
    # tile in registers, not three. Dv is covered in NV blocks. With UNROLL_V (few, 16-bit) they are
    # unrolled, so that the loop over heads is the innermost one, which Triton pipelines: the next
    # head's tiles load while this one's products run. Unrolled inside that pipelined loop, each
    # block's tiles get buffers of their own in shared memory; many blocks (a wide Dv) would not fit,
    # so they take a loop. With HAS_W, V's rows are weighted by w as the kernels saw them.
    # The dK launch (ADD_DG_Q) adds the dQ launch's part of the decay's gradient, DG_Q (summed over
    # its Dk blocks), in its first Dk block, so that no separate pass adds the two.
    ic, ik, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    per = H // H_QK
    splits = per // HEADS
    b_idx, hq, split = pid // (H_QK * splits), pid // splits % H_QK, pid % splits
    offs_c = tl.arange(0, C)
    offs_k = ik * BK + tl.arange(0, BK)
    k_ok = offs_k < DK
    rows = (ic * C + offs_c).to(tl.int64)
    row_ok = rows < N
    qk_ok = row_ok[:, None] & k_ok[None, :]
    q = tl.load(Q + b_idx.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh + rows[:, None] * stride_qn
                + offs_k[None, :] * stride_qd, mask=qk_ok, other=0.0)  # read C*BK
    k = tl.load(K + b_idx.to(tl.int64) * stride_kb + hq.to(tl.int64) * stride_kh + rows[:, None] * stride_kn
                + offs_k[None, :] * stride_kd, mask=qk_ok, other=0.0)  # read C*BK
    if FOR_Q:
        own, other = q, k
        pair = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # q_t . k_s at [t, s], this Dk block's part
    else:
        own, other = k, q
        pair = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # k_s . q_t at [s, t]
    grad_sum = tl.zeros([C, BK], tl.float32)
    for j in range(0, HEADS):
        h = hq * per + split * HEADS + j
        bh = b_idx * H + h
        v_base = V + b_idx.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        do_base = DO + b_idx.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        state_base = (bh.to(tl.int64) * NT + ic) * DK * DV
        b, b_last = chunk_cumsum(G, b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh, stride_gn,
                                  rows, row_ok, C, HAS_DECAY)
        w = 1.0  # unused without weights
        if HAS_W:
            w = tl.load(W + b_idx.to(tl.int64) * stride_wb + h.to(tl.int64) * stride_wh + rows * stride_wn,
                        mask=row_ok, other=0.0)  # read C
        row_scale = tl.exp(b) if FOR_Q else tl.exp(b_last - b)
        a = tl.zeros([C, C], tl.float32)  # dA (FOR_Q) or dA^T
        row_dot = tl.zeros([C], tl.float32)  # q_t . (state term of dq_t), or k_s . (state term of dk_s)
        state_dot = tl.zeros([BK], tl.float32)  # <S_c, dS_c>, one entry per row of this Dk block
        if UNROLL_V:  # few Dv blocks (mk.ssd's one): unrolled, the loop over heads stays the innermost
            for iv in tl.static_range(NV):
                a, grad_sum, row_dot, state_dot = _dqdk_v_block(
                    iv, v_base, do_base, HS, DHS, state_base, rows, row_ok, offs_k, k_ok, own, w, row_scale,
                    a, grad_sum, row_dot, state_dot, stride_vn, stride_vd, stride_don, stride_dod, DV,
                    FOR_Q, HAS_DECAY, HAS_W, BV, DOT_PREC)
        else:  # many: a loop, whose tiles, unlike an unrolled one's, do not grow with NV
            for iv in range(0, NV):
                a, grad_sum, row_dot, state_dot = _dqdk_v_block(
                    iv, v_base, do_base, HS, DHS, state_base, rows, row_ok, offs_k, k_ok, own, w, row_scale,
                    a, grad_sum, row_dot, state_dot, stride_vn, stride_vd, stride_don, stride_dod, DV,
                    FOR_Q, HAS_DECAY, HAS_W, BV, DOT_PREC)
        a = a * decay_mask(b, C, not FOR_Q)
        grad_sum = tl.dot(a.to(other.dtype), other, grad_sum, input_precision=DOT_PREC)
        if FOR_Q:  # q_t . dq_t
            d_b = row_scale * row_dot + tl.sum(a * pair, 1)
        else:  # <dS_c, S_end of c> = exp(b_C) <dS_c, S_c> + sum_s k_s . dk_state_s, the whole of it at b_C
            end_term = tl.exp(b_last) * tl.sum(state_dot, 0) + tl.sum(row_dot, 0)
            d_b = tl.where(offs_c == C - 1, end_term, 0.0) - row_dot - tl.sum(a * pair, 1)  # ... - k_s . dk_s
        if HAS_DECAY:
            dg = tl.sum(d_b, 0) - tl.cumsum(d_b, 0) + d_b  # summed from t to the chunk's end
            if ADD_DG_Q:
                if ik == 0:
                    dg += tl.load(DG_Q + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)  # read C
            tl.store(DG_PART + (ik * tl.num_programs(2) * HEADS + bh).to(tl.int64) * N + rows, dg,
                     mask=row_ok)  # write C
    tl.store(DQK + (pid.to(tl.int64) * N + rows[:, None]) * DK + offs_k[None, :], grad_sum.to(DQK.dtype.element_ty),
             mask=qk_ok)  # write C*BK


@triton.jit
def _la_rate_grads(DG, W, RATE, DW, DRATE_PART, H, N, RATE_ROWS, BLOCK: tl.constexpr):
    # With a rate (the log-decay g_t = w_t a_h, a_h = RATE[b % RATE_ROWS, h]; mk.ssd's dt A): g's
    # gradient folded into w's, dL/dw_t += dL/dg_t a_h (in place), and into a's, each block's sum of
    # dL/dg_t w_t (summed over blocks and batches by the host). One pass over the [B*H, N] rows instead
    # of PyTorch's three. A kernel of its own: in _la_dqdk's epilogue, its registers would make that
    # kernel spill more.
    bh, blk = tl.program_id(0), tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    at = bh.to(tl.int64) * N + offs
    dg = tl.load(DG + at, mask=ok, other=0.0)  # read BLOCK
    w = tl.load(W + at, mask=ok, other=0.0)  # read BLOCK
    rate = tl.load(RATE + (bh // H % RATE_ROWS) * H + bh % H)
    tl.store(DW + at, tl.load(DW + at, mask=ok, other=0.0) + dg * rate, mask=ok)  # read, write BLOCK
    tl.store(DRATE_PART + bh.to(tl.int64) * tl.num_programs(1) + blk, tl.sum(dg * w, 0))


def _fused_state_and_value_grads(q, k, v, g, w, do, ds_end, chunk: int, dtype: torch.dtype):
    """state_grads and the values' gradients in one reverse walk (_la_dfused), for Dk <= fused_max_dk()
    and value weights w: (dhs, ds0, dv, the partial sums of w's gradient [Dv blocks, B*H, N]). The
    sequence is cut into segments as the one-walk forward's (fused_segments)."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    nt = triton.cdiv(N, chunk)
    cfg = BWD_TILES["dfused"]
    bv = block(DV, cfg["BV"])
    nv = triton.cdiv(DV, bv)
    n_seg = fused_segments(nv * B * H, nt, sm_count(q.device))
    seg_chunks = triton.cdiv(nt, n_seg)
    n_seg = triton.cdiv(nt, seg_chunks)  # as the kernel counts them
    if n_seg > 1:
        s_in, ds0 = reverse_segment_starts(q, do, g, ds_end, chunk, seg_chunks, n_seg)
    else:
        s_in, ds0 = ds_end, empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    dhs = empty((B * H, nt, DK, DV), dtype=dtype, device=q.device)
    dv = empty(v.shape, dtype=v.dtype, device=q.device)  # contiguous
    dw_part = empty((nv, B * H, N), dtype=torch.float32, device=q.device)
    gt, gs, has_decay = per_step_args(g, q)
    _la_dfused[(nv, B * H * n_seg)](
        q, k, gt, w, v, do, s_in if s_in is not None else ds0, dhs, dv, dw_part, ds0,
        *q.stride(), *k.stride(), *gs, *w.stride(), *v.stride(), *do.stride(), *dv.stride(), H, N, DK, DV, nt,
        seg_chunks, HAS_DECAY=has_decay, HAS_S_IN=s_in is not None, STORE_FINAL=n_seg == 1,
        C=chunk, BK=block(DK, fused_max_dk()), BV=bv, **tile_opts(q.dtype, cfg))
    return dhs, ds0, dv, dw_part


def backward(q, k, v, g, do, ds_end, chunk: int, hs, w=None, rate=None):
    """Gradients of q, k, v, the log-decay g, s0, the value weights w and the rate (None where absent).
    With a rate a [R, H] (mk.ssd's A), g is w_t a_h (a read at row b % R): the gradient of g is folded
    into those of w and a, and the one of g returned is None. q and k have H heads, as v
    does, or one that all H heads read (mk.ssd's C and B): their gradients then come summed over
    the heads, in that shape. hs: the state each chunk starts from, as the forward kept it."""
    B, H, N, DV = v.shape
    DK = q.shape[-1]
    h_qk = q.shape[1]
    qe, ke = q.expand(B, H, N, DK), k.expand(B, H, N, DK)  # views: each head reads its own (or the one)
    nt = triton.cdiv(N, chunk)
    gt, gs, has_decay = per_step_args(g, q)
    wt, ws, has_w = per_step_args(w, q)
    # The one reverse walk where state_grads would walk in segments anyway (few programs, as at
    # SSD's batch 1), not where it walks once: there the separate passes are faster (see BWD_TILES).
    if (has_w and DK <= fused_max_dk() and fused_fits(q, v, chunk, BWD_TILES["dfused"], value_tiles=2)
            and state_grad_segments(qe, DV, chunk) > 1):
        dhs, ds0, dv, dw_part = _fused_state_and_value_grads(qe, ke, v, g, w, do, ds_end, chunk, hs.dtype)
    else:
        dhs, ds0 = state_grads(qe, do, g, ds_end, chunk, hs.dtype)
        dv = empty(v.shape, dtype=v.dtype, device=q.device)  # contiguous
        cfg = BWD_TILES["dv_weighted" if has_w else "dv"]

        def launch_dv(tiles):
            bv = tiles["BV"]
            nv = triton.cdiv(DV, bv)
            dw_part = empty((nv, B * H, N), dtype=torch.float32, device=q.device) if has_w else ds0
            _la_dv[(nt, nv, B * H)](
                qe, ke, gt, wt, v, do, dhs, dv, dw_part, *qe.stride(), *ke.stride(), *gs, *ws, *v.stride(),
                *do.stride(), *dv.stride(), H, N, DK, DV, nt, HAS_DECAY=has_decay, HAS_W=has_w, C=chunk,
                BK=tiles["BK"], BV=bv,
                **tile_opts(q.dtype, {**cfg, **tiles}, num_warps=cfg["num_warps"] if bv * chunk >= 8192 else 4))
            return dw_part

        # too much shared memory for this GPU (wide float32 tiles): fewer stages, then narrower blocks
        tiles = {"BK": block(DK, cfg["BK"]), "BV": block(DV, cfg["BV"]), "num_stages": cfg["num_stages"]}
        dw_part = launch_fitting(("dv", q.dtype, chunk, has_decay, has_w) + tuple(tiles.values()), tiles, launch_dv,
                                 ("BV", "BK"))
    dw = (dw_part[0] if len(dw_part) == 1 else dw_part.sum(0)) if has_w else None  # over Dv blocks, [B*H, N]
    cfg = BWD_TILES["dqdk"]
    bv = block(DV, cfg["BV"])
    nv = triton.cdiv(DV, bv)
    heads = heads_per_program(H // h_qk, BWD_TILES["dqdk_heads"])
    splits = H // h_qk // heads
    # one program's sum over its heads; several programs' sums (splits > 1) are added below in float32
    part_dtype = q.dtype if splits == 1 else torch.float32
    unroll_v = nv <= dqdk_unroll_v() and q.element_size() == 2
    grads, dg = [], None
    for for_q in (True, False):
        def launch(tiles, for_q=for_q, dg_q=dg):  # dg_q: the dQ launch's dg, which the dK launch adds in
            bk = tiles["BK"]
            nk = triton.cdiv(DK, bk)
            grad = empty((B, h_qk, splits, N, DK), dtype=part_dtype, device=q.device)
            dg_part = empty((nk, B * H, N), dtype=torch.float32, device=q.device) if has_decay else ds0
            _la_dqdk[(nt, nk, B * h_qk * splits)](
                q, k, v, gt, wt, do, hs, dhs, grad, dg_part, dg_q if dg_q is not None else ds0,
                *q.stride(), *k.stride(), *v.stride(), *gs, *ws, *do.stride(), H, h_qk, N, DK, DV, nt, heads,
                FOR_Q=for_q, HAS_DECAY=has_decay, HAS_W=has_w, ADD_DG_Q=has_decay and not for_q, C=chunk, BK=bk,
                BV=bv, NV=nv, UNROLL_V=unroll_v, **tile_opts(q.dtype, cfg))
            return grad, dg_part
        key = ("dqdk", q.device, q.dtype, chunk, bv, nv, unroll_v, heads == 1, for_q, has_decay, has_w)
        # where the compiled kernel needs more shared memory than a program may have (mk.ssd's float32 at
        # chunks of 128), the Dk block is halved until it fits (not below 16), and remembered
        grad, dg_part = launch_fitting(key, {"BK": block(DK, cfg["BK"]), "num_stages": 1}, launch, ("BK",))
        grads.append(grad.sum(2).to(q.dtype) if splits > 1 else grad.view(B, h_qk, N, DK))
        if has_decay:  # the dQ launch's part, then the whole (the dK launch adds the first in)
            dg = dg_part[0] if len(dg_part) == 1 else dg_part.sum(0)  # over the Dk blocks, [B*H, N]
    dq, dk = grads
    drate = None
    if rate is not None:  # g_t = w_t a_h: dL/dw_t += dL/dg_t a_h, dL/da_h = sum_t dL/dg_t w_t
        per_program = 1024  # elements a program of the elementwise pass
        drate_part = empty((B * H, triton.cdiv(N, per_program)), dtype=torch.float32, device=q.device)
        _la_rate_grads[drate_part.shape](dg, w, rate, dw, drate_part, H, N, rate.shape[0], BLOCK=per_program)
        dg, drate = None, drate_part.view(-1, rate.numel(), drate_part.shape[1]).sum((0, 2)).view(rate.shape)
    dg = dg.view(B, H, N) if dg is not None else None
    dw = dw.view(B, H, N) if has_w else None
    return dq, dk, dv, dg, ds0, dw, drate
