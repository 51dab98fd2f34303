"""Where paged bf16 decode still trails FlashInfer's paged decode (book/notes/kv_cache.md, "Paged blocks
in 32-bit arithmetic": 0.985-0.999x at 16 of 24 shapes), other tiles of the split kernel against the
planner's, and how much the same call moves between rounds. At B8 H32 D128, 16-token bf16 pages in
random order (token-major), for the (kv heads, keys) cells in SWEEP_CELLS (default "8:16384,8:65536,
32:16384"): FlashInfer, the package's ``decode_attention`` (``tile`` null: the planner's) and the
tiles in TILES through the ``decode.split`` override, each timed once per round for SWEEP_ROUNDS rounds
(default 3), in the same order every round. Rows: ``name``, ``tile``, ``round``, ``L``, ``hkv``,
``page``, GB/s of the cache bytes. kernels.json: each compiled split kernel's registers, spills and
shared memory. Run from the repository's root with the GPU's Python: ``OUT=<folder> python
book/data/bench/runs/paged_tiles/sweep.py``; it stops taking rows after SWEEP_BUDGET seconds (default
200). The recorded run, ``sweep_1.json`` and ``kernels_1.json`` (the files it writes, renamed): one H100
80GB HBM3, torch 2.11, Triton 3.6, FlashInfer 0.5.3, the defaults and ``SWEEP_BUDGET=170``, every row
reached in 82 s."""
import json
import os
import time
from functools import partial

import torch

from minikernels import planning  # noqa: F401  (first: on a CPU it switches Triton to its interpreter)
from minikernels.bench.common import Sweep, compiled_kernels, with_override
from minikernels.bench.decoding import _flashinfer_paged, _lazy, decode_inputs, paged_pools
from minikernels.decode import _decode_split, decode_attention

OUT = os.environ.get("OUT", ".")
CELLS = [tuple(int(x) for x in cell.split(":"))
         for cell in os.environ.get("SWEEP_CELLS", "8:16384,8:65536,32:16384").split(",")]
ROUNDS = int(os.environ.get("SWEEP_ROUNDS", "3"))
PAGE = 16
TILES = [None, dict(BLOCK_N=64, num_warps=4, num_stages=4), dict(BLOCK_N=128, num_warps=4, num_stages=2),
         dict(BLOCK_N=128, num_warps=8, num_stages=3), dict(BLOCK_N=32, num_warps=4, num_stages=4),
         dict(BLOCK_N=64, num_warps=8, num_stages=3)]
dev = "cuda" if torch.cuda.is_available() else "cpu"
sweep = Sweep(float(os.environ.get("SWEEP_BUDGET", "200")))

try:
    for hkv, length in CELLS:
        if sweep.over_budget():
            break
        x = decode_inputs(hkv, length, dev)
        q, k, v, lens = (x[n] for n in ("q", "k", "v", "lens"))
        want = decode_attention(q, k, v, lens).float()
        table, (kc, vc) = paged_pools(PAGE, k, v)
        calls = []
        if dev == "cuda":  # planned on its first call, inside the sweep's try
            calls.append(("flashinfer", None, _lazy(partial(_flashinfer_paged, table, PAGE, hkv), kc, vc, q)))
        for tile in TILES:
            fn = with_override(decode_attention, "decode.split", tile)
            calls.append(("paged bf16", tile, partial(fn, q, kc, vc, lens, block_table=table)))
        for rnd in range(ROUNDS):
            for name, tile, call in calls:
                sweep.time(name, call, x["kv_bytes"], want, tile=tile, round=rnd, L=length, hkv=hkv, page=PAGE)
        q = k = v = kc = vc = None
        calls = []
        if dev == "cuda":
            torch.cuda.empty_cache()
finally:
    json.dump(sweep.rows, open(os.path.join(OUT, "sweep.json"), "w"), indent=0)
    kernels = compiled_kernels(_decode_split)
    json.dump(kernels, open(os.path.join(OUT, "kernels.json"), "w"), indent=0)
    print("sweep done in", round(time.time() - sweep.start), "s:", len(sweep.rows), "rows,", len(kernels), "kernels")
