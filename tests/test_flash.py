"""mk.flash_attention against the float64 reference: forward, logsumexp and every gradient, on awkward
shapes, causal (bottom-right) and not, grouped-query heads, strides, and bad input."""

import pytest
import torch
from attention_utils import check_flash, qkv
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels import planning
from minikernels._common import SMEM_MARGIN, shared_memory_limit
from minikernels.testing import poisoned, strided_like, test_dtypes

DTYPES = test_dtypes()  # fp32, fp16 everywhere; bf16 on the GPU (the interpreter's bf16 dot is wrong)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 17, 64, 100, 256])
@pytest.mark.parametrize("d", [16, 32, 64])
def test_square_shapes(n, d, causal):
    check_flash(*qkv(1, 2, 2, n, n, d, seed=n + d), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [128, 80, 256])
def test_large_and_odd_head_dims(d, causal, dtype):
    check_flash(*qkv(1, 2, 1, 100, 100, d, dtype=dtype, seed=d), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(dtype, causal):
    check_flash(*qkv(2, 2, 2, 100, 64, 64, dtype=dtype, seed=7), causal=causal)


@pytest.mark.parametrize("nq,nk", [(17, 100), (100, 17), (1, 256), (64, 1), (33, 70)])
def test_causal_with_nq_not_nk(nq, nk):
    """Bottom-right alignment; with Nq > Nk the first Nq - Nk queries see no key: zeros, lse -inf."""
    out, lse = check_flash(*qkv(1, 2, 1, nq, nk, 32, seed=nq * nk), causal=True)
    if nq > nk:
        blind = nq - nk
        assert torch.equal(out[:, :, :blind], torch.zeros_like(out[:, :, :blind]))
        assert torch.isneginf(lse[:, :, :blind]).all()


def test_no_keys_at_all():
    q, k, v = qkv(1, 1, 1, 5, 0, 16)
    with poisoned():
        out, lse = mk.flash_attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def _outputs_and_grads(q, k, v, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with poisoned():
        out, lse = mk.flash_attention(q, k, v, causal=causal, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return (out, lse, *grads)


@pytest.mark.parametrize("causal", [False, True])
def test_batches_larger_than_one_grid_launch_in_slices(causal):
    """A grid's second axis holds at most 65535 (batch, head) pairs; a larger batch is launched in
    slices of whole batch entries. With the limit lowered to 5 pairs, the forward (4 heads) takes one
    entry a launch and dK/dV (2 kv heads) two, an uneven last slice: bit-equal to one launch each."""
    q, k, v = qkv(3, 4, 2, 40, 33, 32, seed=21)
    whole = _outputs_and_grads(q, k, v, causal)
    with planning.override({"flash.max_grid_y": 5}):
        sliced = _outputs_and_grads(q, k, v, causal)
        check_flash(q, k, v, causal=causal)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), sliced, whole):
        assert torch.equal(a, b), name
    with planning.override({"flash.max_grid_y": 3}), pytest.raises(ValueError, match="4 heads are more than"):
        mk.flash_attention(q, k, v)


@pytest.mark.parametrize("h,hkv", [(4, 2), (4, 1), (6, 3)])
def test_grouped_query_attention(h, hkv):
    check_flash(*qkv(2, h, hkv, 64, 80, 32, seed=h * hkv), causal=True)


def test_logits_scaled_by_30_do_not_overflow():
    """Logits 30 times their usual size (std ~30, max ~100): exp would overflow without the running max."""
    q, k, v = qkv(1, 2, 2, 100, 100, 64, seed=3)
    out, lse = check_flash(q, k, v, scale=30.0 / 64**0.5)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert lse.max() > 88  # exp(88) overflows float32: the kernel never forms it


def test_explicit_scale():
    check_flash(*qkv(1, 2, 2, 64, 64, 32, seed=4), causal=True, scale=0.3)


def test_non_contiguous_inputs():
    q, k, v = qkv(2, 2, 2, 64, 64, 32, seed=5)
    check_flash(strided_like(q), strided_like(k), strided_like(v), causal=True)
    # [B, N, H, D] storage seen as [B, H, N, D], as from a fused QKV projection
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    check_flash(qt, kt, vt)


def test_return_lse_flag():
    q, k, v = qkv(1, 1, 1, 8, 8, 16)
    out = mk.flash_attention(q, k, v)
    assert isinstance(out, torch.Tensor)
    pair = mk.flash_attention(q, k, v, return_lse=True)
    assert isinstance(pair, tuple) and len(pair) == 2 and torch.equal(pair[0], out)


def test_backward_keeps_only_inputs_output_and_logsumexp():
    """FlashAttention's backward recomputes P: what the forward saves is q, k, v, O and the
    logsumexp, nothing of size Nq x Nk."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 64, 96, 16, seed=6))
    out = mk.flash_attention(q, k, v, causal=True)
    saved = out.grad_fn.saved_tensors
    assert sorted(tuple(t.shape) for t in saved) == sorted(
        [tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(out.shape), tuple(q.shape[:3])])


def test_bf16_inputs_on_every_backend():
    """bf16 runs everywhere: natively on the GPU, in fp32 and cast back under the interpreter."""
    check_flash(*qkv(1, 2, 2, 80, 80, 32, dtype=torch.bfloat16, seed=9), causal=True)


def test_no_keys_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 1, 5, 0, 16))
    with poisoned():
        out = mk.flash_attention(q, k, v, causal=True)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("b,h,hkv,nq,nk", [(0, 2, 1, 5, 5), (1, 2, 1, 0, 5), (1, 2, 1, 5, 0), (1, 0, 1, 5, 5),
                                         (1, 2, 1, 0, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_inputs_stay_in_the_graph(b, h, hkv, nq, nk, causal):
    """B, H, Nq or Nk = 0: outputs of the right shapes (zeros where a row exists but sees no key) that
    stay in the autograd graph, so backward gives zero gradients of the inputs' shapes."""
    q, k, v = (t.requires_grad_() for t in qkv(b, h, hkv, nq, nk, 16, seed=12))
    with poisoned():
        out, lse = mk.flash_attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and out.grad_fn is not None
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    with poisoned():
        out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_backward_raises(dtype):
    """The backward is kernels: a gradient taken with create_graph=True cannot be differentiated again,
    and saying so beats returning gradients silently detached from the graph (a gradient penalty
    would be dropped). bfloat16 too: under the interpreter it is converted inside the forward, so the
    saved tensors are not the inputs, and the error must still reach them."""
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv(1, 2, 2, 20, 20, 16, seed=13))
    dq, dk = torch.autograd.grad(mk.flash_attention(q, k, v, causal=True).sum(), (q, k), create_graph=True)
    assert dq.requires_grad and dk.requires_grad
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (dq.square().sum() + dk.square().sum()).backward()


def test_strided_views_past_32_bit_offsets_are_compacted():
    """Inside one (batch, head) slice the kernels index with 32-bit arithmetic; a view spanning more
    than that is copied to a compact layout first, and a slice too large even then is refused. The
    limit is lowered here so that small tensors exercise both paths."""
    with planning.override({"int32_limit": 40 * 16}):
        q, k, v = qkv(1, 2, 2, 40, 40, 16, seed=10)
        wide = [strided_like(t) for t in (q, k, v)]  # slice extent ~ 2 * 40 * 16: over the lowered limit
        check_flash(*wide, causal=True)
        q, k, v = qkv(1, 2, 2, 50, 50, 16, seed=11)  # 50 * 16 elements per slice even when compact
        with pytest.raises(ValueError, match="more than 2\\^31"):
            mk.flash_attention(q, k, v)


def test_int32_addressable_helper():
    from minikernels._validate import int32_addressable

    view = torch.empty_strided((40, 16), (2**26, 1), device="meta")  # rows 2^26 elements apart
    assert int32_addressable("x", view).stride() == (16, 1)
    small = torch.empty_strided((40, 16), (2**20, 1), device="meta")
    assert int32_addressable("x", small) is small
    with pytest.raises(ValueError, match="more than 2\\^31"):
        int32_addressable("x", torch.empty((2**16, 2**16), device="meta"))


@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 2), nq=st.integers(1, 70),
       nk=st.integers(1, 70), d=st.sampled_from([16, 24, 32]), causal=st.booleans(), seed=st.integers(0, 999))
def test_property_random_shapes(b, hkv, group, nq, nk, d, causal, seed):
    check_flash(*qkv(b, hkv * group, hkv, nq, nk, d, seed=seed), causal=causal, seed=seed)


# --- bad input ----------------------------------------------------------------------------------

def test_rejects_wrong_rank():
    q, k, v = qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \[B, H, N, D\], got shape \(2, 8, 16\)"):
        mk.flash_attention(q[0], k, v)


def test_rejects_integer_and_mixed_dtypes():
    q, k, v = qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(TypeError, match="q has dtype int64"):
        mk.flash_attention(q.long(), k, v)
    with pytest.raises(TypeError, match="must share one dtype"):
        mk.flash_attention(q.half(), k, v)


def test_rejects_mismatched_shapes():
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        mk.flash_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="head dims differ"):
        mk.flash_attention(q[..., :8].contiguous(), k, v)
    with pytest.raises(ValueError, match="batch sizes differ"):
        mk.flash_attention(torch.cat([q, q]), k, v)
    with pytest.raises(ValueError, match=r"heads \(3\) must divide q heads \(4\)"):
        mk.flash_attention(q, *qkv(1, 3, 3, 8, 8, 16)[1:])


def test_rejects_unsupported_head_dim():
    q, k, v = qkv(1, 1, 1, 4, 4, 300)
    with pytest.raises(ValueError, match="head dim D=300 is not supported"):
        mk.flash_attention(q, k, v)


def test_rejects_mixed_devices():
    q, k, v = qkv(1, 1, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="is on device 'meta'"):
        mk.flash_attention(q, k.to("meta"), v)


def test_rejects_bad_flags():
    q, k, v = qkv(1, 1, 1, 4, 4, 16)
    with pytest.raises(TypeError, match="causal must be a bool"):
        mk.flash_attention(q, k, v, causal=1)
    with pytest.raises(TypeError, match="scale must be a finite float"):
        mk.flash_attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        mk.flash_attention(q, k, v, return_lse="no")


# --- tiles that fit the device's shared memory: pure planning functions, checked on the CPU --------

# Shared memory one program may use (the opt-in limit per block, as the driver reports it in
# max_shared_mem): an H100 and an H200 (sm_90) 227 KiB, an A100 (sm_80) 163 KiB, sm_86 / sm_89 GPUs 99 KiB.
SMEM_LIMITS = {"H100": 232448, "H200": 232448, "A100": 166912, "RTX 4090": 101376}
HEAD_DIMS = [1, 16, 24, 32, 64, 80, 128, 129, 256]  # every padded size, 16 to 256


def _is_tile(n):
    return n >= 16 and n & (n - 1) == 0


@pytest.mark.parametrize("gpu", list(SMEM_LIMITS))
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_tiles_fit_the_shared_memory(kernel, gpu):
    """For every dtype (4 bytes: float32; 2: float16, bfloat16) and head dim the op accepts, the planned
    tiles' estimated shared memory fits the device's limit with the margin."""
    from minikernels import flash

    limit = SMEM_LIMITS[gpu]
    for elem in (4, 2):
        for d in HEAD_DIMS:
            cfg = flash.tile_config(kernel, d, elem, limit)
            assert flash.smem_need(kernel, cfg, d, elem) <= limit - SMEM_MARGIN, (elem, d, cfg)
            assert _is_tile(cfg["BLOCK_M"]) and _is_tile(cfg["BLOCK_N"]) and cfg["num_stages"] >= 1


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_tuned_tiles_stay_on_hopper(kernel):
    """On an H100 or H200 every tuned configuration fits as it is: fitting changes nothing there."""
    from minikernels import flash

    for elem in (4, 2):
        for d in HEAD_DIMS:
            assert flash.tile_config(kernel, d, elem, SMEM_LIMITS["H100"]) == flash.tile_config(kernel, d, elem, None)


def test_fit_shared_memory_steps_down_stages_then_tiles():
    """Fewer stages first, then the larger tile halved (stages restored at each size), then the fallback."""
    from minikernels._common import fit_shared_memory

    cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}

    def need(c):  # bytes: a resident tile plus one streamed tile per stage; the fallback halves it
        return (c["BLOCK_M"] * c["BLOCK_N"] * 4 + c["BLOCK_N"] * 64 * c["num_stages"]) // (2 if c.get("LOW") else 1)

    def fit(budget, **kw):  # what fits `budget` bytes under the margin
        return fit_shared_memory(cfg, need, budget + SMEM_MARGIN, ("BLOCK_N", "BLOCK_M"), resident="BLOCK_M", **kw)

    assert fit_shared_memory(cfg, need, None, ("BLOCK_N", "BLOCK_M")) == cfg  # no limit: the interpreter
    assert need(cfg) == 45056 and fit(45056) == cfg
    assert fit(40960) == {**cfg, "num_stages": 2}
    assert fit(36864) == {**cfg, "num_stages": 1}
    half = {**cfg, "BLOCK_M": 64, "num_warps": 4}  # BLOCK_M, the larger, halved: 8 warps become 4
    assert fit(30000) == half  # with its stages back
    assert fit(25000) == {**half, "num_stages": 2}
    assert fit(15000) == {**half, "BLOCK_N": 32}  # a tie: the first of the tiles listed
    assert fit(2047) == {**half, "BLOCK_M": 16, "BLOCK_N": 16, "num_stages": 1}  # nothing fits: the smallest
    assert fit(2047, relaxed={"LOW": True}) == {**half, "BLOCK_M": 32, "BLOCK_N": 16, "num_stages": 1, "LOW": True}
    assert fit(45056, relaxed={"LOW": True}) == cfg  # the fallback only when nothing else fits


def test_no_shared_memory_limit_under_the_interpreter():

    if mk.backend() == "cuda":
        assert shared_memory_limit() >= 48 * 1024
    else:
        assert shared_memory_limit() is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 80, 128, 256])
def test_gpu_every_dtype_and_head_dim(d, dtype):
    """Every dtype and head dim runs (its tiles fit this GPU's shared memory), ragged sizes and grouped
    heads included."""
    check_flash(*qkv(2, 4, 2, 300, 257, d, dtype=dtype, seed=d), causal=True)


# --- GPU only: the benchmark's sizes, bf16 --------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [1024, 4096, 1000])
def test_gpu_large(n, d, causal):
    check_flash(*qkv(2, 4, 2, n, n, d, dtype=torch.bfloat16, seed=n + d), causal=causal)


@pytest.mark.gpu
def test_gpu_batch_beyond_the_grid_limit():
    """4100 x 16 (batch, head) pairs, more than the 65535 a grid's second axis holds: launched in slices,
    each slice's result equals the same sequences attended alone."""
    q, k, v = qkv(4100, 16, 16, 24, 24, 64, dtype=torch.bfloat16, seed=5)
    got = _outputs_and_grads(q, k, v, True)
    for lo in (0, 4096):  # the first sequences and the last, which fall in different launches
        alone = _outputs_and_grads(q[lo:lo + 4], k[lo:lo + 4], v[lo:lo + 4], True)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, alone):
            assert torch.equal(a[lo:lo + 4], b), (name, lo)
    check_flash(q[4096:], k[4096:], v[4096:], causal=True)


@pytest.mark.gpu
def test_gpu_poisoned_output_is_fully_written():
    q, k, v = qkv(2, 16, 16, 4096, 4096, 128, dtype=torch.bfloat16)
    with poisoned():
        out = mk.flash_attention(q, k, v, causal=True)
    assert not torch.isnan(out).any()
