"""The forward: one warp walks the sequence two chunks of T steps at a time, the state in registers
(``_scan_fwd``), and its launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import planning
from .._alloc import empty
from .._backend import is_interpreter
from .._common import TL_LOG2E
from .layout import chunk_major, strides3
from .plan import FWD_CONFIG, MAX_GRID_Y, fast_log, fwd_blocks, fwd_variant, save_every_rule, wide_offsets
from .steps import affine_combine, last_step, load_f32, prepare_step, unpack_bc


@triton.jit
def _fwd_chunk(h, dl, dlu, bm, cm, a2, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, PACKED: tl.constexpr):
    # T steps of BD channels and all BN states: h [BD, BN] enters; returns the state after the chunk and
    # y_t = C_t . h_t [BD, T]. dl, dlu [BD, T]; B, C [BD, BN, T] (each channel sees its group's rows).
    decay = tl.exp2(dl[:, None, :] * a2[:, :, None])  # exp(delta_t A)
    push = dlu[:, None, :] * unpack_bc(bm, BD, BN, T, PACKED)  # delta_t B_t u_t
    # fold the entering state into the first step; then h_t = decay_t h_{t-1} + push_t is a scan whose
    # steps lie in one thread: a chain of multiply-adds, nothing crosses threads
    push = tl.where(tl.arange(0, T)[None, None, :] == 0, push + decay * h[:, :, None], push)
    _, hs = tl.associative_scan((decay, push), 2, affine_combine)
    y = tl.sum(unpack_bc(cm, BD, BN, T, PACKED) * hs, axis=1)  # the only sum across threads
    return last_step(hs, BD, BN, T), y


@triton.jit
def _halves(x, BD: tl.constexpr, J: tl.constexpr):
    # [BD, J] -> its first and its last J / 2 steps
    return tl.split(tl.permute(tl.reshape(x, [BD, 2, J // 2]), (0, 2, 1)))


@triton.jit
def _fwd_pair(h, dl, dlu, skip, gate, bm_a, bm_b, cm_a, cm_b, a2, out_ptrs, mask, HAS_D: tl.constexpr,
              HAS_Z: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, MASKED: tl.constexpr,
              PACKED: tl.constexpr, PAIRED: tl.constexpr):
    # PAIRED: two chunks (J = 2T steps), so delta, u, z and y move as [BD, J] tiles, twice as many bytes
    # of each channel's row per memory request as one chunk's (the requests, not the bytes, were the
    # limit); else one chunk (J = T; B and C's _b halves unused)
    if PAIRED:
        dl_a, dl_b = _halves(dl, BD, 2 * T)
        dlu_a, dlu_b = _halves(dlu, BD, 2 * T)
        h, y_a = _fwd_chunk(h, dl_a, dlu_a, bm_a, cm_a, a2, BD, BN, T, PACKED)
        h, y_b = _fwd_chunk(h, dl_b, dlu_b, bm_b, cm_b, a2, BD, BN, T, PACKED)
        y = tl.reshape(tl.permute(tl.join(y_a, y_b), (0, 2, 1)), [BD, 2 * T])
    else:
        h, y = _fwd_chunk(h, dl, dlu, bm_a, cm_a, a2, BD, BN, T, PACKED)
    if HAS_D:
        y += skip
    if HAS_Z:  # the gate: y * silu(z)
        y = y * gate
    if MASKED:
        tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty))  # write y once
    return h


@triton.jit
def _load_pair(ptrs, step, T: tl.constexpr, BN: tl.constexpr, E: tl.constexpr, PAIRED: tl.constexpr):
    # B or C of the chunk starting at step, and of the one after it when PAIRED (else the first again)
    first = tl.load(ptrs + step * BN // E)
    if PAIRED:
        second = tl.load(ptrs + (step + T) * BN // E)
    else:
        second = first
    return first, second


@triton.jit
def _scan_fwd(U, DELTA, A, BP, CP, DSKIP, Z, BIAS, OUT, H_START, H_LAST,
              stride_ub, stride_ud, stride_ul, stride_db, stride_dd, stride_dl, stride_zb, stride_zd, stride_zl,
              Dch, N, L, L_PAD, per_group, groups,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              SAVE: tl.constexpr, SAVE_EVERY: tl.constexpr, EVEN_D: tl.constexpr, FAST_LOG: tl.constexpr,
              WIDE: tl.constexpr, PACKED: tl.constexpr, PAIRED: tl.constexpr, PREP_LATE: tl.constexpr,
              BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
    # One program: BD channels of one batch and all BN states, walking the whole sequence two chunks of
    # T steps (J = 2T; PAIRED) or one (J = T) at a time with the state in registers. A chunk is a
    # [BD, BN, T] tile whose T steps lie inside one thread (one vector load of B or C), so the scan is a
    # chain of multiply-adds in each thread and the sum over states for y is the only talk between
    # threads. B and C arrive chunk-major and padded ([batch, groups, L_PAD / T, BN, T], zeros past n
    # and N; chunk_major), as bf16 pairs in 32-bit words (PACKED) or float32: read without masks, a
    # chunk's addresses a constant apart. Consecutive programs take consecutive channel blocks of one
    # batch (the batch is the grid's second axis), so the programs on an SM read the same B and C at
    # about the same time. (Arguments keep mamba_ssm's names: N is the state size n, L the length N.)
    b = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(0)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)  # 64-bit offsets: D * N can pass 2^31
    offs_n = tl.arange(0, BN)
    J: tl.constexpr = 2 * T if PAIRED else T
    offs_j = tl.arange(0, J)
    d_ok = offs_d < Dch
    state_mask = d_ok[:, None] & (offs_n < N)[None, :]  # [BD, BN]
    group = tl.minimum(offs_d, Dch - 1) // per_group  # channel d reads group d // (D / G), always in bounds
    a2 = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=state_mask, other=0.0) * TL_LOG2E
    bias = tl.load(BIAS + offs_d, mask=d_ok, other=0.0) if HAS_BIAS else offs_d
    dskip = tl.load(DSKIP + offs_d, mask=d_ok, other=0.0) if HAS_D else offs_d
    u_ptrs = U + b * stride_ub + offs_d[:, None] * stride_ud + offs_j[None, :] * stride_ul  # [BD, J]
    dl_ptrs = DELTA + b * stride_db + offs_d[:, None] * stride_dd + offs_j[None, :] * stride_dl
    z_ptrs = Z + b * stride_zb + offs_d[:, None] * stride_zd + offs_j[None, :] * stride_zl
    out_ptrs = OUT + (b * Dch + offs_d[:, None]) * L + offs_j[None, :]
    E: tl.constexpr = 2 if PACKED else 1  # steps of B or C per loaded word
    bc_rows = (((b * groups + group[:, None, None]) * L_PAD * BN + offs_n[None, :, None] * T) // E
               + tl.arange(0, T // E)[None, None, :])
    b_ptrs, c_ptrs = BP + bc_rows, CP + bc_rows  # [BD, BN, T / E]: chunk c at + c * T * BN / E
    n_saved = tl.cdiv(L, SAVE_EVERY)
    d_mask = tl.broadcast_to(d_ok[:, None], [BD, J])  # constant along J: the loads stay vectors
    h = tl.zeros([BD, BN], tl.float32)
    n_full = L // J
    # ("Pair" below: the J steps of an iteration.) delta, u, z are loaded ahead, so that their trips to
    # memory overlap the scan: one pair ahead, and their elementwise part (prepare_step) computed in the
    # iteration that scans them (PREP_LATE), or two pairs ahead, the elementwise part of pair p + 1
    # computed while pair p is scanned (it does not depend on it). B and C are loaded with their pair.
    m0 = d_mask & (offs_j < L)[None, :]
    raw, u = load_f32(dl_ptrs, m0), load_f32(u_ptrs, m0)
    z = load_f32(z_ptrs, m0) if HAS_Z else raw
    if not PREP_LATE:
        dl, dlu, skip, gate = prepare_step(raw, u, z, bias, dskip, m0, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, FAST_LOG)
        m1 = d_mask & (J + offs_j < L)[None, :]
        raw1, u1 = load_f32(dl_ptrs + J * stride_dl, m1), load_f32(u_ptrs + J * stride_ul, m1)
        z1 = load_f32(z_ptrs + J * stride_zl, m1) if HAS_Z else raw1
    # num_stages=1: no shared-memory pipeline for these loads (a pipeline was slower on the H200:
    # book/notes/selective_scan.md)
    for p in tl.range(0, n_full, num_stages=1):
        step = p * J
        if SAVE:  # the state entering every SAVE_EVERY steps, for the backward: [B, n_saved, D, n]
            if step % SAVE_EVERY == 0:
                tl.store(H_START + ((b * n_saved + step // SAVE_EVERY) * Dch + offs_d[:, None]) * N
                         + offs_n[None, :], h, mask=state_mask)
        if WIDE:  # a stride along the sequence times N passes 2^31: 64-bit offsets (some more instructions)
            step = step.to(tl.int64)
        nxt = step + J
        bm_a, bm_b = _load_pair(b_ptrs, step, T, BN, E, PAIRED)
        cm_a, cm_b = _load_pair(c_ptrs, step, T, BN, E, PAIRED)
        if PREP_LATE:
            m1 = d_mask & (nxt + offs_j < L)[None, :]
            raw1, u1 = load_f32(dl_ptrs + nxt * stride_dl, m1), load_f32(u_ptrs + nxt * stride_ul, m1)
            z1 = load_f32(z_ptrs + nxt * stride_zl, m1) if HAS_Z else raw1
            dl, dlu, skip, gate = prepare_step(raw, u, z, bias, dskip, d_mask, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                                            FAST_LOG)  # a full pair: only the channels to mask
            h = _fwd_pair(h, dl, dlu, skip, gate, bm_a, bm_b, cm_a, cm_b, a2, out_ptrs + step, d_mask, HAS_D,
                          HAS_Z, BD, BN, T, not EVEN_D, PACKED, PAIRED)
            raw, u, z = raw1, u1, z1
        else:
            nxt2 = step + 2 * J
            m2 = d_mask & (nxt2 + offs_j < L)[None, :]
            raw2, u2 = load_f32(dl_ptrs + nxt2 * stride_dl, m2), load_f32(u_ptrs + nxt2 * stride_ul, m2)
            z2 = load_f32(z_ptrs + nxt2 * stride_zl, m2) if HAS_Z else raw2
            m1 = d_mask & (nxt + offs_j < L)[None, :]
            dl1, dlu1, skip1, gate1 = prepare_step(raw1, u1, z1, bias, dskip, m1, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                                                FAST_LOG)
            h = _fwd_pair(h, dl, dlu, skip, gate, bm_a, bm_b, cm_a, cm_b, a2, out_ptrs + step, d_mask, HAS_D,
                          HAS_Z, BD, BN, T, not EVEN_D, PACKED, PAIRED)
            dl, dlu, skip, gate = dl1, dlu1, skip1, gate1
            raw1, u1, z1 = raw2, u2, z2
    if n_full * J < L:  # the last, partial pair (its delta, u, z prepared and masked, B and C padded)
        t0 = n_full * J
        if SAVE:
            if t0 % SAVE_EVERY == 0:
                tl.store(H_START + ((b * n_saved + t0 // SAVE_EVERY) * Dch + offs_d[:, None]) * N
                         + offs_n[None, :], h, mask=state_mask)
        if WIDE:
            t0 = t0.to(tl.int64)
        bm_a, bm_b = _load_pair(b_ptrs, t0, T, BN, E, PAIRED)
        cm_a, cm_b = _load_pair(c_ptrs, t0, T, BN, E, PAIRED)
        tail = d_mask & (t0 + offs_j < L)[None, :]
        if PREP_LATE:
            dl, dlu, skip, gate = prepare_step(raw, u, z, bias, dskip, tail, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                                            FAST_LOG)
        h = _fwd_pair(h, dl, dlu, skip, gate, bm_a, bm_b, cm_a, cm_b, a2, out_ptrs + t0, tail, HAS_D, HAS_Z,
                      BD, BN, T, True, PACKED, PAIRED)
    tl.store(H_LAST + (b * Dch + offs_d[:, None]) * N + offs_n[None, :], h, mask=state_mask)


def launch_forward(u, delta, A, B4, C4, D, z, bias, softplus: bool, save: bool):
    Bsz, Dch, L = u.shape
    N = A.shape[1]
    groups = B4.shape[1]
    save_every = planning.decide("scan.save_every", save_every_rule)
    bn = max(2, triton.next_power_of_2(N))
    bd, steps, warps = fwd_blocks(bn)
    assert save_every % (2 * steps) == 0, "the saved states must sit at the starts of pairs of chunks"
    l_pad = (L // (2 * steps) + 1) * 2 * steps  # room for the last, partial pair's chunks
    small = bn <= 32  # 4 (channel, state) pairs a thread in 128 registers
    pack = planning.decide("scan.pack_bf16", FWD_CONFIG["pack_bf16"])
    packed = small and pack and B4.dtype == C4.dtype == torch.bfloat16
    paired, prep_late = planning.decide("scan.fwd_variant", fwd_variant, bn, packed)
    bp, cp = (chunk_major(t, bn, l_pad, steps, torch.bfloat16 if packed else torch.float32) for t in (B4, C4))
    if packed:  # two bf16 steps per 32-bit word (steps is even)
        bp, cp = bp.view(torch.int32), cp.view(torch.int32)
    out = empty((Bsz, Dch, L), dtype=u.dtype, device=u.device)
    n_saved = triton.cdiv(L, save_every)
    h_start = empty((Bsz, n_saved, Dch, N), dtype=torch.float32, device=u.device) if save else out
    h_last = empty((Bsz, Dch, N), dtype=torch.float32, device=u.device)
    cap = FWD_CONFIG["maxnreg"] if small and not is_interpreter() else None  # the interpreter takes no cap
    extra = {"maxnreg": cap} if cap else {}
    grid_y = planning.decide("scan.max_grid_y", MAX_GRID_Y)
    wide = planning.decide("scan.wide_offsets", wide_offsets, L, l_pad * bn, u, delta, z)
    for lo in range(0, Bsz, grid_y):  # batches in slices the grid can hold (the slices are views)
        hi = min(Bsz, lo + grid_y)
        z_lo, h_lo = (z[lo:hi] if z is not None else u[lo:hi]), (h_start[lo:hi] if save else out)
        _scan_fwd[(triton.cdiv(Dch, bd), hi - lo)](
            u[lo:hi], delta[lo:hi], A, bp[lo:hi], cp[lo:hi], D if D is not None else A, z_lo,
            bias if bias is not None else A, out[lo:hi], h_lo, h_last[lo:hi], *u.stride(), *delta.stride(),
            *strides3(z), Dch, N, L, l_pad, Dch // groups, groups,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus, SAVE=save,
            SAVE_EVERY=save_every, EVEN_D=Dch % bd == 0, FAST_LOG=fast_log(),
            WIDE=wide, PACKED=packed, PAIRED=paired,
            PREP_LATE=prep_late, BD=bd, BN=bn, T=steps, num_warps=warps, **extra)
    return out, h_last, (h_start if save else None)
