"""mk.block_sparse_attention: a full mask equals flash attention; every mask builder equals reference
attention under the same dense mask, forward and every gradient; random masks; rows with no key;
masks that do not fit the inputs are refused."""

import dataclasses

import pytest
import torch
from attention_utils import assert_grad_close, qkv
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels import masks
from minikernels.testing import assert_close, poisoned, randn, strided_like, test_dtypes

DTYPES = test_dtypes()


def check_block_sparse(q, k, v, bm, scale=None, seed=0):
    dtype = q.dtype
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with poisoned():
        out = mk.block_sparse_attention(q, k, v, bm, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = mk.reference.block_sparse_attention(*r, bm, scale=scale)
    assert_close(out, ref, dtype, name="out")
    do = randn(*out.shape, dtype=dtype, seed=seed + 50)
    with poisoned():
        grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, r, do.double())
    for name, g, w in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_grad_close(g, w, dtype, name)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_full_mask_equals_flash_attention(causal):
    q, k, v = qkv(2, 2, 2, 100, 100, 32, seed=1)
    bm = masks.causal(100, block_size=32) if causal else masks.from_mask_fn(lambda i, j: j >= 0, 100, 100, 32)
    assert bm.density() == (10 / 16 if causal else 1.0)
    out = check_block_sparse(q, k, v, bm)
    assert_close(out, mk.flash_attention(q, k, v, causal=causal), name="block sparse vs flash")


BUILDERS = {
    "causal": lambda: masks.causal(130, block_size=16),
    "causal_nq_lt_nk": lambda: masks.causal(50, 130, block_size=16),
    "sliding_window": lambda: masks.sliding_window(130, 20, block_size=16),
    "sliding_window_bidirectional": lambda: masks.sliding_window(130, 20, causal=False, block_size=32),
    "dilated": lambda: masks.dilated(130, window=6, dilation=3, block_size=16),
    "a_shape": lambda: masks.a_shape(130, sink=4, window=24, block_size=16),
    "neighborhood_2d": lambda: masks.neighborhood_2d(9, 11, kernel=3, dilation=2, block_size=16),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builders_match_reference(name):
    bm = BUILDERS[name]()
    q, k, v = qkv(1, 2, 2, bm.q_len, bm.kv_len, 32, seed=len(name))
    check_block_sparse(q, k, v, bm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [16, 64, 80])
def test_dtypes_and_head_dims(dtype, d):
    bm = masks.a_shape(100, sink=8, window=30, block_size=32)
    check_block_sparse(*qkv(1, 2, 2, 100, 100, d, dtype=dtype, seed=d), bm)


def test_bf16_inputs_on_every_backend():
    check_block_sparse(*qkv(1, 2, 2, 64, 64, 32, dtype=torch.bfloat16, seed=12), masks.causal(64, block_size=16))


def test_grouped_query_and_strided_inputs():
    bm = masks.sliding_window(96, 24, block_size=16)
    q, k, v = qkv(2, 4, 2, 96, 96, 32, seed=3)
    check_block_sparse(strided_like(q), strided_like(k), strided_like(v), bm)


def test_rows_with_no_key_get_zeros():
    dense = torch.ones(64, 64, dtype=torch.bool, device=mk.device())
    dense[10:40] = False  # these queries see nothing (whole and partial blocks)
    bm = masks.from_dense(dense, block_size=16)
    out = check_block_sparse(*qkv(1, 1, 1, 64, 64, 16, seed=4), bm)
    assert torch.equal(out[:, :, 10:40], torch.zeros_like(out[:, :, 10:40]))


@given(n=st.integers(1, 80), nk=st.integers(1, 80), density=st.floats(0, 1), seed=st.integers(0, 999),
       block_size=st.sampled_from([16, 32]))
def test_property_random_masks(n, nk, density, seed, block_size):
    g = torch.Generator().manual_seed(seed)
    dense = (torch.rand(n, nk, generator=g) < density).to(mk.device())
    check_block_sparse(*qkv(1, 2, 1, n, nk, 16, seed=seed), masks.from_dense(dense, block_size), seed=seed)


def test_descriptor_and_pointer_loads_agree():
    """The kernels read streamed tiles through tensor descriptors when the layout and the device allow
    (the interpreter, a Hopper GPU) and through pointers otherwise: both must compute the same thing,
    ragged ends (zero-filled by the descriptor, masked by the pointers) and grouped heads included."""
    from minikernels import block_sparse
    from minikernels._backend import tma_ready

    bm = masks.a_shape(90, sink=5, window=20, block_size=32)
    q, k, v = qkv(1, 4, 2, 90, 90, 24, seed=21)
    do = randn(1, 4, 90, 24, seed=22)
    if not tma_ready(q, k, v, do):
        pytest.skip("no tensor descriptors on this device: both runs would take the pointer loads")
    scale = 24 ** -0.5
    results = []
    for tma in (True, False):
        cfgs = {kern: {**block_sparse._config(kern, 32, 24, 4), "TMA": tma} for kern in ("fwd", "dq", "dkdv")}
        o, lse = block_sparse._forward(q, k, v, bm, scale, dict(cfgs["fwd"]))
        grads = block_sparse._backward(q, k, v, o, lse, do, bm, scale, dict(cfgs["dq"]), dict(cfgs["dkdv"]))
        results.append((o, lse, *grads))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_descriptors_only_for_layouts_they_can_describe():
    from minikernels._backend import tma_ready

    x = randn(1, 2, 64, 32)
    assert tma_ready(x)
    assert not tma_ready(strided_like(x))  # stride 2 along D
    assert not tma_ready(randn(1, 2, 64, 33)[..., 1:])  # rows 33 elements apart, base one element in
    assert not tma_ready(x[:, :1].expand(1, 2, 64, 32))  # a broadcast head (stride 0)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # rows next to the NaN keys do see them
def test_skipped_blocks_are_not_read():
    """Keys in blocks the mask skips may hold anything (here NaN): they must never be loaded."""
    bm = masks.sliding_window(128, 16, block_size=16)
    q, k, v = qkv(1, 1, 1, 128, 128, 16, seed=5)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :64], v2[:, :, :64] = float("nan"), float("nan")  # only query rows < 80 may look there
    out = mk.block_sparse_attention(q, k2, v2, bm)
    assert not torch.isnan(out[:, :, 80:]).any()
    assert_close(out[:, :, 80:], mk.block_sparse_attention(q, k, v, bm)[:, :, 80:], name="rows far from the NaNs")


def test_refuses_masks_that_do_not_fit():
    q, k, v = qkv(1, 1, 1, 64, 64, 16)
    with pytest.raises(ValueError, match=r"block_mask was built for q_len=32, kv_len=32, but q has Nq=64"):
        mk.block_sparse_attention(q, k, v, masks.causal(32, block_size=16))
    with pytest.raises(ValueError, match="larger than the kernel's largest tile"):
        mk.block_sparse_attention(q, k, v, masks.causal(64, block_size=256))
    with pytest.raises(TypeError, match="block_mask must be a minikernels.masks.BlockMask"):
        mk.block_sparse_attention(q, k, v, torch.ones(64, 64, dtype=torch.bool))
    elsewhere = dataclasses.replace(masks.causal(64, block_size=16), kv_indices=torch.empty(4, 4, device="meta"))
    with pytest.raises(ValueError, match="block_mask is on meta"):
        mk.block_sparse_attention(q, k, v, elsewhere)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [64, 128])
def test_gpu_long_bf16(block_size):
    bm = masks.sliding_window(4096, 1024, block_size=block_size)
    check_block_sparse(*qkv(1, 4, 4, 4096, 4096, 128, dtype=torch.bfloat16, seed=block_size), bm)
