"""``linear_attention``: the checks, the autograd Function that ties the forward and backward passes
together, and the public entry point."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import planning
from .._autograd import keep_in_graph, once_differentiable
from .._backend import on_device_of
from .._common import MAX_GRID_YZ, batch_slices, compute_dtype
from .._validate import check_linear_attention_inputs, check_same_device, check_tensor, final_state_flag
from ..feature_maps import mapped_features, normalized
from .backward import backward
from .forward import forward

CHUNK_SIZES = (16, 32, 64, 128)


MAX_FEATURE_DIM = 1024


def check_chunk_size(chunk_size) -> None:
    # the kernels' chunk is a tile of tl.dot and a constexpr: one of a few powers of two
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise TypeError(f"chunk_size must be an int, one of {CHUNK_SIZES}, got {type(chunk_size).__name__}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")


class LinearAttentionFunction(torch.autograd.Function):
    # w: optional value weights [B, H, N] (the values become w_t v_t). mk.ssd passes dt here: the
    # kernels fold it into factors they compute anyway, instead of a pass over x.
    # rate: optional [R, H] (R dividing B; mk.ssd's A, R its groups), with w and without g: the
    # log-decay is then g_t = w_t rate[b % R, h], and the backward returns the gradients of w and the
    # rate with g's folded in (_la_rate_grads), instead of one for g.
    # q and k: [B, H, N, Dk] as v, or [B, 1, N, Dk] read by all H heads (mk.ssd's C and B, a group
    # at a time); their gradients then come summed over the heads by the kernel.
    @staticmethod
    def forward(ctx, q, k, v, g, s0, chunk, out_dtype, w=None, rate=None):
        ctx.set_materialize_grads(False)  # an unused output (often the state) gets no zero gradient
        dtype = q.dtype
        work = compute_dtype(dtype)
        qw, kw, vw = (t.to(work) for t in (q, k, v))
        ww = w.float().contiguous() if w is not None else None
        ratew = rate.float().contiguous() if rate is not None else None
        if rate is not None:
            if g is not None or w is None:
                raise ValueError("a rate makes the log-decay w * rate: it needs w and no g")
            r, h = ratew.shape
            b, n = ww.shape[0], ww.shape[-1]
            gw = (ww.view(b // r, r, h, n) * ratew[None, :, :, None]).view(ww.shape)
        else:
            gw = g.float() if g is not None else None
        s0w = s0.float().contiguous() if s0 is not None else None
        heads = (*v.shape[:2], *q.shape[2:])
        # The states each chunk starts from are kept for the backward when it will run (else it would
        # walk the sequence again): B*H*(N/C)*Dk*Dv values, the size of the values times Dk/C.
        keep = any(ctx.needs_input_grad)
        with on_device_of(q):
            o, s_end, hs = forward(qw.expand(heads), kw.expand(heads), vw, gw, s0w, chunk,
                                    out_dtype if work == dtype else torch.float32, w=ww, keep_states=keep)
        ctx.save_for_backward(qw, kw, vw, gw, ww, ratew, hs)
        ctx.graph_inputs = (q, k, v, g, s0, w, rate)  # for once_differentiable (no data is read from them)
        ctx.chunk, ctx.dtype, ctx.has_s0 = chunk, dtype, s0 is not None
        ctx.s0_dtype = s0.dtype if s0 is not None else None
        ctx.w_dtype = w.dtype if w is not None else None
        ctx.rate_dtype = rate.dtype if rate is not None else None
        return o.to(out_dtype), s_end

    @staticmethod
    @once_differentiable  # the Triton backward is not itself differentiable: double backward raises
    def backward(ctx, do, ds_end):
        qw, kw, vw, gw, ww, ratew, hs = ctx.saved_tensors
        do = do.to(qw.dtype) if do is not None else vw.new_zeros(()).expand(*vw.shape)
        ds_end = ds_end.float().contiguous() if ds_end is not None else None
        with on_device_of(qw):
            dq, dk, dv, dg, ds0, dw, drate = backward(qw, kw, vw, gw, do, ds_end, ctx.chunk, hs, w=ww, rate=ratew)
        return (dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), dg,
                ds0.to(ctx.s0_dtype) if ctx.has_s0 else None, None, None,
                dw.to(ctx.w_dtype) if dw is not None else None,
                drate.to(ctx.rate_dtype) if drate is not None else None)


def apply_in_batch_slices(q, k, v, g, s0, chunk, out_dtype, w=None, rate=None):
    """``LinearAttentionFunction.apply``, in slices of the batch when it has more (batch, head) pairs
    than a grid axis holds (MAX_GRID_YZ): the kernels put B*H on their second or third axis (times a
    few segments, only when B*H is below the SM count; head splits only shorten it). Batch entries are
    independent, so each slice is its own autograd node and the outputs are concatenated. With a rate
    of R rows (the log-decay reads rate[b % R]) a slice is whole groups of R entries."""
    B, H = v.shape[:2]
    per = rate.shape[0] if rate is not None else 1
    if B % per:
        raise ValueError(f"a rate of {per} rows needs a batch of whole groups of {per} entries, got {B}")
    most = planning.decide("linear.max_grid_y", MAX_GRID_YZ)
    slices = batch_slices(B // per, H * per, most, "linear_attention")
    if len(slices) == 1:
        return LinearAttentionFunction.apply(q, k, v, g, s0, chunk, out_dtype, w, rate)
    parts = []
    for lo, hi in slices:
        rows = slice(lo * per, hi * per)
        q_s, k_s, v_s, g_s, s0_s, w_s = (t if t is None else t[rows] for t in (q, k, v, g, s0, w))
        parts.append(LinearAttentionFunction.apply(q_s, k_s, v_s, g_s, s0_s, chunk, out_dtype, w_s, rate))
    return torch.cat([o for o, _ in parts]), torch.cat([s for _, s in parts])


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None,
                     feature_map: str | Callable | None = None, normalize: bool = False, chunk_size: int = 64,
                     initial_state: torch.Tensor | None = None, return_state: bool | None = None,
                     return_final_state: bool | None = None):
    """Causal linear attention in Triton, chunked (forward and backward).

    o_t = phi(q_t)^T S_t,  S_t = exp(decay_t) S_{t-1} + phi(k_t) v_t^T  (no scale factor applied).
    q, k ``[B, H, N, Dk]``; v ``[B, H, N, Dv]``; any strides; float32, float16 or bfloat16 (16-bit
    inputs keep 16-bit tiles of the state in the kernel's products: with float16, states beyond
    ~6e4, as from very long sequences without decay, overflow; bfloat16 has float32's range).
    ``decay``: log-decay ``[B, H, N]`` (<= 0; -inf resets the state) or None; a NaN in it makes the
    outputs of its head NaN from its step on (not checked: checking values would need a host sync).
    ``feature_map``: None (identity), "elu1", "relu", "taylor" or a callable, applied to q and k
    before the kernel; a callable must return tensors that keep q's ``[B, H, N]`` and dtype.
    ``normalize=True`` divides o_t by phi(q_t)^T z_t, z_t = exp(decay_t) z_{t-1} + phi(k_t) (a row with
    z = 0 gets 0); it cannot be combined with states. ``initial_state`` / the returned final state:
    ``[B, H, Dk', Dv]`` float32 (Dk' = the feature size), so a long sequence can be processed in
    pieces. ``chunk_size`` in {16, 32, 64, 128}; N need not be a multiple of it. Gradients flow to q,
    k, v, decay and initial_state (once: the backward is not differentiable, and differentiating the
    gradients again raises); when one is needed, the forward keeps the state each chunk starts from
    for the backward: B*H*ceil(N/chunk_size)*Dk'*Dv values in the inputs' dtype (Dk'/chunk_size times
    the size of v; float32 for bfloat16 inputs under the CPU interpreter, which computes them in
    float32). N = 0 or B*H = 0 gives zeros (and the initial state, or zeros, as the final state).
    Returns ``out`` or, with ``return_final_state=True``, ``(out, final_state)``; ``return_state`` is
    the older name of ``return_final_state`` (an alias, kept working; giving both with different
    values raises ValueError).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, shape_hint="[B, H, N, D]")
    return_state = final_state_flag("return_state", return_state, return_final_state)
    check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state)
    if decay is not None:
        check_tensor("decay", decay, ndim=3, shape_hint="[B, H, N]")
    check_same_device(q=q, k=k, v=v, decay=decay, initial_state=initial_state)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_chunk_size(chunk_size)
    qf, kf = mapped_features(q, k, feature_map)
    dk_feat = qf.shape[-1]
    if dk_feat > MAX_FEATURE_DIM:
        raise ValueError(f"feature size {dk_feat} exceeds {MAX_FEATURE_DIM}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, ndim=4, shape_hint="[B, H, Dk, Dv]")
        want = (*q.shape[:2], dk_feat, v.shape[-1])
        if tuple(initial_state.shape) != want:
            raise ValueError(f"initial_state must be [B, H, Dk', Dv] = {want} (Dk' = feature size), "
                             f"got {tuple(initial_state.shape)}")
    B, H, N = q.shape[:3]
    if N == 0 or B * H == 0:  # nothing for the kernels to walk: zeros, still part of the autograd graph
        out = v.new_zeros(*v.shape)
        state = (initial_state.to(torch.float32, copy=True) if initial_state is not None
                 else torch.zeros(B, H, dk_feat, v.shape[-1], device=q.device))
        ins = (qf, kf, v, decay, initial_state)
        out, state = keep_in_graph(out, *ins), keep_in_graph(state, *ins)
        return (out, state) if return_state else out
    vv = torch.cat([v, v.new_ones(*v.shape[:3], 1)], dim=-1) if normalize else v  # a ones column gives z
    # normalizing wants float32 numerator and denominator (either may exceed float16's range while
    # their ratio does not); otherwise the kernel writes the output's dtype directly
    out_dtype = torch.float32 if normalize else v.dtype
    out, state = apply_in_batch_slices(qf, kf, vv, decay, initial_state, chunk_size, out_dtype)
    if normalize:
        out = normalized(out[..., :-1], out[..., -1:])
    out = out.to(v.dtype)
    return (out, state) if return_state else out
