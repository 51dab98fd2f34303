"""Chapter 4: Mamba-2's state space duality (SSD), ``mk.ssd``.

A scalar-decay state space model, one state [n, d_v] per (batch, head) (n the state size, d_v the
head dimension of x, N the sequence length: the book's symbols):

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,     y_t = C_t^T h_t + D x_t

is causal linear attention with a decay (chapter 3): queries C, keys dt * B, values x, log-decay
dt * A (or, moving dt to the other factor of dt_t B_t x_t^T, keys B and values dt * x). So ``ssd``
runs ``mk.linear_attention``'s chunked Triton kernels (forward and backward) on those inputs, with
dt handed to them as weights on the values: the kernels fold dt into the per-step factors they
compute anyway, so dt * x is never written out; and each group's B and C are read by all its heads
(the backward sums their gradients over the heads in registers). A goes to them as a rate: the
log-decay is the weights times it, and the backward folds the log-decay's gradient into dt's and
A's (d𝓛/d dt_t += d𝓛/dg_t A, d𝓛/dA = sum_t d𝓛/dg_t dt_t) in one small kernel (``linear.backward._la_rate_grads``).
For n <= 128 (tiles that fit in shared memory) the forward walks the chunks once with the state in
registers (``linear.forward._la_fused``) instead of storing every chunk's state and reading it back.
``quadratic_form`` is the other side of the duality: the same outputs as masked attention,
(C B^T * L) (dt x), with the mask L[t, s] = exp(dt_{s+1} A + ... + dt_t A) for s <= t (the book's Gamma). L is
1-semiseparable: every submatrix taken from on and below its diagonal has rank at most 1.
"""

from __future__ import annotations

import torch

from ._autograd import keep_in_graph
from ._validate import check_flag, check_same_device, check_tensor
from .linear import MAX_FEATURE_DIM, apply_in_batch_slices, check_chunk_size


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    # [B, G, N, n] -> [B, H, N, n]: head h reads group h // (H / G)
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def check_ssd_inputs(x, dt, A, B, C, D=None, initial_state=None) -> None:
    """Shapes of SSD's inputs; raises before any work is done."""
    check_tensor("x", x, ndim=4, shape_hint="[B, H, N, d_v]")
    b, h, N, dv = x.shape
    check_tensor("dt", dt, ndim=3, shape_hint="[B, H, N]")
    if dt.shape != (b, h, N):
        raise ValueError(f"dt must be [B, H, N] = {(b, h, N)}, got {tuple(dt.shape)}")
    check_tensor("A", A, ndim=1, shape_hint="[H]")
    if A.shape != (h,):
        raise ValueError(f"A must be [H] = ({h},), got {tuple(A.shape)}")
    check_tensor("B", B, ndim=4, shape_hint="[B, G, N, n]")
    check_tensor("C", C, ndim=4, shape_hint="[B, G, N, n]")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape [B, G, N, n], got {tuple(B.shape)} and {tuple(C.shape)}")
    if B.shape[0] != b or B.shape[2] != N:
        raise ValueError(f"B and C must be [B, G, N, n] with x's B = {b} and N = {N}, got {tuple(B.shape)}")
    if B.shape[1] == 0 or h % B.shape[1]:
        raise ValueError(f"B and C have G = {B.shape[1]} groups, which must divide the number of heads H = {h}")
    if D is not None:
        check_tensor("D", D, ndim=1, shape_hint="[H]")
        if D.shape != (h,):
            raise ValueError(f"D must be [H] = ({h},), got {tuple(D.shape)}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, shape_hint="[B, H, n, d_v]")
        if initial_state.shape != (b, h, B.shape[-1], dv):
            raise ValueError(f"initial_state must be [B, H, n, d_v] = {(b, h, B.shape[-1], dv)}, "
                             f"got {tuple(initial_state.shape)}")
    check_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state)
    if not (x.dtype == B.dtype == C.dtype):
        raise TypeError(f"x, B and C must share one dtype, got {x.dtype}, {B.dtype}, {C.dtype}")


def as_linear_attention(x, dt, A, B, C):
    """The duality's dictionary: (q, k, v, log-decay) of the linear attention that equals this SSM."""
    heads = x.shape[1]
    work = torch.promote_types(x.dtype, torch.float32)  # float32 at least; float64 stays float64
    q = _expand_groups(C, heads)
    k = (dt.to(work)[..., None] * _expand_groups(B, heads).to(work)).to(x.dtype)
    return q, k, x, dt.to(work) * A.to(work)[None, :, None]


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int = 64,
        D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None, return_final_state: bool = False):
    """Mamba-2's SSD: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t + D x_t.

    x ``[B, H, N, d_v]``; dt ``[B, H, N]`` (already positive); A ``[H]`` (negative for a decaying
    state); B, C ``[B, G, N, n]`` with G dividing H (head h uses group h // (H/G)); D ``[H]`` or None;
    initial and final states ``[B, H, n, d_v]`` (float32). Forward and backward run the chunked linear
    attention kernels (``chunk_size`` in {16, 32, 64, 128}); gradients reach every input (once: the
    backward is not differentiable, and differentiating the gradients again raises). For the backward
    the forward keeps the state each chunk starts from (B*H*ceil(N/chunk_size)*n*d_v values in x's
    dtype: n/chunk_size times the size of x) when a gradient is needed. Values are not checked (that
    would need a host sync): NaN in an input reaches the outputs that depend on it (a NaN in A[h]:
    every output of head h). N = 0 or B = 0 gives zeros (and the initial state, or zeros, as the
    final state).
    Returns ``y`` (x's dtype) or, with ``return_final_state=True``, ``(y, final_state)``.
    """
    check_ssd_inputs(x, dt, A, B, C, D, initial_state)
    check_flag("return_final_state", return_final_state)
    b, heads, N, dv = x.shape  # the book's symbols: length N, head dimension d_v, state size n
    groups, n = B.shape[1], B.shape[-1]
    per = heads // groups
    # The same dictionary as as_linear_attention, arranged so nothing of size [B, H, N, n] is built:
    # dt_t B_t x_t^T = B_t (dt_t x_t)^T puts dt on the values, so the keys are B itself; and the heads
    # of one group become the "heads" of a (batch, group) pair, whose B and C have one head that all
    # of them read (the backward sums the group's gradients of B and C in registers).
    # dt itself goes to the kernels as the values' weights: they fold it into factors they compute
    # anyway, instead of a pass over x to build dt * x.
    check_chunk_size(chunk_size)
    if n > MAX_FEATURE_DIM:
        raise ValueError(f"B and C have state size n = {n}, more than {MAX_FEATURE_DIM}")
    if b * heads * N == 0:  # nothing for the kernels to walk: zeros, still part of the autograd graph
        y = x.new_zeros(x.shape)
        state = (initial_state.to(torch.float32, copy=True) if initial_state is not None
                 else x.new_zeros(b, heads, n, dv, dtype=torch.float32))
        ins = (x, dt, A, B, C, initial_state)
        y, state = keep_in_graph(y, *ins), keep_in_graph(state, *ins)
    else:
        q, k = C.reshape(b * groups, 1, N, n), B.reshape(b * groups, 1, N, n)
        s0 = initial_state.reshape(b * groups, per, n, dv) if initial_state is not None else None
        # the log-decay dt * A is built from the weights and the rate A (a row of heads per group)
        y, state = apply_in_batch_slices(q, k, x.reshape(b * groups, per, N, dv), None, s0, chunk_size, x.dtype,
                                         dt.reshape(b * groups, per, N), A.reshape(groups, per))
        y, state = y.reshape(b, heads, N, dv), state.reshape(b, heads, n, dv)
    if D is not None:
        y = (y.float() + D.float()[None, :, None, None] * x.float()).to(x.dtype)
    return (y, state) if return_final_state else y


def quadratic_form(x, dt, A, B, C, D=None):
    """SSD as masked attention, all outputs at once (quadratic in N; PyTorch, for the chapter and the
    tests): y = (C B^T * L) (dt x) + D x with L[t, s] = exp(sum_{u=s+1..t} dt_u A) for s <= t."""
    heads, n = x.shape[1], x.shape[2]
    Bh, Ch = _expand_groups(B, heads), _expand_groups(C, heads)
    cum = (dt * A[None, :, None]).cumsum(-1)
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    L = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
    y = ((Ch @ Bh.transpose(-1, -2)) * L) @ (dt[..., None] * x)
    return y if D is None else y + D[None, :, None, None] * x
