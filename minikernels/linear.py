"""Chapter 3: causal linear attention with an optional per-step decay.

    S_t = exp(g_t) S_{t-1} + phi(k_t) v_t^T        (state [Dk, Dv], one per batch and head)
    o_t = phi(q_t)^T S_t                            (no scale factor is applied)

with, when ``normalize`` is set, o_t divided by phi(q_t)^T z_t, z_t = exp(g_t) z_{t-1} + phi(k_t).
``g`` is a log-decay (<= 0; None means no decay).

This module holds what the chapter derives, in PyTorch: the feature maps (defined, with the input
checks, in ``minikernels.feature_maps``, which the Triton-free oracle imports too; exported here as
well), and the *parallel* (masked, quadratic) and *chunked* (intra-chunk quadratic, inter-chunk
recurrent, as in Lightning Attention-2) forms of the recurrence that ``mk.reference.linear_attention``
runs step by step; and ``linear_attention``, the chunked form in Triton (forward and backward).

The kernels follow the chunked form in two passes, as flash-linear-attention does: a short
sequential pass finds the state each chunk starts from, then every chunk is computed at once.
Per chunk c of C steps (b_t = the log-decays summed from the chunk's start, inclusive; b_C the
chunk's total; M[t, s] = exp(b_t - b_s) for s <= t, else 0; S_c the state entering chunk c; dS_c
the gradient of the state leaving it):

    _la_states  (sequential):  S_{c+1} = exp(b_C) S_c + (K * exp(b_C - b))^T V, S_c stored
                               (in segments chained by _la_carry when it has few programs)
    _la_out     (parallel):    O_c  = (Q K^T * M) V + exp(b) Q S_c
    _la_dstates (sequential, in reverse):  dS_{c-1} = exp(b_C) dS_c + (Q * exp(b))^T dO, dS_c stored
                               (in segments chained by _la_carry when it has few programs)
    _la_dv      (parallel):    dV_c = (Q K^T * M)^T dO + exp(b_C - b) K dS_c
    _la_dqdk    (parallel, two launches):  dQ_c = (dO V^T * M) K + exp(b) dO S_c^T
                                           dK_c = (dO V^T * M)^T Q + exp(b_C - b) V dS_c^T

With per-step value weights w (how mk.ssd passes its step sizes), the values are w_t v_t: the
forward folds w into the factor exp(b_C - b) of the state update and into the columns of
Q K^T * M; the backward weights V's rows as it loads them, and _la_dv turns the gradient of w_t v_t
into those of v_t and w_t. With a rate a_h besides (mk.ssd's A), the log-decay is g_t = w_t a_h,
and _la_rate_grads folds g's gradient into w's and a's. Q and K may have one head that every head
reads (mk.ssd's C and B): _la_dqdk then takes several heads a program, loads its Q and K once, and
sums their gradients over the heads. The weighted forward (when Dk <= 128 and its tiles fit in
shared memory) needs no stored states: _la_fused walks the chunks once with the state in registers
and writes O_c as it goes, the sequence cut into segments
whose starting states come from a walk that stores nothing but each segment's end (_la_states) and
_la_carry. Its backward can do the same in reverse: _la_dfused walks the chunks from the last with
dS in registers and writes dV_c as it goes (_la_dstates and _la_dv in one pass), in segments chained
the same way (_la_dstates storing only each segment's part, then _la_carry); it is taken where the
separate reverse pass would be cut into segments too (few programs), and measured slower elsewhere.

The states cost B*H*(N/C)*Dk*Dv values of memory, and buy parallelism over chunks: the sequential
passes do one small product per chunk, the rest runs on every chunk at once. When a gradient will
be needed, the forward keeps them for the backward (the one walk then writes them too), rather than
the backward walking the sequence again to recompute them.

The decay's gradient comes from the same identity inside each chunk: o depends on b through
q~ = e^b q and k~ = e^-b k, and on b_C through S_{c+1}, so dL/db_t = q_t . dq_t - k_t . dk_t plus
<dS_c, S_{c+1}> for b_C; dL/dg_t is the sum of these from t to the chunk's end. (Summed over the
whole sequence instead, the rounding errors of q.dq - k.dk pile up with its length.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._alloc import empty
from ._backend import dot_options, is_interpreter, on_device_of
from ._validate import check_same_device, check_tensor
from .feature_maps import (  # noqa: F401  (re-exported: linear.apply_feature_map etc. are public)
    FEATURE_MAPS,
    _normalized,
    apply_feature_map,
    check_linear_attention_inputs,
    final_state_flag,
    keep_in_graph,
    mapped_features,
    once_differentiable,
    taylor_features,
)
from .flash import _compute_dtype


def _states_shape(q_feat: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    return (*q_feat.shape[:2], q_feat.shape[-1], v.shape[-1])


def parallel_form(q, k, v, decay=None, feature_map=None, normalize=False, initial_state=None,
                  return_state=None, return_final_state=None):
    """All outputs at once: O = ((phi(Q) phi(K)^T) * M) V with the causal decay mask
    M[t, s] = exp(G_t - G_s) for s <= t (G the cumulative log-decay), plus exp(G_t) phi(q_t)^T S_0.
    Quadratic in N, like softmax attention, but with no softmax. ``return_final_state`` (or its alias
    ``return_state``) returns ``(out, final_state)``, as ``linear_attention``."""
    return_state = final_state_flag("return_state", return_state, return_final_state)
    check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state)
    qf, kf = mapped_features(q, k, feature_map)
    n = q.shape[2]
    g = decay if decay is not None else q.new_zeros(q.shape[:3])
    cum = g.cumsum(-1)  # G_t
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    # mask *before* exp: above the diagonal G_t - G_s > 0 could overflow
    mask = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
    a = (qf @ kf.transpose(-1, -2)) * mask
    o = a @ v
    s0 = initial_state if initial_state is not None else q.new_zeros(_states_shape(qf, v))
    o = o + torch.exp(cum)[..., None] * (qf @ s0)
    if normalize:
        o = _normalized(o, a.sum(-1, keepdim=True))
    if not return_state:
        return o
    w = torch.exp(cum[..., -1:] - cum)[..., None] * kf  # how much of step s survives to the end
    return o, torch.exp(cum[..., -1])[..., None, None] * s0 + w.transpose(-1, -2) @ v


def chunked_form(q, k, v, decay=None, feature_map=None, normalize=False, chunk_size=64, initial_state=None,
                 return_state=None, return_final_state=None):
    """Lightning Attention-2's split: inside a chunk of C steps, the parallel form (C^2 work); between
    chunks, the state S carried by the recurrence. Cost O(N C d + N d^2) instead of O(N^2 d).
    Log-decays are summed inside each chunk only, so exp never sees more than C steps of decay.
    ``return_final_state`` (or its alias ``return_state``) returns ``(out, final_state)``."""
    return_state = final_state_flag("return_state", return_state, return_final_state)
    check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    qf, kf = mapped_features(q, k, feature_map)
    n = q.shape[2]
    g = decay if decay is not None else q.new_zeros(q.shape[:3])
    state = initial_state if initial_state is not None else q.new_zeros(_states_shape(qf, v))
    z = q.new_zeros(qf.shape[:2] + qf.shape[-1:])  # the normalizer's state
    outs = []
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))
        qc, kc, vc, cum = qf[:, :, sl], kf[:, :, sl], v[:, :, sl], g[:, :, sl].cumsum(-1)
        c = cum.shape[-1]
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        mask = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
        a = (qc @ kc.transpose(-1, -2)) * mask
        inter = torch.exp(cum)[..., None] * qc  # phi(q_t) decayed back to the chunk's start
        o = a @ vc + inter @ state  # intra-chunk + what the earlier chunks left in the state
        if normalize:
            o = _normalized(o, a.sum(-1, keepdim=True) + (inter * z[..., None, :]).sum(-1, keepdim=True))
        outs.append(o)
        w = torch.exp(cum[..., -1:] - cum)[..., None] * kc
        state = torch.exp(cum[..., -1])[..., None, None] * state + w.transpose(-1, -2) @ vc
        z = torch.exp(cum[..., -1])[..., None] * z + w.sum(-2)
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
    return (o, state) if return_state else o


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _chunk_cumsum(G, g_base, stride_gn, rows, row_ok, C: tl.constexpr, HAS_DECAY: tl.constexpr):
    # b_t: the log-decays summed from the chunk's start, inclusive; b_C: the chunk's total
    if HAS_DECAY:
        g = tl.load(G + g_base + rows * stride_gn, mask=row_ok, other=0.0).to(tl.float32)  # padding: 0
        # a log-decay of -inf (a hard reset) must not make -inf - -inf = NaN below; exp(-80) ~ 2e-35 still
        # forgets everything, and keeps b_t - b_s exact to ~1e-5 (a clamp at -1e4 would lose 1e-3 to rounding).
        # A NaN must stay NaN (max.NaN, one instruction as the plain max): clamped, it would act as a reset
        g = tl.maximum(g, -80.0, propagate_nan=tl.PropagateNan.ALL)
        return tl.cumsum(g, 0), tl.sum(g, 0)
    return tl.zeros([C], tl.float32), 0.0


@triton.jit
def _decay_mask(b, C: tl.constexpr, TRANSPOSED: tl.constexpr):
    # exp(b_t - b_s) for s <= t at [t, s] (or at [s, t] when TRANSPOSED), 0 elsewhere; masked before
    # exp, since above the diagonal b_t - b_s > 0 could overflow
    offs = tl.arange(0, C)
    if TRANSPOSED:
        return tl.exp(tl.where(offs[:, None] <= offs[None, :], b[None, :] - b[:, None], float("-inf")))
    return tl.exp(tl.where(offs[:, None] >= offs[None, :], b[:, None] - b[None, :], float("-inf")))


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
        b, b_last = _chunk_cumsum(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
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
    b, b_last = _chunk_cumsum(G, b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh, stride_gn,
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
    a = a * _decay_mask(b, C, False)
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
        b, b_last = _chunk_cumsum(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
        a = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * _decay_mask(b, C, False)
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
        b, b_last = _chunk_cumsum(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
        q_in = (q * tl.exp(b)[:, None]).to(q.dtype)  # q decayed back to the chunk's start
        dS = dS * tl.exp(b_last) + tl.dot(tl.trans(q_in), do, input_precision=DOT_PREC)
        log_decay += b_last
    if STORE_FINAL:
        tl.store(S_OUT + seg_state + tile, dS, mask=tile_ok)
    if STORE_DECAY:
        if (ik == 0) & (iv == 0):  # one program per segment writes its decay
            tl.store(LOG_DECAY + bh * n_seg + n_seg - 1 - seg, log_decay)


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
    b, b_last = _chunk_cumsum(G, b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh, stride_gn,
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
    at = at * _decay_mask(b, C, True)
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
        b, b_last = _chunk_cumsum(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
        # A^T = K Q^T as its own product, not a transposed Q K^T (see _la_dv)
        at = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * _decay_mask(b, C, True)
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
        b, b_last = _chunk_cumsum(G, b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh, stride_gn,
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
        a = a * _decay_mask(b, C, not FOR_Q)
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


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------

CHUNK_SIZES = (16, 32, 64, 128)
MAX_FEATURE_DIM = 1024


def check_chunk_size(chunk_size) -> None:
    # the kernels' chunk is a tile of tl.dot and a constexpr: one of a few powers of two
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int, one of {CHUNK_SIZES}, got {type(chunk_size).__name__}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")


def _block(d: int, most: int) -> int:
    return max(16, min(most, triton.next_power_of_2(d)))  # at least 16: tl.dot's smallest tile


def _launch_opts(dtype, num_warps: int = 4, num_stages: int = 2, maxnreg: int | None = None) -> dict:
    # maxnreg: a cap on registers a thread, applied to 16-bit inputs only (float32 tiles hold twice
    # the bytes and would spill under it)
    opts = {"num_warps": num_warps, "num_stages": 1 if is_interpreter() else num_stages}
    if maxnreg is not None and not is_interpreter() and torch.empty((), dtype=dtype).element_size() == 2:
        opts["maxnreg"] = maxnreg
    return {**opts, **dot_options(dtype)}


def _tile_opts(dtype, cfg: dict, num_warps: int | None = None) -> dict:
    # the launch options of one of FWD_TILES' or BWD_TILES' entries (a register cap where it names one)
    return _launch_opts(dtype, num_warps or cfg["num_warps"], cfg["num_stages"], cfg.get("maxnreg"))


# The forward's tiles: the largest Dk and Dv blocks of each pass, its warps and its pipeline depth
# (the states it stores for the backward come from this state pass). The state pass is a chain of
# dependent steps, bound by the latency of its loads rather than by bandwidth: a 3-deep pipeline
# hides them, and a cap of 128 registers a thread lets more of its programs share an SM (lower
# caps spill). The output pass takes 3 stages without a decay and with value weights, 2 with a
# decay, and no register cap. Chosen by sweeps on the H200, recorded in the engineering notes
# (book/notes/linear_attention.md).
FWD_TILES = {"states": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 3, "maxnreg": 128},
             "out": {"BK": 64, "BV": 128, "num_warps": 4, "num_stages": 3},
             "out_decay": {"BK": 64, "BV": 128, "num_warps": 4, "num_stages": 2},
             "out_weighted": {"BK": 64, "BV": 128, "num_warps": 4, "num_stages": 3},
             "fused": {"BV": 64, "num_warps": 4, "num_stages": 2}}
# The weighted forward (mk.ssd's) walks the chunks once with the state in registers (_la_fused)
# when the whole of Dk fits one tile: no chunk states go through memory, and for SSD's shapes it is
# faster than the two passes (_la_states and _la_out). Only the weighted forward was measured, so
# only it takes this path. Its tiles ("fused") keep 2 stages: with 1, Triton 3.6 computed wrong
# bf16 outputs at BV = 32. The measurements are in book/notes/linear_attention.md.
FUSED_MAX_DK = 128


def _per_step_args(g, q):
    # (tensor, strides, present) for the kernels, of a [B, H, N] input: the log-decay or the value
    # weights; a dummy when there is none
    if g is None:
        return q, (0, 0, 0), False
    return g, g.stride(), True


def _chunk_states(k, v, g, s0, chunk: int, want_final: bool, w=None):
    """The state each chunk starts from, [B*H, NT, Dk, Dv] in the inputs' dtype, and the final state
    (float32); with value weights w [B, H, N], of the values w_t v_t. The sequential pass splits the
    state into blocks of FWD_TILES["states"], one program each; when those are fewer than the SMs (as
    in SSD at batch 1), it also splits the sequence into segments (_segments)."""
    B, H, N, DK = k.shape
    DV = v.shape[-1]
    nt = triton.cdiv(N, chunk)
    bk, bv = _block(DK, FWD_TILES["states"]["BK"]), _block(DV, FWD_TILES["states"]["BV"])
    sms = _sm_count(k)
    n_seg = _segments(triton.cdiv(DK, bk) * triton.cdiv(DV, bv) * B * H, nt, sms)
    # Too short to cut into segments, and still too few programs: split the state finer
    while n_seg == 1 and triton.cdiv(DK, bk) * triton.cdiv(DV, bv) * B * H < sms and max(bk, bv) > 32:
        bk, bv = (bk // 2, bv) if bk >= bv else (bk, bv // 2)
    seg_chunks = triton.cdiv(nt, n_seg)  # nt >= 1: linear_attention returns before any kernel when N == 0
    n_seg = triton.cdiv(nt, seg_chunks)  # as the kernel counts them
    hs = empty((B * H, nt, DK, DV), dtype=k.dtype, device=k.device)
    gt, gs, has_decay = _per_step_args(g, k)
    wt, ws, has_w = _per_step_args(w, k)
    grid = (triton.cdiv(DK, bk), triton.cdiv(DV, bv), B * H * n_seg)
    args = (*k.stride(), *v.stride(), *gs, *ws, H, N, DK, DV, nt, seg_chunks)
    opts = _states_opts(k, has_decay, has_w, chunk, bk, bv)
    if n_seg == 1:
        s_end = empty((B, H, DK, DV), dtype=torch.float32, device=k.device) if want_final else hs
        _la_states[grid](k, v, gt, wt, s0 if s0 is not None else hs, hs, s_end, hs, *args, HAS_S_IN=s0 is not None,
                         STORE_STATES=True, STORE_FINAL=want_final, STORE_DECAY=False, **opts)
        return hs, (s_end if want_final else None)
    # 1.-2. the state each segment starts from; 3. each segment again from it, writing HS
    carry, s_end = _segment_starts(k, v, g, s0, w, chunk, seg_chunks, n_seg, bk, bv, want_final)
    _la_states[grid](k, v, gt, wt, carry, hs, hs, hs, *args, HAS_S_IN=True, STORE_STATES=True, STORE_FINAL=False,
                     STORE_DECAY=False, **opts)
    return hs, s_end


def _sm_count(t: torch.Tensor) -> int:
    return 1 if is_interpreter() else torch.cuda.get_device_properties(t.device).multi_processor_count


def _states_opts(k, has_decay: bool, has_w: bool, chunk: int, bk: int, bv: int) -> dict:
    cfg = FWD_TILES["states"]
    return dict(HAS_DECAY=has_decay, HAS_W=has_w, C=chunk, BK=bk, BV=bv, **_tile_opts(k.dtype, cfg))


def _segment_starts(k, v, g, s0, w, chunk: int, seg_chunks: int, n_seg: int, bk: int, bv: int, want_final: bool):
    """The state each of n_seg segments of seg_chunks chunks starts from, [B*H, n_seg, Dk, Dv] float32,
    and, with want_final, the final state (else None): 1. each segment's own end state, from zeros, in
    parallel (_la_states, storing no chunk states; without want_final, the last segment's is not
    needed); 2. a sequential pass over the segments:
    carry_{g+1} = exp(log-decay of segment g) carry_g + end_g, from carry_0 = s0 (_la_carry)."""
    B, H, N, DK = k.shape
    DV = v.shape[-1]
    gt, gs, has_decay = _per_step_args(g, k)
    wt, ws, has_w = _per_step_args(w, k)
    n_ends = n_seg if want_final else n_seg - 1
    seg_end = empty((B * H, n_ends, DK, DV), dtype=torch.float32, device=k.device)
    carry = empty((B * H, n_seg, DK, DV), dtype=torch.float32, device=k.device)
    s_end = empty((B, H, DK, DV), dtype=torch.float32, device=k.device) if want_final else carry
    log_decay = empty((B * H, n_ends), dtype=torch.float32, device=k.device)
    # the kernel walks n_ends * seg_chunks chunks: the segments before the last, or all of them
    _la_states[(triton.cdiv(DK, bk), triton.cdiv(DV, bv), B * H * n_ends)](
        k, v, gt, wt, seg_end, seg_end, seg_end, log_decay, *k.stride(), *v.stride(), *gs, *ws,
        H, N, DK, DV, min(triton.cdiv(N, chunk), n_ends * seg_chunks), seg_chunks, HAS_S_IN=False,
        STORE_STATES=False, STORE_FINAL=True, STORE_DECAY=has_decay, **_states_opts(k, has_decay, has_w, chunk, bk, bv))
    block = 1024
    _la_carry[(triton.cdiv(DK * DV, block), B * H)](
        seg_end, log_decay, s0 if s0 is not None else seg_end, carry, s_end, DK * DV, n_ends, n_seg,
        HAS_DECAY=has_decay, HAS_S0=s0 is not None, STORE_FINAL=want_final, BLOCK=block)
    return carry, (s_end if want_final else None)


def _segments(programs: int, n_chunks: int, sms: int) -> int:
    # How many pieces to cut the sequence into for the state pass. Its steps depend on each other,
    # so with few programs it waits on each step's loads in turn; with fewer programs than SMs,
    # segments of at least 16 chunks each run in parallel, until there are about 8 programs an SM.
    # Each segment is then walked twice (its end state from zeros; then from the carried state),
    # plus a short pass over the segments: twice the reads, far fewer dependent steps in a row.
    if is_interpreter():  # the CPU tests: segments whenever there are two of at least 2 chunks
        return 2 if n_chunks >= 4 else 1
    n_seg = 1
    if programs < sms:
        while programs * n_seg * 2 <= 8 * sms and n_chunks // (n_seg * 2) >= 16:
            n_seg *= 2
    return n_seg


def _fused_segments(programs: int, n_chunks: int, sms: int) -> int:
    # How many segments the one-walk forward cuts the sequence into: its programs hold the whole
    # state and its products (255 registers a thread on the H200), so 2 of them fit an SM; segments
    # of at least 16 chunks are added until the programs fill the SMs once (the sweep that chose
    # this rule is in book/notes/linear_attention.md).
    if is_interpreter():  # the CPU tests: segments whenever there are two of at least 2 chunks
        return 2 if n_chunks >= 4 else 1
    n_seg = 1
    while programs * n_seg * 2 <= 2 * sms and n_chunks // (n_seg * 2) >= 16:
        n_seg *= 2
    return n_seg


def _max_shared_memory(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _max_shared_memory_of(index)


@functools.cache
def _max_shared_memory_of(device_index: int) -> int:
    # the most shared memory one program may opt in to (227 KB on the H200)
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _fused_fits(q, v, chunk: int, cfg: dict, value_tiles: int = 1) -> bool:
    # The walk's shared memory (cfg: its tiles, FWD_TILES["fused"] or BWD_TILES["dfused"]): num_stages
    # copies of a chunk's Q and K ([C, Dk]) and value_tiles [C, BV] tiles (V; dO and V backwards),
    # and the state's copy for the product. This estimate is a little above what Triton allocates,
    # so it errs on the side of the two passes. float32 with chunks of 128 and Dk = 128 needs 296 KB,
    # more than the H200's 227 KB a program: those take the two passes.
    if is_interpreter():
        return True
    bk, bv, size = _block(q.shape[-1], FUSED_MAX_DK), _block(v.shape[-1], cfg["BV"]), q.element_size()
    need = cfg["num_stages"] * chunk * (2 * bk + value_tiles * bv) * size + bk * bv * size
    return need <= _max_shared_memory(q.device)


def _fused_forward(q, k, v, g, s0, chunk: int, out_dtype: torch.dtype, w=None, keep_states: bool = False):
    """The forward without the chunks' states in memory (_la_fused), for Dk <= FUSED_MAX_DK: the
    sequence is cut into segments (_fused_segments); the state each starts from comes from
    _segment_starts, and each is then walked once, outputs written on the way. With keep_states,
    the walk also writes the state each chunk starts from, for the backward (else None)."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    nt = triton.cdiv(N, chunk)
    cfg = FWD_TILES["fused"]
    bv = _block(DV, cfg["BV"])
    n_seg = _fused_segments(triton.cdiv(DV, bv) * B * H, nt, _sm_count(q))
    seg_chunks = triton.cdiv(nt, n_seg)
    n_seg = triton.cdiv(nt, seg_chunks)  # as the kernel counts them
    o = empty((B, H, N, DV), dtype=out_dtype, device=q.device)
    s_in = s0
    if n_seg > 1:  # (the last segment's walk writes the final state)
        s_in, _ = _segment_starts(k, v, g, s0, w, chunk, seg_chunks, n_seg, _block(DK, FWD_TILES["states"]["BK"]),
                                  _block(DV, FWD_TILES["states"]["BV"]), want_final=False)
    s_end = empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    hs = empty((B * H, nt, DK, DV), dtype=q.dtype, device=q.device) if keep_states else None
    gt, gs, has_decay = _per_step_args(g, q)
    wt, ws, has_w = _per_step_args(w, q)
    _la_fused[(triton.cdiv(DV, bv), B * H * n_seg)](
        q, k, v, gt, wt, s_in if s_in is not None else o, o, s_end, hs if keep_states else o,
        *q.stride(), *k.stride(), *v.stride(), *gs, *ws, *o.stride(), H, N, DK, DV, nt, seg_chunks,
        HAS_DECAY=has_decay, HAS_W=has_w, HAS_S_IN=s_in is not None, STORE_FINAL=True, STORE_STATES=keep_states,
        C=chunk, BK=_block(DK, FUSED_MAX_DK), BV=bv, **_tile_opts(q.dtype, cfg))
    return o, s_end, hs


def _forward(q, k, v, g, s0, chunk: int, out_dtype: torch.dtype, w=None, keep_states: bool = False):
    """(outputs, final state, the state each chunk starts from if keep_states else None)."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    if w is not None and DK <= FUSED_MAX_DK and _fused_fits(q, v, chunk, FWD_TILES["fused"]):
        return _fused_forward(q, k, v, g, s0, chunk, out_dtype, w=w, keep_states=keep_states)
    hs, s_end = _chunk_states(k, v, g, s0, chunk, want_final=True, w=w)
    o = empty((B, H, N, DV), dtype=out_dtype, device=q.device)
    cfg = FWD_TILES["out_weighted" if w is not None else "out_decay" if g is not None else "out"]
    bk, bv = _block(DK, cfg["BK"]), _block(DV, cfg["BV"])
    warps = cfg["num_warps"] if bv * chunk >= 8192 else 4  # 4 warps are enough for small tiles
    gt, gs, has_decay = _per_step_args(g, q)
    wt, ws, has_w = _per_step_args(w, q)
    _la_out[(triton.cdiv(N, chunk), triton.cdiv(DV, bv), B * H)](
        q, k, v, gt, wt, hs, o, *q.stride(), *k.stride(), *v.stride(), *gs, *ws, *o.stride(), H, N, DK, DV,
        hs.shape[1], HAS_DECAY=has_decay, HAS_W=has_w, C=chunk, BK=bk, BV=bv,
        **_tile_opts(q.dtype, cfg, num_warps=warps))
    return o, s_end, (hs if keep_states else None)


# The backward's tiles; "dqdk_heads": how many heads a program of _la_dqdk takes when Q and K are
# shared by several (mk.ssd's groups): the largest divisor of the group's heads up to this. _la_dqdk
# runs fastest with 4 warps and Dk blocks of 128. "dsegments" (the reverse pass that finds each
# segment's own part) takes the forward state pass's 3 stages and cap of 128 registers a thread,
# and "dv_weighted" (_la_dv with value weights) the cap; linear attention's backward (no value
# weights) was not measured with a cap, so "dv" has none. Chosen by sweeps on the H200; the numbers,
# and the designs tried and dropped (one launch for dQ and dK; SSD's rate folded into _la_dqdk's
# epilogue), are in book/notes/linear_attention.md.
BWD_TILES = {"dstates": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2},
             "dsegments": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 3, "maxnreg": 128},
             "dfused": {"BV": 64, "num_warps": 4, "num_stages": 2},
             "dv": {"BK": 64, "BV": 128, "num_warps": 8, "num_stages": 2},
             "dv_weighted": {"BK": 64, "BV": 128, "num_warps": 8, "num_stages": 2, "maxnreg": 128},
             "dqdk": {"BK": 128, "BV": 64, "num_warps": 4, "num_stages": 2},
             "dqdk_heads": 32}


# _la_dqdk unrolls its loop over Dv blocks up to this many (mk.ssd has 1, linear attention with
# Dv = 128 has 2), for 16-bit inputs: an unrolled loop's tiles take shared memory for every block
# (inside the pipelined loop over heads, each block's tiles get buffers of their own), and float32
# tiles hold twice the bytes. Beyond it, a loop, whose shared memory does not grow with the number of
# blocks. Where even that does not fit (mk.ssd's float32 at chunks of 128), _launch_fitting halves
# the Dk block. The shared memory each case takes is in book/notes/linear_attention.md.
DQDK_UNROLL_V = 2

# The block sizes _launch_fitting had to halve to, by launch configuration and first block.
_FITTED_BLOCKS: dict = {}


def _launch_fitting(key, block: int, launch):
    """launch(block), with the block halved (down to 16) while the compiled kernel asks for more
    shared memory than one program may have on this GPU (on the H200, mk.ssd's float32 backward at
    chunks of 128; see DQDK_UNROLL_V). Triton raises OutOfResources before the kernel runs. A halved
    block is remembered under (key, block), so later calls start from it."""
    start = block
    block = _FITTED_BLOCKS.get((key, start), start)
    while True:
        try:
            out = launch(block)
        except triton.runtime.errors.OutOfResources:
            if block <= 16:
                raise
            block //= 2
            continue
        if block < start:
            _FITTED_BLOCKS[(key, start)] = block
        return out


def _heads_per_program(per: int, most: int) -> int:
    return max(d for d in range(1, min(per, most) + 1) if per % d == 0)


def _reverse_segment_starts(q, do, g, ds_end, chunk: int, seg_chunks: int, n_seg: int):
    """For the reverse walk in n_seg segments: the gradient of the state at each segment's end,
    [B*H, n_seg, Dk, Dv] float32 (numbered from the sequence's end), and of the initial state: each
    segment's own part from zeros, in parallel (_la_dstates), then chained in reverse from ds_end
    (_la_carry), as _segment_starts does forwards."""
    B, H, N, DK = q.shape
    DV = do.shape[-1]
    cfg = BWD_TILES["dsegments"]
    bk, bv = _block(DK, cfg["BK"]), _block(DV, cfg["BV"])
    gt, gs, has_decay = _per_step_args(g, q)
    seg_part = empty((B * H, n_seg, DK, DV), dtype=torch.float32, device=q.device)
    log_decay = empty((B * H, n_seg), dtype=torch.float32, device=q.device)
    _la_dstates[(triton.cdiv(DK, bk), triton.cdiv(DV, bv), B * H * n_seg)](
        q, do, gt, seg_part, seg_part, seg_part, log_decay, *q.stride(), *do.stride(), *gs, H, N, DK, DV,
        triton.cdiv(N, chunk), seg_chunks, HAS_DECAY=has_decay, HAS_S_IN=False, STORE_STATES=False, STORE_FINAL=True,
        STORE_DECAY=has_decay, C=chunk, BK=bk, BV=bv, **_tile_opts(q.dtype, cfg))
    s_in = empty((B * H, n_seg, DK, DV), dtype=torch.float32, device=q.device)
    ds0 = empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    block = 1024
    _la_carry[(triton.cdiv(DK * DV, block), B * H)](
        seg_part, log_decay, ds_end if ds_end is not None else seg_part, s_in, ds0, DK * DV, n_seg, n_seg,
        HAS_DECAY=has_decay, HAS_S0=ds_end is not None, STORE_FINAL=True, BLOCK=block)
    return s_in, ds0


def _state_grad_segments(q, dv: int, chunk: int) -> int:
    # how many segments _state_grads' reverse walk takes (_segments, for its programs)
    B, H, N, DK = q.shape
    cfg = BWD_TILES["dstates"]
    programs = triton.cdiv(DK, _block(DK, cfg["BK"])) * triton.cdiv(dv, _block(dv, cfg["BV"])) * B * H
    return _segments(programs, triton.cdiv(N, chunk), _sm_count(q))


def _state_grads(q, do, g, ds_end, chunk: int, dtype: torch.dtype):
    """The gradient of the state leaving each chunk, [B*H, NT, Dk, Dv] in dtype, and of the initial
    state (float32): the reverse walk of _la_dstates, in segments when its programs are fewer than
    the SMs (as _chunk_states does: each segment's own part from zeros, chained in reverse by
    _la_carry from ds_end, then each segment walked again from its carry)."""
    B, H, N, DK = q.shape
    DV = do.shape[-1]
    nt = triton.cdiv(N, chunk)
    cfg = BWD_TILES["dstates"]
    bk, bv = _block(DK, cfg["BK"]), _block(DV, cfg["BV"])
    grid_state = (triton.cdiv(DK, bk), triton.cdiv(DV, bv))
    seg_chunks = triton.cdiv(nt, _state_grad_segments(q, DV, chunk))
    n_seg = triton.cdiv(nt, seg_chunks)
    gt, gs, has_decay = _per_step_args(g, q)
    dhs = empty((B * H, nt, DK, DV), dtype=dtype, device=q.device)
    s_in = ds_end
    if n_seg > 1:
        s_in, ds0 = _reverse_segment_starts(q, do, g, ds_end, chunk, seg_chunks, n_seg)
    else:
        ds0 = empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    _la_dstates[(*grid_state, B * H * n_seg)](
        q, do, gt, s_in if s_in is not None else ds0, dhs, ds0, ds0, *q.stride(), *do.stride(), *gs, H, N, DK, DV,
        nt, seg_chunks, HAS_DECAY=has_decay, HAS_S_IN=s_in is not None, STORE_STATES=True, STORE_FINAL=n_seg == 1,
        STORE_DECAY=False, C=chunk, BK=bk, BV=bv, **_tile_opts(q.dtype, cfg))
    return dhs, ds0


def _fused_state_and_value_grads(q, k, v, g, w, do, ds_end, chunk: int, dtype: torch.dtype):
    """_state_grads and the values' gradients in one reverse walk (_la_dfused), for Dk <= FUSED_MAX_DK
    and value weights w: (dhs, ds0, dv, the partial sums of w's gradient [Dv blocks, B*H, N]). The
    sequence is cut into segments as the one-walk forward's (_fused_segments)."""
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    nt = triton.cdiv(N, chunk)
    cfg = BWD_TILES["dfused"]
    bv = _block(DV, cfg["BV"])
    nv = triton.cdiv(DV, bv)
    n_seg = _fused_segments(nv * B * H, nt, _sm_count(q))
    seg_chunks = triton.cdiv(nt, n_seg)
    n_seg = triton.cdiv(nt, seg_chunks)  # as the kernel counts them
    if n_seg > 1:
        s_in, ds0 = _reverse_segment_starts(q, do, g, ds_end, chunk, seg_chunks, n_seg)
    else:
        s_in, ds0 = ds_end, empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    dhs = empty((B * H, nt, DK, DV), dtype=dtype, device=q.device)
    dv = empty(v.shape, dtype=v.dtype, device=q.device)  # contiguous
    dw_part = empty((nv, B * H, N), dtype=torch.float32, device=q.device)
    gt, gs, has_decay = _per_step_args(g, q)
    _la_dfused[(nv, B * H * n_seg)](
        q, k, gt, w, v, do, s_in if s_in is not None else ds0, dhs, dv, dw_part, ds0,
        *q.stride(), *k.stride(), *gs, *w.stride(), *v.stride(), *do.stride(), *dv.stride(), H, N, DK, DV, nt,
        seg_chunks, HAS_DECAY=has_decay, HAS_S_IN=s_in is not None, STORE_FINAL=n_seg == 1,
        C=chunk, BK=_block(DK, FUSED_MAX_DK), BV=bv, **_tile_opts(q.dtype, cfg))
    return dhs, ds0, dv, dw_part


def _backward(q, k, v, g, do, ds_end, chunk: int, hs, w=None, rate=None):
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
    gt, gs, has_decay = _per_step_args(g, q)
    wt, ws, has_w = _per_step_args(w, q)
    # The one reverse walk where _state_grads would walk in segments anyway (few programs, as at
    # SSD's batch 1), not where it walks once: there the separate passes are faster (see BWD_TILES).
    if (has_w and DK <= FUSED_MAX_DK and _fused_fits(q, v, chunk, BWD_TILES["dfused"], value_tiles=2)
            and _state_grad_segments(qe, DV, chunk) > 1):
        dhs, ds0, dv, dw_part = _fused_state_and_value_grads(qe, ke, v, g, w, do, ds_end, chunk, hs.dtype)
    else:
        dhs, ds0 = _state_grads(qe, do, g, ds_end, chunk, hs.dtype)
        dv = empty(v.shape, dtype=v.dtype, device=q.device)  # contiguous
        cfg = BWD_TILES["dv_weighted" if has_w else "dv"]
        bk, bv = _block(DK, cfg["BK"]), _block(DV, cfg["BV"])
        nv = triton.cdiv(DV, bv)
        dw_part = empty((nv, B * H, N), dtype=torch.float32, device=q.device) if has_w else ds0
        _la_dv[(nt, nv, B * H)](
            qe, ke, gt, wt, v, do, dhs, dv, dw_part, *qe.stride(), *ke.stride(), *gs, *ws, *v.stride(),
            *do.stride(), *dv.stride(), H, N, DK, DV, nt, HAS_DECAY=has_decay, HAS_W=has_w, C=chunk, BK=bk, BV=bv,
            **_tile_opts(q.dtype, cfg, num_warps=cfg["num_warps"] if bv * chunk >= 8192 else 4))
    dw = (dw_part[0] if len(dw_part) == 1 else dw_part.sum(0)) if has_w else None  # over Dv blocks, [B*H, N]
    cfg = BWD_TILES["dqdk"]
    bv = _block(DV, cfg["BV"])
    nv = triton.cdiv(DV, bv)
    heads = _heads_per_program(H // h_qk, BWD_TILES["dqdk_heads"])
    splits = H // h_qk // heads
    # one program's sum over its heads; several programs' sums (splits > 1) are added below in float32
    part_dtype = q.dtype if splits == 1 else torch.float32
    unroll_v = nv <= DQDK_UNROLL_V and q.element_size() == 2
    grads, dg = [], None
    for for_q in (True, False):
        def launch(bk, for_q=for_q, dg_q=dg):  # dg_q: the dQ launch's dg, which the dK launch adds in
            nk = triton.cdiv(DK, bk)
            grad = empty((B, h_qk, splits, N, DK), dtype=part_dtype, device=q.device)
            dg_part = empty((nk, B * H, N), dtype=torch.float32, device=q.device) if has_decay else ds0
            _la_dqdk[(nt, nk, B * h_qk * splits)](
                q, k, v, gt, wt, do, hs, dhs, grad, dg_part, dg_q if dg_q is not None else ds0,
                *q.stride(), *k.stride(), *v.stride(), *gs, *ws, *do.stride(), H, h_qk, N, DK, DV, nt, heads,
                FOR_Q=for_q, HAS_DECAY=has_decay, HAS_W=has_w, ADD_DG_Q=has_decay and not for_q, C=chunk, BK=bk,
                BV=bv, NV=nv, UNROLL_V=unroll_v, **_tile_opts(q.dtype, cfg))
            return grad, dg_part
        key = ("dqdk", q.device, q.dtype, chunk, bv, nv, unroll_v, heads == 1, for_q, has_decay, has_w)
        grad, dg_part = _launch_fitting(key, _block(DK, cfg["BK"]), launch)
        grads.append(grad.sum(2).to(q.dtype) if splits > 1 else grad.view(B, h_qk, N, DK))
        if has_decay:  # the dQ launch's part, then the whole (the dK launch adds the first in)
            dg = dg_part[0] if len(dg_part) == 1 else dg_part.sum(0)  # over the Dk blocks, [B*H, N]
    dq, dk = grads
    drate = None
    if rate is not None:  # g_t = w_t a_h: dL/dw_t += dL/dg_t a_h, dL/da_h = sum_t dL/dg_t w_t
        block = 1024
        drate_part = empty((B * H, triton.cdiv(N, block)), dtype=torch.float32, device=q.device)
        _la_rate_grads[drate_part.shape](dg, w, rate, dw, drate_part, H, N, rate.shape[0], BLOCK=block)
        dg, drate = None, drate_part.view(-1, rate.numel(), drate_part.shape[1]).sum((0, 2)).view(rate.shape)
    dg = dg.view(B, H, N) if dg is not None else None
    dw = dw.view(B, H, N) if has_w else None
    return dq, dk, dv, dg, ds0, dw, drate


class _LinearAttention(torch.autograd.Function):
    # w: optional value weights [B, H, N] (the values become w_t v_t). mk.ssd passes dt here: the
    # kernels fold it into factors they compute anyway, instead of a pass over x.
    # rate: optional [R, H] (R dividing B; mk.ssd's A, R its groups), with w and without g: the
    # log-decay is then g_t = w_t rate[b % R, h], and the backward returns the gradients of w and the
    # rate with g's folded in (_la_rate_grads), instead of one for g.
    # q and k: [B, H, N, Dk] as v, or [B, 1, N, Dk] read by all H heads (mk.ssd's C and B, a group
    # at a time); their gradients then come summed over the heads by the kernel.
    @staticmethod
    def forward(ctx, q, k, v, g, s0, chunk, out_dtype, w=None, rate=None):
        ctx.set_materialize_grads(False)  # an unused output (often the state) gets no zero gradient
        dtype = q.dtype
        work = _compute_dtype(dtype)
        qw, kw, vw = (t.to(work) for t in (q, k, v))
        ww = w.float().contiguous() if w is not None else None
        ratew = rate.float().contiguous() if rate is not None else None
        if rate is not None:
            if g is not None or w is None:
                raise ValueError("a rate makes the log-decay w * rate: it needs w and no g")
            r, h = ratew.shape
            b, n = ww.shape[0], ww.shape[-1]
            gw = (ww.view(b // r, r, h, n) * ratew[None, :, :, None]).view(ww.shape)
        else:
            gw = g.float() if g is not None else None
        s0w = s0.float().contiguous() if s0 is not None else None
        heads = (*v.shape[:2], *q.shape[2:])
        # The states each chunk starts from are kept for the backward when it will run (else it would
        # walk the sequence again): B*H*(N/C)*Dk*Dv values, the size of the values times Dk/C.
        keep = any(ctx.needs_input_grad)
        with on_device_of(q):
            o, s_end, hs = _forward(qw.expand(heads), kw.expand(heads), vw, gw, s0w, chunk,
                                    out_dtype if work == dtype else torch.float32, w=ww, keep_states=keep)
        ctx.save_for_backward(qw, kw, vw, gw, ww, ratew, hs)
        ctx.graph_inputs = (q, k, v, g, s0, w, rate)  # for once_differentiable (no data is read from them)
        ctx.chunk, ctx.dtype, ctx.has_s0 = chunk, dtype, s0 is not None
        ctx.s0_dtype = s0.dtype if s0 is not None else None
        ctx.w_dtype = w.dtype if w is not None else None
        ctx.rate_dtype = rate.dtype if rate is not None else None
        return o.to(out_dtype), s_end

    @staticmethod
    @once_differentiable  # the Triton backward is not itself differentiable: double backward raises
    def backward(ctx, do, ds_end):
        qw, kw, vw, gw, ww, ratew, hs = ctx.saved_tensors
        do = do.to(qw.dtype) if do is not None else vw.new_zeros(()).expand(*vw.shape)
        ds_end = ds_end.float().contiguous() if ds_end is not None else None
        with on_device_of(qw):
            dq, dk, dv, dg, ds0, dw, drate = _backward(qw, kw, vw, gw, do, ds_end, ctx.chunk, hs, w=ww, rate=ratew)
        return (dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), dg,
                ds0.to(ctx.s0_dtype) if ctx.has_s0 else None, None, None,
                dw.to(ctx.w_dtype) if dw is not None else None,
                drate.to(ctx.rate_dtype) if drate is not None else None)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None,
                     feature_map: str | Callable | None = None, normalize: bool = False, chunk_size: int = 64,
                     initial_state: torch.Tensor | None = None, return_state: bool | None = None,
                     return_final_state: bool | None = None):
    """Causal linear attention in Triton, chunked (forward and backward).

    o_t = phi(q_t)^T S_t,  S_t = exp(decay_t) S_{t-1} + phi(k_t) v_t^T  (no scale factor applied).
    q, k ``[B, H, N, Dk]``; v ``[B, H, N, Dv]``; any strides; float32, float16 or bfloat16 (16-bit
    inputs keep 16-bit tiles of the state in the kernel's products: with float16, states beyond
    ~6e4, as from very long sequences without decay, overflow; bfloat16 has float32's range).
    ``decay``: log-decay ``[B, H, N]`` (<= 0; -inf resets the state) or None; a NaN in it makes the
    outputs of its head NaN from its step on (not checked: checking values would need a host sync).
    ``feature_map``: None (identity), "elu1", "relu", "taylor" or a callable, applied to q and k
    before the kernel; a callable must return tensors that keep q's ``[B, H, N]`` and dtype.
    ``normalize=True`` divides o_t by phi(q_t)^T z_t, z_t = exp(decay_t) z_{t-1} + phi(k_t) (a row with
    z = 0 gets 0); it cannot be combined with states. ``initial_state`` / the returned final state:
    ``[B, H, Dk', Dv]`` float32 (Dk' = the feature size), so a long sequence can be processed in
    pieces. ``chunk_size`` in {16, 32, 64, 128}; N need not be a multiple of it. Gradients flow to q,
    k, v, decay and initial_state (once: the backward is not differentiable, and differentiating the
    gradients again raises); when one is needed, the forward keeps the state each chunk starts from
    for the backward: B*H*ceil(N/chunk_size)*Dk'*Dv values in the inputs' dtype (Dk'/chunk_size times
    the size of v; float32 for bfloat16 inputs under the CPU interpreter, which computes them in
    float32). N = 0 or B*H = 0 gives zeros (and the initial state, or zeros, as the final state).
    Returns ``out`` or, with ``return_final_state=True``, ``(out, final_state)``; ``return_state`` is
    the older name of ``return_final_state`` (an alias, kept working; giving both with different
    values raises ValueError).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, shape_hint="[B, H, N, D]")
    return_state = final_state_flag("return_state", return_state, return_final_state)
    check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state)
    if decay is not None:
        check_tensor("decay", decay, ndim=3, shape_hint="[B, H, N]")
    check_same_device(q=q, k=k, v=v, decay=decay, initial_state=initial_state)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_chunk_size(chunk_size)
    qf, kf = mapped_features(q, k, feature_map)
    dk_feat = qf.shape[-1]
    if dk_feat > MAX_FEATURE_DIM:
        raise ValueError(f"feature size {dk_feat} exceeds {MAX_FEATURE_DIM}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, shape_hint="[B, H, Dk, Dv]")
        want = (*q.shape[:2], dk_feat, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [B, H, Dk', Dv] = {want} (Dk' = feature size), "
                             f"got {tuple(initial_state.shape)}")
    B, H, N = q.shape[:3]
    if N == 0 or B * H == 0:  # nothing for the kernels to walk: zeros, still part of the autograd graph
        out = v.new_zeros(*v.shape)
        state = (initial_state.to(torch.float32, copy=True) if initial_state is not None
                 else torch.zeros(B, H, dk_feat, v.shape[-1], device=q.device))
        ins = (qf, kf, v, decay, initial_state)
        out, state = keep_in_graph(out, *ins), keep_in_graph(state, *ins)
        return (out, state) if return_state else out
    vv = torch.cat([v, v.new_ones(*v.shape[:3], 1)], dim=-1) if normalize else v  # a ones column gives z
    # normalizing wants float32 numerator and denominator (either may exceed float16's range while
    # their ratio does not); otherwise the kernel writes the output's dtype directly
    out_dtype = torch.float32 if normalize else v.dtype
    out, state = _LinearAttention.apply(qf, kf, vv, decay, initial_state, chunk_size, out_dtype)
    if normalize:
        out = _normalized(out[..., :-1], out[..., -1:])
    out = out.to(v.dtype)
    return (out, state) if return_state else out
