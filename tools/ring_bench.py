"""Scaling of attention across GPUs: mk.distributed's ring and Ulysses against PyTorch's context parallelism.

    torchrun --standalone --nproc-per-node P tools/ring_bench.py --out ring_scaling_pP.json

One GPU per rank, NCCL. For each global sequence length N (every rank holds N/P tokens), bf16, B = 1,
H = 16 heads (key/value heads too: PyTorch's context parallelism is timed on plain multi-head attention),
D = 128, causal and not, it times a forward and backward of

* ``ring``: mk.distributed.ring_attention on each rank's contiguous shard;
* ``ulysses``: mk.distributed.ulysses_attention on the same shards;
* ``torch-cp (allgather)``, ``torch-cp (alltoall)``: F.scaled_dot_product_attention inside
  torch.distributed.tensor.experimental.context_parallel (its own load-balanced sharding), with each of
  its two rotate methods;

as the wall time of the slowest rank (median of repetitions), and reports tokens/s = N / time. For the
ring it also records one forward and backward under ``record_timeline``: the median time per step of
computation and of exposed communication (waiting on a transfer no computation hid). Run it with P = 1, 2,
4 on one host; rank 0 writes the rows, with the GPU and versions, to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import minikernels as mk


def wall_ms(fn, reps: int) -> float:
    """Median wall time of ``fn`` over ``reps`` runs started together on every rank; the slowest rank's."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    ms = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


def step_profile(q, k, v, do, causal: bool) -> dict:
    """Median ms per ring step of computation and of exposed communication, forward and backward."""
    with mk.distributed.record_timeline() as events:
        out = mk.distributed.ring_attention(q, k, v, causal=causal)
        torch.autograd.grad(out, (q, k, v), do)
    profile = {}
    for phase in ("fwd", "bwd"):
        for kind in ("compute", "wait"):
            spans = [(e["end"] - e["start"]) * 1e3 for e in events if e["phase"] == phase and e["kind"] == kind]
            profile[f"{phase}_step_{kind}_ms"] = statistics.median(spans) if spans else 0.0
    return profile


def ours(fn, q, k, v, do, causal: bool, reps: int) -> float:
    """ms of a forward and backward of ``fn`` on this rank's contiguous shard."""
    return wall_ms(lambda: torch.autograd.grad(fn(q, k, v, causal=causal), (q, k, v), do), reps)


def torch_cp(mesh, q, k, v, do, causal: bool, rotate: str, reps: int) -> float:
    """ms of a forward and backward of SDPA under PyTorch's context parallelism, on its own (load-balanced)
    shards of the whole sequence. It shards the buffers in place when the context opens, so the timing runs
    inside one context, on copies."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    set_rotate_method(rotate)
    buffers = [t.clone() for t in (q, k, v, do)]
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers=set(buffers)):
        qs, ks, vs = (t.detach().requires_grad_() for t in buffers[:3])

        def run():
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
            torch.autograd.grad(out, (qs, ks, vs), buffers[3])

        return wall_ms(run, reps)


def bench_length(mesh, n_total: int, rank: int, world: int, reps: int) -> list[dict]:
    """The rows of every implementation, causal and not, at one global sequence length."""
    b, h, d = 1, 16, 128
    n = n_total // world
    gen = torch.Generator().manual_seed(n_total)
    whole = [torch.randn(b, h, n_total, d, generator=gen).to("cuda", torch.bfloat16) for _ in range(4)]
    q, k, v, do = (t[:, :, rank * n:(rank + 1) * n].clone().requires_grad_(i < 3) for i, t in enumerate(whole))
    rows = []
    for causal in (False, True):
        impls = {"ring": lambda c=causal: ours(mk.distributed.ring_attention, q, k, v, do, c, reps),
                 "ulysses": lambda c=causal: ours(mk.distributed.ulysses_attention, q, k, v, do, c, reps)}
        for rotate in ("allgather", "alltoall"):
            impls[f"torch-cp ({rotate})"] = lambda c=causal, rot=rotate: torch_cp(mesh, *whole, c, rot, reps)
        for impl, timed in impls.items():
            row = {"impl": impl, "pass": "fwd+bwd", "world": world, "N": n_total, "n": n, "B": b, "H": h, "D": d,
                   "causal": causal, "dtype": "bfloat16"}
            try:
                row["ms"] = timed()
                row["tokens_per_s"] = b * n_total / (row["ms"] * 1e-3)
                if impl == "ring":
                    row.update(step_profile(q, k, v, do, causal))
            except Exception as error:  # an implementation that fails is reported, not fatal
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            rows.append(row)
            if rank == 0:
                print({key: round(val, 3) if isinstance(val, float) else val for key, val in row.items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", default="8192,16384,32768,65536,131072", help="global sequence lengths N")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world,))
    rows = []
    for n_total in (int(x) for x in args.lengths.split(",")):
        rows += bench_length(mesh, n_total, rank, world, args.reps)
        torch.cuda.empty_cache()
    if rank == 0:
        env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
               "gpu": torch.cuda.get_device_name(), "gpus": world, "torch": torch.__version__,
               "triton": __import__("triton").__version__}
        with open(args.out, "w") as f:
            json.dump({"op": "ring_scaling", **env, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
