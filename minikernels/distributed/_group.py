"""The process group an op runs on, and the point-to-point exchange the ring is made of."""

from __future__ import annotations

import torch
import torch.distributed as dist


def resolve(group) -> tuple[object, int, int]:
    """(group, this rank in it, its size). ``group=None``: the default group. Raises RuntimeError, with
    what to do, when torch.distributed has no process group: running on one device is a different
    call (mk.flash_attention), not a silent fallback."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group(...) "
                           "on every rank first (for example under torchrun), or call mk.flash_attention on one "
                           "device")
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_rank(group), dist.get_world_size(group)


def exchange(sends, recvs, group) -> list:
    """Post point-to-point sends ``[(tensor, peer, tag)]`` and receives ``[(tensor, peer, tag)]`` in one
    batch (peers are ranks within ``group``) and return the requests without waiting. With NCCL the
    transfers run on NCCL's own stream, so the kernels launched next on the compute stream overlap them;
    the tags keep two messages between the same pair of ranks apart on gloo, which matches on
    them; NCCL ignores tags and matches each pair's messages in posting order, so every rank must post its
    messages in the same order."""
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer, tag=tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer, tag=tag) for t, peer, tag in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def wait(requests) -> None:
    for r in requests:
        r.wait()


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """A receive buffer (every element is overwritten by the transfer)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)
