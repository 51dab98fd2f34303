"""The split count of a 16-bit cache with 32 kv heads (B8 H32 D128: 256 (batch, kv head) pairs, where
the rule plans 1 split) and the single pass of one split, next to FlashInfer on the same pages. For
the (kv heads, keys) cells in SWEEP_CELLS (default 32:16384, 32:65536, 32:4096), every cache full: on
the dense cache and on 16- and 128-token pages in random order, token-major and head-major, bf16 at
1 split (the split kernel writes the output: ``1``), 1 split through the merge (``1 merged``, the
"decode.single_pass" override off), 2 and 3 splits, each launched as the package launches it (PDL on
Hopper); FlashInfer's decode on the same pages. Then one sequence (B1 H32 Hkv8, 64k keys, dense and
16-token pages): the rule's two programs an SM against three (33 and 49 splits on 132 SMs). Every call
is timed once per round, the rounds one after another (SWEEP_ROUNDS, default 3), so that a
difference between rows shows next to the spread of each. Rows: ``name``, ``round``, ``L``, ``b``,
``hkv``, ``page`` (0: dense), ``layout``, ``splits``, GB/s of the bytes read. Run from the repository's
root with the GPU's Python: ``OUT=<folder> python book/data/bench/runs/one_split/sweep.py``; it stops
taking rows after SWEEP_BUDGET seconds (default 150). It ran at commit 9d26a10, whose decode_attention
had the single pass and its override; the package has kept only the merged split, so on a later commit
``1`` is the merged split and the ``1 merged`` rows are left out."""
import json
import os
import time
from functools import partial

import torch

from minikernels import planning  # (first: on a CPU it switches Triton to its interpreter)
from minikernels._common import sm_count
from minikernels.bench.common import Sweep, compiled_kernels
from minikernels.bench.decoding import _flashinfer_paged, _lazy, decode_inputs, paged_pools
from minikernels.decode import _decode_merge, _decode_split, decode_attention

OUT = os.environ.get("OUT", ".")
CELLS = [tuple(int(x) for x in cell.split(":")) for cell in os.environ.get(
    "SWEEP_CELLS", "32:16384,32:65536,32:4096").split(",")]
ROUNDS = int(os.environ.get("SWEEP_ROUNDS", "3"))
dev = "cuda" if torch.cuda.is_available() else "cpu"
sweep = Sweep(float(os.environ.get("SWEEP_BUDGET", "150")))
VARIANTS = {"1": (1, {}), "1 merged": (1, {"decode.single_pass": False}), "2": (2, {}), "3": (3, {})}
if "decode.single_pass" not in planning.CHOICES:  # (a package without the single pass: 1 split is merged)
    del VARIANTS["1 merged"]


def under(choices, fn, *args, **kwargs):
    with planning.override(choices):
        return fn(*args, **kwargs)


def cell_calls(hkv, q, k, v, lens):
    """(name, page, layout, splits, call) for one cell."""
    calls, layouts = [], [(0, "dense", k, v, {})]
    for page in (16, 128):
        table, (kp, vp) = paged_pools(page, k, v)
        hk, hv = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kp, vp))  # head-major pages
        for layout, kk, vv, fi_layout, fk, fv in (("token-major", kp, vp, "NHD", kp, vp),
                                                  ("head-major", hk, hv, "HND", hk.transpose(1, 2),
                                                   hv.transpose(1, 2))):
            layouts.append((page, layout, kk, vv, {"block_table": table}))
            if dev == "cuda":  # planned on its first call, inside the sweep's try
                calls.append(("flashinfer", page, layout, None,
                              _lazy(partial(_flashinfer_paged, table, page, hkv, fi_layout), fk, fv, q)))
    for page, layout, kk, vv, paged in layouts:
        for name, (splits, choices) in VARIANTS.items():
            calls.append((f"bf16 {name}", page, layout, splits,
                          partial(under, choices, decode_attention, q, kk, vv, lens, splits, **paged)))
    return calls


try:
    for hkv, length in CELLS:
        if sweep.over_budget():
            break
        x = decode_inputs(hkv, length, dev)
        q, k, v, lens = x["q"], x["k"], x["v"], x["lens"]
        del x  # (the int8 copies: not timed here)
        want = decode_attention(q, k, v, lens).float()
        calls = cell_calls(hkv, q, k, v, lens)
        for rnd in range(ROUNDS):
            for name, page, layout, splits, call in calls:
                sweep.time(name, call, 2 * k.numel() * 2, want, round=rnd, L=length, b=8, hkv=hkv, page=page,
                           layout=layout, splits=splits)
        q = k = v = calls = None
        if dev == "cuda":
            torch.cuda.empty_cache()
    if not sweep.over_budget():  # one sequence: a wave of two programs an SM, or of three
        length = 65536 if dev == "cuda" else 4096
        g = torch.Generator(device=dev).manual_seed(1)
        q, k, v = (torch.randn(1, h, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
                   for h, n in ((32, 1), (8, length), (8, length)))
        lens = torch.full((1,), length, dtype=torch.int32, device=dev)
        want = decode_attention(q, k, v, lens).float()
        table, (kc, vc) = paged_pools(16, k, v)
        sms = sm_count(torch.device(dev)) if dev == "cuda" else 132
        for rnd in range(ROUNDS):
            for page, kk, vv, paged in ((0, k, v, {}), (16, kc, vc, {"block_table": table})):
                for per_sm in (2, 3):
                    n = min(per_sm * sms // 8, 64)
                    sweep.time(f"bf16 {per_sm}/an SM", partial(decode_attention, q, kk, vv, lens, n, **paged),
                               2 * k.numel() * 2, want, round=rnd, L=length, b=1, hkv=8, page=page,
                               layout="token-major" if page else "dense", splits=n)
finally:
    json.dump(sweep.rows, open(os.path.join(OUT, "sweep.json"), "w"), indent=0)
    kernels = compiled_kernels(_decode_split, _decode_merge)
    json.dump(kernels, open(os.path.join(OUT, "kernels.json"), "w"), indent=0)
    print("sweep done in", round(time.time() - sweep.start), "s:", len(sweep.rows), "rows,", len(kernels), "kernels")
