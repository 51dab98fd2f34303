"""Chapter 3 (in progress): causal linear attention with an optional per-step decay.

    S_t = exp(g_t) S_{t-1} + phi(k_t) v_t^T        (state [Dk, Dv], one per batch and head)
    o_t = phi(q_t)^T S_t                            (no scale factor is applied)

with, when ``normalize`` is set, o_t divided by phi(q_t)^T z_t, z_t = exp(g_t) z_{t-1} + phi(k_t).
``g`` is a log-decay (<= 0; None means no decay).

This module holds what the chapter derives, in PyTorch: the feature maps, and the *parallel*
(masked, quadratic) and *chunked* (intra-chunk quadratic, inter-chunk recurrent, as in Lightning
Attention-2) forms of the recurrence that ``mk.reference.linear_attention`` runs step by step; and
``linear_attention``, the chunked form in Triton (forward and backward).

The kernels. One program owns a [BK, BV] block of the state of one (batch, head) and walks the chunks
of C steps in order, keeping its block of S in registers; per chunk (b_t = the log-decays summed
from the chunk's start, inclusive; b_C the chunk's total):

    forward:   O_c  = (Q K^T * exp(b_t - b_s), s <= t) V + (Q * exp(b_t)) S     (partial over Dk blocks)
               S   <- exp(b_C) S + (K * exp(b_C - b_s))^T V
    dQ (same direction):   dQ_c = (dO V^T * exp(b_t - b_s), s <= t) K + exp(b_t) dO S^T
    dK, dV (reverse, carrying dS, the gradient of the state at the chunk's end):
               dV_c = (Q K^T * mask)^T dO + (K * exp(b_C - b_s)) dS
               dK_c = (dO V^T * mask)^T Q + exp(b_C - b_s) V dS^T
               dS  <- exp(b_C) dS + (Q * exp(b_t))^T dO

Products over Dk (Q K^T) and Dv (dO V^T) are split across the programs of other blocks, so each
program writes a partial result and the host sums them. The decay's gradient needs no kernel: with
G the cumulative log-decay, o depends on G through q~ = e^G q and k~ = e^-G k, so
dL/dG_t = q_t . dq_t - k_t . dk_t (plus <dS_N, S_N> at the last step), and dL/dg is its sum from t on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._alloc import empty
from ._backend import dot_options, is_interpreter, on_device_of
from ._validate import check_same_device, check_tensor
from .flash import _compute_dtype

FEATURE_MAPS = ("elu1", "relu", "taylor")


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """BASED's second-order Taylor map: phi(q) . phi(k) = 1 + q.k/sqrt(d) + (q.k)^2 / (2d), the first
    three terms of exp(q.k / sqrt(d)). Feature size 1 + d + d^2."""
    d = x.shape[-1]
    ones = x.new_ones(*x.shape[:-1], 1)
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
    return torch.cat([ones, x / d**0.25, outer / (2**0.5 * d**0.5)], dim=-1)


def apply_feature_map(x: torch.Tensor, feature_map: str | Callable | None) -> torch.Tensor:
    """phi(x) for a named map ("elu1": elu(x) + 1, "relu", "taylor"), a callable, or None (identity)."""
    if feature_map is None:
        return x
    if callable(feature_map):
        return feature_map(x)
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "taylor":
        return taylor_features(x)
    raise ValueError(f"feature_map must be None, a callable or one of {FEATURE_MAPS}, got {feature_map!r}")


def check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state) -> None:
    """Shapes and flags of linear attention; raises before any work is done."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, H, N, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, H, N, Dk], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, N, Dv] with q's B, H, N {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if decay is not None and (not isinstance(decay, torch.Tensor) or decay.shape != q.shape[:3]):
        raise ValueError(f"decay must be a log-decay tensor [B, H, N] = {tuple(q.shape[:3])}, got "
                         f"{tuple(decay.shape) if isinstance(decay, torch.Tensor) else type(decay).__name__}")
    if normalize and (initial_state is not None or return_state):
        raise ValueError("normalize=True carries a normalizer state z that initial_state/return_state do not "
                         "hold: process the sequence in one call, or normalize outside")


def _states_shape(q_feat: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    return (*q_feat.shape[:2], q_feat.shape[-1], v.shape[-1])


def _normalized(o: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    # a row whose normalizer is exactly 0 (no key with a positive feature product) gets 0, not NaN
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.where(denom == 0, torch.zeros_like(o), o / safe)


def parallel_form(q, k, v, decay=None, feature_map=None, normalize=False, initial_state=None,
                  return_state=False):
    """All outputs at once: O = ((phi(Q) phi(K)^T) * M) V with the causal decay mask
    M[t, s] = exp(G_t - G_s) for s <= t (G the cumulative log-decay), plus exp(G_t) phi(q_t)^T S_0.
    Quadratic in N, like softmax attention, but with no softmax."""
    check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state)
    qf, kf = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
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
                 return_state=False):
    """Lightning Attention-2's split: inside a chunk of C steps, the parallel form (C^2 work); between
    chunks, the state S carried by the recurrence. Cost O(N C d + N d^2) instead of O(N^2 d).
    Log-decays are summed inside each chunk only, so exp never sees more than C steps of decay."""
    check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    qf, kf = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
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
def _chunk_decays(G, g_base, stride_gn, rows, row_ok, C: tl.constexpr, HAS_DECAY: tl.constexpr):
    # b_t (log-decay summed from the chunk's start, inclusive), b_C, and the causal decay mask
    # exp(b_t - b_s) for s <= t (masked before exp: above the diagonal b_t - b_s > 0 could overflow)
    offs = tl.arange(0, C)
    causal = offs[:, None] >= offs[None, :]
    if HAS_DECAY:
        g = tl.load(G + g_base + rows * stride_gn, mask=row_ok, other=0.0).to(tl.float32)  # padding: 0
        # a log-decay of -inf (a hard reset) must not make -inf - -inf = NaN below; exp(-80) ~ 2e-35 still
        # forgets everything, and keeps b_t - b_s exact to ~1e-5 (a clamp at -1e4 would lose 1e-3 to rounding)
        g = tl.maximum(g, -80.0)
        b = tl.cumsum(g, 0)
        b_last = tl.sum(g, 0)
        mask = tl.exp(tl.where(causal, b[:, None] - b[None, :], float("-inf")))
    else:
        b = tl.zeros([C], tl.float32)
        b_last = 0.0
        mask = tl.where(causal, 1.0, 0.0)
    return b, b_last, mask


@triton.jit
def _la_fwd(Q, K, V, G, S0, O_PART, S_OUT,
            stride_qb, stride_qh, stride_qn, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd,
            stride_gb, stride_gh, stride_gn,
            H, N, DK, DV,
            HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, STORE_STATE: tl.constexpr,
            C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b_idx, h = bh // H, bh % H
    offs_c = tl.arange(0, C)
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok, v_ok = offs_k < DK, offs_v < DV
    q_base = Q + b_idx.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b_idx.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b_idx.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    g_base = b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    state_off = bh.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]  # states: [B, H, DK, DV]
    if HAS_S0:
        S = tl.load(S0 + state_off, mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], tl.float32)
    o_base = O_PART + (ik * tl.num_programs(2) + bh).to(tl.int64) * N * DV  # partial O: [NK, B*H, N, DV]
    for start in range(0, N, C):
        rows = (start + offs_c).to(tl.int64)  # 64-bit: rows * stride can pass 2^31 for long sequences
        row_ok = rows < N
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_k[None, :] * stride_qd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read C*BK
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_k[None, :] * stride_kd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # read C*BK
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                    mask=row_ok[:, None] & v_ok[None, :], other=0.0)  # read C*BV
        b, b_last, mask = _chunk_decays(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
        a = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * mask  # intra-chunk scores [C, C]
        q_in = (q * tl.exp(b)[:, None]).to(q.dtype)  # q decayed back to the chunk's start
        o = tl.dot(a.to(v.dtype), v, input_precision=DOT_PREC)
        o += tl.dot(q_in, S.to(q.dtype), input_precision=DOT_PREC)  # what earlier chunks left in S
        tl.store(o_base + rows[:, None] * DV + offs_v[None, :], o, mask=row_ok[:, None] & v_ok[None, :])
        k_out = (k * tl.exp(b_last - b)[:, None]).to(k.dtype)  # how much of step s reaches the chunk's end
        S = S * tl.exp(b_last) + tl.dot(tl.trans(k_out), v, input_precision=DOT_PREC)
    if STORE_STATE:
        tl.store(S_OUT + state_off, S, mask=k_ok[:, None] & v_ok[None, :])


@triton.jit
def _la_bwd_dq(K, V, G, S0, DO, DQ_PART,
               stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd,
               stride_gb, stride_gh, stride_gn,
               stride_dob, stride_doh, stride_don, stride_dod,
               H, N, DK, DV,
               HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b_idx, h = bh // H, bh % H
    offs_c = tl.arange(0, C)
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok, v_ok = offs_k < DK, offs_v < DV
    k_base = K + b_idx.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b_idx.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    do_base = DO + b_idx.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    g_base = b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    state_off = bh.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    if HAS_S0:
        S = tl.load(S0 + state_off, mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], tl.float32)
    dq_base = DQ_PART + (iv * tl.num_programs(2) + bh).to(tl.int64) * N * DK  # partial dQ: [NV, B*H, N, DK]
    for start in range(0, N, C):
        rows = (start + offs_c).to(tl.int64)
        row_ok = rows < N
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_k[None, :] * stride_kd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                    mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + offs_v[None, :] * stride_dod,
                     mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        b, b_last, mask = _chunk_decays(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
        da = tl.dot(do, tl.trans(v), input_precision=DOT_PREC) * mask  # dA = dO V^T, masked [C, C]
        dq = tl.dot(da.to(k.dtype), k, input_precision=DOT_PREC)
        dq += tl.dot(do, tl.trans(S.to(do.dtype)), input_precision=DOT_PREC) * tl.exp(b)[:, None]
        tl.store(dq_base + rows[:, None] * DK + offs_k[None, :], dq, mask=row_ok[:, None] & k_ok[None, :])
        k_out = (k * tl.exp(b_last - b)[:, None]).to(k.dtype)
        S = S * tl.exp(b_last) + tl.dot(tl.trans(k_out), v, input_precision=DOT_PREC)


@triton.jit
def _la_bwd_dkdv(Q, K, V, G, DO, DS_END, DK_PART, DV_PART, DS0,
                 stride_qb, stride_qh, stride_qn, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_gb, stride_gh, stride_gn,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 H, N, DK, DV,
                 HAS_DECAY: tl.constexpr, HAS_DS_END: tl.constexpr, STORE_DS0: tl.constexpr,
                 C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr):
    ik, iv, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b_idx, h = bh // H, bh % H
    offs_c = tl.arange(0, C)
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok, v_ok = offs_k < DK, offs_v < DV
    q_base = Q + b_idx.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b_idx.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b_idx.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    do_base = DO + b_idx.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    g_base = b_idx.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    state_off = bh.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    if HAS_DS_END:  # the gradient of the returned final state
        dS = tl.load(DS_END + state_off, mask=k_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], tl.float32)
    dk_base = DK_PART + (iv * tl.num_programs(2) + bh).to(tl.int64) * N * DK  # partial dK: [NV, B*H, N, DK]
    dv_base = DV_PART + (ik * tl.num_programs(2) + bh).to(tl.int64) * N * DV  # partial dV: [NK, B*H, N, DV]
    n_chunks = tl.cdiv(N, C)
    for i in range(0, n_chunks):  # chunks in reverse: dS flows from the end of the sequence back
        rows = ((n_chunks - 1 - i) * C + offs_c).to(tl.int64)
        row_ok = rows < N
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_k[None, :] * stride_qd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_k[None, :] * stride_kd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_v[None, :] * stride_vd,
                    mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + offs_v[None, :] * stride_dod,
                     mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        b, b_last, mask = _chunk_decays(G, g_base, stride_gn, rows, row_ok, C, HAS_DECAY)
        to_end = tl.exp(b_last - b)  # decay from step s to the chunk's end
        a = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * mask  # [C (t), C (s)]
        dv = tl.dot(tl.trans(a).to(do.dtype), do, input_precision=DOT_PREC)
        dv += tl.dot((k * to_end[:, None]).to(k.dtype), dS.to(k.dtype), input_precision=DOT_PREC)
        da = tl.dot(do, tl.trans(v), input_precision=DOT_PREC) * mask
        dk = tl.dot(tl.trans(da).to(q.dtype), q, input_precision=DOT_PREC)
        dk += tl.dot(v, tl.trans(dS.to(v.dtype)), input_precision=DOT_PREC) * to_end[:, None]
        tl.store(dk_base + rows[:, None] * DK + offs_k[None, :], dk, mask=row_ok[:, None] & k_ok[None, :])
        tl.store(dv_base + rows[:, None] * DV + offs_v[None, :], dv, mask=row_ok[:, None] & v_ok[None, :])
        q_in = (q * tl.exp(b)[:, None]).to(q.dtype)
        dS = dS * tl.exp(b_last) + tl.dot(tl.trans(q_in), do, input_precision=DOT_PREC)
    if STORE_DS0:
        tl.store(DS0 + state_off, dS, mask=k_ok[:, None] & v_ok[None, :])


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------

CHUNK_SIZES = (16, 32, 64, 128)
MAX_FEATURE_DIM = 1024


def _block(d: int) -> int:
    # state block per program: at most 64 x 64 (16 KB of fp32 registers), at least 16 (tl.dot)
    return max(16, min(64, triton.next_power_of_2(d)))


def _grid_blocks(dk: int, dv: int) -> tuple[int, int, int, int]:
    bk, bv = _block(dk), _block(dv)
    return bk, bv, triton.cdiv(dk, bk), triton.cdiv(dv, bv)


def _launch_opts(dtype) -> dict:
    opts = {"num_warps": 4, "num_stages": 1 if is_interpreter() else 2}
    return {**opts, **dot_options(dtype)}


def _decay_args(g, q):
    # (tensor, strides) for the kernels; a dummy when there is no decay
    if g is None:
        return q, (0, 0, 0), False
    return g, g.stride(), True


def _forward(q, k, v, g, s0, want_state: bool, chunk: int):
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    bk, bv, nk, nv = _grid_blocks(DK, DV)
    o_part = empty((nk, B * H, N, DV), dtype=torch.float32, device=q.device)
    s_out = empty((B, H, DK, DV), dtype=torch.float32, device=q.device) if want_state else o_part
    gt, gs, has_decay = _decay_args(g, q)
    _la_fwd[(nk, nv, B * H)](
        q, k, v, gt, s0 if s0 is not None else o_part, o_part, s_out,
        *q.stride(), *k.stride(), *v.stride(), *gs, H, N, DK, DV,
        HAS_DECAY=has_decay, HAS_S0=s0 is not None, STORE_STATE=want_state, C=chunk, BK=bk, BV=bv,
        **_launch_opts(q.dtype))
    o = o_part.sum(0).view(B, H, N, DV)
    return o, (s_out if want_state else None)


def _backward(q, k, v, g, s0, do, ds_end, chunk: int):
    B, H, N, DK = q.shape
    DV = v.shape[-1]
    bk, bv, nk, nv = _grid_blocks(DK, DV)
    gt, gs, has_decay = _decay_args(g, q)
    opts = _launch_opts(q.dtype)
    dq_part = empty((nv, B * H, N, DK), dtype=torch.float32, device=q.device)
    _la_bwd_dq[(nk, nv, B * H)](
        k, v, gt, s0 if s0 is not None else dq_part, do, dq_part,
        *k.stride(), *v.stride(), *gs, *do.stride(), H, N, DK, DV,
        HAS_DECAY=has_decay, HAS_S0=s0 is not None, C=chunk, BK=bk, BV=bv, **opts)
    dk_part = empty((nv, B * H, N, DK), dtype=torch.float32, device=q.device)
    dv_part = empty((nk, B * H, N, DV), dtype=torch.float32, device=q.device)
    ds0 = empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    _la_bwd_dkdv[(nk, nv, B * H)](
        q, k, v, gt, do, ds_end if ds_end is not None else ds0, dk_part, dv_part, ds0,
        *q.stride(), *k.stride(), *v.stride(), *gs, *do.stride(), H, N, DK, DV,
        HAS_DECAY=has_decay, HAS_DS_END=ds_end is not None, STORE_DS0=True, C=chunk, BK=bk, BV=bv, **opts)
    return (dq_part.sum(0).view(B, H, N, DK), dk_part.sum(0).view(B, H, N, DK),
            dv_part.sum(0).view(B, H, N, DV), ds0)


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, chunk):
        ctx.set_materialize_grads(False)  # an unused output (often the state) gets no zero gradient
        dtype = q.dtype
        work = _compute_dtype(dtype)
        qw, kw, vw = (t.to(work) for t in (q, k, v))
        gw = g.float() if g is not None else None
        s0w = s0.float().contiguous() if s0 is not None else None
        with on_device_of(q):
            o, s_end = _forward(qw, kw, vw, gw, s0w, True, chunk)
        ctx.save_for_backward(qw, kw, vw, gw, s0w, s_end)
        ctx.chunk, ctx.dtype, ctx.has_g, ctx.has_s0 = chunk, dtype, g is not None, s0 is not None
        ctx.s0_dtype = s0.dtype if s0 is not None else None
        # float32 out: the caller casts (after normalizing, whose numerator and denominator can both
        # exceed float16's range while their ratio does not)
        return o, s_end

    @staticmethod
    def backward(ctx, do, ds_end):
        qw, kw, vw, gw, s0w, s_end = ctx.saved_tensors
        do = do.to(qw.dtype) if do is not None else torch.zeros_like(qw[..., :1]).expand(*vw.shape)
        ds_end = ds_end.float().contiguous() if ds_end is not None else None
        with on_device_of(qw):
            dq, dk, dv, ds0 = _backward(qw, kw, vw, gw, s0w, do, ds_end, ctx.chunk)
        dg = None
        if ctx.has_g:
            # dL/dG_t = q_t . dq_t - k_t . dk_t (+ <dS_N, S_N> at the last step); dL/dg_t = sum over u >= t
            dG = (qw.float() * dq).sum(-1) - (kw.float() * dk).sum(-1)
            dg = dG.flip(-1).cumsum(-1).flip(-1)
            if ds_end is not None:
                dg = dg + (ds_end * s_end).sum((-2, -1))[..., None]
        return (dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), dg,
                ds0.to(ctx.s0_dtype) if ctx.has_s0 else None, None)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None,
                     feature_map: str | Callable | None = None, normalize: bool = False, chunk_size: int = 64,
                     initial_state: torch.Tensor | None = None, return_state: bool = False):
    """Causal linear attention in Triton, chunked (forward and backward).

    o_t = phi(q_t)^T S_t,  S_t = exp(decay_t) S_{t-1} + phi(k_t) v_t^T  (no scale factor applied).
    q, k ``[B, H, N, Dk]``; v ``[B, H, N, Dv]``; any strides; float32, float16 or bfloat16 (16-bit
    inputs keep 16-bit tiles of the state in the kernel's products: with float16, states beyond
    ~6e4, as from very long sequences without decay, overflow; bfloat16 has float32's range).
    ``decay``: log-decay ``[B, H, N]`` (<= 0; -inf resets the state) or None. ``feature_map``: None
    (identity), "elu1", "relu", "taylor" or a callable, applied to q and k before the kernel. ``normalize=True`` divides
    o_t by phi(q_t)^T z_t, z_t = exp(decay_t) z_{t-1} + phi(k_t) (a row with z = 0 gets 0); it cannot
    be combined with states. ``initial_state`` / the returned final state: ``[B, H, Dk', Dv]`` float32
    (Dk' = the feature size), so a long sequence can be processed in pieces. ``chunk_size`` in
    {16, 32, 64, 128}; N need not be a multiple of it. Gradients flow to q, k, v, decay and
    initial_state. Returns ``out`` or, with ``return_state=True``, ``(out, final_state)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, shape_hint="[B, H, N, D]")
    check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state)
    if decay is not None:
        check_tensor("decay", decay, ndim=3, shape_hint="[B, H, N]")
    check_same_device(q=q, k=k, v=v, decay=decay, initial_state=initial_state)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")
    for name, flag in (("normalize", normalize), ("return_state", return_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    qf, kf = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
    if qf.shape[:3] != q.shape[:3] or qf.shape != kf.shape:
        raise ValueError(f"feature_map must keep [B, H, N] and map q and k alike, got {tuple(qf.shape)} "
                         f"and {tuple(kf.shape)}")
    if qf.dtype != q.dtype or kf.dtype != q.dtype:
        raise TypeError(f"feature_map must keep the inputs' dtype {q.dtype}, got {qf.dtype} and {kf.dtype}")
    dk_feat = qf.shape[-1]
    if dk_feat > MAX_FEATURE_DIM:
        raise ValueError(f"feature size {dk_feat} exceeds {MAX_FEATURE_DIM}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, shape_hint="[B, H, Dk, Dv]")
        want = (*q.shape[:2], dk_feat, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [B, H, Dk', Dv] = {want} (Dk' = feature size), "
                             f"got {tuple(initial_state.shape)}")
    vv = torch.cat([v, v.new_ones(*v.shape[:3], 1)], dim=-1) if normalize else v  # a ones column gives z
    B, H, N = q.shape[:3]
    if N == 0 or B * H == 0:
        out = v.new_zeros(*v.shape)
        state = (initial_state.float() if initial_state is not None
                 else torch.zeros(B, H, dk_feat, v.shape[-1], device=q.device))
        return (out, state) if return_state else out
    out, state = _LinearAttention.apply(qf, kf, vv, decay, initial_state, chunk_size)
    if normalize:
        out = _normalized(out[..., :-1], out[..., -1:])
    out = out.to(v.dtype)
    return (out, state) if return_state else out
