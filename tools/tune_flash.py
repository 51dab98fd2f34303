"""Sweep the launch configurations of mk.flash_attention's three kernels on the GPU (bf16).

    python3 tools/tune_flash.py --out sweep.json

For each kernel (forward, dK/dV, dQ), head dim (64, 128) and causal flag, times every candidate
(tile sizes, warps, pipeline stages) on B4 H2048/D N4096 and prints the fastest next to the
configuration minikernels uses now. The winners are copied by hand into ``flash._tuned_config``;
the tests then verify them. Compiling ~360 variants one after the
other takes minutes, so worker processes compile them first (filling Triton's on-disk cache, on small
inputs with the same specialization), and one process times them afterwards.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import multiprocessing as mp

import torch

FWD = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
       for (m, n), w, s in itertools.product([(64, 64), (64, 128), (128, 32), (128, 64), (128, 128)], (4, 8),
                                             (2, 3, 4))]
DKDV = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
        for (m, n), w, s in itertools.product([(32, 64), (32, 128), (64, 64), (64, 128), (128, 128)], (4, 8),
                                              (1, 2, 3))]
DQ = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
      for (m, n), w, s in itertools.product([(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)], (4, 8),
                                            (1, 2, 3))]
KERNELS = {"fwd": FWD, "dkdv": DKDV, "dq": DQ}


def _inputs(d: int, n: int, b: int):
    h = 2048 // d
    return [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]


def _call(kernel: str, cfg: dict, q, k, v, do, o, lse, causal: bool):
    from minikernels import flash

    scale = q.shape[-1] ** -0.5
    if kernel == "fwd":
        return lambda: flash.launch_forward(q, k, v, causal, scale, cfg=cfg)
    if kernel == "dkdv":
        return lambda: flash.launch_backward(q, k, v, o, lse, do, causal, scale, dkdv_cfg=cfg)
    return lambda: flash.launch_backward(q, k, v, o, lse, do, causal, scale, dq_cfg=cfg)


def _compile(job):
    """Run one variant once on a small input with the same specialization: fills the disk cache."""
    kernel, cfg, d, causal = job
    from minikernels import flash

    q, k, v, do = _inputs(d, 256, 1)
    o, lse = flash.launch_forward(q, k, v, causal, d**-0.5)
    try:
        _call(kernel, cfg, q, k, v, do, o, lse, causal)()
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # e.g. out of shared memory: reported, then skipped
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def main() -> None:
    import triton.testing

    from minikernels import flash

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="flash_sweep.json")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--n", type=int, default=4096)
    args = parser.parse_args()
    jobs = [(kern, cfg, d, causal) for kern, cfgs in KERNELS.items() for cfg in cfgs
            for d in (64, 128) for causal in (False, True)]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        errors = pool.map(_compile, jobs, chunksize=4)
    current = {kern: functools.partial(flash.launch_config, kern) for kern in ("fwd", "dkdv", "dq")}
    results = []
    for d in (64, 128):
        q, k, v, do = _inputs(d, args.n, 16384 // args.n)
        for causal in (False, True):
            o, lse = flash.launch_forward(q, k, v, causal, d**-0.5)
            for kern, cfgs in KERNELS.items():
                now = current[kern](d, 2)
                # the backward timings include delta and the other backward kernel at its current config
                timed = []
                for cfg in cfgs:
                    err = errors[jobs.index((kern, cfg, d, causal))]
                    if err:
                        continue
                    fn = _call(kern, cfg, q, k, v, do, o, lse, causal)
                    ms = float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
                    timed.append((ms, cfg))
                    results.append({"kernel": kern, "D": d, "causal": causal, "cfg": cfg, "ms": ms})
                timed.sort(key=lambda t: t[0])
                now_ms = next((ms for ms, c in timed if c == now), float("nan"))
                best_ms, best = timed[0]
                print(f"{kern:5} D{d:<4} causal={causal!s:5} now {now_ms:7.3f} ms {now}")
                print(f"{'':5} {'':5} {'':12} best {best_ms:6.3f} ms {best}  ({now_ms / best_ms:.2f}x)")
    with open(args.out, "w") as f:
        json.dump({"n": args.n, "results": results, "compile_errors": [(j[0], j[1], j[2], j[3], e)
                                                                       for j, e in zip(jobs, errors) if e]}, f)


if __name__ == "__main__":
    main()
