"""Benchmark of chapter 5's decoding kernels: ``mk.decode_attention`` on a dense, a paged and an int8
cache, against cuDNN (SDPA) on the dense cache, FlexAttention on the dense and the paged cache, and
FlashInfer's paged decode where it is installed; and ``plot_paged_decode``, the figure of a recorded run.

One query row per sequence, bf16 queries, B = 8 sequences of H = 32 query heads over Hkv = 8 (grouped
queries) or 32 kv heads, D = 128, every cache full to length L. The pages of a sequence are scattered
over the pool in random order, as a serving engine's pages end up after requests come and go. A row's
GB/s counts the bytes that must be read: K and V (and, for int8, the float32 scales); paging's table
(4 bytes a page) is not counted, so paged and dense rows of one shape divide the same bytes.
"""

from __future__ import annotations

import statistics

import torch

from .common import time_rotating

B, H, D = 8, 32, 128
OURS = "minikernels"
DEVICE = "cuda"
# ours and FlashInfer on the same pages, the comparison with the finest margin, are timed in turns over this
# many rounds (each a median of CUDA-graph replays); the other cases once
PAIRED_ROUNDS = 3


def _page_table(batch: int, per: int, seed: int, device) -> torch.Tensor:
    """A block table ``[batch, per]`` int32: the pages of a pool of ``batch * per`` in random order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(batch * per, generator=g).view(batch, per).to(device=device, dtype=torch.int32)


def _pool(dense: torch.Tensor, page_size: int, table: torch.Tensor) -> torch.Tensor:
    """``dense [B, Hkv, L, *rest]`` as a pool ``[B * L / page_size, page_size, Hkv, *rest]`` whose pages lie
    where ``table`` says. Scales (no ``rest``) are stored head-major within a page, as ``PagedKVCache``
    stores them."""
    b, hkv, n = dense.shape[:3]
    per = n // page_size
    if dense.dim() == 3:
        pool = torch.empty((b * per, hkv, page_size), dtype=dense.dtype, device=dense.device).transpose(1, 2)
    else:
        pool = torch.empty((b * per, page_size, hkv, *dense.shape[3:]), dtype=dense.dtype, device=dense.device)
    pool[table.flatten().long()] = dense.unflatten(2, (per, page_size)).movedim(1, 3).flatten(0, 1)
    return pool


def _pages(dense: torch.Tensor, page_size: int, seed: int):
    """``dense`` as a pool (``_pool``) and its block table, the pages in random order (``seed``)."""
    table = _page_table(dense.shape[0], dense.shape[2] // page_size, seed, dense.device)
    return _pool(dense, page_size, table), table


def paged_pools(page_size: int, *dense: torch.Tensor):
    """The block table of pages of ``page_size`` tokens in random order (seeded by the page size) and,
    for each tensor of ``dense`` (one cache: keys, values, codes, scales, all ``[B, Hkv, L, ...]``), its
    pool laid out by that one table."""
    table = _page_table(dense[0].shape[0], dense[0].shape[2] // page_size, page_size, dense[0].device)
    return table, tuple(_pool(t, page_size, table) for t in dense)


def _flex_dense():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, enable_gqa=True)  # no mask: every cache is full


def _flex_paged(table: torch.Tensor, num_pages: int, page_size: int):
    """FlexAttention over the page pool viewed as one long sequence ``[1, Hkv, num_pages * page_size, D]``:
    a block mask whose KV blocks are pages lists, for each sequence, its pages as full blocks (how
    torch's experimental PagedAttention maps logical blocks to physical pages)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, per = table.shape
    # the index lists are as wide as the pool (BlockMask sizes its dense form by their width)
    pages = torch.zeros(b, 1, 1, num_pages, dtype=torch.int32, device=table.device)
    pages[:, 0, 0, :per] = table
    none = torch.zeros(b, 1, 1, dtype=torch.int32, device=table.device)
    mask = BlockMask.from_kv_blocks(none, torch.zeros_like(pages), torch.full_like(none, per), pages,
                                    BLOCK_SIZE=(128, page_size), seq_lengths=(1, num_pages * page_size))
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k_pool, v_pool):  # [P, page, Hkv, D] -> [1, Hkv, P * page, D]
        k, v = (t.flatten(0, 1).transpose(0, 1)[None] for t in (k_pool, v_pool))
        return compiled(q, k, v, block_mask=mask, enable_gqa=True)
    return run


def _flashinfer_paged(table: torch.Tensor, page_size: int, hkv: int, layout: str = "NHD", enable_pdl=None):
    """FlashInfer's batch decode over the same pool, planned once: ``layout`` "NHD" is our
    ``[num_pages, page_size, Hkv, D]``, "HND" the head-major ``[num_pages, Hkv, page_size, D]``.
    ``enable_pdl``: FlashInfer's own switch for programmatic dependent launch (None: its default, on
    for Hopper and later)."""
    import flashinfer

    b, per = table.shape
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=table.device)
    # tensor cores pay off once several query heads share a kv head (FlashInfer's own advice)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, layout, use_tensor_cores=H // hkv >= 4)
    indptr = torch.arange(0, b * per + 1, per, dtype=torch.int32, device=table.device)
    last = torch.full((b,), page_size, dtype=torch.int32, device=table.device)
    wrapper.plan(indptr, table.flatten().contiguous(), last, H, hkv, D, page_size, q_data_type=torch.bfloat16,
                 kv_data_type=torch.bfloat16)
    launch = {} if enable_pdl is None else {"enable_pdl": enable_pdl}  # (older FlashInfer: no such argument)
    return lambda q, k_pool, v_pool: wrapper.run(q[:, :, 0], (k_pool, v_pool), **launch)[:, :, None]


def bench_paged_decode(ceilings: dict, quick: bool = False) -> list[dict]:
    """Per (Hkv, L): ``minikernels`` (the dense cache), ``minikernels paged<P>`` for page sizes P of 16
    and 128, ``minikernels int8`` (dense) and ``minikernels int8 paged<P>``, ``sdpa-cudnn`` and ``flex``
    on the dense cache, ``flex paged<P>`` and ``flashinfer paged<P>`` on the pool, and ``minikernels paged<P>
    head-major``, ``minikernels int8 paged<P> head-major`` and ``flashinfer paged<P> head-major`` on the same
    pages stored ``[num_pages, Hkv, page_size, D]`` (PagedKVCache's int8 layout). Every output is checked
    against ours on the dense cache before it is timed. At the longest L, int8 also runs with 64-key
    blocks (``minikernels int8 BLOCK_N=64``; the default takes 128), a study of that choice. Rows carry
    ``speed_vs_dense`` (paged: the dense time over this one), ``speed_vs_bf16`` (int8: the 16-bit
    kernel's time on the same layout over this one), ``speed_vs_flashinfer`` (paged: FlashInfer's time on
    the same pages over this one) and ``speed_vs_best_anchor`` (ours: the fastest anchor of the shape,
    cuDNN on the dense cache included, over this one). Ours and FlashInfer on the same pages are timed in
    turn over ``PAIRED_ROUNDS`` rounds: their rows' ``ms`` is the median, ``ms_rounds`` every round. One
    buffer set a shape: the smallest cache (134 MB) is more than twice the L2 of an H100 or H200."""
    torch._dynamo.config.recompile_limit = 64  # one compile per shape and mask; never a silent eager fallback
    rows = []
    lengths = [16384, 65536] if quick else [4096, 16384, 65536]
    for hkv in (8, 32):
        for length in lengths:
            _bench_shape(hkv, length, length == lengths[-1], ceilings, rows)
            torch.cuda.empty_cache()
    _ratios(rows)
    return rows


def decode_inputs(hkv: int, length: int, device=DEVICE) -> dict:
    """The inputs of one decode shape (B8 H32 D128, bf16, every cache full to ``length``), the same for
    the benchmark and the sweeps under ``book/data/bench/runs/``: ``q``, ``k``, ``v`` (dense
    ``[B, Hkv, L, D]``), ``lens``, their int8 form ``kq``, ``ks``, ``vq``, ``vs``, and the bytes a decode step
    reads, ``kv_bytes`` (bf16) and ``int8_bytes`` (codes and scales)."""
    from ..kv_cache import quantize_int8

    g = torch.Generator(device=device).manual_seed(length + hkv)
    q = torch.randn(B, H, 1, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, hkv, length, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, hkv, length, D, device=device, dtype=torch.bfloat16, generator=g)
    (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
    return {"q": q, "k": k, "v": v, "lens": torch.full((B,), length, dtype=torch.int32, device=device),
            "kq": kq, "ks": ks, "vq": vq, "vs": vs,
            "kv_bytes": 2 * k.numel() * 2, "int8_bytes": 2 * k.numel() + 2 * ks.numel() * 4}


def _bench_shape(hkv: int, length: int, longest: bool, ceilings: dict, rows: list[dict]) -> None:
    from .. import planning
    from ..decode import decode_attention

    shape = f"B{B} H{H} Hkv{hkv} D{D} L{length}"
    x = decode_inputs(hkv, length)
    q, k, v, lens, kq, ks, vq, vs = (x[n] for n in ("q", "k", "v", "lens", "kq", "ks", "vq", "vs"))
    kv_bytes, int8_bytes = x["kv_bytes"], x["int8_bytes"]
    want = decode_attention(q, k, v, lens).float()
    # (impl, call, bytes, the relative difference from ours on the dense cache it may have)
    cases = [(OURS, lambda: decode_attention(q, k, v, lens), kv_bytes, 1e-3),
             ("minikernels int8", lambda: decode_attention(q, kq, vq, lens, k_scale=ks, v_scale=vs), int8_bytes, 5e-2),
             ("sdpa-cudnn", lambda: _gqa_sdpa(q, k, v), kv_bytes, 2e-2),
             ("flex", _lazy(_flex_dense, k, v, q), kv_bytes, 2e-2)]
    if longest:
        narrow = {"decode.split_int8": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}}
        cases.append(("minikernels int8 BLOCK_N=64",
                      lambda: _with(planning, narrow, decode_attention, q, kq, vq, lens, k_scale=ks, v_scale=vs),
                      int8_bytes, 5e-2))
    _run(cases, want, shape, hkv, length, ceilings, rows)
    # one page size at a time: at 64k with Hkv = 32 the pools take 13 GB, 26 GB with their head-major copies
    for page in (16, 128):
        dense = {"k": k, "v": v, "kq": kq, "vq": vq, "ks": ks, "vs": vs}
        _bench_pages(q, dense, lens, page, want, shape, (kv_bytes, int8_bytes), ceilings, rows)
        torch.cuda.empty_cache()


def _bench_pages(q, dense: dict, lens, page: int, want, shape: str, n_bytes: tuple, ceilings: dict, rows) -> None:
    from ..decode import decode_attention

    hkv, length = dense["k"].shape[1], dense["k"].shape[2]
    table, (kp, vp, kq, vq, ks, vs) = paged_pools(page, *(dense[name] for name in ("k", "v", "kq", "vq", "ks", "vs")))
    kv_bytes, int8_bytes = n_bytes
    # the paged and the dense call may split the keys differently (a planning override, a recorded rule's
    # run): partials merged in another order, rounded to bf16 at the end (~3e-3 relative at 64k)
    ours = (f"minikernels paged{page}", lambda: decode_attention(q, kp, vp, lens, block_table=table), kv_bytes, 1e-2)
    flashinfer = (f"flashinfer paged{page}", _lazy(lambda: _flashinfer_paged(table, page, hkv), kp, vp, q), kv_bytes,
                  2e-2)
    _run([ours, flashinfer], want, shape, hkv, length, ceilings, rows, rounds=PAIRED_ROUNDS)
    cases = [
        (f"minikernels int8 paged{page}",
         lambda: decode_attention(q, kq, vq, lens, block_table=table, k_scale=ks, v_scale=vs), int8_bytes, 5e-2),
        (f"flex paged{page}", _lazy(lambda: _flex_paged(table, kp.shape[0], page), kp, vp, q), kv_bytes, 2e-2),
    ]
    _run(cases, want, shape, hkv, length, ceilings, rows)
    del cases  # its FlexAttention call holds the token-major pools: freed before the head-major copies are timed
    # the same pages stored head-major ([num_pages, Hkv, page_size, D]; ours reads them through the
    # transposed view, FlashInfer through its "HND" layout): int8 codes, as PagedKVCache stores them, and bf16
    kp, vp, kq, vq = (t.transpose(1, 2).contiguous() for t in (kp, vp, kq, vq))
    hm = " head-major"
    ours = (f"minikernels paged{page}{hm}",
            lambda: decode_attention(q, kp.transpose(1, 2), vp.transpose(1, 2), lens, block_table=table), kv_bytes,
            1e-2)
    flashinfer = (f"flashinfer paged{page}{hm}", _lazy(lambda: _flashinfer_paged(table, page, hkv, "HND"), kp, vp, q),
                  kv_bytes, 2e-2)
    _run([ours, flashinfer], want, shape, hkv, length, ceilings, rows, rounds=PAIRED_ROUNDS)
    int8 = (f"minikernels int8 paged{page}{hm}",
            lambda: decode_attention(q, kq.transpose(1, 2), vq.transpose(1, 2), lens, block_table=table, k_scale=ks,
                                     v_scale=vs), int8_bytes, 5e-2)
    _run([int8], want, shape, hkv, length, ceilings, rows)


def _run(cases, want, shape, hkv, length, ceilings, rows, rounds: int = 1, timer=time_rotating) -> None:
    """Check each case's output against ``want`` (ours on the dense cache), then time the cases that passed
    and append their rows. With ``rounds`` > 1 the cases are timed in turn, round after round (A B A B ...),
    so that a drift of the GPU during the call (its clock, its temperature) falls on each of them alike; a
    row's ``ms`` is the median of its rounds and ``ms_rounds`` keeps them all, so a reader can tell a gap
    between two cases from the spread of one."""
    checked = []
    for impl, call, n_bytes, tol in cases:
        try:
            got = call().float()  # builds, compiles and warms up outside the timed region
            err = ((got - want).norm() / want.norm()).item()
            if not err <= tol:
                raise AssertionError(f"differs from ours on the dense cache by {err:.2e} (relative; allowed {tol})")
        except Exception as exc:  # an anchor that fails (or is not installed) is reported, not fatal
            print(f"  {impl} {shape}: failed ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        checked.append((impl, call, n_bytes))
    times = {impl: [] for impl, _, _ in checked}
    methods, failed = {impl: [] for impl, _, _ in checked}, set()
    for _ in range(rounds):
        for impl, call, _ in checked:
            if impl in failed:
                continue
            try:
                ms, method = timer([call])
            except Exception as exc:  # even the plain timing failed (time_rotating falls back to it): dropped
                print(f"  {impl} {shape}: failed while timed ({type(exc).__name__}: {str(exc)[:200]})")
                failed.add(impl)
                continue
            times[impl].append(ms)
            methods[impl].append(method)
    for impl, _, n_bytes in checked:
        if impl in failed:
            continue
        ms = statistics.median(times[impl])
        gbps = n_bytes / (ms * 1e-3) / 1e9
        row = {"impl": impl, "pass": "fwd", "shape": shape, "Hkv": hkv, "L": length, "dtype": "bfloat16",
               "cache": "int8" if "int8" in impl else "bfloat16", "ms": ms, "GBps": gbps,
               "frac_of_copy": gbps / ceilings["copy_GBps"], "timing": "+".join(dict.fromkeys(methods[impl]))}
        spread = ""
        if rounds > 1:
            row["ms_rounds"] = times[impl]
            spread = f" (rounds {min(times[impl]):.4f}-{max(times[impl]):.4f} ms)"
        rows.append(row)
        print(f"  {impl} {shape}: {ms:.4f} ms{spread}, {gbps:.0f} GB/s", flush=True)


def _gqa_sdpa(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _with(planning, choices, fn, *args, **kwargs):
    with planning.override(choices):
        return fn(*args, **kwargs)


def _lazy(build, k, v, q):
    """A call that builds its anchor (plan, block mask, compile) on first use, so that an anchor that
    cannot be built fails inside the benchmark's try, like one that fails to run."""
    state = {}

    def call():
        if "fn" not in state:
            state["fn"] = build()
        return state["fn"](q, k, v)
    return call


def _ratios(rows: list[dict]) -> None:
    """Add the speed ratios to the rows (within one shape) and print them against the targets."""
    anchors = ("sdpa-cudnn", "flex", "flex paged", "flashinfer paged")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        by = {r["impl"]: r for r in rows if r["shape"] == shape}
        best = min((r["ms"] for i, r in by.items() if i.startswith(anchors)), default=None)
        for impl, r in by.items():
            if not impl.startswith(OURS):
                continue
            if best is not None:
                r["speed_vs_best_anchor"] = best / r["ms"]
            layout = impl.removeprefix(OURS).replace(" int8", "").strip()  # "" (dense), "paged16", ...
            dense = f"{OURS} int8" if "int8" in impl else OURS  # the same cache, not paged
            if "paged" in impl and dense in by:
                r["speed_vs_dense"] = by[dense]["ms"] / r["ms"]
            flashinfer = by.get(f"flashinfer {layout}") if "paged" in impl else None
            if flashinfer is not None:  # the same pool and pages
                r["speed_vs_flashinfer"] = flashinfer["ms"] / r["ms"]
            if "int8" in impl and "BLOCK_N" not in impl:
                bf16 = by.get(f"{OURS} {layout}".strip())
                if bf16 is not None:
                    r["speed_vs_bf16"] = bf16["ms"] / r["ms"]
            notes = [f"{key} {r[key]:.2f}" for key in ("speed_vs_dense", "speed_vs_bf16", "speed_vs_flashinfer",
                                                         "speed_vs_best_anchor") if key in r]
            if notes:
                print(f"  {shape} {impl}: " + ", ".join(notes))
    print("  targets: paged speed_vs_dense >= 0.9; paged speed_vs_flashinfer >= 1 (without FlashInfer: "
          "speed_vs_best_anchor >= 1); int8 speed_vs_bf16 >= 1.6 at the longest L")


def plot_paged_decode(record: dict | None = None, hkv: int = 8, ax=None):
    """GB/s of the cache read against the cache length L for every implementation of a recorded
    ``paged_decode`` run (default: ``minikernels.results.recorded("paged_decode")``), for ``hkv`` kv
    heads, on ``ax`` (default: a new figure); the copy bandwidth of the run as a line. Returns the axes."""
    import matplotlib.pyplot as plt

    if record is None:
        from ..results import recorded

        record = recorded("paged_decode")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    rows = [r for r in record["rows"] if r["Hkv"] == hkv]
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = sorted((r["L"], r["GBps"]) for r in rows if r["impl"] == impl)
        style = "-o" if impl.startswith(OURS) else "--s"
        ax.plot([x for x, _ in mine], [y for _, y in mine], style, label=impl, markersize=4)
    ax.axhline(record["ceilings"]["copy_GBps"], color="gray", lw=1, ls=":", label="copy bandwidth")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache length L (tokens)")
    ax.set_ylabel("GB/s of K and V (and scales) read")
    ax.set_title(f"decode, B{B} H{H} Hkv{hkv} D{D}, bf16 queries ({record['gpu']}, {record['date']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return ax
