"""What the linear-attention kernels share: the per-chunk cumulative log-decay and decay mask (in
Triton), and the launch options and per-step arguments (on the host)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import dot_options, is_interpreter


@triton.jit
def chunk_cumsum(G, g_base, stride_gn, rows, row_ok, C: tl.constexpr, HAS_DECAY: tl.constexpr):
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
def decay_mask(b, C: tl.constexpr, TRANSPOSED: tl.constexpr):
    # exp(b_t - b_s) for s <= t at [t, s] (or at [s, t] when TRANSPOSED), 0 elsewhere; masked before
    # exp, since above the diagonal b_t - b_s > 0 could overflow
    offs = tl.arange(0, C)
    if TRANSPOSED:
        return tl.exp(tl.where(offs[:, None] <= offs[None, :], b[None, :] - b[:, None], float("-inf")))
    return tl.exp(tl.where(offs[:, None] >= offs[None, :], b[:, None] - b[None, :], float("-inf")))


def block(d: int, most: int) -> int:
    return max(16, min(most, triton.next_power_of_2(d)))  # at least 16: tl.dot's smallest tile


def launch_opts(dtype, num_warps: int = 4, num_stages: int = 2, maxnreg: int | None = None) -> dict:
    # maxnreg: a cap on registers a thread, applied to 16-bit inputs only (float32 tiles hold twice
    # the bytes and would spill under it)
    opts = {"num_warps": num_warps, "num_stages": 1 if is_interpreter() else num_stages}
    if maxnreg is not None and not is_interpreter() and torch.empty((), dtype=dtype).element_size() == 2:
        opts["maxnreg"] = maxnreg
    return {**opts, **dot_options(dtype)}


def tile_opts(dtype, cfg: dict, num_warps: int | None = None) -> dict:
    # the launch options of one of FWD_TILES' or BWD_TILES' entries (a register cap where it names one)
    return launch_opts(dtype, num_warps or cfg["num_warps"], cfg["num_stages"], cfg.get("maxnreg"))


def per_step_args(g, q):
    # (tensor, strides, present) for the kernels, of a [B, H, N] input: the log-decay or the value
    # weights; a dummy when there is none
    if g is None:
        return q, (0, 0, 0), False
    return g, g.stride(), True
