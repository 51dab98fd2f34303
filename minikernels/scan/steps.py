"""The Triton pieces both scan kernels use: the affine step's combine, softplus, loads and unpacking."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import TL_LN2


@triton.jit
def affine_combine(a1, b1, a2, b2):
    # apply step 1, then step 2: h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def log2_fast(x, FAST: tl.constexpr):
    # FAST: the GPU's approximate log2, one special-function instruction (absolute error about 2^-22),
    # instead of libdevice's polynomial of some twenty instructions; the interpreter runs tl.log2.
    # softplus takes log(1 + y) only for y >= 1e-4, where rounding 1 + y to float32 costs as much
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    return tl.log2(x)


@triton.jit
def softplus(x, FAST_LOG: tl.constexpr):
    # log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), with log(1 + y) ~ y - y^2/2 where y is tiny
    # (log1p is not portable to the interpreter); the same function in forward and backward
    y = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(y < 1e-4, y - 0.5 * y * y, log2_fast(1.0 + y, FAST_LOG) * TL_LN2)


@triton.jit
def last_step(x, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr):
    # x[:, :, T - 1] of a [BD, BN, T] tile (T a power of two up to 16): halving the last axis and keeping
    # the odd positions keeps the last one. Free when the T steps lie within one thread.
    if T >= 2:
        x = tl.split(tl.reshape(x, [BD, BN, T // 2, 2]))[1]
    if T >= 4:
        x = tl.split(tl.reshape(x, [BD, BN, T // 4, 2]))[1]
    if T >= 8:
        x = tl.split(tl.reshape(x, [BD, BN, T // 8, 2]))[1]
    if T >= 16:
        x = tl.split(tl.reshape(x, [BD, BN, T // 16, 2]))[1]
    return tl.reshape(x, [BD, BN])


@triton.jit
def load_f32(ptrs, mask):
    # a [BD, J] tile of delta, u or z as float32; the mask is constant along J, so the load stays a vector
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def prepare_step(raw, u, z, bias, dskip, mask, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
              SOFTPLUS: tl.constexpr, FAST_LOG: tl.constexpr):
    # what depends on (channel, step) alone, on a [BD, J] tile with one owner per element (so once per
    # channel and step, not once per state): delta_t, delta_t u_t, the skip D u_t and the gate silu(z_t).
    # Steps past the sequence's end (N) get delta 0: the map (1, 0) leaves h unchanged.
    if HAS_BIAS:
        raw += bias[:, None]
    dl = raw
    if SOFTPLUS:
        dl = softplus(raw, FAST_LOG)
    dl = tl.where(mask, dl, 0.0)
    skip = dskip[:, None] * u if HAS_D else dl
    gate = z * tl.sigmoid(z) if HAS_Z else dl
    return dl, dl * u, skip, gate


@triton.jit
def unpack_bc(x, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, PACKED: tl.constexpr):
    # B or C [BD, BN, T] as float32. PACKED: x holds two bf16 steps per 32-bit word ([BD, BN, T / 2]); a
    # bf16 is the top half of a float32, so each unpacks with one shift or one mask (the compiler's
    # conversion spends two instructions on every other element)
    if PACKED:
        lo = (x << 16).to(tl.float32, bitcast=True)
        hi = (x & -65536).to(tl.float32, bitcast=True)
        out = tl.reshape(tl.join(lo, hi), [BD, BN, T])
    else:
        out = x.to(tl.float32)
    return out
