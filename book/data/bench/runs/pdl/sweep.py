"""What programmatic dependent launch (PDL) buys the decode kernels, against FlashInfer's paged decode
with and without its own. At B8 H32 D128, bf16, every cache full, for the (kv heads, keys) cells in
SWEEP_CELLS (default: the paged benchmark's six) and pages of SWEEP_PAGES tokens (default 16 and 128,
random order, token-major): FlashInfer (its default launch, PDL on Hopper; and ``enable_pdl=False``),
the package's ``decode_attention`` on the dense cache and on the pages, each launched plainly and
with PDL (the ``decode.pdl`` override off and on), and with PDL a variant whose split kernel lets the
merge launch only after its key loop (``late trigger``: the package's kernel with the two edits
EDITS, loaded by ``bench.common.module_with_edits``), and the package's kernel on the pages with PDL
at each split count in SWEEP_SPLITS (default 4 and 8; the rule's count at these shapes is 6 with 8
kv heads, 1 with 32). Each call is timed once per round for SWEEP_ROUNDS rounds (default 2), in the
same order every round.
Rows: ``name``, ``round``, ``L``, ``hkv``, ``page`` (0: dense), GB/s of the cache bytes. Run from the
repository's root with the GPU's Python: ``OUT=<folder> python book/data/bench/runs/pdl/sweep.py``; it
stops taking rows after SWEEP_BUDGET seconds (default 150). The recorded run, ``sweep_1.json`` and
``kernels_1.json`` (the files it writes, renamed; written by an earlier form of this script, when PDL
was the package's default and the "pdl" rows took it without the override): one H100 80GB HBM3, torch 2.11, Triton 3.6,
FlashInfer 0.5.3, ``SWEEP_CELLS=8:16384,8:65536,8:4096,32:4096,32:16384,32:65536 SWEEP_BUDGET=140``;
the 32:65536 cell was not reached, and the second round of 32:16384 stopped after 11 of its 17 rows."""
import json
import os
import time
from functools import partial

import torch

from minikernels import decode as package_decode
from minikernels import planning  # noqa: F401  (first: on a CPU it switches Triton to its interpreter)
from minikernels.bench.common import Sweep, compiled_kernels, module_with_edits, with_override
from minikernels.bench.decoding import _flashinfer_paged, _lazy, decode_inputs, paged_pools
from minikernels.decode import _decode_split, decode_attention

# the split kernel's trigger moved from its start (after its wait) to after the key loop
EDITS = [("        gdc_wait()\n        gdc_launch_dependents()\n    if HAS_LENGTHS:",
          "        gdc_wait()\n    if HAS_LENGTHS:"),
         ("    empty_row = l_i == 0.0\n    o = acc / ",
          "    if PDL:\n        gdc_launch_dependents()\n    empty_row = l_i == 0.0\n    o = acc / ")]


OUT = os.environ.get("OUT", ".")
CELLS = [tuple(int(x) for x in cell.split(":")) for cell in os.environ.get(
    "SWEEP_CELLS", "8:4096,8:16384,8:65536,32:4096,32:16384,32:65536").split(",")]
PAGES = [int(x) for x in os.environ.get("SWEEP_PAGES", "16,128").split(",")]
ROUNDS = int(os.environ.get("SWEEP_ROUNDS", "2"))
SPLITS = [int(x) for x in os.environ.get("SWEEP_SPLITS", "4,8").split(",") if x]
dev = "cuda" if torch.cuda.is_available() else "cpu"
late = module_with_edits(package_decode, EDITS, "minikernels.decode_late_trigger")
sweep = Sweep(float(os.environ.get("SWEEP_BUDGET", "150")))
plain = partial(with_override, key="decode.pdl", value=False)
pdl = partial(with_override, key="decode.pdl", value=True)

try:
    for hkv, length in CELLS:
        if sweep.over_budget():
            break
        x = decode_inputs(hkv, length, dev)
        q, k, v, lens = (x[n] for n in ("q", "k", "v", "lens"))
        want = decode_attention(q, k, v, lens).float()
        calls = [("dense plain", 0, partial(plain(decode_attention), q, k, v, lens)),
                 ("dense pdl", 0, partial(pdl(decode_attention), q, k, v, lens)),
                 ("dense late trigger", 0, partial(pdl(late.decode_attention), q, k, v, lens))]
        for page in PAGES:
            table, (kc, vc) = paged_pools(page, k, v)
            if dev == "cuda":  # planned on its first call, inside the sweep's try
                calls += [("flashinfer", page, _lazy(partial(_flashinfer_paged, table, page, hkv), kc, vc, q)),
                          ("flashinfer no pdl", page, _lazy(partial(_flashinfer_paged, table, page, hkv,
                                                                    enable_pdl=False), kc, vc, q))]
            calls += [("paged plain", page, partial(plain(decode_attention), q, kc, vc, lens, block_table=table)),
                      ("paged pdl", page, partial(pdl(decode_attention), q, kc, vc, lens, block_table=table)),
                      ("paged late trigger", page, partial(pdl(late.decode_attention), q, kc, vc, lens,
                                                           block_table=table))]
            calls += [(f"paged pdl splits={n}", page, partial(pdl(decode_attention), q, kc, vc, lens, n,
                                                              block_table=table)) for n in SPLITS]
        for rnd in range(ROUNDS):
            for name, page, call in calls:
                sweep.time(name, call, x["kv_bytes"], want, round=rnd, L=length, hkv=hkv, page=page)
        q = k = v = kc = vc = None
        calls = []
        if dev == "cuda":
            torch.cuda.empty_cache()
finally:
    json.dump(sweep.rows, open(os.path.join(OUT, "sweep.json"), "w"), indent=0)
    kernels = compiled_kernels(_decode_split, late._decode_split)
    json.dump(kernels, open(os.path.join(OUT, "kernels.json"), "w"), indent=0)
    print("sweep done in", round(time.time() - sweep.start), "s:", len(sweep.rows), "rows,", len(kernels), "kernels")
