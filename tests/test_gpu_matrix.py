"""The GPU test matrix (issue 32): every public op × every dtype it accepts × every head dim (state size,
feature size) it accepts × the shapes that matter: grouped-query heads, Nq != Nk, partial tiles (lengths
that are not multiples of 64 or 128), several block (chunk) sizes. Forward and every gradient against
``mk.reference`` in float64, outputs poisoned, with ``minikernels.testing``'s bounds.

Sizes stay moderate (N <= 512, B·H <= 8): what the matrix buys is breadth, each configuration's tiles
compiled and launched once (shared memory that does not fit raises ``OutOfResources`` at launch). GPU
only: every test carries the ``gpu`` marker and is skipped under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attention_utils import assert_grad_close, check_flash, qkv

import minikernels as mk
from minikernels import masks
from minikernels.testing import assert_close, poisoned, randn, tolerance

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(mk.backend() != "cuda", reason="GPU matrix: needs a CUDA GPU")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
HEAD_DIMS = [16, 32, 64, 80, 128, 256]  # flash, decode and block-sparse accept 1 <= D <= 256 (80: padded)


def dtypes():
    return pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grad_out(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(mk.device())


# --------------------------------------------------------------------------------------------------
# softmax: row lengths across the fused (one read) and online (two passes) paths
# --------------------------------------------------------------------------------------------------

@dtypes()
@pytest.mark.parametrize("n", [1, 17, 1000, 4097, 20000, 40000])
def test_softmax(n, dtype):
    x = randn(2, 2, n, dtype=dtype, seed=n, scale=3.0).requires_grad_()
    with poisoned():
        y = mk.softmax(x)
    r = x.detach().double().requires_grad_()
    ref = mk.reference.softmax(r)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref, dtype, name="y")
    dy = _grad_out(y.shape, seed=n + 1)
    with poisoned():
        (dx,) = torch.autograd.grad(y, x, dy.to(dtype))
    (want,) = torch.autograd.grad(ref, r, dy.to(dtype).double())
    assert_grad_close(dx, want, dtype, "dx")


# --------------------------------------------------------------------------------------------------
# flash attention
# --------------------------------------------------------------------------------------------------

# (B, H, Hkv, Nq, Nk, causal): grouped-query heads everywhere; Nq < Nk and Nq > Nk (the first Nq - Nk
# rows then see no key under the causal mask); no length a multiple of 64
FLASH_SHAPES = {
    "gqa-nq100-nk333": (2, 4, 2, 100, 333, False),
    "gqa-nq100-nk333-causal": (2, 4, 2, 100, 333, True),
    "gqa4-nq257-nk130-causal": (1, 8, 2, 257, 130, True),
}


@dtypes()
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("shape", list(FLASH_SHAPES))
def test_flash_attention(shape, d, dtype):
    b, h, hkv, nq, nk, causal = FLASH_SHAPES[shape]
    check_flash(*qkv(b, h, hkv, nq, nk, d, dtype=dtype, seed=d + nq), causal=causal)


# --------------------------------------------------------------------------------------------------
# decode attention (forward only)
# --------------------------------------------------------------------------------------------------

# (B, H, Hkv, Nq, Nmax, cache_seqlens, num_splits, causal)
DECODE_SHAPES = {
    "gqa4-nq1-partial-lengths": (2, 4, 1, 1, 300, [137, 300], None, False),
    "gqa2-nq3-causal-empty-row": (2, 4, 2, 3, 257, [0, 257], 3, True),
    "mha-nq2-one-split": (2, 4, 4, 2, 512, [511, 64], 1, False),
}


@dtypes()
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("shape", list(DECODE_SHAPES))
def test_decode_attention(shape, d, dtype):
    b, h, hkv, nq, nmax, lengths, splits, causal = DECODE_SHAPES[shape]
    q, k, v = qkv(b, h, hkv, nq, nmax, d, dtype=dtype, seed=d + nmax)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=mk.device())
    with poisoned():
        out = mk.decode_attention(q, k, v, cache_seqlens=seqlens, num_splits=splits, causal=causal)
    ref = mk.reference.decode_attention(q.double(), k.double(), v.double(), cache_seqlens=seqlens, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype, name="out")


# --------------------------------------------------------------------------------------------------
# block-sparse attention: every block size the kernels take
# --------------------------------------------------------------------------------------------------

# block size -> (Nq, Nk, the mask): Nq != Nk where the builder allows it, partial last blocks
BLOCK_MASKS = {
    16: (200, 333, lambda: masks.causal(200, 333, block_size=16)),
    32: (300, 300, lambda: masks.sliding_window(300, 70, block_size=32)),
    64: (257, 400, lambda: masks.causal(257, 400, block_size=64)),
    128: (300, 300, lambda: masks.a_shape(300, 16, 100, block_size=128)),
}


def check_block_sparse(q, k, v, bm, seed=0):
    """mk.block_sparse_attention against mk.reference: output, dq, dk, dv."""
    dtype = q.dtype
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with poisoned():
        out = mk.block_sparse_attention(q, k, v, bm)
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = mk.reference.block_sparse_attention(*r, bm)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype, name="out")
    do = randn(*out.shape, dtype=dtype, seed=seed + 99)
    with poisoned():
        got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, r, do.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_grad_close(g, w, dtype, name)


@dtypes()
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("block_size", list(BLOCK_MASKS))
def test_block_sparse_attention(block_size, d, dtype):
    nq, nk, build = BLOCK_MASKS[block_size]
    bm = build()
    q = randn(2, 4, nq, d, dtype=dtype, seed=d + block_size)
    k, v = (randn(2, 2, nk, d, dtype=dtype, seed=d + block_size + i) for i in (1, 2))
    check_block_sparse(q, k, v, bm, seed=d)


# --------------------------------------------------------------------------------------------------
# linear attention: feature sizes Dk, value sizes Dv, chunk sizes, with and without a decay
# --------------------------------------------------------------------------------------------------

# (Dk, Dv, chunk, decay)
LINEAR_CONFIGS = [(16, 16, 64, True), (32, 64, 64, True), (64, 64, 64, True), (80, 48, 64, True),
                  (128, 128, 64, True), (128, 256, 64, True), (256, 64, 64, True), (64, 64, 16, True),
                  (64, 64, 32, True), (64, 64, 128, True), (64, 128, 64, False)]


def assert_decay_grad_close(got, want, q, dq, dtype):
    """The decay's gradient comes from dL/dG_t = q_t.dq_t - k_t.dk_t summed from t on, whose terms nearly
    cancel under a strong decay: the error is measured against the size of those terms (as in
    tests/test_linear_attention.py)."""
    terms = (q * dq).sum(-1).abs().flip(-1).cumsum(-1).flip(-1)
    scale = max(torch.linalg.vector_norm(want).item(), torch.linalg.vector_norm(terms).item())
    err = torch.linalg.vector_norm(got.double() - want).item() / scale
    assert err <= tolerance(dtype), f"ddecay: error {err:.2e} (relative to the cancelling terms) > {tolerance(dtype)}"


@dtypes()
@pytest.mark.parametrize("dk,dv,chunk,decay", [pytest.param(*c, id=f"dk{c[0]}-dv{c[1]}-chunk{c[2]}"
                                                            + ("" if c[3] else "-no-decay")) for c in LINEAR_CONFIGS])
def test_linear_attention(dk, dv, chunk, decay, dtype):
    b, h, n = 2, 2, 300
    g = _gen(dk * dv + chunk)
    q, k = (randn(b, h, n, dk, dtype=dtype, gen=g, scale=dk**-0.5) for _ in range(2))
    v = randn(b, h, n, dv, dtype=dtype, gen=g)
    dec = (-0.1 * torch.rand(b, h, n, generator=g)).to(mk.device()) if decay else None
    s0 = randn(b, h, dk, dv, gen=g)
    ins = [t.detach().requires_grad_() if t is not None else None for t in (q, k, v, dec, s0)]
    with poisoned():
        out, state = mk.linear_attention(*ins[:3], decay=ins[3], chunk_size=chunk, initial_state=ins[4],
                                         return_state=True)
    r = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, v, dec, s0)]
    ref_out, ref_state = mk.reference.linear_attention(*r[:3], decay=r[3], initial_state=r[4], return_state=True)
    assert out.dtype == dtype and out.shape == v.shape and state.dtype == torch.float32
    assert_close(out, ref_out, dtype, name="out")
    assert_close(state, ref_state, dtype, name="state")
    do, ds = _grad_out(out.shape, seed=1), _grad_out(state.shape, seed=2)
    leaves = [t for t in ins if t is not None]
    with poisoned():
        got = torch.autograd.grad((out.double() * do).sum() + (state.double() * ds).sum(), leaves)
    want = torch.autograd.grad((ref_out * do).sum() + (ref_state * ds).sum(), [t for t in r if t is not None])
    names = [nm for nm, t in zip(("dq", "dk", "dv", "ddecay", "dinitial_state"), ins) if t is not None]
    for name, a, w in zip(names, got, want):
        if name == "ddecay":
            assert_decay_grad_close(a, w, r[0], want[0], dtype)
        else:
            assert_close(a, w, dtype, name=name)


# --------------------------------------------------------------------------------------------------
# selective scan: every state size class, grouped and not, a length that is no multiple of a chunk
# --------------------------------------------------------------------------------------------------

SCAN_STATES = [1, 4, 16, 32, 33, 64, 128, 256]  # N <= 256 (scan.MAX_STATE); 33: padded to 64


@dtypes()
@pytest.mark.parametrize("n", SCAN_STATES)
def test_selective_scan(n, dtype):
    b, d, length = 2, 16, 300
    groups = 2 if n in (16, 33, 256) else None
    g = _gen(n)
    u = randn(b, d, length, dtype=dtype, gen=g)
    delta = randn(b, d, length, dtype=dtype, gen=g, scale=0.5)
    A = -torch.rand(d, n, generator=g).add(0.2).to(mk.device())
    shape = (b, n, length) if groups is None else (b, groups, n, length)
    B, C = (randn(*shape, dtype=dtype, gen=g, scale=n**-0.5) for _ in range(2))
    args = dict(u=u, delta=delta, A=A, B=B, C=C, D=randn(d, gen=g), z=randn(b, d, length, dtype=dtype, gen=g),
                delta_bias=randn(d, gen=g, scale=0.1))
    ins = {k: t.detach().requires_grad_() for k, t in args.items()}
    with poisoned():
        out, last = mk.selective_scan(**ins, delta_softplus=True, return_last_state=True)
    r = {k: t.detach().double().requires_grad_() for k, t in args.items()}
    ref, ref_last = mk.reference.selective_scan(**r, delta_softplus=True, return_last_state=True)
    assert out.dtype == dtype and out.shape == u.shape and last.dtype == torch.float32
    assert_close(out, ref, dtype, name="out")
    assert_close(last, ref_last, dtype, name="last state")
    dout, dlast = _grad_out(out.shape, seed=3), _grad_out(last.shape, seed=4)
    with poisoned():
        got = torch.autograd.grad((out.double() * dout).sum() + (last.double() * dlast).sum(), list(ins.values()))
    want = torch.autograd.grad((ref * dout).sum() + (ref_last * dlast).sum(), list(r.values()))
    for name, a, w in zip(ins, got, want):
        assert a.dtype == args[name].dtype, name
        assert_close(a, w, dtype, name=f"d{name}")


# --------------------------------------------------------------------------------------------------
# SSD: state sizes S, value sizes P, chunk sizes
# --------------------------------------------------------------------------------------------------

SSD_CONFIGS = [(16, 16, 64), (64, 64, 64), (64, 80, 32), (128, 64, 64), (128, 128, 128), (256, 64, 64),
               (64, 64, 16)]  # (S, P, chunk)


@dtypes()
@pytest.mark.parametrize("s,p,chunk", [pytest.param(*c, id=f"s{c[0]}-p{c[1]}-chunk{c[2]}") for c in SSD_CONFIGS])
def test_ssd(s, p, chunk, dtype):
    b, h, groups, n = 2, 4, 2, 300
    g = _gen(s * p + chunk)
    x = randn(b, h, n, p, dtype=dtype, gen=g)
    dt = F.softplus(torch.randn(b, h, n, generator=g) - 1.0).to(mk.device())
    A = -torch.rand(h, generator=g).add(0.5).to(mk.device())
    B, C = (randn(b, groups, n, s, dtype=dtype, gen=g, scale=s**-0.5) for _ in range(2))
    D = randn(h, gen=g)
    s0 = randn(b, h, s, p, gen=g)
    ins = [t.detach().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    with poisoned():
        y, state = mk.ssd(*ins[:5], chunk_size=chunk, D=ins[5], initial_state=ins[6], return_final_state=True)
    r = [t.detach().double().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    y_ref, state_ref = mk.reference.ssd(*r[:5], D=r[5], initial_state=r[6], return_final_state=True)
    assert y.dtype == dtype and y.shape == x.shape and state.dtype == torch.float32
    assert_close(y, y_ref, dtype, name="y")
    assert_close(state, state_ref, dtype, name="final state")
    dy, ds = _grad_out(y.shape, seed=5), _grad_out(state.shape, seed=6)
    with poisoned():
        got = torch.autograd.grad((y.double() * dy).sum() + (state.double() * ds).sum(), ins)
    want = torch.autograd.grad((y_ref * dy).sum() + (state_ref * ds).sum(), r)
    for name, a, w in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dinitial_state"), got, want):
        assert_close(a, w, dtype, name=name)
