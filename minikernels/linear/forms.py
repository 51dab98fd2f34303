"""Linear attention's PyTorch forms, as chapter 3 derives them: the parallel (masked, quadratic)
form and the chunked form (intra-chunk quadratic, inter-chunk recurrent, as in Lightning
Attention-2). Torch only: they are what the kernels are checked against, step by step."""

from __future__ import annotations

import torch

from .._validate import check_linear_attention_inputs, final_state_flag
from ..feature_maps import mapped_features, normalized


def _states_shape(q_feat: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    return (*q_feat.shape[:2], q_feat.shape[-1], v.shape[-1])


def parallel_form(q, k, v, decay=None, feature_map=None, normalize=False, initial_state=None,
                  return_state=None, return_final_state=None):
    """All outputs at once: O = ((phi(Q) phi(K)^T) * M) V with the causal decay mask
    M[t, s] = exp(G_t - G_s) for s <= t (G the cumulative log-decay), plus exp(G_t) phi(q_t)^T S_0.
    Quadratic in N, like softmax attention, but with no softmax. ``return_final_state`` (or its alias
    ``return_state``) returns ``(out, final_state)``, as ``linear_attention``."""
    return_state = final_state_flag("return_state", return_state, return_final_state)
    check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state)
    qf, kf = mapped_features(q, k, feature_map)
    n = q.shape[2]
    g = decay if decay is not None else q.new_zeros(q.shape[:3])
    cum = g.cumsum(-1)  # G_t
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    # mask *before* exp: above the diagonal G_t - G_s > 0 could overflow
    mask = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
    a = (qf @ kf.transpose(-1, -2)) * mask
    o = a @ v
    s0 = initial_state if initial_state is not None else q.new_zeros(_states_shape(qf, v))
    o = o + torch.exp(cum)[..., None] * (qf @ s0)
    if normalize:
        o = normalized(o, a.sum(-1, keepdim=True))
    if not return_state:
        return o
    w = torch.exp(cum[..., -1:] - cum)[..., None] * kf  # how much of step s survives to the end
    return o, torch.exp(cum[..., -1])[..., None, None] * s0 + w.transpose(-1, -2) @ v


def chunked_form(q, k, v, decay=None, feature_map=None, normalize=False, chunk_size=64, initial_state=None,
                 return_state=None, return_final_state=None):
    """Lightning Attention-2's split: inside a chunk of C steps, the parallel form (C^2 work); between
    chunks, the state S carried by the recurrence. Cost O(N C d + N d^2) instead of O(N^2 d).
    Log-decays are summed inside each chunk only, so exp never sees more than C steps of decay.
    ``return_final_state`` (or its alias ``return_state``) returns ``(out, final_state)``."""
    return_state = final_state_flag("return_state", return_state, return_final_state)
    check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    qf, kf = mapped_features(q, k, feature_map)
    n = q.shape[2]
    g = decay if decay is not None else q.new_zeros(q.shape[:3])
    state = initial_state if initial_state is not None else q.new_zeros(_states_shape(qf, v))
    z = q.new_zeros(qf.shape[:2] + qf.shape[-1:])  # the normalizer's state
    outs = []
    for start in range(0, n, chunk_size):
        sl = slice(start, min(start + chunk_size, n))
        qc, kc, vc, cum = qf[:, :, sl], kf[:, :, sl], v[:, :, sl], g[:, :, sl].cumsum(-1)
        c = cum.shape[-1]
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        mask = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
        a = (qc @ kc.transpose(-1, -2)) * mask
        inter = torch.exp(cum)[..., None] * qc  # phi(q_t) decayed back to the chunk's start
        o = a @ vc + inter @ state  # intra-chunk + what the earlier chunks left in the state
        if normalize:
            o = normalized(o, a.sum(-1, keepdim=True) + (inter * z[..., None, :]).sum(-1, keepdim=True))
        outs.append(o)
        w = torch.exp(cum[..., -1:] - cum)[..., None] * kc
        state = torch.exp(cum[..., -1])[..., None, None] * state + w.transpose(-1, -2) @ vc
        z = torch.exp(cum[..., -1])[..., None] * z + w.sum(-2)
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(*q.shape[:3], v.shape[-1])
    return (o, state) if return_state else o
