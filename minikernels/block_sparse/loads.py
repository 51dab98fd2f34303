"""How the kernels read a tile of K, V, Q or dO: through pointers (with or without bounds masks) or
through a tensor descriptor (TMA)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(base, idx, stride_n, stride_d, n_valid, d_ok, EVEN: tl.constexpr):
    # a [BLOCK, HEAD_DIM] tile of rows idx; masks only where the tile can overhang (ragged N or D)
    ptrs = base + idx[:, None] * stride_n + tl.arange(0, d_ok.shape[0])[None, :] * stride_d
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(idx[:, None] < n_valid) & d_ok[None, :], other=0.0)


@triton.jit
def load_cols(base, idx, stride_n, stride_d, n_valid, d_ok, EVEN: tl.constexpr):
    # the transposed tile, [HEAD_DIM, BLOCK]
    ptrs = base + idx[None, :] * stride_n + tl.arange(0, d_ok.shape[0])[:, None] * stride_d
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(idx[None, :] < n_valid) & d_ok[:, None], other=0.0)


@triton.jit
def tma_rows(desc, b, h, row0, STREAM: tl.constexpr, HEAD_DIM: tl.constexpr):
    # a [STREAM, HEAD_DIM] tile by the tensor memory accelerator: one instruction instead of a pointer
    # per element, and rows past N (or columns past D) arrive as zeros
    return desc.load([b, h, row0, 0]).reshape(STREAM, HEAD_DIM)
