"""Pure-PyTorch references: the same names and signatures as the Triton ops, written for clarity,
not speed. Tests run them in float64 and compare the kernels against them. This module imports no
Triton (only torch, ``minikernels.feature_maps`` and the torch-only checks and autograd helpers), so
the oracle does not share the kernels' stack."""

from __future__ import annotations

import torch

from ._autograd import keep_in_graph
from ._validate import check_flag, check_linear_attention_inputs, final_state_flag
from .feature_maps import mapped_features, normalized


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum(exp(x - max)) along ``dim``; a row of all -inf gives zeros (as the kernel)."""
    if x.shape[dim] == 0:  # no entries to normalise (attention over zero keys)
        return x.clone()
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(x - m)
    s = e.sum(dim=dim, keepdim=True)
    return e / torch.where(s == 0, torch.ones_like(s), s)


def _expand_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: repeat each k/v head for the q heads that share it."""
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def flash_attention(q, k, v, causal: bool = False, scale: float | None = None, return_lse: bool = False):
    """softmax(q k^T * scale) v, materialising the full score matrix. Causal masking is aligned to the
    bottom right (query i sees keys j <= i + Nk - Nq); a query that sees no key gets zeros and a
    logsumexp of -inf. ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention)."""
    nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    k, v = _expand_kv_heads(k, q.shape[1]), _expand_kv_heads(v, q.shape[1])
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (nk - nq), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = softmax(s, dim=-1)  # rows of all -inf give zeros
    out = p @ v
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal: bool = False,
                           scale: float | None = None, return_lse: bool = False):
    """Packed sequences (q ``[total_q, H, D]``, k and v ``[total_k, Hkv, D]``), each sequence attended to
    alone by ``flash_attention``: sequence b is rows ``cu_seqlens[b]:cu_seqlens[b + 1]``. lse is
    ``[H, total_q]``. ``max_seqlen_q`` and ``max_seqlen_k`` size the kernel's grid: ignored here."""
    def dense(t, start, end):  # [n, H, D] rows -> [1, H, n, D]
        return t[start:end].transpose(0, 1)[None]

    outs, lses = [q.new_zeros(0, *q.shape[1:])], [q.new_zeros(q.shape[1], 0)]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for qs, qe, ks, ke in zip(cq, cq[1:], ck, ck[1:]):
        o, lse = flash_attention(dense(q, qs, qe), dense(k, ks, ke), dense(v, ks, ke), causal, scale, True)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = keep_in_graph(torch.cat(outs), q, k, v)  # keys no query reads still get (zero) gradients
    lse = torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def decode_attention(q, k_cache, v_cache, cache_seqlens=None, num_splits=None, causal: bool = False, *,
                     scale: float | None = None, block_table=None, k_scale=None, v_scale=None, cache_leftpad=None):
    """Attention of a few query rows over a KV cache whose first ``cache_seqlens[b]`` positions are
    valid (from position ``cache_leftpad[b]`` on, when given). With ``causal=True`` the Nq queries are
    the last Nq positions of each sequence: row i sees keys j <= L - Nq + i. ``scale`` multiplies the
    logits (default 1/sqrt(D)). ``num_splits`` only changes how the kernel divides the work: ignored here.
    An int8 cache is dequantized first (``code * scale`` in q's dtype); a paged cache
    ``[num_pages, page_size, Hkv, D]`` is gathered through ``block_table`` into a dense
    ``[B, Hkv, max_pages * page_size, D]`` one (entries past a sequence's pages may hold anything: they
    are clamped to a page, and what they point at is masked)."""
    if k_scale is not None:
        k_cache = k_cache.to(q.dtype) * k_scale.to(q.dtype)[..., None]
    if v_scale is not None:
        v_cache = v_cache.to(q.dtype) * v_scale.to(q.dtype)[..., None]
    if block_table is not None:
        pages = block_table.long().clamp(0, k_cache.shape[0] - 1)  # [B, max_pages]

        def gather(c):  # [B, max_pages, page_size, Hkv, D] -> [B, Hkv, max_pages * page_size, D]
            return c[pages].flatten(1, 2).transpose(1, 2)
        k_cache, v_cache = gather(k_cache), gather(v_cache)
    b, _, nq, _ = q.shape
    nmax = k_cache.shape[2]
    lengths = torch.full((b,), nmax, device=q.device) if cache_seqlens is None else cache_seqlens.to(q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    j = torch.arange(nmax, device=q.device)[None, None, None, :]
    limit = lengths.view(b, 1, 1, 1)
    first = 0 if cache_leftpad is None else cache_leftpad.to(q.device).view(b, 1, 1, 1)
    # positions outside a sequence are not part of it: what is stored there never reaches the output
    outside = (j >= limit) | (j < first)
    v_cache = v_cache.masked_fill(outside.transpose(-1, -2), 0)
    k, v = _expand_kv_heads(k_cache, q.shape[1]), _expand_kv_heads(v_cache, q.shape[1])
    s = (q @ k.transpose(-1, -2)) * scale  # [B, H, Nq, Nmax]
    visible = ~outside
    if causal:
        i = torch.arange(nq, device=q.device)[None, None, :, None]
        visible = visible & (j <= limit - nq + i)
    s = s.masked_fill(~visible, float("-inf"))
    return softmax(s, dim=-1) @ v


def block_sparse_attention(q, k, v, block_mask, scale: float | None = None):
    """Attention under the element mask ``block_mask.to_dense()``, materialised; a query that sees no
    key gets zeros."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _expand_kv_heads(k, q.shape[1]), _expand_kv_heads(v, q.shape[1])
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~block_mask.to_dense().to(q.device), float("-inf"))
    return softmax(s, dim=-1) @ v


def linear_attention(q, k, v, decay=None, feature_map=None, normalize=False, chunk_size=64, initial_state=None,
                     return_state=None, return_final_state=None):
    """Causal linear attention, one step at a time (the recurrent form):
    S_t = exp(decay_t) S_{t-1} + phi(k_t) v_t^T, o_t = phi(q_t)^T S_t, optionally divided by
    phi(q_t)^T z_t with z_t = exp(decay_t) z_{t-1} + phi(k_t). q, k ``[B, H, N, Dk]``, v ``[B, H, N, Dv]``,
    decay ``[B, H, N]`` (log-decay) or None, states ``[B, H, Dk', Dv]`` (Dk' = feature size).
    ``chunk_size`` is accepted for the same signature as the kernel and ignored. ``return_final_state``
    (or its alias ``return_state``) returns ``(out, final_state)``."""
    return_state = final_state_flag("return_state", return_state, return_final_state)
    check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state)
    qf, kf = mapped_features(q, k, feature_map)
    b, h, n = q.shape[:3]
    state = initial_state if initial_state is not None else q.new_zeros(b, h, qf.shape[-1], v.shape[-1])
    z = q.new_zeros(b, h, qf.shape[-1])
    outs = []
    for t in range(n):
        keep = torch.exp(decay[:, :, t])[..., None] if decay is not None else 1.0
        state = (keep[..., None] if decay is not None else 1.0) * state + kf[:, :, t, :, None] * v[:, :, t, None, :]
        z = keep * z + kf[:, :, t]
        o = (qf[:, :, t, :, None] * state).sum(-2)
        if normalize:
            o = normalized(o, (qf[:, :, t] * z).sum(-1, keepdim=True))
        outs.append(o)
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(b, h, 0, v.shape[-1])
    if not outs:  # N = 0: zeros and the initial state, still part of the autograd graph (as the kernel's)
        ins = (qf, kf, v, decay, initial_state)
        o, state = keep_in_graph(o, *ins), keep_in_graph(state.clone(), *ins)
    return (o, state) if return_state else o


def ssd(x, dt, A, B, C, chunk_size=64, D=None, initial_state=None, return_final_state=False):
    """Mamba-2's SSD, one step at a time: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T (state [n, d_v]),
    y_t = C_t^T h_t + D x_t. x ``[B, H, N, d_v]``, dt ``[B, H, N]``, A ``[H]``, B and C ``[B, G, N, n]``
    (head h reads group h // (H/G)), D ``[H]``, states ``[B, H, n, d_v]``. ``chunk_size`` is ignored."""
    check_flag("return_final_state", return_final_state)
    b, h, n, p = x.shape
    Bh, Ch = (_expand_kv_heads(t, h) for t in (B, C))
    state = initial_state if initial_state is not None else x.new_zeros(b, h, B.shape[-1], p)
    ys = []
    for t in range(n):
        decay = torch.exp(dt[:, :, t] * A[None, :])[..., None, None]
        state = decay * state + (dt[:, :, t, None, None] * Bh[:, :, t, :, None]) * x[:, :, t, None, :]
        ys.append((Ch[:, :, t, :, None] * state).sum(-2))
    y = torch.stack(ys, dim=2) if ys else x.new_zeros(x.shape)
    if not ys:  # N = 0: zeros and the initial state, still part of the autograd graph (as the kernel's)
        ins = (x, dt, A, B, C, initial_state)
        y, state = keep_in_graph(y, *ins), keep_in_graph(state.clone(), *ins)
    if D is not None:
        y = y + D[None, :, None, None] * x
    return (y, state) if return_final_state else y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=None, return_final_state=None):
    """Mamba's selective scan, one step at a time (the semantics of mamba_ssm's selective_scan_ref):
    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t, y_t = C_t . h_t, out = (y + D u) * silu(z).
    u, delta, z ``[B, D, N]`` (N the length); A ``[D, n]`` (n the state size); B, C ``[B, n, N]`` or
    ``[B, G, n, N]``; D, delta_bias ``[D]``. Computes in float32 or wider; returns u's dtype (and, with
    ``return_final_state`` or its alias ``return_last_state``, the last state ``[B, D, n]``)."""
    check_flag("delta_softplus", delta_softplus)
    return_last_state = final_state_flag("return_last_state", return_last_state, return_final_state)
    work = torch.promote_types(u.dtype, torch.float32)
    dtype_in = u.dtype
    u, delta, A = u.to(work), delta.to(work), A.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    dim = u.shape[1]

    def per_channel(t):  # [B, n, N] or [B, G, n, N] -> [B, D, n, N]
        t = t.to(work)
        return t[:, None] if t.dim() == 3 else t.repeat_interleave(dim // t.shape[1], dim=1)

    Bd, Cd = per_channel(B), per_channel(C)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bd[..., t]
        ys.append((h * Cd[..., t]).sum(-1))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(u.shape)
    if not ys:  # N = 0: zeros, still part of the autograd graph (as the kernel's)
        ins = (u, delta, A, Bd, Cd)
        y, h = keep_in_graph(y, *ins), keep_in_graph(h, *ins)
    out = y if D is None else y + u * D.to(work)[:, None]
    if z is not None:
        out = out * torch.nn.functional.silu(z.to(work))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out
