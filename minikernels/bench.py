"""Benchmarks: ``python -m minikernels.bench --op softmax`` (GPU only).

Times our kernels and the anchors side by side, in one process, with Triton's benchmarking helpers
(median of many repetitions), prints a table and writes JSON (date, GPU, torch and triton versions,
the measured ceilings, one row per measurement) for the book's figures. Short, memory-bound calls
(softmax, decode) are replayed from a CUDA graph, cycling through enough buffer sets that no call
finds its inputs in L2, so launch overhead and a warm cache flatter no one. Attention forwards are
replayed too, from one buffer set (some 200 MB of inputs at the shapes timed: more than the L2). The
linear-attention and SSD forward+backward passes (autograd included) are captured too: they are
strings of short kernels, and timed with plain ``do_bench`` they would measure the host that issues
them more than the GPU (the book's engineering notes give the numbers). These pass one buffer set:
their inputs (67 MB of values alone at the shapes timed) do not fit the L2 anyway. The attention
backward passes (long kernels) are timed with plain ``do_bench``, as is anything that fails to be
captured. Each row's ``timing`` field says which was used.

Memory-bound ops are reported in GB/s of bytes that must move (each input read once, each output
written once) and as a fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import _backend  # the package's __init__ chose the backend before anything imported triton
from .results import recorded, recorded_dir  # noqa: F401  (notebooks read recorded runs as bench.recorded)

OPS = ("softmax", "flash", "decode", "sparse", "linear", "crossover", "ssd", "selective_scan")


def environment() -> dict:
    """Date, GPU name and library versions, stored with every result."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


# --- ceilings -------------------------------------------------------------------------------------

def _do_bench(fn, ms_warmup: int = 25, ms_rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=ms_warmup, rep=ms_rep, return_mode="median"))


def _do_bench_graph(fn, ms_rep: int = 100) -> float:
    # median of CUDA-graph replays: no launch gaps, no host time
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=ms_rep, return_mode="median"))


def measure_ceilings() -> dict:
    """Copy bandwidth (1 GiB, bytes read + written) and the bf16 matmul rate (8192^3) on this GPU."""
    n_bytes = 1 << 30
    x = torch.randn(n_bytes // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t_copy = _do_bench(lambda: y.copy_(x))
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t_mm = _do_bench(lambda: a @ b)
    return {
        "copy_GBps": 2 * n_bytes / (t_copy * 1e-3) / 1e9,
        "copy_ms_1GiB": t_copy,
        "matmul_bf16_TFLOPs": 2 * n**3 / (t_mm * 1e-3) / 1e12,
        "matmul_ms_8192": t_mm,
    }


def exponentials_ms(count: int, polynomial: bool = False) -> float:
    """Milliseconds this GPU takes to compute ``count`` values of 2^x and nothing else: 16 programs of
    4 warps an SM, each thread summing 8 independent chains so no latency shows, and no memory traffic
    but one store a thread. With ``tl.exp2`` (the special-function unit's instruction, as the scan's
    decays use it) this is a floor for any kernel that takes each of ``count`` exponentials with that
    instruction. ``polynomial=True`` times the alternative on the multiply-add units instead
    (`_exp2_polynomial`, float32-accurate), the trick FlashAttention-4 uses for part of softmax's."""
    block, warps = 1024, 4
    programs = 16 * torch.cuda.get_device_properties(0).multi_processor_count
    steps = -(-count // (programs * block))
    out = torch.empty(programs * block, device="cuda")
    ms = _do_bench(lambda: _exp2_only[(programs,)](out, steps, BLOCK=block, POLYNOMIAL=polynomial,
                                                   num_warps=warps))
    return ms * count / (programs * block * steps)  # the few extra values the rounding added


@triton.jit
def _exp2_polynomial(x):
    # 2^x = 2^j * 2^f with j = round(x), f in [-1/2, 1/2]: 2^f by a degree-5 polynomial (1 + least
    # squares in relative error, within 1.1e-7 of 2^f; exact at f = 0, so integers give exact powers
    # of two), 2^j by adding j to the float's exponent bits. Every instruction runs on the multiply-add
    # and integer units, none on the special-function unit. For x up to 127; below -126 it returns
    # 2^-126 where 2^x would be subnormal or 0 (as a decay, either wipes a state out).
    x = tl.maximum(x, -126.0)
    t = x + 12582912.0  # 1.5 * 2^23: the sum's low mantissa bits hold round(x)
    f = x - (t - 12582912.0)
    p = 1.0 + f * (0.6931468844413757 + f * (0.24022237956523895 + f * (
        0.05550893023610115 + f * (0.009671698324382305 + f * 0.0013218672247603536))))
    j = t.to(tl.int32, bitcast=True) - 0x4B400000  # the bits of 12582912.0: what is left is round(x)
    return (p.to(tl.int32, bitcast=True) + (j << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _exp2_only(OUT, steps, BLOCK: tl.constexpr, POLYNOMIAL: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = (offs % 1024).to(tl.float32) * -1e-3  # a different argument in every lane
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(steps):
        x = x - 1e-6  # a new argument every step, so nothing is hoisted out of the loop
        if POLYNOMIAL:
            acc += _exp2_polynomial(x)
        else:
            acc += tl.exp2(x)
    tl.store(OUT + offs, acc)  # the sums are stored: the exponentials cannot be dropped


# --- timing -------------------------------------------------------------------------------------

_L2_FLUSH_BYTES = 256 << 20  # rotate buffers until this much is touched: several times the H200's L2


def n_buffer_sets(bytes_per_set: int) -> int:
    return max(2, -(-_L2_FLUSH_BYTES // bytes_per_set))


def time_rotating(calls) -> tuple[float, str]:
    """Median milliseconds of one call, cycling through ``calls`` (one per buffer set, so no call finds
    its inputs in L2). The calls are captured in a CUDA graph and replayed, so Python launch overhead
    (~10-20 us, as long as a whole small kernel) is not what is measured; falls back to plain
    ``do_bench`` for code that cannot be captured. Returns (ms, method)."""
    import triton.testing

    def run_all():
        for c in calls:
            c()

    try:
        ms = triton.testing.do_bench_cudagraph(run_all, rep=100, return_mode="median")
        return float(ms) / len(calls), "cuda-graph"
    except Exception:
        torch.cuda.synchronize()
        return _do_bench(run_all) / len(calls), "do_bench"


# --- softmax --------------------------------------------------------------------------------------

def bench_softmax(ceilings: dict, quick: bool = False) -> list[dict]:
    from . import row_softmax

    rows = []
    m = 4096
    columns = [4096, 32768] if quick else [1024, 4096, 8192, 16384, 32768]
    compiled = torch.compile(lambda t: torch.softmax(t, dim=-1))
    for dtype in (torch.bfloat16, torch.float32):
        for n in columns:
            elt = torch.finfo(dtype).bits // 8
            sets = n_buffer_sets(2 * m * n * elt)
            xs = [torch.randn(m, n, device="cuda", dtype=dtype) for _ in range(sets)]
            dys = [torch.randn(m, n, device="cuda", dtype=dtype) for _ in range(sets)]
            ys = [row_softmax._forward_2d(x) for x in xs]
            # the benchmark checks what it times
            torch.testing.assert_close(ys[0].float(), torch.softmax(xs[0].float(), -1), atol=2e-2, rtol=0)
            fwd_bytes = 2 * m * n * elt  # read x, write y
            bwd_bytes = 3 * m * n * elt  # read y and dy, write dx
            candidates = [
                ("minikernels", "fwd", fwd_bytes, [lambda x=x: row_softmax._forward_2d(x) for x in xs]),
                ("torch.softmax", "fwd", fwd_bytes, [lambda x=x: torch.softmax(x, dim=-1) for x in xs]),
                ("torch.compile", "fwd", fwd_bytes, [lambda x=x: compiled(x) for x in xs]),
                ("minikernels", "bwd", bwd_bytes,
                 [lambda y=y, dy=dy: row_softmax._backward_2d(y, dy) for y, dy in zip(ys, dys)]),
                ("torch.softmax", "bwd", bwd_bytes,
                 [lambda y=y, dy=dy, dt=dtype: torch._softmax_backward_data(dy, y, -1, dt) for y, dy in zip(ys, dys)]),
            ]
            for impl, direction, n_bytes, calls in candidates:
                try:
                    calls[0]()  # warm up (compilation) outside the timed region
                    ms, method = time_rotating(calls)
                except Exception as exc:  # an anchor that fails is reported, not fatal
                    print(f"  {impl} {direction} M={m} N={n}: failed ({type(exc).__name__}: {exc})")
                    continue
                gbps = n_bytes / (ms * 1e-3) / 1e9
                rows.append({"impl": impl, "pass": direction, "shape": f"{m}x{n}", "M": m, "N": n,
                             "dtype": str(dtype).replace("torch.", ""), "ms": ms, "GBps": gbps,
                             "frac_of_copy": gbps / ceilings["copy_GBps"], "timing": method})
            del xs, dys, ys
    return rows


# --- flash attention ------------------------------------------------------------------------------

def _sdpa(backend_name: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _flex_causal(n: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, causal: compiled(q, k, v, block_mask=mask)


def attention_flops(b, h, nq, nk, d, causal, direction):
    fwd = 4 * b * h * nq * nk * d * (0.5 if causal else 1.0)
    return fwd if direction == "fwd" else 2.5 * fwd


def _time_attention(impl, fn, direction, q, k, v, do, ours_o, ours_lse, causal, scale):
    """Milliseconds of one forward or backward pass of one implementation, and how it was timed."""
    from . import flash

    if impl == "minikernels" and direction == "fwd":
        call = lambda: flash._forward(q, k, v, causal, scale)
    elif impl == "minikernels":
        call = lambda: flash._backward(q, k, v, ours_o, ours_lse, do, causal, scale)
    elif direction == "fwd":
        call = lambda: fn(q, k, v, causal)
    else:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qg, kg, vg, causal)
        call = lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)
    call()  # compile and warm up outside the timed region
    if direction == "fwd":
        return time_rotating([call])
    return _do_bench(call), "do_bench"  # long kernels: the host's launch time is a small part of them


def bench_flash(ceilings: dict, quick: bool = False, with_flex: bool = True) -> list[dict]:
    """Shapes of the issue: B*N = 16k tokens, H*D = 2048, bf16; forward and backward. FlexAttention
    (compiled, one compile per shape) on the dense causal D=128 shapes with N >= 4096."""
    from . import flash

    rows = []
    lengths = [4096] if quick else [1024, 4096, 16384]
    for d in (64, 128):
        h = 2048 // d
        for n in lengths:
            b = 16384 // n
            for causal in (False, True):
                q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                scale = d**-0.5
                ours_o, ours_lse = flash._forward(q, k, v, causal, scale)
                want = _sdpa("MATH")(q[:1].float(), k[:1].float(), v[:1].float(), causal)
                torch.testing.assert_close(ours_o[:1].float(), want, atol=2e-2, rtol=0)  # check what is timed
                impls = {"minikernels": None, "sdpa-flash": _sdpa("FLASH_ATTENTION"),
                         "sdpa-cudnn": _sdpa("CUDNN_ATTENTION")}
                if with_flex and causal and d == 128 and n >= 4096:  # each shape is a fresh compile
                    impls["flex (compiled)"] = _flex_causal(n)
                shape = f"B{b} H{h} N{n} D{d}" + (" causal" if causal else "")
                for impl, fn in impls.items():
                    for direction in ("fwd", "bwd"):
                        try:
                            ms, method = _time_attention(impl, fn, direction, q, k, v, do, ours_o, ours_lse,
                                                         causal, scale)
                        except Exception as exc:
                            print(f"  {impl} {direction} {shape}: failed ({type(exc).__name__}: {str(exc)[:200]})")
                            continue
                        flops = attention_flops(b, h, n, n, d, causal, direction)
                        rows.append({"impl": impl, "pass": direction, "shape": shape, "B": b, "H": h, "N": n, "D": d,
                                     "causal": causal, "dtype": "bfloat16", "ms": ms,
                                     "TFLOPs": flops / (ms * 1e-3) / 1e12, "timing": method})
                torch.cuda.empty_cache()
    return rows


# --- decode ---------------------------------------------------------------------------------------

def bench_decode(ceilings: dict, quick: bool = False) -> list[dict]:
    """B8 H32 D128, one query row, bf16, the cache full to length L; bytes = the K and V read."""
    from .decode import decode_attention

    rows = []
    b, h, d = 8, 32, 128
    for length in ([8192, 65536] if quick else [1024, 4096, 8192, 16384, 32768, 65536]):
        kv_bytes = 2 * b * h * length * d * 2
        sets = n_buffer_sets(kv_bytes)
        qs = [torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        ks = [torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        vs = [torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        lens = torch.full((b,), length, dtype=torch.int32, device="cuda")
        got = decode_attention(qs[0], ks[0], vs[0], lens)
        want = _sdpa("MATH")(qs[0].float(), ks[0].float(), vs[0].float(), False)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
        impls = {
            "minikernels": lambda q, k, v, lens=lens: decode_attention(q, k, v, lens),
            "sdpa-flash": lambda q, k, v: _sdpa("FLASH_ATTENTION")(q, k, v, False),
            "sdpa-cudnn": lambda q, k, v: _sdpa("CUDNN_ATTENTION")(q, k, v, False),
        }
        for impl, fn in impls.items():
            calls = [lambda q=q, k=k, v=v, fn=fn: fn(q, k, v) for q, k, v in zip(qs, ks, vs)]
            try:
                calls[0]()
                ms, method = time_rotating(calls)
            except Exception as exc:
                print(f"  {impl} decode L={length}: failed ({type(exc).__name__}: {str(exc)[:200]})")
                continue
            gbps = kv_bytes / (ms * 1e-3) / 1e9
            rows.append({"impl": impl, "pass": "fwd", "shape": f"B{b} H{h} D{d} L{length}", "L": length,
                         "dtype": "bfloat16", "ms": ms, "GBps": gbps, "frac_of_copy": gbps / ceilings["copy_GBps"],
                         "timing": method})
        torch.cuda.empty_cache()
    return rows


# --- block-sparse attention -----------------------------------------------------------------------

def one_in_eight_blocks(n: int, block: int = 128, seed: int = 0) -> torch.Tensor:
    """bool [n_blocks, n_blocks]: the causal diagonal plus about one in eight blocks below it, at random."""
    nb = n // block
    g = torch.Generator().manual_seed(seed)
    pick = (torch.rand(nb, nb, generator=g) < 1 / 8).tril()
    return pick | torch.eye(nb, dtype=torch.bool)


def _time_sparse(fn, direction, q, k, v, do) -> float:
    """Milliseconds of a forward, or of a backward through autograd."""
    if direction == "fwd":
        call = lambda: fn(q, k, v)
    else:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qg, kg, vg)
        call = lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)
    call()
    return _do_bench(call)


def bench_sparse(ceilings: dict, quick: bool = False) -> list[dict]:
    """B1 H16 N16k D128 bf16: sliding window 1024 and one-in-eight 128-blocks + diagonal; ours and
    compiled FlexAttention with the same mask, forward and backward; our dense causal run for the
    density ratio; XAttention's estimation against the sparse attention it selects for."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from . import block_sparse, masks
    from .flash import flash_attention

    b, h, n, d, bs = 1, 16, 16384, 128, 128
    q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    picked = one_in_eight_blocks(n, bs).cuda()
    rules = {
        "sliding window 1024": lambda i, j: (j <= i) & (j > i - 1024),
        "1-in-8 blocks + diagonal": lambda i, j: picked[i // bs, j // bs] & (j <= i),
    }
    # one compiled flex_attention serves two masks, two shapes (the check on one head, then the timed
    # run) and both passes: more recompiles than dynamo's default limit of 8, past which it would
    # silently fall back to the unfused eager path and time that instead
    torch._dynamo.config.recompile_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    dense_causal = masks.causal(n, block_size=bs, device="cuda")
    dense = lambda q, k, v: flash_attention(q, k, v, causal=True)
    causal_ms = {dr: _time_sparse(dense, dr, q, k, v, do) for dr in ("fwd", "bwd")}
    for name, rule in rules.items():
        bm = masks.from_mask_fn(rule, n, n, block_size=bs, device="cuda")
        flex_mask = create_block_mask(lambda bb, hh, i, j, rule=rule: rule(i, j), None, None, n, n, device="cuda",
                                      BLOCK_SIZE=bs)
        impls = {"minikernels": lambda q, k, v, bm=bm: block_sparse.block_sparse_attention(q, k, v, bm),
                 "flex (compiled)": lambda q, k, v, m=flex_mask: flex(q, k, v, block_mask=m)}
        got = impls["minikernels"](q[:, :1], k[:, :1], v[:, :1])
        want = impls["flex (compiled)"](q[:, :1], k[:, :1], v[:, :1])
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)  # the same attention
        ideal = dense_causal.visited_blocks() / bm.visited_blocks()
        for impl, fn in impls.items():
            for direction in ("fwd", "bwd"):
                try:
                    ms = _time_sparse(fn, direction, q, k, v, do)
                except Exception as exc:
                    print(f"  {impl} {direction} {name}: failed ({type(exc).__name__}: {str(exc)[:200]})")
                    continue
                row = {"impl": impl, "pass": direction, "shape": f"{name}, B1 H16 N16k D128", "mask": name,
                       "density": bm.density(), "dtype": "bfloat16", "ms": ms, "timing": "do_bench",
                       "TFLOPs": attention_flops(b, h, n, n, d, False, direction) * bm.density() / (ms * 1e-3) / 1e12}
                if impl == "minikernels":
                    row["speedup_over_dense_causal"] = causal_ms[direction] / ms
                    row["ideal_speedup"] = ideal
                    row["fraction_of_ideal"] = row["speedup_over_dense_causal"] / ideal
                    print(f"  {name} {direction}: {row['speedup_over_dense_causal']:.2f}x our dense causal, "
                          f"ideal {ideal:.2f}x (visited blocks), {row['fraction_of_ideal']:.0%} of ideal")
                rows.append(row)
    # XAttention: estimating the mask (scoring + selection, on the GPU) against running the attention it
    # selects for; turning the kept blocks into a BlockMask (host code, once per mask) is timed apart.
    # Stride 8 is the target's setting; stride 16 (the paper's other setting) shows how the cost scales:
    # the scoring's matrix work over the attention's is 1 / (4 * stride * density).
    # The estimate is three launches whose GPU work is shorter than the time Python takes to issue
    # them, so a timed call measures the host as much as the GPU. Both sides of the ratio are timed as
    # CUDA-graph replays; single-call times are printed and recorded beside them.
    for stride in (8, 16):
        estimate = lambda s=stride: masks.xattention_blocks(q, k, stride=s, threshold=0.9, block_size=bs)
        estimate()
        est_ms = _do_bench_graph(estimate)
        est_one_ms = _do_bench(estimate)
        start = time.perf_counter()
        bm = masks.xattention(q, k, stride=stride, threshold=0.9, block_size=bs)
        torch.cuda.synchronize()
        build_ms = (time.perf_counter() - start) * 1e3
        attend = lambda m=bm: block_sparse.block_sparse_attention(q, k, v, m)
        attend()
        att_ms = _do_bench_graph(attend)
        att_one_ms = _do_bench(attend)
        flop_ratio = 1 / (4 * stride * bm.density())
        print(f"  xattention, stride {stride}: estimation {est_ms:.3f} ms vs the sparse attention it selects for "
              f"{att_ms:.3f} ms ({est_ms / att_ms:.1%}; FLOP ratio {flop_ratio:.1%}), CUDA-graph replays; "
              f"one call {est_one_ms:.3f} ms vs {att_one_ms:.3f} ms ({est_one_ms / att_one_ms:.1%}); "
              f"density {bm.density():.2f}; building the BlockMask (host) {build_ms:.0f} ms")
        rows.append({"impl": "xattention-estimate", "pass": "fwd", "shape": f"xattention estimation, stride {stride}",
                     "stride": stride, "dtype": "bfloat16", "ms": est_ms, "TFLOPs": 0.0,
                     "timing": "do_bench_cudagraph", "relative_to_sparse_attention": est_ms / att_ms,
                     "flop_ratio": flop_ratio, "density": bm.density(), "sparse_attention_ms": att_ms,
                     "one_call_ms": est_one_ms, "sparse_attention_one_call_ms": att_one_ms,
                     "blockmask_build_ms": build_ms})
    return rows


def _progress(row: dict) -> None:
    """One line per measurement as it is taken (the table comes at the end of an op)."""
    print(f"  {row['impl']} {row['pass']} {row['shape']}: {row['ms']:.3f} ms", flush=True)


# --- linear attention -----------------------------------------------------------------------------

def _fla_ops() -> dict:
    """fla-core's chunked kernels, if its wheel is installed (``fetch-wheels.sh anchors``)."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except Exception as exc:  # not installed, or failing to import: reported, not fatal
        print(f"  fla-core not available ({type(exc).__name__}: {str(exc)[:120]}): no fla rows")
        return {}
    # fla's own guard (fla/ops/common/chunk_o.py, its issue 640) refuses the gated backward on Hopper with
    # Triton >= 3.4 and < 3.7.1, but only after compiling and running most of it (over a minute of a
    # cold run): the same test up front, so that attempt is skipped and said so
    gated_bwd = not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)
    return {"linear": chunk_linear_attn, "simple_gla": chunk_simple_gla, "gated_bwd": gated_bwd}


def _skip_fla_gated_bwd(fla: dict, impl: str, direction: str, shape: str) -> bool:
    if impl == "fla chunk_simple_gla" and direction == "fwd+bwd" and not fla["gated_bwd"]:
        print(f"  {impl} {direction} {shape}: skipped (fla refuses its gated backward on Hopper with this Triton)")
        return True
    return False


def bench_linear(ceilings: dict, quick: bool = False) -> list[dict]:
    """B4 H16 D128 bf16, T in {4k, 16k, 64k}: mk.linear_attention without and with a decay, against
    fla-core's chunk_linear_attn and chunk_simple_gla (inputs transposed to fla's [B, T, H, D] outside
    the timed region), forward and forward+backward, in tokens per second; at T = 4k also softmax
    attention (SDPA's cuDNN backend, causal) for the crossover."""
    import torch.nn.functional as F

    from .linear import chunked_form, linear_attention

    fla = _fla_ops()
    b, h, d = 4, 16, 128
    rows = []
    for t in ([4096] if quick else [4096, 16384, 65536]):
        q, k = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) * d**-0.5 for _ in range(2))
        v, do = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        g = F.logsigmoid(torch.randn(b, h, t, device="cuda") + 4.0)  # log-decays around -0.02
        q_t, k_t, v_t, do_t = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))  # fla's layout
        g_t = g.transpose(1, 2).contiguous()
        for gated in (False, True):
            dec, dec_t = (g, g_t) if gated else (None, None)
            # the benchmark checks what it times, on one head, against the PyTorch chunked form
            want = chunked_form(q[:1, :1].float(), k[:1, :1].float(), v[:1, :1].float(),
                                decay=dec[:1, :1] if gated else None)
            got = linear_attention(q[:1, :1], k[:1, :1], v[:1, :1], decay=dec[:1, :1] if gated else None)
            err = (got.float() - want).norm() / want.norm()
            assert err < 2e-2, f"linear attention check failed: relative error {err:.2e}"
            impls = {"minikernels": (lambda q, k, v, g, dec=dec: linear_attention(q, k, v, decay=dec), (q, k, v), do)}
            if fla and not gated:
                impls["fla chunk_linear_attn"] = (
                    lambda q, k, v, g: fla["linear"](q, k, v, scale=1.0, normalize=False)[0], (q_t, k_t, v_t), do_t)
            if fla and gated:
                impls["fla chunk_simple_gla"] = (
                    lambda q, k, v, g, dec_t=dec_t: fla["simple_gla"](q, k, v, g=dec_t, scale=1.0)[0],
                    (q_t, k_t, v_t), do_t)
            if t == 4096 and not gated:
                impls["sdpa-cudnn (softmax, causal)"] = (lambda q, k, v, g: _sdpa("CUDNN_ATTENTION")(q, k, v, True),
                                                         (q, k, v), do)
            shape = f"B{b} H{h} T{t} D{d}" + (" decay" if gated else "")
            for impl, (fn, ins, grad_out) in impls.items():
                for direction in ("fwd", "fwd+bwd"):
                    if _skip_fla_gated_bwd(fla, impl, direction, shape):
                        continue
                    try:
                        if direction == "fwd":
                            call = lambda fn=fn, ins=ins: fn(*ins, None)
                            call()
                            ms, method = time_rotating([call])
                        else:
                            leaves = [x.detach().requires_grad_() for x in ins]

                            def call(fn=fn, leaves=leaves, grad_out=grad_out):
                                out = fn(*leaves, None)
                                return torch.autograd.grad(out, leaves, grad_out)
                            call()
                            ms, method = time_rotating([call])
                    except Exception as exc:  # an anchor that fails (fla's gated backward, say) is reported
                        print(f"  {impl} {direction} {shape}: failed ({type(exc).__name__}: {str(exc)[:160]})")
                        continue
                    rows.append({"impl": impl, "pass": direction, "shape": shape, "B": b, "H": h, "T": t, "D": d,
                                 "decay": gated, "dtype": "bfloat16", "ms": ms, "Mtokps": b * t / (ms * 1e-3) / 1e6,
                                 "timing": method})
                    _progress(rows[-1])
        del q, k, v, do, q_t, k_t, v_t, do_t
        torch.cuda.empty_cache()
    return rows


def bench_crossover(ceilings: dict, quick: bool = False) -> list[dict]:
    """Chapter 3's crossover: forward tokens per second of mk.linear_attention (no decay) and of
    softmax attention (SDPA's cuDNN backend, causal) against the sequence length, B4 H16 D128 bf16.
    Softmax's cost per token grows with T; linear attention's does not."""
    from .linear import linear_attention

    b, h, d = 4, 16, 128
    sdpa = _sdpa("CUDNN_ATTENTION")
    impls = {"minikernels": lambda q, k, v: linear_attention(q, k, v),
             "sdpa-cudnn (softmax, causal)": lambda q, k, v: sdpa(q, k, v, True)}
    rows = []
    for t in ([1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384, 32768]):
        q, k = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) * d**-0.5 for _ in range(2))
        v = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
        for impl, fn in impls.items():
            call = lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)
            call()
            ms, method = time_rotating([call])
            rows.append({"impl": impl, "pass": "fwd", "shape": f"B{b} H{h} T{t} D{d}", "B": b, "H": h, "T": t, "D": d,
                         "decay": False, "dtype": "bfloat16", "ms": ms, "Mtokps": b * t / (ms * 1e-3) / 1e6,
                         "timing": method})
            _progress(rows[-1])
        del q, k, v
        torch.cuda.empty_cache()
    return rows


# --- state space models -----------------------------------------------------------------------------

def _mamba_chunk_scan():
    """mamba_ssm's mamba_chunk_scan_combined (Triton), if mamba_ssm imports. Its package imports its
    CUDA extension (``selective_scan_cuda``) first; a build without the extension fails here and
    gets no rows. CONTRIBUTING.md says how to run the benchmark with such a build."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as exc:
        print(f"  mamba_ssm not available ({type(exc).__name__}: {str(exc)[:120]}): no mamba rows")
        return None
    return mamba_chunk_scan_combined


def _time_fwd_bwd(fn, leaves, grad_out, direction):
    """(ms, method) of a forward, or of a forward + backward through autograd."""
    if direction == "fwd":
        call = lambda: fn(*leaves)
        call()
        return time_rotating([call])
    leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in leaves]

    def call():
        out = fn(*leaves)
        return torch.autograd.grad(out, [x for x in leaves if x.requires_grad], grad_out)
    call()
    return time_rotating([call])  # a graph of the whole step: the host's launch time is not timed


def bench_ssd(ceilings: dict, quick: bool = False) -> list[dict]:
    """mk.ssd, bf16 x, B, C (fp32 dt, A), H32 P64 S128, one group: b4 L4096 and b1 L16k; against
    mamba_ssm's mamba_chunk_scan_combined (at our chunk size, 64, and at its default, 256) and
    fla-core's chunk_simple_gla (layouts transposed outside
    the timed region), forward and forward+backward. fla gets its queries, keys and log-decays built
    outside the timed region and computes no dt or A gradient: its rows time less work than ours."""
    import torch.nn.functional as F

    from .duality import as_linear_attention, quadratic_form, ssd

    mamba, fla = _mamba_chunk_scan(), _fla_ops()
    h, p, s, g = 32, 64, 128, 1
    rows = []
    for b, length in ([(4, 4096)] if quick else [(4, 4096), (1, 16384)]):
        x = torch.randn(b, h, length, p, device="cuda", dtype=torch.bfloat16)
        dt = F.softplus(torch.randn(b, h, length, device="cuda") - 3.0)
        A = -torch.rand(h, device="cuda") - 0.5
        B, C = (torch.randn(b, g, length, s, device="cuda", dtype=torch.bfloat16) * s**-0.5 for _ in range(2))
        dy = torch.randn_like(x)
        x_t, B_t, C_t, dy_t = (t.transpose(1, 2).contiguous() for t in (x, B, C, dy))  # [b, l, h|g, *]
        dt_t = dt.transpose(1, 2).contiguous()
        # the check, on one head: the kernel against SSD's quadratic (attention) form, an independent route
        want = quadratic_form(x[:1, :1].float(), dt[:1, :1], A[:1], B[:1].float(), C[:1].float())
        got = ssd(x[:1, :1], dt[:1, :1], A[:1], B[:1], C[:1])
        err = (got.float() - want).norm() / want.norm()
        assert err < 2e-2, f"ssd check failed: relative error {err:.2e}"
        impls = {"minikernels": (lambda x, dt, A, B, C: ssd(x, dt, A, B, C), [x, dt, A, B, C], dy)}
        if mamba is not None:  # at our chunk size, and at its own default (Mamba-2's, and the anchors')
            impls["mamba_chunk_scan_combined"] = (
                lambda x, dt, A, B, C: mamba(x, dt, A, B, C, chunk_size=64), [x_t, dt_t, A, B_t, C_t], dy_t)
            impls["mamba_chunk_scan_combined (chunk 256)"] = (
                lambda x, dt, A, B, C: mamba(x, dt, A, B, C, chunk_size=256), [x_t, dt_t, A, B_t, C_t], dy_t)
        if fla:
            q, k, v, gl = as_linear_attention(x, dt, A, B, C)
            q, k, v, gl = (t.transpose(1, 2).contiguous() for t in (q, k, v, gl))
            impls["fla chunk_simple_gla"] = (
                lambda q, k, v, gl: fla["simple_gla"](q, k, v, g=gl, scale=1.0)[0], [q, k, v, gl], dy_t)
        shape = f"b{b} L{length} h{h} p{p} n{s}"
        for impl, (fn, leaves, grad_out) in impls.items():
            for direction in ("fwd", "fwd+bwd"):
                if _skip_fla_gated_bwd(fla, impl, direction, shape):
                    continue
                try:
                    ms, method = _time_fwd_bwd(fn, leaves, grad_out, direction)
                except Exception as exc:
                    print(f"  {impl} {direction} {shape}: failed ({type(exc).__name__}: {str(exc)[:160]})")
                    continue
                rows.append({"impl": impl, "pass": direction, "shape": shape, "dtype": "bfloat16", "ms": ms,
                             "Mtokps": b * length / (ms * 1e-3) / 1e6, "timing": method})
                _progress(rows[-1])
        torch.cuda.empty_cache()
    return rows


def bench_selective_scan(ceilings: dict, quick: bool = False) -> list[dict]:
    """mk.selective_scan forward, B8 D2048 L4096 N16, bf16 u, delta, z, B, C (fp32 A, D, delta_bias),
    against its bandwidth roofline (the bytes of u, delta, B, C, z and y at the measured copy speed),
    the PyTorch reference loop, and the time its B*D*L*N exponentials alone take on this GPU
    (exponentials_ms: with the special-function unit, and as a polynomial); and our forward+backward
    (autograd, every gradient), in GB/s of the bytes both passes must move (the forward's, then u,
    delta, z, B, C and dy read and du, ddelta, dz, dB, dC written). The reference loop's backward is
    not timed: an autograd graph of L steps."""
    from . import reference
    from .scan import selective_scan

    b, d, length, n = (2, 2048, 4096, 16) if quick else (8, 2048, 4096, 16)
    u, delta, z = (torch.randn(b, d, length, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    A = -torch.rand(d, n, device="cuda") - 0.5
    B, C = (torch.randn(b, n, length, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    D, bias = torch.randn(d, device="cuda"), torch.randn(d, device="cuda") * 0.1
    args = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    got = selective_scan(u[:1, :64], delta[:1, :64], A[:64], B[:1], C[:1], D=D[:64], z=z[:1, :64],
                         delta_bias=bias[:64], delta_softplus=True)
    want = reference.selective_scan(u[:1, :64], delta[:1, :64], A[:64], B[:1], C[:1], D=D[:64], z=z[:1, :64],
                                    delta_bias=bias[:64], delta_softplus=True)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 2e-2, f"selective_scan check failed: relative error {err:.2e}"
    n_bytes = 2 * (4 * b * d * length + 2 * b * n * length)  # read u, delta, z, B, C; write y (bf16)
    rows = []
    impls = {"minikernels": lambda: selective_scan(u, delta, A, B, C, **args),
             "reference (PyTorch loop)": lambda: reference.selective_scan(u, delta, A, B, C, **args)}
    for impl, call in impls.items():
        try:
            call()
            ms = _do_bench(call, ms_warmup=5, ms_rep=20) if impl.startswith("reference") else _do_bench(call)
        except Exception as exc:
            print(f"  {impl}: failed ({type(exc).__name__}: {str(exc)[:160]})")
            continue
        gbps = n_bytes / (ms * 1e-3) / 1e9
        rows.append({"impl": impl, "pass": "fwd", "shape": f"B{b} D{d} L{length} N{n}", "dtype": "bfloat16",
                     "ms": ms, "GBps": gbps, "frac_of_copy": gbps / ceilings["copy_GBps"], "timing": "do_bench"})
        _progress(rows[-1])
    # a floor under any forward that takes each decay exp(delta_t A) with the special-function unit:
    # one 2^x per (channel, state, step) triple and nothing else, timed on this GPU; and the same
    # count as a float32-accurate polynomial on the multiply-add units, the alternative
    for impl, polynomial in (("exponentials alone", False), ("exponentials alone, polynomial", True)):
        ms = exponentials_ms(b * d * length * n, polynomial=polynomial)
        rows.append({"impl": impl, "pass": "fwd", "shape": f"B{b} D{d} L{length} N{n}",
                     "dtype": "bfloat16", "ms": ms, "GBps": n_bytes / (ms * 1e-3) / 1e9,
                     "frac_of_copy": n_bytes / (ms * 1e-3) / 1e9 / ceilings["copy_GBps"], "timing": "do_bench"})
        _progress(rows[-1])
    train_bytes = 2 * (11 * b * d * length + 6 * b * n * length)
    try:
        ms, method = _time_fwd_bwd(lambda *t: selective_scan(*t[:5], D=t[5], z=t[6], delta_bias=t[7],
                                                             delta_softplus=True),
                                   [u, delta, A, B, C, D, z, bias], torch.randn_like(u), "fwd+bwd")
    except Exception as exc:
        print(f"  minikernels fwd+bwd: failed ({type(exc).__name__}: {str(exc)[:160]})")
    else:
        gbps = train_bytes / (ms * 1e-3) / 1e9
        rows.append({"impl": "minikernels", "pass": "fwd+bwd", "shape": f"B{b} D{d} L{length} N{n}",
                     "dtype": "bfloat16", "ms": ms, "GBps": gbps, "frac_of_copy": gbps / ceilings["copy_GBps"],
                     "timing": method})
        _progress(rows[-1])
    return rows


def print_table(op: str, rows: list[dict], ceilings: dict) -> None:
    """One line per (pass, dtype, shape): each implementation's rate, then ours relative to the copy
    ceiling (memory-bound ops) and the speedup of ours over each anchor (their time / our time)."""
    metric = next(m for m in ("GBps", "TFLOPs", "Mtokps") if m in rows[0])
    unit = {"GBps": "GB/s of bytes that must move", "TFLOPs": "TFLOP/s", "Mtokps": "million tokens/s"}[metric]
    print(f"\n== {op}: {unit}; copy ceiling {ceilings['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s ==")
    rows = [{"shape": f"{r.get('M')}x{r.get('N')}", **r} for r in rows]  # runs before 'shape' was recorded
    keys = list(dict.fromkeys((r["pass"], r["dtype"], r["shape"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = max(12, *(len(k[2]) for k in keys))
    head = f"{'pass':4} {'dtype':8} {'shape':>{width}} " + " ".join(f"{i:>14}" for i in impls)
    if metric == "GBps":
        head += "  ours/copy"
    head += " " + " ".join(f"{'vs ' + i:>18}" for i in impls[1:])
    print(head)
    for key in keys:
        by = {r["impl"]: r for r in rows if (r["pass"], r["dtype"], r["shape"]) == key}
        line = f"{key[0]:4} {key[1]:8} {key[2]:>{width}} "
        line += " ".join(f"{by[i][metric]:>14.0f}" if i in by else f"{'-':>14}" for i in impls)
        ours = by.get("minikernels")
        if metric == "GBps":
            line += f"  {ours['frac_of_copy']:>9.0%}" if ours else f"  {'-':>9}"
        for i in impls[1:]:
            line += f" {by[i]['ms'] / ours['ms']:>17.2f}x" if ours and i in by else f" {'-':>18}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minikernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--op", default="all", help=f"comma-separated ops among {', '.join(OPS)}, or 'all'")
    parser.add_argument("--json-dir", default=None,
                        help="where <op>.json is written (default: $OUT if set, else the folder "
                             "minikernels.results.recorded_dir() finds)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)

    ops = OPS if args.op == "all" else tuple(o.strip() for o in args.op.split(","))
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; available: {', '.join(OPS)}")
    if _backend.backend() != "cuda":
        print("minikernels.bench needs a CUDA GPU; this machine runs the kernels through Triton's "
              "interpreter, whose timings mean nothing. The recorded H200 results are in book/data/bench/.",
              file=sys.stderr)
        return 2

    json_dir = Path(args.json_dir or os.environ.get("OUT") or recorded_dir())
    json_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    ceilings = measure_ceilings()
    print(f"copy {ceilings['copy_GBps']:.0f} GB/s (1 GiB, read + write), "
          f"bf16 matmul {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s (8192^3)")
    runners = {"softmax": bench_softmax, "flash": bench_flash, "decode": bench_decode, "sparse": bench_sparse,
               "linear": bench_linear, "crossover": bench_crossover, "ssd": bench_ssd,
               "selective_scan": bench_selective_scan}
    for op in ops:
        rows = runners[op](ceilings, quick=args.quick)
        path = json_dir / f"{op}.json"
        path.write_text(json.dumps({"op": op, **env, "ceilings": ceilings, "rows": rows}, indent=1) + "\n")
        print_table(op, rows, ceilings)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
