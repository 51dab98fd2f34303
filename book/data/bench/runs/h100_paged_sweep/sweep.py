"""The two paged-decode sweeps recorded beside this file, on H100 80GB HBM3 machines (torch 2.11,
Triton 3.6), at B8 H32 D128, Hkv 8 and 32, pages of 16 and 128 tokens, bf16 and int8 caches, beside the
dense kernel and FlashInfer 0.5.3's paged decode. Each ran from its own copy of this script; the copies
differed only in the grid, which ``SWEEP`` selects here.

- ``SWEEP=1`` -> sweep.json, with the package at commit c31da96 (16 programs per SM on pages, 4 dense):
  tiles x split counts, the table read in the block's own iteration (``prefetch`` 0: the package) or a
  block ahead (``prefetch`` 1: ``decode_prefetch``). 65536 and part of 4096 keys fit its time budget.
- ``SWEEP=2`` -> sweep2.json, with the package as committed beside it (8 programs per SM for every
  layout, int8 pages read their table a block ahead), on another machine: dense and paged rows at the
  old and new rules' split counts; ``var`` "base" is the package, "pfv" is ``decode_pfv`` (the kernel
  at c31da96 reading one table entry per key, a block ahead, whatever the page size). 65536 and part
  of 4096 keys fit its time budget.

A row's ``tile`` null is the planner's tile, ``splits`` null the planner's split count. Run from the
repository's root with the GPU's Python: ``python book/data/bench/runs/h100_paged_sweep/make_variants.py
&& SWEEP=2 OUT=<folder> python book/data/bench/runs/h100_paged_sweep/sweep.py``; it stops taking new
rows after SWEEP_BUDGET seconds."""
import json
import os
import sys
import time
from functools import partial

import torch

from minikernels import planning  # first: on a CPU it switches Triton to its interpreter
from minikernels.bench.common import time_rotating
from minikernels.bench.decoding import _flashinfer_paged, _pages
from minikernels.decode import decode_attention
from minikernels.kv_cache import quantize_int8

sys.path.insert(0, os.path.dirname(__file__))
import decode_pfv  # noqa: E402  (written by make_variants.py)
import decode_prefetch  # noqa: E402

SWEEP = int(os.environ.get("SWEEP", "2"))
B, H, D = 8, 32, 128
BUDGET = float(os.environ.get("SWEEP_BUDGET", "250"))
OUTF = os.path.join(os.environ.get("OUT", "."), "sweep.json" if SWEEP == 1 else "sweep2.json")
dev = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [int(x) for x in os.environ.get("SWEEP_LENS", "65536,4096,16384").split(",")]
BF16_TILES = [None, dict(BLOCK_N=64, num_warps=4, num_stages=4), dict(BLOCK_N=128, num_warps=4, num_stages=3),
              dict(BLOCK_N=128, num_warps=4, num_stages=2), dict(BLOCK_N=64, num_warps=8, num_stages=3)]
INT8_TILES = [None, dict(BLOCK_N=128, num_warps=4, num_stages=2), dict(BLOCK_N=128, num_warps=4, num_stages=4),
              dict(BLOCK_N=64, num_warps=4, num_stages=4), dict(BLOCK_N=256, num_warps=4, num_stages=2)]
PACKAGE = sys.modules["minikernels.decode"]
out, start = [], time.time()


def timed(name, call, n_bytes, want, **meta):
    if time.time() - start > BUDGET:
        return None
    try:
        got = call().float()
        err = ((got - want).norm() / want.norm()).item()
        if not err < 6e-2:
            raise AssertionError(f"err {err}")
        ms, _ = time_rotating([call]) if dev == "cuda" else (0.0, "")
    except Exception as exc:
        print(f"{name} {meta}: failed {type(exc).__name__} {str(exc)[:200]}", flush=True)
        return None
    row = {"name": name, "ms": ms, "GBps": n_bytes / ms / 1e6 if ms else 0, "err": err, **meta}
    out.append(row)
    print(json.dumps(row), flush=True)
    json.dump(out, open(OUTF, "w"), indent=0)
    return ms


def with_tile(fn, key, tile):
    def call(*a, **k):
        if tile is None:
            return fn(*a, **k)
        with planning.override({key: tile}):
            return fn(*a, **k)
    return call


def paged_grid(hkv):
    """(name, kernel module, planning key, tile, row fields) of the paged rows at one shape and page."""
    if SWEEP == 1:
        for mod, pf in ((PACKAGE, 0), (decode_prefetch, 1)):
            for tile in BF16_TILES if pf == 0 else [None, BF16_TILES[2]]:
                yield "paged bf16", mod, "decode.split", tile, {"prefetch": pf}
            for tile in INT8_TILES if pf == 0 else [None, INT8_TILES[1]]:
                yield "paged int8", mod, "decode.split_int8", tile, {"prefetch": pf}
    else:
        for var, mod in (("base", PACKAGE), ("pfv", decode_pfv)):
            for tile in (None, BF16_TILES[2]):
                yield "paged bf16", mod, "decode.split", tile, {"var": var}
        for var, mod in (("base", PACKAGE), ("pfv", decode_pfv)):
            yield "paged int8", mod, "decode.split_int8", None, {"var": var}


for length in LENS:
    for hkv in (8, 32):
        if time.time() - start > BUDGET:
            break
        g = torch.Generator(device=dev).manual_seed(hkv + length)
        q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, hkv, length, D, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, hkv, length, D, device=dev, dtype=torch.bfloat16, generator=g)
        lens = torch.full((B,), length, dtype=torch.int32, device=dev)
        (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
        bf16_bytes, int8_bytes = 2 * k.numel() * 2, 2 * k.numel() + 2 * ks.numel() * 4
        want = decode_attention(q, k, v, lens).float()
        meta = dict(L=length, hkv=hkv)
        if SWEEP == 1:  # split counts around the old rules'; dense rows at the rule's own
            split_opts, dense_splits = ([None, 8, 16, 33, 64] if hkv == 8 else [None, 2, 4, 9, 16]), [None]
        else:  # about 4, 8 and 16 programs per SM (132 SMs): the old dense rule, the new one, the old paged one
            split_opts = dense_splits = [None, 9, 17, 33] if hkv == 8 else [None, 3, 5, 9]
        for s in dense_splits:
            split = {"splits": s} if SWEEP == 2 else {}
            timed("dense bf16", partial(decode_attention, q, k, v, lens, num_splits=s), bf16_bytes, want, **split,
                  **meta)
        for s in dense_splits:
            split = {"splits": s} if SWEEP == 2 else {}
            timed("dense int8", partial(decode_attention, q, kq, vq, lens, k_scale=ks, v_scale=vs, num_splits=s),
                  int8_bytes, want, **split, **meta)
        for page in (16, 128):
            table = _pages(k, page, seed=page)[1]
            kp, vp, kqp, vqp, ksp, vsp = (_pages(t, page, seed=page)[0] for t in (k, v, kq, vq, ks, vs))
            if dev == "cuda":
                try:
                    fi = _flashinfer_paged(table, page, hkv)
                    timed("flashinfer", partial(fi, q, kp, vp), bf16_bytes, want, page=page, **meta)
                except Exception as exc:
                    print("flashinfer failed", exc)
            for name, mod, key, tile, fields in paged_grid(hkv):
                fn = with_tile(mod.decode_attention, key, tile)
                cache = (kp, vp, {}) if name == "paged bf16" else (kqp, vqp, {"k_scale": ksp, "v_scale": vsp})
                for s in split_opts:
                    timed(name, partial(fn, q, cache[0], cache[1], lens, block_table=table, num_splits=s, **cache[2]),
                          bf16_bytes if name == "paged bf16" else int8_bytes, want, page=page, tile=tile, splits=s,
                          **fields, **meta)
            kp = vp = kqp = vqp = ksp = vsp = None
            if dev == "cuda":
                torch.cuda.empty_cache()
        q = k = v = kq = vq = None
print("sweep done", round(time.time() - start), len(out), "rows")
