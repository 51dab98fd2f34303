"""``block_sparse_attention``: the autograd Function and the public entry point."""

from __future__ import annotations

import torch

from .._autograd import once_differentiable
from .._backend import on_device_of
from .._common import compute_dtype
from .._validate import check_attention_inputs, check_scale, int32_addressable
from ..masks import BlockMask
from .backward import launch_backward
from .forward import launch_forward
from .mask_checks import check_block_mask


class BlockSparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bm, scale):
        dtype = q.dtype
        work = compute_dtype(dtype)
        qw, kw, vw = (int32_addressable(n, t.to(work)) for n, t in (("q", q), ("k", k), ("v", v)))
        with on_device_of(q):
            o, lse = launch_forward(qw, kw, vw, bm, scale)
        ctx.save_for_backward(qw, kw, vw, o, lse)
        ctx.graph_inputs = (q, k, v)  # for once_differentiable (no data is read from them)
        ctx.bm, ctx.scale, ctx.dtype = bm, scale, dtype
        return o.to(dtype)

    @staticmethod
    @once_differentiable  # the backward is kernels: a second derivative raises, never detaches
    def backward(ctx, do):
        qw, kw, vw, o, lse = ctx.saved_tensors
        with on_device_of(qw):
            do_w = int32_addressable("grad of out", do.to(qw.dtype))
            dq, dk, dv = launch_backward(qw, kw, vw, o, lse, do_w, ctx.bm, ctx.scale)
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None, None


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                           scale: float | None = None) -> torch.Tensor:
    """Attention that visits only the tiles ``block_mask`` lists (forward and backward in Triton).

    q ``[B, H, Nq, D]``; k, v ``[B, Hkv, Nk, D]`` (grouped-query heads allowed), any strides;
    ``block_mask`` built for ``q_len = Nq``, ``kv_len = Nk`` with a block size of 16 to 128 (the
    kernels' tile), on the same device. One mask serves every batch and head. Element masks apply
    only on the partial blocks; a query that sees no key gets zeros. ``scale`` defaults to 1/sqrt(D).
    float16, bfloat16 or float32 (on the GPU, float32 products in 3-pass tf32, or single-pass tf32 on a
    GPU whose shared memory cannot hold the split operands: none on an H100 or H200), D up to 256; the
    pieces of a block each program keeps and streams are fitted to the device's shared memory
    (``tile_config``). Empty inputs (B, H, Nq or Nk = 0) give empty or zero outputs that stay in the
    autograd graph.
    Differentiable once: a gradient taken with ``create_graph=True`` cannot be differentiated again
    (backward through it raises a RuntimeError).

    The kernels follow the mask's indices without bounds checks, so the mask is checked first: the
    shapes, dtypes (int32 indices and counts, bool flags and tiles) and devices of its tensors on
    every call, and its values (counts within the width of the index lists, counted block indices in
    range and increasing, tile numbers in range, the key-side lists the same visits as the query-side
    ones) the first time a mask is used and again after any in-place change to its tensors. That value
    check reads the mask on the host: a device synchronisation, once per mask, which also means that
    a mask must be used once before a CUDA graph that uses it is captured. Masks from
    ``minikernels.masks`` always pass.
    """
    check_attention_inputs(q, k, v)
    block_mask = check_block_mask(block_mask, q, k)
    scale = check_scale(scale, q.shape[-1])
    # empty inputs go through the autograd function too, so that the output stays in the graph
    return BlockSparseAttentionFunction.apply(q, k, v, block_mask, scale)
