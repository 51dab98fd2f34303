"""Benchmarks of the softmax and attention family: softmax, flash attention, decoding, block-sparse
attention, against PyTorch's SDPA back ends, FlexAttention and torch.compile."""

from __future__ import annotations

import time

import torch

from .common import do_bench, do_bench_graph, n_buffer_sets, time_rotating


def bench_softmax(ceilings: dict, quick: bool = False) -> list[dict]:
    from .. import row_softmax

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
            ys = [row_softmax.launch_forward_2d(x) for x in xs]
            # the benchmark checks what it times
            torch.testing.assert_close(ys[0].float(), torch.softmax(xs[0].float(), -1), atol=2e-2, rtol=0)
            fwd_bytes = 2 * m * n * elt  # read x, write y
            bwd_bytes = 3 * m * n * elt  # read y and dy, write dx
            candidates = [
                ("minikernels", "fwd", fwd_bytes, [lambda x=x: row_softmax.launch_forward_2d(x) for x in xs]),
                ("torch.softmax", "fwd", fwd_bytes, [lambda x=x: torch.softmax(x, dim=-1) for x in xs]),
                ("torch.compile", "fwd", fwd_bytes, [lambda x=x: compiled(x) for x in xs]),
                ("minikernels", "bwd", bwd_bytes,
                 [lambda y=y, dy=dy: row_softmax.launch_backward_2d(y, dy) for y, dy in zip(ys, dys)]),
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


def sdpa(backend_name: str):
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
    from .. import flash

    if impl == "minikernels" and direction == "fwd":
        call = lambda: flash.launch_forward(q, k, v, causal, scale)
    elif impl == "minikernels":
        call = lambda: flash.launch_backward(q, k, v, ours_o, ours_lse, do, causal, scale)
    elif direction == "fwd":
        call = lambda: fn(q, k, v, causal)
    else:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qg, kg, vg, causal)
        call = lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)
    call()  # compile and warm up outside the timed region
    if direction == "fwd":
        return time_rotating([call])
    return do_bench(call), "do_bench"  # long kernels: the host's launch time is a small part of them


def bench_flash(ceilings: dict, quick: bool = False, with_flex: bool = True) -> list[dict]:
    """Shapes of the issue: B*N = 16k tokens, H*D = 2048, bf16; forward and backward. FlexAttention
    (compiled, one compile per shape) on the dense causal D=128 shapes with N >= 4096."""
    from .. import flash

    rows = []
    lengths = [4096] if quick else [1024, 4096, 16384]
    for d in (64, 128):
        h = 2048 // d
        for n in lengths:
            b = 16384 // n
            for causal in (False, True):
                q, k, v, do = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                scale = d**-0.5
                ours_o, ours_lse = flash.launch_forward(q, k, v, causal, scale)
                want = sdpa("MATH")(q[:1].float(), k[:1].float(), v[:1].float(), causal)
                torch.testing.assert_close(ours_o[:1].float(), want, atol=2e-2, rtol=0)  # check what is timed
                impls = {"minikernels": None, "sdpa-flash": sdpa("FLASH_ATTENTION"),
                         "sdpa-cudnn": sdpa("CUDNN_ATTENTION")}
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


def bench_decode(ceilings: dict, quick: bool = False) -> list[dict]:
    """B8 H32 D128, one query row, bf16, the cache full to length L; bytes = the K and V read."""
    from ..decode import decode_attention

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
        want = sdpa("MATH")(qs[0].float(), ks[0].float(), vs[0].float(), False)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)
        impls = {
            "minikernels": lambda q, k, v, lens=lens: decode_attention(q, k, v, lens),
            "sdpa-flash": lambda q, k, v: sdpa("FLASH_ATTENTION")(q, k, v, False),
            "sdpa-cudnn": lambda q, k, v: sdpa("CUDNN_ATTENTION")(q, k, v, False),
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
    return do_bench(call)


def bench_sparse(ceilings: dict, quick: bool = False) -> list[dict]:
    """B1 H16 N16k D128 bf16: sliding window 1024 and one-in-eight 128-blocks + diagonal; ours and
    compiled FlexAttention with the same mask, forward and backward; our dense causal run for the
    density ratio; XAttention's estimation against the sparse attention it selects for."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from .. import block_sparse, masks
    from ..flash import flash_attention

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
        est_ms = do_bench_graph(estimate)
        est_one_ms = do_bench(estimate)
        start = time.perf_counter()
        bm = masks.xattention(q, k, stride=stride, threshold=0.9, block_size=bs)
        torch.cuda.synchronize()
        build_ms = (time.perf_counter() - start) * 1e3
        attend = lambda m=bm: block_sparse.block_sparse_attention(q, k, v, m)
        attend()
        att_ms = do_bench_graph(attend)
        att_one_ms = do_bench(attend)
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


def mixed_lengths(total: int = 16384, lo: int = 256, hi: int = 4096, seed: int = 0) -> list[int]:
    """Sequence lengths drawn uniformly from [lo, hi] (seeded) that sum to ``total``, each within [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], total
    while left > hi:
        n = int(torch.randint(lo, min(hi, left - lo) + 1, (1,), generator=g))
        lengths.append(n)
        left -= n
    return lengths + [left]


def _flex_documents(lengths: list[int]):
    """Compiled FlexAttention over the packed tokens [1, H, total, D] with a causal document mask:
    a query sees the keys of its own sequence up to itself."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda"))
    total = sum(lengths)
    mask = create_block_mask(lambda b, h, i, j: (doc[i] == doc[j]) & (j <= i), None, None, total, total,
                             device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def _flash_attn_varlen():
    """FlashAttention's own varlen function if installed (FA4's CuTe DSL build, else FA2), or None."""
    for module in ("flash_attn.cute", "flash_attn"):
        try:
            return __import__(module, fromlist=["flash_attn_varlen_func"]).flash_attn_varlen_func
        except Exception:  # not installed, or installed without its compiled part
            continue
    return None


def _through_autograd(fn, inputs, grad):
    """(forward, forward + backward) calls of an op differentiated by autograd."""
    def forward_backward():
        leaves = [t.detach().requires_grad_() for t in inputs]
        return torch.autograd.grad(fn(*leaves), leaves, grad)
    return (lambda: fn(*inputs)), forward_backward


def _bench_varlen_layout(name: str, lengths: list[int], h: int, d: int) -> list[dict]:
    """One packed layout: ours, mk.flash_attention on the same tokens, and the anchors (see bench_varlen)."""
    from .. import flash, varlen

    total, scale, longest = sum(lengths), d**-0.5, max(lengths)
    print(f"  varlen {name}, D{d}: {len(lengths)} sequences {lengths}", flush=True)
    q, k, v, do = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    o, lse = varlen.launch_forward(q, k, v, cu, cu, longest, longest, True, scale)
    pieces = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    per_seq = [tuple(t[a:b].transpose(0, 1)[None] for t in (q, k, v, do)) for a, b in pieces]  # [1, H, n, D] views
    seq_out = [flash.launch_forward(qs, ks, vs, True, scale) for qs, ks, vs, _ in per_seq]
    for (a, b), (os_, _) in zip(pieces, seq_out):  # the benchmark checks what it times
        torch.testing.assert_close(o[a:b].float(), os_[0].transpose(0, 1).float(), atol=2e-2, rtol=0)

    ours = {"minikernels": (
        lambda: varlen.launch_forward(q, k, v, cu, cu, longest, longest, True, scale),
        lambda: varlen.launch_backward(q, k, v, o, lse, do, cu, cu, longest, longest, True, scale))}
    anchors = {}
    if len(set(lengths)) == 1:  # (a): one flash launch over the batch [B, H, N, D], a view of the same tokens
        dq_, dk_, dv_, ddo = (t.view(len(lengths), longest, h, d).transpose(1, 2) for t in (q, k, v, do))
        fo, fl = flash.launch_forward(dq_, dk_, dv_, True, scale)
        ours["mk.flash_attention"] = (lambda: flash.launch_forward(dq_, dk_, dv_, True, scale),
                                      lambda: flash.launch_backward(dq_, dk_, dv_, fo, fl, ddo, True, scale))
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):  # SDPA takes equal lengths only
            run = sdpa(backend)
            anchors[f"sdpa-{backend.split('_')[0].lower()}"] = _through_autograd(
                lambda q_, k_, v_, run=run: run(q_, k_, v_, True), [t.contiguous() for t in (dq_, dk_, dv_)],
                ddo.contiguous())
    else:  # (b): one flash launch per sequence (the same work), and one padded batch (the work varlen saves)
        ours["mk.flash_attention"] = (
            lambda: [flash.launch_forward(qs, ks, vs, True, scale) for qs, ks, vs, _ in per_seq],
            lambda: [flash.launch_backward(qs, ks, vs, os_, ls, dos, True, scale)
                     for (qs, ks, vs, dos), (os_, ls) in zip(per_seq, seq_out)])
        pad = [torch.zeros(len(lengths), h, longest, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        po, pl = flash.launch_forward(*pad[:3], True, scale)
        ours["mk.flash padded"] = (lambda: flash.launch_forward(*pad[:3], True, scale),
                                   lambda: flash.launch_backward(*pad[:3], po, pl, pad[3], True, scale))
    try:
        flex = _flex_documents(lengths)
        heads = [t.transpose(0, 1)[None].contiguous() for t in (q, k, v, do)]  # [1, H, total, D]
        got = flex(*(t[:, :1] for t in heads[:3]))
        torch.testing.assert_close(got[0, 0].float(), o[:, 0].float(), atol=2e-2, rtol=0)  # the same attention
        anchors["flex (compiled)"] = _through_autograd(flex, heads[:3], heads[3])
    except Exception as exc:
        print(f"  flex {name} D{d}: unavailable ({type(exc).__name__}: {str(exc)[:200]})")
    fa_varlen = _flash_attn_varlen()
    if fa_varlen is not None:
        def fa(q_, k_, v_):
            out = fa_varlen(q_, k_, v_, cu, cu, longest, longest, softmax_scale=scale, causal=True)
            return out[0] if isinstance(out, tuple) else out
        anchors["flash_attn varlen"] = _through_autograd(fa, [q, k, v], do)

    real_fwd = sum(attention_flops(1, h, n, n, d, True, "fwd") for n in lengths)  # no padding counted
    shape = f"{name} H{h} D{d} causal"
    rows = []
    for impl, (fwd, fwd_bwd) in {**ours, **anchors}.items():
        if impl in ours:  # launch functions: forward, then the backward from the saved output
            fwd_bwd = lambda fwd=fwd, bwd=fwd_bwd: (fwd(), bwd())  # noqa: E731
        for direction, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            try:
                call()  # compile and warm up outside the timed region
                ms = do_bench(call)
            except Exception as exc:  # an anchor that fails is reported, not fatal
                print(f"  {impl} {direction} {shape}: failed ({type(exc).__name__}: {str(exc)[:200]})")
                continue
            flops = real_fwd * (1.0 if direction == "fwd" else 3.5)
            rows.append({"impl": impl, "pass": direction, "shape": shape, "H": h, "D": d, "causal": True,
                         "lengths": lengths, "tokens": total, "dtype": "bfloat16", "ms": ms,
                         "TFLOPs": flops / (ms * 1e-3) / 1e12, "timing": "do_bench"})
    for direction in ("fwd", "fwd+bwd"):  # the target; the ratio is not stored (rows hold measurements only)
        by = {r["impl"]: r for r in rows if r["pass"] == direction}
        if "minikernels" in by and "mk.flash_attention" in by:
            ratio = by["minikernels"]["TFLOPs"] / by["mk.flash_attention"]["TFLOPs"]
            print(f"  {shape} {direction}: varlen {by['minikernels']['TFLOPs']:.0f} TFLOP/s, {ratio:.2f}x "
                  f"mk.flash_attention on the same tokens (target >= 0.9)", flush=True)
    return rows


def bench_varlen(ceilings: dict, quick: bool = False) -> list[dict]:
    """Packed variable-length attention, bf16, H16, 16k tokens, causal: (a) 4 sequences of 4k, (b) mixed
    lengths drawn in 256..4k; forward, and forward + backward, TFLOP/s on the real FLOPs (the sum over
    sequences of each one's causal attention). Beside ours: mk.flash_attention on the same tokens
    (B4 x 4k in one launch for (a); one launch per sequence for (b), and one padded batch), SDPA on (a),
    compiled FlexAttention with a causal document mask, and flash_attn_varlen_func if installed."""
    torch._dynamo.config.recompile_limit = 64  # flex: a fresh compile per layout, head dim and pass
    rows = []
    for d in ((128,) if quick else (128, 64)):
        for name, lengths in (("4x4096", [4096] * 4), ("mixed 256..4k", mixed_lengths(16384))):
            rows += _bench_varlen_layout(name, lengths, 16, d)
            torch.cuda.empty_cache()
    return rows
