"""mk.kv_cache.PagedKVCache: appends in several steps give the dense cache of one; freed pages are
reused; attention through the cache equals attention over the dense keys; clear errors."""

import pytest
import torch

import minikernels as mk
from minikernels.kv_cache import OutOfPagesError, PagedKVCache, dequantize, quantize_int8
from minikernels.testing import assert_close, poisoned, randn

DEVICE = mk.device()
HKV, D = 2, 16


def tokens(b, t, seed):
    return randn(b, HKV, t, D, seed=seed), randn(b, HKV, t, D, seed=seed + 1)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_appends_in_steps_equal_one_dense_cache(quantize):
    """Prefill of 21 tokens, then 1, then 30, for two sequences at once: the pages hold the dense cache
    (int8: its quantization), and attention over them equals attention over it."""
    cache = PagedKVCache(16, 16, HKV, D, dtype=torch.float32, quantize=quantize)
    ids = [cache.new_sequence(), cache.new_sequence()]
    k, v = tokens(2, 52, seed=1)
    for lo, hi in ((0, 21), (21, 22), (22, 52)):
        cache.append(ids, k[:, :, lo:hi], v[:, :, lo:hi])
    assert cache.seqlens(ids).tolist() == [52, 52] and cache.seqlens(ids).dtype == torch.int32
    assert cache.pages_free == 16 - 2 * 4  # ceil(52 / 16) pages each
    kd, vd = cache.gather(ids)
    if quantize:
        k, v = (dequantize(*quantize_int8(t)) for t in (k, v))  # per token: the same codes in any step
    assert torch.equal(kd, k) and torch.equal(vd, v)
    q = randn(2, 4, 1, D, seed=3)
    with poisoned():
        out = cache.attend(q, ids)
    assert_close(out, mk.reference.decode_attention(q.double(), k.double(), v.double()), name="cache.attend")


def test_sequences_of_different_lengths_interleave_their_pages():
    cache = PagedKVCache(8, 16, HKV, D, dtype=torch.float32)
    a, b = cache.new_sequence(), cache.new_sequence()
    ka, va = tokens(1, 40, seed=4)
    kb, vb = tokens(1, 10, seed=6)
    cache.append(a, ka[:, :, :20], va[:, :, :20])
    cache.append(b, kb, vb)
    cache.append(a, ka[:, :, 20:], va[:, :, 20:])
    assert cache.pages(a) == [0, 1, 3] and cache.pages(b) == [2]  # taken as each needed one
    table = cache.block_table([a, b])
    assert table.dtype == torch.int32 and table.tolist() == [[0, 1, 3], [2, 0, 0]]
    q = randn(2, 2, 1, D, seed=8)
    kd, vd = cache.gather([a, b])
    assert torch.equal(kd[0], ka[0]) and torch.equal(kd[1, :, :10], kb[0]) and not kd[1, :, 10:].any()
    with poisoned():
        out = cache.attend(q, [a, b])
    ref = mk.reference.decode_attention(q.double(), kd.double(), vd.double(), cache.seqlens([a, b]))
    assert_close(out, ref, name="two lengths")


def test_free_then_reuse_pages():
    cache = PagedKVCache(4, 16, HKV, D, dtype=torch.float32)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append([a, b], *tokens(2, 32, seed=9))
    assert cache.pages_free == 0
    freed = cache.pages(a)
    cache.free(a)
    assert cache.pages_free == 2 and cache.sequences == [b]
    c = cache.new_sequence()
    assert c not in (a, b)  # fresh ids are never handed out twice
    k, v = tokens(1, 20, seed=11)
    cache.append(c, k, v)
    assert sorted(cache.pages(c)) == sorted(freed)
    assert torch.equal(cache.gather(c)[0], k)  # the old contents are overwritten where it matters
    cache.free(b)
    cache.free(c)
    assert cache.pages_free == 4 and cache.sequences == []


def test_fixed_width_tables():
    cache = PagedKVCache(8, 16, HKV, D, dtype=torch.float32, max_pages_per_seq=3)
    a = cache.new_sequence()
    cache.append(a, *tokens(1, 17, seed=12))
    assert cache.block_table(a).shape == (1, 3)
    with pytest.raises(ValueError, match="max_pages_per_seq=3"):
        cache.append(a, *tokens(1, 32, seed=13))
    assert cache.length(a) == 17 and cache.pages_free == 6  # nothing was taken or written


def test_out_of_pages_writes_nothing():
    cache = PagedKVCache(3, 16, HKV, D, dtype=torch.float32)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append(a, *tokens(1, 16, seed=14))
    with pytest.raises(OutOfPagesError, match="needs 4 new pages, the pool has 2 free of 3"):
        cache.append([a, b], *tokens(2, 20, seed=15))
    assert cache.pages_free == 2 and cache.length(a) == 16 and cache.length(b) == 0


def test_bad_use():
    cache = PagedKVCache(4, 16, HKV, D, dtype=torch.float32)
    a = cache.new_sequence()
    with pytest.raises(KeyError, match=r"unknown sequence\(s\) \[7\]"):
        cache.append(7, *tokens(1, 1, seed=16))
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.free(7)
    with pytest.raises(ValueError, match="sequence 0 already exists"):
        cache.add(a)
    with pytest.raises(ValueError, match="seq_ids must be distinct"):
        cache.append([a, a], *tokens(2, 1, seed=17))
    with pytest.raises(ValueError, match=r"k must have shape \[B, Hkv, T, D\] = \[1, 2, T, 16\]"):
        cache.append(a, randn(1, 3, 1, D), randn(1, 3, 1, D))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        cache.append(a, randn(1, HKV, 2, D), randn(1, HKV, 1, D))
    with pytest.raises(TypeError, match="k must be a floating-point tensor"):
        cache.append(a, torch.ones(1, HKV, 1, D, dtype=torch.int32, device=DEVICE), randn(1, HKV, 1, D))
    with pytest.raises(ValueError, match="page_size must be a multiple of 16"):
        PagedKVCache(4, 24, HKV, D)
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        PagedKVCache(4, 16, HKV, D, quantize="int4")
    for dtype in (torch.float64, torch.int8, "float16"):  # decode_attention reads fp16, bf16, fp32 (int8 via quantize)
        with pytest.raises(TypeError, match="dtype must be torch.float16, torch.bfloat16 or torch.float32"):
            PagedKVCache(4, 16, HKV, D, dtype=dtype)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor \(quantize_int8\)"):
        quantize_int8(torch.ones(3, dtype=torch.int32))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_appending_tensors_that_require_grad_keeps_the_pools_out_of_autograd(quantize):
    """k and v straight from a model's projection (requires_grad) are stored as values: the pools (and
    scales) stay plain buffers, and attention through the cache needs no torch.no_grad()."""
    cache = PagedKVCache(8, 16, HKV, D, dtype=torch.float32, quantize=quantize)
    s = cache.new_sequence()
    proj = torch.nn.Linear(D, D).to(DEVICE)
    k, v = (proj(t) for t in tokens(1, 20, seed=30))
    cache.append(s, k, v)
    for t in (cache.k_pages, cache.v_pages, cache.k_scale, cache.v_scale):
        assert t is None or (not t.requires_grad and t.grad_fn is None)
    q = randn(1, 4, 1, D, seed=32)
    kd, vd = cache.gather(s)
    assert_close(cache.attend(q, s), mk.reference.decode_attention(q.double(), kd.double(), vd.double()),
                 name="cache.attend after appending tensors that require grad")


def test_sequence_ids_of_any_integer_type():
    """numpy integers and integer tensors name sequences as ints do; other ids, and a q whose batch is
    not one entry per id, are refused with the argument named."""
    np = pytest.importorskip("numpy")
    cache = PagedKVCache(8, 16, HKV, D, dtype=torch.float32)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append([a, b], *tokens(2, 18, seed=33))
    q = randn(2, 4, 1, D, seed=34)
    want = cache.attend(q, [a, b])
    for ids in (np.array([a, b]), torch.tensor([a, b]), [np.int64(a), torch.tensor(b)], list(torch.tensor([a, b]))):
        assert torch.equal(cache.attend(q, ids), want)
    assert torch.equal(cache.attend(q[1:], np.int64(b)), cache.attend(q[1:], b))
    assert torch.equal(cache.seqlens(torch.tensor(a)), cache.seqlens(a))
    for bad in ([float(a), b], torch.tensor([True, False]), "ab", [a, None]):
        with pytest.raises(TypeError, match="seq_ids must be"):
            cache.attend(q, bad)
    with pytest.raises(ValueError, match="q has a batch of 2 but 1 sequence id"):
        cache.attend(q, a)


def test_int8_pool_is_about_half_the_bytes():
    full = PagedKVCache(8, 16, HKV, 128, dtype=torch.float16)
    int8 = PagedKVCache(8, 16, HKV, 128, dtype=torch.float16, quantize="int8")
    assert int8.k_pages.dtype == torch.int8 and int8.k_scale.shape == (8, 16, HKV)
    assert int8.nbytes / full.nbytes == pytest.approx((128 + 4) / 256)  # codes and a float32 scale per vector


def test_int8_pages_are_stored_head_major():
    """int8 codes and scales keep one head's rows of a page contiguous (what the decode kernel reads);
    16-bit pages keep the token-major layout of FlashAttention and vLLM. Both have the documented shape."""
    full = PagedKVCache(4, 16, HKV, D)
    int8 = PagedKVCache(4, 16, HKV, D, quantize="int8")
    assert full.k_pages.shape == (4, 16, HKV, D) and full.k_pages.is_contiguous()
    for t in (int8.k_pages, int8.v_pages, int8.k_scale, int8.v_scale):
        assert t.shape[:3] == (4, 16, HKV) and t.transpose(1, 2).is_contiguous()
