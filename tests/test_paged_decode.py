"""mk.decode_attention on a paged cache (block_table) and on an int8 cache (k_scale, v_scale): against
the float64 reference, and against the dense kernel on the same keys.

The pages of a test cache are scattered at random over a pool larger than needed; the pool's spare
pages, the rows of each last page past the sequence's length and the positions past it are NaN (a
kernel that reads a key it should not fails), and the block-table entries past a sequence's pages hold
junk (-1, 2^30), which the kernel must not use: it clamps every entry it reads into the pool, so a
stray read of the table itself would only show under compute-sanitizer."""

import math

import pytest
import torch
from attention_utils import qkv
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels import planning
from minikernels._common import head_dim_pad
from minikernels.kv_cache import dequantize, quantize_int8
from minikernels.testing import assert_close, poisoned, randn, rel_error, test_dtypes

DEVICE = mk.device()
DTYPES = test_dtypes()
JUNK = (-1, 2**30)  # what a block table holds past a sequence's pages: never read


def scatter_pages(x, table, pool_pages, page_size, lengths, fill=float("nan")):
    """A dense ``x [B, Hkv, N, *rest]`` cut into pages ``[pool_pages, page_size, Hkv, *rest]`` placed where
    ``table [B, N / page_size]`` says; everything else (spare pages, rows at or past a sequence's
    length) is ``fill``."""
    b, hkv, n = x.shape[:3]
    per = table.shape[1]
    x = x.clone()
    past = torch.arange(n, device=x.device)[None, :] >= lengths.to(x.device)[:, None]  # [B, N]
    x[past[:, None].expand(b, hkv, n)] = fill
    padded = torch.full((b, hkv, per * page_size, *x.shape[3:]), fill, dtype=x.dtype, device=x.device)
    padded[:, :, :n] = x
    pages = padded.unflatten(2, (per, page_size)).movedim(1, 3)  # [B, per, page_size, Hkv, *rest]
    pool = torch.full((pool_pages, page_size, hkv, *x.shape[3:]), fill, dtype=x.dtype, device=x.device)
    pool[table.flatten().long()] = pages.flatten(0, 1)
    return pool


def paginate(kc, vc, page_size, lengths, seed=0, spare=3, scales=None):
    """The dense cache ``kc, vc [B, Hkv, N, D]`` (and int8 scales ``[B, Hkv, N]``) as a page pool, its
    block table (int32, junk past each sequence's pages) and the pages' scales."""
    b, _, n, _ = kc.shape
    per = max(1, math.ceil(n / page_size))
    pool_pages = b * per + spare
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(pool_pages, generator=g)[:b * per].view(b, per).to(torch.int32)
    fill = 0 if kc.dtype == torch.int8 else float("nan")
    kp, vp = (scatter_pages(t, table, pool_pages, page_size, lengths, fill) for t in (kc, vc))
    ks, vs = (scatter_pages(s, table, pool_pages, page_size, lengths) for s in scales) if scales else (None, None)
    used = torch.arange(per)[None, :] < ((lengths.cpu().long() + page_size - 1) // page_size)[:, None]
    junk = torch.tensor(JUNK, dtype=torch.int32)[torch.arange(b * per) % 2].view(b, per)
    return kp, vp, torch.where(used, table, junk).to(DEVICE), ks, vs


def lengths_of(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def check_paged(q, kc, vc, lengths, page_size, causal=False, seed=0, num_splits=None):
    """Paged decode == the reference on the dense keys, and == the dense kernel on them."""
    kp, vp, table, _, _ = paginate(kc, vc, page_size, lengths, seed=seed)
    with poisoned():
        out = mk.decode_attention(q, kp, vp, lengths, num_splits, causal, block_table=table)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = mk.reference.decode_attention(q.double(), kc.double(), vc.double(), lengths, causal=causal)
    assert_close(out, ref, q.dtype, name="paged vs reference")
    ref_paged = mk.reference.decode_attention(q.double(), kp.double(), vp.double(), lengths, causal=causal,
                                              block_table=table)
    assert_close(ref_paged, ref, torch.float64, name="the reference's paging")
    dense = mk.decode_attention(q, kc, vc, lengths, num_splits, causal)
    assert_close(out, dense, q.dtype, name="paged vs dense kernel")
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [16, 32, 48, 64])
def test_paged_equals_dense(page_size, dtype):
    """Grouped-query heads; lengths 0, 1, a partial last page and the full cache."""
    q, kc, vc = qkv(4, 4, 2, 1, 100, 32, dtype=dtype, seed=page_size)
    check_paged(q, kc, vc, lengths_of(0, 1, 57, 100), page_size)


@pytest.mark.parametrize("block_n,page_size", [(64, 16), (16, 64), (32, 48)])
def test_key_blocks_across_and_within_pages(block_n, page_size):
    """A key block may span several pages (64 keys over pages of 16) or lie inside one."""
    q, kc, vc = qkv(2, 2, 1, 2, 150, 16, seed=block_n)
    cfg = {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
    with planning.override({"decode.split": cfg}):
        check_paged(q, kc, vc, lengths_of(150, 77), page_size, causal=True, num_splits=3)


@pytest.mark.parametrize("causal", [False, True])
def test_several_query_rows(causal):
    q, kc, vc = qkv(2, 4, 1, 3, 70, 32, seed=3)
    check_paged(q, kc, vc, lengths_of(70, 2), 16, causal=causal)


@given(page_size=st.sampled_from([16, 32, 48, 64]), b=st.integers(1, 3), hkv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2, 4]), nq=st.integers(1, 2), causal=st.booleans(), nmax=st.integers(1, 130),
       data=st.data())
def test_random_page_tables(page_size, b, hkv, group, nq, causal, nmax, data):
    """Random shapes, lengths and permuted page tables (hypothesis, bounded examples)."""
    lengths = [data.draw(st.integers(0, nmax), label="length") for _ in range(b)]
    seed = data.draw(st.integers(0, 2**16), label="seed")
    q, kc, vc = qkv(b, hkv * group, hkv, nq, nmax, 16, seed=seed)
    check_paged(q, kc, vc, lengths_of(*lengths), page_size, causal=causal, seed=seed)


def test_default_lengths_fill_every_page():
    """Without cache_seqlens a sequence is max_pages * page_size long: every listed page is read."""
    q, kc, vc = qkv(2, 2, 2, 1, 64, 16, seed=4)
    kp, vp, table, _, _ = paginate(kc, vc, 32, lengths_of(64, 64))
    with poisoned():
        out = mk.decode_attention(q, kp, vp, block_table=table)
    assert_close(out, mk.reference.decode_attention(q.double(), kc.double(), vc.double()), name="full pages")


def test_shared_pages():
    """Two sequences may share pages (a common prompt): the table lists the same page twice."""
    q, kc, vc = qkv(2, 2, 1, 1, 48, 16, seed=5)
    kc[1, :, :32], vc[1, :, :32] = kc[0, :, :32], vc[0, :, :32]  # the first two pages are the same
    kp, vp, table, _, _ = paginate(kc, vc, 16, lengths_of(48, 48))
    table[1, :2] = table[0, :2]
    with poisoned():
        out = mk.decode_attention(q, kp, vp, lengths_of(48, 40), block_table=table)
    ref = mk.reference.decode_attention(q.double(), kc.double(), vc.double(), lengths_of(48, 40))
    assert_close(out, ref, name="shared pages")


def test_int64_block_table_and_strided_pages():
    q, kc, vc = qkv(2, 2, 2, 1, 40, 16, seed=6)
    lengths = lengths_of(40, 17)
    kp, vp, table, _, _ = paginate(kc, vc, 16, lengths)
    wide = torch.full((*kp.shape[:-1], 32), float("nan"), device=DEVICE)
    wide[..., ::2] = kp
    with poisoned():
        out = mk.decode_attention(q, wide[..., ::2], vp, lengths, block_table=table.long())
    assert_close(out, mk.reference.decode_attention(q.double(), kc.double(), vc.double(), lengths), name="strided")


@pytest.mark.parametrize("layout", ["column_major", "sliced", "sliced_int64"])
def test_block_table_that_is_not_row_major(layout):
    """A table is read through both its strides: a column-major or sliced view gives the row-major result."""
    q, kc, vc = qkv(3, 2, 1, 1, 70, 16, seed=14)
    lengths = lengths_of(70, 40, 17)
    kp, vp, table, _, _ = paginate(kc, vc, 16, lengths)
    if layout == "column_major":
        view = table.t().contiguous().t()
    else:
        wide = torch.full((3, 2 * table.shape[1]), -1, dtype=torch.int32, device=DEVICE)
        wide[:, ::2] = table
        view = wide[:, ::2] if layout == "sliced" else wide.long()[:, ::2]
    assert torch.equal(view, table) and view.stride(-1) != 1
    with poisoned():
        want = mk.decode_attention(q, kp, vp, lengths, block_table=table)
        out = mk.decode_attention(q, kp, vp, lengths, block_table=view)
    assert torch.equal(out, want)
    assert_close(out, mk.reference.decode_attention(q.double(), kc.double(), vc.double(), lengths), name=layout)


def test_empty_page_pool():
    """A pool of no pages: positive lengths are refused on the host; where that check is skipped (CUDA-graph
    capture, simulated here) the kernel reads nothing and returns zeros. The pool is an empty view into
    NaN pages, so a read of page -1 or 0 would show."""
    from minikernels import decode

    q, _, _ = qkv(2, 2, 1, 1, 16, 16, seed=15)
    nan_pages = torch.full((2, 16, 1, 16), float("nan"), device=DEVICE)
    pool = nan_pages[1:1]
    table = torch.zeros((2, 2), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = 0 is not a page of k_cache"):
        mk.decode_attention(q, pool, pool, lengths_of(20, 0), block_table=table)
    assert torch.equal(mk.decode_attention(q, pool, pool, lengths_of(0, 0), block_table=table), torch.zeros_like(q))
    capturing = decode._capturing
    decode._capturing = lambda device: True
    try:
        with poisoned():
            out = mk.decode_attention(q, pool, pool, lengths_of(20, 32), block_table=table)
    finally:
        decode._capturing = capturing
    assert torch.equal(out, torch.zeros_like(q))


def record_split_lengths(seen):
    """A ``decode.num_splits`` override that records the length it is asked to split, then splits in 64."""
    def choose(batch_kv_heads, max_len, block_n, device, paged, int8):
        seen.append(max_len)
        return 64
    return choose


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_split_count_follows_the_real_length(paged):
    """The splits are planned for the longest real sequence, not the cache's capacity (a wide table with
    short sequences would otherwise launch mostly empty programs); under CUDA-graph capture, where the
    lengths are not read on the host, for the capacity. The result is the reference's either way."""
    from minikernels import decode

    q, kc, vc = qkv(2, 2, 1, 1, 512, 16, seed=16)
    lengths = lengths_of(45, 3)
    ref = mk.reference.decode_attention(q.double(), kc.double(), vc.double(), lengths)
    kp, vp, table = (*paginate(kc, vc, 16, lengths)[:3],) if paged else (kc, vc, None)
    seen = []
    with planning.override({"decode.num_splits": record_split_lengths(seen)}), poisoned():
        out = mk.decode_attention(q, kp, vp, lengths, block_table=table)
        assert_close(out, ref, name="real length")
        mk.decode_attention(q, kp, vp, lengths_of(0, 0), block_table=table)
        capturing = decode._capturing
        decode._capturing = lambda device: True
        try:
            assert_close(mk.decode_attention(q, kp, vp, lengths, block_table=table), ref, name="capture")
        finally:
            decode._capturing = capturing
    assert seen == [45, 1, 512]


# --- int8 ----------------------------------------------------------------------------------------

def int8_cache(kc, vc):
    (kq, ks), (vq, vs) = quantize_int8(kc), quantize_int8(vc)
    return kq, vq, ks, vs


# Quantizing K and V to int8 (absmax per token and head) moves the output by about 1% of its norm for
# standard-normal inputs at these head dims: each element is rounded by at most max|x| / 254, about
# 1% of the largest element. The bound is three times that.
INT8_VS_FULL = 3e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_int8_cache(paged, dtype):
    """The kernel on codes and scales == the reference on the dequantized cache (the dtype's bound), and
    close to the attention over the cache before quantization (INT8_VS_FULL)."""
    q, kc, vc = qkv(3, 4, 2, 2, 90, 32, dtype=dtype, seed=7)
    lengths = lengths_of(90, 33, 0)
    kq, vq, ks, vs = int8_cache(kc, vc)
    if paged:
        kq, vq, table, ks, vs = paginate(kq, vq, 32, lengths, scales=(ks, vs))
    else:
        table = None
    with poisoned():
        out = mk.decode_attention(q, kq, vq, lengths, causal=True, block_table=table, k_scale=ks, v_scale=vs)
    assert out.dtype == dtype and out.shape == q.shape
    ref = mk.reference.decode_attention(q.double(), kq, vq, lengths, causal=True, block_table=table, k_scale=ks,
                                        v_scale=vs)
    assert_close(out, ref, dtype, name="int8 kernel vs reference on the dequantized cache")
    full = mk.reference.decode_attention(q.double(), kc.double(), vc.double(), lengths, causal=True)
    assert rel_error(out, full) < INT8_VS_FULL


def test_int8_with_bf16_queries():
    q, kc, vc = qkv(2, 2, 1, 1, 50, 32, dtype=torch.bfloat16, seed=8)
    kq, vq, ks, vs = int8_cache(kc, vc)
    with poisoned():
        out = mk.decode_attention(q, kq, vq, k_scale=ks, v_scale=vs)
    ref = mk.reference.decode_attention(q.double(), kq, vq, k_scale=ks, v_scale=vs)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, name="bf16 queries, int8 cache")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1.0, 1e-3, 1e-4])
def test_int8_small_values_keep_their_precision(magnitude, dtype):
    """Values of any magnitude: the value scales (max|v| / 127, ~1e-6 for values ~1e-4) must not push the
    scaled probabilities into float16's subnormals. Within the dtype's bound of the reference on the
    dequantized cache (bfloat16 runs in float32 under the interpreter, as on the GPU in bfloat16)."""
    q, kc, vc = qkv(2, 4, 2, 2, 200, 64, dtype=dtype, seed=17)
    kq, vq, ks, vs = int8_cache(kc, vc.float() * magnitude)
    with poisoned():
        out = mk.decode_attention(q, kq, vq, k_scale=ks, v_scale=vs)
    ref = mk.reference.decode_attention(q.double(), kq, vq, k_scale=ks, v_scale=vs)
    assert_close(out, ref, dtype, name=f"int8 values ~{magnitude}")


@pytest.mark.parametrize("dtype, magnitude", [(torch.float16, 1e-6), (torch.float16, 1.0), (torch.float16, 100.0),
                                              (torch.bfloat16, 1e-6), (torch.bfloat16, 1.0), (torch.bfloat16, 1e5)])
def test_int8_queries_of_any_magnitude(magnitude, dtype):
    """Queries far from 1 against an int8 cache (float16 ones down among its subnormals; bfloat16 ones
    past float16's range), and a query row of zeros, which gets the mean of the values."""
    q, kc, vc = qkv(2, 4, 1, 2, 150, 64, dtype=dtype, seed=23)
    q = (q.float() * magnitude).to(dtype)
    q[1, 2] = 0.0
    kq, vq, ks, vs = int8_cache(kc, vc)
    with poisoned():
        out = mk.decode_attention(q, kq, vq, k_scale=ks, v_scale=vs)
    ref = mk.reference.decode_attention(q.double(), kq, vq, k_scale=ks, v_scale=vs)
    assert out.isfinite().all()
    assert_close(out, ref, dtype, name=f"int8 cache, queries ~{magnitude}")


def every_code_cache(b, hkv, n, d):
    """An int8 cache ``[b, hkv, n, d]`` in which every lane runs through all 256 codes, -128 to 127, along
    the keys (n >= 256), each lane from its own starting code."""
    keys = torch.arange(b * hkv * n, device=DEVICE).view(b, hkv, n, 1)
    lanes = torch.arange(d, device=DEVICE).view(1, 1, 1, d)
    codes = (keys + 97 * lanes) % 256 - 128
    assert codes.min() == -128 and codes.max() == 127
    return codes.to(torch.int8)


def test_int8_every_code_value():
    """Codes from -128 to 127 (quantize_int8 makes -127..127; a user's cache may hold -128)."""
    q = randn(2, 4, 1, 32, dtype=torch.float16, seed=29)
    kq, vq = every_code_cache(2, 2, 300, 32), every_code_cache(2, 2, 300, 32).flip(2)
    ks = torch.rand(2, 2, 300, device=DEVICE) * 0.02
    vs = torch.rand(2, 2, 300, device=DEVICE) * 0.02
    with poisoned():
        out = mk.decode_attention(q, kq, vq, k_scale=ks, v_scale=vs)
    ref = mk.reference.decode_attention(q.double(), kq, vq, k_scale=ks, v_scale=vs)
    assert_close(out, ref, torch.float16, name="every int8 code")


def test_quantize_round_trip():
    x = randn(3, 2, 40, 16, seed=9, scale=3.0)
    x[0, 0, 5] = 0.0  # a zero row: scale 0, codes 0, no NaN
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    assert codes.abs().max() <= 127
    err = (dequantize(codes, scale) - x).abs()
    assert (err <= scale[..., None] / 2 + 1e-6).all()  # rounding: at most half a step
    assert torch.equal(dequantize(codes, scale)[0, 0, 5], torch.zeros(16, device=DEVICE))


# --- bad input -----------------------------------------------------------------------------------

def test_bad_block_table():
    q, kc, vc = qkv(2, 2, 1, 1, 32, 16, seed=10)
    lengths = lengths_of(32, 20)
    kp, vp, table, _, _ = paginate(kc, vc, 16, lengths)
    with pytest.raises(TypeError, match="block_table must be an int32"):
        mk.decode_attention(q, kp, vp, lengths, block_table=table.float())
    with pytest.raises(TypeError, match="block_table must be an int32"):
        mk.decode_attention(q, kp, vp, lengths, block_table=table.tolist())
    with pytest.raises(ValueError, match=r"block_table must have shape \[B, max_pages\] with B = 2"):
        mk.decode_attention(q, kp, vp, lengths, block_table=table[:1])
    with pytest.raises(ValueError, match="block_table is on meta"):
        mk.decode_attention(q, kp, vp, lengths, block_table=table.to("meta"))
    for bad in (-1, kp.shape[0]):  # a used page outside the pool
        t = table.clone()
        t[1, 1] = bad
        with pytest.raises(ValueError, match=rf"block_table\[1, 1\] = {bad} is not a page of k_cache"):
            mk.decode_attention(q, kp, vp, lengths, block_table=t)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, max_pages \* page_size=32\]"):
        mk.decode_attention(q, kp, vp, lengths_of(33, 1), block_table=table)
    with pytest.raises(ValueError, match="page_size .* must be a positive multiple of 16"):
        mk.decode_attention(q, kp[:, :8], vp[:, :8], lengths_of(8, 8), block_table=table)
    with pytest.raises(ValueError, match=r"k_cache/v_cache heads \(3\) must divide q heads \(2\)"):
        mk.decode_attention(q, kp.expand(-1, -1, 3, -1), vp.expand(-1, -1, 3, -1), lengths, block_table=table)
    with pytest.raises(ValueError, match="k_cache must have 4 dimensions"):
        mk.decode_attention(q, kp[0], vp, lengths, block_table=table)


def test_int64_block_table_is_checked_before_it_is_narrowed():
    """An int64 entry that int32 would wrap onto a page of the pool (2^32 + 1 -> page 1) is refused, not read."""
    q, kc, vc = qkv(2, 2, 1, 1, 32, 16, seed=10)
    lengths = lengths_of(32, 20)
    kp, vp, table, _, _ = paginate(kc, vc, 16, lengths)
    for bad in (2**32, 2**32 + 1, -(2**32)):
        t = table.long()
        t[1, 1] = bad
        with pytest.raises(ValueError, match=rf"block_table\[1, 1\] = {bad} is not a page of k_cache"):
            mk.decode_attention(q, kp, vp, lengths, block_table=t)
    t = table.long()
    t[1, 1:] = 2**40  # past the sequence's pages: never read, so any value is allowed
    t[1, 1] = table[1, 1]
    assert torch.equal(mk.decode_attention(q, kp, vp, lengths, block_table=t),
                       mk.decode_attention(q, kp, vp, lengths, block_table=table))


def test_paged_cache_of_another_dtype_than_q():
    q, kc, vc = qkv(2, 2, 1, 1, 32, 16, dtype=torch.float32, seed=10)
    lengths = lengths_of(32, 20)
    kp, vp, table, _, _ = paginate(kc, vc, 16, lengths)
    with pytest.raises(TypeError, match="q, k_cache, v_cache must share one dtype .*float16, torch.float32"):
        mk.decode_attention(q.half(), kp, vp, lengths, block_table=table)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("int8", [False, True])
def test_batches_larger_than_one_grid_launch_in_slices(paged, int8):
    """More (sequence, kv head) pairs than a grid's second axis holds (65535 on CUDA; 5 here, through the
    override) are launched in slices of whole sequences (2, 2 and 1 of the 5): the same output, bit for
    bit, with lengths and left padding read for the right sequences."""
    q, kc, vc = qkv(5, 4, 2, 1, 70, 32, seed=21)
    lengths, leftpad = lengths_of(70, 33, 0, 1, 64), lengths_of(0, 5, 0, 0, 17)
    scales = {}
    if int8:
        kc, vc, ks, vs = int8_cache(kc, vc)
        scales = {"k_scale": ks, "v_scale": vs}
    extra = scales
    if paged:
        kc, vc, table, ksp, vsp = paginate(kc, vc, 16, lengths, scales=(ks, vs) if int8 else None)
        extra = {"block_table": table, **({"k_scale": ksp, "v_scale": vsp} if int8 else {})}
    whole = mk.decode_attention(q, kc, vc, lengths, 3, cache_leftpad=leftpad, **extra)
    with planning.override({"decode.max_grid_y": 5}), poisoned():
        sliced = mk.decode_attention(q, kc, vc, lengths, 3, cache_leftpad=leftpad, **extra)
    assert torch.equal(sliced, whole)
    if not paged:
        ref = mk.reference.decode_attention(q.double(), kc if int8 else kc.double(), vc if int8 else vc.double(),
                                            lengths, cache_leftpad=leftpad, **scales)
        assert_close(sliced, ref, q.dtype, name="sliced launches vs reference")
        if not int8:  # every sequence full (no lengths tensor at all)
            full = mk.decode_attention(q, kc, vc, num_splits=3)
            with planning.override({"decode.max_grid_y": 4}), poisoned():
                assert torch.equal(mk.decode_attention(q, kc, vc, num_splits=3), full)
    with planning.override({"decode.max_grid_y": 1}), pytest.raises(ValueError, match="2 heads are more than"):
        mk.decode_attention(q, kc, vc, lengths, **extra)


def test_bad_scales():
    q, kc, vc = qkv(2, 2, 1, 1, 32, 16, seed=11)
    kq, vq, ks, vs = int8_cache(kc, vc)
    with pytest.raises(ValueError, match="needs both k_scale and v_scale.*v_scale is missing"):
        mk.decode_attention(q, kq, vq, k_scale=ks)
    with pytest.raises(ValueError, match="k_scale and v_scale are for an int8 cache"):
        mk.decode_attention(q, kc, vc, k_scale=ks, v_scale=vs)
    with pytest.raises(TypeError, match="k_scale has dtype float16"):
        mk.decode_attention(q, kq, vq, k_scale=ks.half(), v_scale=vs)
    with pytest.raises(ValueError, match=r"v_scale must have shape k_cache.shape\[:-1\] = \(2, 1, 32\)"):
        mk.decode_attention(q, kq, vq, k_scale=ks, v_scale=vs[..., :-1])
    with pytest.raises(TypeError, match="v_cache has dtype float32; supported dtypes are int8"):
        mk.decode_attention(q, kq, vc, k_scale=ks, v_scale=vs)


def test_scales_that_require_grad_are_refused():
    q, kc, vc = qkv(1, 2, 1, 1, 16, 16, seed=18)
    kq, vq, ks, vs = int8_cache(kc, vc)
    for name in ("k_scale", "v_scale"):
        scales = {"k_scale": ks, "v_scale": vs, name: (ks if name == "k_scale" else vs).clone().requires_grad_()}
        with pytest.raises(RuntimeError, match="decode_attention is forward-only"):
            mk.decode_attention(q, kq, vq, **scales)
        with torch.no_grad():
            mk.decode_attention(q, kq, vq, **scales)


def test_int8_without_scales_is_refused_as_before_for_other_dtypes():
    q, kc, vc = qkv(1, 2, 1, 1, 16, 16, seed=12)
    with pytest.raises(TypeError, match="k_cache has dtype int32"):
        mk.decode_attention(q, kc.int(), vc.int())


def test_int8_estimate_counts_what_the_dense_estimate_counts():
    """The int8 kernel's shared memory is the dense kernel's at one stage (the rows, K and V converted to
    the rows' dtype, float32's split in shared memory from 64 rows and its staged P below) plus the
    pipeline's int8 copies of K and V, one byte an element."""
    from minikernels import decode

    for elem, prec in ((2, {}), (4, {}), (4, {"DOT_PREC": "tf32"})):
        for rows in (16, 32, 64, 128):
            for d in (16, 100, 256):
                one = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 1, **prec}
                int8_blocks = 2 * 64 * head_dim_pad(d)
                assert decode.smem_need_int8(rows, one, d, elem) == decode.smem_need(rows, one, d, elem) + int8_blocks
                for stages in (2, 3, 4):
                    more = decode.smem_need_int8(rows, {**one, "num_stages": stages}, d, elem)
                    assert more == decode.smem_need_int8(rows, one, d, elem) + (stages - 2) * int8_blocks


@pytest.mark.parametrize("gpu,limit", [("H100", 232448), ("A100", 166912), ("RTX 4090", 101376)])
def test_int8_planner_stays_within_its_budget(gpu, limit):
    """The planner's arithmetic: the int8 tiles it picks fit each GPU's limit by its own estimate
    (``smem_need_int8``), for every query dtype and head dim. It does not ask the compiler; whether the
    estimate holds on a real GPU is test_gpu_int8_large_head_dim's job."""
    from minikernels import decode
    from minikernels._common import SMEM_MARGIN

    for elem in (4, 2):
        for d in (16, 64, 128, 256):
            for rows in (16, 64, 128):
                cfg = decode.tile_config(rows, d, elem, limit, int8_cache=True)
                smallest = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
                smallest.update({"DOT_PREC": "tf32"} if elem == 4 else {})
                if decode.smem_need_int8(rows, smallest, d, elem) > limit - SMEM_MARGIN:  # the rows alone fill it
                    assert gpu != "H100" and rows >= 64 and (elem == 4 or d > 128), (elem, d, rows)
                    assert cfg == smallest  # the least it can ask for; the compiler has the last word
                else:
                    assert decode.smem_need_int8(rows, cfg, d, elem) <= limit - SMEM_MARGIN, (elem, d, rows, cfg)
    assert decode.tile_config(16, 128, 2, 232448, int8_cache=True)["BLOCK_N"] == 128


@pytest.mark.parametrize("int8", [False, True], ids=["16bit", "int8"])
def test_pools_beyond_32_bit_offsets(int8):
    """A pool whose offsets fit 32 bits is addressed in 32-bit arithmetic, a larger one in 64-bit. The
    ``int32_limit`` override stands in for a pool of more than 2^31 elements: set to one page's span, the
    page slices still fit (the host copies nothing) but the pool does not, so the host switches to the
    64-bit variant, and both variants give the reference's result."""
    from minikernels import decode

    q, kc, vc = qkv(2, 4, 2, 1, 100, 32, seed=21)
    lengths = lengths_of(100, 41)
    scales, ref_scales = {}, {}
    if int8:
        kc, vc, ks, vs = int8_cache(kc, vc)
        kp, vp, table, ksp, vsp = paginate(kc, vc, 16, lengths, scales=(ks, vs))
        scales, ref_scales = {"k_scale": ksp, "v_scale": vsp}, {"k_scale": ks, "v_scale": vs}
    else:
        kp, vp, table, _, _ = paginate(kc, vc, 16, lengths)
        kc, vc = kc.double(), vc.double()
    ref = mk.reference.decode_attention(q.double(), kc, vc, lengths, **ref_scales)
    pools = (kp, vp, *scales.values())
    one_page = kp[0].numel()  # the span of one page slice [page_size, Hkv, D] is one_page - 1
    for limit, fits in ((None, True), (one_page, False)):
        with planning.override({} if limit is None else {"int32_limit": limit}):
            assert decode._pools_fit_int32(*pools) is fits
            with poisoned():
                out = mk.decode_attention(q, kp, vp, lengths, block_table=table, **scales)
        assert_close(out, ref, q.dtype, name=f"int32_limit={limit}")


def test_register_cap_keeps_three_int8_programs_an_sm():
    """On a GPU the int8 kernel at 4 warps is capped at 168 registers a thread: 3 programs of 128
    threads then fit an SM's 65536 registers, the occupancy the split count plans for. No cap for a
    16-bit cache, float32 queries, large tiles, 8 warps or an override that sets its own (and none
    under the interpreter, where decode_attention does not ask)."""
    from minikernels import decode

    cfg = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
    cap = decode._register_cap(cfg, True, 16, 128, 2)["maxnreg"]
    assert cap == 168 and cap % 8 == 0
    assert decode.PROGRAMS_PER_SM * cap * 32 * cfg["num_warps"] <= decode.REGISTERS_PER_SM
    assert decode.PROGRAMS_PER_SM * (cap + 8) * 32 * cfg["num_warps"] > decode.REGISTERS_PER_SM
    assert decode._register_cap({"BLOCK_N": 128}, True, 16, 128, 2) == {"maxnreg": 168}  # 4 warps by default
    assert decode._register_cap(cfg, False, 16, 128, 2) == {}
    assert decode._register_cap(cfg, True, 16, 128, 4) == {}  # float32 queries
    assert decode._register_cap(cfg, True, 16, 256, 2) == {} and decode._register_cap(cfg, True, 64, 128, 2) == {}
    assert decode._register_cap({**cfg, "num_warps": 8}, True, 16, 128, 2) == {}
    assert decode._register_cap({**cfg, "maxnreg": 200}, True, 16, 128, 2) == {}


def test_split_count_per_sm():
    """On a GPU a 16-bit cache is split into one wave of two programs an SM (an SM holds three); an int8
    cache so that its programs fill at least 90% of the waves of three an SM they take. On 132 SMs at 64k
    keys: with 64 (batch, kv head) pairs 4 splits for bf16 (256 programs), 6 for int8 (384: 0.97 of a
    wave of 396); with 256 pairs 1 for bf16, 3 for int8 (1.94 waves)."""
    from minikernels import decode

    sms, wave = 132, 3 * 132
    assert decode._splits_for_sms(64, 65536, 64, sms, False) == 4
    assert decode._splits_for_sms(64, 65536, 128, sms, True) == 6
    assert decode._splits_for_sms(256, 65536, 64, sms, False) == 1
    assert decode._splits_for_sms(256, 65536, 128, sms, True) == 3
    assert decode._splits_for_sms(8, 65536, 64, sms, False) == 33
    assert decode._splits_for_sms(1, 65536, 64, sms, False) == decode.MAX_SPLITS
    assert decode._splits_for_sms(64, 1024, 64, sms, False) == 2  # a split keeps at least 8 blocks
    assert decode._splits_for_sms(256, 1024, 128, sms, True) == 1
    for pairs in range(1, 1200, 7):
        s = decode._fill_waves(wave // pairs, pairs, wave)
        programs = s * pairs
        assert s == decode.MAX_SPLITS or programs >= 0.9 * wave * math.ceil(programs / wave), pairs
        assert all(t * pairs < 0.9 * wave * math.ceil(t * pairs / wave) for t in range(max(wave // pairs, 1), s))


# --- GPU sweeps ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("int8", [False, True], ids=["16bit", "int8"])
def test_gpu_paged_every_dtype_and_head_dim(int8, page_size, d, dtype):
    """Every dtype, head dim and page size runs (the tiles fit this GPU), int8 and paged together."""
    q, kc, vc = qkv(3, 8, 2, 2, 700, d, dtype=dtype, seed=d + page_size)
    lengths = lengths_of(700, 1, 333)
    if not int8:
        check_paged(q, kc, vc, lengths, page_size, causal=True)
        return
    kq, vq, ks, vs = int8_cache(kc, vc)
    kq, vq, table, ks, vs = paginate(kq, vq, page_size, lengths, scales=(ks, vs))
    with poisoned():
        out = mk.decode_attention(q, kq, vq, lengths, causal=True, block_table=table, k_scale=ks, v_scale=vs)
    ref = mk.reference.decode_attention(q.double(), kq, vq, lengths, causal=True, block_table=table, k_scale=ks,
                                        v_scale=vs)
    assert_close(out, ref, dtype, name="int8 paged")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [16, 64, 128])
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_gpu_int8_large_head_dim(paged, rows, dtype):
    """int8 at D = 256 with 16, 64 and 128 query rows per program (the older MMA below 64 rows, the
    warp-group MMA from 64; float32's split operands): the compiled tiles fit this GPU's shared memory
    (or step down) and the result is right."""
    q, kc, vc = qkv(2, rows // 2, 1, 2, 1500, 256, dtype=dtype, seed=rows)
    lengths = lengths_of(1500, 611)
    kq, vq, ks, vs = int8_cache(kc, vc)
    table = None
    if paged:
        kq, vq, table, ks, vs = paginate(kq, vq, 64, lengths, scales=(ks, vs))
    with poisoned():
        out = mk.decode_attention(q, kq, vq, lengths, causal=True, block_table=table, k_scale=ks, v_scale=vs)
    ref = mk.reference.decode_attention(q.double(), kq, vq, lengths, causal=True, block_table=table, k_scale=ks,
                                        v_scale=vs)
    assert_close(out, ref, dtype, name=f"int8 D=256, {rows} rows")


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_gpu_batch_beyond_the_grid_limit(paged):
    """4100 sequences of 16 kv heads: 65600 (sequence, kv head) pairs, more than a CUDA grid's second
    axis holds, so the split kernel is launched in slices; the output equals two calls on halves of the
    batch (each within the limit), bit for bit, and the reference on some of its sequences."""
    b, hkv, n = 4100, 16, 160  # 2 splits of a 160-key cache: the merge combines partials of every slice
    q, kc, vc = qkv(b, hkv, hkv, 1, n, 64, dtype=torch.bfloat16, seed=41)
    lengths = (torch.arange(b, device=DEVICE) % (n + 1)).to(torch.int32)
    extra = {}
    if paged:
        kc, vc, table, _, _ = paginate(kc, vc, 16, lengths)
        extra = {"block_table": table}
    with poisoned():
        out = mk.decode_attention(q, kc, vc, lengths, 2, **extra)
    half = b // 2
    for lo, hi in ((0, half), (half, b)):
        part = {"block_table": table[lo:hi]} if paged else {}
        k_part, v_part = (kc, vc) if paged else (kc[lo:hi], vc[lo:hi])
        assert torch.equal(out[lo:hi], mk.decode_attention(q[lo:hi], k_part, v_part, lengths[lo:hi], 2, **part))
    some = torch.tensor([0, 1, 160, 161, 2049, 4098, 4099], device=DEVICE)
    dense_k, dense_v = qkv(b, hkv, hkv, 1, n, 64, dtype=torch.bfloat16, seed=41)[1:]
    ref = mk.reference.decode_attention(q[some].double(), dense_k[some].double(), dense_v[some].double(),
                                        lengths[some])
    assert_close(out[some], ref, torch.bfloat16, name="a batch beyond one grid")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_gpu_int8_every_code_value(paged, dtype):
    """Every code value, -128 to 127, in a cache long enough for several splits, dense and paged."""
    q = randn(3, 8, 1, 128, dtype=dtype, seed=31)
    lengths = lengths_of(900, 1, 517)
    kq, vq = every_code_cache(3, 2, 900, 128), every_code_cache(3, 2, 900, 128).flip(2)
    ks = torch.rand(3, 2, 900, device=DEVICE) * 0.02
    vs = torch.rand(3, 2, 900, device=DEVICE) * 0.02
    table = None
    if paged:
        kq, vq, table, ks, vs = paginate(kq, vq, 64, lengths, scales=(ks, vs))
    with poisoned():
        out = mk.decode_attention(q, kq, vq, lengths, block_table=table, k_scale=ks, v_scale=vs)
    ref = mk.reference.decode_attention(q.double(), kq, vq, lengths, block_table=table, k_scale=ks, v_scale=vs)
    assert_close(out, ref, dtype, name="int8, every code")


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_gpu_long_paged_cache(int8, page_size):
    """A 64k-token cache, bf16 queries, 8 query heads over 2 kv heads."""
    n = 65536
    q = randn(2, 8, 1, 128, dtype=torch.bfloat16, seed=1)
    kc = randn(2, 2, n, 128, dtype=torch.bfloat16, seed=2)
    vc = randn(2, 2, n, 128, dtype=torch.bfloat16, seed=3)
    lengths = lengths_of(n, n - 1000)
    ks = vs = None
    if int8:
        kc, vc, ks, vs = int8_cache(kc, vc)
        kc, vc, table, ks, vs = paginate(kc, vc, page_size, lengths, scales=(ks, vs))
    else:
        kc, vc, table, _, _ = paginate(kc, vc, page_size, lengths)
    with poisoned():
        out = mk.decode_attention(q, kc, vc, lengths, block_table=table, k_scale=ks, v_scale=vs)
    ref = mk.reference.decode_attention(q.double(), kc if int8 else kc.double(), vc if int8 else vc.double(),
                                        lengths, block_table=table, k_scale=ks, v_scale=vs)
    assert_close(out, ref, torch.bfloat16, name="64k paged")


@pytest.mark.gpu
def test_gpu_paged_decode_in_a_cuda_graph():
    """Captured in a CUDA graph (no host checks there), replayed with new lengths and a new table."""
    q, kc, vc = qkv(2, 4, 2, 1, 256, 64, dtype=torch.float16, seed=13)
    lengths = lengths_of(256, 100)
    kp, vp, table, _, _ = paginate(kc, vc, 16, lengths_of(256, 256))
    table_in, lengths_in = table.clone(), lengths.clone()
    mk.decode_attention(q, kp, vp, lengths_in, block_table=table_in)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mk.decode_attention(q, kp, vp, lengths_in, block_table=table_in)
    for new in (lengths_of(256, 100), lengths_of(17, 200)):
        lengths_in.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        ref = mk.reference.decode_attention(q.double(), kc.double(), vc.double(), new)
        assert_close(out, ref, torch.float16, name="graph replay")


def test_programmatic_launch_for_16bit_caches_where_the_gpu_has_it():
    """The launch that overlaps the kernel ahead is on for 16-bit caches and off for int8 ones unless the
    "decode.pdl" override says otherwise, and only on a CUDA device of compute capability 9 or more
    (Hopper): never for the interpreter or CPU tensors, whatever the override says. A function override
    is asked per cache (int8 or not)."""
    from minikernels import decode

    hopper = DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE)[0] >= 9
    capable = hopper and decode.gdc_wait is not None  # (Triton >= 3.3)
    assert decode.use_pdl(DEVICE) is capable and decode.use_pdl(DEVICE, True) is False
    with planning.override({"decode.pdl": True}):
        assert decode.use_pdl(torch.device("cpu")) is False
        assert decode.use_pdl(DEVICE, True) is capable
    with planning.override({"decode.pdl": False}):
        assert decode.use_pdl(DEVICE) is False
    with planning.override({"decode.pdl": lambda device, int8: int8}):
        assert decode.use_pdl(DEVICE, False) is False
        assert decode.use_pdl(DEVICE, True) is capable


def _chained_steps(q, kc, vc, steps, **kwargs):
    """``steps`` decode calls, each on the previous one's output as its queries, every other one right
    after a PyTorch kernel negated the values: each call reads what the kernel just ahead of it wrote."""
    outs = []
    for step in range(steps):
        if step % 2:
            vc.neg_()
        q = mk.decode_attention(q, kc, vc, **kwargs)
        outs.append(q)
    return torch.stack(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1], ids=["split", "one_split"])  # one: a merge of one split
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_gpu_chained_calls_wait_for_the_kernel_ahead(paged, num_splits):
    """Launched with programmatic dependent launch (Hopper; forced through the "decode.pdl" override),
    a split kernel may start before the kernel ahead of it in the stream ends, and the merge before the
    splits end; both wait before they touch memory. A chain of calls that each read what the kernel just
    ahead wrote gives, eagerly and replayed from a CUDA graph, bit for bit what the same chain gives
    launched plainly (the launch changes no arithmetic), and its first step equals the reference."""
    q, kc, vc = qkv(4, 8, 2, 1, 3008, 128, dtype=torch.bfloat16, seed=61)
    lengths = lengths_of(3008, 2999, 1700, 64)  # the longest fills the cache: under capture as outside
    kwargs = {"cache_seqlens": lengths, "num_splits": num_splits}
    if paged:
        kc, vc, table, _, _ = paginate(kc, vc, 16, lengths)
        kwargs["block_table"] = table
    from minikernels.decode import use_pdl

    v0 = vc.clone()
    with planning.override({"decode.pdl": False}):
        plain = _chained_steps(q, kc, vc, 6, **kwargs)
    with planning.override({"decode.pdl": True}):
        if not use_pdl(DEVICE):
            pytest.skip("programmatic dependent launch needs compute capability 9 and Triton >= 3.3")
        vc.copy_(v0)
        chained = _chained_steps(q, kc, vc, 6, **kwargs)
        assert torch.equal(chained, plain)
        graph = torch.cuda.CUDAGraph()
        vc.copy_(v0)
        with torch.cuda.graph(graph):
            replayed = _chained_steps(q, kc, vc, 6, **kwargs)
    for _ in range(2):
        vc.copy_(v0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, plain)
    ref = mk.reference.decode_attention(q.double(), kc.double(), v0.double(), lengths, block_table=kwargs.get(
        "block_table"))
    assert_close(plain[0], ref, torch.bfloat16, name="first step")


@pytest.mark.parametrize("page_size", [16, 64])  # under the interpreter: blocks across pages, within one
@pytest.mark.parametrize("int8", [False, True], ids=["16bit", "int8"])  # int8 reads the table a block ahead
@pytest.mark.parametrize("num_splits", [None, 3])
def test_left_padding_through_pages(page_size, int8, num_splits):
    q, kc, vc = qkv(3, 4, 2, 1, 150, 32, seed=3)
    lengths, leftpad = lengths_of(150, 77, 20), lengths_of(0, 40, 19)
    scales = {}
    if int8:
        kc, vc, ks, vs = int8_cache(kc, vc)
        kp, vp, table, ksp, vsp = paginate(kc, vc, page_size, lengths, scales=(ks, vs))
        scales, ref_scales = {"k_scale": ksp, "v_scale": vsp}, {"k_scale": ks, "v_scale": vs}
    else:
        kp, vp, table, _, _ = paginate(kc, vc, page_size, lengths)
        kc, vc, ref_scales = kc.double(), vc.double(), {}
    with poisoned():
        out = mk.decode_attention(q, kp, vp, lengths, num_splits, block_table=table, cache_leftpad=leftpad, **scales)
    ref = mk.reference.decode_attention(q.double(), kc, vc, lengths, cache_leftpad=leftpad, **ref_scales)
    assert_close(out, ref, q.dtype, name="paged decode with cache_leftpad")
