"""The split rule of ``decode_attention`` (one wave: 3 programs an SM) against other split counts, on a
GPU, recorded beside this file (sweep.json, kernels.json): B8 H32 D128, 64k, 4k and 16k keys, 8 and 32
kv heads, the dense cache and pages of 16 and 128 tokens, bf16 and int8 caches, with FlashInfer's
paged decode and cuDNN (SDPA on the dense cache) timed in the same run as references. At 64k keys the
int8 kernel is also timed with other tiles (``tile``), at the rule's count and at 3 splits (at the
lengths in SWEEP_TILES, default 65536).

Rows: ``name`` (layout and cache), ``tile`` (null: the planner's), ``splits`` (null: the rule's count,
``planned`` says which), ``L``, ``hkv``, ``page`` and GB/s of the cache bytes (scales included).
kernels.json lists each compiled split kernel's shared memory and registers. Run from the repository's
root with the GPU's Python: ``OUT=<folder> python book/data/bench/runs/split_rule/sweep.py``; it stops
taking new rows after SWEEP_BUDGET seconds (default 300). The recorded run, ``sweep_1.json`` and
``kernels_1.json`` (the files it writes, renamed), ran on one H100 80GB HBM3 (torch 2.11, Triton 3.6,
FlashInfer 0.5.3) with the defaults and ``SWEEP_BUDGET=170``: 64k keys with 8 and 32 kv heads, and
of 4k keys with 8 kv heads cuDNN, FlashInfer on 16-token pages, the dense caches' grids and two
rows on 16-token bf16 pages. (Its inputs and the cuDNN call were then written out here; they now come
from the benchmark's ``decode_inputs`` and ``_gqa_sdpa``, which make the same tensors and call.)
``sweep_2.json`` and ``kernels_2.json``: the paged loop of book/notes/kv_cache.md, "Paged blocks in
32-bit arithmetic" (with its register cap, before the int8 split rule: ``planned`` is 1 for int8 at 32
kv heads there), on one H100 80GB HBM3 with ``SWEEP_LENS=65536 SWEEP_TILES= SWEEP_BUDGET=150``, every
row reached.)"""
import json
import os
import time
from functools import partial

import torch

from minikernels import planning  # noqa: F401  (first: on a CPU it switches Triton to its interpreter)
from minikernels.bench.common import Sweep, compiled_kernels, with_override
from minikernels.bench.decoding import B, D, _flashinfer_paged, _gqa_sdpa, _lazy, decode_inputs, paged_pools
from minikernels.decode import _decode_split, choose_num_splits, decode_attention, launch_config

OUT = os.environ.get("OUT", ".")
LENS = [int(x) for x in os.environ.get("SWEEP_LENS", "65536,4096,16384").split(",")]
TILE_LENS = [int(x) for x in os.environ.get("SWEEP_TILES", "65536").split(",") if x]
GRID = {8: [None, 3, 4, 5, 6, 8, 10, 12, 17], 32: [None, 1, 2, 3, 4, 6]}
INT8_TILES = [dict(BLOCK_N=128, num_warps=8, num_stages=3), dict(BLOCK_N=64, num_warps=4, num_stages=4),
              dict(BLOCK_N=128, num_warps=4, num_stages=2), dict(BLOCK_N=256, num_warps=8, num_stages=2)]
dev = "cuda" if torch.cuda.is_available() else "cpu"
sweep = Sweep(float(os.environ.get("SWEEP_BUDGET", "300")))

try:
    for length in LENS:
        for hkv in (8, 32):
            if sweep.over_budget():
                break
            x = decode_inputs(hkv, length, dev)  # the benchmark's inputs for this shape
            q, k, v, lens, kq, ks, vq, vs = (x[n] for n in ("q", "k", "v", "lens", "kq", "ks", "vq", "vs"))
            bf16_bytes, int8_bytes = x["kv_bytes"], x["int8_bytes"]
            want = decode_attention(q, k, v, lens).float()
            meta = dict(L=length, hkv=hkv)
            planned = {}
            for int8 in (False, True):
                bn = launch_config(16, D, 2, int8)["BLOCK_N"]
                planned[int8] = choose_num_splits(B * hkv, length, bn, q.device, int8=int8)
            if dev == "cuda":
                sweep.time("cudnn dense", partial(_gqa_sdpa, q, k, v), bf16_bytes, want, page=0, **meta)
            for page in (0, 16, 128):
                if page:
                    table, (kc, vc, kqc, vqc, ksc, vsc) = paged_pools(page, k, v, kq, vq, ks, vs)
                    if dev == "cuda":  # planned on its first call, inside the sweep's try
                        fi = _lazy(partial(_flashinfer_paged, table, page, hkv), kc, vc, q)
                        sweep.time("flashinfer", fi, bf16_bytes, want, page=page, **meta)
                else:
                    table, kc, vc, kqc, vqc, ksc, vsc = None, k, v, kq, vq, ks, vs
                layout = "paged" if page else "dense"
                for s in GRID[hkv]:
                    sweep.time(f"{layout} bf16", partial(decode_attention, q, kc, vc, lens, block_table=table,
                                                         num_splits=s),
                               bf16_bytes, want, page=page, tile=None, splits=s,
                               planned=planned[False] if s is None else None, **meta)
                int8_call = partial(decode_attention, q, kqc, vqc, lens, block_table=table, k_scale=ksc, v_scale=vsc)
                for s in GRID[hkv]:
                    sweep.time(f"{layout} int8", partial(int8_call, num_splits=s), int8_bytes, want, page=page,
                               tile=None, splits=s, planned=planned[True] if s is None else None, **meta)
                if length in TILE_LENS:
                    for tile in INT8_TILES:
                        for s in (None, 3):
                            fn = with_override(decode_attention, "decode.split_int8", tile)
                            sweep.time(f"{layout} int8", partial(fn, q, kqc, vqc, lens, block_table=table,
                                                                 k_scale=ksc, v_scale=vsc, num_splits=s),
                                       int8_bytes, want, page=page, tile=tile, splits=s, **meta)
                kc = vc = kqc = vqc = ksc = vsc = None
                if dev == "cuda":
                    torch.cuda.empty_cache()
            q = k = v = kq = vq = None
finally:
    json.dump(sweep.rows, open(os.path.join(OUT, "sweep.json"), "w"), indent=0)
    kernels = compiled_kernels(_decode_split)
    json.dump(kernels, open(os.path.join(OUT, "kernels.json"), "w"), indent=0)
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(json.dumps({"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__}))
    print("sweep done in", round(time.time() - sweep.start), "s:", len(sweep.rows), "rows,", len(kernels), "kernels")
