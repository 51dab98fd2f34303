"""The backward: the same tiles, walking the sequence in reverse a segment at a time; the scan runs
backwards in time with its steps reversed in registers (``_scan_bwd``), and its launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import planning
from .._alloc import empty
from .._backend import is_interpreter
from .._common import TL_LOG2E
from .layout import chunk_major, strides3
from .plan import BWD_CONFIG, MAX_GRID_Y, bwd_blocks, bwd_shift, fast_log, save_every_rule, wide_offsets
from .steps import affine_combine, last_step, load_f32, prepare_step


# A [BD, BN, T] tile with its steps in reverse order: the reverse of the evens and odds, interleaved odds
# first. Register renaming when the T steps lie in one thread; Triton 3.6's reverse=True scan
# exchanged values between threads even then (220 shuffles a chunk, in the SASS).
@triton.jit
def _rev2(x, BD: tl.constexpr, BN: tl.constexpr):
    ev, od = tl.split(tl.reshape(x, [BD, BN, 1, 2]))
    return tl.reshape(tl.join(od, ev), [BD, BN, 2])


@triton.jit
def _rev4(x, BD: tl.constexpr, BN: tl.constexpr):
    ev, od = tl.split(tl.reshape(x, [BD, BN, 2, 2]))
    return tl.reshape(tl.join(_rev2(od, BD, BN), _rev2(ev, BD, BN)), [BD, BN, 4])


@triton.jit
def _rev8(x, BD: tl.constexpr, BN: tl.constexpr):
    ev, od = tl.split(tl.reshape(x, [BD, BN, 4, 2]))
    return tl.reshape(tl.join(_rev4(od, BD, BN), _rev4(ev, BD, BN)), [BD, BN, 8])


@triton.jit
def _reverse(x, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
    tl.static_assert(T == 2 or T == 4 or T == 8, "the backward's chunks are 2, 4 or 8 steps")
    if T == 2:
        r = _rev2(x, BD, BN)
    elif T == 4:
        r = _rev4(x, BD, BN)
    else:
        r = _rev8(x, BD, BN)
    return r


# A [BD, BN, T] tile shifted one step earlier, x[:, :, 1:], its last step a placeholder (x's last again):
# register renaming when the T steps lie in one thread. The steps after the evens are the odds, and
# those after the odds are the evens shifted the same way.
@triton.jit
def _shift2(x, BD: tl.constexpr, BN: tl.constexpr):
    _, od = tl.split(tl.reshape(x, [BD, BN, 1, 2]))
    return tl.reshape(tl.join(od, od), [BD, BN, 2])


@triton.jit
def _shift4(x, BD: tl.constexpr, BN: tl.constexpr):
    ev, od = tl.split(tl.reshape(x, [BD, BN, 2, 2]))
    return tl.reshape(tl.join(od, _shift2(ev, BD, BN)), [BD, BN, 4])


@triton.jit
def _shift8(x, BD: tl.constexpr, BN: tl.constexpr):
    ev, od = tl.split(tl.reshape(x, [BD, BN, 4, 2]))
    return tl.reshape(tl.join(od, _shift4(ev, BD, BN)), [BD, BN, 8])


@triton.jit
def _shift(x, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
    tl.static_assert(T == 2 or T == 4 or T == 8, "the backward's chunks are 2, 4 or 8 steps")
    if T == 2:
        r = _shift2(x, BD, BN)
    elif T == 4:
        r = _shift4(x, BD, BN)
    else:
        r = _shift8(x, BD, BN)
    return r


@triton.jit
def _first_step(x, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
    # x[:, :, 0] of a [BD, BN, T] tile: the last step of the tile reversed (register renaming, both)
    return last_step(_reverse(x, BD, BN, T), BD, BN, T)


@triton.jit
def _bwd_advance(h, raw, u, bias, bm, a2, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 FAST_LOG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
    # the state after a chunk, from the state before it (the forward's scan without y)
    dl, dlu, _, _ = prepare_step(raw, u, u, bias, bias, mask, False, False, HAS_BIAS, SOFTPLUS, FAST_LOG)
    decay = tl.exp2(dl[:, None, :] * a2[:, :, None])
    push = dlu[:, None, :] * bm
    push = tl.where(tl.arange(0, T)[None, None, :] == 0, push + decay * h[:, :, None], push)
    _, hs = tl.associative_scan((decay, push), 2, affine_combine)
    return last_step(hs, BD, BN, T)


@triton.jit
def _bwd_chunk(h, dh_after, after, dl, dlu, dy, bm, cm, a, a2, HAS_Z: tl.constexpr, SHIFT: tl.constexpr,
               BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
    # One chunk of the backward: h [BD, BN] is the state before it, dh_after = d𝓛/dh at the first step
    # after it (the gradient from the rest of the sequence). after: exp(delta A) at that step [BD, BN]
    # (SHIFT), else delta one step later [BD, T]. dl, dlu, dy [BD, T] (dy: the gradient of
    # y_t = C_t . h_t); B, C [BD, BN, T]. Returns dh and exp(delta A) at the chunk's first step, and the
    # chunk's gradients.
    decay = tl.exp2(dl[:, None, :] * a2[:, :, None])  # exp(delta_t A)
    push = dlu[:, None, :] * bm  # delta_t B_t u_t
    first = tl.arange(0, T)[None, None, :] == 0
    _, hs = tl.associative_scan((decay, tl.where(first, push + decay * h[:, :, None], push)), 2, affine_combine)
    # dh_t = d𝓛/dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1}: the same scan, backwards in time, with
    # the decays one step later and dh_after folded into the last step
    inject = cm * dy[:, None, :]
    last = tl.arange(0, T)[None, None, :] == T - 1
    if SHIFT:  # the tile shifted in registers, the chunk after's first decay last
        decay_next = tl.where(last, after[:, :, None], _shift(decay, BD, BN, T))
    else:  # taken again from delta one step later
        decay_next = tl.exp2(after[:, None, :] * a2[:, :, None])
    inject = tl.where(last, inject + decay_next * dh_after[:, :, None], inject)
    _, dh = tl.associative_scan((_reverse(decay_next, BD, BN, T), _reverse(inject, BD, BN, T)), 2, affine_combine)
    dh = _reverse(dh, BD, BN, T)
    kept = hs - push  # exp(delta_t A) h_{t-1}: what of the previous state survives step t
    gb = tl.sum(dh * bm, axis=1)  # [BD, T]: d𝓛/d(delta_t u_t)
    gak = tl.sum(dh * kept * a[:, :, None], axis=1)  # [BD, T]: the decay's share of d𝓛/d(delta_t)
    da = tl.sum(dh * kept * dl[:, None, :], axis=2)  # [BD, BN]: this chunk's d𝓛/dA
    db = tl.sum(dh * dlu[:, None, :], axis=0)  # [BN, T], summed over the block's channels (one group)
    dc = tl.sum(hs * dy[:, None, :], axis=0)
    y = tl.sum(cm * hs, axis=1) if HAS_Z else gb  # the forward's y, for the gate's gradient
    return _first_step(dh, BD, BN, T), _first_step(decay, BD, BN, T), gb, gak, da, db, dc, y


@triton.jit
def _scan_bwd(U, DELTA, A, BP, CP, DSKIP, Z, BIAS, DOUT, H_START, DH_LAST, SCRATCH,
              DU, DDELTA, DZ, DA_PART, DD_PART, DBIAS_PART, DBP, DCP,
              stride_ub, stride_ud, stride_ul, stride_db, stride_dd, stride_dl, stride_zb, stride_zd, stride_zl,
              Dch, N, L, L_PAD, per_group, groups,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              HAS_DH_LAST: tl.constexpr, SAVE_EVERY: tl.constexpr, FAST_LOG: tl.constexpr, WIDE: tl.constexpr,
              SHIFT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
    # One program: BD channels (one group's) of one batch, all BN states, the sequence walked backwards a
    # segment of SAVE_EVERY steps at a time, each segment in K chunks of T steps ([BD, BN, T] tiles with
    # the T steps in one thread, as in the forward). The forward saved the state entering each segment;
    # a first pass over the segment recomputes the states entering its chunks (stored in this program's
    # SCRATCH rows: K [BD, BN] tiles, kilobytes that stay in the caches), then the chunks are walked
    # last to first, each rebuilding its states from the one entering it. Each exp(delta_t A) is taken
    # in pass 1 and for step t in pass 2; the gradient at step t - 1 needs it too: SHIFT takes it from
    # the chunk's tile shifted in registers (its last step's from the chunk after, walked just before),
    # else it is taken a third time, from delta loaded again one step later (bwd_shift).
    # B and C come chunk-major as in the forward; their gradients, sums over channels, are added
    # atomically into chunk-major float32 DBP, DCP.
    b = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(0)
    K: tl.constexpr = SAVE_EVERY // T
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    offs_n = tl.arange(0, BN)
    offs_t = tl.arange(0, T)
    d_ok = offs_d < Dch
    state_mask = d_ok[:, None] & (offs_n < N)[None, :]
    group = (pid_d * BD) // per_group  # the block lies in one group (bwd_blocks)
    a = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=state_mask, other=0.0)
    a2 = a * TL_LOG2E
    bias = tl.load(BIAS + offs_d, mask=d_ok, other=0.0) if HAS_BIAS else offs_d
    dskip = tl.load(DSKIP + offs_d, mask=d_ok, other=0.0) if HAS_D else offs_d
    row = (b * Dch + offs_d[:, None]) * L + offs_t[None, :]  # [BD, T] in the contiguous outputs and dout
    u_ptrs = U + b * stride_ub + offs_d[:, None] * stride_ud + offs_t[None, :] * stride_ul
    dl_ptrs = DELTA + b * stride_db + offs_d[:, None] * stride_dd + offs_t[None, :] * stride_dl
    z_ptrs = Z + b * stride_zb + offs_d[:, None] * stride_zd + offs_t[None, :] * stride_zl
    # [BD, BN, T] pointers, each channel's through its own group index as in the forward (the same rows
    # here): Triton then lays the tiles out as there, T steps by 4 states a thread, warps over channels
    groups_d = tl.minimum(offs_d, Dch - 1) // per_group
    bc = (b * groups + groups_d[:, None, None]) * L_PAD * BN + offs_n[None, :, None] * T + offs_t[None, None, :]
    bc_grad = (b * groups + group) * L_PAD * BN + offs_n[:, None] * T + offs_t[None, :]  # [BN, T]
    scratch = SCRATCH + ((((b * tl.num_programs(0) + pid_d) * K) * BD + tl.arange(0, BD)[:, None]) * BN
                         + offs_n[None, :])  # [BD, BN]; chunk k at + k * BD * BN
    n_saved = tl.cdiv(L, SAVE_EVERY)
    if HAS_DH_LAST:  # the gradient of the returned last state
        dh_after = tl.load(DH_LAST + (b * Dch + offs_d[:, None]) * N + offs_n[None, :], mask=state_mask, other=0.0)
    else:
        dh_after = tl.zeros([BD, BN], tl.float32)
    # exp(delta A) at the step after the chunk (SHIFT): 1 past the end (delta 0). From a, not tl.full: it
    # takes a's layout, and the carried tile then stays in the chunks' (the default one was slower)
    decay_after = a * 0.0 + 1.0
    da_acc = tl.zeros([BD, BN], tl.float32)
    dd_acc = tl.zeros([BD, T], tl.float32)
    dbias_acc = tl.zeros([BD, T], tl.float32)
    for i in range(0, n_saved):
        s = n_saved - 1 - i
        if WIDE:  # a stride along the sequence times N passes 2^31: 64-bit steps, as in the forward
            s = s.to(tl.int64)
        h = tl.load(H_START + ((b * n_saved + s) * Dch + offs_d[:, None]) * N + offs_n[None, :], mask=state_mask,
                    other=0.0)
        # pass 1: the states entering the segment's chunks
        for k in range(0, K - 1):
            t0 = s * SAVE_EVERY + k * T
            tl.store(scratch + k * BD * BN, h)
            m = d_ok[:, None] & (t0 + offs_t < L)[None, :]
            raw, u = load_f32(dl_ptrs + t0 * stride_dl, m), load_f32(u_ptrs + t0 * stride_ul, m)
            bm = tl.load(BP + bc + t0 * BN)
            h = _bwd_advance(h, raw, u, bias, bm, a2, m, HAS_BIAS, SOFTPLUS, FAST_LOG, BD, BN, T)
        tl.store(scratch + (K - 1) * BD * BN, h)
        tl.debug_barrier()  # the scratch rows are read below by whichever thread holds them
        # pass 2: the chunks last to first
        for j in range(0, K):
            k = K - 1 - j
            t0 = s * SAVE_EVERY + k * T
            h = tl.load(scratch + k * BD * BN)
            m = d_ok[:, None] & (t0 + offs_t < L)[None, :]
            raw, u = load_f32(dl_ptrs + t0 * stride_dl, m), load_f32(u_ptrs + t0 * stride_ul, m)
            z = load_f32(z_ptrs + t0 * stride_zl, m) if HAS_Z else raw
            dout = load_f32(DOUT + row + t0, m)
            dl, dlu, skip, gate = prepare_step(raw, u, z, bias, dskip, m, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, FAST_LOG)
            dy = dout * gate if HAS_Z else dout  # back through out = (y + D u) * silu(z)
            bm = tl.load(BP + bc + t0 * BN)
            cm = tl.load(CP + bc + t0 * BN)
            if SHIFT:
                after = decay_after
            else:
                m_next = d_ok[:, None] & (t0 + 1 + offs_t < L)[None, :]
                raw_next = load_f32(dl_ptrs + (t0 + 1) * stride_dl, m_next)
                after, _, _, _ = prepare_step(raw_next, dl, dl, bias, dskip, m_next,
                                              False, False, HAS_BIAS, SOFTPLUS, FAST_LOG)
            dh_after, decay_first, gb, gak, da, db, dc, y = _bwd_chunk(h, dh_after, after, dl, dlu, dy, bm, cm, a, a2,
                                                                      HAS_Z, SHIFT, BD, BN, T)
            if SHIFT:
                decay_after = decay_first  # the walk's next chunk is the one before this
            if HAS_Z:  # silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)
                pre = y + skip if HAS_D else y
                sig = tl.sigmoid(z)
                tl.store(DZ + row + t0, (dout * pre * sig * (1.0 + z * (1.0 - sig))).to(DZ.dtype.element_ty), mask=m)
            du = gb * dl
            if HAS_D:
                du += dy * dskip[:, None]
                dd_acc += dy * u
            ddelta = gak + gb * u  # through exp(delta A) and through delta B u
            if SOFTPLUS:  # d softplus(x) / dx = sigmoid(x), x = delta + delta_bias
                if HAS_BIAS:
                    raw += bias[:, None]
                ddelta = ddelta * tl.sigmoid(raw)
            ddelta = tl.where(m, ddelta, 0.0)
            dbias_acc += ddelta
            da_acc += da
            tl.store(DU + row + t0, du.to(DU.dtype.element_ty), mask=m)
            tl.store(DDELTA + row + t0, ddelta.to(DDELTA.dtype.element_ty), mask=m)
            tl.atomic_add(DBP + bc_grad + t0 * BN, db, sem="relaxed")  # no ordering needed: only sums
            tl.atomic_add(DCP + bc_grad + t0 * BN, dc, sem="relaxed")
        tl.debug_barrier()  # the next segment's pass 1 overwrites the scratch rows
    tl.store(DA_PART + (b * Dch + offs_d[:, None]) * N + offs_n[None, :], da_acc, mask=state_mask)
    if HAS_D:
        tl.store(DD_PART + b * Dch + offs_d, tl.sum(dd_acc, axis=1), mask=d_ok)
    if HAS_BIAS:
        tl.store(DBIAS_PART + b * Dch + offs_d, tl.sum(dbias_acc, axis=1), mask=d_ok)


def launch_backward(u, delta, A, B4, C4, D, z, bias, softplus: bool, h_start, dout, dh_last):
    Bsz, Dch, L = u.shape
    N = A.shape[1]
    groups = B4.shape[1]
    bn = max(2, triton.next_power_of_2(N))
    bd, steps, warps = planning.decide("scan.bwd_blocks", bwd_blocks, bn, Dch // groups)
    save_every = planning.decide("scan.save_every", save_every_rule)
    assert save_every % steps == 0, "a segment must be a whole number of the backward's chunks"
    n_saved = triton.cdiv(L, save_every)
    l_pad = n_saved * save_every  # whole segments: the last one's steps past N are read (zeros), never stored
    bp, cp = (chunk_major(t, bn, l_pad, steps, torch.float32) for t in (B4, C4))
    du, ddelta = empty(u.shape, dtype=u.dtype, device=u.device), empty(u.shape, dtype=delta.dtype, device=u.device)
    dz = empty(u.shape, dtype=z.dtype, device=u.device) if z is not None else None
    f32 = dict(dtype=torch.float32, device=u.device)
    da_part = empty((Bsz, Dch, N), **f32)
    dd_part = empty((Bsz, Dch), **f32) if D is not None else None
    dbias_part = empty((Bsz, Dch), **f32) if bias is not None else None
    dbp, dcp = torch.zeros_like(bp), torch.zeros_like(cp)  # accumulated atomically
    n_d = triton.cdiv(Dch, bd)
    cap = BWD_CONFIG["maxnreg"] if bn <= 128 and not is_interpreter() else None
    extra = {"maxnreg": cap} if cap else {}
    grid_y = planning.decide("scan.max_grid_y", MAX_GRID_Y)
    scratch = empty((min(Bsz, grid_y) * n_d * (save_every // steps) * bd * bn,), **f32)
    wide = planning.decide("scan.wide_offsets", wide_offsets, L, l_pad * bn, u, delta, z)
    shift = planning.decide("scan.bwd_shift", bwd_shift, bn)
    for lo in range(0, Bsz, grid_y):  # batches in slices the grid can hold, as in launch_forward
        hi = min(Bsz, lo + grid_y)
        _scan_bwd[(n_d, hi - lo)](
            u[lo:hi], delta[lo:hi], A, bp[lo:hi], cp[lo:hi], D if D is not None else A,
            z[lo:hi] if z is not None else u[lo:hi], bias if bias is not None else A, dout[lo:hi], h_start[lo:hi],
            dh_last[lo:hi] if dh_last is not None else A, scratch, du[lo:hi], ddelta[lo:hi],
            dz[lo:hi] if dz is not None else du[lo:hi], da_part[lo:hi], dd_part[lo:hi] if D is not None else A,
            dbias_part[lo:hi] if bias is not None else A, dbp[lo:hi], dcp[lo:hi],
            *u.stride(), *delta.stride(), *strides3(z), Dch, N, L, l_pad, Dch // groups, groups,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
            HAS_DH_LAST=dh_last is not None, SAVE_EVERY=save_every, FAST_LOG=fast_log(), SHIFT=shift,
            WIDE=wide, BD=bd, BN=bn, T=steps, num_warps=warps, **extra)
    # chunk-major [B, G, l_pad / T, BN, T] back to [B, G, n, N]
    db, dc = (t.transpose(3, 2).reshape(Bsz, groups, bn, l_pad)[:, :, :N, :L] for t in (dbp, dcp))
    return (du, ddelta, dz, da_part.sum(0), dd_part.sum(0) if D is not None else None, db, dc,
            dbias_part.sum(0) if bias is not None else None)
