"""mk.flash_attention_varlen (packed sequences of different lengths) against the float64 reference and
against mk.flash_attention run on each sequence alone: output, logsumexp and every gradient; lengths
0, 1, 17, 100, Nq != Nk per sequence, causal and not, grouped-query heads, packed views, bad input."""

import pytest
import torch
from attention_utils import assert_grad_close, check_against_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels import planning
from minikernels.testing import assert_close, poisoned, randn, strided_like, test_dtypes, tolerance

DEVICE = mk.device()
DTYPES = test_dtypes()  # fp32, fp16 everywhere; bf16 on the GPU


def offsets(lengths) -> torch.Tensor:
    """cu_seqlens: int32 [B + 1], cumulative lengths from 0."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def packed(lens_q, lens_k, h, hkv, d, dtype=torch.float32, seed=0):
    """q [sum(lens_q), h, d], k and v [sum(lens_k), hkv, d] and their offsets."""
    q = randn(sum(lens_q), h, d, dtype=dtype, seed=seed)
    k = randn(sum(lens_k), hkv, d, dtype=dtype, seed=seed + 1)
    v = randn(sum(lens_k), hkv, d, dtype=dtype, seed=seed + 2)
    return q, k, v, offsets(lens_q), offsets(lens_k)


def check_varlen(q, k, v, cu_q, cu_k, causal=False, scale=None, grads=True, against_flash=True, seed=0):
    """The kernel against the float64 reference (output, lse, dq, dk, dv), with outputs poisoned; and,
    with ``against_flash``, against mk.flash_attention on each sequence alone."""
    dtype = q.dtype
    lens_q, lens_k = cu_q.diff().tolist(), cu_k.diff().tolist()
    max_q, max_k = max(lens_q, default=0), max(lens_k, default=0)
    q, k, v = (t.detach().requires_grad_(grads) for t in (q, k, v))
    with poisoned():
        out, lse = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale,
                                             return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    r = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    ref, ref_lse = mk.reference.flash_attention_varlen(*r, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale,
                                                       return_lse=True)
    got, do = check_against_reference(out, lse, ref, ref_lse, (q, k, v), r, dtype, grads, seed)
    if against_flash:
        _check_against_flash(q, k, v, cu_q, cu_k, causal, scale, out, lse, got, do)
    return out, lse


def _check_against_flash(q, k, v, cu_q, cu_k, causal, scale, out, lse, got, do):
    """Each sequence alone through mk.flash_attention ([1, H, n, D]) gives the same rows."""
    dtype = q.dtype
    dense = lambda t, a, b: t[a:b].transpose(0, 1)[None].detach().requires_grad_(got is not None)  # noqa: E731
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for qs, qe, ks, ke in zip(cq, cq[1:], ck, ck[1:]):
        qb, kb, vb = dense(q, qs, qe), dense(k, ks, ke), dense(v, ks, ke)
        o, l = mk.flash_attention(qb, kb, vb, causal=causal, scale=scale, return_lse=True)  # noqa: E741
        assert_close(out[qs:qe], o[0].transpose(0, 1), dtype, name="out vs flash")
        assert torch.equal(torch.isneginf(lse[:, qs:qe]), torch.isneginf(l[0]))
        finite = torch.isfinite(l[0])
        assert_close(lse[:, qs:qe][finite], l[0][finite], dtype, name="lse vs flash")
        if got is not None and qe > qs:
            dqb, dkb, dvb = torch.autograd.grad(o, (qb, kb, vb), do[qs:qe].transpose(0, 1)[None])
            grads[0][qs:qe] = dqb[0].transpose(0, 1)
            grads[1][ks:ke] = dkb[0].transpose(0, 1)
            grads[2][ks:ke] = dvb[0].transpose(0, 1)
    if got is not None:
        for name, g, w in zip(("dq", "dk", "dv"), got, grads):
            assert_grad_close(g, w.to(dtype), dtype, name + " vs flash")


# --- lengths, masks, heads ----------------------------------------------------------------------

LENGTHS = {
    "0, 1, 17, 100": ([0, 1, 17, 100], [0, 1, 17, 100]),
    "Nq != Nk": ([17, 0, 100, 1, 5], [100, 5, 17, 30, 0]),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", list(LENGTHS))
def test_lengths(lengths, causal):
    lens_q, lens_k = LENGTHS[lengths]
    # (each sequence alone through flash_attention as well: causal, where the alignment per sequence matters)
    check_varlen(*packed(lens_q, lens_k, 2, 1, 32, seed=len(lens_q)), causal=causal, against_flash=causal)


def test_causal_rows_that_see_no_key():
    """Bottom-right alignment per sequence: with Nq > Nk the first Nq - Nk queries of that sequence see
    no key (zeros, lse -inf); a sequence with Nk = 0 gives zeros throughout."""
    lens_q, lens_k = [40, 7, 3], [10, 0, 30]
    out, lse = check_varlen(*packed(lens_q, lens_k, 2, 2, 16, seed=3), causal=True)
    blind = torch.zeros(sum(lens_q), dtype=torch.bool, device=DEVICE)
    blind[:30] = True  # sequence 0: queries 0..29 see keys j <= i - 30
    blind[40:47] = True  # sequence 1: no keys
    assert torch.equal(out[blind], torch.zeros_like(out[blind])) and torch.isneginf(lse[:, blind]).all()
    assert torch.isfinite(lse[:, ~blind]).all()


@pytest.mark.parametrize("h,hkv", [(4, 2), (4, 1), (6, 3)])
def test_grouped_query_attention(h, hkv):
    check_varlen(*packed([33, 5], [40, 9], h, hkv, 16, seed=h * hkv), causal=True, against_flash=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(dtype):
    check_varlen(*packed([50, 20], [64, 30], 2, 2, 32, dtype=dtype, seed=7), causal=True, against_flash=False)


def test_bf16_inputs_on_every_backend():
    """bf16 runs everywhere: natively on the GPU, in fp32 and cast back under the interpreter."""
    check_varlen(*packed([40, 3], [40, 20], 2, 1, 32, dtype=torch.bfloat16, seed=9), causal=True)


@pytest.mark.parametrize("d", [80, 128])
def test_larger_and_odd_head_dims(d):
    check_varlen(*packed([20, 37], [37, 20], 1, 1, d, seed=d), causal=True)


def test_explicit_scale_and_large_logits():
    """Logits scaled 30-fold (lse > 88, where exp overflows float32): the running max keeps them finite."""
    out, lse = check_varlen(*packed([60, 9], [60, 40], 2, 2, 32, seed=4), scale=30.0 / 32**0.5)
    assert torch.isfinite(out).all() and lse.max() > 88


def test_other_tiles():
    """Tiles that are not the interpreter's default (rows and keys blocks of different sizes, so block
    edges fall at other places inside each sequence) give the same result."""
    cfg = {"num_warps": 4, "num_stages": 1}
    with planning.override({"varlen.fwd": {**cfg, "BLOCK_M": 16, "BLOCK_N": 64},
                            "varlen.dkdv": {**cfg, "BLOCK_M": 64, "BLOCK_N": 16},
                            "varlen.dq": {**cfg, "BLOCK_M": 16, "BLOCK_N": 32}}):
        check_varlen(*packed([70, 1, 33], [45, 80, 33], 2, 1, 16, seed=5), causal=True, against_flash=False)


@settings(max_examples=5 if mk.backend() == "interpreter" else 60)
@given(lens=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=3),
       hkv=st.integers(1, 2), group=st.integers(1, 2), d=st.sampled_from([16, 24]), causal=st.booleans(),
       seed=st.integers(0, 999))
def test_property_random_lengths(lens, hkv, group, d, causal, seed):
    lens_q, lens_k = [a for a, _ in lens], [b for _, b in lens]
    check_varlen(*packed(lens_q, lens_k, hkv * group, hkv, d, seed=seed), causal=causal, seed=seed,
                 against_flash=False)


# --- layouts -------------------------------------------------------------------------------------

def test_views_of_a_packed_qkv_projection():
    """q, k, v as slices of one [total, 3, H, D] tensor (a fused projection): rows 3*H*D elements apart."""
    lens = [17, 1, 50]
    qkv = randn(sum(lens), 3, 2, 32, seed=11)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous() and q.stride(0) == 3 * 2 * 32
    check_varlen(q, k, v, offsets(lens), offsets(lens), causal=True)


def test_other_strides():
    """Every stride different: a non-unit lane stride, heads outermost in storage, and a kv pair."""
    lens_q, lens_k = [30, 12], [12, 41]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, 2, 2, 16, seed=12)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)  # storage [H, total, D]
    k = strided_like(k)  # lanes 2 apart
    kv = torch.stack([k, v], dim=1)  # [total_k, 2, Hkv, D]
    check_varlen(q, k, kv[:, 1], cu_q, cu_k, causal=False)


# --- empty pieces ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lens_q,lens_k", [([], []), ([0, 0], [0, 0]), ([0, 0], [5, 3]), ([4, 2], [0, 0])])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_batches_and_sequences(lens_q, lens_k, causal):
    """No sequence, no query token or no key token at all: outputs of the right shapes (zeros where a
    query exists but sees no key) that stay in the autograd graph, with zero gradients."""
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, 2, 1, 16, seed=13)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with poisoned():
        out, lse = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q, default=0), max(lens_k, default=0),
                                             causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, q.shape[0]) and out.grad_fn is not None
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    with poisoned():
        out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


def test_max_seqlen_larger_than_needed():
    """max_seqlen only has to bound the lengths: a larger one launches empty programs, same result."""
    q, k, v, cu_q, cu_k = packed([9, 20], [20, 9], 2, 2, 16, seed=14)
    want = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 20, 20, causal=True)
    with poisoned():
        got = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 100, 75, causal=True)
    assert_close(got, want, name="max_seqlen 100 vs 20")


def test_sequences_in_several_launches():
    """More sequences than a grid axis holds go in several launches, each reading its slice of the
    offsets (the limit lowered here to 2 sequences a launch)."""
    with planning.override({"varlen.max_grid_z": 2}):
        check_varlen(*packed([9, 0, 20, 3, 16], [9, 4, 20, 0, 30], 2, 1, 16, seed=16), causal=True,
                     against_flash=False)


def test_kernels_clamp_offsets_they_cannot_trust():
    """While a CUDA graph is captured the offsets are not checked on the host; the kernels clamp each
    sequence to the packed tensor and to max_seqlen, so bad offsets never read or write outside it."""
    from minikernels import varlen

    q, k, v, _, _ = packed([20], [20], 1, 1, 16, seed=17)
    bad = torch.tensor([0, 50], dtype=torch.int32, device=DEVICE)  # past the 20 tokens there are
    out, _ = varlen.launch_forward(q, k, v, bad, bad, 50, 50, False, 0.25)
    want = mk.flash_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), scale=0.25)
    assert_close(out, want[0].transpose(0, 1), name="clamped to the tokens there are")


def test_benchmark_lengths_sum_to_the_token_count():
    from minikernels.bench.attention import mixed_lengths

    lengths = mixed_lengths(16384, 256, 4096, seed=0)
    assert sum(lengths) == 16384 and all(256 <= n <= 4096 for n in lengths) and len(set(lengths)) > 1


# --- autograd ------------------------------------------------------------------------------------

def test_return_lse_flag():
    q, k, v, cu_q, cu_k = packed([8, 3], [8, 3], 1, 1, 16)
    out = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 8, 8)
    assert isinstance(out, torch.Tensor)
    pair = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 8, 8, return_lse=True)
    assert isinstance(pair, tuple) and len(pair) == 2 and torch.equal(pair[0], out)


def test_backward_keeps_only_inputs_output_logsumexp_and_offsets():
    q, k, v, cu_q, cu_k = packed([30, 34], [40, 8], 2, 1, 16, seed=6)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 34, 40, causal=True)
    saved = sorted(tuple(t.shape) for t in out.grad_fn.saved_tensors)
    assert saved == sorted([tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(out.shape), (2, 64), (3,), (3,)])


def test_double_backward_raises():
    q, k, v, cu_q, cu_k = packed([20, 5], [20, 5], 2, 2, 16, seed=13)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 20, 20, causal=True)
    dq, dk = torch.autograd.grad(out.sum(), (q, k), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (dq.square().sum() + dk.square().sum()).backward()


def test_long_sequences_past_32_bit_offsets_are_compacted():
    """Within a sequence the kernels index with 32-bit arithmetic: a view whose longest sequence spans
    more than that is made compact, and one too long even then is refused (the limit lowered here)."""
    with planning.override({"int32_limit": 40 * 16}):
        q, k, v, cu_q, cu_k = packed([40, 3], [40, 3], 1, 1, 16, seed=10)
        check_varlen(strided_like(q), strided_like(k), strided_like(v), cu_q, cu_k, causal=True,
                     against_flash=False)
        q, k, v, cu_q, cu_k = packed([50], [50], 1, 1, 16, seed=11)
        with pytest.raises(ValueError, match="more than 2\\^31"):
            mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 50, 50)


# --- bad input ------------------------------------------------------------------------------------

def _good():
    return packed([5, 3], [4, 6], 4, 2, 16)


@pytest.mark.parametrize("change,error,match", [
    (lambda a: {**a, "q": a["q"][None]}, ValueError, r"q must have 3 dimensions \[total_q, H, D\]"),
    (lambda a: {**a, "q": a["q"].long()}, TypeError, "q has dtype int64"),
    (lambda a: {**a, "q": a["q"].half()}, TypeError, "must share one dtype"),
    (lambda a: {**a, "v": a["v"][:, :1]}, ValueError, "k and v must have the same shape"),
    (lambda a: {**a, "q": a["q"][..., :8]}, ValueError, "head dims differ"),
    (lambda a: {**a, "q": a["q"][:, :3]}, ValueError, r"heads \(2\) must divide q heads \(3\)"),
    (lambda a: {**a, "k": a["k"].to("meta")}, ValueError, "is on device 'meta'"),
    (lambda a: {**a, "cu_q": [0, 5, 8]}, TypeError, "cu_seqlens_q must be an int32 tensor"),
    (lambda a: {**a, "cu_q": a["cu_q"].long()}, TypeError, "cu_seqlens_q must have dtype int32, got int64"),
    (lambda a: {**a, "cu_k": a["cu_k"][None]}, ValueError, r"cu_seqlens_k must have shape \[B \+ 1\]"),
    (lambda a: {**a, "cu_q": a["cu_q"][:0]}, ValueError, r"cu_seqlens_q must have shape \[B \+ 1\]"),
    (lambda a: {**a, "cu_k": offsets([10])}, ValueError, "must both be \\[B \\+ 1\\]"),
    (lambda a: {**a, "cu_q": a["cu_q"] + 1}, ValueError, "cu_seqlens_q must start at 0"),
    (lambda a: {**a, "cu_q": torch.tensor([0, 5, 7], dtype=torch.int32, device=DEVICE)}, ValueError,
     r"cu_seqlens_q\[-1\] must equal the number of tokens of q \(8\), got 7"),
    (lambda a: {**a, "cu_k": torch.tensor([0, 11, 10], dtype=torch.int32, device=DEVICE)}, ValueError,
     r"cu_seqlens_k must be non-decreasing, got cu_seqlens_k\[1\] = 11 > cu_seqlens_k\[2\] = 10"),
    (lambda a: {**a, "max_q": 4}, ValueError, r"max_seqlen_q=4 is shorter than the longest sequence in "
                                             r"cu_seqlens_q \(5\)"),
    (lambda a: {**a, "max_k": 5.0}, TypeError, "max_seqlen_k must be a Python int"),
    (lambda a: {**a, "max_k": True}, TypeError, "max_seqlen_k must be a Python int"),
    (lambda a: {**a, "max_q": -1}, ValueError, "max_seqlen_q must be >= 0"),
    (lambda a: {**a, "q": randn(8, 4, 300, seed=0), "k": randn(10, 2, 300, seed=1), "v": randn(10, 2, 300, seed=2)},
     ValueError, "head dim D=300 is not supported"),
    (lambda a: {**a, "causal": 1}, TypeError, "causal must be a bool"),
    (lambda a: {**a, "scale": float("nan")}, TypeError, "scale must be a finite float"),
    (lambda a: {**a, "return_lse": "yes"}, TypeError, "return_lse must be a bool"),
])
def test_rejects_bad_input(change, error, match):
    q, k, v, cu_q, cu_k = _good()
    args = change({"q": q, "k": k, "v": v, "cu_q": cu_q, "cu_k": cu_k, "max_q": 5, "max_k": 6})
    kwargs = {name: args.pop(name) for name in ("causal", "scale", "return_lse") if name in args}
    with pytest.raises(error, match=match):
        mk.flash_attention_varlen(args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"], args["max_q"],
                                  args["max_k"], **kwargs)


def test_planned_tiles_are_flash_attentions():
    """The varlen kernels run flash.py's block loops, so they take its tiles (checked to fit every
    GPU's shared memory in test_flash.py): the same choice for every kernel, head dim and dtype."""
    from minikernels import flash, varlen

    for kernel in ("fwd", "dkdv", "dq"):
        for d in (16, 64, 80, 128, 256):
            for elem in (2, 4):
                assert varlen._planned(kernel, d, elem, 232448) == flash.tile_config(kernel, d, elem, 232448)


# --- GPU only: every dtype and head dim, many sequences, ~32k tokens ---------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [16, 32, 64, 80, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_every_dtype_and_head_dim(d, dtype, causal):
    """Every dtype and head dim runs (flash's tiles fit this GPU's shared memory), ragged lengths,
    Nq != Nk and grouped heads included."""
    lens_q, lens_k = [300, 0, 1, 257, 1000, 17, 128], [257, 5, 1, 300, 1000, 0, 129]
    check_varlen(*packed(lens_q, lens_k, 4, 2, d, dtype=dtype, seed=d), causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_many_sequences_32k_tokens(d, causal, dtype):
    """~32k tokens in sequences of 1 to 2048 tokens, forward and backward, against the float64
    reference and flash_attention on each sequence."""
    g = torch.Generator().manual_seed(d)
    lens = []
    while sum(lens) < 32768:
        lens.append(int(torch.randint(1, 2049, (1,), generator=g)))
    lens[-1] -= sum(lens) - 32768
    check_varlen(*packed(lens, lens, 8, 2, d, dtype=dtype, seed=d), causal=causal)


@pytest.mark.gpu
def test_gpu_poisoned_output_is_fully_written():
    q, k, v, cu_q, cu_k = packed([4096] * 4, [4096] * 4, 16, 16, 128, dtype=torch.bfloat16)
    with poisoned():
        out = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 4096, 4096, causal=True)
    assert not torch.isnan(out).any()


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """Under CUDA-graph capture the host check of the offsets is skipped (no synchronisation); the
    captured forward, replayed on new offsets of the same shape, matches an eager call."""
    q, k, v, cu_q, cu_k = packed([100, 300, 7], [100, 300, 7], 4, 2, 64, dtype=torch.bfloat16, seed=15)
    mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 512, 512, causal=True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 512, 512, causal=True)
    cu_q.copy_(offsets([200, 7, 200]))
    cu_k.copy_(offsets([200, 7, 200]))
    graph.replay()
    want = mk.flash_attention_varlen(q, k, v, cu_q, cu_k, 512, 512, causal=True)
    assert_close(out, want, torch.bfloat16, name="graph replay", tol=tolerance(torch.float32))
