"""The forward's output passes: every chunk at once from the stored states (``_la_out``), or one walk
with the state in registers that writes the outputs as it goes (``_la_fused``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._common import launch_fitting, sm_count
from .common import block, chunk_cumsum, decay_mask, per_step_args, tile_opts
from .plan import FWD_TILES, fused_fits, fused_max_dk, fused_segments
from .states import chunk_states, segment_starts


@triton.jit
def _la_out(Q, K, V, G, W, HS, O,
            stride_qb, stride_qh, stride_qn, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd,
            stride_gb, stride_gh, stride_gn,
            stride_wb, stride_wh, stride_wn,
            stride_ob, stride_oh, stride_on, stride_od,
            H, N, DK, DV, NT,
            HAS_DECAY: tl.constexpr, HAS_W: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            DOT_PREC: tl.constexpr):
    # Every chunk at once, given the state it starts from: O_c = (Q K^T * M) V + exp(b) Q S_c
    # (with HAS_W, V's rows weighted by w: folded into the columns of Q K^T * M).
    ic, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b_idx, h = bh // H, bh % H
    offs_c = tl.arange(0, C)
    offs_v = iv * BV + tl.arange(0, BV)
    v_ok = offs_v < DV
    rows = (ic * C + offs_c).to(tl.int64)
    row_ok = rows < N
    q_base = Q + b_idx.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b_idx.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b_idx.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    hs_base = HS + (bh.to(tl.int64) * NT + ic) * DK * DV
    b, b_last = chunk_cumsum(G, b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh, stride_gn,
                              rows, row_ok, C, HAS_DECAY)
    a = tl.zeros([C, C], tl.float32)
    o = tl.zeros([C, BV], tl.float32)
    for k0 in range(0, DK, BK):  # products over Dk, a block at a time
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < DK
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_k[None, :] * stride_qd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read C*BK
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_k[None, :] * stride_kd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read C*BK
        s = tl.load(hs_base + offs_k[:, None] * DV + offs_v[None, :],
                    mask=k_ok[:, None] & v_ok[None, :], other=0.0)  # read BK*BV of the chunk's state
        a += tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        o += tl.dot(q, s, input_precision=DOT_PREC)
    v = tl.load(v_base + rows[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                mask=row_ok[:, None] & v_ok[None, :], other=0.0)  # read C*BV
    a = a * decay_mask(b, C, False)
    if HAS_W:
        a = a * tl.load(W + b_idx.to(tl.int64) * stride_wb + h.to(tl.int64) * stride_wh + rows * stride_wn,
                        mask=row_ok, other=0.0)[None, :]  # read C
    o = o * tl.exp(b)[:, None] + tl.dot(a.to(v.dtype), v, input_precision=DOT_PREC)
    o_base = O + b_idx.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + rows[:, None] * stride_on + offs_v[None, :] * stride_od, o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & v_ok[None, :])  # write C*BV


@triton.jit
def _la_fused(Q, K, V, G, W, S_IN, O, S_OUT, HS,
              stride_qb, stride_qh, stride_qn, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_gb, stride_gh, stride_gn,
              stride_wb, stride_wh, stride_wn,
              stride_ob, stride_oh, stride_on, stride_od,
              H, N, DK, DV, NT, SEG_CHUNKS,
              HAS_DECAY: tl.constexpr, HAS_W: tl.constexpr, HAS_S_IN: tl.constexpr, STORE_FINAL: tl.constexpr,
              STORE_STATES: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              DOT_PREC: tl.constexpr):
    # The forward in one walk (the weighted forward, mk.ssd's): one program per [Dk, BV] block of
    # one (batch, head)'s state walks its segment's chunks in order from S_IN (the state the
    # segment starts from, or zeros), keeps the state in registers and writes each chunk's outputs
    # as it goes:  O_c = exp(b) Q S + (Q K^T * M * w) V,  then  S = exp(b_C) S + (K * exp(b_C - b) w)^T V.
    # Nothing of size [chunks, Dk, Dv] goes through memory, unless a backward will need the states
    # (STORE_STATES: the 16-bit copy each chunk's product uses goes to HS, as _la_states writes it,
    # so that the backward need not walk the sequence again); the whole of Dk is one tile (BK >= DK).
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
    v_base = V + b_idx.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    o_base = O + b_idx.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    g_base = b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    w_base = W + b_idx.to(tl.int64) * stride_wb + h.to(tl.int64) * stride_wh
    tile = offs_k[:, None] * DV + offs_v[None, :]  # states are [.., DK, DV], contiguous
    if HAS_S_IN:  # S_IN: [B*H, n_seg, DK, DV]
        S = tl.load(S_IN + (bh.to(tl.int64) * n_seg + seg) * DK * DV + tile, mask=tile_ok, other=0.0)
    else:
        S = tl.zeros([BK, BV], tl.float32)
    for c in range(seg * SEG_CHUNKS, tl.minimum(seg * SEG_CHUNKS + SEG_CHUNKS, NT)):
        rows = (c * C + offs_c).to(tl.int64)  # 64-bit: rows * stride can pass 2^31 for long sequences
        row_ok = rows < N
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_k[None, :] * stride_qd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read C*DK
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_k[None, :] * stride_kd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read C*DK
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                    mask=row_ok[:, None] & v_ok[None, :], other=0.0)  # read C*BV
        b, b_last = chunk_cumsum(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
        a = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * decay_mask(b, C, False)
        weight = tl.exp(b_last - b)  # how much of step s reaches the chunk's end
        if HAS_W:
            w = tl.load(w_base + rows * stride_wn, mask=row_ok, other=0.0)  # read C
            a = a * w[None, :]
            weight *= w
        # the state entering the chunk, before this chunk's update (a 16-bit copy for the product,
        # as the two-pass forward stores it)
        s_in = S.to(q.dtype)
        if STORE_STATES:
            tl.store(HS + (bh.to(tl.int64) * NT + c) * DK * DV + tile, s_in, mask=tile_ok)  # write DK*BV
        o = tl.dot(q, s_in, input_precision=DOT_PREC) * tl.exp(b)[:, None]
        o += tl.dot(a.to(v.dtype), v, input_precision=DOT_PREC)
        tl.store(o_base + rows[:, None] * stride_on + offs_v[None, :] * stride_od, o.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])  # write C*BV
        kt = (tl.trans(k) * weight[None, :]).to(k.dtype)
        S = S * tl.exp(b_last) + tl.dot(kt, v, input_precision=DOT_PREC)
    if STORE_FINAL and seg == n_seg - 1:  # the last segment ends where the sequence does
        tl.store(S_OUT + bh.to(tl.int64) * DK * DV + tile, S, mask=tile_ok)


def _fused_forward(q, k, v, g, s0, chunk: int, out_dtype: torch.dtype, w=None, keep_states: bool = False):
    """The forward without the chunks' states in memory (_la_fused), for Dk <= fused_max_dk(): the
    sequence is cut into segments (fused_segments); the state each starts from comes from
    segment_starts, and each is then walked once, outputs written on the way. With keep_states,
    the walk also writes the state each chunk starts from, for the backward (else None)."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    nt = triton.cdiv(N, chunk)
    cfg = FWD_TILES["fused"]
    bv = block(DV, cfg["BV"])
    n_seg = fused_segments(triton.cdiv(DV, bv) * B * H, nt, sm_count(q.device))
    seg_chunks = triton.cdiv(nt, n_seg)
    n_seg = triton.cdiv(nt, seg_chunks)  # as the kernel counts them
    o = empty((B, H, N, DV), dtype=out_dtype, device=q.device)
    s_in = s0
    if n_seg > 1:  # (the last segment's walk writes the final state)
        s_in, _ = segment_starts(k, v, g, s0, w, chunk, seg_chunks, n_seg, block(DK, FWD_TILES["states"]["BK"]),
                                  block(DV, FWD_TILES["states"]["BV"]), want_final=False)
    s_end = empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    hs = empty((B * H, nt, DK, DV), dtype=q.dtype, device=q.device) if keep_states else None
    gt, gs, has_decay = per_step_args(g, q)
    wt, ws, has_w = per_step_args(w, q)
    _la_fused[(triton.cdiv(DV, bv), B * H * n_seg)](
        q, k, v, gt, wt, s_in if s_in is not None else o, o, s_end, hs if keep_states else o,
        *q.stride(), *k.stride(), *v.stride(), *gs, *ws, *o.stride(), H, N, DK, DV, nt, seg_chunks,
        HAS_DECAY=has_decay, HAS_W=has_w, HAS_S_IN=s_in is not None, STORE_FINAL=True, STORE_STATES=keep_states,
        C=chunk, BK=block(DK, fused_max_dk()), BV=bv, **tile_opts(q.dtype, cfg))
    return o, s_end, hs


def forward(q, k, v, g, s0, chunk: int, out_dtype: torch.dtype, w=None, keep_states: bool = False):
    """(outputs, final state, the state each chunk starts from if keep_states else None)."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    if w is not None and DK <= fused_max_dk() and fused_fits(q, v, chunk, FWD_TILES["fused"]):
        return _fused_forward(q, k, v, g, s0, chunk, out_dtype, w=w, keep_states=keep_states)
    hs, s_end = chunk_states(k, v, g, s0, chunk, want_final=True, w=w)
    o = empty((B, H, N, DV), dtype=out_dtype, device=q.device)
    cfg = FWD_TILES["out_weighted" if w is not None else "out_decay" if g is not None else "out"]
    gt, gs, has_decay = per_step_args(g, q)
    wt, ws, has_w = per_step_args(w, q)

    def launch(tiles):
        bv = tiles["BV"]
        warps = cfg["num_warps"] if bv * chunk >= 8192 else 4  # 4 warps are enough for small tiles
        _la_out[(triton.cdiv(N, chunk), triton.cdiv(DV, bv), B * H)](
            q, k, v, gt, wt, hs, o, *q.stride(), *k.stride(), *v.stride(), *gs, *ws, *o.stride(), H, N, DK, DV,
            hs.shape[1], HAS_DECAY=has_decay, HAS_W=has_w, C=chunk, BK=tiles["BK"], BV=bv,
            **tile_opts(q.dtype, {**cfg, **tiles}, num_warps=warps))

    # where the compiled kernel needs more shared memory than a program may have (wide float32
    # tiles), fewer stages, then narrower blocks (not below 16)
    tiles = {"BK": block(DK, cfg["BK"]), "BV": block(DV, cfg["BV"]), "num_stages": cfg["num_stages"]}
    launch_fitting(("out", q.dtype, chunk, has_decay, has_w) + tuple(tiles.values()), tiles, launch, ("BV", "BK"))
    return o, s_end, (hs if keep_states else None)
