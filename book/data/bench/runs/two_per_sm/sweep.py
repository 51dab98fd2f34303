"""The split count of a 16-bit cache planned for two programs an SM (the package's rule) against three
(the rule before it), and a deeper pipeline that two programs an SM leave room for, at 8 kv heads, where
the two rules differ. At B8 H32 Hkv8 D128, bf16, every cache full, for the lengths in SWEEP_LENS
(default 65536, 16384, 4096): on the dense cache and on 16- and 128-token pages in random order, stored
token-major and head-major, the package's ``decode_attention`` (``rule``: 4 splits on an H100,
launched plainly as by default; ``rule pdl``: with programmatic dependent launch, the ``decode.pdl``
override on), at
``splits=6`` (three programs an SM) and ``splits=3``, and at the rule's count with the key loop
pipelined 4 deep (``stages=4``, the ``decode.split`` override), next to FlashInfer on the same pages.
Then one sequence (B1 H32 Hkv8, 64k keys, dense and 16-token pages): the rule's 33 splits against 49
(three an SM), 24 and 16. Each call is timed once per round for SWEEP_ROUNDS rounds (default 2).
Rows: ``name``, ``round``, ``L``, ``b``, ``page`` (0: dense), ``layout``, GB/s of the cache bytes. Run
from the repository's root with the GPU's Python: ``OUT=<folder> python
book/data/bench/runs/two_per_sm/sweep.py``; it stops taking rows after SWEEP_BUDGET seconds (default
150)."""
import json
import os
import time
from functools import partial

import torch

from minikernels import planning  # noqa: F401  (first: on a CPU it switches Triton to its interpreter)
from minikernels.bench.common import Sweep, compiled_kernels, with_override
from minikernels.bench.decoding import _flashinfer_paged, _lazy, _pages, decode_inputs
from minikernels.decode import _decode_split, decode_attention

OUT = os.environ.get("OUT", ".")
LENS = [int(x) for x in os.environ.get("SWEEP_LENS", "65536,16384,4096").split(",")]
ROUNDS = int(os.environ.get("SWEEP_ROUNDS", "2"))
DEEP = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 4}
dev = "cuda" if torch.cuda.is_available() else "cpu"
sweep = Sweep(float(os.environ.get("SWEEP_BUDGET", "150")))
deep = partial(with_override, key="decode.split", value=DEEP)
pdl = partial(with_override, key="decode.pdl", value=True)


def ours(q, k, v, lens, table=None):
    """(name, call) of the package's kernel at the rule's count (launched plainly, and with PDL), at 6 and
    3 splits, 4 stages deep."""
    paged = {} if table is None else {"block_table": table}
    return [("rule", partial(decode_attention, q, k, v, lens, **paged)),
            ("rule pdl", partial(pdl(decode_attention), q, k, v, lens, **paged)),
            ("splits=6", partial(decode_attention, q, k, v, lens, 6, **paged)),
            ("splits=3", partial(decode_attention, q, k, v, lens, 3, **paged)),
            ("stages=4", partial(deep(decode_attention), q, k, v, lens, **paged))]


def layouts(k, v, page):
    """(layout, k pool, v pool as the kernel takes them, FlashInfer's layout name and pools) per layout."""
    table = _pages(k, page, seed=page)[1]
    kp, vp = (_pages(t, page, seed=page)[0] for t in (k, v))
    hk, hv = (t.transpose(1, 2).contiguous() for t in (kp, vp))  # [num_pages, Hkv, page, D]
    return table, [("token-major", kp, vp, "NHD", kp, vp),
                   ("head-major", hk.transpose(1, 2), hv.transpose(1, 2), "HND", hk, hv)]


def time_all(calls, n_bytes, want, **meta):
    for rnd in range(ROUNDS):
        for name, page, layout, call in calls:
            sweep.time(name, call, n_bytes, want, round=rnd, page=page, layout=layout, **meta)


try:
    for length in LENS:
        if sweep.over_budget():
            break
        x = decode_inputs(8, length, dev)
        q, k, v, lens = (x[n] for n in ("q", "k", "v", "lens"))
        want = decode_attention(q, k, v, lens).float()
        calls = [(name, 0, "dense", call) for name, call in ours(q, k, v, lens)]
        for page in (16, 128):
            table, pools = layouts(k, v, page)
            for layout, kc, vc, fi_layout, fk, fv in pools:
                if dev == "cuda":  # planned on its first call, inside the sweep's try
                    calls.append(("flashinfer", page, layout, _lazy(partial(_flashinfer_paged, table, page, 8,
                                                                            fi_layout), fk, fv, q)))
                calls += [(name, page, layout, call) for name, call in ours(q, kc, vc, lens, table)]
        time_all(calls, x["kv_bytes"], want, L=length, b=8)
        q = k = v = calls = table = pools = None
        if dev == "cuda":
            torch.cuda.empty_cache()
    if not sweep.over_budget():  # one sequence: many splits
        length = LENS[0]
        g = torch.Generator(device=dev).manual_seed(1)
        q, k, v = (torch.randn(1, h, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
                   for h, n in ((32, 1), (8, length), (8, length)))
        lens = torch.full((1,), length, dtype=torch.int32, device=dev)
        want = decode_attention(q, k, v, lens).float()
        table = _pages(k, 16, seed=16)[1]
        kc, vc = (_pages(t, 16, seed=16)[0] for t in (k, v))
        calls = []
        for page, kk, vv, paged in ((0, k, v, {}), (16, kc, vc, {"block_table": table})):
            if page and dev == "cuda":
                calls.append(("flashinfer", page, "token-major", _lazy(partial(_flashinfer_paged, table, page, 8),
                                                                       kc, vc, q)))
            calls.append(("rule", page, "", partial(decode_attention, q, kk, vv, lens, **paged)))
            calls += [(f"splits={n}", page, "", partial(decode_attention, q, kk, vv, lens, n, **paged))
                      for n in (49, 24, 16)]
        time_all(calls, 2 * k.numel() * 2, want, L=length, b=1)
finally:
    json.dump(sweep.rows, open(os.path.join(OUT, "sweep.json"), "w"), indent=0)
    kernels = compiled_kernels(_decode_split)
    json.dump(kernels, open(os.path.join(OUT, "kernels.json"), "w"), indent=0)
    print("sweep done in", round(time.time() - sweep.start), "s:", len(sweep.rows), "rows,", len(kernels), "kernels")
