"""Variable-length (packed) attention, forward and backward: FlashAttention's ``flash_attn_varlen_func``.

A batch of sequences of different lengths is stored without padding: the tokens of all sequences one
after another, ``q [total_q, H, D]``, ``k`` and ``v [total_k, Hkv, D]``, and sequence b's tokens are the
rows ``cu_seqlens[b] <= t < cu_seqlens[b + 1]`` (cumulative lengths, starting at 0). Each sequence
attends only to its own keys:

    O[qs_b + i] = softmax_j(Q[qs_b + i] . K[ks_b + j] * scale) V[ks_b + j],   0 <= i < Nq_b, 0 <= j < Nk_b

which is ``flash_attention`` run on each sequence alone. The kernels are flash.py's with one change:
a program reads its sequence's start and length from ``cu_seqlens`` and offsets its pointers there,
instead of computing them from a batch stride. The grid is (block, head, sequence) and covers the
longest sequence (``max_seqlen``); programs past their own sequence's end return at once. The block loops are
flash.py's own (``fwd_block_loop``, ``bwd_dkdv_loop``, ``bwd_dq_loop``): inside a sequence nothing
differs, and padding costs no FLOPs, only the empty programs.

The logsumexp is ``[H, total_q]`` float32, natural log (FlashAttention's varlen layout): row t of head
h at ``lse[h, t]``; -inf for a query that sees no key.
"""

from __future__ import annotations

import functools
import numbers

import torch
import triton
import triton.language as tl

from . import planning
from ._alloc import empty
from ._autograd import once_differentiable
from ._backend import dot_options, is_interpreter, on_device_of
from ._common import (
    LOG2E,
    MAX_GRID_YZ,
    TF32_FALLBACK,
    base2_lse_for_backward,
    compute_dtype,
    head_dim_pad,
    launch_fitting,
    natural_lse,
    shared_memory_limit,
)
from ._validate import MAX_HEAD_DIM, check_flag, check_same_device, check_scale, check_tensor, int32_addressable
from .flash import bwd_dkdv_loop, bwd_dq_loop, fwd_block_loop, query_block, row_delta, tile_config

# --------------------------------------------------------------------------------------------------
# where a sequence lies
# --------------------------------------------------------------------------------------------------


@triton.jit
def _sequence(CU, b, total, max_len):
    """Start and length of sequence ``b`` from its cumulative offsets. The host checks the offsets; the
    clamps keep every read inside the packed tensor even where it cannot (during CUDA-graph capture)."""
    start = tl.minimum(tl.maximum(tl.load(CU + b), 0), total)
    end = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), total)
    return start, tl.minimum(end - start, max_len)


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _varlen_fwd(Q, K, V, O, LSE, CU_Q, CU_K,
                stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                stride_vt, stride_vh, stride_vd, stride_ot, stride_oh, stride_od,
                GROUP, total_q, total_k, max_q, max_k, D, qk_scale,
                CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    start_m = query_block(CAUSAL) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, Nq = _sequence(CU_Q, b, total_q, max_q)
    if start_m >= Nq:  # the grid covers the longest sequence; this one ends before this block
        return
    k_start, Nk = _sequence(CU_K, b, total_k, max_k)
    hk = h // GROUP
    q_base = Q + q_start.to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh
    k_base = K + k_start.to(tl.int64) * stride_kt + hk.to(tl.int64) * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + hk.to(tl.int64) * stride_vh

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq  # rows past the end belong to the next sequence: never read, never written
    d_ok = offs_d < D
    q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # read BLOCK_M*D, once

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    causal_offset = Nk - Nq  # bottom-right alignment within the sequence
    if CAUSAL:
        full_hi = tl.maximum(tl.minimum(start_m + causal_offset + 1, Nk), 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), Nk)
    else:
        full_hi = Nk // BLOCK_N * BLOCK_N
        hi = Nk
    acc, l_i, m_i = fwd_block_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                    rows, 0, full_hi, Nk, D, causal_offset, qk_scale,
                                    False, CAUSAL, EVEN_D, BLOCK_N, HEAD_DIM, DOT_PREC)
    acc, l_i, m_i = fwd_block_loop(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                    rows, full_hi, hi, Nk, D, causal_offset, qk_scale,
                                    True, CAUSAL, EVEN_D, BLOCK_N, HEAD_DIM, DOT_PREC)

    empty_row = l_i == 0.0  # saw no key: output 0, logsumexp -inf
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    o_base = O + q_start.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
    tl.store(o_base + rows[:, None] * stride_ot + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])  # write BLOCK_M*D
    tl.store(LSE + h.to(tl.int64) * total_q + q_start + rows, natural_lse(m_i, l_i), mask=row_ok)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------

@triton.jit
def _varlen_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K,
                     stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                     stride_vt, stride_vh, stride_vd, stride_dot, stride_doh, stride_dod,
                     stride_dkt, stride_dkh, stride_dkd, stride_dvt, stride_dvh, stride_dvd,
                     GROUP, total_q, total_k, max_q, max_k, D, scale, qk_scale,
                     CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2)
    k_start, Nk = _sequence(CU_K, b, total_k, max_k)
    if start_n >= Nk:
        return
    q_start, Nq = _sequence(CU_Q, b, total_q, max_q)  # Nq = 0: no query reads these keys, dK = dV = 0
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = (cols[:, None] < Nk) & (offs_d[None, :] < D)
    k_row0 = k_start.to(tl.int64)
    k = tl.load(K + k_row0 * stride_kt + hk.to(tl.int64) * stride_kh + cols[:, None] * stride_kt
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)  # read BLOCK_N*D, once
    v = tl.load(V + k_row0 * stride_vt + hk.to(tl.int64) * stride_vh + cols[:, None] * stride_vt
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    causal_offset = Nk - Nq
    if CAUSAL:  # as flash.py's _attn_bwd_dkdv: masked rows first, then the rows that see the whole block
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), Nq)
        full_lo = tl.maximum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        full_lo = 0
    q_row0 = q_start.to(tl.int64)
    for g in range(0, GROUP):  # every query head that reads this k/v head contributes to dK, dV
        h = (hk * GROUP + g).to(tl.int64)
        q_base = Q + q_row0 * stride_qt + h * stride_qh
        do_base = DO + q_row0 * stride_dot + h * stride_doh
        lse_base = LSE + h * total_q + q_row0
        delta_base = DELTA + h * total_q + q_row0
        dk, dv = bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd,
                                stride_dot, stride_dod, cols, lo, full_lo, Nq, D, causal_offset, qk_scale,
                                True, CAUSAL, BLOCK_M, HEAD_DIM, DOT_PREC)
        dk, dv = bwd_dkdv_loop(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd,
                                stride_dot, stride_dod, cols, full_lo, Nq, Nq, D, causal_offset, qk_scale,
                                False, CAUSAL, BLOCK_M, HEAD_DIM, DOT_PREC)
    dk = dk * scale  # S = scale * Q K^T
    tl.store(DK + k_row0 * stride_dkt + hk.to(tl.int64) * stride_dkh + cols[:, None] * stride_dkt
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + k_row0 * stride_dvt + hk.to(tl.int64) * stride_dvh + cols[:, None] * stride_dvt
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _varlen_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K,
                   stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                   stride_vt, stride_vh, stride_vd, stride_dot, stride_doh, stride_dod,
                   stride_dqt, stride_dqh, stride_dqd,
                   GROUP, total_q, total_k, max_q, max_k, D, scale, qk_scale,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr):
    start_m = query_block(CAUSAL) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, Nq = _sequence(CU_Q, b, total_q, max_q)
    if start_m >= Nq:
        return
    k_start, Nk = _sequence(CU_K, b, total_k, max_k)
    hk = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < Nq
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    q_row0 = q_start.to(tl.int64)
    q = tl.load(Q + q_row0 * stride_qt + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qt
                + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
    do = tl.load(DO + q_row0 * stride_dot + h.to(tl.int64) * stride_doh + rows[:, None] * stride_dot
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    row_stats = h.to(tl.int64) * total_q + q_row0 + rows
    lse = base2_lse_for_backward(tl.load(LSE + row_stats, mask=row_ok, other=float("inf")))  # no key: P = 0
    delta = tl.load(DELTA + row_stats, mask=row_ok, other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + hk.to(tl.int64) * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + hk.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    causal_offset = Nk - Nq
    if CAUSAL:
        full_hi = tl.maximum(tl.minimum(start_m + causal_offset + 1, Nk), 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), Nk)
    else:
        full_hi = Nk // BLOCK_N * BLOCK_N
        hi = Nk
    dq = bwd_dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                      rows, 0, full_hi, Nk, D, causal_offset, qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM, DOT_PREC)
    dq = bwd_dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                      rows, full_hi, hi, Nk, D, causal_offset, qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM, DOT_PREC)
    dq = dq * scale
    tl.store(DQ + q_row0 * stride_dqt + h.to(tl.int64) * stride_dqh + rows[:, None] * stride_dqt
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# launch configuration: flash.py's tiles (the same loops need the same shared memory)
# --------------------------------------------------------------------------------------------------

_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


@functools.cache
def _planned(kernel: str, head_dim: int, elem_bytes: int, smem_limit: int | None) -> dict:
    return tile_config(kernel, head_dim, elem_bytes, smem_limit)


def _default_config(kernel: str, head_dim: int, elem_bytes: int) -> dict:
    if is_interpreter():
        return dict(_INTERPRETER_CONFIG)
    return _planned(kernel, head_dim, elem_bytes, shared_memory_limit())


def launch_config(kernel: str, head_dim: int, elem_bytes: int) -> dict:
    """The configuration the ``"fwd"``, ``"dkdv"`` or ``"dq"`` kernel launches with: flash.py's
    ``tile_config`` for the current device (small tiles under the interpreter), or the planning override
    ``"varlen.<kernel>"``."""
    return dict(planning.decide(f"varlen.{kernel}", lambda d, e: _default_config(kernel, d, e), head_dim,
                                elem_bytes))


def _launch(key, cfg: dict, launch) -> None:
    # a configuration the compiler finds too large for this GPU steps down, as flash.py's does
    resident, streamed = ("BLOCK_N", "BLOCK_M") if key[0] == "dkdv" else ("BLOCK_M", "BLOCK_N")
    launch_fitting(("varlen", *key), cfg, launch, (streamed, resident), resident=resident,
                   relaxed=TF32_FALLBACK if key[2] == 4 else None)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------

def _sequence_slices(batch: int):
    """(first sequence, count) of each launch: the sequences in slices the grid's third axis can hold
    (a launch reads its slice's offsets from cu_seqlens[first:])."""
    most = planning.decide("varlen.max_grid_z", MAX_GRID_YZ)
    for first in range(0, batch, most):
        yield first, min(most, batch - first)


def launch_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float,
                   cfg: dict | None = None):
    """Output ``[total_q, H, D]`` and logsumexp ``[H, total_q]`` (natural log)."""
    total_q, H, D = q.shape
    total_k, HKV = k.shape[0], k.shape[1]
    B = cu_q.shape[0] - 1
    o = empty((total_q, H, D), dtype=q.dtype, device=q.device)
    lse = empty((H, total_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:  # no query row (total_q or H is 0): nothing to launch
        return o, lse
    cfg = cfg or launch_config("fwd", D, q.element_size())
    pad = head_dim_pad(D)

    def launch(cfg):
        for first, count in _sequence_slices(B):
            _varlen_fwd[(triton.cdiv(max_q, cfg["BLOCK_M"]), H, count)](
                q, k, v, o, lse, cu_q[first:], cu_k[first:], *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                H // HKV, total_q, total_k, max_q, max_k, D, scale * LOG2E,
                CAUSAL=causal, EVEN_D=(pad == D), HEAD_DIM=pad, **{**dot_options(q.dtype), **cfg})

    _launch(("fwd", pad, q.element_size(), causal), cfg, launch)
    return o, lse


def launch_backward(q, k, v, o, lse, do, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float,
                    dkdv_cfg: dict | None = None, dq_cfg: dict | None = None):
    """dq, dk, dv of the packed inputs' shapes (contiguous)."""
    total_q, H, D = q.shape
    total_k, HKV = k.shape[0], k.shape[1]
    B = cu_q.shape[0] - 1
    if q.numel() == 0:  # no query row reads k or v: their gradients are zero, and nothing is launched
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    pad = head_dim_pad(D)
    # delta = rowsum(dO * O) per token: flash.py's kernel on the packed tokens seen as one batch entry,
    # [1, H, total_q, D] -> [1, H, total_q], the lse's [H, total_q] layout
    delta = row_delta(o.permute(1, 0, 2).unsqueeze(0), do.permute(1, 0, 2).unsqueeze(0))[0]
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=k.device)
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    common = (total_q, total_k, max_q, max_k, D, scale, scale * LOG2E)

    def launch_dkdv(cfg):
        for first, count in _sequence_slices(B):
            _varlen_bwd_dkdv[(triton.cdiv(max_k, cfg["BLOCK_N"]), HKV, count)](
                q, k, v, do, dk, dv, lse, delta, cu_q[first:], cu_k[first:], *q.stride(), *k.stride(),
                *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), H // HKV, *common,
                CAUSAL=causal, HEAD_DIM=pad, **{**dot_options(q.dtype), **cfg})

    def launch_dq(cfg):
        for first, count in _sequence_slices(B):
            _varlen_bwd_dq[(triton.cdiv(max_q, cfg["BLOCK_M"]), H, count)](
                q, k, v, do, dq, lse, delta, cu_q[first:], cu_k[first:], *q.stride(), *k.stride(), *v.stride(),
                *do.stride(), *dq.stride(), H // HKV, *common,
                CAUSAL=causal, HEAD_DIM=pad, **{**dot_options(q.dtype), **cfg})

    if dk.numel() > 0:  # (no key: dK and dV are empty)
        _launch(("dkdv", pad, q.element_size(), causal), dkdv_cfg or launch_config("dkdv", D, q.element_size()),
                launch_dkdv)
    _launch(("dq", pad, q.element_size(), causal), dq_cfg or launch_config("dq", D, q.element_size()), launch_dq)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------

def _check_max_seqlen(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int (the longest sequence's length), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _check_cu_seqlens(name: str, cu, q: torch.Tensor) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor [B + 1] of cumulative sequence lengths, "
                        f"got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must have shape [B + 1] (B >= 0 sequences), got {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"{name} is on device '{cu.device}', q on '{q.device}'; put them on one device")


def _check_offsets(name: str, offsets: list[int], total: int, max_len: int, max_name: str, tensor: str) -> None:
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {offsets[0]}")
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if lengths and min(lengths) < 0:
        at = min(range(len(lengths)), key=lambda i: lengths[i])
        raise ValueError(f"{name} must be non-decreasing, got {name}[{at}] = {offsets[at]} > "
                         f"{name}[{at + 1}] = {offsets[at + 1]}")
    if offsets[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of tokens of {tensor} ({total}), got {offsets[-1]}")
    if lengths and max(lengths) > max_len:
        raise ValueError(f"{max_name}={max_len} is shorter than the longest sequence in {name} ({max(lengths)})")


def _rows_addressable(name: str, t: torch.Tensor, max_len: int) -> torch.Tensor:
    """The kernels add 64-bit offsets for a sequence's first token and its head, and index rows and
    lanes within one sequence with 32-bit arithmetic: ``max_len`` rows must span fewer than 2^31
    elements (``int32_addressable`` with that span)."""
    def extent(x):
        return (max(max_len, 1) - 1) * abs(x.stride(0)) + (x.shape[2] - 1) * abs(x.stride(2))
    return int32_addressable(name, t, extent=extent, what=f"one sequence of up to {max_len} tokens")


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple[int, int]:
    """Types, shapes, devices and (on the host, unless a CUDA graph is being captured) the values of
    the offsets; returns the two maximum lengths as ints."""
    check_tensor("q", q, ndim=3, shape_hint="[total_q, H, D]")
    check_tensor("k", k, ndim=3, shape_hint="[total_k, Hkv, D]")
    check_tensor("v", v, ndim=3, shape_hint="[total_k, Hkv, D]")
    check_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [total_k, Hkv, D], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims differ: q has D={q.shape[-1]}, k has D={k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k/v heads ({k.shape[1]}) must divide q heads ({q.shape[1]}) for grouped-query attention")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} is not supported: D must be between 1 and {MAX_HEAD_DIM} "
                         "(16, 32, 64 and 128 are the fast sizes; others are padded to the next power of two)")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [B + 1] for one batch of B sequences, got "
                         f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    # Checking the offsets' values reads them on the host (one synchronisation); impossible while a CUDA
    # graph is captured, where the kernels' clamps keep every access inside the tensors instead.
    if not (q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        offsets_q, offsets_k = torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist()
        _check_offsets("cu_seqlens_q", offsets_q, q.shape[0], max_q, "max_seqlen_q", "q")
        _check_offsets("cu_seqlens_k", offsets_k, k.shape[0], max_k, "max_seqlen_k", "k and v")
    return max_q, max_k


# --------------------------------------------------------------------------------------------------
# autograd and the public function
# --------------------------------------------------------------------------------------------------

class _FlashAttentionVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        dtype = q.dtype
        work = compute_dtype(dtype)
        qw = _rows_addressable("q", q.to(work), max_q)
        kw = _rows_addressable("k", k.to(work), max_k)
        vw = _rows_addressable("v", v.to(work), max_k)
        with on_device_of(q):
            o, lse = launch_forward(qw, kw, vw, cu_q, cu_k, max_q, max_k, causal, scale)
        ctx.save_for_backward(qw, kw, vw, o, lse, cu_q, cu_k)
        ctx.graph_inputs = (q, k, v)  # for once_differentiable (no data is read from them)
        ctx.settings = (max_q, max_k, causal, scale, dtype)
        ctx.mark_non_differentiable(lse)
        return o.to(dtype), lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do, _dlse):
        qw, kw, vw, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale, dtype = ctx.settings
        do = _rows_addressable("grad of out", do.to(qw.dtype), max_q)
        with on_device_of(qw):
            dq, dk, dv = launch_backward(qw, kw, vw, o, lse, do, cu_q, cu_k, max_q, max_k, causal, scale)
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None, None, None, None, None


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                           scale: float | None = None, return_lse: bool = False):
    """Attention over a batch of packed sequences of different lengths (FlashAttention's
    ``flash_attn_varlen_func`` conventions), forward and backward in Triton.

    q ``[total_q, H, D]``; k, v ``[total_k, Hkv, D]`` with Hkv dividing H (grouped-query attention); any
    strides (views such as ``qkv[:, 0]`` of a packed ``[total, 3, H, D]`` projection included); float16,
    bfloat16 or float32; D up to 256. ``cu_seqlens_q``, ``cu_seqlens_k``: int32 ``[B + 1]``, cumulative
    lengths from 0 (sequence b's queries are rows ``cu_seqlens_q[b]`` to ``cu_seqlens_q[b + 1]`` of q, its
    keys the same rows of k and v under ``cu_seqlens_k``); lengths of 0 allowed. ``max_seqlen_q``,
    ``max_seqlen_k``: Python ints at least every length (they size the grid). The offsets are checked
    on the host (a device synchronisation), except while a CUDA graph is being captured.

    Each sequence is attended to alone, as ``flash_attention`` would on it: ``causal`` masks
    bottom-right aligned per sequence (query i of a sequence with Nq queries and Nk keys sees keys
    j <= i + Nk - Nq); a query that sees no key gets zeros. ``scale`` defaults to 1/sqrt(D). With
    ``return_lse=True`` returns ``(out, lse)``: lse ``[H, total_q]`` float32, the natural-log logsumexp
    of each row's scaled logits (-inf for a row with no key; not differentiable). Differentiable once,
    with respect to q, k and v.
    """
    max_q, max_k = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    scale = check_scale(scale, q.shape[-1])
    cu_q, cu_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    out, lse = _FlashAttentionVarlen.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    return (out, lse) if return_lse else out
