"""Chapter 0: a fused row softmax.

    y_ij = exp(x_ij - m_i) / sum_k exp(x_ik - m_i),   m_i = max_k x_ik

Bytes, for M rows of N elements of b bytes each (the reason to fuse):
  * PyTorch written op by op (max, subtract, exp, sum, divide) reads ~5MN and writes ~3MN elements;
  * this kernel reads x once and writes y once: 2MNb bytes, the least any softmax can move.
Softmax does ~5 FLOPs per element, so its arithmetic intensity is ~5 / (2b) FLOP/byte: far left of
the H200's ridge point. The kernel is memory-bound and its goal is the copy bandwidth.

Rows up to ``MAX_FUSED_COLS`` elements are held on chip whole (one read, one write). Longer rows use
the online softmax of Milakov and Gimelshein (2018): a first pass keeps a running max and a running
sum rescaled whenever the max grows, a second pass writes exp(x - m) / l. That reads x twice, but
the row was just touched, so the second read is mostly served from L2 and DRAM still sees one read.
Backward, with y saved by the forward:

    dx = y * (dy - rowsum(dy * y))

has the same shape: one read of y and dy and one write of dx when the row fits, two passes otherwise.

A row whose entries are all -inf (fully masked) gives zeros rather than NaN.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import planning
from ._alloc import empty
from ._autograd import once_differentiable
from ._backend import on_device_of
from ._common import TL_LOG2E
from ._validate import check_tensor, int32_addressable, normalize_dim

# Rows longer than this (per dtype) are processed in blocks by the online (two-pass) kernels.
# A whole 16-bit row of 32768 held on chip keeps one program per SM busy with arithmetic while
# nothing loads, so the two-pass kernel (whose second read hits L2) is the faster one there;
# float32 rows, with twice the bytes per element, stay memory-bound and are best fused up to 32768.
# The measurements behind these limits: book/notes/softmax.md. Tests lower these (planning choices
# "softmax.*") to reach the two-pass path at sizes the interpreter runs quickly.
MAX_FUSED_COLS = {torch.float32: 32768, torch.float16: 16384, torch.bfloat16: 16384}
# The backward has no exponentials, so it stays memory-bound fused up to 32768 columns.
MAX_FUSED_COLS_BWD = 32768
# Block width of the two-pass kernels (with 16 warps; chosen by measurement, book/notes/softmax.md).
ONLINE_BLOCK_N = 16384


def _online_block(n_cols: int) -> int:
    return min(planning.decide("softmax.online_block", ONLINE_BLOCK_N), triton.next_power_of_2(n_cols))


@triton.jit
def _softmax_fwd_fused(x_ptr, y_ptr, M, N, stride_xm, stride_xn, stride_ym, stride_yn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program owns BLOCK_M whole rows; several rows per program only when rows are short.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)[:, None]
    # read M*N: padding lanes hold -inf so that they add exp(-inf) = 0 to the sum
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :] * stride_xn, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    m = tl.max(x, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)  # fully masked row: exp(-inf - 0) = 0, not exp(nan)
    e = tl.exp2((x - m[:, None]) * TL_LOG2E)  # exp(t) = 2^(t log2 e): ex2 is the fast unit
    l = tl.sum(e, axis=1)
    inv_l = 1.0 / tl.where(l == 0.0, 1.0, l)  # fully masked row: 0 * 1 = 0
    y = e * inv_l[:, None]  # one reciprocal per row, a multiply per element
    # write M*N
    tl.store(y_ptr + rows64 * stride_ym + cols[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_fwd_online(x_ptr, y_ptr, N, stride_xm, stride_xn, stride_ym, stride_yn, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    y_row = y_ptr + row * stride_ym
    # Pass 1, the online normalizer: a running max m and sum l = sum exp(x - m). When a block raises
    # the max, the sum so far is rescaled by exp(m_old - m_new). Work in base 2: exp(t) = 2^(t log2 e).
    m = float("-inf")
    l = 0.0
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_row + cols * stride_xn, mask=cols < N, other=float("-inf"))  # read N
        x = x.to(tl.float32) * TL_LOG2E
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: keep l = 0, not NaN
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe), axis=0)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    inv_l = 1.0 / tl.where(l == 0.0, 1.0, l)
    # Pass 2: normalise and write. The row was just read, so these reads mostly hit L2.
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(x_row + cols * stride_xn, mask=cols < N, other=float("-inf"))  # read N (from L2)
        y = tl.exp2(x.to(tl.float32) * TL_LOG2E - m) * inv_l
        tl.store(y_row + cols * stride_yn, y.to(y_ptr.dtype.element_ty), mask=cols < N)  # write N


@triton.jit
def _softmax_bwd_fused(y_ptr, dy_ptr, dx_ptr, M, N, stride_ym, stride_yn, stride_dym, stride_dyn,
                       stride_dxm, stride_dxn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)[:, None]
    y = tl.load(y_ptr + rows64 * stride_ym + cols[None, :] * stride_yn, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64 * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0).to(tl.float32)
    dot = tl.sum(y * dy, axis=1)  # rowsum(dy * y)
    dx = y * (dy - dot[:, None])
    tl.store(dx_ptr + rows64 * stride_dxm + cols[None, :] * stride_dxn, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_online(y_ptr, dy_ptr, dx_ptr, N, stride_ym, stride_yn, stride_dym, stride_dyn,
                        stride_dxm, stride_dxn, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * stride_ym
    dy_row = dy_ptr + row * stride_dym
    dx_row = dx_ptr + row * stride_dxm
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):  # pass 1: rowsum(dy * y)
        cols = start + tl.arange(0, BLOCK_N)
        y = tl.load(y_row + cols * stride_yn, mask=cols < N, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols * stride_dyn, mask=cols < N, other=0.0).to(tl.float32)
        acc += y * dy
    dot = tl.sum(acc, axis=0)
    for start in range(0, N, BLOCK_N):  # pass 2: dx = y * (dy - dot)
        cols = start + tl.arange(0, BLOCK_N)
        y = tl.load(y_row + cols * stride_yn, mask=cols < N, other=0.0).to(tl.float32)
        dy = tl.load(dy_row + cols * stride_dyn, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(dx_row + cols * stride_dxn, (y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=cols < N)


def _fused_launch_params(M: int, N: int) -> tuple[int, int, int]:
    """Tile (BLOCK_M, BLOCK_N) and warps for the one-pass kernels: a whole row per tile row, and
    several short rows per program so that every program moves at least ~4K elements."""
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(M), 64))
    elements = block_m * block_n
    # Warps grow with the tile: 4 up to 8K elements, then 8 (16K) and 16 (32K); chosen by
    # measurement (book/notes/softmax.md).
    num_warps = max(4, min(16, elements // 2048))
    return block_m, block_n, num_warps


def launch_forward_2d(x: torch.Tensor) -> torch.Tensor:
    M, N = x.shape
    y = empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if N <= planning.decide("softmax.max_fused_cols", lambda dtype: MAX_FUSED_COLS[dtype], x.dtype):
        block_m, block_n, num_warps = _fused_launch_params(M, N)
        _softmax_fwd_fused[(triton.cdiv(M, block_m),)](
            x, y, M, N, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    else:
        _softmax_fwd_online[(M,)](x, y, N, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                                  BLOCK_N=_online_block(N), num_warps=16)
    return y


def launch_backward_2d(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    M, N = y.shape
    dx = empty((M, N), dtype=y.dtype, device=y.device)
    if M == 0 or N == 0:
        return dx
    if dy.dtype != y.dtype:
        dy = dy.to(y.dtype)
    if N <= planning.decide("softmax.max_fused_cols_bwd", MAX_FUSED_COLS_BWD):
        block_m, block_n, num_warps = _fused_launch_params(M, N)
        _softmax_bwd_fused[(triton.cdiv(M, block_m),)](
            y, dy, dx, M, N, y.stride(0), y.stride(1), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    else:
        _softmax_bwd_online[(M,)](
            y, dy, dx, N, y.stride(0), y.stride(1), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
            BLOCK_N=_online_block(N), num_warps=16)
    return dx


class _Softmax2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d):
        # rows are addressed with 64-bit offsets, positions inside a row with 32-bit ones
        with on_device_of(x2d):
            y2d = launch_forward_2d(int32_addressable("x", x2d, inner_dims=1))
        ctx.save_for_backward(y2d)
        ctx.graph_inputs = (x2d,)  # for once_differentiable (no data is read from it)
        return y2d

    @staticmethod
    @once_differentiable  # the backward is a kernel: a second derivative raises, never detaches
    def backward(ctx, dy2d):
        (y2d,) = ctx.saved_tensors
        with on_device_of(y2d):
            return launch_backward_2d(y2d, int32_addressable("grad of y", dy2d, inner_dims=1))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] without a copy when the strides allow it (any 2-D strided view works)."""
    n = t.shape[-1]
    m = math.prod(t.shape[:-1])
    try:
        return t.view(m, n)
    except RuntimeError:  # leading dims not collapsible into one stride: copy once
        return t.reshape(m, n)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of ``x`` along ``dim``, fused into one Triton kernel (forward and backward).

    ``x``: any shape with at least one dimension, float32/float16/bfloat16, any strides. Computes in
    float32 and returns ``x``'s dtype. Rows of any length. A row of all ``-inf`` gives zeros.
    Differentiable once: a gradient taken with ``create_graph=True`` cannot be differentiated again
    (backward through it raises a RuntimeError).
    """
    check_tensor("x", x, min_ndim=1, shape_hint="(softmax needs an axis to normalise over)")
    dim = normalize_dim(dim, x.dim())
    moved = x.movedim(dim, -1)
    rows = _as_rows(moved)
    y = _Softmax2d.apply(rows)
    return y.view(moved.shape).movedim(-1, dim)
