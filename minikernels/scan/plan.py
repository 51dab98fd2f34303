"""The scan kernels' plan: tiles, warps and variants by state size, each overridable through
``minikernels.planning`` (``"scan.*"``)."""

from __future__ import annotations

from .._backend import is_interpreter
from .._common import MAX_GRID_YZ

MAX_STATE = 256


# The forward's tiles: BD channels by T steps by all states, two chunks (2T steps) an iteration. T = 4
# steps of B or C are one vector load, so the steps of a (channel, state) pair land in one thread; with
# BD = 8 Triton 3.6 spreads a warp over 8 channels by 4 groups of states (4 states a thread). Chosen by
# sweeps on the H200 at B = 8, D = 2048, N = 4096, n = 16 (BD, T, what is loaded ahead, the fast log),
# recorded with what else was tried in book/notes/selective_scan.md. For n <= 32 (the tuned case),
# bf16 B and C stay bf16 ("pack_bf16"; exact, and half the bytes of float32 to move from L1 to the
# registers) and ptxas is capped at 128 registers for every dtype ("maxnreg": 16 warps an SM, all of
# B8 D2048's 2048 programs at once, no spills). Other dtypes: float32 B and C (capped too up to n = 32);
# larger n: float32 B and C and no cap (no spills at n = 64 or 256 either). The loop's order for each n:
# fwd_variant. One channel a thread (BD = 32, no sum across lanes) compiles to fewer instructions but
# leaves one warp an SM quadrant for B8 D2048, too few to hide a load's latency; this layout is bound by
# issuing instructions instead, not by waiting for B and C.
FWD_CONFIG = {"BD": 8, "T": 4, "num_warps": 1, "fast_log": True, "pack_bf16": True, "maxnreg": 128}


MAX_GRID_Y = MAX_GRID_YZ  # CUDA's limit on a grid's second axis (the batch's here)


def fast_log() -> bool:
    # softplus's logarithm by the GPU's lg2.approx (forward and backward alike); the interpreter has no PTX
    return FWD_CONFIG["fast_log"] and not is_interpreter()


def fwd_blocks(n_pad: int) -> tuple[int, int, int]:
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


def save_every_rule() -> int:
    # how often the forward saves the state for the backward (a multiple of both kernels' steps an iteration)
    return 16 if is_interpreter() else BWD_CONFIG["save_every"]


def bwd_shift(n_pad: int) -> bool:
    # SHIFT in _scan_bwd: the decays one step later shifted in registers, or taken again from delta (a third
    # exponential per step). Shifting saves exponentials where a chunk's steps lie in one thread (n <= 64);
    # from n = 128 on there is one channel a program, a chunk's steps span lanes, and the shifted tile only
    # adds spills (timings: book/notes/selective_scan.md)
    return n_pad <= 64


def bwd_blocks(n_pad: int, per_group: int, warps: int | None = None) -> tuple[int, int, int]:
    # warps: other than BWD_CONFIG's (a GPU test's override)
    if is_interpreter():
        bd, steps, warps = 4, 8, 1
    else:  # at most 128 (channel, state) pairs a warp (256 at n = 256: one channel), as in the forward
        bd, steps, warps = BWD_CONFIG["BD"], BWD_CONFIG["T"], warps or BWD_CONFIG["num_warps"]
        bd = max(1, min(bd, 128 * warps // n_pad))
    while per_group % bd:  # a block of channels must not straddle two groups (their dB, dC sums differ)
        bd //= 2
    return bd, steps, warps


def wide_offsets(length: int, bc_len: int, *tensors) -> bool:
    # whether the forward's offsets along the sequence (step * stride for u, delta, z; step * BN within a batch's
    # B and C, at most bc_len) can pass 2^31 and must be computed in 64 bits
    longest = max([t.stride(-1) * length for t in tensors if t is not None] + [bc_len])
    return longest >= 2**31


def fwd_variant(n_pad: int, packed: bool) -> tuple[bool, bool]:
    # The forward's loop for n states padded to n_pad: (PAIRED, PREP_LATE), the fastest of a sweep on the
    # H200 (book/notes/selective_scan.md):
    # - one chunk an iteration only at n = 33..64, where a warp holds 2 channels and the paired tiles of
    #   delta, u, z are smaller than a warp;
    # - delta, u, z prepared in their own iteration (fewer registers live) at n > 64 and for packed bf16;
    #   float32 B and C at n <= 64 keep the prepare-ahead order.
    return n_pad != 64, packed or n_pad >= 128
