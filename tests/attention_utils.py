"""Shared helpers for the attention tests: inputs, and a forward + gradient check against the float64
reference with outputs poisoned."""

import torch

import minikernels as mk
from minikernels.testing import assert_close, poisoned, randn, tolerance


def assert_grad_close(g, w, dtype, name):
    """Like assert_close, except where the exact gradient is identically zero (a row with one
    visible key has dS = P (dP - delta) = 0): there a relative error means nothing, and the kernel's
    rounding noise must stay below the bound elementwise instead."""
    assert g.shape == w.shape and g.dtype == dtype, (name, g.shape, w.shape, g.dtype)
    if w.numel() == 0:  # no element: the shape is all there is to check
        return
    if torch.count_nonzero(w) == 0:
        assert g.abs().max().item() <= tolerance(dtype), f"{name}: {g.abs().max().item():.2e} where 0 is exact"
    else:
        assert_close(g, w, dtype, name=name)


def qkv(b, h, hkv, nq, nk, d, dtype=torch.float32, seed=0, scale=1.0):
    q = randn(b, h, nq, d, dtype=dtype, seed=seed, scale=scale)
    k = randn(b, hkv, nk, d, dtype=dtype, seed=seed + 1, scale=scale)
    v = randn(b, hkv, nk, d, dtype=dtype, seed=seed + 2)
    return q, k, v


def check_flash(q, k, v, causal=False, scale=None, grads=True, seed=0):
    """mk.flash_attention against mk.reference in float64: output, logsumexp, dq, dk, dv."""
    dtype = q.dtype
    q, k, v = (t.detach().requires_grad_(grads) for t in (q, k, v))
    with poisoned():
        out, lse = mk.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    r = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    ref, ref_lse = mk.reference.flash_attention(*r, causal=causal, scale=scale, return_lse=True)
    check_against_reference(out, lse, ref, ref_lse, (q, k, v), r, dtype, grads, seed)
    return out, lse


def check_against_reference(out, lse, ref, ref_lse, inputs, ref_inputs, dtype, grads=True, seed=0):
    """A kernel's output, logsumexp and (with ``grads``) the gradients of its ``inputs`` against the
    float64 reference's, computed from ``ref_inputs``; the gradients are taken with outputs poisoned.
    Returns (the kernel's gradients, dO), or (None, None) without ``grads``."""
    assert_close(out, ref, dtype, name="out")
    # logsumexp: -inf exactly where a row sees no key, close elsewhere
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(ref_lse).cpu()), "rows with no key"
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], dtype, name="lse")
    if not grads:
        return None, None
    do = randn(*out.shape, dtype=dtype, seed=seed + 99)
    with poisoned():
        got = torch.autograd.grad(out, tuple(inputs), do)
    want = torch.autograd.grad(ref, list(ref_inputs), do.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_grad_close(g, w, dtype, name)
    return got, do
