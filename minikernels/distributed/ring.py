"""Ring attention (Li et al. 2021; Liu et al. 2023): exact attention over a sequence split across P ranks.

Each rank keeps its shard of the queries. The key/value shards travel around the ring, one hop per
step; after P steps every query block has met every key block. Each meeting is one call of the flash
kernel, which returns its block's output o_s and log-sum-exp lse_s, and chapter 1's merge folds it
into the running result:

    lse = log(e^lse_a + e^lse_b),   o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b.

While step s computes, the shard for step s + 1 is already in flight (batch_isend_irecv: on NCCL's
stream, beside the compute stream).

The backward runs the same ring. The flash backward of one block, given the *final* output and
log-sum-exp, gives that block's exact share of dq, dk and dv (its P = exp(S - lse) are the true
probabilities, and delta = rowsum(dO O) is a property of the rows). dq stays home and sums; the
dk, dv of a key block travel with it as an accumulator, one hop behind, and reach their owner after the
P-th hop.

Under a causal mask the shards are first moved into the zigzag layout (``partition``), so that every
rank has the same work at every step, and the outputs (gradients) moved back.
"""

from __future__ import annotations

import torch

from .._autograd import once_differentiable
from .._backend import on_device_of
from .._common import compute_dtype
from .._validate import check_attention_inputs, check_flag, check_scale, int32_addressable
from ..flash import launch_backward, launch_forward
from . import timeline
from ._group import empty_like, exchange, resolve, wait
from .partition import relayout, visible_block


def merge(out: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold a partial result (o_b, lse_b) over more keys into (out, lse), in place (float32 out and lse).
    A side with lse = -inf (no key) weighs 0; if both have none the row stays 0 with lse = -inf."""
    total = torch.logaddexp(lse, lse_b)
    shift = torch.where(torch.isneginf(total), 0.0, total)
    out.mul_(torch.exp(lse - shift).unsqueeze(-1)).add_(o_b.float() * torch.exp(lse_b - shift).unsqueeze(-1))
    lse.copy_(total)


# The gradient accumulators share the link with the key/value shards, and may be in flight between the same two
# ranks at the same time. gloo matches messages on tags, so a tag of their own keeps its receives apart. NCCL
# ignores tags and matches the messages between two ranks in the order they were posted: correct here only
# because every rank posts the same sequence (key/value of step s, gradients of step s, key/value of step s + 1).
# Keep that order when changing the loop.
_GRADIENT_TAG = 1


class _Transfer:
    """Key/value (or gradient) shards sent one hop forward around the ring, received from one hop back."""

    def __init__(self, payload: torch.Tensor, group, rank: int, world: int, phase: str, step: int,
                 gradients: bool = False):
        self.received = empty_like(payload)
        self.phase, self.step, self.device = phase, step, payload.device
        self.kind = "gradient transfer" if gradients else "transfer"
        tag = _GRADIENT_TAG if gradients else 0
        self.requests = exchange([(payload, (rank + 1) % world, tag)], [(self.received, (rank - 1) % world, tag)],
                                 group)
        self.posted = timeline.stamp(self.device) if timeline.recording() else 0.0

    def wait(self) -> torch.Tensor:
        with timeline.interval(self.phase, self.step, "wait", self.device):
            wait(self.requests)
        if timeline.recording():
            timeline.add(self.phase, self.step, self.kind, self.posted, timeline.stamp(self.device))
        return self.received


def ring_forward(q, k, v, causal: bool, scale: float, group, rank: int, world: int):
    """(out float32, lse float32) of this rank's query shard against every rank's key/value shard."""
    n = q.shape[2]
    kv = torch.stack((k, v))  # one message a step
    out = lse = None
    for step in range(world):
        incoming = _Transfer(kv, group, rank, world, "fwd", step) if step + 1 < world else None
        with timeline.interval("fwd", step, "compute", q.device):
            rows, cols, masked = visible_block(rank, (rank - step) % world, causal, n)
            o_b, lse_b = launch_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], masked, scale)
            if out is None:  # step 0: the rank's own block, which every query row meets
                out, lse = o_b.float(), lse_b
            else:
                merge(out[:, :, rows], lse[:, :, rows], o_b, lse_b)
        if incoming is not None:
            kv = incoming.wait()
    return out, lse


def ring_backward(q, k, v, out, lse, do, causal: bool, scale: float, group, rank: int, world: int):
    """(dq, dk, dv) of this rank's shards: every block's flash backward with the final out and lse."""
    n = q.shape[2]
    kv = torch.stack((k, v))
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = None  # the dk, dv accumulator of the key block held this step
    returning = None  # the accumulator of the previous step's block, on its way one hop forward
    for step in range(world):
        incoming = _Transfer(kv, group, rank, world, "bwd", step) if step + 1 < world else None
        with timeline.interval("bwd", step, "compute", q.device):
            rows, cols, masked = visible_block(rank, (rank - step) % world, causal, n)
            dq_b, dk_b, dv_b = launch_backward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], out[:, :, rows],
                                               lse[:, :, rows].contiguous(), do[:, :, rows], masked, scale)
            dq[:, :, rows] += dq_b
        dkv = returning.wait() if returning is not None else torch.zeros(kv.shape, dtype=torch.float32,
                                                                         device=q.device)
        dkv[0][:, :, cols] += dk_b
        dkv[1][:, :, cols] += dv_b
        if world > 1:  # the last hop brings each accumulator home
            returning = _Transfer(dkv, group, rank, world, "bwd", step + 1, gradients=True)
        if incoming is not None:
            kv = incoming.wait()
    if returning is not None:
        dkv = returning.wait()
    return dq, dkv[0], dkv[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group):
        group, rank, world = resolve(group)
        dtype = q.dtype
        work = compute_dtype(dtype)
        qw, kw, vw = (int32_addressable(name, t.to(work)) for name, t in (("q", q), ("k", k), ("v", v)))
        zigzag = causal and world > 1
        with on_device_of(qw):
            if zigzag:
                qw, kw, vw = relayout([qw, kw, vw], True, group, rank, world)
            out, lse = ring_forward(qw, kw, vw, causal, scale, group, rank, world)
            out = out.to(work)  # the backward's delta = rowsum(dO O) reads the output as returned
            result = relayout([out], False, group, rank, world)[0] if zigzag else out
        ctx.save_for_backward(qw, kw, vw, out, lse)
        ctx.graph_inputs = (q, k, v)
        ctx.causal, ctx.scale, ctx.group, ctx.dtype, ctx.zigzag = causal, scale, group, dtype, zigzag
        return result.to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        qw, kw, vw, out, lse = ctx.saved_tensors
        group, rank, world = resolve(ctx.group)
        do = int32_addressable("grad of out", do.to(qw.dtype))
        with on_device_of(qw):
            if ctx.zigzag:
                do = relayout([do], True, group, rank, world)[0]
            dq, dk, dv = ring_backward(qw, kw, vw, out, lse, do, ctx.causal, ctx.scale, group, rank, world)
            if ctx.zigzag:
                dq, dk, dv = relayout([dq, dk, dv], False, group, rank, world)
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   scale: float | None = None, group=None) -> torch.Tensor:
    """Attention over a sequence whose shards live on the ranks of ``group`` (default: the default
    process group), equal to ``mk.flash_attention`` on the gathered sequence, forward and backward.

    Each rank passes its contiguous shard: q ``[B, H, N/P, D]``, k and v ``[B, Hkv, N/P, D]`` with Hkv
    dividing H (grouped-query attention); rank r holds the r-th slice of the sequence, in rank order,
    and every rank's shard has the same shape. Returns this rank's shard of the output, ``[B, H, N/P,
    D]``. ``causal``: query i sees keys j <= i of the whole sequence; the shards are then balanced with
    the zigzag partition inside the call (N/P must be even), and the results come back contiguous.
    ``scale`` defaults to 1/sqrt(D). Needs ``torch.distributed`` initialized (gloo for CPU tensors,
    NCCL for GPU tensors); every rank of the group must call it. Differentiable once.
    """
    check_attention_inputs(q, k, v)
    check_flag("causal", causal)
    scale = check_scale(scale, q.shape[-1])
    _, _, world = resolve(group)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"ring attention splits one sequence across ranks: q, k, v shards must have the same "
                         f"length N/P, got q {q.shape[2]} and k, v {k.shape[2]}")
    if causal and world > 1 and q.shape[2] % 2:
        raise ValueError(f"causal ring attention balances the ranks with the zigzag partition, which cuts each "
                         f"shard in two halves: the shard length N/P must be even, got {q.shape[2]}")
    return _RingAttention.apply(q, k, v, causal, scale, group)
