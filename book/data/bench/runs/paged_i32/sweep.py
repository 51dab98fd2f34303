"""The paged kernel's loop, step by step (book/notes/kv_cache.md, "Paged blocks in 32-bit arithmetic"):
the kernel as it was (``old``: 64-bit page offsets, bf16 pages' table read in the block's iteration),
then 32-bit page offsets (``i32``), then also bf16 pages' table read a block ahead (``i32+ahead``),
both built by ``old_kernel_with_switches`` below (``minikernels/decode.py`` of commit c90d0f9 with two
switches added by text edits: the file as main has it when this ran), and ``new``: the
package's own ``decode_attention`` when the script runs. In ``sweep_1.json`` that was the branch
``paged-i32-regcap`` without its register cap: the two changes and the table's mask constant per
page. Timed on a GPU at B8 H32 D128, 8 and 32 kv heads (SWEEP_HKV), pages of 16 and 128 tokens, bf16
pages (token-major) and int8 pages (head-major, as ``PagedKVCache`` stores them, and token-major),
with FlashInfer's paged decode and our dense kernels in the same run; ``new`` also at other split
counts. Rows: ``name``, ``variant``, ``splits`` (null: the rule's), ``L``, ``hkv``, ``page``, GB/s
of the cache bytes (scales included). ``kernels_1.json``: each compiled split kernel's registers and
shared memory. Run from the repository's root with the GPU's Python: ``OUT=<folder> python
book/data/bench/runs/paged_i32/sweep.py``; it stops taking rows after SWEEP_BUDGET seconds (the
recorded run: one H100 80GB HBM3, torch 2.11, Triton 3.6, FlashInfer 0.5.3, ``SWEEP_BUDGET=140``,
every row reached). The package's decode.py has since taken the changes, so the edits no longer fit
it and the script refuses: run it with ``SWEEP_STEPS=`` (only the package's rows) or with commit
c90d0f9's decode.py in place. ``paged_decode_run2.json`` and ``kernels_2.json`` are not this script's: the
package's ``--op paged_decode`` with the register cap added, and its compiled split kernels
(registers, spills, shared memory, ``maxnreg``) after a few decode calls, from a later call."""
import json
import os
import time
from functools import partial

import torch

from minikernels import planning  # noqa: F401  (first: on a CPU it switches Triton to its interpreter)
from minikernels.bench.common import Sweep, compiled_kernels, module_with_edits
from minikernels.bench.decoding import _flashinfer_paged, _lazy, decode_inputs, paged_pools
from minikernels.decode import _decode_split, decode_attention

# The old kernel's lines the switches change, and what they become (each switch off is the old kernel).
SWITCHES = [
    ("MAX_SPLITS = 64\n", "MAX_SPLITS = 64\nVARIANT = {}  # the sweep's switches, passed on a paged cache\n"),
    ("HAS_LEFTPAD: tl.constexpr, HAS_LENGTHS: tl.constexpr):",
     "HAS_LEFTPAD: tl.constexpr, HAS_LENGTHS: tl.constexpr, POOL_I32: tl.constexpr = False,\n"
     "                  AHEAD: tl.constexpr = False):"),
    ("if PAGE_SIZE != 0 and QUANTIZED:\n", "if PAGE_SIZE != 0 and (QUANTIZED or AHEAD):\n"),
    ("if QUANTIZED:  # read a block ahead (above)", "if QUANTIZED or AHEAD:  # read a block ahead (above)"),
    ("page = tl.minimum(tl.maximum(page, 0), tl.maximum(num_pages - 1, 0)).to(tl.int64)",
     "page = tl.minimum(tl.maximum(page, 0), tl.maximum(num_pages - 1, 0))\n"
     "            if not POOL_I32:\n                page = page.to(tl.int64)"),
    ("HAS_LENGTHS=has_lengths, **dot_options(qw.dtype))",
     "HAS_LENGTHS=has_lengths, **dot_options(qw.dtype),\n                        **(VARIANT if paged else {}))"),
]


def old_kernel_with_switches():
    """``minikernels/decode.py`` with SWITCHES applied, loaded as ``minikernels.decode_variants``. It
    refuses a decode.py the edits do not fit (one changed since commit c90d0f9: take that commit's
    file)."""
    import minikernels.decode as package_decode

    return module_with_edits(package_decode, SWITCHES, "minikernels.decode_variants")


OUT = os.environ.get("OUT", ".")
LENS = [int(x) for x in os.environ.get("SWEEP_LENS", "65536").split(",")]
STEPS = {"old": {}, "i32": {"POOL_I32": True}, "i32+ahead": {"POOL_I32": True, "AHEAD": True}}
STEPS_TIMED = [s for s in os.environ.get("SWEEP_STEPS", "old,i32,i32+ahead").split(",") if s]
HKVS = [int(x) for x in os.environ.get("SWEEP_HKV", "32,8").split(",")]
SPLITS = {8: [4, 8], 32: [2, 3]}
dev = "cuda" if torch.cuda.is_available() else "cpu"
variants = old_kernel_with_switches() if STEPS_TIMED else None
sweep = Sweep(float(os.environ.get("SWEEP_BUDGET", "300")))


def stepped(step):
    def call(*args, **kwargs):
        variants.VARIANT = STEPS[step]
        return variants.decode_attention(*args, **kwargs)
    return call


try:
    for length in LENS:
        for hkv in HKVS:
            if sweep.over_budget():
                break
            x = decode_inputs(hkv, length, dev)
            q, k, v, lens, kq, ks, vq, vs = (x[n] for n in ("q", "k", "v", "lens", "kq", "ks", "vq", "vs"))
            bf16_bytes, int8_bytes = x["kv_bytes"], x["int8_bytes"]
            want = decode_attention(q, k, v, lens).float()
            meta = dict(L=length, hkv=hkv)
            sweep.time("dense bf16", partial(decode_attention, q, k, v, lens), bf16_bytes, want, page=0,
                       variant="new", splits=None, **meta)
            sweep.time("dense int8", partial(decode_attention, q, kq, vq, lens, k_scale=ks, v_scale=vs),
                       int8_bytes, want, page=0, variant="new", splits=None, **meta)
            for page in (16, 128):
                table, (kc, vc, kqc, vqc, ksc, vsc) = paged_pools(page, k, v, kq, vq, ks, vs)
                kqh, vqh = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (kqc, vqc))  # head-major
                if dev == "cuda":  # planned on its first call, inside the sweep's try
                    fi = _lazy(partial(_flashinfer_paged, table, page, hkv), kc, vc, q)
                    sweep.time("flashinfer", fi, bf16_bytes, want, page=page, **meta)
                pm = dict(page=page, **meta)
                for step in STEPS_TIMED:
                    sweep.time("paged bf16", partial(stepped(step), q, kc, vc, lens, block_table=table), bf16_bytes,
                               want, variant=step, splits=None, **pm)
                    sweep.time("paged int8 head-major", partial(stepped(step), q, kqh, vqh, lens, block_table=table,
                                                                k_scale=ksc, v_scale=vsc),
                               int8_bytes, want, variant=step, splits=None, **pm)
                for s in [None, *SPLITS[hkv]]:
                    sweep.time("paged bf16", partial(decode_attention, q, kc, vc, lens, block_table=table,
                                                     num_splits=s), bf16_bytes, want, variant="new", splits=s, **pm)
                    sweep.time("paged int8 head-major", partial(decode_attention, q, kqh, vqh, lens, block_table=table,
                                                                k_scale=ksc, v_scale=vsc, num_splits=s),
                               int8_bytes, want, variant="new", splits=s, **pm)
                for step, fn in [*([("old", stepped("old"))] if variants else []), ("new", decode_attention)]:
                    sweep.time("paged int8", partial(fn, q, kqc, vqc, lens, block_table=table, k_scale=ksc,
                                                     v_scale=vsc), int8_bytes, want, variant=step, splits=None, **pm)
                kc = vc = kqc = vqc = ksc = vsc = kqh = vqh = None
                if dev == "cuda":
                    torch.cuda.empty_cache()
            q = k = v = kq = vq = None
finally:
    json.dump(sweep.rows, open(os.path.join(OUT, "sweep.json"), "w"), indent=0)
    kernels = compiled_kernels(_decode_split, *([variants._decode_split] if variants else []))
    json.dump(kernels, open(os.path.join(OUT, "kernels.json"), "w"), indent=0)
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(json.dumps({"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__}))
    print("sweep done in", round(time.time() - sweep.start), "s:", len(sweep.rows), "rows,", len(kernels), "kernels")
