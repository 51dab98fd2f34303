"""Run mk.distributed on a few processes, check it against one device, and record the ring's timeline.

    torchrun --standalone --nproc-per-node 2 tools/ring_demo.py --out ring_demo.json

gloo on CPU tensors (Triton's interpreter), NCCL on one GPU per rank when GPUs are present. Every rank
holds its contiguous shard of one sequence; ring_attention and ulysses_attention, causal and not, forward
and backward, are compared with mk.flash_attention on the gathered sequence (on rank 0). Then one causal
ring forward and backward runs inside ``record_timeline``, and rank 0 writes every rank's intervals
(seconds from the common start) with the checks' verdicts to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import minikernels as mk
from minikernels.testing import randn, rel_error, tolerance


def gathered(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=2)


def check(fn, causal: bool, shape: tuple, rank: int, world: int) -> bool | None:
    """Output and dq, dk, dv of ``fn`` on the shards, gathered, against mk.flash_attention on the whole
    sequence (relative error within the dtype's bound); the verdict on rank 0, None elsewhere."""
    b, h, hkv, n, d = shape
    q, k, v, do = (randn(b, heads, world * n, d, seed=s) for s, heads in enumerate((h, hkv, hkv, h)))
    mine = [t[:, :, rank * n:(rank + 1) * n].clone().requires_grad_() for t in (q, k, v)]
    out = fn(*mine, causal=causal)
    grads = torch.autograd.grad(out, mine, do[:, :, rank * n:(rank + 1) * n])
    got = [gathered(t.detach()) for t in (out, *grads)]
    if rank != 0:
        return None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    want = mk.flash_attention(q, k, v, causal=causal)
    want = [want, *torch.autograd.grad(want, (q, k, v), do)]
    return all(rel_error(g, w) <= tolerance(q.dtype) for g, w in zip(got, want))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON file rank 0 writes")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--shard", type=int, default=16, help="tokens per rank, N/P (even)")
    parser.add_argument("--head-dim", type=int, default=16)
    args = parser.parse_args()

    on_gpu = mk.backend() == "cuda"
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)  # the ranks share the CPU
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = (1, args.heads, args.kv_heads, args.shard, args.head_dim)

    verdicts = {}
    for name, fn in (("ring", mk.distributed.ring_attention), ("ulysses", mk.distributed.ulysses_attention)):
        for causal in (False, True):
            verdicts[f"{name} causal={causal}"] = check(fn, causal, shape, rank, world)

    # the timeline: one causal ring forward and backward, every rank starting together
    b, h, hkv, n, d = shape
    q, do = randn(b, h, n, d, seed=10 + rank, requires_grad=True), randn(b, h, n, d, seed=20 + rank)
    k, v = (randn(b, hkv, n, d, seed=s + rank, requires_grad=True) for s in (30, 40))
    mk.distributed.ring_attention(q, k, v, causal=True).backward(do)  # first call: warm-up
    dist.barrier()
    with mk.distributed.record_timeline() as events:
        mk.distributed.ring_attention(q, k, v, causal=True).backward(do)
    everyone = [None] * world
    dist.all_gather_object(everyone, events)
    if rank == 0:
        start = min(e["start"] for per_rank in everyone for e in per_rank)
        timeline = [[{**e, "start": e["start"] - start, "end": e["end"] - start} for e in per_rank]
                    for per_rank in everyone]
        record = {"world": world, "backend": dist.get_backend(), "device": mk.backend(),
                  "gpu": torch.cuda.get_device_name() if on_gpu else None,
                  "shape": dict(zip("B H Hkv n D".split(), shape)),
                  "date": time.strftime("%Y-%m-%d"), "checks": verdicts, "timeline": timeline}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
