"""The forward: each program keeps SUB query rows of a block on chip and streams the key blocks its
row of the mask lists, folding them in with the online softmax (``_bs_fwd``), and its launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._backend import dot_options
from .._common import LOG2E, head_dim_pad, natural_lse, online_softmax_step
from ..masks import BlockMask
from .loads import load_cols, load_rows, tma_rows
from .plan import batch_slices_of, even_tiles, launch_config, launch_fitted, streamed_sources


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
            kt = tl.trans(tma_rows(k_src, b, hk, start, STREAM, d_ok.shape[0]))  # read STREAM*D
            v = tma_rows(v_src, b, hk, start, STREAM, d_ok.shape[0])  # read STREAM*D
        else:
            kt = load_cols(k_src, cols, stride_kn, stride_kd, Nk, d_ok, EVEN)  # read STREAM*D
            v = load_rows(v_src, cols, stride_vn, stride_vd, Nk, d_ok, EVEN)  # read STREAM*D
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
        # a partial block may leave a row with no visible key yet; a full one shows every row a key
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, MAY_BE_EMPTY=MASKED != 0, DOT_PREC=DOT_PREC)
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
    lse = natural_lse(m_i, l_i)
    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_on
             + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Nq + rows, lse, mask=row_ok)


def launch_forward(q, k, v, bm: BlockMask, scale: float, cfg: dict | None = None):
    # cfg: an override of launch_config("fwd", ...), for tuning
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    o = empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:  # no query row (B, H or Nq is 0): nothing to launch
        return o, lse
    lay = bm.kernel_layout
    pad = head_dim_pad(D)

    def launch(cfg):
        for lo, hi in batch_slices_of(B, H):
            run, (k_src, v_src) = streamed_sources(cfg, cfg["STREAM"], pad, k[lo:hi], v[lo:hi])
            _bs_fwd[(bm.n_q_blocks * (bm.block_size // run["SUB"]), (hi - lo) * H)](
                q[lo:hi], k_src, v_src, o[lo:hi], lse[lo:hi], lay["q_order"], lay["kv_indices"],
                bm.kv_counts.contiguous(), lay["kv_full"], lay["kv_band_end"], lay["tile_index"], lay["tiles"],
                lay["tile_lo"], lay["tile_hi"], *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, H // HKV, Nq,
                Nk, D, bm.kv_indices.shape[1], scale * LOG2E, EVEN=even_tiles(bm, D), BLOCK=bm.block_size,
                HEAD_DIM=pad, **{**dot_options(q.dtype), **run})

    launch_fitted(("fwd", bm.block_size, pad, q.element_size()),
            cfg or launch_config("fwd", bm.block_size, D, q.element_size()), launch)
    return o, lse
