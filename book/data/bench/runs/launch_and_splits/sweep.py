"""The split count of a 16-bit cache planned for three programs an SM or for two (the package's rule),
and the launch (plain, or programmatic dependent launch, the package's for 16-bit caches), for bf16
and int8 caches, measured together; the 16-bit split rule and the launch are each set through the
planning overrides, whatever the package's defaults are (int8 is split by the package's rule). At B8
H32 D128, every cache full, for the (kv heads, keys) cells in SWEEP_CELLS (default 8:4096, 8:16384,
8:65536, 32:4096, 32:16384): on the dense cache and on 16- and 128-token pages in random order,
token-major and head-major, bf16 at both split rules, each launched plainly and with PDL, next to
FlashInfer on the same pages; int8 (codes and scales), plainly and with PDL. Then one sequence (B1
H32 Hkv8, the longest length of the cells, dense and 16-token pages, bf16): two an SM (33 splits on
132 SMs) against three (49), plainly. Each call is timed once per round for SWEEP_ROUNDS rounds
(default 1). Rows: ``name`` (``bf16 three/an SM``, ``bf16 two/an SM``, ``int8``, ``flashinfer``;
`` pdl`` appended when launched so), ``round``, ``L``, ``b``, ``hkv``, ``page`` (0: dense),
``layout``, ``splits`` (the count the rule plans for 64-key blocks, bf16, or 128-key blocks, int8:
the H100's tiles), GB/s of the bytes read (int8: codes and scales). Run from the repository's root
with the GPU's Python: ``OUT=<folder> python book/data/bench/runs/launch_and_splits/sweep.py``; it
stops taking rows after SWEEP_BUDGET seconds (default 200). Not run yet."""
import json
import os
import time
from functools import partial

import torch

from minikernels import planning  # noqa: F401  (first: on a CPU it switches Triton to its interpreter)
from minikernels._common import sm_count
from minikernels.bench.common import Sweep, compiled_kernels
from minikernels.bench.decoding import _flashinfer_paged, _lazy, decode_inputs, paged_pools
from minikernels.decode import MAX_SPLITS, _cdiv, _decode_split, _num_splits, decode_attention

OUT = os.environ.get("OUT", ".")
CELLS = [tuple(int(x) for x in cell.split(":")) for cell in os.environ.get(
    "SWEEP_CELLS", "8:4096,8:16384,8:65536,32:4096,32:16384").split(",")]
ROUNDS = int(os.environ.get("SWEEP_ROUNDS", "1"))
dev = "cuda" if torch.cuda.is_available() else "cpu"
sweep = Sweep(float(os.environ.get("SWEEP_BUDGET", "200")))


def planned_for(per_sm):
    """The split rule with a 16-bit cache planned for ``per_sm`` programs an SM (int8: the package's rule)."""
    def rule(pairs, max_len, block_n, device, paged, int8):
        if int8 or device.type != "cuda":
            return _num_splits(pairs, max_len, block_n, device, paged, int8)
        return int(max(1, min(per_sm * sm_count(device) // max(pairs, 1), _cdiv(max_len, 8 * block_n),
                              MAX_SPLITS)))
    return rule


# both written out, whatever the package's rule and launch are
RULES = {"three/an SM": {"decode.num_splits": planned_for(3)}, "two/an SM": {"decode.num_splits": planned_for(2)}}
LAUNCHES = {"": {"decode.pdl": False}, " pdl": {"decode.pdl": True}}


def planned(choices, pairs, length, block_n, paged, int8):
    with planning.override(choices):
        return planning.decide("decode.num_splits", _num_splits, pairs, length, block_n, torch.device(dev), paged,
                               int8)


def under(choices, fn, *args, **kwargs):
    with planning.override(choices):
        return fn(*args, **kwargs)


def pools(dense, page):
    """(layout, pools as the kernel takes them, FlashInfer's layout and pools) for both page layouts."""
    table, pooled = paged_pools(page, *dense.values())
    tm = dict(zip(dense, pooled))
    hm = {n: (t.transpose(1, 2).contiguous().transpose(1, 2) if t.dim() == 4 else t) for n, t in tm.items()}
    return table, [("token-major", tm, "NHD", tm["k"], tm["v"]),
                   ("head-major", hm, "HND", hm["k"].transpose(1, 2), hm["v"].transpose(1, 2))]


def cell_calls(b, hkv, q, dense, lens):
    """(name, page, layout, splits, bytes key, call) for one cell."""
    calls = []
    layouts = [(0, "dense", dense, {})]
    for page in (16, 128):
        table, both = pools(dense, page)
        for layout, pool, fi_layout, fk, fv in both:
            layouts.append((page, layout, pool, {"block_table": table}))
            if dev == "cuda":  # planned on its first call, inside the sweep's try
                calls.append(("flashinfer", page, layout, None, "bf16",
                              _lazy(partial(_flashinfer_paged, table, page, hkv, fi_layout), fk, fv, q)))
    for page, layout, c, paged in layouts:
        for rule, rule_choices in RULES.items():
            n = planned(rule_choices, b * hkv, int(lens.max()), 64, bool(page), False)
            for launch, launch_choices in LAUNCHES.items():
                calls.append((f"bf16 {rule}{launch}", page, layout, n, "bf16",
                              partial(under, {**rule_choices, **launch_choices}, decode_attention, q, c["k"], c["v"],
                                      lens, **paged)))
        if "kq" in c:
            n = planned({}, b * hkv, int(lens.max()), 128, bool(page), True)
            for launch, launch_choices in LAUNCHES.items():
                calls.append((f"int8{launch}", page, layout, n, "int8",
                              partial(under, launch_choices, decode_attention, q, c["kq"], c["vq"], lens,
                                      k_scale=c["ks"], v_scale=c["vs"], **paged)))
    return calls


try:
    for hkv, length in CELLS:
        if sweep.over_budget():
            break
        x = decode_inputs(hkv, length, dev)
        q, lens = x["q"], x["lens"]
        dense = {n: x[n] for n in ("k", "v", "kq", "vq", "ks", "vs")}
        want = decode_attention(q, x["k"], x["v"], lens).float()
        n_bytes = {"bf16": x["kv_bytes"], "int8": x["int8_bytes"]}
        calls = cell_calls(8, hkv, q, dense, lens)
        for rnd in range(ROUNDS):
            for name, page, layout, splits, kind, call in calls:
                sweep.time(name, call, n_bytes[kind], want, round=rnd, L=length, b=8, hkv=hkv, page=page,
                           layout=layout, splits=splits)
        x = dense = q = calls = None
        if dev == "cuda":
            torch.cuda.empty_cache()
    if not sweep.over_budget():  # one sequence: many splits
        length = max(n for _, n in CELLS)
        g = torch.Generator(device=dev).manual_seed(1)
        q, k, v = (torch.randn(1, h, n, 128, device=dev, dtype=torch.bfloat16, generator=g)
                   for h, n in ((32, 1), (8, length), (8, length)))
        lens = torch.full((1,), length, dtype=torch.int32, device=dev)
        want = decode_attention(q, k, v, lens).float()
        table, (kc, vc) = paged_pools(16, k, v)
        for rnd in range(ROUNDS):
            for page, kk, vv, paged in ((0, k, v, {}), (16, kc, vc, {"block_table": table})):
                for rule, choices in RULES.items():
                    n = planned(choices, 8, length, 64, bool(page), False)
                    sweep.time(f"bf16 {rule}", partial(under, {**choices, **LAUNCHES[""]}, decode_attention, q, kk,
                                                       vv, lens, **paged),
                               2 * k.numel() * 2, want, round=rnd, L=length, b=1, hkv=8, page=page,
                               layout="token-major" if page else "dense", splits=n)
finally:
    json.dump(sweep.rows, open(os.path.join(OUT, "sweep.json"), "w"), indent=0)
    kernels = compiled_kernels(_decode_split)
    json.dump(kernels, open(os.path.join(OUT, "kernels.json"), "w"), indent=0)
    print("sweep done in", round(time.time() - sweep.start), "s:", len(sweep.rows), "rows,", len(kernels), "kernels")
