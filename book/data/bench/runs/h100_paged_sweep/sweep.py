"""The first sweep recorded in sweep.json beside this file (one H100 80GB HBM3, torch 2.11, Triton 3.6),
made with the package at commit c31da96: paged decode at B8 H32 D128, Hkv 8 and 32, 65536 and 4096
keys (16384 was not reached in its time budget), pages of 16 and 128 tokens, bf16 and int8 caches;
tiles x split counts, with the table read in the block's own iteration (``prefetch`` 0: the package
at c31da96) or a block ahead (``prefetch`` 1: ``decode_prefetch``, written by make_variants.py), beside
the dense kernel and FlashInfer 0.5.3's paged decode. A row's ``tile`` null is the planner's tile,
``splits`` null its split count. Run from the repository's root with the GPU's Python:
``python book/data/bench/runs/h100_paged_sweep/make_variants.py && OUT=<folder> python
book/data/bench/runs/h100_paged_sweep/sweep.py``; it stops taking new rows after SWEEP_BUDGET seconds."""
import json, os, sys, time
from functools import partial
import torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
from minikernels import planning
from minikernels.bench.common import time_rotating
from minikernels.bench.decoding import _pages, _flashinfer_paged
from minikernels.decode import decode_attention
from minikernels.kv_cache import quantize_int8
import decode_prefetch

B, H, D = 8, 32, 128
BUDGET = float(os.environ.get("SWEEP_BUDGET", "250"))
OUTF = os.path.join(os.environ.get("OUT", "."), "sweep.json")
dev = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [int(x) for x in os.environ.get("SWEEP_LENS", "65536,4096,16384").split(",")]
BF16_TILES = [None, dict(BLOCK_N=64, num_warps=4, num_stages=4), dict(BLOCK_N=128, num_warps=4, num_stages=3),
              dict(BLOCK_N=128, num_warps=4, num_stages=2), dict(BLOCK_N=64, num_warps=8, num_stages=3),
              ]
INT8_TILES = [None, dict(BLOCK_N=128, num_warps=4, num_stages=2), dict(BLOCK_N=128, num_warps=4, num_stages=4),
              dict(BLOCK_N=64, num_warps=4, num_stages=4), dict(BLOCK_N=256, num_warps=4, num_stages=2),
              ]
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
        timed("dense bf16", partial(decode_attention, q, k, v, lens), bf16_bytes, want, **meta)
        timed("dense int8", partial(decode_attention, q, kq, vq, lens, k_scale=ks, v_scale=vs), int8_bytes, want, **meta)
        bhk = B * hkv
        split_opts = [None, 8, 16, 33, 64] if hkv == 8 else [None, 2, 4, 9, 16]
        for page in (16, 128):
            table = _pages(k, page, seed=page)[1]
            kp, vp, kqp, vqp, ksp, vsp = (_pages(t, page, seed=page)[0] for t in (k, v, kq, vq, ks, vs))
            if dev == "cuda":
                try:
                    fi = _flashinfer_paged(table, page, hkv)
                    timed("flashinfer", lambda: fi(q, kp, vp), bf16_bytes, want, page=page, **meta)
                except Exception as exc:
                    print("flashinfer failed", exc)
            for mod, pf in ((sys.modules["minikernels.decode"], 0), (decode_prefetch, 1)):
                for tile in BF16_TILES if pf == 0 else [None, BF16_TILES[2]]:
                    fn = with_tile(mod.decode_attention, "decode.split", tile)
                    for s in split_opts:
                        timed("paged bf16", partial(fn, q, kp, vp, lens, block_table=table, num_splits=s), bf16_bytes,
                              want, page=page, tile=tile, splits=s, prefetch=pf, **meta)
                for tile in INT8_TILES if pf == 0 else [None, INT8_TILES[1]]:
                    fn = with_tile(mod.decode_attention, "decode.split_int8", tile)
                    for s in split_opts:
                        timed("paged int8", partial(fn, q, kqp, vqp, lens, block_table=table, k_scale=ksp,
                                                    v_scale=vsp, num_splits=s), int8_bytes,
                              want, page=page, tile=tile, splits=s, prefetch=pf, **meta)
            kp = vp = kqp = vqp = ksp = vsp = None
            if dev == "cuda":
                torch.cuda.empty_cache()
        q = k = v = kq = vq = None
print("sweep done", round(time.time() - start), len(out), "rows")
