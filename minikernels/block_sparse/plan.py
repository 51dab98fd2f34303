"""The block-sparse kernels' plan: the pieces of a mask's block each program keeps and streams, fitted to
the device's shared memory, each overridable through ``minikernels.planning`` (``"block_sparse.*"``)."""

from __future__ import annotations

import functools

import torch

from .. import planning
from .._backend import is_interpreter, tma_ready
from .._common import (
    MAX_GRID_YZ,
    TF32_FALLBACK,
    batch_slices,
    fit_shared_memory,
    head_dim_pad,
    launch_fitting,
    shared_memory_limit,
    smem_estimate,
    split_operands,
)
from ..masks import BlockMask


def _tuned_config(kernel: str, block: int, head_dim: int, elem_bytes: int) -> dict:
    """The configuration tuned on an H100 / H200 for a mask's block size (before fitting it to the device)."""
    big = block * head_dim >= 128 * 128
    if elem_bytes == 2 and head_dim <= 128:
        # 16-bit, D <= 128. The backward keeps 64-row parts of a block resident and streams 64-row
        # pieces in a 2-deep pipeline: its five live tiles fit in registers only at that size (whole
        # 128-blocks spill). The forward keeps a whole 128-row block in 8 warps and streams 64-key
        # pieces, capped at 128 registers a thread (it compiles to that without spilling) so that two
        # programs share an SM and one's loads and epilogue hide under the other's matrix work.
        # The sweeps behind these choices: book/notes/block_sparse.md.
        if kernel == "fwd":
            return {"SUB": min(block, 128), "STREAM": min(block, 64), "num_warps": 8, "num_stages": 2, "TMA": True,
                    "maxnreg": 128}
        return {"SUB": min(block, 64), "STREAM": min(block, 64), "num_warps": 4, "num_stages": 2, "TMA": True}
    # float32, or a head dim past 128: whole blocks; one stage in the backward, whose five live tiles
    # leave no room for a second copy of the streamed ones (fit_shared_memory takes them down to what
    # the device holds: on an H100, float32 blocks of 128 do not fit whole)
    return {"SUB": block, "STREAM": block, "num_warps": 8 if big else 4, "num_stages": 3 if kernel == "fwd" else 1,
            "TMA": False}


def smem_need(kernel: str, cfg: dict, head_dim: int, elem_bytes: int) -> int:
    """``_common.smem_estimate`` for one kernel at ``cfg`` and head dim ``head_dim``. Each kernel keeps
    two operands of SUB rows resident (the forward one) and streams two STREAM-row tiles, with the
    partial blocks' element-mask tile (SUB x STREAM bytes) and, in dK/dV, the streamed rows' lse and delta.
    Loads through tensor descriptors keep ``num_stages + 1`` copies of the streamed tiles (Triton 3.9 on
    sm_90 allocates up to that many across the kernels' three loops)."""
    sub, stream, stages = cfg["SUB"], cfg["STREAM"], cfg["num_stages"]
    head_dim = head_dim_pad(head_dim)
    resident = (1 if kernel == "fwd" else 2) * sub * head_dim  # q (forward); q, dO (dQ); k, v (dK/dV)
    extra = sub * stream + (8 * stream if kernel == "dkdv" else 0)
    return smem_estimate(resident, (stream * head_dim, stream * head_dim), elem_bytes, stages, extra,
                         buffers=stages + 1 if cfg.get("TMA") else None, split=split_operands(cfg, elem_bytes))


def tile_config(kernel: str, block: int, head_dim: int, elem_bytes: int, smem_limit: int | None) -> dict:
    """The planning seam: the launch configuration of one kernel (``"fwd"``, ``"dq"`` or ``"dkdv"``) for a
    mask's block size, on a GPU whose programs may use ``smem_limit`` bytes of shared memory (None: no
    limit), for inputs of ``elem_bytes`` bytes (4: float32, 2: float16 / bfloat16) and head dim
    ``head_dim``. A pure function: the tuned configuration (``_tuned_config``), fitted to ``smem_limit``
    by ``_common.fit_shared_memory`` (fewer stages, then smaller SUB / STREAM pieces of the block).

    STREAM: the keys (forward, dQ) or query rows (dK/dV) streamed per step, a piece of the mask's
    block; SUB: the query rows (forward, dQ) or keys (dK/dV) one program keeps resident.
    """
    pad = head_dim_pad(head_dim)
    return fit_shared_memory(_tuned_config(kernel, block, head_dim, elem_bytes),
                             lambda c: smem_need(kernel, c, pad, elem_bytes), smem_limit, ("STREAM", "SUB"),
                             resident="SUB", relaxed=TF32_FALLBACK if elem_bytes == 4 else None)


@functools.cache
def _planned(kernel: str, block: int, head_dim: int, elem_bytes: int, smem_limit: int | None) -> dict:
    return tile_config(kernel, block, head_dim, elem_bytes, smem_limit)  # planned once per launch shape


def _default_config(kernel: str, block: int, head_dim: int, elem_bytes: int) -> dict:
    if is_interpreter():  # small pieces, so that the CPU tests exercise the piece and sub-block indexing
        return {"SUB": min(block, 16), "STREAM": min(block, 32), "num_warps": 4, "num_stages": 1, "TMA": True}
    return _planned(kernel, block, head_dim, elem_bytes, shared_memory_limit())


def launch_config(kernel: str, block: int, head_dim: int, elem_bytes: int) -> dict:
    """The configuration one kernel ("fwd", "dq" or "dkdv") launches with for a mask's block size:
    ``tile_config`` for the current device's shared memory (small pieces under the interpreter), or the
    planning override ``"block_sparse.<kernel>"`` (``minikernels.planning``)."""
    return dict(planning.decide(f"block_sparse.{kernel}", lambda b, d, e: _default_config(kernel, b, d, e),
                                block, head_dim, elem_bytes))


def launch_fitted(key, cfg: dict, launch) -> None:
    # a configuration the compiler finds too large for this GPU's shared memory steps down: fewer stages,
    # then smaller pieces of the block (STREAM, then SUB), then (float32) single-pass tf32
    launch_fitting(key, cfg, launch, ("STREAM", "SUB"), resident="SUB",
                   relaxed=TF32_FALLBACK if key[3] == 4 else None)


def batch_slices_of(batch: int, heads: int) -> list[tuple[int, int]]:
    """[lo, hi) batch ranges, one launch each: the grids put (batch, head) on their second axis (at most
    MAX_GRID_YZ programs); the mask is shared by every (batch, head), the tensors are addressed through
    batch strides and the logsumexp and delta rows by (batch, head), so a slice is a set of views."""
    return batch_slices(batch, heads, planning.decide("block_sparse.max_grid_y", MAX_GRID_YZ),
                        "block_sparse_attention")


def streamed_sources(cfg: dict, rows: int, head_dim: int, *ts: torch.Tensor) -> tuple[dict, tuple]:
    # the kernel's TMA flag and what it reads the streamed tensors through: descriptors of
    # [1, 1, rows, head_dim] tiles, or (inputs a descriptor cannot describe) the tensors themselves
    # (a descriptor cannot describe an empty tensor; nothing is read from one anyway)
    tma = cfg.get("TMA", False) and all(t.numel() > 0 for t in ts) and tma_ready(*ts)
    if not tma:
        return {**cfg, "TMA": False}, ts
    from triton.tools.tensor_descriptor import TensorDescriptor

    return cfg, tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, head_dim]) for t in ts)


def even_tiles(bm: BlockMask, d: int) -> bool:
    # no tile overhangs the ends of Q, K or the head dim: the kernels may skip every bounds mask
    return bm.q_len % bm.block_size == 0 and bm.kv_len % bm.block_size == 0 and head_dim_pad(d) == d
