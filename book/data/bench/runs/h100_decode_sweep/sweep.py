"""int8 decode: V read as words or bytes x splits x tiles, B8 H32 D128 L65536."""
import json, os, time
import torch
from minikernels import planning
from minikernels.decode import decode_attention
from minikernels.kv_cache import quantize_int8
from minikernels.bench.common import time_rotating
from minikernels.bench.decoding import _pages

B, H, D, L = 8, 32, 128, 65536
out, T0 = [], time.time()
BUDGET = float(os.environ.get("SWEEP_BUDGET", "110"))

def timed(name, call, nbytes, want, **meta):
    if time.time() - T0 > BUDGET:
        return
    try:
        got = call().float(); err = ((got - want).norm() / want.norm()).item(); ms, _ = time_rotating([call])
    except Exception as e:
        print(f"{name} {meta}: failed {type(e).__name__} {str(e)[:300]}", flush=True); return
    r = {"name": name, "ms": ms, "GBps": nbytes / ms / 1e6, "err": err, **meta}
    out.append(r); print(json.dumps(r), flush=True)

for hkv in (8, 32):
    g = torch.Generator(device="cuda").manual_seed(hkv)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
    kvb, i8b = 2 * k.numel() * 2, 2 * k.numel() + 2 * ks.numel() * 4
    want = decode_attention(q, k, v, lens).float()
    timed("dense bf16", lambda: decode_attention(q, k, v, lens), kvb, want, hkv=hkv)
    for sp in (None, 32, 64):
        timed("dense bf16", lambda: decode_attention(q, k, v, lens, num_splits=sp), kvb, want, hkv=hkv, splits=sp)
    pools = {}
    for page in (16, 128):
        table = _pages(k, page, seed=page)[1]
        pools[page] = (table, *(_pages(t, page, seed=page)[0] for t in (kq, vq, ks, vs)))
    for words in (True, False):
        cfgs = [None] if not words else [None, dict(BLOCK_N=128, num_warps=4, num_stages=2),
                                         dict(BLOCK_N=128, num_warps=4, num_stages=4), dict(BLOCK_N=64, num_warps=4, num_stages=3),
                                         dict(BLOCK_N=128, num_warps=8, num_stages=3)]
        for cfg in cfgs:
            ov = {"decode.int8_v_words": words, **({"decode.split_int8": cfg} if cfg else {})}
            conv = "words" if words else "bytes"
            with planning.override(ov):
                for sp in ((None, 16, 32, 64) if cfg is None else (None,)):
                    timed(f"dense int8 {conv}", lambda: decode_attention(q, kq, vq, lens, k_scale=ks, v_scale=vs, num_splits=sp), i8b, want, hkv=hkv, cfg=cfg, splits=sp)
                for page, (table, kqp, vqp, ksp, vsp) in pools.items():
                    for sp in ((None, 64) if cfg is None else (None,)):
                        timed(f"int8 paged{page} {conv}", lambda: decode_attention(q, kqp, vqp, lens, block_table=table, k_scale=ksp, v_scale=vsp, num_splits=sp), i8b, want, hkv=hkv, cfg=cfg, splits=sp)
    del pools, k, v, kq, vq; torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("R", "."), "sweep_int8.json"), "w"), indent=0)
print("sweep done", round(time.time() - T0))
