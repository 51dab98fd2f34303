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
from minikernels import masks, planning
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


def _outputs_and_grads(q, k, v, bm):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with poisoned():
        out = mk.block_sparse_attention(q, k, v, bm)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return (out, *grads)


def test_batches_larger_than_one_grid_launch_in_slices():
    """A grid's second axis holds at most 65535 (batch, head) pairs; a larger batch is launched in
    slices of whole batch entries. With the limit lowered to 5 pairs, the forward and dQ (4 heads) take
    one entry a launch and dK/dV (2 kv heads) two, an uneven last slice: bit-equal to one launch."""
    bm = masks.sliding_window(70, 20, block_size=16)
    q, k, v = qkv(3, 4, 2, 70, 70, 32, seed=22)
    whole = _outputs_and_grads(q, k, v, bm)
    with planning.override({"block_sparse.max_grid_y": 5}):
        sliced = _outputs_and_grads(q, k, v, bm)
        check_block_sparse(q, k, v, bm)
    for name, a, b in zip(("out", "dq", "dk", "dv"), sliced, whole):
        assert torch.equal(a, b), name
    with planning.override({"block_sparse.max_grid_y": 3}), pytest.raises(ValueError, match="4 heads are more"):
        mk.block_sparse_attention(q, k, v, bm)


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
        cfgs = {kern: {**block_sparse.launch_config(kern, 32, 24, 4), "TMA": tma} for kern in ("fwd", "dq", "dkdv")}
        o, lse = block_sparse.launch_forward(q, k, v, bm, scale, dict(cfgs["fwd"]))
        grads = block_sparse.launch_backward(q, k, v, o, lse, do, bm, scale, dict(cfgs["dq"]), dict(cfgs["dkdv"]))
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


@pytest.mark.parametrize("b,nq,nk", [(0, 40, 40), (1, 0, 40), (1, 40, 0), (1, 0, 0)])
def test_empty_inputs_stay_in_the_graph(b, nq, nk):
    """B, Nq or Nk = 0: outputs of the right shapes (zeros for rows that see no key) that stay in the
    autograd graph, so backward gives zero gradients of the inputs' shapes."""
    bm = masks.from_mask_fn(lambda i, j: j <= i + nk - nq, nq, nk, block_size=16)
    q, k, v = (t.requires_grad_() for t in qkv(b, 2, 1, nq, nk, 16, seed=14))
    with poisoned():
        out = mk.block_sparse_attention(q, k, v, bm)
    assert out.shape == q.shape and out.grad_fn is not None and torch.equal(out, torch.zeros_like(out))
    with poisoned():
        out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


def test_double_backward_raises():
    """The backward is kernels: a gradient taken with create_graph=True cannot be differentiated again
    (never silently detached: a gradient penalty would be dropped)."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 40, 40, 16, seed=15))
    out = mk.block_sparse_attention(q, k, v, masks.causal(40, block_size=16))
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.square().sum().backward()


# --- a BlockMask built by hand is checked before any kernel follows its indices ---------------------

def _hand_built(**fields):
    """masks.sliding_window(64, 20, block_size=16) with copies of its tensors, some replaced."""
    bm = masks.sliding_window(64, 20, block_size=16)
    copies = {f.name: getattr(bm, f.name).clone() for f in dataclasses.fields(bm)
              if isinstance(getattr(bm, f.name), torch.Tensor)}
    return dataclasses.replace(bm, **{**copies, **fields})


def _edited(name, edit):
    bm = _hand_built()
    t = getattr(bm, name).clone()
    edit(t)
    return dataclasses.replace(bm, **{name: t})


def test_a_faithful_hand_built_mask_is_accepted():
    q, k, v = qkv(1, 2, 1, 64, 64, 16, seed=16)
    check_block_sparse(q, k, v, _hand_built())


@pytest.mark.parametrize("name,edit,message", [
    ("kv_indices", lambda t: t.__setitem__((2, 0), 4), r"kv_indices must lie in \[0, n_kv_blocks=4\)"),
    ("kv_indices", lambda t: t.__setitem__((2, 0), -1), r"kv_indices must lie in \[0, n_kv_blocks=4\)"),
    ("q_indices", lambda t: t.__setitem__((1, 0), 7), r"q_indices must lie in \[0, n_q_blocks=4\)"),
    ("kv_counts", lambda t: t.__setitem__(1, 9), r"kv_counts must lie in \[0, 3\] .*got values in \[1, 9\]"),
    ("kv_counts", lambda t: t.__setitem__(1, -1), r"kv_counts must lie in \[0, 3\] .*got values in \[-1, 3\]"),
    ("q_counts", lambda t: t.__setitem__(0, 4), r"q_counts must lie in \[0, 3\]"),
    ("kv_indices", lambda t: t.__setitem__((2, 1), t[2, 0].item()), "must increase along each row"),
    ("tile_index", lambda t: t.__setitem__(t == t.max(), 99), r"tile_index must lie in \[0, "),
    ("q_partial", lambda t: t.fill_(False), "must list the same visits, partial flags and tiles"),
])
def test_rejects_out_of_range_masks(name, edit, message):
    """Out-of-range indices once returned zeros and too-large counts crashed the process: both are
    refused, before a kernel launches, with the field and the expected range."""
    q, k, v = qkv(1, 2, 1, 64, 64, 16)
    with pytest.raises(ValueError, match=message):
        mk.block_sparse_attention(q, k, v, _edited(name, edit))


def test_rejects_masks_of_the_wrong_structure():
    q, k, v = qkv(1, 2, 1, 64, 64, 16)
    bm = _hand_built()
    with pytest.raises(TypeError, match="block_mask.kv_counts must have dtype int32, got int64"):
        mk.block_sparse_attention(q, k, v, dataclasses.replace(bm, kv_counts=bm.kv_counts.long()))
    with pytest.raises(TypeError, match="block_mask.tiles must be a torch.Tensor, got list"):
        mk.block_sparse_attention(q, k, v, dataclasses.replace(bm, tiles=[]))
    with pytest.raises(ValueError, match=r"block_mask.kv_counts must have shape \(4,\)"):
        mk.block_sparse_attention(q, k, v, dataclasses.replace(bm, kv_counts=bm.kv_counts[:3]))
    with pytest.raises(ValueError, match=r"block_mask.tiles must have shape \(\d+, 16, 16\)"):
        mk.block_sparse_attention(q, k, v, dataclasses.replace(bm, tiles=bm.tiles[:, :8]))
    with pytest.raises(ValueError, match="block_mask.block_size must be a power of two"):
        mk.block_sparse_attention(q, k, v, dataclasses.replace(bm, block_size=24))


def test_a_mask_changed_in_place_is_checked_again():
    """The values are checked once per mask (a host sync), and again after any in-place change."""
    q, k, v = qkv(1, 2, 1, 64, 64, 16, seed=17)
    bm = _hand_built()
    mk.block_sparse_attention(q, k, v, bm)
    bm.kv_counts[1] = 50
    with pytest.raises(ValueError, match=r"kv_counts must lie in \[0, 3\]"):
        mk.block_sparse_attention(q, k, v, bm)


def test_non_contiguous_mask_tensors():
    """Counts and tiles are read by the kernels as dense arrays: strided ones are made dense first."""
    bm = _hand_built()
    strided = dataclasses.replace(bm, kv_counts=torch.stack([bm.kv_counts, bm.kv_counts], 1)[:, 0],
                                  tiles=bm.tiles.transpose(1, 2).contiguous().transpose(1, 2))
    assert not strided.kv_counts.is_contiguous() and not strided.tiles.is_contiguous()
    q, k, v = qkv(1, 2, 1, 64, 64, 16, seed=18)
    check_block_sparse(q, k, v, strided)


# --- tiles that fit the device's shared memory: a pure planning function, checked on the CPU --------

# Shared memory one program may use (the driver's opt-in max_shared_mem): H100 / H200 227 KiB, A100
# 163 KiB, sm_86 / sm_89 GPUs 99 KiB.
SMEM_LIMITS = {"H100": 232448, "H200": 232448, "A100": 166912, "RTX 4090": 101376}
HEAD_DIMS = [1, 16, 24, 32, 64, 80, 128, 129, 256]


@pytest.mark.parametrize("gpu", list(SMEM_LIMITS))
@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_tiles_fit_the_shared_memory(kernel, gpu):
    """For every dtype (4 bytes: float32; 2: float16, bfloat16), head dim and block size the op accepts,
    the planned pieces divide the block and their estimated shared memory fits the device's limit.
    (float32 blocks of 128 at D = 64 once asked for 262 KB on an H100, which has 227 KB.)"""
    from minikernels import block_sparse
    from minikernels._common import SMEM_MARGIN

    limit = SMEM_LIMITS[gpu]
    for elem in (4, 2):
        for d in HEAD_DIMS:
            for block in (16, 32, 64, 128):
                cfg = block_sparse.tile_config(kernel, block, d, elem, limit)
                assert block_sparse.smem_need(kernel, cfg, d, elem) <= limit - SMEM_MARGIN, (elem, d, block, cfg)
                for piece in (cfg["SUB"], cfg["STREAM"]):
                    assert 16 <= piece <= block and block % piece == 0, (elem, d, block, cfg)


def test_16_bit_tiles_stay_on_hopper():
    """The tuned 16-bit configurations (D <= 128) fit an H100 / H200 as they are."""
    from minikernels import block_sparse

    for kernel in ("fwd", "dq", "dkdv"):
        for d in (16, 32, 64, 80, 128):
            for block in (16, 32, 64, 128):
                assert (block_sparse.tile_config(kernel, block, d, 2, SMEM_LIMITS["H100"])
                        == block_sparse.tile_config(kernel, block, d, 2, None))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_gpu_every_dtype_head_dim_and_block(block_size, d, dtype):
    """Every dtype, head dim and block size runs (its tiles fit this GPU's shared memory): ragged sizes,
    Nq != Nk, grouped heads, full, band and other partial tiles."""
    bm = masks.from_mask_fn(lambda i, j: (j <= i + 40) & ((i - j < 150) | (j % 7 == 0)), 300, 260,
                            block_size=block_size)
    check_block_sparse(*qkv(2, 4, 2, 300, 260, d, dtype=dtype, seed=d + block_size), bm)


@pytest.mark.gpu
def test_gpu_batch_beyond_the_grid_limit():
    """4100 x 16 (batch, head) pairs, more than the 65535 a grid's second axis holds: launched in slices,
    each slice's result equals the same sequences attended alone."""
    bm = masks.causal(64, block_size=32)
    q, k, v = qkv(4100, 16, 16, 64, 64, 64, dtype=torch.bfloat16, seed=6)
    got = _outputs_and_grads(q, k, v, bm)
    for lo in (0, 4096):  # the first sequences and the last, which fall in different launches
        alone = _outputs_and_grads(q[lo:lo + 4], k[lo:lo + 4], v[lo:lo + 4], bm)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, alone):
            assert torch.equal(a[lo:lo + 4], b), (name, lo)
    check_block_sparse(q[4096:], k[4096:], v[4096:], bm)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [64, 128])
def test_gpu_long_bf16(block_size):
    bm = masks.sliding_window(4096, 1024, block_size=block_size)
    check_block_sparse(*qkv(1, 4, 4, 4096, 4096, 128, dtype=torch.bfloat16, seed=block_size), bm)
