"""Chapter 2: XAttention's antidiagonal block scores, in one Triton pass.

``reference_block_scores`` (behind ``masks.antidiagonal_block_scores``) is the readable PyTorch
version: gather Q and K into strided "patch" rows, multiply them ([N/stride, stride*D] by its
transpose), softmax each row, sum the probabilities per block. It materializes the
[N/stride, N/stride] patch scores in float32 and runs several passes over them, which at long N
costs a large share of the sparse attention it selects for (book/notes/block_sparse.md has the
measurements).

Here one program owns BLOCK_A patch rows of one head and walks their patch columns once (only
those left of the causal edge):

    s[a, b] = sum_r q[a*stride + stride-1-r] . k[b*stride + r]      STRIDE dots of [BLOCK_A, D] x [D, BLOCK_B]

The softmax needs each row's total before any probability is final, but a second pass over the
scores would double the matrix work. So the pass stores, for each row and column tile, the tile's
row maximum m_t and the per-block sums of exp(s - m_t) (a [BLOCK_A, BLOCK_B / PER] piece, PER patches
to a block), while keeping the row's running log-sum-exp as FlashAttention does. A short second loop
rescales those sums by exp(m_t - lse), adds the PER rows of each query block, and writes one head's
[n_q_blocks, n_k_blocks] scores. Only the small sums are written and read back (from L2); the patch
scores never leave the chip.

The selection (keep each query block's best key blocks until they hold ``threshold`` of the row's
score) is a second small kernel. Rather than sort, it ranks: block j is kept when the blocks ranked
above it (a higher score, or an equal score and a smaller index) hold less than ``threshold`` of the
total. That is one [n_k_blocks]^2 comparison per query block, a few microseconds, in one launch
instead of the dozen small PyTorch operations of a sort, gather, cumsum and scatter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import planning
from ._alloc import empty
from ._backend import dot_options, is_interpreter, on_device_of, tma_ready
from ._common import LOG2E, MAX_GRID_YZ, batch_slices, compute_dtype, head_dim_pad
from ._validate import int32_addressable

# patch rows / columns per tile, head-dimension slice per pipeline step (for 16-bit inputs), warps,
# pipeline depth, TMA loads on a GPU (the interpreter uses small tiles). The scoring reads two tiles
# for each product, so it waits on L2 unless many loads are in flight: 64-wide slices of D make a
# pipeline step 40 KB, so that four steps fit in shared memory. The sweeps that chose these values
# are in book/notes/block_sparse.md.
TILES = {"BLOCK_A": 64, "BLOCK_B": 256, "D_CHUNK": 64, "num_warps": 4, "num_stages": 4, "TMA": True}


def _default_tiles(head_dim: int, elem_bytes: int) -> dict:
    # TILES, with the head-dimension slice narrowed for wider elements (float32) so that a pipeline
    # step holds the same bytes as for 16-bit inputs, and the pipeline fits in shared memory
    t = dict(TILES)
    t["D_CHUNK"] = min(head_dim, TILES["D_CHUNK"] * 2 // elem_bytes)
    return t


def tile_config(head_dim: int, elem_bytes: int) -> dict:
    """The scoring kernel's tiles for a padded head dim and element size: ``TILES`` with the head-dim
    slice fitted to the element size, or the planning override ``"antidiagonal.tiles"``."""
    return dict(planning.decide("antidiagonal.tiles", _default_tiles, head_dim, elem_bytes))


@triton.jit
def _antidiagonal_scores(Q, K, PART, TMAX, OUT,
                         stride_qb, stride_qh, stride_qn, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         H, GROUP, Nq, Nk, D, NA, NB, n_tiles, causal_offset, qk_scale,
                         CAUSAL: tl.constexpr, STRIDE: tl.constexpr, PER: tl.constexpr,
                         BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr,
                         TMA: tl.constexpr, DOT_PREC: tl.constexpr):
    a0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_A  # the longest rows (causal) start first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if not TMA:
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    offs_a = a0 + tl.arange(0, BLOCK_A)  # patch rows
    row_ok = offs_a * STRIDE < Nq
    # the last patch column any row here may see: b*STRIDE <= a*STRIDE + STRIDE-1 + offset
    hi = NB
    if CAUSAL:
        last = (a0 + BLOCK_A - 1) * STRIDE + STRIDE - 1 + causal_offset
        hi = tl.minimum(tl.where(last >= 0, last // STRIDE + 1, 0), NB)
    m_i = tl.full([BLOCK_A], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_A], tl.float32)
    part_base = PART + (bh.to(tl.int64) * NA + offs_a[:, None]) * (NB // PER)
    tmax_base = TMAX + (bh.to(tl.int64) * NA + offs_a) * n_tiles
    for b0 in range(0, hi, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        s = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        for t in range(STRIDE * (HEAD_DIM // D_CHUNK)):  # the antidiagonal: query row stride-1-r meets key
            r = t // (HEAD_DIM // D_CHUNK)  # row r, one D_CHUNK slice of the head dimension at a time (a
            c = t % (HEAD_DIM // D_CHUNK) * D_CHUNK  # shorter step leaves shared memory for a deeper pipeline)
            if TMA:  # [B, H, N / STRIDE, STRIDE * D] descriptors: row STRIDE-1-r (Q), r (K) of every patch.
                # (2-D tiles the tensor cores read straight from shared memory; a [.., STRIDE, D] view's
                # tiles would go through registers)
                q = Q.load([b, h, a0, (STRIDE - 1 - r) * HEAD_DIM + c]).reshape(BLOCK_A, D_CHUNK)  # read (L2)
                kt = tl.trans(K.load([b, h // GROUP, b0, r * HEAD_DIM + c]).reshape(BLOCK_B, D_CHUNK))  # read
            else:
                q_rows = offs_a * STRIDE + (STRIDE - 1 - r)
                k_rows = offs_b * STRIDE + r
                offs_d = c + tl.arange(0, D_CHUNK)
                q = tl.load(q_base + q_rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                            mask=(q_rows[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)  # read (L2)
                kt = tl.load(k_base + k_rows[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                             mask=(k_rows[None, :] < Nk) & (offs_d[:, None] < D), other=0.0)  # read (L2)
            s += tl.dot(q, kt, input_precision=DOT_PREC)
        s = s * qk_scale  # base 2, with 1 / (sqrt(D) * stride)
        show = row_ok[:, None] & (offs_b[None, :] * STRIDE < Nk)
        if CAUSAL:  # a patch counts if its first key is visible to its last query
            show = show & (offs_b[None, :] * STRIDE <= offs_a[:, None] * STRIDE + STRIDE - 1 + causal_offset)
        s = tl.where(show, s, float("-inf"))
        m_t = tl.max(s, axis=1)
        m_t_safe = tl.where(m_t == float("-inf"), 0.0, m_t)  # a row with nothing visible here: e = 0
        e = tl.exp2(s - m_t_safe[:, None])
        block_sums = tl.sum(tl.reshape(e, [BLOCK_A, BLOCK_B // PER, PER]), axis=2)
        tl.store(part_base + (b0 // PER + tl.arange(0, BLOCK_B // PER))[None, :], block_sums)  # write, small
        tl.store(tmax_base + b0 // BLOCK_B, m_t_safe)
        m_new = tl.maximum(m_i, m_t)
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_new_safe) + tl.sum(e, axis=1) * tl.exp2(m_t_safe - m_new_safe)
        m_i = m_new
    # the softmax's denominators are known: rescale the stored sums and add each block's PER rows.
    # Other threads of this program wrote those sums: wait for all of them (a barrier also makes
    # their global writes visible) before reading them back in a different layout
    tl.debug_barrier()
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))  # empty row: p = 0
    out_rows = a0 // PER + tl.arange(0, BLOCK_A // PER)
    out_base = OUT + (bh.to(tl.int64) * (NA // PER) + out_rows[:, None]) * (NB // PER)
    for b0 in range(0, hi, BLOCK_B):
        w = tl.exp2(tl.load(tmax_base + b0 // BLOCK_B) - lse)  # [BLOCK_A]
        sums = tl.load(part_base + (b0 // PER + tl.arange(0, BLOCK_B // PER))[None, :]) * w[:, None]
        blocks = tl.sum(tl.reshape(sums, [BLOCK_A // PER, PER, BLOCK_B // PER]), axis=1)
        tl.store(out_base + (b0 // PER + tl.arange(0, BLOCK_B // PER))[None, :], blocks)


@triton.jit
def _select_blocks(SCORES, KEEP, BH, NKB, head_stride, row_stride, threshold, q_len, kv_len, block_size,
                   CAUSAL: tl.constexpr, BJ: tl.constexpr, BI: tl.constexpr):
    row = tl.program_id(0)  # a query block
    offs_j = tl.program_id(1) * BJ + tl.arange(0, BJ)  # the key blocks this program decides
    j_ok = offs_j < NKB
    s_j = tl.zeros([BJ], tl.float32)
    for h in range(BH):  # scores summed over batch and heads (the ranking does not need the mean)
        s_j += tl.load(SCORES + h * head_stride + row * row_stride + offs_j, mask=j_ok, other=0.0)
    before = tl.zeros([BJ], tl.float32)  # the score of the blocks ranked above each j
    total = 0.0
    for i0 in range(0, NKB, BI):
        offs_i = i0 + tl.arange(0, BI)
        i_ok = offs_i < NKB
        s_i = tl.zeros([BI], tl.float32)
        for h in range(BH):
            s_i += tl.load(SCORES + h * head_stride + row * row_stride + offs_i, mask=i_ok, other=0.0)
        total += tl.sum(s_i)
        above = (s_i[:, None] > s_j[None, :]) | ((s_i[:, None] == s_j[None, :]) & (offs_i[:, None] < offs_j[None, :]))
        before += tl.sum(tl.where(above & i_ok[:, None], s_i[:, None], 0.0), axis=0)
    keep = (before < threshold * total) & (s_j > 0)
    if CAUSAL:  # the block holding the diagonal of the row block's last query is always kept
        last_q = tl.minimum(row * block_size + block_size - 1, q_len - 1)
        diag = tl.minimum(tl.maximum(last_q + kv_len - q_len, 0) // block_size, NKB - 1)
        keep = keep | (offs_j == diag)
    tl.store(KEEP + row * NKB + offs_j, keep.to(tl.int8), mask=j_ok)


def expand_heads(k: torch.Tensor, heads: int) -> torch.Tensor:
    """``k [B, Hkv, N, D]`` with each head repeated for the ``heads // Hkv`` query heads that share it."""
    return k.repeat_interleave(heads // k.shape[1], dim=1) if k.shape[1] != heads else k


def reference_block_scores(q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int,
                           causal: bool = True) -> torch.Tensor:
    """The readable PyTorch form of the scores, float32 ``[B, H, n_q_blocks, n_k_blocks]``
    (``masks.antidiagonal_block_scores`` documents them and checks the arguments; it calls this).
    Shapes depend only on the inputs' shapes, so it runs on any device, ``meta`` included."""
    n_q, n_k, d = q.shape[2], k.shape[2], q.shape[-1]
    nq_b, nk_b = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
    # The product runs in the inputs' dtype (bf16 tensor cores for bf16 inputs: an estimate need not be
    # exact, and a float32 product costs more than the sparse attention it selects for); softmax in float32.
    # Under the interpreter bf16 is computed in float32, as in every op (DESIGN.md): the same blocks as the
    # same values in float32.
    work = compute_dtype(q.dtype)
    qf = torch.nn.functional.pad(q.to(work), (0, 0, 0, nq_b * block_size - n_q))
    kf = torch.nn.functional.pad(expand_heads(k.to(work), q.shape[1]), (0, 0, 0, nk_b * block_size - n_k))
    # antidiagonal of patch (a, b): sum over r of q[a*stride + stride-1-r] . k[b*stride + r]
    q_re = torch.cat([qf[:, :, stride - 1 - r::stride] for r in range(stride)], dim=-1)
    k_re = torch.cat([kf[:, :, r::stride] for r in range(stride)], dim=-1)
    s = (q_re @ k_re.transpose(-1, -2)).float() / (math.sqrt(d) * stride)  # [B, H, n_q/stride, n_k/stride]
    a_idx = torch.arange(s.shape[-2], device=q.device)[:, None]
    b_idx = torch.arange(s.shape[-1], device=q.device)[None, :]
    hide = (b_idx * stride >= n_k) | (a_idx * stride >= n_q)
    if causal:  # a patch counts if its first key is visible to its last query (bottom-right aligned)
        hide = hide | (b_idx * stride > a_idx * stride + stride - 1 + n_k - n_q)
    p = torch.softmax(s.masked_fill(hide, float("-inf")), dim=-1).nan_to_num(0.0)
    per = block_size // stride
    return p.view(*p.shape[:2], nq_b, per, nk_b, per).sum(dim=(3, 5))


def _scores_per_head(q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int, causal: bool) -> torch.Tensor:
    # [B*H, >= n_q_blocks, >= n_k_blocks] float32, the blocks past the ends (tile padding) left at 0
    n_q, n_k, d = q.shape[2], k.shape[2], q.shape[-1]
    per = block_size // stride
    nq_b, nk_b = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
    B, H = q.shape[:2]
    if q.dtype == torch.float64 or per > 128:  # no float64 tensor cores; a block wider than a tile
        return reference_block_scores(q, k, stride, block_size, causal).flatten(0, 1)
    if B * H == 0 or n_q == 0 or n_k == 0:  # no scores to compute (and no grid to launch): all 0
        return torch.zeros(B * H, nq_b, nk_b, dtype=torch.float32, device=q.device)
    # k in q's dtype; bf16 in float32 under the interpreter, whose bf16 tl.dot is wrong (DESIGN.md)
    work = compute_dtype(q.dtype)
    q, k = int32_addressable("q", q.to(work)), int32_addressable("k", k.to(work))  # 32-bit offsets inside a head
    head_dim = head_dim_pad(d)
    tiles = tile_config(head_dim, q.element_size())
    block_a = max(per, 32 if is_interpreter() else tiles["BLOCK_A"])
    block_b = max(per, 32 if is_interpreter() else tiles["BLOCK_B"])
    d_chunk = min(head_dim, 16) if is_interpreter() else tiles["D_CHUNK"]  # several slices in the CPU tests
    na = triton.cdiv(nq_b * per, block_a) * block_a  # patch rows, padded to whole tiles
    nb = triton.cdiv(nk_b * per, block_b) * block_b
    n_tiles = nb // block_b
    part = empty((B * H, na, nb // per), dtype=torch.float32, device=q.device)  # NaN when tests poison
    tmax = empty((B * H, na, n_tiles), dtype=torch.float32, device=q.device)
    out = torch.zeros(B * H, na // per, nb // per, dtype=torch.float32, device=q.device)  # skipped tiles: 0
    # descriptors of the patch views ([B, H, N / stride, stride * D]) need whole patches, each patch's
    # rows contiguous, and no padding of D (a wider tile would read the next row, not zeros)
    tma = ((is_interpreter() or tiles["TMA"]) and n_q % stride == 0 and n_k % stride == 0 and tma_ready(q, k)
           and d == head_dim and q.stride(2) == d and k.stride(2) == d)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        def patches(t, rows):  # [B, H, N, D] seen as [B, H, N / stride, stride * D]: one patch a row
            return TensorDescriptor(t, [*t.shape[:2], t.shape[2] // stride, stride * d],
                                    [*t.stride()[:2], t.stride(2) * stride, 1], [1, 1, rows, d_chunk])

    # the grid's second axis holds (batch, head), at most MAX_GRID_YZ: a larger batch goes in slices of
    # whole batch entries, each on views of q, k and of the [B*H, ...] buffers
    most = planning.decide("antidiagonal.max_grid_y", MAX_GRID_YZ)
    with on_device_of(q):
        for lo, hi in batch_slices(B, H, most, "antidiagonal_block_scores"):
            qs, ks = q[lo:hi], k[lo:hi]
            use_tma = tma and tma_ready(qs, ks)  # (a slice starts further in: its alignment is checked again)
            q_src, k_src = (patches(qs, block_a), patches(ks, block_b)) if use_tma else (qs, ks)
            rows = slice(lo * H, hi * H)
            _antidiagonal_scores[(na // block_a, (hi - lo) * H)](
                q_src, k_src, part[rows], tmax[rows], out[rows], *q.stride(), *k.stride(), H, H // k.shape[1],
                n_q, n_k, d, na, nb, n_tiles, n_k - n_q, LOG2E / (math.sqrt(d) * stride), CAUSAL=causal,
                STRIDE=stride, PER=per, BLOCK_A=block_a, BLOCK_B=block_b, HEAD_DIM=head_dim, D_CHUNK=d_chunk,
                TMA=use_tma, num_warps=4 if is_interpreter() else tiles["num_warps"],
                num_stages=1 if is_interpreter() else tiles["num_stages"], **dot_options(q.dtype))
    return out


def block_scores(q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int, causal: bool = True) -> torch.Tensor:
    """The antidiagonal block scores of ``masks.antidiagonal_block_scores``, averaged over batch and
    heads: float32 ``[n_q_blocks, n_k_blocks]``. Inputs are checked by the caller (``masks``)."""
    nq_b, nk_b = math.ceil(q.shape[2] / block_size), math.ceil(k.shape[2] / block_size)
    scores = _scores_per_head(q, k, stride, block_size, causal)[:, :nq_b, :nk_b]
    return scores.mean(0) if scores.shape[0] else scores.sum(0)  # no batch or heads: 0, not the NaN of a mean


def estimate_blocks(q: torch.Tensor, k: torch.Tensor, stride: int, threshold: float, block_size: int,
                    causal: bool = True) -> torch.Tensor:
    """XAttention's selection: bool ``[n_q_blocks, n_k_blocks]``, for each query block the best-scoring
    key blocks until they hold ``threshold`` of the row's score (ties: the smaller index first), plus
    the diagonal block when ``causal``. Two launches: the scores, then the ranking."""
    n_q, n_k = q.shape[2], k.shape[2]
    nq_b, nk_b = math.ceil(n_q / block_size), math.ceil(n_k / block_size)
    if nq_b == 0 or nk_b == 0:  # no queries or no keys: nothing to keep (and no grid to launch)
        return torch.zeros(nq_b, nk_b, dtype=torch.bool, device=q.device)
    scores = _scores_per_head(q, k, stride, block_size, causal)
    if scores.shape[0] == 0:  # no batch or heads: every score 0, so only the diagonal (causal) is kept
        scores = torch.zeros(1, *scores.shape[1:], dtype=torch.float32, device=q.device)
    # int8, the kernel's store (read back as bool): every element is written (mask j < NKB)
    keep = empty((nq_b, nk_b), dtype=torch.int8, device=q.device)
    bj = 32 if is_interpreter() else 64
    with on_device_of(q):
        _select_blocks[(nq_b, triton.cdiv(nk_b, bj))](
            scores, keep, scores.shape[0], nk_b, scores.stride(0), scores.stride(1), float(threshold), n_q, n_k,
            block_size, CAUSAL=causal, BJ=bj, BI=bj)
    return keep.view(torch.bool)
