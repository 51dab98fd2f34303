"""Chapter 1: decoding attention with split-KV (Flash-Decoding; Lean Attention).

At decode time each sequence brings one (or a few) new query rows and attends to a KV cache of L
positions. Per (batch, kv head) the kernel reads 2*L*D cache elements and does ~4*L*D FLOPs per
query row: about one FLOP per byte, far below the ridge point, so the time is the cache read and
the goal is the copy bandwidth. One program per (batch, head) would leave most of the GPU idle when
B*H is small and L is long, so the cache is cut into ``num_splits`` ranges processed in parallel:

  1. each split s computes a partial result over its keys: (m_s, l_s, o_s) with o_s normalised;
  2. a merge combines them with the online-softmax rule of chapter 0,
        lse_s = m_s + log l_s,   o = sum_s exp(lse_s - lse) o_s,   lse = log sum_s exp(lse_s).

All query heads of a grouped-query group are processed by the same program, so each k/v head is
read once, not once per query head. Forward only.

Chapter 5 adds two layouts of the same cache to the same kernel (compile-time switches):

* paged (``block_table``): the cache is a pool of fixed-size pages ``[num_pages, page_size, Hkv, D]``
  and a table maps each sequence's logical pages to physical ones (vLLM's PagedAttention), so a
  serving engine allocates memory a page at a time instead of reserving Nmax per sequence. The kernel
  looks each key's page up in the table and reads the same bytes as the dense kernel, plus 4 per key.
* int8 (``k_scale``, ``v_scale``): the cache holds int8 codes and one float32 scale per (key, kv
  head), half the bytes of a 16-bit cache. The scales fold into the logits and the probabilities
  (q (s k) = s (q k), p (s v) = (p s) v), so the codes go to the matrix products as they are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import planning
from ._alloc import empty
from ._backend import capability, dot_options, is_interpreter, on_device_of
from ._common import (
    LOG2E,
    MAX_GRID_YZ,
    TF32_FALLBACK,
    batch_slices,
    compute_dtype,
    fit_shared_memory,
    head_dim_pad,
    launch_fitting,
    online_softmax_step,
    shared_memory_limit,
    sm_count,
    smem_estimate,
    split_operands,
)
from ._validate import (
    KERNEL_DTYPES,
    MAX_HEAD_DIM,
    check_attention_inputs,
    check_same_device,
    check_scale,
    check_tensor,
    element_span,
    int32_addressable,
    int32_limit,
)

try:  # programmatic dependent launch (Triton >= 3.3)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

MAX_SPLITS = 64
PROGRAMS_PER_SM = 3  # split programs an SM holds at once (shared memory; int8: its register cap, _register_cap)
PLANNED_PER_SM_16BIT = 2  # the split count's target for a 16-bit cache: one wave of two programs an SM
REGISTERS_PER_SM = 65536  # 32-bit registers of an SM (every NVIDIA GPU from Kepler to Hopper)


@triton.jit
def _softmax_step_scaled_values(acc, l_i, m_i, s, v, v_scale, DOT_PREC: tl.constexpr):
    """``_common.online_softmax_step`` for a quantized cache: the values are codes ``v`` with one scale
    per key (``v_scale`` [COLS]), so ``p (v * scale) = (p * scale) v`` folds the scales into the
    probabilities before the product (the running sum ``l`` still adds the unscaled ``p``). The scales
    go in relative to the block's largest, which multiplies the product after it: small values (scales
    ~1e-6) would otherwise push ``p * scale`` into float16's subnormals, losing its digits."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw no key yet: 2^(-inf) = 0, not NaN
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_max = tl.max(v_scale, axis=0)
    v_max = tl.where(v_max == 0.0, 1.0, v_max)  # every scale 0 (zero values, masked keys): the product is 0
    pv = tl.dot((p * (v_scale / v_max)[None, :]).to(v.dtype), v, input_precision=DOT_PREC)
    acc = acc * alpha[:, None] + v_max * pv
    return acc, l_i, m_new


@triton.jit
def _pages_of_block(table_row, stride_tp, start, hi, offs_n, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                    QUANTIZED: tl.constexpr):
    """The pages holding the keys [start, start + BLOCK_N) of a sequence whose table row is ``table_row``:
    one entry when the page size is a multiple of BLOCK_N (blocks start at multiples of BLOCK_N, so each
    lies in one page) and the cache is 16-bit, else one per key. Only entries of pages that start below
    ``hi`` are read (0 for the others): the sequence's own pages, as ``hi`` never passes its length. The
    mask is by page, not by key, so it is the same for every key of a page. An int8 cache takes one entry
    per key whatever the page size: on an H100 at 64k keys and 128-token pages that read 3-12% faster
    than one entry per block (book/notes/kv_cache.md)."""
    if PAGE_SIZE % BLOCK_N == 0 and not QUANTIZED:
        page = tl.load(table_row + (start // PAGE_SIZE) * stride_tp, mask=start < hi, other=0)
    else:
        index = (start + offs_n) // PAGE_SIZE
        page = tl.load(table_row + index * stride_tp, mask=index * PAGE_SIZE < hi, other=0)
    return page


@triton.jit
def _decode_split(Q, K, V, SEQLENS, LEFTPAD, O_PART, LSE_PART, BLOCK_TABLE, K_SCALE, V_SCALE,
                  stride_qb, stride_qh, stride_qn, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,
                  stride_tb, stride_tp, num_pages,
                  HKV, GROUP, NQ, D, NMAX, split_len, n_splits, qk_scale,
                  CAUSAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  DOT_PREC: tl.constexpr, PAGE_SIZE: tl.constexpr, QUANTIZED: tl.constexpr,
                  HAS_LEFTPAD: tl.constexpr, HAS_LENGTHS: tl.constexpr, POOL_I32: tl.constexpr,
                  PDL: tl.constexpr):
    # The cache's strides come as (sequence, head, row, lane). Dense (PAGE_SIZE = 0): the sequence is b
    # and the row is the key's position. Paged: the "sequence" stride is the page stride, and key t of
    # sequence b is row t % PAGE_SIZE of page BLOCK_TABLE[b, t // PAGE_SIZE] (the table through both of
    # its strides: a column-major or sliced view is read as it is). Quantized: K and V hold int8 codes,
    # K_SCALE and V_SCALE one float32 scale per (key, kv head), strided the same way. POOL_I32: every
    # element of each page pool lies within 2^31 - 1 elements of its first (the host checks), so a key's
    # offset in the pool is computed in 32-bit arithmetic, half the instructions of 64-bit.
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    if PDL:  # launched before the kernel ahead of it ended: wait for it (it may have written q or the
        # cache), then let the next kernel launch (the merge, or the next slice of a large batch), so that
        # its programs are resident when this grid ends
        gdc_wait()
        gdc_launch_dependents()
    if HAS_LENGTHS:
        L = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), NMAX)  # never read outside the cache
    else:  # every sequence fills the cache
        L = NMAX
    # rows of the tile: (query head g of the group, query row i), flattened as g * NQ + i
    r = tl.arange(0, ROWS)
    g = r // NQ
    i = r % NQ
    row_ok = r < GROUP * NQ
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    h = hk * GROUP + g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64)[:, None] * stride_qh + i[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    ks_base = K_SCALE + hk.to(tl.int64) * stride_ksh
    vs_base = V_SCALE + hk.to(tl.int64) * stride_vsh
    if PAGE_SIZE == 0:  # dense: the sequence's own slice of the cache
        k_base += b.to(tl.int64) * stride_kb
        v_base += b.to(tl.int64) * stride_vb
        ks_base += b.to(tl.int64) * stride_ksb
        vs_base += b.to(tl.int64) * stride_vsb

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, L)
    first = 0
    if HAS_LEFTPAD:  # the sequence's keys are [first, L) (a left-padded batch): skip whole blocks before
        first = tl.minimum(tl.maximum(tl.load(LEFTPAD + b), 0), L)
        lo = tl.maximum(lo, first // BLOCK_N * BLOCK_N)  # still a multiple of BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    table_row = BLOCK_TABLE + b.to(tl.int64) * stride_tb
    # A paged block's addresses wait on its table entries: read them a block ahead, so that the load's
    # latency hides behind the block before it and the compiler can software-pipeline the cache loads
    # (book/notes/kv_cache.md, "Paged blocks in 32-bit arithmetic").
    if PAGE_SIZE != 0:
        next_page = _pages_of_block(table_row, stride_tp, lo, hi, offs_n, PAGE_SIZE, BLOCK_N, QUANTIZED)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        if HAS_LEFTPAD:
            col_ok = col_ok & (cols >= first)
        if PAGE_SIZE == 0:
            k_rows = cols * stride_kn
            v_rows = cols * stride_vn
            ks_rows = cols * stride_ksn
            vs_rows = cols * stride_vsn
        else:
            page = next_page  # read a block ahead (above)
            next_page = _pages_of_block(table_row, stride_tp, start + BLOCK_N, hi, offs_n, PAGE_SIZE, BLOCK_N,
                                        QUANTIZED)
            if PAGE_SIZE % BLOCK_N == 0 and not QUANTIZED:  # as _pages_of_block reads the table
                within = start % PAGE_SIZE + offs_n
            else:
                within = cols % PAGE_SIZE
            # in bounds even unchecked (an empty pool is never read: the host passes NMAX = 0 for it)
            page = tl.minimum(tl.maximum(page, 0), tl.maximum(num_pages - 1, 0))
            if not POOL_I32:
                page = page.to(tl.int64)
            k_rows = page * stride_kb + within * stride_kn
            v_rows = page * stride_vb + within * stride_vn
            ks_rows = page * stride_ksb + within * stride_ksn
            vs_rows = page * stride_vsb + within * stride_vsn
        kt = tl.load(k_base + k_rows[None, :] + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # read BLOCK_N*D of the cache
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # read BLOCK_N*D
        s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PREC)  # int8 codes are exact in q's dtype
        if QUANTIZED:  # q (k * scale) = (q k) * scale: one multiply per logit, not one per element of K
            k_scale = tl.load(ks_base + ks_rows, mask=col_ok, other=0.0)  # read BLOCK_N scales
            s = s * (k_scale * qk_scale)[None, :]
        else:
            s = s * qk_scale
        visible = col_ok[None, :]
        if CAUSAL:  # the NQ queries are the last NQ positions: row i sees keys j <= L - NQ + i
            visible = visible & (cols[None, :] <= (L - NQ + i)[:, None])
        s = tl.where(visible, s, float("-inf"))
        if QUANTIZED:
            v_scale = tl.load(vs_base + vs_rows, mask=col_ok, other=0.0)  # read BLOCK_N scales
            acc, l_i, m_i = _softmax_step_scaled_values(acc, l_i, m_i, s, v.to(q.dtype), v_scale, DOT_PREC=DOT_PREC)
        else:
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, MAY_BE_EMPTY=True, DOT_PREC=DOT_PREC)
    empty_row = l_i == 0.0
    o = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse2 = tl.where(empty_row, float("-inf"), m_i + tl.log2(tl.where(empty_row, 1.0, l_i)))  # base 2
    # partials: [B*HKV, n_splits, ROWS, HEAD_DIM] and [B*HKV, n_splits, ROWS], float32 (tiny next to the cache)
    part = (bhk.to(tl.int64) * n_splits + split) * ROWS
    tl.store(O_PART + (part + r)[:, None] * HEAD_DIM + offs_d[None, :], o)
    tl.store(LSE_PART + part + r, lse2)


@triton.jit
def _decode_merge(O_PART, LSE_PART, OUT, stride_ob, stride_oh, stride_on, stride_od,
                  HKV, GROUP, NQ, D, n_splits,
                  ROWS: tl.constexpr, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
    bhk = tl.program_id(0)
    r = tl.program_id(1)  # one (query head, row) of the group
    if PDL:  # resident before the splits ended: wait for their partials (and let the next kernel launch)
        gdc_wait()
        gdc_launch_dependents()
    b = bhk // HKV
    hk = bhk % HKV
    s = tl.arange(0, SPLITS)
    s_ok = s < n_splits
    offs_d = tl.arange(0, HEAD_DIM)
    base = bhk.to(tl.int64) * n_splits * ROWS
    lse = tl.load(LSE_PART + base + s * ROWS + r, mask=s_ok, other=float("-inf"))  # [SPLITS]
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: every weight is 0, output 0
    w = tl.exp2(lse - m)
    o = tl.load(O_PART + (base + s * ROWS + r)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total == 0.0, 1.0, total)
    g = r // NQ
    i = r % NQ
    h = hk * GROUP + g
    tl.store(OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i * stride_on + offs_d * stride_od,
             out.to(OUT.dtype.element_ty), mask=offs_d < D)


def smem_need(rows: int, cfg: dict, head_dim: int, elem_bytes: int) -> int:
    """``_common.smem_estimate`` for the split kernel at ``cfg`` and head dim ``head_dim``: ``rows`` query
    rows resident, K^T and V streamed in blocks of BLOCK_N keys. With fewer than 64 rows the products
    run on the older MMA, which splits float32 K and V in registers and stages the split P (rows x
    BLOCK_N) instead (Triton 3.9 on sm_90)."""
    n, head_dim = cfg["BLOCK_N"], head_dim_pad(head_dim)
    split = split_operands(cfg, elem_bytes)
    need = smem_estimate(rows * head_dim, (n * head_dim, n * head_dim), elem_bytes, cfg["num_stages"],
                         split=split, split_streamed=rows >= 64)
    return need + (2 * rows * n * elem_bytes if split and rows < 64 else 0)


def smem_need_int8(rows: int, cfg: dict, head_dim: int, elem_bytes: int) -> int:
    """Shared memory (bytes) of the split kernel on an int8 cache, for query rows of ``elem_bytes`` bytes.
    The loop is the dense kernel's on blocks converted to the rows' dtype, plus the int8 blocks as
    loaded, so it reuses ``smem_need``'s accounting (the same bound, not the compiler's own figure;
    ``launch_fitting`` is the net where it is low)."""
    n, head_dim = cfg["BLOCK_N"], head_dim_pad(head_dim)
    # the rows resident, one K and one V block in the rows' dtype (the MMA's operands) and float32's
    # 3xtf32 split where smem_need puts it (in shared memory from 64 rows, a staged P below)
    converted = smem_need(rows, {**cfg, "num_stages": 1}, head_dim, elem_bytes)
    # the pipeline's copies of the int8 K and V blocks (num_stages - 1, at least one), a byte an element
    loaded = max(1, cfg["num_stages"] - 1) * 2 * n * head_dim
    return converted + loaded


def tile_config(rows: int, head_dim: int, elem_bytes: int, smem_limit: int | None, int8_cache: bool = False) -> dict:
    """The planning seam: the split kernel's key block, warps and pipeline stages on a GPU whose programs
    may use ``smem_limit`` bytes of shared memory (None: no limit), for ``rows`` query rows per program
    (the ROWS tile: a group's heads times Nq, at least 16), inputs of ``elem_bytes`` bytes and head dim
    ``head_dim``. A pure function: 64-key blocks in a 3-stage pipeline (the cache read is the whole
    cost, so loads stay in flight), stepped down by ``_common.fit_shared_memory`` where they do not fit
    (float32 at large head dims; float32 at D > 128 with more than 64 rows runs single-pass tf32, as
    its 3xtf32 split of the query rows alone would fill an H100's shared memory). On an ``int8_cache``
    (``elem_bytes``: the query's) 128-key blocks: the same bytes a block as 64 keys of a 16-bit cache,
    so as many bytes stay in flight for the same number of blocks (``smem_need_int8``). The layout
    (dense or paged) does not change the tiles: the kernel looks pages up per key, or per block where a
    block of a 16-bit cache lies in one page."""
    pad = head_dim_pad(head_dim)
    need = smem_need_int8 if int8_cache else smem_need
    start = {"BLOCK_N": 128 if int8_cache else 64, "num_warps": 4, "num_stages": 3}
    return fit_shared_memory(start, lambda c: need(rows, c, pad, elem_bytes), smem_limit, ("BLOCK_N",),
                             relaxed=TF32_FALLBACK if elem_bytes == 4 else None)


@functools.cache
def _planned(rows: int, head_dim: int, elem_bytes: int, smem_limit: int | None, int8_cache: bool) -> dict:
    return tile_config(rows, head_dim, elem_bytes, smem_limit, int8_cache)  # planned once per launch shape


def _default_config(rows: int, head_dim: int, elem_bytes: int, int8_cache: bool = False) -> dict:
    if is_interpreter():
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    return _planned(rows, head_dim, elem_bytes, shared_memory_limit(), int8_cache)


def launch_config(rows: int, head_dim: int, elem_bytes: int, int8_cache: bool = False) -> dict:
    """The configuration the split kernel launches with: ``tile_config`` for the current device (small
    blocks under the interpreter), or the planning override ``"decode.split"`` (``"decode.split_int8"``
    on an int8 cache; ``elem_bytes`` is then the query's element size)."""
    if int8_cache:
        return dict(planning.decide("decode.split_int8", lambda *a: _default_config(*a, True), rows, head_dim,
                                    elem_bytes))
    return dict(planning.decide("decode.split", _default_config, rows, head_dim, elem_bytes))


# On the host, in plain integers: a decode step is short enough that Triton's helpers, which unwrap
# compile-time constants, are a measurable part of its launch overhead.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def choose_num_splits(batch_kv_heads: int, max_len: int, block_n: int, device: torch.device,
                      paged: bool = False, int8: bool = False) -> int:
    """Whole waves of programs on the GPU (a 16-bit cache: one wave of two programs an SM; an int8 cache:
    waves of three an SM, at least 90% full), each split at least a few key blocks long (the planning
    override ``"decode.num_splits"`` replaces this rule; ``paged`` and ``int8`` are passed to it)."""
    return planning.decide("decode.num_splits", _num_splits, batch_kv_heads, max_len, block_n, device, paged,
                           int8)


def _num_splits(batch_kv_heads: int, max_len: int, block_n: int, device: torch.device, paged: bool,
                int8: bool) -> int:
    # Whole waves of the programs the SMs hold at once, each split at least 8 key blocks long: a count
    # just over a whole wave leaves its last programs running on a fraction of the SMs. A 16-bit
    # cache reads at the copy rate with two programs an SM, and is planned for two although an SM holds
    # three: on an H100 with 64 (batch, kv head) pairs, 4 splits read 0.3-5% faster than 6 on pages
    # (launched with PDL), 4k to 64k keys (book/notes/kv_cache.md, "Launching ahead: measured, not
    # adopted", and "Two programs an SM, and PDL for 16-bit caches"). An int8 program issues far more
    # instructions a key, and needs three an SM to keep enough loads in flight (_fill_waves).
    if device.type == "cuda" and not is_interpreter():
        return _splits_for_sms(batch_kv_heads, max_len, block_n, sm_count(device), int8)
    # the interpreter: a few splits, enough to exercise the merge, whatever the speed
    want = _cdiv(32, max(batch_kv_heads, 1))
    return int(max(1, min(want, _cdiv(max_len, 8 * block_n), MAX_SPLITS)))


def _splits_for_sms(batch_kv_heads: int, max_len: int, block_n: int, sms: int, int8: bool) -> int:
    """``_num_splits`` on a GPU of ``sms`` SMs."""
    pairs = max(batch_kv_heads, 1)
    if int8:
        wave = PROGRAMS_PER_SM * sms
        want = _fill_waves(wave // pairs, pairs, wave)
    else:
        want = PLANNED_PER_SM_16BIT * sms // pairs
    longest = max(1, _cdiv(max_len, 8 * block_n))
    return int(max(1, min(want, longest, MAX_SPLITS)))


def _fill_waves(splits: int, batch_kv_heads: int, wave: int) -> int:
    """The smallest count from ``splits`` up (at least 1) whose programs fill at least 90% of the waves of
    ``wave`` they take (programs / (waves * wave): the share of the SMs' program slots busy, for programs
    of equal length; at most MAX_SPLITS). An int8 program issues ~2.4x the instructions a key of a 16-bit
    one (its codes are converted for the products), so with fewer than PROGRAMS_PER_SM of them an SM
    keeps too few loads in flight; a 16-bit program reads at the copy rate with 2. On an H100 at 64k keys
    and 32 kv heads (256 programs a split): one split (0.65 of a wave) read an int8 cache at 2670 GB/s,
    three (1.94 waves) at 2788; a bf16 cache 3214 and 3186 (book/notes/kv_cache.md, "Paged blocks in
    32-bit arithmetic")."""
    s = max(splits, 1)
    while s < MAX_SPLITS and s * batch_kv_heads < 0.9 * wave * _cdiv(s * batch_kv_heads, wave):
        s += 1
    return s


def _register_cap(cfg: dict, int8: bool, rows: int, head_dim: int, query_bytes: int) -> dict:
    """The split kernel's register cap on a GPU (not asked under the interpreter): an int8 kernel is held
    to as many registers a thread as let PROGRAMS_PER_SM of its programs share an SM (168 at 4 warps),
    which the split count assumes. Left alone, the compiler gives the int8 kernel on pages up to ~200
    (Triton 3.6, sm_90): 2 programs an SM, and the planned splits then run in 1.5 waves. Only for 16-bit
    queries (``query_bytes``) and tiles of at most 16 * 128 elements (``rows`` query rows by ``head_dim``
    lanes, padded), whose accumulator and queries take a few dozen registers a thread: larger tiles, and
    float32 queries (whose split operands take more: capped, 408 bytes spilled on an H100), need more
    than the cap leaves. Capped on an H100 (Triton 3.6): bf16 queries spill nothing, float16 ones 2
    bytes. The 16-bit caches' kernels stay under the cap by themselves. No cap where a configuration (an
    override) sets its own, or where the cap would be under 128 (8 warps)."""
    if not int8 or "maxnreg" in cfg or rows * head_dim > 16 * 128 or query_bytes != 2:
        return {}
    cap = min(255, REGISTERS_PER_SM // (PROGRAMS_PER_SM * 32 * cfg.get("num_warps", 4))) // 8 * 8
    return {"maxnreg": cap} if cap >= 128 else {}


def use_pdl(device: torch.device, int8: bool = False) -> bool:
    """Whether the split and merge kernels launch with programmatic dependent launch on ``device`` (for an
    int8 cache when ``int8``): by default for 16-bit caches and not for int8 ones (the planning override
    ``"decode.pdl"``, a bool or a function of the device and ``int8``, decides otherwise), and only on
    Hopper and later GPUs (with Triton >= 3.3). A kernel launched so may start while the kernel ahead of
    it in the stream is still running; it waits (``gdc_wait``) before it reads or writes memory, so only
    the launch overlaps: the merge's programs are resident, waiting, before the last split ends. On an
    H100 it made bf16 decode 0.4-2.3% faster at 4k keys (about as fast at 64k), and the int8 kernel
    9-11 us slower a step at 4k keys with 8 kv heads (a quarter of the step without it;
    book/notes/kv_cache.md, "Launching ahead" and "Two programs an SM, and PDL for 16-bit caches")."""
    supported = gdc_wait is not None and not is_interpreter() and device.type == "cuda"
    return bool(supported and planning.decide("decode.pdl", not int8, device, int8)
                and capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 9)


def _pools_fit_int32(*pools: torch.Tensor) -> bool:
    """Whether every element of each page pool (and of its scales) lies within the ``int32_limit``
    (2^31 - 1 elements) of its first, so the kernel may compute a key's offset in 32-bit arithmetic."""
    return all(element_span(t) <= int32_limit() for t in pools)


def _is_int8(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.int8


def _check_cache(q, k_cache, v_cache, paged: bool, int8: bool) -> None:
    """q and the two caches, dense ``[B, Hkv, Nmax, D]`` or paged ``[num_pages, page_size, Hkv, D]``,
    of q's dtype or int8. The dense 16-bit/float32 case is flash attention's check, as before."""
    if not paged and not int8:
        check_attention_inputs(q, k_cache, v_cache, k_name="k_cache", v_name="v_cache")
        return
    layout = "[num_pages, page_size, Hkv, D]" if paged else "[B, Hkv, Nmax, D]"
    check_tensor("q", q, ndim=4, shape_hint="[B, H, Nq, D]")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, dtypes=(torch.int8,) if int8 else KERNEL_DTYPES, ndim=4, shape_hint=layout)
    if not int8 and not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache must share one dtype (or the caches be int8 codes), got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape {layout}, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    hkv = k_cache.shape[2] if paged else k_cache.shape[1]
    if not paged and q.shape[0] != k_cache.shape[0]:
        raise ValueError(f"batch sizes differ: q has {q.shape[0]}, k_cache has {k_cache.shape[0]}")
    if q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"head dims differ: q has D={q.shape[-1]}, k_cache has D={k_cache.shape[-1]}")
    if hkv == 0 or q.shape[1] % hkv != 0:
        raise ValueError(f"k_cache/v_cache heads ({hkv}) must divide q heads ({q.shape[1]}) for grouped-query "
                         "attention")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={q.shape[-1]} is not supported: D must be between 1 and {MAX_HEAD_DIM}")
    if paged and (k_cache.shape[1] == 0 or k_cache.shape[1] % 16):
        raise ValueError(f"page_size (k_cache.shape[1]) must be a positive multiple of 16, got {k_cache.shape[1]}")


def _check_scales(k_cache, k_scale, v_scale, int8: bool) -> None:
    """Both scales, float32, shaped like the cache without its last dimension, iff the cache is int8."""
    if not int8:
        if k_scale is not None or v_scale is not None:
            raise ValueError("k_scale and v_scale are for an int8 cache; this k_cache has dtype "
                             f"{str(k_cache.dtype).replace('torch.', '')}: pass neither")
        return
    want = tuple(k_cache.shape[:-1])
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None:
            raise ValueError(f"an int8 k_cache/v_cache needs both k_scale and v_scale (float32 {list(want)}); "
                             f"{name} is missing")
        check_tensor(name, t, dtypes=(torch.float32,))
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape k_cache.shape[:-1] = {want} (one scale per key and kv head), "
                             f"got {tuple(t.shape)}")
        check_same_device(k_cache=k_cache, **{name: t})


def _check_block_table(block_table, batch: int, device: torch.device) -> torch.Tensor:
    """An int32 (or int64) tensor [B, max_pages] on q's device (its entries are checked, then an int64
    table is converted to int32, by ``decode_attention``)."""
    if not isinstance(block_table, torch.Tensor) or block_table.dtype not in (torch.int32, torch.int64):
        got = block_table.dtype if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise TypeError(f"block_table must be an int32 (or int64) tensor [B, max_pages], got {got}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must have shape [B, max_pages] with B = {batch} (q's batch), got "
                         f"{tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device}, q on {device}: put them on one device")
    return block_table


def _check_lengths_tensor(name: str, t, batch: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor [B]")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = ({batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}: put them on one device")


def _check_cache_seqlens(cache_seqlens, batch: int, nmax: int, device: torch.device, what: str,
                         cache_leftpad=None) -> int:
    """Checks the lengths (and the left padding: 0 <= cache_leftpad <= cache_seqlens) and returns the
    longest (read on the host anyway, in one read), or ``nmax`` where they are not read: under CUDA-graph
    capture (the graph may replay with other lengths) or for an empty batch."""
    _check_lengths_tensor("cache_seqlens", cache_seqlens, batch, device)
    if cache_leftpad is not None:
        _check_lengths_tensor("cache_leftpad", cache_leftpad, batch, device)
    if not batch or _capturing(device):
        return nmax
    facts = [cache_seqlens.min(), cache_seqlens.max()]
    if cache_leftpad is not None:
        facts.append(((cache_leftpad < 0) | (cache_leftpad > cache_seqlens)).sum())
    lo, hi, *bad = torch.stack(facts).tolist()
    if lo < 0 or hi > nmax:
        raise ValueError(f"cache_seqlens must lie in [0, {what}={nmax}], got values in [{lo}, {hi}]")
    if bad and bad[0]:
        b = int(((cache_leftpad < 0) | (cache_leftpad > cache_seqlens)).nonzero()[0])
        raise ValueError(f"cache_leftpad must lie in [0, cache_seqlens] for every sequence, got cache_leftpad[{b}]"
                         f" = {int(cache_leftpad[b])} with cache_seqlens[{b}] = {int(cache_seqlens[b])}")
    return hi


def _capturing(device: torch.device) -> bool:
    # Checking values needs a host sync, impossible while a CUDA graph is being captured; there the
    # kernel's clamps (lengths to [0, Nmax], pages to [0, num_pages)) still keep every read in the cache.
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_pages_used(block_table: torch.Tensor, cache_seqlens: torch.Tensor, page_size: int, num_pages: int):
    """The pages each sequence uses (the first ceil(L_b / page_size) entries of its row) must be pages
    of the cache; the entries after them are never read and may hold anything."""
    if block_table.numel() == 0 or _capturing(block_table.device):
        return
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < \
        ((cache_seqlens.long() + page_size - 1) // page_size)[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bad.any():
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a page of k_cache: the pages a "
                         f"sequence uses must lie in [0, num_pages={num_pages})")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor | None = None, num_splits: int | None = None,
                     causal: bool = False, *, scale: float | None = None, block_table: torch.Tensor | None = None,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                     cache_leftpad: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a few query rows over a KV cache, split along the cache (forward only).

    q ``[B, H, Nq, D]`` (Nq small, 1 is the common case); k_cache, v_cache ``[B, Hkv, Nmax, D]`` with
    Hkv dividing H; ``cache_seqlens`` an int tensor ``[B]`` of valid lengths (default: Nmax for all);
    ``num_splits`` splits of the cache processed in parallel (default: chosen from the GPU's size;
    at most 64, and no more than the cache has blocks of keys: it changes the speed, not the result).
    With ``causal=True`` the Nq queries are the last Nq positions of each sequence (row i sees keys
    j <= L - Nq + i). A row that sees no key (length 0) gets zeros. ``scale`` multiplies the logits
    q k^T, as in ``flash_attention`` (default 1/sqrt(D)). Empty inputs (B, H or Nq = 0) give an empty
    output; an empty cache (Nmax = 0) gives zeros. On a GPU, float32 products run in 3-pass tf32 (near
    float32), except where the split operands do not fit the device's shared memory with the smallest
    key block (D > 128 with more than 64 query rows per KV head on an H100): single-pass tf32 there, within
    the package's float32 tolerance. Checking ``cache_seqlens``'s values reads them on
    the host (a device synchronisation), which also sizes the splits to the longest sequence; while a
    CUDA graph is captured that check is skipped, the splits cover Nmax and the kernel clamps each
    length to [0, Nmax]. ``cache_leftpad`` (an int tensor ``[B]``, as FlashAttention's
    ``flash_attn_with_kvcache`` takes it) is where each sequence's keys start: sequence b attends to
    keys ``cache_leftpad[b] <= j < cache_seqlens[b]`` (a left-padded batch, as ``generate`` pads);
    checked with the lengths, in the same host read. A dense cache too large for 32-bit offsets inside a
    (batch, head) slice that is a strided view (e.g. ``[B, N, Hkv, D].transpose(1, 2)``) is copied on
    every call: pass a contiguous ``[B, Hkv, N, D]`` cache to avoid the copy. A batch of more than 65535
    (sequence, kv head) pairs, what one launch's grid holds on CUDA, is launched in slices of sequences.

    **Paged cache** (``block_table`` given; the convention of FlashAttention's ``flash_attn_with_kvcache``
    and vLLM): k_cache and v_cache are pools of pages ``[num_pages, page_size, Hkv, D]``, page_size a
    multiple of 16, and ``block_table`` an int32 tensor ``[B, max_pages]`` of any strides (int64 is
    accepted: its used entries are checked, then it is converted to int32, a small copy each call):
    token t of sequence b lives in page ``block_table[b, t // page_size]`` at row ``t % page_size``.
    Then Nmax = max_pages * page_size: ``cache_seqlens`` defaults to it and must not exceed it; the last
    page may be partly filled. Only the first ceil(L_b / page_size) entries of row b are read (checked to
    lie in [0, num_pages) on the host; the rest may hold anything, e.g. -1); while a CUDA graph is
    captured that check is skipped and the kernel clamps each page index into [0, num_pages) (an empty
    pool, num_pages = 0, gives zeros there; outside capture positive lengths on it are refused). Pages
    may be shared between sequences (a common prefix).

    **int8 cache** (k_cache, v_cache of dtype ``torch.int8``): ``k_scale`` and ``v_scale`` are then
    required, float32 of shape ``k_cache.shape[:-1]`` (one scale per key and kv head: ``[B, Hkv, Nmax]``
    dense, ``[num_pages, page_size, Hkv]`` paged, any strides; paged scales stored head-major within a
    page, as ``PagedKVCache`` allocates them, are read faster), and the cache stands for ``code * scale`` (as
    ``minikernels.kv_cache.quantize_int8`` makes it). The kernel reads the codes and scales and computes
    in q's dtype with float32 accumulation; the result is the attention over the dequantized cache.
    Dense or paged; the scales must not be given for a cache of another dtype.
    """
    paged, int8 = block_table is not None, _is_int8(k_cache)
    full_cache = (cache_seqlens is None and cache_leftpad is None and not paged and not int8 and k_scale is None
                  and v_scale is None and all(type(t) is torch.Tensor for t in (q, k_cache, v_cache))
                  and all(x is None or type(x) in (bool, int, float) for x in (num_splits, causal, scale))
                  and not planning.overridden())
    if full_cache:  # a call like an earlier one (a decode step of every layer) launches that call's plan
        key = _plan_key(q, k_cache, v_cache, num_splits, causal, scale)
        plan = _FULL_CACHE_PLANS.get(key)
        if plan is not None and not (torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad
                                                                  or v_cache.requires_grad)):
            return _launch(plan, q, k_cache, v_cache)
    _check_cache(q, k_cache, v_cache, paged, int8)
    _check_scales(k_cache, k_scale, v_scale, int8)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k_scale,
                                                                                   v_scale)):
        raise RuntimeError("decode_attention is forward-only (inference): call it under torch.no_grad() or pass "
                           "tensors that do not require grad; use flash_attention to train")
    B, H, Nq, D = q.shape
    if paged:
        block_table = _check_block_table(block_table, B, q.device)
        num_pages, page_size, HKV = k_cache.shape[:3]
        Nmax, what = block_table.shape[1] * page_size, "max_pages * page_size"
    else:
        num_pages, page_size, HKV, Nmax, what = 0, 0, k_cache.shape[1], k_cache.shape[2], "Nmax"
    if cache_seqlens is None and cache_leftpad is None and not paged:
        longest = Nmax  # the kernel takes Nmax for every sequence: no lengths tensor to fill
    elif cache_seqlens is None:
        cache_seqlens = torch.full((B,), Nmax, dtype=torch.int32, device=q.device)
        longest = Nmax if cache_leftpad is None else _check_cache_seqlens(cache_seqlens, B, Nmax, q.device, what,
                                                                          cache_leftpad)
    else:
        longest = _check_cache_seqlens(cache_seqlens, B, Nmax, q.device, what, cache_leftpad)
        cache_seqlens = cache_seqlens.to(torch.int32).contiguous()
    has_lengths = cache_seqlens is not None
    # tensors the kernel does not read (their switch is off) are stood in for by q
    lengths = cache_seqlens if has_lengths else q
    leftpad = cache_leftpad.to(torch.int32).contiguous() if cache_leftpad is not None else q
    if paged:  # (an int64 table's entries are checked before they are narrowed: 2^32 must not become page 0)
        _check_pages_used(block_table, cache_seqlens, page_size, num_pages)
        if block_table.dtype == torch.int64:  # out-of-range entries stay out of range in int32 (under capture
            block_table = block_table.clamp(-1, num_pages)  # they are unchecked, and the kernel clamps them)
        block_table = block_table.to(torch.int32)  # the kernel takes any strides
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)):
        raise TypeError(f"num_splits must be a positive int or None, got {type(num_splits).__name__}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = check_scale(scale, D)
    group = H // HKV
    rows = max(16, _next_power_of_2(group * Nq))  # tl.dot needs at least 16 rows
    if group * Nq > 128:
        raise ValueError(f"decode_attention takes a few query rows: (H / Hkv) * Nq = {group * Nq} > 128; "
                         "use flash_attention for prefill")
    out = empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out

    work = compute_dtype(q.dtype)
    # the kernel adds 64-bit offsets for the sequence (or page) and the head, 32-bit ones inside:
    # [Nmax, D] of a dense cache, [page_size, Hkv, D] of a page
    inner = 3 if paged else 2
    qw = int32_addressable("q", q.to(work))
    kw, vw = (int32_addressable(n, t if int8 else t.to(work), inner) for n, t in (("k_cache", k_cache),
                                                                                   ("v_cache", v_cache)))
    if int8:
        ks, vs = (int32_addressable(n, t, inner - 1) for n, t in (("k_scale", k_scale), ("v_scale", v_scale)))
        ks_strides, vs_strides = _scale_strides(ks, paged), _scale_strides(vs, paged)
    else:
        ks = vs = q  # not read (QUANTIZED is off)
        ks_strides = vs_strides = (0, 0, 0)
    k_strides, v_strides = _cache_strides(kw, paged), _cache_strides(vw, paged)
    table = block_table if paged else q  # not read when dense
    table_strides = block_table.stride() if paged else (0, 0)
    # an empty page pool holds no key: the kernel clamps every length to 0 (positive lengths were refused
    # above, except under CUDA-graph capture, where nothing may be read from it either)
    kernel_nmax = 0 if paged and num_pages == 0 else Nmax
    with on_device_of(q):  # the shared memory of q's device
        cfg = launch_config(rows, D, qw.element_size(), int8)
    block_n = cfg["BLOCK_N"]
    # splits cover the longest sequence, not the cache's capacity (a wide block table with short
    # sequences would otherwise launch mostly empty programs); under capture the longest is Nmax
    longest = max(1, min(longest, kernel_nmax))
    splits = num_splits or choose_num_splits(B * HKV, longest, block_n, q.device, paged, int8)
    # more splits than key blocks, or than the merge tile holds, would only add empty programs
    splits = min(splits, _cdiv(longest, block_n), MAX_SPLITS)
    split_len = _cdiv(_cdiv(longest, splits), block_n) * block_n
    pad = head_dim_pad(D)
    # the partials: every (split, row, lane) is written by _decode_split, padding rows and lanes included
    o_part = empty((B * HKV, splits, rows, pad), dtype=torch.float32, device=q.device)
    lse_part = empty((B * HKV, splits, rows), dtype=torch.float32, device=q.device)
    split_args = (*qw.stride(), *k_strides, *v_strides, *ks_strides, *vs_strides, *table_strides, num_pages,
                  HKV, group, Nq, D, kernel_nmax, split_len, splits, scale * LOG2E)
    # a pool whose offsets fit 32 bits is addressed in 32-bit arithmetic (the scales too: one switch)
    pool_i32 = paged and _pools_fit_int32(kw, vw, *((ks, vs) if int8 else ()))
    pdl = use_pdl(q.device, int8)
    launch_kwargs = {"launch_pdl": True} if pdl else {}  # (Triton before 3.3 takes no such argument)
    split_kwargs = dict(CAUSAL=causal, ROWS=rows, HEAD_DIM=pad, PAGE_SIZE=page_size, QUANTIZED=int8,
                        HAS_LEFTPAD=cache_leftpad is not None, HAS_LENGTHS=has_lengths, POOL_I32=pool_i32,
                        PDL=pdl, **launch_kwargs, **dot_options(qw.dtype))
    # the split grid's second axis holds the (sequence, kv head) pairs, at most MAX_GRID_YZ of them: a
    # larger batch is launched in slices of whole sequences (the merge's grid has room for all of them)
    slices = batch_slices(B, HKV, planning.decide("decode.max_grid_y", MAX_GRID_YZ), "decode_attention")
    launched = {}
    with on_device_of(q):  # Triton launches on the current CUDA device
        def launch(cfg):  # split_len is a multiple of every BLOCK_N a step-down reaches
            if not is_interpreter():
                cfg = {**cfg, **_register_cap(cfg, int8, rows, pad, qw.element_size())}
            for lo, hi in slices:
                args = (qw, kw, vw, lengths, leftpad, o_part, lse_part, table, ks, vs)
                if len(slices) > 1:
                    args = _batch_slice(args, lo, hi, HKV, paged, int8, has_lengths, cache_leftpad is not None)
                _decode_split[(splits, (hi - lo) * HKV)](*args, *split_args, **{**split_kwargs, **cfg})
            launched.update(cfg)

        # a configuration the compiler finds too large for this GPU's shared memory steps down: fewer
        # stages, smaller key blocks, then (float32) single-pass tf32
        launch_fitting(("split", rows, pad, qw.element_size(), int8), cfg, launch, ("BLOCK_N",),
                       relaxed=TF32_FALLBACK if qw.element_size() == 4 else None)
        merge_args = (*out.stride(), HKV, group, Nq, D, splits)
        merge_kwargs = dict(ROWS=rows, SPLITS=max(2, _next_power_of_2(splits)), HEAD_DIM=pad, num_warps=4, PDL=pdl,
                            **launch_kwargs)
        _decode_merge[(B * HKV, group * Nq)](o_part, lse_part, out, *merge_args, **merge_kwargs)
    if full_cache and qw is q and kw is k_cache and vw is v_cache and len(slices) == 1:  # (no copy was needed)
        if len(_FULL_CACHE_PLANS) >= _MAX_PLANS:  # forget the oldest (another thread may be at it too)
            try:
                _FULL_CACHE_PLANS.pop(next(iter(_FULL_CACHE_PLANS)), None)
            except (StopIteration, RuntimeError):
                pass
        _FULL_CACHE_PLANS[key] = _Plan(tuple(out.shape), (B * HKV, splits, rows, pad), (splits, B * HKV), split_args,
                                       {**split_kwargs, **launched}, (B * HKV, group * Nq), merge_args, merge_kwargs)
    return out


# Launch plans of calls over a full dense cache (no lengths, pages or int8: what transformers' decode
# step passes, the same shapes in every layer), keyed by everything the checks and the plan read, so
# that a repeated call skips both: on a 125M model the checks and planning took longer than the kernel.
@dataclass(frozen=True)
class _Plan:
    out_shape: tuple
    part_shape: tuple  # [B * Hkv, splits, rows, padded D]
    split_grid: tuple
    split_args: tuple
    split_kwargs: dict
    merge_grid: tuple
    merge_args: tuple
    merge_kwargs: dict


_FULL_CACHE_PLANS: dict = {}
_MAX_PLANS = 64


def _plan_key(q, k_cache, v_cache, num_splits, causal, scale) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in (q, k_cache, v_cache)) + (
        type(num_splits), num_splits, type(causal), causal, type(scale), scale)


def _launch(plan: _Plan, q, k_cache, v_cache) -> torch.Tensor:
    out = empty(plan.out_shape, dtype=q.dtype, device=q.device)
    o_part = empty(plan.part_shape, dtype=torch.float32, device=q.device)
    lse_part = empty(plan.part_shape[:3], dtype=torch.float32, device=q.device)
    with on_device_of(q):  # q stands in for the tensors the kernel does not read (lengths, pages, scales)
        _decode_split[plan.split_grid](q, k_cache, v_cache, q, q, o_part, lse_part, q, q, q, *plan.split_args,
                                       **plan.split_kwargs)
        _decode_merge[plan.merge_grid](o_part, lse_part, out, *plan.merge_args, **plan.merge_kwargs)
    return out


def _batch_slice(args: tuple, lo: int, hi: int, hkv: int, paged: bool, int8: bool, has_lengths: bool,
                 has_leftpad: bool) -> tuple:
    """The split kernel's tensors (q, k, v, lengths, leftpad, o_part, lse_part, table, k_scale, v_scale)
    for sequences [lo, hi) of the batch: views with the same strides, so the kernel's arguments stay as
    they are. A page pool is not sliced (the table's rows are), nor a tensor the kernel does not read."""
    q, k, v, lengths, leftpad, o_part, lse_part, table, ks, vs = args
    rows, pairs = slice(lo, hi), slice(lo * hkv, hi * hkv)
    dense, dense_int8 = not paged, int8 and not paged
    return (q[rows], k[rows] if dense else k, v[rows] if dense else v, lengths[rows] if has_lengths else lengths,
            leftpad[rows] if has_leftpad else leftpad, o_part[pairs], lse_part[pairs],
            table[rows] if paged else table, ks[rows] if dense_int8 else ks, vs[rows] if dense_int8 else vs)


def _cache_strides(t: torch.Tensor, paged: bool) -> tuple[int, int, int, int]:
    """The kernel's (sequence, head, row, lane) strides: [B, Hkv, N, D] as they are; a page pool
    [num_pages, page_size, Hkv, D] as (page, head, row within the page, lane)."""
    s = t.stride()
    return (s[0], s[2], s[1], s[3]) if paged else tuple(s)


def _scale_strides(t: torch.Tensor, paged: bool) -> tuple[int, int, int]:
    """The (sequence, head, row) strides of the scales: [B, Hkv, N], or [num_pages, page_size, Hkv]."""
    s = t.stride()
    return (s[0], s[2], s[1]) if paged else tuple(s)


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The split merge in PyTorch: combine partial (out_s, lse_s) computed over disjoint key sets into
    the result over their union. Natural-log lse; a part with lse = -inf (no keys) weighs 0."""
    lse = torch.stack(lses)  # [S, ...]
    m = lse.amax(0)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m)
    total = w.sum(0)
    out = (w[..., None] * torch.stack(outs)).sum(0) / torch.where(total == 0, 1, total)[..., None]
    return out, m + torch.log(total)
