"""Chapter 2: block-sparse FlashAttention.

The FlashAttention loop of chapter 1 visits every key block (or every block left of the causal
diagonal). Here each query block visits only the key blocks its ``BlockMask`` lists, so the work
and the bytes scale with the mask's density instead of with N^2:

    forward and dQ:  for each query block i, for t < kv_counts[i]: key block kv_indices[i, t]
    dK, dV:          for each key block j,   for t < q_counts[j]:   query block q_indices[j, t]

Blocks marked *full* need no element mask; *partial* blocks apply their ``block_size^2`` tile of
the element mask. Most partial tiles of real masks are diagonal bands (the causal diagonal, the far
edge of a sliding window): lo <= c - r <= hi at row r, column c of the tile, which the kernels draw
from two numbers instead of reading the tile; the others are read (from L2, mostly). Each row's visits
are listed full first, then band tiles, then the rest (``BlockMask.kernel_layout``), so every kernel
runs three loops: an unmasked one the compiler can pipeline, one that draws bands, one that reads tiles. The
kernels' tiles are cut from the mask's blocks (16 to 128), so a mask and the kernel can never disagree
about where blocks start: each visited block is streamed in pieces of STREAM keys (or, for dK/dV,
query rows), and a program may keep a SUB-row (SUB-key) part of a block resident. A query that
sees no key gets zeros.

The streamed tiles arrive through tensor descriptors (on a Hopper GPU, TMA: one instruction per tile
instead of an address per element) whenever the tensors allow it (unit stride along D, 16-byte aligned
rows); other layouts and older GPUs take the pointer loads. The dQ kernel also computes the backward's
delta = rowsum(dO * O) for its rows and writes it for the dK/dV kernel, which runs after it.
"""

from . import backward, forward, loads, mask_checks, op, plan
from .backward import launch_backward
from .forward import launch_forward
from .mask_checks import MAX_BLOCK_SIZE
from .op import BlockSparseAttentionFunction, block_sparse_attention
from .plan import launch_config, smem_need, tile_config

__all__ = ["MAX_BLOCK_SIZE", "BlockSparseAttentionFunction", "backward", "block_sparse_attention", "forward",
           "launch_backward", "launch_config", "launch_forward", "loads", "mask_checks", "op", "plan", "smem_need",
           "tile_config"]
