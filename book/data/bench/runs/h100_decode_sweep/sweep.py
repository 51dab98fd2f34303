"""The sweep recorded in sweep.json beside this file (one H100 80GB HBM3, torch 2.11, Triton 3.6):
int8 decode with V read as int32 words or as bytes, x splits x tiles, against bf16, at B8 H32 D128
and 65536 keys, Hkv 8 and 32. Run from the repository's root with the GPU's Python:
``R=<folder> python book/data/bench/runs/h100_decode_sweep/sweep.py``.

The words variant was a compile-time switch of the split kernel under the planning choice
``decode.int8_v_words``; it was measured slower on a dense cache and removed, so today the script
runs the bytes rows only (the package's kernel): it is kept as the record of what made the numbers."""

import json
import os
import time
from functools import partial

import torch

from minikernels import planning
from minikernels.bench.common import time_rotating
from minikernels.bench.decoding import _pages
from minikernels.decode import decode_attention
from minikernels.kv_cache import quantize_int8

B, H, D, L = 8, 32, 128, 65536
HAS_WORDS = "decode.int8_v_words" in planning.CHOICES  # the removed variant's switch
WORDS = (True, False) if HAS_WORDS else (False,)
BUDGET = float(os.environ.get("SWEEP_BUDGET", "110"))  # seconds, then the rest is skipped
TILES = [dict(BLOCK_N=128, num_warps=4, num_stages=2), dict(BLOCK_N=128, num_warps=4, num_stages=4),
         dict(BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_N=128, num_warps=8, num_stages=3)]
out, start = [], time.time()


def timed(name, call, n_bytes, want, **meta):
    if time.time() - start > BUDGET:
        return
    try:
        got = call().float()
        err = ((got - want).norm() / want.norm()).item()
        ms, _ = time_rotating([call])
    except Exception as exc:  # a configuration that fails is printed, not fatal
        print(f"{name} {meta}: failed {type(exc).__name__} {str(exc)[:300]}", flush=True)
        return
    row = {"name": name, "ms": ms, "GBps": n_bytes / ms / 1e6, "err": err, **meta}
    out.append(row)
    print(json.dumps(row), flush=True)


for hkv in (8, 32):
    g = torch.Generator(device="cuda").manual_seed(hkv)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
    bf16_bytes, int8_bytes = 2 * k.numel() * 2, 2 * k.numel() + 2 * ks.numel() * 4
    want = decode_attention(q, k, v, lens).float()
    timed("dense bf16", partial(decode_attention, q, k, v, lens), bf16_bytes, want, hkv=hkv)
    for splits in (None, 32, 64):
        timed("dense bf16", partial(decode_attention, q, k, v, lens, num_splits=splits), bf16_bytes, want, hkv=hkv,
              splits=splits)
    pools = {}
    for page in (16, 128):
        table = _pages(k, page, seed=page)[1]
        pools[page] = (table, *(_pages(t, page, seed=page)[0] for t in (kq, vq, ks, vs)))
    for words in WORDS:
        how = "words" if words else "bytes"
        for tile in [None, *TILES] if words else [None]:
            choices = {**({"decode.int8_v_words": words} if HAS_WORDS else {}),
                       **({"decode.split_int8": tile} if tile else {})}
            with planning.override(choices):
                for splits in (None, 16, 32, 64) if tile is None else (None,):
                    timed(f"dense int8 {how}",
                          partial(decode_attention, q, kq, vq, lens, k_scale=ks, v_scale=vs, num_splits=splits),
                          int8_bytes, want, hkv=hkv, cfg=tile, splits=splits)
                for page, (table, kqp, vqp, ksp, vsp) in pools.items():
                    for splits in (None, 64) if tile is None else (None,):
                        timed(f"int8 paged{page} {how}",
                              partial(decode_attention, q, kqp, vqp, lens, block_table=table, k_scale=ksp,
                                      v_scale=vsp, num_splits=splits),
                              int8_bytes, want, hkv=hkv, cfg=tile, splits=splits)
    pools = k = v = kq = vq = None  # free this shape's caches before the next
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("R", "."), "sweep_int8.json"), "w"), indent=0)
print("sweep done", round(time.time() - start))
