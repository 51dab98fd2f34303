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


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5])
def test_explicit_scale(scale, causal):
    """``scale`` multiplies the logits as in flash_attention: the same as the default 1/sqrt(D) applied
    to q scaled by scale * sqrt(D)."""
    q, kc, vc = qkv(2, 4, 2, 2, 90, 32, seed=9)
    lengths = torch.tensor([90, 40], dtype=torch.int32, device=DEVICE)
    with poisoned():
        out = mk.decode_attention(q, kc, vc, lengths, causal=causal, scale=scale)
    ref = mk.reference.decode_attention(q.double(), kc.double(), vc.double(), lengths, causal=causal, scale=scale)
    assert_close(ref, mk.reference.decode_attention(q.double() * (scale * 32**0.5), kc.double(), vc.double(), lengths,
                                                    causal=causal), torch.float64, name="the reference's scale")
    assert_close(out, ref, q.dtype, name="decode with scale")
    default = mk.decode_attention(q, kc, vc, lengths, causal=causal, scale=None)
    assert_close(default, mk.decode_attention(q, kc, vc, lengths, causal=causal, scale=32**-0.5), name="default")


def test_rejects_bad_scale():
    q, kc, vc = qkv(1, 2, 2, 1, 16, 16)
    for bad in (float("nan"), float("inf"), "0.1", True):
        with pytest.raises(TypeError, match="scale must be a finite float or None"):
            mk.decode_attention(q, kc, vc, scale=bad)


@pytest.mark.parametrize("b,h,hkv,nq,nmax", [(0, 2, 1, 1, 16), (2, 2, 1, 0, 16), (2, 2, 1, 1, 0), (1, 0, 1, 1, 16)])
def test_empty_inputs(b, h, hkv, nq, nmax):
    """B, H or Nq = 0 give an empty output; an empty cache gives zeros (no key to attend to)."""
    q, kc, vc = qkv(b, h, hkv, nq, nmax, 16, seed=10)
    with poisoned():
        out = mk.decode_attention(q, kc, vc)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(out, torch.zeros_like(out))


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


# --- tiles that fit the device's shared memory: a pure planning function, checked on the CPU --------

SMEM_LIMITS = {"H100": 232448, "H200": 232448, "A100": 166912, "RTX 4090": 101376}


@pytest.mark.parametrize("gpu", list(SMEM_LIMITS))
def test_tiles_fit_the_shared_memory(gpu):
    """For every dtype (4 bytes: float32; 2: float16, bfloat16), head dim and number of query rows per
    program (16 to 128) the op accepts, the planned key block's estimated shared memory fits the limit,
    except where the rows alone fill it: float32 at D > 128 with 128 rows on GPUs smaller than an
    H100, and with 64 rows on 99 KiB ones. (float32 at D = 256 once asked for 303 KB on an H100.)"""
    from minikernels import decode
    from minikernels._common import SMEM_MARGIN

    limit = SMEM_LIMITS[gpu]
    for elem in (4, 2):
        for d in (1, 16, 32, 64, 80, 128, 129, 256):
            for rows in (16, 32, 64, 128):
                cfg = decode.tile_config(rows, d, elem, limit)
                smallest = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
                smallest.update({"DOT_PREC": "tf32"} if elem == 4 else {})
                if decode.smem_need(rows, smallest, d, elem) > limit - SMEM_MARGIN:  # the rows alone fill it
                    assert elem == 4 and d > 128 and rows >= 64 and gpu in ("A100", "RTX 4090")
                    assert cfg == smallest  # the least it can ask for; the compiler has the last word
                else:
                    assert decode.smem_need(rows, cfg, d, elem) <= limit - SMEM_MARGIN, (elem, d, rows, cfg)


def test_tiles_stay_on_hopper_where_they_fit():
    """16-bit inputs keep 64-key blocks in a 3-stage pipeline on an H100 / H200; so does float32 with a
    single query row per program at D <= 128."""
    from minikernels import decode

    for d in (16, 64, 128, 256):
        for rows in (16, 32, 64, 128):
            assert decode.tile_config(rows, d, 2, SMEM_LIMITS["H100"]) == decode.tile_config(rows, d, 2, None)
    for d in (16, 64, 128):
        assert decode.tile_config(16, d, 4, SMEM_LIMITS["H100"]) == decode.tile_config(16, d, 4, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("h,hkv,nq", [(4, 4, 1), (8, 2, 4), (32, 1, 4)])  # 16, 16 and 128 rows a program
def test_gpu_every_dtype_and_head_dim(h, hkv, nq, d, dtype):
    """Every dtype and head dim runs (its tiles fit this GPU's shared memory), up to 128 query rows per
    program, with ragged cache lengths."""
    q, kc, vc = qkv(2, h, hkv, nq, 300, d, dtype=dtype, seed=d + h)
    check_decode(q, kc, vc, torch.tensor([300, 77], dtype=torch.int32, device=DEVICE), causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("length", [1, 8192, 65536 - 3])
def test_gpu_long_cache_bf16(length):
    q = randn(8, 32, 1, 128, dtype=torch.bfloat16, seed=1)
    kc = randn(8, 32, 65536, 128, dtype=torch.bfloat16, seed=2)
    vc = randn(8, 32, 65536, 128, dtype=torch.bfloat16, seed=3)
    lengths = torch.full((8,), length, dtype=torch.int32, device=q.device)
    lengths[0] = 1
    check_decode(q, kc[..., :length + 8, :], vc[..., :length + 8, :], lengths)


@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_left_padding_equals_each_sequence_alone(causal, num_splits):
    """``cache_leftpad``: sequence b's keys are [leftpad_b, L_b), as if its cache started there. The
    padding holds NaN, so a read of it would show."""
    q, kc, vc = qkv(4, 4, 2, 2, 130, 32, seed=11)
    lengths = torch.tensor([130, 97, 64, 5], dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor([0, 33, 64, 5], dtype=torch.int32, device=DEVICE)  # none, mid-block, a block, all
    pad = torch.arange(130, device=DEVICE)[None, None, :, None] < leftpad.view(4, 1, 1, 1)
    kc, vc = kc.masked_fill(pad, float("nan")), vc.masked_fill(pad, float("nan"))
    with poisoned():
        out = mk.decode_attention(q, kc, vc, lengths, num_splits, causal, cache_leftpad=leftpad)
    for b, (first, n) in enumerate(zip(leftpad.tolist(), lengths.tolist())):
        alone = mk.reference.decode_attention(q[b:b + 1].double(), kc[b:b + 1, :, first:n].double(),
                                              vc[b:b + 1, :, first:n].double(), causal=causal)
        assert_close(out[b:b + 1], alone, q.dtype, name=f"sequence {b}")
    ref = mk.reference.decode_attention(q.double(), kc.double(), vc.double(), lengths, causal=causal,
                                        cache_leftpad=leftpad)
    assert_close(out, ref, q.dtype, name="reference with cache_leftpad")


def test_left_padding_is_checked():
    q, kc, vc = qkv(2, 4, 2, 1, 16, 32)
    lengths = torch.tensor([16, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"cache_leftpad must lie in \[0, cache_seqlens\].*cache_leftpad\[1\] = 9"):
        mk.decode_attention(q, kc, vc, lengths, cache_leftpad=torch.tensor([0, 9], dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"cache_leftpad\[0\] = -1"):
        mk.decode_attention(q, kc, vc, cache_leftpad=torch.tensor([-1, 0], dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="cache_leftpad must be an int32 or int64 tensor"):
        mk.decode_attention(q, kc, vc, lengths, cache_leftpad=torch.tensor([0.0, 1.0], device=DEVICE))
    with pytest.raises(ValueError, match=r"cache_leftpad must have shape \[B\] = \(2,\)"):
        mk.decode_attention(q, kc, vc, lengths, cache_leftpad=torch.zeros(3, dtype=torch.int32, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_left_padding(d, dtype):
    q, kc, vc = qkv(3, 8, 2, 1, 5000, d, dtype=dtype, seed=d)
    lengths = torch.tensor([5000, 4000, 300], dtype=torch.int32, device=DEVICE)
    leftpad = torch.tensor([0, 1234, 299], dtype=torch.int32, device=DEVICE)
    with poisoned():
        out = mk.decode_attention(q, kc, vc, lengths, cache_leftpad=leftpad)
    ref = mk.reference.decode_attention(q.double(), kc.double(), vc.double(), lengths, cache_leftpad=leftpad)
    assert_close(out, ref, dtype, name="decode with cache_leftpad")


# --- remembered plans ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_repeated_full_cache_calls_reuse_a_plan_and_stay_right(dtype):
    """A call over a full dense cache remembers its launch plan (a decode step repeats the same shapes in
    every layer); a later call with the same shapes and options reuses it, and any difference the plan
    depends on (shape, strides, dtype, scale, causal, num_splits) makes its own."""
    from minikernels import decode

    decode._FULL_CACHE_PLANS.clear()
    q, kc, vc = qkv(2, 4, 2, 2, 150, 32, dtype=dtype, seed=41)
    first = check_decode(q, kc, vc)
    assert len(decode._FULL_CACHE_PLANS) == 1
    plan = next(iter(decode._FULL_CACHE_PLANS.values()))
    assert torch.equal(check_decode(q, kc, vc), first)
    q2, kc2, vc2 = qkv(2, 4, 2, 2, 150, 32, dtype=dtype, seed=42)  # other tensors of the same shapes
    check_decode(q2, kc2, vc2)
    assert list(decode._FULL_CACHE_PLANS.values()) == [plan] and next(iter(decode._FULL_CACHE_PLANS.values())) is plan
    check_decode(q, kc, vc, causal=True)
    check_decode(q, kc, vc, num_splits=3)
    check_decode(q, kc[:, :, :97], vc[:, :, :97])  # a shorter view: other shapes and strides
    check_decode(q, kc[:, :, :97].contiguous(), vc[:, :, :97].contiguous())
    with poisoned():
        out = mk.decode_attention(q, kc, vc, scale=0.3)
    assert_close(out, mk.reference.decode_attention(q.double(), kc.double(), vc.double(), scale=0.3), dtype,
                 name="another scale")
    assert len(decode._FULL_CACHE_PLANS) == 6
    check_decode(q, kc, vc, torch.full((2,), 150, dtype=torch.int32, device=DEVICE))  # lengths: planned anew
    assert len(decode._FULL_CACHE_PLANS) == 6


def test_a_remembered_plan_still_refuses_gradients():
    q, kc, vc = qkv(1, 2, 1, 1, 40, 16, dtype=torch.float32, seed=43)
    with torch.no_grad():
        mk.decode_attention(q, kc, vc)
    with pytest.raises(RuntimeError, match="forward-only"):
        mk.decode_attention(q.requires_grad_(), kc, vc)


def test_planning_overrides_bypass_remembered_plans():
    from minikernels import decode, planning

    q, kc, vc = qkv(1, 2, 1, 1, 300, 16, dtype=torch.float32, seed=47)
    check_decode(q, kc, vc)
    remembered = dict(decode._FULL_CACHE_PLANS)
    calls = []

    def splits(*args):
        calls.append(args)
        return 2
    with planning.override({"decode.num_splits": splits}):
        check_decode(q, kc, vc)
    assert calls  # planned again, with the override
    assert decode._FULL_CACHE_PLANS == remembered  # and nothing planned under it is remembered


def test_unhashable_options_get_the_named_errors():
    """The plan lookup keys on the options: ones that cannot be keys still reach the checks."""
    q, kc, vc = qkv(1, 2, 1, 1, 40, 16, dtype=torch.float32, seed=53)
    with pytest.raises(TypeError, match="scale must be"):
        mk.decode_attention(q, kc, vc, scale=[0.5])
    with pytest.raises(TypeError, match="num_splits must be"):
        mk.decode_attention(q, kc, vc, num_splits=[2])
    with pytest.raises(TypeError, match="causal must be a bool"):
        mk.decode_attention(q, kc, vc, causal=[True])
