"""Chapter 2: block-sparse FlashAttention.

The FlashAttention loop of chapter 1 visits every key block (or every block left of the causal
diagonal). Here each query block visits only the key blocks its ``BlockMask`` lists, so the work
and the bytes scale with the mask's density instead of with N^2:

    forward and dQ:  for each query block i, for t < kv_counts[i]: key block kv_indices[i, t]
    dK, dV:          for each key block j,   for t < q_counts[j]:   query block q_indices[j, t]

Blocks marked *full* need no element mask; *partial* blocks load their ``block_size^2`` tile of
the element mask and apply it. The kernels' tile is the mask's block size (16 to 128), so a mask
and the kernel can never disagree about where blocks start. A query that sees no key gets zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._alloc import empty
from ._backend import is_interpreter, on_device_of
from ._validate import int32_addressable
from .flash import LOG2E, _check_scale, _compute_dtype, _head_dim_pad, check_attention_inputs, row_delta
from .masks import BlockMask

MAX_BLOCK_SIZE = 128


@triton.jit
def _bs_fwd(Q, K, V, O, LSE, KV_IDX, KV_CNT, PARTIAL, TILE_IDX, TILES,
            stride_qb, stride_qh, stride_qn, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd,
            stride_ob, stride_oh, stride_on, stride_od,
            H, GROUP, Nq, Nk, D, max_visits, qk_scale,
            BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq
    d_ok = offs_d < D
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    n_visits = tl.load(KV_CNT + qb)
    for t in range(0, n_visits):
        visit = qb * max_visits + t
        kb = tl.load(KV_IDX + visit)  # which key block (the only indirection block sparsity adds)
        cols = kb * BLOCK + offs_n
        col_ok = cols < Nk
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # read BLOCK*D
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # read BLOCK*D
        s = tl.dot(q, kt) * qk_scale
        if tl.load(PARTIAL + visit) != 0:  # partial block: apply its element mask (read BLOCK^2 bytes)
            tile = tl.load(TILES + tl.load(TILE_IDX + visit).to(tl.int64) * BLOCK * BLOCK
                           + offs_n[:, None] * BLOCK + offs_n[None, :])
            s = tl.where(tile != 0, s, float("-inf"))
        s = tl.where(col_ok[None, :], s, float("-inf"))  # the ragged end of the keys
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.log2(tl.where(empty_row, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_on
             + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * Nq + rows, lse, mask=row_ok)


@triton.jit
def _bs_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, KV_IDX, KV_CNT, PARTIAL, TILE_IDX, TILES,
               stride_qb, stride_qh, stride_qn, stride_qd,
               stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd,
               stride_dob, stride_doh, stride_don, stride_dod,
               stride_dqb, stride_dqh, stride_dqn, stride_dqd,
               H, GROUP, Nq, Nk, D, max_visits, scale, qk_scale,
               BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = qb * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK)
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
    delta = tl.load(DELTA + bh.to(tl.int64) * Nq + rows, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    n_visits = tl.load(KV_CNT + qb)
    for t in range(0, n_visits):
        visit = qb * max_visits + t
        kb = tl.load(KV_IDX + visit)
        cols = kb * BLOCK + offs_n
        col_ok = cols < Nk
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        p = tl.exp2(tl.dot(q, kt) * qk_scale - lse[:, None])
        if tl.load(PARTIAL + visit) != 0:
            tile = tl.load(TILES + tl.load(TILE_IDX + visit).to(tl.int64) * BLOCK * BLOCK
                           + offs_n[:, None] * BLOCK + offs_n[None, :])
            p = tl.where(tile != 0, p, 0.0)
        p = tl.where(col_ok[None, :], p, 0.0)
        ds = p * (tl.dot(do, vt) - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + rows[:, None] * stride_dqn
             + offs_d[None, :] * stride_dqd, (dq * scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _bs_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, Q_IDX, Q_CNT, Q_PARTIAL, Q_TILE_IDX, TILES,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                 stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                 H, HKV, GROUP, Nq, Nk, D, max_visits, scale, qk_scale,
                 BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    offs_m = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    kv_mask = (cols[:, None] < Nk) & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + cols[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + cols[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    n_visits = tl.load(Q_CNT + kb)
    for g in range(0, GROUP):  # every query head that reads this k/v head
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + (b * H + h).to(tl.int64) * Nq
        delta_base = DELTA + (b * H + h).to(tl.int64) * Nq
        for t in range(0, n_visits):
            visit = kb * max_visits + t
            qb = tl.load(Q_IDX + visit)
            rows = qb * BLOCK + offs_m
            row_ok = rows < Nq
            qt = tl.load(q_base + rows[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                         mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # Q^T [D, BLOCK]
            do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :] * stride_dod,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            pt = tl.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])  # P^T [BLOCK keys, BLOCK queries]
            if tl.load(Q_PARTIAL + visit) != 0:
                tile = tl.load(TILES + tl.load(Q_TILE_IDX + visit).to(tl.int64) * BLOCK * BLOCK
                               + offs_m[None, :] * BLOCK + offs_m[:, None])  # the tile, transposed
                pt = tl.where(tile != 0, pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do)
            dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + cols[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + cols[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


def _launch_options(block: int, head_dim: int) -> dict:
    if is_interpreter():
        return {"num_warps": 4, "num_stages": 1}
    return {"num_warps": 8 if block * head_dim >= 128 * 128 else 4, "num_stages": 2}


def _forward(q, k, v, bm: BlockMask, scale: float):
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    o = empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = empty((B, H, Nq), dtype=torch.float32, device=q.device)
    tiles = bm.tiles.to(torch.uint8)
    _bs_fwd[(bm.n_q_blocks, B * H)](
        q, k, v, o, lse, bm.kv_indices, bm.kv_counts, bm.partial.to(torch.uint8), bm.tile_index, tiles,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, H // HKV, Nq, Nk, D, bm.kv_indices.shape[1],
        scale * LOG2E, BLOCK=bm.block_size, HEAD_DIM=_head_dim_pad(D), **_launch_options(bm.block_size, D))
    return o, lse


def _backward(q, k, v, o, lse, do, bm: BlockMask, scale: float):
    B, H, Nq, D = q.shape
    HKV, Nk = k.shape[1], k.shape[2]
    pad = _head_dim_pad(D)
    delta = row_delta(o, do)
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    tiles = bm.tiles.to(torch.uint8)
    opts = _launch_options(bm.block_size, D)
    _bs_bwd_dq[(bm.n_q_blocks, B * H)](
        q, k, v, do, dq, lse, delta, bm.kv_indices, bm.kv_counts, bm.partial.to(torch.uint8), bm.tile_index,
        tiles, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        H, H // HKV, Nq, Nk, D, bm.kv_indices.shape[1], scale, scale * LOG2E,
        BLOCK=bm.block_size, HEAD_DIM=pad, **opts)
    if bm.n_kv_blocks == 0:  # no keys: dK and dV are empty
        return dq, dk, dv
    _bs_bwd_dkdv[(bm.n_kv_blocks, B * HKV)](
        q, k, v, do, dk, dv, lse, delta, bm.q_indices, bm.q_counts, bm.q_partial.to(torch.uint8),
        bm.q_tile_index, tiles, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        H, HKV, H // HKV, Nq, Nk, D, bm.q_indices.shape[1], scale, scale * LOG2E,
        BLOCK=bm.block_size, HEAD_DIM=pad, **opts)
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
        ctx.bm, ctx.scale, ctx.dtype = bm, scale, dtype
        return o.to(dtype)

    @staticmethod
    def backward(ctx, do):
        qw, kw, vw, o, lse = ctx.saved_tensors
        with on_device_of(qw):
            dq, dk, dv = _backward(qw, kw, vw, o, lse, int32_addressable("grad of out", do.to(qw.dtype)), ctx.bm,
                                   ctx.scale)
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None, None


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                           scale: float | None = None) -> torch.Tensor:
    """Attention that visits only the tiles ``block_mask`` lists (forward and backward in Triton).

    q ``[B, H, Nq, D]``; k, v ``[B, Hkv, Nk, D]`` (grouped-query heads allowed), any strides;
    ``block_mask`` built for ``q_len = Nq``, ``kv_len = Nk`` with a block size of 16 to 128 (the
    kernels' tile), on the same device. One mask serves every batch and head. Element masks apply
    only on the partial blocks; a query that sees no key gets zeros. ``scale`` defaults to 1/sqrt(D).
    """
    check_attention_inputs(q, k, v)
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a minikernels.masks.BlockMask, got {type(block_mask).__name__}")
    nq, nk = q.shape[2], k.shape[2]
    if (block_mask.q_len, block_mask.kv_len) != (nq, nk):
        raise ValueError(f"block_mask was built for q_len={block_mask.q_len}, kv_len={block_mask.kv_len}, "
                         f"but q has Nq={nq} and k has Nk={nk}")
    if block_mask.block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_mask.block_size={block_mask.block_size} is larger than the kernel's largest "
                         f"tile ({MAX_BLOCK_SIZE}); rebuild the mask with block_size 16, 32, 64 or 128")
    if block_mask.kv_indices.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.kv_indices.device}, q on {q.device}: build the mask with "
                         f"device={q.device.type!r}")
    scale = _check_scale(scale, q.shape[-1])
    if q.numel() == 0:
        return q.new_zeros(q.shape)
    return _BlockSparseAttention.apply(q, k, v, block_mask, scale)
