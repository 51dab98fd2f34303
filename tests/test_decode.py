"""mk.decode_attention (split-KV) against the reference, for every cache length including 1, and the
split merge against one pass."""

import pytest
import torch
from attention_utils import qkv

import minikernels as mk
from minikernels.decode import merge_partials
from minikernels.testing import assert_close, poisoned, randn, strided_like, test_dtypes

DEVICE = mk.device()  # cache_seqlens must live with q (no silent host-device copies)

DTYPES = test_dtypes()


def check_decode(q, kc, vc, lengths=None, num_splits=None, causal=False):
    with poisoned():
        out = mk.decode_attention(q, kc, vc, lengths, num_splits=num_splits, causal=causal)
    ref = mk.reference.decode_attention(q.double(), kc.double(), vc.double(), lengths, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, q.dtype, name="decode")
    return out


def test_every_cache_length():
    q, kc, vc = qkv(1, 4, 2, 1, 70, 32, seed=1)
    for length in range(0, 71):
        check_decode(q, kc, vc, torch.tensor([length], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [16, 64, 128, 80])
def test_head_dims_and_dtypes(d, dtype):
    q, kc, vc = qkv(3, 4, 4, 1, 200, d, dtype=dtype, seed=d)
    check_decode(q, kc, vc, torch.tensor([200, 1, 137], dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 50])
def test_split_count_does_not_change_the_result(num_splits):
    q, kc, vc = qkv(2, 2, 1, 1, 250, 32, seed=2)
    lengths = torch.tensor([250, 99], dtype=torch.int32, device=DEVICE)
    one = mk.decode_attention(q, kc, vc, lengths, num_splits=1)
    many = check_decode(q, kc, vc, lengths, num_splits=num_splits)
    assert_close(many, one, name="split vs one pass")


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("nq", [2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_several_query_rows(nq, causal, num_splits):
    q, kc, vc = qkv(2, 4, 2, nq, 100, 32, seed=nq)
    check_decode(q, kc, vc, torch.tensor([100, 3], dtype=torch.int32, device=DEVICE), num_splits=num_splits,
                 causal=causal)


def test_every_cache_length_with_splits():
    """Lengths that leave some splits empty, with several splits to merge."""
    q, kc, vc = qkv(1, 2, 1, 2, 130, 16, seed=7)
    for length in (0, 1, 31, 32, 33, 64, 97, 130):
        lengths = torch.tensor([length], dtype=torch.int32, device=DEVICE)
        for causal in (False, True):
            check_decode(q, kc, vc, lengths, num_splits=4, causal=causal)


def test_bf16_inputs_on_every_backend():
    q, kc, vc = qkv(2, 4, 2, 1, 90, 32, dtype=torch.bfloat16, seed=8)
    check_decode(q, kc, vc, torch.tensor([90, 45], dtype=torch.int32, device=DEVICE))


def test_forward_only_is_explicit():
    q, kc, vc = qkv(1, 2, 2, 1, 16, 16)
    with pytest.raises(RuntimeError, match="decode_attention is forward-only"):
        mk.decode_attention(q.requires_grad_(), kc, vc)
    with torch.no_grad():
        mk.decode_attention(q, kc, vc)


def test_causal_rows_match_flash_attention():
    """Causal decode over a full cache is flash attention with Nq < Nk (bottom-right aligned)."""
    q, kc, vc = qkv(1, 2, 2, 3, 64, 32, seed=5)
    assert_close(mk.decode_attention(q, kc, vc, causal=True), mk.flash_attention(q, kc, vc, causal=True),
                 name="decode vs flash")


def test_default_lengths_and_strided_cache():
    q, kc, vc = qkv(2, 2, 2, 1, 90, 32, seed=3)
    check_decode(strided_like(q), strided_like(kc), strided_like(vc))


def test_merge_of_partials_equals_one_pass():
    """The merge rule on its own: attention over two halves of the keys, combined, equals the whole."""
    q, k, v = qkv(1, 2, 2, 4, 100, 16, seed=4)
    q, k, v = q.double(), k.double(), v.double()
    whole, lse = mk.reference.flash_attention(q, k, v, return_lse=True)
    parts = [mk.reference.flash_attention(q, k[:, :, s], v[:, :, s], return_lse=True)
             for s in (slice(0, 37), slice(37, 100), slice(100, 100))]  # the last part is empty
    merged, merged_lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    assert_close(merged, whole, torch.float64, name="merged out")
    assert_close(merged_lse, lse, torch.float64, name="merged lse")


def test_bad_input():
    q, kc, vc = qkv(2, 4, 2, 1, 16, 32)
    with pytest.raises(TypeError, match="cache_seqlens must be an int32 or int64 tensor"):
        mk.decode_attention(q, kc, vc, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \[B\] = \(2,\)"):
        mk.decode_attention(q, kc, vc, torch.tensor([1], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, Nmax=16\]"):
        mk.decode_attention(q, kc, vc, torch.tensor([1, 17], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="cache_seqlens is on meta"):
        mk.decode_attention(q, kc, vc, torch.tensor([1, 2], dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="num_splits must be a positive int"):
        mk.decode_attention(q, kc, vc, num_splits=0)
    with pytest.raises(ValueError, match=r"k_cache/v_cache heads \(3\) must divide q heads \(4\)"):
        mk.decode_attention(q, *qkv(2, 3, 3, 1, 16, 32)[1:])
    with pytest.raises(ValueError, match="k_cache must have 4 dimensions"):
        mk.decode_attention(q, kc[0], vc)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [1, 8192, 65536 - 3])
def test_gpu_long_cache_bf16(length):
    q = randn(8, 32, 1, 128, dtype=torch.bfloat16, seed=1)
    kc = randn(8, 32, 65536, 128, dtype=torch.bfloat16, seed=2)
    vc = randn(8, 32, 65536, 128, dtype=torch.bfloat16, seed=3)
    lengths = torch.full((8,), length, dtype=torch.int32, device=q.device)
    lengths[0] = 1
    check_decode(q, kc[..., :length + 8, :], vc[..., :length + 8, :], lengths)
