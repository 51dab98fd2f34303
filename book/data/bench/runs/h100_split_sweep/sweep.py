"""A split-count sweep of ``decode_attention`` on a GPU, recorded beside this file (split_sweep.json,
kernels.json): B8 H32 D128, Hkv 8 and 32, 64k/4k/16k keys, the dense cache and pages of 16 and 128
tokens, bf16 and int8 caches, every split count of a grid, with FlashInfer's paged decode and cuDNN
(SDPA on the dense cache) timed in the same run as references.

Rows: ``name`` (layout and cache), ``tile`` (null: the planner's; else the forced tile), ``var``
("base": the package, whose int8 pages read one table entry per key whatever the page size;
"per_block": the package with an int8 block that lies in one page reading one entry, generated
below), ``splits`` (null: the planner's count, ``planned`` says which), GB/s of the cache bytes.
kernels.json lists each compiled split kernel's shared memory and registers (what bounds how many
programs an SM holds). Run from the repository's root with the GPU's Python:
``OUT=<folder> python book/data/bench/runs/h100_split_sweep/sweep.py``; it stops taking new rows
after SWEEP_BUDGET seconds. The recorded run (one H100 80GB HBM3, torch 2.11, Triton 3.6, FlashInfer
0.5.3, the package at commit a6b81c7) ran with ``SWEEP_LENS=65536 SWEEP_BUDGET=110``: its budget
covered 64k keys with 8 kv heads, every layout, and one "per_block" row (the planner's split count)."""
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from functools import partial

import torch

from minikernels import planning  # first: on a CPU it switches Triton to its interpreter
from minikernels.bench.common import time_rotating
from minikernels.bench.decoding import _flashinfer_paged, _pages
from minikernels.decode import choose_num_splits, decode_attention, launch_config
from minikernels.kv_cache import quantize_int8

B, H, D = 8, 32, 128
BUDGET = float(os.environ.get("SWEEP_BUDGET", "300"))
OUT = os.environ.get("OUT", ".")
dev = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [int(x) for x in os.environ.get("SWEEP_LENS", "65536,4096,16384").split(",")]
TILE128 = dict(BLOCK_N=128, num_warps=4, num_stages=3)
PACKAGE = importlib.import_module("minikernels.decode")

# the "per_block" variant: the package's kernel with int8 blocks inside one page reading one table entry
src = open(PACKAGE.__file__).read()
assert src.count("if PAGE_SIZE % BLOCK_N == 0 and not QUANTIZED:") == 2
src = src.replace("if PAGE_SIZE % BLOCK_N == 0 and not QUANTIZED:", "if PAGE_SIZE % BLOCK_N == 0:")
src = re.sub(r"from \.(\w*) import", lambda m: f"from minikernels.{m.group(1)} import" if m.group(1) else
             "from minikernels import", src)
vdir = tempfile.mkdtemp()
with open(os.path.join(vdir, "decode_per_block.py"), "w") as f:
    f.write(src)
spec = importlib.util.spec_from_file_location("decode_per_block", os.path.join(vdir, "decode_per_block.py"))
PER_BLOCK = importlib.util.module_from_spec(spec)
sys.modules["decode_per_block"] = PER_BLOCK  # its dataclass looks itself up there
spec.loader.exec_module(PER_BLOCK)

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
    return ms


def with_tile(fn, key, tile):
    def call(*a, **k):
        if tile is None:
            return fn(*a, **k)
        with planning.override({key: tile}):
            return fn(*a, **k)
    return call


try:
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
            grid = ([None, 2, 3, 4, 5, 6, 8, 9, 12, 16, 17, 24, 33, 48, 64] if hkv == 8 else
                    [None, 1, 2, 3, 4, 5, 6, 8, 9, 12, 16])
            planned = {}
            for int8 in (False, True):
                bn = launch_config(16, D, 2, int8)["BLOCK_N"] if dev == "cuda" else 32
                planned[int8] = choose_num_splits(B * hkv, length, bn, q.device, int8=int8)
            if dev == "cuda":
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def cudnn(q=q, k=k, v=v):
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                timed("cudnn dense", cudnn, bf16_bytes, want, **meta)
                del qt, kt, vt
            layouts = [(0, None)] + [(p, _pages(k, p, seed=p)[1]) for p in (16, 128)]
            for page, table in layouts:
                if page:
                    kc, vc, kqc, vqc, ksc, vsc = (_pages(t, page, seed=page)[0] for t in (k, v, kq, vq, ks, vs))
                    if dev == "cuda":
                        try:
                            fi = _flashinfer_paged(table, page, hkv)
                            timed("flashinfer", partial(fi, q, kc, vc), bf16_bytes, want, page=page, **meta)
                        except Exception as exc:
                            print("flashinfer failed", exc)
                else:
                    kc, vc, kqc, vqc, ksc, vsc = k, v, kq, vq, ks, vs
                configs = [("bf16", PACKAGE, None, "base"), ("bf16", PACKAGE, TILE128, "base"),
                           ("int8", PACKAGE, None, "base")]
                if page == 128:
                    configs.append(("int8", PER_BLOCK, None, "per_block"))
                for cache, mod, tile, var in configs:
                    key = "decode.split" if cache == "bf16" else "decode.split_int8"
                    fn = with_tile(mod.decode_attention, key, tile)
                    args = (kc, vc, {}) if cache == "bf16" else (kqc, vqc, {"k_scale": ksc, "v_scale": vsc})
                    for s in grid:
                        timed(f"{'paged' if page else 'dense'} {cache}",
                              partial(fn, q, args[0], args[1], lens, block_table=table, num_splits=s, **args[2]),
                              bf16_bytes if cache == "bf16" else int8_bytes, want, page=page, tile=tile, var=var,
                              splits=s, planned=planned[cache == "int8"] if s is None and tile is None else None,
                              **meta)
                kc = vc = kqc = vqc = ksc = vsc = None
                if dev == "cuda":
                    torch.cuda.empty_cache()
            q = k = v = kq = vq = None
finally:
    json.dump(out, open(os.path.join(OUT, "split_sweep.json"), "w"), indent=0)
    kernels = []
    for mod, var in ((PACKAGE, "base"), (PER_BLOCK, "per_block")):
        for _device, caches in getattr(mod._decode_split, "device_caches", {}).items():
            for key, ck in caches[0].items():
                md = ck.metadata
                kernels.append({"var": var, "shared": getattr(md, "shared", None), "regs": getattr(ck, "n_regs", None),
                                "spills": getattr(ck, "n_spills", None), "num_warps": getattr(md, "num_warps", None),
                                "num_stages": getattr(md, "num_stages", None), "key": str(key)[-400:]})
    json.dump(kernels, open(os.path.join(OUT, "kernels.json"), "w"), indent=0)
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(json.dumps({"gpu": props.name, "sms": props.multi_processor_count,
                          "smem_per_sm": getattr(props, "shared_memory_per_multiprocessor", None)}))
    print("sweep done", round(time.time() - start), len(out), "rows", len(kernels), "kernels")
