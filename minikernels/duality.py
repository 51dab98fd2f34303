"""Chapter 4: Mamba-2's state space duality (SSD), ``mk.ssd``.

A scalar-decay state space model, one state [S, P] per (batch, head):

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,     y_t = C_t^T h_t + D x_t

is causal linear attention with a decay (chapter 3): queries C, keys dt * B, values x, log-decay
dt * A (or, moving dt to the other factor of dt_t B_t x_t^T, keys B and values dt * x). So ``ssd``
runs ``mk.linear_attention``'s chunked Triton kernels (forward and backward) on those inputs, with
dt handed to them as weights on the values: the kernels fold dt into the per-step factors they
compute anyway, so dt * x is never written out; and each group's B and C are read by all its heads
(the backward sums their gradients over the heads in registers). A goes to them as a rate: the
log-decay is the weights times it, and the backward folds the log-decay's gradient into dt's and
A's (dL/ddt_t += dL/dg_t A, dL/dA = sum_t dL/dg_t dt_t) in one small kernel (``linear._la_rate_grads``).
For S <= 128 (tiles that fit in shared memory) the forward walks the chunks once with the state in
registers (``linear._la_fused``) instead of storing every chunk's state and reading it back.
``quadratic_form`` is the other side of the duality: the same outputs as masked attention,
(C B^T * L) (dt x), with the mask L[t, s] = exp(dt_{s+1} A + ... + dt_t A) for s <= t (the book's Gamma). L is
1-semiseparable: every submatrix taken from on and below its diagonal has rank at most 1.
"""

from __future__ import annotations

import torch

from ._validate import check_same_device, check_tensor
from .linear import MAX_FEATURE_DIM, _LinearAttention, check_chunk_size


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    # [B, G, N, S] -> [B, H, N, S]: head h reads group h // (H / G)
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def check_ssd_inputs(x, dt, A, B, C, D=None, initial_state=None) -> None:
    """Shapes of SSD's inputs; raises before any work is done."""
    check_tensor("x", x, ndim=4, shape_hint="[B, H, N, P]")
    b, h, n, p = x.shape
    check_tensor("dt", dt, ndim=3, shape_hint="[B, H, N]")
    if dt.shape != (b, h, n):
        raise ValueError(f"dt must be [B, H, N] = {(b, h, n)}, got {tuple(dt.shape)}")
    check_tensor("A", A, ndim=1, shape_hint="[H]")
    if A.shape != (h,):
        raise ValueError(f"A must be [H] = ({h},), got {tuple(A.shape)}")
    check_tensor("B", B, ndim=4, shape_hint="[B, G, N, S]")
    check_tensor("C", C, ndim=4, shape_hint="[B, G, N, S]")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape [B, G, N, S], got {tuple(B.shape)} and {tuple(C.shape)}")
    if B.shape[0] != b or B.shape[2] != n:
        raise ValueError(f"B and C must be [B, G, N, S] with x's B = {b} and N = {n}, got {tuple(B.shape)}")
    if B.shape[1] == 0 or h % B.shape[1]:
        raise ValueError(f"the number of groups G = {B.shape[1]} must divide the number of heads H = {h}")
    if D is not None:
        check_tensor("D", D, ndim=1, shape_hint="[H]")
        if D.shape != (h,):
            raise ValueError(f"D must be [H] = ({h},), got {tuple(D.shape)}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, shape_hint="[B, H, S, P]")
        if initial_state.shape != (b, h, B.shape[-1], p):
            raise ValueError(f"initial_state must be [B, H, S, P] = {(b, h, B.shape[-1], p)}, "
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

    x ``[B, H, N, P]``; dt ``[B, H, N]`` (already positive); A ``[H]`` (negative for a decaying state);
    B, C ``[B, G, N, S]`` with G dividing H (head h uses group h // (H/G)); D ``[H]`` or None;
    initial and final states ``[B, H, S, P]`` (float32). Forward and backward run the chunked linear
    attention kernels (``chunk_size`` in {16, 32, 64, 128}); gradients reach every input. For the
    backward the forward keeps the state each chunk starts from (B*H*ceil(N/chunk_size)*S*P values in
    x's dtype: S/chunk_size times the size of x) when a gradient is needed.
    Returns ``y`` (x's dtype) or, with ``return_final_state=True``, ``(y, final_state)``.
    """
    check_ssd_inputs(x, dt, A, B, C, D, initial_state)
    if not isinstance(return_final_state, bool):
        raise TypeError(f"return_final_state must be a bool, got {type(return_final_state).__name__}")
    b, heads, n, p = x.shape
    groups, s = B.shape[1], B.shape[-1]
    per = heads // groups
    # The same dictionary as as_linear_attention, arranged so nothing of size [B, H, N, S] is built:
    # dt_t B_t x_t^T = B_t (dt_t x_t)^T puts dt on the values, so the keys are B itself; and the heads
    # of one group become the "heads" of a (batch, group) pair, whose B and C have one head that all
    # of them read (the backward sums the group's gradients of B and C in registers).
    # dt itself goes to the kernels as the values' weights: they fold it into factors they compute
    # anyway, instead of a pass over x to build dt * x.
    check_chunk_size(chunk_size)
    if s > MAX_FEATURE_DIM:
        raise ValueError(f"state size S = {s} exceeds {MAX_FEATURE_DIM}")
    if b * heads * n == 0:  # nothing for the kernels to walk
        y = x.new_zeros(x.shape)
        state = initial_state.float() if initial_state is not None else x.new_zeros(b, heads, s, p).float()
    else:
        q, k = C.reshape(b * groups, 1, n, s), B.reshape(b * groups, 1, n, s)
        s0 = initial_state.reshape(b * groups, per, s, p) if initial_state is not None else None
        # the log-decay dt * A is built from the weights and the rate A (a row of heads per group)
        y, state = _LinearAttention.apply(q, k, x.reshape(b * groups, per, n, p), None, s0, chunk_size, x.dtype,
                                          dt.reshape(b * groups, per, n), A.reshape(groups, per))
        y, state = y.reshape(b, heads, n, p), state.reshape(b, heads, s, p)
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
