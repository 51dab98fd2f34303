"""Ulysses attention (Jacobs et al. 2023): split the heads, not the sequence, for the attention itself.

Each rank holds a sequence shard of every head. One all-to-all trades that for every position of
H/P heads; each rank then runs ordinary single-device attention (``mk.flash_attention``, causal or not:
it sees the whole sequence), and a second all-to-all brings the output back to sequence shards. The
backward is the same two exchanges in reverse around the flash backward. Each all-to-all moves
(P - 1)/P of a rank's shard, whatever P: the volume per rank falls as the ranks grow, where a ring's
does not; but P can be at most the number of heads.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .._validate import check_attention_inputs, check_flag, check_scale
from ..flash import flash_attention
from ._group import resolve


def sequence_to_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """[B, H, n, D] (this rank's positions, every head) -> [B, H/P, P n, D] (every position, this rank's
    heads): head group g goes to rank g; the shards arrive in rank order, which is sequence order."""
    B, H, n, D = x.shape
    send = x.reshape(B, world, H // world, n, D).transpose(0, 1).contiguous()  # [P, B, H/P, n, D] by destination
    received = torch.empty_like(send)  # [P, B, H/P, n, D] by source rank
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * n, D)


def heads_to_sequence(y: torch.Tensor, group, world: int) -> torch.Tensor:
    """The inverse of ``sequence_to_heads``: [B, H/P, P n, D] -> [B, H, n, D]."""
    B, h, N, D = y.shape
    n = N // world
    send = y.reshape(B, h, world, n, D).permute(2, 0, 1, 3, 4).contiguous()  # [P, B, H/P, n, D] by destination
    received = torch.empty_like(send)  # [P, B, H/P, n, D] by head group
    dist.all_to_all_single(received, send, group=group)
    return received.transpose(0, 1).reshape(B, world * h, n, D)


class _Exchange(torch.autograd.Function):
    """One of the two all-to-alls, differentiable: the gradient goes back through the other one."""

    @staticmethod
    def forward(ctx, x, group, world, to_heads: bool):
        ctx.group, ctx.world, ctx.to_heads = group, world, to_heads
        return (sequence_to_heads if to_heads else heads_to_sequence)(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        inverse = heads_to_sequence if ctx.to_heads else sequence_to_heads
        return inverse(grad.contiguous(), ctx.group, ctx.world), None, None, None


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                      scale: float | None = None, group=None) -> torch.Tensor:
    """Attention over a sequence whose shards live on the ranks of ``group`` (default: the default
    process group), by trading sequence shards for head groups (all_to_all_single), equal to
    ``mk.flash_attention`` on the gathered sequence, forward and backward.

    Same contract as ``ring_attention``: q ``[B, H, N/P, D]``, k and v ``[B, Hkv, N/P, D]`` (Hkv dividing
    H), rank r holding the r-th slice of the sequence; returns this rank's output shard. The number of
    query heads H must be divisible by P. With grouped-query attention and Hkv not divisible by P, each
    key/value head is repeated (to lcm(Hkv, P) heads) before the exchange, so that every rank receives
    the key/value heads its query heads read; their gradients sum back.
    """
    check_attention_inputs(q, k, v)
    check_flag("causal", causal)
    scale = check_scale(scale, q.shape[-1])
    group, _, world = resolve(group)
    H, Hkv = q.shape[1], k.shape[1]
    if H % world:
        raise ValueError(f"ulysses attention gives each of the P={world} ranks H/P whole heads: the number of "
                         f"query heads H={H} must be divisible by P (use ring_attention otherwise)")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"ulysses attention splits one sequence across ranks: q, k, v shards must have the same "
                         f"length N/P, got q {q.shape[2]} and k, v {k.shape[2]}")
    if Hkv % world:
        repeat = math.lcm(Hkv, world) // Hkv
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    qh, kh, vh = (_Exchange.apply(t, group, world, True) for t in (q, k, v))
    out = flash_attention(qh, kh, vh, causal=causal, scale=scale)
    return _Exchange.apply(out, group, world, False)
