"""The sequential passes of chunked linear attention: the state each chunk starts from (forward,
``_la_states``) and the gradient of the state each chunk leaves (backward, ``_la_dstates``), each
cut into segments chained by ``_la_carry`` when there are few programs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._common import sm_count
from .common import block, chunk_cumsum, per_step_args, tile_opts
from .plan import BWD_TILES, FWD_TILES, segments, state_grad_segments


@triton.jit
def _la_states(K, V, G, W, S_IN, HS, S_OUT, LOG_DECAY,
               stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd,
               stride_gb, stride_gh, stride_gn,
               stride_wb, stride_wh, stride_wn,
               H, N, DK, DV, NT, SEG_CHUNKS,
               HAS_DECAY: tl.constexpr, HAS_W: tl.constexpr, HAS_S_IN: tl.constexpr, STORE_STATES: tl.constexpr,
               STORE_FINAL: tl.constexpr, STORE_DECAY: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, DOT_PREC: tl.constexpr):
    # The forward's sequential pass: one program per [BK, BV] block of one (batch, head)'s state
    # walks its segment's chunks in order (SEG_CHUNKS of them; the whole sequence when there is one
    # segment), starting from S_IN (or zeros), and writes the state each chunk starts from
    # (HS[bh, c], if STORE_STATES), the state it ends with (S_OUT[bh, segment], if STORE_FINAL) and
    # the segment's summed log-decay (LOG_DECAY[bh, segment], if STORE_DECAY). With HAS_W, step s's
    # value is w_s v_s: the weight joins the per-step factor of K's columns, at no extra product.
    ik, iv = tl.program_id(0), tl.program_id(1)
    n_seg = tl.cdiv(NT, SEG_CHUNKS)
    bh, seg = tl.program_id(2) // n_seg, tl.program_id(2) % n_seg
    b_idx, h = bh // H, bh % H
    offs_c = tl.arange(0, C)
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    tile_ok = (offs_k < DK)[:, None] & (offs_v < DV)[None, :]
    k_base = K + b_idx.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b_idx.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    g_base = b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    w_base = W + b_idx.to(tl.int64) * stride_wb + h.to(tl.int64) * stride_wh
    tile = offs_k[:, None] * DV + offs_v[None, :]  # states are [.., DK, DV], contiguous
    hs_base = HS + bh.to(tl.int64) * NT * DK * DV
    seg_state = (bh.to(tl.int64) * n_seg + seg) * DK * DV  # S_IN and S_OUT: [B*H, n_seg, DK, DV]
    if HAS_S_IN:
        S = tl.load(S_IN + seg_state + tile, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], tl.float32)
    log_decay = 0.0
    for c in range(seg * SEG_CHUNKS, tl.minimum(seg * SEG_CHUNKS + SEG_CHUNKS, NT)):
        if STORE_STATES:
            state_at = tl.cast(c, tl.int64) * DK * DV  # 64-bit: NT * Dk * Dv can pass 2^31
            tl.store(hs_base + state_at + tile, S.to(HS.dtype.element_ty), mask=tile_ok)  # write BK*BV
        rows = (c * C + offs_c).to(tl.int64)  # 64-bit: rows * stride can pass 2^31 for long sequences
        row_ok = rows < N
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                    mask=row_ok[:, None] & (offs_v < DV)[None, :], other=0.0)  # read C*BV
        b, b_last = chunk_cumsum(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
        if HAS_DECAY or HAS_W:
            # K^T straight from memory, [BK, C]: the per-step weights then scale its columns in the
            # layout the matmul reads, with no transpose in registers (which costs time on Hopper;
            # see book/notes/linear_attention.md)
            kt = tl.load(k_base + rows[None, :] * stride_kn + offs_k[:, None] * stride_kd,
                         mask=row_ok[None, :] & (offs_k < DK)[:, None], other=0.0)  # read C*BK
            weight = tl.exp(b_last - b)  # how much of step s reaches the chunk's end
            if HAS_W:
                weight *= tl.load(w_base + rows * stride_wn, mask=row_ok, other=0.0)  # read C
            kt = (kt * weight[None, :]).to(kt.dtype)
            S = S * tl.exp(b_last) + tl.dot(kt, v, input_precision=DOT_PREC)
            log_decay += b_last
        else:
            k = tl.load(k_base + rows[:, None] * stride_kn + offs_k[None, :] * stride_kd,
                        mask=row_ok[:, None] & (offs_k < DK)[None, :], other=0.0)  # read C*BK
            S = S + tl.dot(tl.trans(k), v, input_precision=DOT_PREC)
    if STORE_FINAL:
        tl.store(S_OUT + seg_state + tile, S, mask=tile_ok)
    if STORE_DECAY:
        if (ik == 0) & (iv == 0):  # one program per segment writes its decay
            tl.store(LOG_DECAY + bh * n_seg + seg, log_decay)


@triton.jit
def _la_carry(SEG_END, LOG_DECAY, S0, CARRY, S_OUT, DKDV, N_SEG, N_CARRY,
              HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, BLOCK: tl.constexpr):
    # Between the segmented passes: the state each segment starts from, from the state each of the
    # first N_SEG segments reaches on its own from zeros (SEG_END) and its summed log-decay:
    #     carry_0 = S0,  carry_{g+1} = exp(log_decay_g) carry_g + seg_end_g
    # for N_CARRY segments (N_SEG, or N_SEG + 1 when the last segment's own end was not computed);
    # sequential over the few segments, elementwise over the state
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bh = tl.program_id(1)
    ok = offs < DKDV
    if HAS_S0:
        carry = tl.load(S0 + bh.to(tl.int64) * DKDV + offs, mask=ok, other=0.0)
    else:
        carry = tl.zeros([BLOCK], tl.float32)
    for seg in range(0, N_SEG):
        tl.store(CARRY + (bh.to(tl.int64) * N_CARRY + seg) * DKDV + offs, carry, mask=ok)
        if HAS_DECAY:
            carry = carry * tl.exp(tl.load(LOG_DECAY + bh * N_SEG + seg))
        carry += tl.load(SEG_END + (bh.to(tl.int64) * N_SEG + seg) * DKDV + offs, mask=ok, other=0.0)
    if N_CARRY > N_SEG:
        tl.store(CARRY + (bh.to(tl.int64) * N_CARRY + N_SEG) * DKDV + offs, carry, mask=ok)
    if STORE_FINAL:
        tl.store(S_OUT + bh.to(tl.int64) * DKDV + offs, carry, mask=ok)


@triton.jit
def _la_dstates(Q, DO, G, S_IN, DHS, S_OUT, LOG_DECAY,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_dob, stride_doh, stride_don, stride_dod,
                stride_gb, stride_gh, stride_gn,
                H, N, DK, DV, NT, SEG_CHUNKS,
                HAS_DECAY: tl.constexpr, HAS_S_IN: tl.constexpr, STORE_STATES: tl.constexpr,
                STORE_FINAL: tl.constexpr, STORE_DECAY: tl.constexpr,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    # The backward's sequential pass, chunks in reverse: dS, the gradient of the state at the end of
    # chunk c, goes to DHS[bh, c] (if STORE_STATES); dS <- exp(b_C) dS + (Q * exp(b))^T dO. What is
    # left at the segment's first chunk goes to S_OUT (if STORE_FINAL), its summed log-decay to
    # LOG_DECAY (if STORE_DECAY). As in _la_states, the sequence may be cut into segments of
    # SEG_CHUNKS chunks, one program each; they are numbered from the sequence's end (index
    # n_seg - 1 - seg into S_IN, S_OUT and LOG_DECAY), so that _la_carry chains them in reverse.
    ik, iv = tl.program_id(0), tl.program_id(1)
    n_seg = tl.cdiv(NT, SEG_CHUNKS)
    bh, seg = tl.program_id(2) // n_seg, tl.program_id(2) % n_seg
    b_idx, h = bh // H, bh % H
    offs_c = tl.arange(0, C)
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    tile_ok = (offs_k < DK)[:, None] & (offs_v < DV)[None, :]
    q_base = Q + b_idx.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b_idx.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    g_base = b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    tile = offs_k[:, None] * DV + offs_v[None, :]
    dhs_base = DHS + bh.to(tl.int64) * NT * DK * DV
    seg_state = (bh.to(tl.int64) * n_seg + n_seg - 1 - seg) * DK * DV  # S_IN, S_OUT: [B*H, n_seg, DK, DV]
    if HAS_S_IN:  # the gradient of the state at the segment's end
        dS = tl.load(S_IN + seg_state + tile, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], tl.float32)
    first = seg * SEG_CHUNKS
    last = tl.minimum(first + SEG_CHUNKS, NT)
    log_decay = 0.0
    for i in range(0, last - first):
        c = last - 1 - i
        if STORE_STATES:
            state_at = tl.cast(c, tl.int64) * DK * DV  # 64-bit: NT * Dk * Dv can pass 2^31
            tl.store(dhs_base + state_at + tile, dS.to(DHS.dtype.element_ty), mask=tile_ok)  # write BK*BV
        rows = (c * C + offs_c).to(tl.int64)
        row_ok = rows < N
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_k[None, :] * stride_qd,
                    mask=row_ok[:, None] & (offs_k < DK)[None, :], other=0.0)  # read C*BK
        do = tl.load(do_base + rows[:, None] * stride_don + offs_v[None, :] * stride_dod,
                     mask=row_ok[:, None] & (offs_v < DV)[None, :], other=0.0)  # read C*BV
        b, b_last = chunk_cumsum(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
        q_in = (q * tl.exp(b)[:, None]).to(q.dtype)  # q decayed back to the chunk's start
        dS = dS * tl.exp(b_last) + tl.dot(tl.trans(q_in), do, input_precision=DOT_PREC)
        log_decay += b_last
    if STORE_FINAL:
        tl.store(S_OUT + seg_state + tile, dS, mask=tile_ok)
    if STORE_DECAY:
        if (ik == 0) & (iv == 0):  # one program per segment writes its decay
            tl.store(LOG_DECAY + bh * n_seg + n_seg - 1 - seg, log_decay)


def chunk_states(k, v, g, s0, chunk: int, want_final: bool, w=None):
    """The state each chunk starts from, [B*H, NT, Dk, Dv] in the inputs' dtype, and the final state
    (float32); with value weights w [B, H, N], of the values w_t v_t. The sequential pass splits the
    state into blocks of FWD_TILES["states"], one program each; when those are fewer than the SMs (as
    in SSD at batch 1), it also splits the sequence into segments (segments)."""
    B, H, N, DK = k.shape
    DV = v.shape[-1]
    nt = triton.cdiv(N, chunk)
    bk, bv = block(DK, FWD_TILES["states"]["BK"]), block(DV, FWD_TILES["states"]["BV"])
    sms = sm_count(k.device)
    n_seg = segments(triton.cdiv(DK, bk) * triton.cdiv(DV, bv) * B * H, nt, sms)
    # Too short to cut into segments, and still too few programs: split the state finer
    while n_seg == 1 and triton.cdiv(DK, bk) * triton.cdiv(DV, bv) * B * H < sms and max(bk, bv) > 32:
        bk, bv = (bk // 2, bv) if bk >= bv else (bk, bv // 2)
    seg_chunks = triton.cdiv(nt, n_seg)  # nt >= 1: linear_attention returns before any kernel when N == 0
    n_seg = triton.cdiv(nt, seg_chunks)  # as the kernel counts them
    hs = empty((B * H, nt, DK, DV), dtype=k.dtype, device=k.device)
    gt, gs, has_decay = per_step_args(g, k)
    wt, ws, has_w = per_step_args(w, k)
    grid = (triton.cdiv(DK, bk), triton.cdiv(DV, bv), B * H * n_seg)
    args = (*k.stride(), *v.stride(), *gs, *ws, H, N, DK, DV, nt, seg_chunks)
    opts = states_opts(k, has_decay, has_w, chunk, bk, bv)
    if n_seg == 1:
        s_end = empty((B, H, DK, DV), dtype=torch.float32, device=k.device) if want_final else hs
        _la_states[grid](k, v, gt, wt, s0 if s0 is not None else hs, hs, s_end, hs, *args, HAS_S_IN=s0 is not None,
                         STORE_STATES=True, STORE_FINAL=want_final, STORE_DECAY=False, **opts)
        return hs, (s_end if want_final else None)
    # 1.-2. the state each segment starts from; 3. each segment again from it, writing HS
    carry, s_end = segment_starts(k, v, g, s0, w, chunk, seg_chunks, n_seg, bk, bv, want_final)
    _la_states[grid](k, v, gt, wt, carry, hs, hs, hs, *args, HAS_S_IN=True, STORE_STATES=True, STORE_FINAL=False,
                     STORE_DECAY=False, **opts)
    return hs, s_end


def states_opts(k, has_decay: bool, has_w: bool, chunk: int, bk: int, bv: int) -> dict:
    cfg = FWD_TILES["states"]
    return dict(HAS_DECAY=has_decay, HAS_W=has_w, C=chunk, BK=bk, BV=bv, **tile_opts(k.dtype, cfg))


def segment_starts(k, v, g, s0, w, chunk: int, seg_chunks: int, n_seg: int, bk: int, bv: int, want_final: bool):
    """The state each of n_seg segments of seg_chunks chunks starts from, [B*H, n_seg, Dk, Dv] float32,
    and, with want_final, the final state (else None): 1. each segment's own end state, from zeros, in
    parallel (_la_states, storing no chunk states; without want_final, the last segment's is not
    needed); 2. a sequential pass over the segments:
    carry_{g+1} = exp(log-decay of segment g) carry_g + end_g, from carry_0 = s0 (_la_carry)."""
    B, H, N, DK = k.shape
    DV = v.shape[-1]
    gt, gs, has_decay = per_step_args(g, k)
    wt, ws, has_w = per_step_args(w, k)
    n_ends = n_seg if want_final else n_seg - 1
    seg_end = empty((B * H, n_ends, DK, DV), dtype=torch.float32, device=k.device)
    carry = empty((B * H, n_seg, DK, DV), dtype=torch.float32, device=k.device)
    s_end = empty((B, H, DK, DV), dtype=torch.float32, device=k.device) if want_final else carry
    log_decay = empty((B * H, n_ends), dtype=torch.float32, device=k.device)
    # the kernel walks n_ends * seg_chunks chunks: the segments before the last, or all of them
    _la_states[(triton.cdiv(DK, bk), triton.cdiv(DV, bv), B * H * n_ends)](
        k, v, gt, wt, seg_end, seg_end, seg_end, log_decay, *k.stride(), *v.stride(), *gs, *ws,
        H, N, DK, DV, min(triton.cdiv(N, chunk), n_ends * seg_chunks), seg_chunks, HAS_S_IN=False,
        STORE_STATES=False, STORE_FINAL=True, STORE_DECAY=has_decay, **states_opts(k, has_decay, has_w, chunk, bk, bv))
    per_program = 1024  # elements a program of the elementwise pass
    _la_carry[(triton.cdiv(DK * DV, per_program), B * H)](
        seg_end, log_decay, s0 if s0 is not None else seg_end, carry, s_end, DK * DV, n_ends, n_seg,
        HAS_DECAY=has_decay, HAS_S0=s0 is not None, STORE_FINAL=want_final, BLOCK=per_program)
    return carry, (s_end if want_final else None)


def reverse_segment_starts(q, do, g, ds_end, chunk: int, seg_chunks: int, n_seg: int):
    """For the reverse walk in n_seg segments: the gradient of the state at each segment's end,
    [B*H, n_seg, Dk, Dv] float32 (numbered from the sequence's end), and of the initial state: each
    segment's own part from zeros, in parallel (_la_dstates), then chained in reverse from ds_end
    (_la_carry), as segment_starts does forwards."""
    B, H, N, DK = q.shape
    DV = do.shape[-1]
    cfg = BWD_TILES["dsegments"]
    bk, bv = block(DK, cfg["BK"]), block(DV, cfg["BV"])
    gt, gs, has_decay = per_step_args(g, q)
    seg_part = empty((B * H, n_seg, DK, DV), dtype=torch.float32, device=q.device)
    log_decay = empty((B * H, n_seg), dtype=torch.float32, device=q.device)
    _la_dstates[(triton.cdiv(DK, bk), triton.cdiv(DV, bv), B * H * n_seg)](
        q, do, gt, seg_part, seg_part, seg_part, log_decay, *q.stride(), *do.stride(), *gs, H, N, DK, DV,
        triton.cdiv(N, chunk), seg_chunks, HAS_DECAY=has_decay, HAS_S_IN=False, STORE_STATES=False, STORE_FINAL=True,
        STORE_DECAY=has_decay, C=chunk, BK=bk, BV=bv, **tile_opts(q.dtype, cfg))
    s_in = empty((B * H, n_seg, DK, DV), dtype=torch.float32, device=q.device)
    ds0 = empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    per_program = 1024  # elements a program of the elementwise pass
    _la_carry[(triton.cdiv(DK * DV, per_program), B * H)](
        seg_part, log_decay, ds_end if ds_end is not None else seg_part, s_in, ds0, DK * DV, n_seg, n_seg,
        HAS_DECAY=has_decay, HAS_S0=ds_end is not None, STORE_FINAL=True, BLOCK=per_program)
    return s_in, ds0


def state_grads(q, do, g, ds_end, chunk: int, dtype: torch.dtype):
    """The gradient of the state leaving each chunk, [B*H, NT, Dk, Dv] in dtype, and of the initial
    state (float32): the reverse walk of _la_dstates, in segments when its programs are fewer than
    the SMs (as chunk_states does: each segment's own part from zeros, chained in reverse by
    _la_carry from ds_end, then each segment walked again from its carry)."""
    B, H, N, DK = q.shape
    DV = do.shape[-1]
    nt = triton.cdiv(N, chunk)
    cfg = BWD_TILES["dstates"]
    bk, bv = block(DK, cfg["BK"]), block(DV, cfg["BV"])
    grid_state = (triton.cdiv(DK, bk), triton.cdiv(DV, bv))
    seg_chunks = triton.cdiv(nt, state_grad_segments(q, DV, chunk))
    n_seg = triton.cdiv(nt, seg_chunks)
    gt, gs, has_decay = per_step_args(g, q)
    dhs = empty((B * H, nt, DK, DV), dtype=dtype, device=q.device)
    s_in = ds_end
    if n_seg > 1:
        s_in, ds0 = reverse_segment_starts(q, do, g, ds_end, chunk, seg_chunks, n_seg)
    else:
        ds0 = empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    _la_dstates[(*grid_state, B * H * n_seg)](
        q, do, gt, s_in if s_in is not None else ds0, dhs, ds0, ds0, *q.stride(), *do.stride(), *gs, H, N, DK, DV,
        nt, seg_chunks, HAS_DECAY=has_decay, HAS_S_IN=s_in is not None, STORE_STATES=True, STORE_FINAL=n_seg == 1,
        STORE_DECAY=False, C=chunk, BK=bk, BV=bv, **tile_opts(q.dtype, cfg))
    return dhs, ds0
