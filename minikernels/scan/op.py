"""``selective_scan``: the checks, the autograd Function, and the public entry point."""

from __future__ import annotations

import torch

from .._autograd import keep_in_graph, once_differentiable
from .._backend import on_device_of
from .._validate import check_flag, check_same_device, check_tensor, final_state_flag
from .backward import launch_backward
from .forward import launch_forward
from .layout import bc_view
from .plan import MAX_STATE


def work_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    # the small per-channel parameters (A, D, delta_bias) go to the kernels as contiguous float32
    return t.float().contiguous() if t is not None else None


class SelectiveScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, softplus):
        ctx.set_materialize_grads(False)
        B4, C4 = bc_view(B)[0], bc_view(C)[0]
        Af, Df, bf = work_tensor(A), work_tensor(D), work_tensor(bias)
        with on_device_of(u):
            out, h_last, h_start = launch_forward(u, delta, Af, B4, C4, Df, z, bf, softplus,
                                                  save=any(ctx.needs_input_grad))
        ctx.save_for_backward(u, delta, Af, B4, C4, Df, z, bf, h_start)
        ctx.graph_inputs = (u, delta, A, B, C, D, z, bias)  # for once_differentiable (no data is read from them)
        ctx.softplus, ctx.b_dim = softplus, B.dim()
        ctx.dtypes = [t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, bias)]
        return out, h_last

    @staticmethod
    @once_differentiable  # the Triton backward is not itself differentiable: double backward raises
    def backward(ctx, dout, dh_last):
        u, delta, Af, B4, C4, Df, z, bf, h_start = ctx.saved_tensors
        # dout in its own dtype (the kernel reads it as float32); du, ddelta, dz come out in their inputs' dtypes
        dout = dout.contiguous() if dout is not None else torch.zeros(u.shape, device=u.device)
        dh_last = dh_last.float().contiguous() if dh_last is not None else None
        with on_device_of(u):
            du, ddelta, dz, da, dd, db, dc, dbias = launch_backward(u, delta, Af, B4, C4, Df, z, bf, ctx.softplus,
                                                              h_start, dout, dh_last)
        if ctx.b_dim == 3:
            db, dc = db[:, 0], dc[:, 0]
        grads = (du, ddelta, da, db, dc, dd, dz, dbias)
        return (*(g.to(t) if g is not None else None for g, t in zip(grads, ctx.dtypes)), None)


def check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    # shapes in the book's symbols: length N, state size n (the code's L and N)
    check_tensor("u", u, ndim=3, shape_hint="[B, D, N]")
    bsz, dch, length = u.shape
    check_tensor("delta", delta, ndim=3, shape_hint="[B, D, N]")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape [B, D, N] = {tuple(u.shape)}, got {tuple(delta.shape)}")
    check_tensor("A", A, ndim=2, shape_hint="[D, n] (real)")
    if A.shape[0] != dch or not 1 <= A.shape[1] <= MAX_STATE:
        raise ValueError(f"A must be [D, n] with D = {dch} and 1 <= n <= {MAX_STATE}, got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        check_tensor(name, t, shape_hint="[B, n, N] or [B, G, n, N]")
        if t.dim() == 3 and t.shape != (bsz, n, length):
            raise ValueError(f"{name} must be [B, n, N] = {(bsz, n, length)} or [B, G, n, N], got {tuple(t.shape)}")
        if t.dim() == 4 and (t.shape[0] != bsz or t.shape[2:] != (n, length) or t.shape[1] == 0
                             or dch % t.shape[1]):
            raise ValueError(f"{name} must be [B, G, n, N] with B = {bsz}, n = {n}, N = {length} and G dividing "
                             f"D = {dch}, got {tuple(t.shape)}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be input-dependent, [B, n, N] or [B, G, n, N] (a constant [D, n] "
                             f"{name} is not supported), got {tuple(t.shape)}")
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, t, shape in (("D", D, (dch,)), ("delta_bias", delta_bias, (dch,)), ("z", z, tuple(u.shape))):
        if t is not None:
            check_tensor(name, t)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=None, return_final_state=None):
    """Mamba's selective scan (``mamba_ssm.selective_scan_fn``'s arguments and semantics).

    u, delta, z ``[B, D, N]`` (N the sequence length); real A ``[D, n]`` (n the state size,
    n <= 256); B, C ``[B, n, N]`` or grouped ``[B, G, n, N]`` (channel d reads group d // (D/G)); D and
    delta_bias ``[D]``. The step is delta + delta_bias, passed through softplus when
    ``delta_softplus``. Returns ``out`` in u's dtype, or, with ``return_final_state=True``,
    ``(out, last_state)`` with the float32 state ``[B, D, n]`` after the last step;
    ``return_last_state`` (mamba_ssm's name) is an alias of ``return_final_state``, kept working
    (giving both with different values raises ValueError). The scan runs in Triton with delta_bias,
    softplus, D and the z gate fused in (forward and backward, float32 inside); every input gets a
    gradient (once: the backward is not differentiable, and differentiating the gradients again
    raises). The gradients of B and C are sums over channels added atomically in float32, so they
    can differ in the last bits from run to run. N = 0, B = 0 or D = 0 gives zeros (and a zero state).
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    check_flag("delta_softplus", delta_softplus)
    return_last_state = final_state_flag("return_last_state", return_last_state, return_final_state)
    if u.shape[-1] == 0 or u.shape[0] == 0 or u.shape[1] == 0:  # nothing to scan: zeros, kept in the graph
        ins = (u, delta, A, B, C, D, z, delta_bias)
        last = keep_in_graph(torch.zeros(u.shape[0], *A.shape, device=u.device), *ins)
        out = keep_in_graph(u.new_zeros(u.shape), *ins)
        return (out, last) if return_last_state else out
    out, last = SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out
