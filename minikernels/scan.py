"""Chapter 4: Mamba's selective scan (``mk.selective_scan``), with ``mamba_ssm.selective_scan_fn``'s conventions.

Symbols are the book's: N is the sequence length and n the state size (the code keeps mamba_ssm's
names for them, L and N, in the kernels' arguments as on the host). For each batch b and channel d,
a diagonal state h of n entries:

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t,      y_t = C_t . h_t  (+ D u_t, then * silu(z_t))

Input-dependent delta, B, C break the convolution view of a time-invariant SSM, but each step is an
affine map h -> a h + b, and composing affine maps is associative:

    (a1, b1) • (a2, b2) = (a1 a2, a2 b1 + b2)

where (a1, b1) • (a2, b2) applies step 1 first, then step 2 (the reverse of the usual order of
function composition: it is f2 ∘ f1), so the recurrence is a parallel scan
(``tl.associative_scan``). The forward: one program (one warp) owns BD channels of one batch and all
n states, and walks the whole sequence two chunks of T steps at a time (one for n from 33 to 64)
with the state in registers; a chunk is a [BD, n, T] tile whose T steps lie inside one thread, so
the scan is a chain of multiply-adds in each thread and only the sum over states for y crosses
threads. B and C are laid out once, on the host, in chunk-major order (_chunk_major; bf16 stays bf16
up to n = 32, two steps per 32-bit word, else float32). The backward has the same tiles and walks
the sequence in reverse, a segment of 32 steps at a time on the GPU (16 in the interpreter; the
forward saved the state entering each): a first pass recomputes the states entering the segment's
chunks, then the chunks are taken last to first; in each, h is rebuilt from the state entering it
and, with dh_t = d𝓛/dh_t (the book's notation for gradients), the same scan runs backwards in time
(its steps reversed in registers):

    dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1}

with exp(delta_t A) h_{t-1} = h_t - delta_t B_t u_t (no division) for the gradients of delta and A.
The elementwise parts (delta_bias and softplus on the way in, D and the z gate on the way out)
are fused into both kernels, so the forward reads u, delta and z once and writes the output once
(B and C, a few megabytes, come from L2 to every program), the bytes of the bandwidth roofline.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._alloc import empty
from ._backend import is_interpreter, on_device_of
from ._validate import check_same_device, check_tensor
from .feature_maps import check_flag, final_state_flag, keep_in_graph, once_differentiable

MAX_STATE = 256


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # apply step 1, then step 2: h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _log2(x, FAST: tl.constexpr):
    # FAST: the GPU's approximate log2, one special-function instruction (absolute error about 2^-22),
    # instead of libdevice's polynomial of some twenty instructions; the interpreter runs tl.log2.
    # softplus takes log(1 + y) only for y >= 1e-4, where rounding 1 + y to float32 costs as much
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return tl.log2(x)


@triton.jit
def _softplus(x, FAST_LOG: tl.constexpr):
    # log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), with log(1 + y) ~ y - y^2/2 where y is tiny
    # (log1p is not portable to the interpreter); the same function in forward and backward
    y = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(y < 1e-4, y - 0.5 * y * y, _log2(1.0 + y, FAST_LOG) * 0.6931471805599453)


@triton.jit
def _last_step(x, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
    # x[:, :, T - 1] of a [BD, BN, T] tile (T a power of two up to 16): halving the last axis and keeping
    # the odd positions keeps the last one. Free when the T steps lie within one thread.
    if T >= 2:
        x = tl.split(tl.reshape(x, [BD, BN, T // 2, 2]))[1]
    if T >= 4:
        x = tl.split(tl.reshape(x, [BD, BN, T // 4, 2]))[1]
    if T >= 8:
        x = tl.split(tl.reshape(x, [BD, BN, T // 8, 2]))[1]
    if T >= 16:
        x = tl.split(tl.reshape(x, [BD, BN, T // 16, 2]))[1]
    return tl.reshape(x, [BD, BN])


@triton.jit
def _load(ptrs, mask):
    # a [BD, J] tile of delta, u or z as float32; the mask is constant along J, so the load stays a vector
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _fwd_prep(raw, u, z, bias, dskip, mask, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
              SOFTPLUS: tl.constexpr, FAST_LOG: tl.constexpr):
    # what depends on (channel, step) alone, on a [BD, J] tile with one owner per element (so once per
    # channel and step, not once per state): delta_t, delta_t u_t, the skip D u_t and the gate silu(z_t).
    # Steps past the sequence's end (N) get delta 0: the map (1, 0) leaves h unchanged.
    if HAS_BIAS:
        raw += bias[:, None]
    dl = raw
    if SOFTPLUS:
        dl = _softplus(raw, FAST_LOG)
    dl = tl.where(mask, dl, 0.0)
    skip = dskip[:, None] * u if HAS_D else dl
    gate = z * tl.sigmoid(z) if HAS_Z else dl
    return dl, dl * u, skip, gate


@triton.jit
def _unpack(x, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, PACKED: tl.constexpr):
    # B or C [BD, BN, T] as float32. PACKED: x holds two bf16 steps per 32-bit word ([BD, BN, T / 2]); a
    # bf16 is the top half of a float32, so each unpacks with one shift or one mask (the compiler's
    # conversion spends two instructions on every other element)
    if PACKED:
        lo = (x << 16).to(tl.float32, bitcast=True)
        hi = (x & -65536).to(tl.float32, bitcast=True)
        out = tl.reshape(tl.join(lo, hi), [BD, BN, T])
    else:
        out = x.to(tl.float32)
    return out


@triton.jit
def _fwd_chunk(h, dl, dlu, bm, cm, a2, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, PACKED: tl.constexpr):
    # T steps of BD channels and all BN states: h [BD, BN] enters; returns the state after the chunk and
    # y_t = C_t . h_t [BD, T]. dl, dlu [BD, T]; B, C [BD, BN, T] (each channel sees its group's rows).
    decay = tl.exp2(dl[:, None, :] * a2[:, :, None])  # exp(delta_t A)
    push = dlu[:, None, :] * _unpack(bm, BD, BN, T, PACKED)  # delta_t B_t u_t
    # fold the entering state into the first step; then h_t = decay_t h_{t-1} + push_t is a scan whose
    # steps lie in one thread: a chain of multiply-adds, nothing crosses threads
    push = tl.where(tl.arange(0, T)[None, None, :] == 0, push + decay * h[:, :, None], push)
    _, hs = tl.associative_scan((decay, push), 2, _affine_combine)
    y = tl.sum(_unpack(cm, BD, BN, T, PACKED) * hs, axis=1)  # the only sum across threads
    return _last_step(hs, BD, BN, T), y


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
    # and N; _chunk_major), as bf16 pairs in 32-bit words (PACKED) or float32: read without masks, a
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
    a2 = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=state_mask, other=0.0) * 1.4426950408889634
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
    # memory overlap the scan: one pair ahead, and their elementwise part (_fwd_prep) computed in the
    # iteration that scans them (PREP_LATE), or two pairs ahead, the elementwise part of pair p + 1
    # computed while pair p is scanned (it does not depend on it). B and C are loaded with their pair.
    m0 = d_mask & (offs_j < L)[None, :]
    raw, u = _load(dl_ptrs, m0), _load(u_ptrs, m0)
    z = _load(z_ptrs, m0) if HAS_Z else raw
    if not PREP_LATE:
        dl, dlu, skip, gate = _fwd_prep(raw, u, z, bias, dskip, m0, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, FAST_LOG)
        m1 = d_mask & (J + offs_j < L)[None, :]
        raw1, u1 = _load(dl_ptrs + J * stride_dl, m1), _load(u_ptrs + J * stride_ul, m1)
        z1 = _load(z_ptrs + J * stride_zl, m1) if HAS_Z else raw1
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
            raw1, u1 = _load(dl_ptrs + nxt * stride_dl, m1), _load(u_ptrs + nxt * stride_ul, m1)
            z1 = _load(z_ptrs + nxt * stride_zl, m1) if HAS_Z else raw1
            dl, dlu, skip, gate = _fwd_prep(raw, u, z, bias, dskip, d_mask, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                                            FAST_LOG)  # a full pair: only the channels to mask
            h = _fwd_pair(h, dl, dlu, skip, gate, bm_a, bm_b, cm_a, cm_b, a2, out_ptrs + step, d_mask, HAS_D,
                          HAS_Z, BD, BN, T, not EVEN_D, PACKED, PAIRED)
            raw, u, z = raw1, u1, z1
        else:
            nxt2 = step + 2 * J
            m2 = d_mask & (nxt2 + offs_j < L)[None, :]
            raw2, u2 = _load(dl_ptrs + nxt2 * stride_dl, m2), _load(u_ptrs + nxt2 * stride_ul, m2)
            z2 = _load(z_ptrs + nxt2 * stride_zl, m2) if HAS_Z else raw2
            m1 = d_mask & (nxt + offs_j < L)[None, :]
            dl1, dlu1, skip1, gate1 = _fwd_prep(raw1, u1, z1, bias, dskip, m1, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
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
            dl, dlu, skip, gate = _fwd_prep(raw, u, z, bias, dskip, tail, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS,
                                            FAST_LOG)
        h = _fwd_pair(h, dl, dlu, skip, gate, bm_a, bm_b, cm_a, cm_b, a2, out_ptrs + t0, tail, HAS_D, HAS_Z,
                      BD, BN, T, True, PACKED, PAIRED)
    tl.store(H_LAST + (b * Dch + offs_d[:, None]) * N + offs_n[None, :], h, mask=state_mask)


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
    return _last_step(_reverse(x, BD, BN, T), BD, BN, T)


@triton.jit
def _bwd_advance(h, raw, u, bias, bm, a2, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 FAST_LOG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
    # the state after a chunk, from the state before it (the forward's scan without y)
    dl, dlu, _, _ = _fwd_prep(raw, u, u, bias, bias, mask, False, False, HAS_BIAS, SOFTPLUS, FAST_LOG)
    decay = tl.exp2(dl[:, None, :] * a2[:, :, None])
    push = dlu[:, None, :] * bm
    push = tl.where(tl.arange(0, T)[None, None, :] == 0, push + decay * h[:, :, None], push)
    _, hs = tl.associative_scan((decay, push), 2, _affine_combine)
    return _last_step(hs, BD, BN, T)


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
    _, hs = tl.associative_scan((decay, tl.where(first, push + decay * h[:, :, None], push)), 2, _affine_combine)
    # dh_t = d𝓛/dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1}: the same scan, backwards in time, with
    # the decays one step later and dh_after folded into the last step
    inject = cm * dy[:, None, :]
    last = tl.arange(0, T)[None, None, :] == T - 1
    if SHIFT:  # the tile shifted in registers, the chunk after's first decay last
        decay_next = tl.where(last, after[:, :, None], _shift(decay, BD, BN, T))
    else:  # taken again from delta one step later
        decay_next = tl.exp2(after[:, None, :] * a2[:, :, None])
    inject = tl.where(last, inject + decay_next * dh_after[:, :, None], inject)
    _, dh = tl.associative_scan((_reverse(decay_next, BD, BN, T), _reverse(inject, BD, BN, T)), 2, _affine_combine)
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
    # else it is taken a third time, from delta loaded again one step later (_bwd_shift).
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
    group = (pid_d * BD) // per_group  # the block lies in one group (_bwd_blocks)
    a = tl.load(A + offs_d[:, None] * N + offs_n[None, :], mask=state_mask, other=0.0)
    a2 = a * 1.4426950408889634
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
            raw, u = _load(dl_ptrs + t0 * stride_dl, m), _load(u_ptrs + t0 * stride_ul, m)
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
            raw, u = _load(dl_ptrs + t0 * stride_dl, m), _load(u_ptrs + t0 * stride_ul, m)
            z = _load(z_ptrs + t0 * stride_zl, m) if HAS_Z else raw
            dout = _load(DOUT + row + t0, m)
            dl, dlu, skip, gate = _fwd_prep(raw, u, z, bias, dskip, m, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, FAST_LOG)
            dy = dout * gate if HAS_Z else dout  # back through out = (y + D u) * silu(z)
            bm = tl.load(BP + bc + t0 * BN)
            cm = tl.load(CP + bc + t0 * BN)
            if SHIFT:
                after = decay_after
            else:
                m_next = d_ok[:, None] & (t0 + 1 + offs_t < L)[None, :]
                after, _, _, _ = _fwd_prep(_load(dl_ptrs + (t0 + 1) * stride_dl, m_next), dl, dl, bias, dskip, m_next,
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


# The forward's tiles: BD channels by T steps by all states, two chunks (2T steps) an iteration. T = 4
# steps of B or C are one vector load, so the steps of a (channel, state) pair land in one thread; with
# BD = 8 Triton 3.6 spreads a warp over 8 channels by 4 groups of states (4 states a thread). Chosen by
# sweeps on the H200 at B = 8, D = 2048, N = 4096, n = 16 (BD, T, what is loaded ahead, the fast log),
# recorded with what else was tried in book/notes/selective_scan.md. For n <= 32 (the tuned case),
# bf16 B and C stay bf16 ("pack_bf16"; exact, and half the bytes of float32 to move from L1 to the
# registers) and ptxas is capped at 128 registers for every dtype ("maxnreg": 16 warps an SM, all of
# B8 D2048's 2048 programs at once, no spills). Other dtypes: float32 B and C (capped too up to n = 32);
# larger n: float32 B and C and no cap (no spills at n = 64 or 256 either). The loop's order for each n:
# _fwd_variant. One channel a thread (BD = 32, no sum across lanes) compiles to fewer instructions but
# leaves one warp an SM quadrant for B8 D2048, too few to hide a load's latency; this layout is bound by
# issuing instructions instead, not by waiting for B and C.
FWD_CONFIG = {"BD": 8, "T": 4, "num_warps": 1, "fast_log": True, "pack_bf16": True, "maxnreg": 128}
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis (the batch's here)


def _fast_log() -> bool:
    # softplus's logarithm by the GPU's lg2.approx (forward and backward alike); the interpreter has no PTX
    return FWD_CONFIG["fast_log"] and not is_interpreter()


def _fwd_blocks(n_pad: int) -> tuple[int, int, int]:
    if is_interpreter():  # few, large steps: the interpreter's cost grows with the number of steps
        return 4, 8, 1
    # more states, fewer channels: a warp holds at most 128 (channel, state) pairs (256 at n = 256: one channel),
    # so large n does not spill registers (n = 16 is the tuned case; n = 64 and 256 compile without spills)
    return max(1, min(FWD_CONFIG["BD"], 128 // n_pad)), FWD_CONFIG["T"], FWD_CONFIG["num_warps"]


# The backward's tiles: [BD, BN, T] with the layout of the forward's (one warp, T steps by 4 states a thread);
# the sequence in segments of SAVE_EVERY steps (the forward saves the state entering each), each walked in
# SAVE_EVERY / T chunks. The kernel waits on latency more than it issues, so a 128-register cap (16 warps an
# SM instead of 12, at the price of a few spills) pays up to n = 128; at n = 256 (one channel a program) it
# does not and is not applied. The measurements behind these choices, and what was tried and dropped (other
# T, channels and warps a program, packed bf16 B and C, summing dB and dC through scratch memory), are in
# book/notes/selective_scan.md. Besides the saved states, the backward takes SAVE_EVERY / T states per
# (batch, channel) of scratch (512 bytes at n = 16; the saved states are 8 KB at N = 4096).
BWD_CONFIG = {"BD": 8, "T": 4, "num_warps": 1, "save_every": 32, "maxnreg": 128}


def _save_every() -> int:
    # how often the forward saves the state for the backward (a multiple of both kernels' steps an iteration)
    return 16 if is_interpreter() else BWD_CONFIG["save_every"]


def _bwd_shift(n_pad: int) -> bool:
    # SHIFT in _scan_bwd: the decays one step later shifted in registers, or taken again from delta (a third
    # exponential per step). Shifting saves exponentials where a chunk's steps lie in one thread (n <= 64);
    # from n = 128 on there is one channel a program, a chunk's steps span lanes, and the shifted tile only
    # adds spills (timings: book/notes/selective_scan.md)
    return n_pad <= 64


def _bwd_blocks(n_pad: int, per_group: int) -> tuple[int, int, int]:
    if is_interpreter():
        bd, steps, warps = 4, 8, 1
    else:  # at most 128 (channel, state) pairs a warp (256 at n = 256: one channel), as in the forward
        bd, steps, warps = BWD_CONFIG["BD"], BWD_CONFIG["T"], BWD_CONFIG["num_warps"]
        bd = max(1, min(bd, 128 * warps // n_pad))
    while per_group % bd:  # a block of channels must not straddle two groups (their dB, dC sums differ)
        bd //= 2
    return bd, steps, warps


def _wide_offsets(length: int, bc_len: int, *tensors) -> bool:
    # whether the forward's offsets along the sequence (step * stride for u, delta, z; step * BN within a batch's
    # B and C, at most bc_len) can pass 2^31 and must be computed in 64 bits
    longest = max([t.stride(-1) * length for t in tensors if t is not None] + [bc_len])
    return longest >= 2**31


def _chunk_major(t4: torch.Tensor, n_pad: int, l_pad: int, steps: int, dtype: torch.dtype) -> torch.Tensor:
    # B or C [batch, G, n, N] as contiguous [batch, G, l_pad / steps, n_pad, steps] in dtype, zeros past n
    # and N: a few megabytes, laid out once here instead of gathered by every channel inside the kernel
    bsz, groups, n, length = t4.shape
    out = torch.zeros((bsz, groups, l_pad // steps, n_pad, steps), dtype=dtype, device=t4.device)
    full = length // steps * steps
    out[:, :, :full // steps, :n] = t4[..., :full].unflatten(-1, (-1, steps)).transpose(2, 3)
    if full < length:
        out[:, :, full // steps, :n, :length - full] = t4[..., full:]
    return out


def _bc_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int], int]:
    # [B, n, N] is one group: view as [B, 1, n, N]
    t4 = t[:, None] if t.dim() == 3 else t
    return t4, t4.stride(), t4.shape[1]


def _strides3(t):
    # strides of an optional [B, D, N] tensor (zeros when absent: never read)
    return t.stride() if t is not None else (0, 0, 0)


def _fwd_variant(n_pad: int, packed: bool) -> tuple[bool, bool]:
    # The forward's loop for n states padded to n_pad: (PAIRED, PREP_LATE), the fastest of a sweep on the
    # H200 (book/notes/selective_scan.md):
    # - one chunk an iteration only at n = 33..64, where a warp holds 2 channels and the paired tiles of
    #   delta, u, z are smaller than a warp;
    # - delta, u, z prepared in their own iteration (fewer registers live) at n > 64 and for packed bf16;
    #   float32 B and C at n <= 64 keep the prepare-ahead order.
    return n_pad != 64, packed or n_pad >= 128


def _forward(u, delta, A, B4, C4, D, z, bias, softplus: bool, save: bool):
    Bsz, Dch, L = u.shape
    N = A.shape[1]
    groups = B4.shape[1]
    save_every = _save_every()
    bn = max(2, triton.next_power_of_2(N))
    bd, steps, warps = _fwd_blocks(bn)
    assert save_every % (2 * steps) == 0, "the saved states must sit at the starts of pairs of chunks"
    l_pad = (L // (2 * steps) + 1) * 2 * steps  # room for the last, partial pair's chunks
    small = bn <= 32  # 4 (channel, state) pairs a thread in 128 registers
    packed = small and FWD_CONFIG["pack_bf16"] and B4.dtype == C4.dtype == torch.bfloat16
    paired, prep_late = _fwd_variant(bn, packed)
    bp, cp = (_chunk_major(t, bn, l_pad, steps, torch.bfloat16 if packed else torch.float32) for t in (B4, C4))
    if packed:  # two bf16 steps per 32-bit word (steps is even)
        bp, cp = bp.view(torch.int32), cp.view(torch.int32)
    out = empty((Bsz, Dch, L), dtype=u.dtype, device=u.device)
    n_saved = triton.cdiv(L, save_every)
    h_start = empty((Bsz, n_saved, Dch, N), dtype=torch.float32, device=u.device) if save else out
    h_last = empty((Bsz, Dch, N), dtype=torch.float32, device=u.device)
    cap = FWD_CONFIG["maxnreg"] if small and not is_interpreter() else None  # the interpreter takes no cap
    extra = {"maxnreg": cap} if cap else {}
    for lo in range(0, Bsz, MAX_GRID_Y):  # batches in slices the grid can hold (the slices are views)
        hi = min(Bsz, lo + MAX_GRID_Y)
        z_lo, h_lo = (z[lo:hi] if z is not None else u[lo:hi]), (h_start[lo:hi] if save else out)
        _scan_fwd[(triton.cdiv(Dch, bd), hi - lo)](
            u[lo:hi], delta[lo:hi], A, bp[lo:hi], cp[lo:hi], D if D is not None else A, z_lo,
            bias if bias is not None else A, out[lo:hi], h_lo, h_last[lo:hi], *u.stride(), *delta.stride(),
            *_strides3(z), Dch, N, L, l_pad, Dch // groups, groups,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus, SAVE=save,
            SAVE_EVERY=save_every, EVEN_D=Dch % bd == 0, FAST_LOG=_fast_log(),
            WIDE=_wide_offsets(L, l_pad * bn, u, delta, z), PACKED=packed, PAIRED=paired,
            PREP_LATE=prep_late, BD=bd, BN=bn, T=steps, num_warps=warps, **extra)
    return out, h_last, (h_start if save else None)


def _backward(u, delta, A, B4, C4, D, z, bias, softplus: bool, h_start, dout, dh_last):
    Bsz, Dch, L = u.shape
    N = A.shape[1]
    groups = B4.shape[1]
    bn = max(2, triton.next_power_of_2(N))
    bd, steps, warps = _bwd_blocks(bn, Dch // groups)
    save_every = _save_every()
    assert save_every % steps == 0, "a segment must be a whole number of the backward's chunks"
    n_saved = triton.cdiv(L, save_every)
    l_pad = n_saved * save_every  # whole segments: the last one's steps past N are read (zeros), never stored
    bp, cp = (_chunk_major(t, bn, l_pad, steps, torch.float32) for t in (B4, C4))
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
    scratch = empty((min(Bsz, MAX_GRID_Y) * n_d * (save_every // steps) * bd * bn,), **f32)
    for lo in range(0, Bsz, MAX_GRID_Y):  # batches in slices the grid can hold, as in _forward
        hi = min(Bsz, lo + MAX_GRID_Y)
        _scan_bwd[(n_d, hi - lo)](
            u[lo:hi], delta[lo:hi], A, bp[lo:hi], cp[lo:hi], D if D is not None else A,
            z[lo:hi] if z is not None else u[lo:hi], bias if bias is not None else A, dout[lo:hi], h_start[lo:hi],
            dh_last[lo:hi] if dh_last is not None else A, scratch, du[lo:hi], ddelta[lo:hi],
            dz[lo:hi] if dz is not None else du[lo:hi], da_part[lo:hi], dd_part[lo:hi] if D is not None else A,
            dbias_part[lo:hi] if bias is not None else A, dbp[lo:hi], dcp[lo:hi],
            *u.stride(), *delta.stride(), *_strides3(z), Dch, N, L, l_pad, Dch // groups, groups,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
            HAS_DH_LAST=dh_last is not None, SAVE_EVERY=save_every, FAST_LOG=_fast_log(), SHIFT=_bwd_shift(bn),
            WIDE=_wide_offsets(L, l_pad * bn, u, delta, z), BD=bd, BN=bn, T=steps, num_warps=warps, **extra)
    # chunk-major [B, G, l_pad / T, BN, T] back to [B, G, n, N]
    db, dc = (t.transpose(3, 2).reshape(Bsz, groups, bn, l_pad)[:, :, :N, :L] for t in (dbp, dcp))
    return (du, ddelta, dz, da_part.sum(0), dd_part.sum(0) if D is not None else None, db, dc,
            dbias_part.sum(0) if bias is not None else None)


def _work(t: torch.Tensor | None) -> torch.Tensor | None:
    # the small per-channel parameters (A, D, delta_bias) go to the kernels as contiguous float32
    return t.float().contiguous() if t is not None else None


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, softplus):
        ctx.set_materialize_grads(False)
        B4, C4 = _bc_view(B)[0], _bc_view(C)[0]
        Af, Df, bf = _work(A), _work(D), _work(bias)
        with on_device_of(u):
            out, h_last, h_start = _forward(u, delta, Af, B4, C4, Df, z, bf, softplus, save=any(ctx.needs_input_grad))
        ctx.save_for_backward(u, delta, Af, B4, C4, Df, z, bf, h_start)
        ctx.graph_inputs = (u, delta, A, B, C, D, z, bias)  # for once_differentiable (no data is read from them)
        ctx.softplus, ctx.b_dim = softplus, B.dim()
        ctx.dtypes = [t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, bias)]
        return out, h_last

    @staticmethod
    @once_differentiable  # the Triton backward is not itself differentiable: double backward raises
    def backward(ctx, dout, dh_last):
        u, delta, Af, B4, C4, Df, z, bf, h_start = ctx.saved_tensors
        # dout in its own dtype (the kernel reads it as float32); du, ddelta, dz come out in their inputs' dtypes
        dout = dout.contiguous() if dout is not None else torch.zeros(u.shape, device=u.device)
        dh_last = dh_last.float().contiguous() if dh_last is not None else None
        with on_device_of(u):
            du, ddelta, dz, da, dd, db, dc, dbias = _backward(u, delta, Af, B4, C4, Df, z, bf, ctx.softplus,
                                                              h_start, dout, dh_last)
        if ctx.b_dim == 3:
            db, dc = db[:, 0], dc[:, 0]
        grads = (du, ddelta, da, db, dc, dd, dz, dbias)
        return (*(g.to(t) if g is not None else None for g, t in zip(grads, ctx.dtypes)), None)


def check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    # shapes in the book's symbols: length N, state size n (the code's L and N)
    check_tensor("u", u, ndim=3, shape_hint="[B, D, N]")
    bsz, dch, length = u.shape
    check_tensor("delta", delta, ndim=3, shape_hint="[B, D, N]")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape [B, D, N] = {tuple(u.shape)}, got {tuple(delta.shape)}")
    check_tensor("A", A, ndim=2, shape_hint="[D, n] (real)")
    if A.shape[0] != dch or not 1 <= A.shape[1] <= MAX_STATE:
        raise ValueError(f"A must be [D, n] with D = {dch} and 1 <= n <= {MAX_STATE}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        check_tensor(name, t, shape_hint="[B, n, N] or [B, G, n, N]")
        if t.dim() == 3 and t.shape != (bsz, n, length):
            raise ValueError(f"{name} must be [B, n, N] = {(bsz, n, length)} or [B, G, n, N], got {tuple(t.shape)}")
        if t.dim() == 4 and (t.shape[0] != bsz or t.shape[2:] != (n, length) or t.shape[1] == 0
                             or dch % t.shape[1]):
            raise ValueError(f"{name} must be [B, G, n, N] with B = {bsz}, n = {n}, N = {length} and G dividing "
                             f"D = {dch}, got {tuple(t.shape)}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be input-dependent, [B, n, N] or [B, G, n, N] (a constant [D, n] "
                             f"{name} is not supported), got {tuple(t.shape)}")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, t, shape in (("D", D, (dch,)), ("delta_bias", delta_bias, (dch,)), ("z", z, tuple(u.shape))):
        if t is not None:
            check_tensor(name, t)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=None, return_final_state=None):
    """Mamba's selective scan (``mamba_ssm.selective_scan_fn``'s arguments and semantics).

    u, delta, z ``[B, D, N]`` (N the sequence length); real A ``[D, n]`` (n the state size,
    n <= 256); B, C ``[B, n, N]`` or grouped ``[B, G, n, N]`` (channel d reads group d // (D/G)); D and
    delta_bias ``[D]``. The step is delta + delta_bias, passed through softplus when
    ``delta_softplus``. Returns ``out`` in u's dtype, or, with ``return_final_state=True``,
    ``(out, last_state)`` with the float32 state ``[B, D, n]`` after the last step;
    ``return_last_state`` (mamba_ssm's name) is an alias of ``return_final_state``, kept working
    (giving both with different values raises ValueError). The scan runs in Triton with delta_bias,
    softplus, D and the z gate fused in (forward and backward, float32 inside); every input gets a
    gradient (once: the backward is not differentiable, and differentiating the gradients again
    raises). The gradients of B and C are sums over channels added atomically in float32, so they
    can differ in the last bits from run to run. N = 0, B = 0 or D = 0 gives zeros (and a zero state).
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    check_flag("delta_softplus", delta_softplus)
    return_last_state = final_state_flag("return_last_state", return_last_state, return_final_state)
    if u.shape[-1] == 0 or u.shape[0] == 0 or u.shape[1] == 0:  # nothing to scan: zeros, kept in the graph
        ins = (u, delta, A, B, C, D, z, delta_bias)
        last = keep_in_graph(torch.zeros(u.shape[0], *A.shape, device=u.device), *ins)
        out = keep_in_graph(u.new_zeros(u.shape), *ins)
        return (out, last) if return_last_state else out
    out, last = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out
