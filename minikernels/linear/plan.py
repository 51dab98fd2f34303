"""The linear-attention kernels' plan: their tiles, and the choices of how to walk the sequence (how
many segments, which variant), each overridable through ``minikernels.planning`` (``"linear.*"``)."""

from __future__ import annotations

import triton

from .. import planning
from .._backend import is_interpreter
from .._common import shared_memory_limit, sm_count
from .common import block

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
# blocks. Where even that does not fit (mk.ssd's float32 at chunks of 128), the launch halves the Dk
# block (_common.launch_fitting). The shared memory each case takes is in book/notes/linear_attention.md.
DQDK_UNROLL_V = 2


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


def fused_smem(dk: int, dv: int, elem_bytes: int, chunk: int, cfg: dict, value_tiles: int = 1) -> int:
    """Shared memory (bytes) of a one-walk pass (cfg: its tiles, FWD_TILES["fused"] or BWD_TILES["dfused"]):
    num_stages copies of a chunk's Q and K ([C, Dk]) and value_tiles [C, BV] tiles (V; dO and V
    backwards), and the state's copy for the product. A little above what Triton allocates, so it errs
    on the side of the two passes: float32 with chunks of 128 and Dk = 128 needs 296 KB, more than an
    H100's or H200's 227 KB a program, and takes the two passes."""
    bk, bv = block(dk, fused_max_dk()), block(dv, cfg["BV"])
    return cfg["num_stages"] * chunk * (2 * bk + value_tiles * bv) * elem_bytes + bk * bv * elem_bytes


def _fused_fits(q, v, chunk: int, cfg: dict, value_tiles: int = 1) -> bool:
    limit = shared_memory_limit(q.device)  # None: the interpreter, no limit
    return limit is None or fused_smem(q.shape[-1], v.shape[-1], q.element_size(), chunk, cfg, value_tiles) <= limit


def _heads_per_program(per: int, most: int) -> int:
    return max(d for d in range(1, min(per, most) + 1) if per % d == 0)


def _state_grad_segments(q, dv: int, chunk: int) -> int:
    # how many segments state_grads' reverse walk takes (segments, for its programs)
    B, H, N, DK = q.shape
    cfg = BWD_TILES["dstates"]
    programs = triton.cdiv(DK, block(DK, cfg["BK"])) * triton.cdiv(dv, block(dv, cfg["BV"])) * B * H
    return segments(programs, triton.cdiv(N, chunk), sm_count(q.device))


# The choices, as the kernels ask for them: each the rule above unless minikernels.planning overrides it.

def segments(programs: int, n_chunks: int, sms: int) -> int:
    """How many segments the state pass cuts the sequence into ("linear.segments")."""
    return planning.decide("linear.segments", _segments, programs, n_chunks, sms)


def fused_segments(programs: int, n_chunks: int, sms: int) -> int:
    """How many segments the one-walk passes cut the sequence into ("linear.fused_segments")."""
    return planning.decide("linear.fused_segments", _fused_segments, programs, n_chunks, sms)


def state_grad_segments(q, dv: int, chunk: int) -> int:
    """How many segments the reverse state pass cuts the sequence into ("linear.state_grad_segments")."""
    return planning.decide("linear.state_grad_segments", _state_grad_segments, q, dv, chunk)


def fused_max_dk() -> int:
    """The widest Dk the one-walk passes take ("linear.fused_max_dk")."""
    return planning.decide("linear.fused_max_dk", FUSED_MAX_DK)


def fused_fits(q, v, chunk: int, cfg: dict, value_tiles: int = 1) -> bool:
    """Whether a one-walk pass's tiles fit in shared memory ("linear.fused_fits")."""
    return planning.decide("linear.fused_fits", _fused_fits, q, v, chunk, cfg, value_tiles)


def heads_per_program(per: int, most: int) -> int:
    """How many heads one dQ/dK program takes when Q and K are shared ("linear.dqdk_heads"): the largest
    divisor of ``per`` (the heads sharing them) up to ``most``."""
    return planning.decide("linear.dqdk_heads", _heads_per_program, per, most)


def dqdk_unroll_v() -> int:
    """Up to how many Dv blocks _la_dqdk unrolls its loop over them ("linear.dqdk_unroll_v")."""
    return planning.decide("linear.dqdk_unroll_v", DQDK_UNROLL_V)
