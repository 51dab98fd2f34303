"""The second sweep recorded in sweep2.json beside this file (one H100 80GB HBM3, another machine than
sweep.json's; torch 2.11, Triton 3.6), made with the package as committed beside it: the split rule of
8 programs per SM (at least 8 key blocks a split) and an int8 paged block's table entries read a block
ahead. ``var`` "base" is the package; "pfv" is ``decode_pfv`` (make_variants.py: the kernel before the
sweeps, reading one table entry per key, a block ahead, whatever the page size). Dense rows and paged
rows at explicit split counts (null: the package's rule, or c31da96's for "pfv"), beside FlashInfer
0.5.3's paged decode. It ran out of its time budget after 65536 keys and part of 4096. Run as
sweep.py is run; it stops taking new rows after SWEEP_BUDGET seconds."""
import json, os, sys, time
from functools import partial
import torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
from minikernels import planning
from minikernels.bench.common import time_rotating
from minikernels.bench.decoding import _pages, _flashinfer_paged
from minikernels.decode import decode_attention
from minikernels.kv_cache import quantize_int8
import decode_prefetch, decode_pfv, decode_v

B, H, D = 8, 32, 128
BUDGET = float(os.environ.get("SWEEP_BUDGET", "250"))
OUTF = os.path.join(os.environ.get("OUT", "."), "sweep2.json")
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
        for s_ in (None, 9, 17, 33) if hkv == 8 else (None, 3, 5, 9):
            timed("dense bf16", partial(decode_attention, q, k, v, lens, num_splits=s_), bf16_bytes, want, splits=s_, **meta)
        for s_ in (None, 9, 17, 33) if hkv == 8 else (None, 3, 5, 9):
            timed("dense int8", partial(decode_attention, q, kq, vq, lens, k_scale=ks, v_scale=vs, num_splits=s_),
                  int8_bytes, want, splits=s_, **meta)
        split_opts = [None, 9, 17, 33] if hkv == 8 else [None, 3, 5, 9]  # about 4, 8 and 16 programs per SM at Hkv 8 (132 SMs)
        for page in (16, 128):
            table = _pages(k, page, seed=page)[1]
            kp, vp, kqp, vqp, ksp, vsp = (_pages(t, page, seed=page)[0] for t in (k, v, kq, vq, ks, vs))
            if dev == "cuda":
                try:
                    fi = _flashinfer_paged(table, page, hkv)
                    timed("flashinfer", lambda: fi(q, kp, vp), bf16_bytes, want, page=page, **meta)
                except Exception as exc:
                    print("flashinfer failed", exc)
            mods = {"base": sys.modules["minikernels.decode"], "pf": decode_prefetch, "pfv": decode_pfv, "v": decode_v}
            for var in ("base", "pfv"):
                for tile in (None, BF16_TILES[2]):
                    fn = with_tile(mods[var].decode_attention, "decode.split", tile)
                    for s_ in split_opts:
                        timed("paged bf16", partial(fn, q, kp, vp, lens, block_table=table, num_splits=s_), bf16_bytes,
                              want, page=page, tile=tile, splits=s_, var=var, **meta)
            for var in ("base", "pfv"):
                for tile in (None,):
                    fn = with_tile(mods[var].decode_attention, "decode.split_int8", tile)
                    for s_ in split_opts:
                        timed("paged int8", partial(fn, q, kqp, vqp, lens, block_table=table, k_scale=ksp,
                                                    v_scale=vsp, num_splits=s_), int8_bytes,
                              want, page=page, tile=tile, splits=s_, var=var, **meta)
            kp = vp = kqp = vqp = ksp = vsp = None
            if dev == "cuda":
                torch.cuda.empty_cache()
        q = k = v = kq = vq = None
print("sweep done", round(time.time() - start), len(out), "rows")
