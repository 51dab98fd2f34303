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
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import planning
from ._alloc import empty
from ._backend import dot_options, is_interpreter, on_device_of
from ._common import (
    LOG2E,
    TF32_FALLBACK,
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
from ._validate import check_attention_inputs, check_scale, int32_addressable

MAX_SPLITS = 64


@triton.jit
def _decode_split(Q, K, V, SEQLENS, O_PART, LSE_PART,
                  stride_qb, stride_qh, stride_qn, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  HKV, GROUP, NQ, D, NMAX, split_len, n_splits, qk_scale,
                  CAUSAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    L = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), NMAX)  # never read outside the cache
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
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, L)
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # read BLOCK_N*D of the cache
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # read BLOCK_N*D
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        visible = col_ok[None, :]
        if CAUSAL:  # the NQ queries are the last NQ positions: row i sees keys j <= L - NQ + i
            visible = visible & (cols[None, :] <= (L - NQ + i)[:, None])
        s = tl.where(visible, s, float("-inf"))
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
                  ROWS: tl.constexpr, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    bhk = tl.program_id(0)
    r = tl.program_id(1)  # one (query head, row) of the group
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


def tile_config(rows: int, head_dim: int, elem_bytes: int, smem_limit: int | None) -> dict:
    """The planning seam: the split kernel's key block, warps and pipeline stages on a GPU whose programs
    may use ``smem_limit`` bytes of shared memory (None: no limit), for ``rows`` query rows per program
    (the ROWS tile: a group's heads times Nq, at least 16), inputs of ``elem_bytes`` bytes and head dim
    ``head_dim``. A pure function: 64-key blocks in a 3-stage pipeline (the cache read is the whole
    cost, so loads stay in flight), stepped down by ``_common.fit_shared_memory`` where they do not fit
    (float32 at large head dims; float32 at D > 128 with more than 64 rows runs single-pass tf32, as
    its 3xtf32 split of the query rows alone would fill an H100's shared memory)."""
    pad = head_dim_pad(head_dim)
    return fit_shared_memory({"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                             lambda c: smem_need(rows, c, pad, elem_bytes), smem_limit, ("BLOCK_N",),
                             relaxed=TF32_FALLBACK if elem_bytes == 4 else None)


@functools.cache
def _planned(rows: int, head_dim: int, elem_bytes: int, smem_limit: int | None) -> dict:
    return tile_config(rows, head_dim, elem_bytes, smem_limit)  # planned once per launch shape


def _default_config(rows: int, head_dim: int, elem_bytes: int) -> dict:
    if is_interpreter():
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    return _planned(rows, head_dim, elem_bytes, shared_memory_limit())


def launch_config(rows: int, head_dim: int, elem_bytes: int) -> dict:
    """The configuration the split kernel launches with: ``tile_config`` for the current device (small
    blocks under the interpreter), or the planning override ``"decode.split"``."""
    return dict(planning.decide("decode.split", _default_config, rows, head_dim, elem_bytes))


def _num_sms(device: torch.device) -> int:
    # the interpreter counts as 4 SMs here, not sm_count's 1: a few splits, enough to exercise the merge
    return sm_count(device) if device.type == "cuda" and not is_interpreter() else 4


def choose_num_splits(batch_kv_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Enough splits that every SM has a few programs, but each split at least a few key blocks long
    (the planning override ``"decode.num_splits"`` replaces this rule)."""
    return planning.decide("decode.num_splits", _num_splits, batch_kv_heads, max_len, block_n, device)


def _num_splits(batch_kv_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    want = triton.cdiv(4 * _num_sms(device), max(batch_kv_heads, 1))
    longest = max(1, triton.cdiv(max_len, 4 * block_n))
    return int(max(1, min(want, longest, MAX_SPLITS)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor | None = None, num_splits: int | None = None,
                     causal: bool = False, *, scale: float | None = None) -> torch.Tensor:
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
    the host (a device synchronisation); while a CUDA graph is captured that check is skipped and the
    kernel clamps each length to [0, Nmax].
    """
    check_attention_inputs(q, k_cache, v_cache, k_name="k_cache", v_name="v_cache")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise RuntimeError("decode_attention is forward-only (inference): call it under torch.no_grad() or pass "
                           "tensors that do not require grad; use flash_attention to train")
    B, H, Nq, D = q.shape
    HKV, Nmax = k_cache.shape[1], k_cache.shape[2]
    if cache_seqlens is None:
        cache_seqlens = torch.full((B,), Nmax, dtype=torch.int32, device=q.device)
    else:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError("cache_seqlens must be an int32 or int64 tensor [B]")
        if cache_seqlens.shape != (B,):
            raise ValueError(f"cache_seqlens must have shape [B] = ({B},), got {tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != q.device:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device}, q on {q.device}: put them on one device")
        # Checking the values needs a host sync, impossible while a CUDA graph is being captured;
        # there the kernel's clamp to [0, Nmax] still keeps every read inside the cache.
        capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if B and not capturing:
            lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
            if lo < 0 or hi > Nmax:
                raise ValueError(f"cache_seqlens must lie in [0, Nmax={Nmax}], got values in [{lo}, {hi}]")
        cache_seqlens = cache_seqlens.to(torch.int32).contiguous()
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)):
        raise TypeError(f"num_splits must be a positive int or None, got {type(num_splits).__name__}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scale = check_scale(scale, D)
    group = H // HKV
    rows = max(16, triton.next_power_of_2(group * Nq))  # tl.dot needs at least 16 rows
    if group * Nq > 128:
        raise ValueError(f"decode_attention takes a few query rows: (H / Hkv) * Nq = {group * Nq} > 128; "
                         "use flash_attention for prefill")
    out = empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out

    work = compute_dtype(q.dtype)
    qw, kw, vw = (int32_addressable(n, t.to(work)) for n, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)))
    with on_device_of(q):  # the shared memory of q's device
        cfg = launch_config(rows, D, qw.element_size())
    block_n = cfg["BLOCK_N"]
    splits = num_splits or choose_num_splits(B * HKV, Nmax, block_n, q.device)
    # more splits than key blocks, or than the merge tile holds, would only add empty programs
    splits = min(splits, max(1, triton.cdiv(Nmax, block_n)), MAX_SPLITS)
    split_len = triton.cdiv(triton.cdiv(max(Nmax, 1), splits), block_n) * block_n
    pad = head_dim_pad(D)
    # the partials: every (split, row, lane) is written by _decode_split, padding rows and lanes included
    o_part = empty((B * HKV, splits, rows, pad), dtype=torch.float32, device=q.device)
    lse_part = empty((B * HKV, splits, rows), dtype=torch.float32, device=q.device)
    with on_device_of(q):  # Triton launches on the current CUDA device
        def launch(cfg):  # split_len is a multiple of every BLOCK_N a step-down reaches
            _decode_split[(splits, B * HKV)](
                qw, kw, vw, cache_seqlens, o_part, lse_part, *qw.stride(), *kw.stride(), *vw.stride(),
                HKV, group, Nq, D, Nmax, split_len, splits, scale * LOG2E, CAUSAL=causal, ROWS=rows,
                HEAD_DIM=pad, **{**dot_options(qw.dtype), **cfg})

        # a configuration the compiler finds too large for this GPU's shared memory steps down: fewer
        # stages, smaller key blocks, then (float32) single-pass tf32
        launch_fitting(("split", rows, pad, qw.element_size()), cfg, launch, ("BLOCK_N",),
                       relaxed=TF32_FALLBACK if qw.element_size() == 4 else None)
        _decode_merge[(B * HKV, group * Nq)](
            o_part, lse_part, out, *out.stride(), HKV, group, Nq, D, splits,
            ROWS=rows, SPLITS=max(2, triton.next_power_of_2(splits)), HEAD_DIM=pad, num_warps=4)
    return out


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
