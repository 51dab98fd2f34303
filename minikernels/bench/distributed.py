"""What one GPU can measure of attention across devices (chapter 6): the time of a ring step's local block
(the flash kernel on one query shard against one key/value shard, forward and backward), the time to copy
that block's key/value shard inside the GPU, and the ring and Ulysses functions on a process group of one
(NCCL) against flash attention on the same shard.

The link between GPUs is not here: each row carries the NVLink time the transfer would take
(``NVLINK_GBPS``, a datasheet figure, not a measurement) and whether the block's compute would hide it.
Multi-GPU scaling is measured by ``tools/ring_bench.py`` under torchrun when several GPUs are lent.
"""

from __future__ import annotations

import socket

import torch

from .common import do_bench

# H100 / H200 SXM: NVLink 4, 18 links of 25 GB/s each way = 450 GB/s per direction (900 GB/s both ways)
NVLINK_GBPS = 450.0


def _rows_per_block(n: int) -> dict:
    """The blocks of a ring step on a shard of n tokens: (query rows, key rows, causal mask)."""
    every, early = slice(None), slice(0, n // 2)
    return {"full": (every, every, False),  # non-causal: every step
            "half": (every, early, False),  # causal zigzag: every step but the first
            "diagonal": (every, every, True)}  # causal: the first step


def _block_rows(n: int, b: int, h: int, hkv: int, d: int, ceilings: dict) -> list[dict]:
    from .. import flash

    scale = d**-0.5
    q, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kv = torch.stack((k, v))  # the message of one ring step
    kv_bytes = kv.numel() * kv.element_size()
    landing = torch.empty_like(kv)
    copy_ms = do_bench(lambda: landing.copy_(kv))
    rows = []
    for block, (qr, kr, masked) in _rows_per_block(n).items():
        qb, kb, vb, dob = q[:, :, qr], k[:, :, kr], v[:, :, kr], do[:, :, qr]
        o, lse = flash.launch_forward(qb, kb, vb, masked, scale)
        nq, nk = qb.shape[2], kb.shape[2]
        pairs = nq * nk * (0.5 if masked else 1.0)
        calls = {"fwd": lambda qb=qb, kb=kb, vb=vb, masked=masked: flash.launch_forward(qb, kb, vb, masked, scale),
                 "bwd": lambda qb=qb, kb=kb, vb=vb, o=o, lse=lse, dob=dob, masked=masked:
                 flash.launch_backward(qb, kb, vb, o, lse, dob, masked, scale)}
        for direction, call in calls.items():
            ms = do_bench(call)
            if direction == "fwd":
                flops, sent = 4 * b * h * pairs * d, kv_bytes
            else:
                flops, sent = 2.5 * 4 * b * h * pairs * d, 3 * kv_bytes  # k, v forward; dk, dv in float32
            link_ms = sent / (NVLINK_GBPS * 1e9) * 1e3
            rows.append({"impl": "minikernels", "pass": direction, "shape": f"B{b} H{h}/{hkv} n{n} D{d} {block}",
                         "B": b, "H": h, "Hkv": hkv, "n": n, "D": d, "block": block, "dtype": "bfloat16",
                         "ms": ms, "TFLOPs": flops / (ms * 1e-3) / 1e12, "bytes_per_step": sent,
                         "copy_ms_kv": copy_ms, "copy_GBps_kv": 2 * kv_bytes / (copy_ms * 1e-3) / 1e9,
                         "nvlink_ms_predicted": link_ms, "hidden_predicted": ms >= link_ms, "timing": "do_bench"})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_of_one_rows(n: int, b: int, h: int, hkv: int, d: int) -> list[dict]:
    """ring_attention and ulysses_attention on an NCCL group of one GPU (nothing to exchange: the cost of the
    wrapper around the kernels), checked against and timed beside flash attention on the same tensors."""
    import torch.distributed as dist

    from .. import distributed, flash_attention
    from ..testing import assert_close

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    rows = []
    try:
        q, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        impls = {"minikernels": flash_attention, "ring (P=1, nccl)": distributed.ring_attention,
                 "ulysses (P=1, nccl)": distributed.ulysses_attention}
        for causal in (False, True):
            want = flash_attention(q, k, v, causal=causal)
            for impl, fn in impls.items():
                assert_close(fn(q, k, v, causal=causal), want.double(), torch.bfloat16, name=impl)
                out = fn(q, k, v, causal=causal)
                for direction in ("fwd", "bwd"):
                    if direction == "fwd":
                        ms = do_bench(lambda fn=fn, causal=causal: fn(q, k, v, causal=causal))
                    else:
                        ms = do_bench(lambda out=out: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
                    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0) * (1.0 if direction == "fwd" else 2.5)
                    rows.append({"impl": impl, "pass": direction,
                                 "shape": f"B{b} H{h}/{hkv} N{n} D{d} whole" + (" causal" if causal else ""),
                                 "B": b, "H": h, "Hkv": hkv, "n": n, "D": d, "causal": causal, "dtype": "bfloat16",
                                 "ms": ms, "TFLOPs": flops / (ms * 1e-3) / 1e12, "timing": "do_bench"})
    finally:
        if started:
            dist.destroy_process_group()
    return rows


def bench_distributed(ceilings: dict, quick: bool = False) -> list[dict]:
    """Per-rank shapes of a long-context model: H = 32 query heads, 8 key/value heads, D = 128, bf16, shard
    lengths n = N/P from 1024 to 16384 tokens."""
    b, h, hkv, d = 1, 32, 8, 128
    rows = []
    for n in ([2048, 8192] if quick else [1024, 2048, 4096, 8192, 16384]):
        rows += _block_rows(n, b, h, hkv, d, ceilings)
        torch.cuda.empty_cache()
    rows += _group_of_one_rows(4096, b, h, hkv, d)
    return rows
