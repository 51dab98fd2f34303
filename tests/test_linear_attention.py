"""mk.linear_attention (Triton, chunked) against mk.reference.linear_attention (the recurrence, in
float64): outputs, final states and the gradients of q, k, v, decay and the initial state."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels import planning
from minikernels.testing import assert_close, poisoned, randn, strided_like, test_dtypes, tolerance


def make(b, h, n, dk, dv, dtype, seed=0, decay=True, strength=1.0, state=False):
    g = torch.Generator().manual_seed(seed)
    q, k = (randn(b, h, n, dk, dtype=dtype, gen=g, scale=dk**-0.5) for _ in range(2))
    v = randn(b, h, n, dv, dtype=dtype, gen=g)
    dec = (-strength * torch.rand(b, h, n, generator=g)).to(mk.device()) if decay else None
    s0 = randn(b, h, dk, dv, gen=g) if state else None
    return q, k, v, dec, s0


def check(q, k, v, decay=None, s0=None, chunk=16, feature_map=None, normalize=False, dtype=None):
    """Forward, state and every gradient against the float64 recurrence."""
    dtype = dtype or q.dtype
    ins = [t.detach().requires_grad_() if t is not None else None for t in (q, k, v, decay, s0)]
    want_state = not normalize
    with poisoned():
        res = mk.linear_attention(*ins[:3], decay=ins[3], feature_map=feature_map, normalize=normalize,
                                  chunk_size=chunk, initial_state=ins[4], return_state=want_state)
    out, state = res if want_state else (res, None)
    ref_ins = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, v, decay, s0)]
    ref = mk.reference.linear_attention(*ref_ins[:3], decay=ref_ins[3], feature_map=feature_map,
                                        normalize=normalize, initial_state=ref_ins[4], return_state=want_state)
    ref_out, ref_state = ref if want_state else (ref, None)
    assert out.dtype == dtype and out.shape == v.shape
    assert_close(out, ref_out, dtype, name="out")
    if want_state:
        assert state.dtype == torch.float32
        assert_close(state, ref_state, dtype, name="state")
    g = torch.Generator().manual_seed(123)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * do.to(out.device)).sum()
    ref_loss = (ref_out * do.to(out.device)).sum()
    if want_state:
        dstate = torch.randn(state.shape, generator=g, dtype=torch.float64).to(out.device)
        loss = loss + (state.double() * dstate).sum()
        ref_loss = ref_loss + (ref_state * dstate).sum()
    names = [n for n, t in zip(("dq", "dk", "dv", "ddecay", "dinitial_state"), ins) if t is not None]
    with poisoned():
        got = torch.autograd.grad(loss, [t for t in ins if t is not None])
    want = torch.autograd.grad(ref_loss, [t for t in ref_ins if t is not None])
    for name, a, b_ in zip(names, got, want):
        if name == "ddecay":
            assert_decay_grad_close(a, b_, ref_ins[0], want[0], dtype)
        else:
            assert_close(a, b_, dtype, name=name)  # bounds of the inputs' dtype, also for the fp32 state
    return out


def assert_decay_grad_close(got, want, q, dq, dtype):
    """The kernel gets d(decay) from the identity dL/dG_t = q_t.dq_t - k_t.dk_t, summed from t on: a
    difference of two terms that nearly cancel when the decay is strong (then the exact gradient is
    ~0 and a relative error means nothing). So the error is measured against the size of the terms
    the identity subtracts, sum_{u >= t} |q_u . dq_u|, or the gradient itself if that is larger."""
    terms = (q * dq).sum(-1).abs().flip(-1).cumsum(-1).flip(-1)
    scale = max(torch.linalg.vector_norm(want).item(), torch.linalg.vector_norm(terms).item())
    err = torch.linalg.vector_norm(got.double() - want).item() / scale
    assert err <= tolerance(dtype), f"ddecay: error {err:.2e} (relative to the cancelling terms) > {tolerance(dtype)}"


@pytest.mark.parametrize("dtype", test_dtypes())
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("chunk", [16, 64])
def test_matches_the_recurrence(dtype, decay, chunk):
    q, k, v, g, s0 = make(2, 2, 100, 32, 16, dtype, decay=decay, state=True)
    check(q, k, v, g, s0, chunk=chunk)


@pytest.mark.parametrize("n", [1, 17, 64, 65])
def test_lengths_that_are_not_a_multiple_of_the_chunk(n):
    check(*make(1, 2, n, 16, 16, torch.float32, seed=n))


def test_dk_and_dv_differ_and_are_not_powers_of_two():
    check(*make(1, 2, 40, 24, 80, torch.float32, seed=2, state=True))


def test_state_blocks_split_over_several_programs():
    """Dk = 160 and Dv = 96 take several 64-wide state blocks: partial products summed on the host."""
    check(*make(1, 1, 33, 160, 96, torch.float32, seed=3, state=True))


@pytest.mark.parametrize("unroll", [0, 8])
def test_value_blocks_of_the_query_key_gradients_in_a_loop_or_unrolled(unroll):
    """_la_dqdk covers Dv in blocks of 64: for 16-bit inputs unrolled when they are few, in a loop
    when they are many (unrolled inside a loop over heads, each block takes shared memory of its
    own). Dv = 200, 4 blocks, both ways (float16: the unrolled form is not used for float32)."""
    with planning.override({"linear.dqdk_unroll_v": unroll}):
        check(*make(1, 2, 37, 24, 200, torch.float16, seed=21, state=True))


def test_launch_fitting_steps_down_until_the_kernel_fits():
    """On a GPU, a configuration can ask for more shared memory than a program may have; Triton then
    raises OutOfResources before the kernel runs. The launch steps down (fewer stages, then the tile
    halved, not below 16) until one fits, and starts from that configuration next time."""
    from triton.runtime.errors import OutOfResources

    from minikernels._common import launch_fitting

    tried = []

    def launch(cfg, fits=32):
        tried.append((cfg["BK"], cfg["num_stages"]))
        if cfg["BK"] > fits or cfg["num_stages"] > 1:
            raise OutOfResources(cfg["BK"] * 1024, 1024, "shared memory")
        return f"ran with {cfg['BK']}"

    key = ("a test", object())
    start = {"BK": 128, "num_stages": 2}
    assert launch_fitting(key, start, launch, ("BK",)) == "ran with 32"
    assert tried == [(128, 2), (128, 1), (64, 2), (64, 1), (32, 2), (32, 1)]
    tried.clear()
    assert launch_fitting(key, start, launch, ("BK",)) == "ran with 32" and tried == [(32, 1)]
    tried.clear()  # another first configuration (a narrower Dk) starts from itself, and fits at once
    assert launch_fitting(key, {"BK": 16, "num_stages": 1}, launch, ("BK",)) == "ran with 16" and tried == [(16, 1)]
    tried.clear()
    with pytest.raises(OutOfResources):
        launch_fitting(("another test", object()), start, lambda cfg: launch(cfg, fits=8), ("BK",))
    assert tried == [(128, 2), (128, 1), (64, 2), (64, 1), (32, 2), (32, 1), (16, 2), (16, 1)]


@pytest.mark.parametrize("n_seg", [1, 2, 3, 8])
@pytest.mark.parametrize("decay,state", [(False, False), (True, True)])
def test_state_pass_cut_into_segments(n_seg, decay, state):
    """With few programs the state pass cuts the sequence into segments (each walked from zeros,
    then a pass over the segments, then each walked again from the state it really starts from):
    any number of segments, a last one shorter than the rest, gives the states of one sequential
    walk, and so the same outputs, final state and gradients against the recurrence."""
    from minikernels.linear import states

    q, k, v, g, s0 = make(1, 2, 7 * 16 + 5, 24, 40, torch.float32, seed=9, decay=decay, state=state)
    kw, vw = k.float(), v.float()
    with planning.override({"linear.segments": 1}):
        want_hs, want_end = states.chunk_states(kw, vw, g, s0, 16, want_final=True)
    if n_seg > 1:  # (one segment is the sequential walk itself: checked against the recurrence below)
        with poisoned(), planning.override({"linear.segments": n_seg}):
            got_hs, got_end = states.chunk_states(kw, vw, g, s0, 16, want_final=True)
        torch.testing.assert_close(got_hs, want_hs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_end, want_end, rtol=1e-5, atol=1e-5)
    with planning.override({"linear.segments": n_seg}):
        check(q, k, v, g, s0)


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "taylor"])
def test_feature_maps(feature_map):
    q, k, v, g, _ = make(1, 2, 30, 8, 16, torch.float32, seed=4)
    check(q, k, v, g, feature_map=feature_map)


def test_callable_feature_map():
    q, k, v, g, _ = make(1, 2, 30, 8, 16, torch.float32, seed=5)
    check(q, k, v, g, feature_map=lambda x: torch.cat([x.relu(), (-x).relu()], dim=-1))


def test_normalize():
    q, k, v, g, _ = make(2, 1, 50, 16, 16, torch.float32, seed=6)
    check(q, k, v, g, feature_map="elu1", normalize=True)


def test_non_contiguous_inputs():
    q, k, v, g, s0 = make(1, 2, 40, 16, 16, torch.float32, seed=7, state=True)
    check(strided_like(q), strided_like(k), strided_like(v), strided_like(g), s0)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # [B, N, H, D] storage
    assert not qt.is_contiguous()
    check(qt, kt, vt, g)


@pytest.mark.parametrize("log_decay", [-30.0, 0.0])
def test_strong_and_no_decay_are_stable(log_decay):
    q, k, v, _, _ = make(1, 2, 150, 16, 16, torch.float32, seed=8, decay=False)
    g = torch.full(q.shape[:3], log_decay, device=q.device)
    out = check(q, k, v, g, chunk=64)
    assert torch.isfinite(out).all()


def test_two_halves_with_the_carried_state_equal_one_pass():
    q, k, v, g, _ = make(1, 2, 90, 16, 16, torch.float32, seed=9)
    whole, s_whole = mk.linear_attention(q, k, v, decay=g, chunk_size=16, return_state=True)
    a, s = mk.linear_attention(q[:, :, :37], k[:, :, :37], v[:, :, :37], decay=g[:, :, :37], chunk_size=16,
                               return_state=True)
    b, s2 = mk.linear_attention(q[:, :, 37:], k[:, :, 37:], v[:, :, 37:], decay=g[:, :, 37:], chunk_size=16,
                                initial_state=s, return_state=True)
    assert_close(torch.cat([a, b], dim=2), whole, torch.float32)
    assert_close(s2, s_whole, torch.float32)


def _outputs_and_grads(q, k, v, g, s0):
    ins = [t.detach().requires_grad_() for t in (q, k, v, g, s0)]
    with poisoned():
        out, state = mk.linear_attention(*ins[:3], decay=ins[3], initial_state=ins[4], chunk_size=16,
                                         return_state=True)
        grads = torch.autograd.grad(out.sum() + state.sum(), ins)
    return (out, state, *grads)


def test_batches_larger_than_one_grid_launch_in_slices():
    """The kernels put (batch, head) on a grid axis of at most 65535 programs; a larger batch runs in
    slices of whole batch entries. With the limit lowered to 9 pairs (two entries of 4 heads a call,
    an uneven last slice): bit-equal to one call, output, state and every gradient."""
    q, k, v, g, s0 = make(5, 4, 40, 16, 16, torch.float32, seed=31, state=True)
    whole = _outputs_and_grads(q, k, v, g, s0)
    with planning.override({"linear.max_grid_y": 9}):
        sliced = _outputs_and_grads(q, k, v, g, s0)
        check(q, k, v, g, s0)
        with planning.override({"linear.max_grid_y": 3}), pytest.raises(ValueError, match="4 heads are more"):
            mk.linear_attention(q, k, v)
    for name, a, b_ in zip(("out", "state", "dq", "dk", "dv", "ddecay", "ds0"), sliced, whole):
        assert torch.equal(a, b_), name


def test_slices_of_a_rated_batch_are_whole_groups():
    """With a rate of R rows (the log-decay of entry b reads rate[b % R], as mk.ssd passes it), a
    batch that is not whole groups of R entries is refused rather than cut short."""
    from minikernels.linear import apply_in_batch_slices

    q, k, v, _, _ = make(5, 1, 16, 16, 16, torch.float32, seed=32)
    weights, rate = torch.rand(5, 1, 16, device=q.device), -torch.rand(2, 1, device=q.device)
    with pytest.raises(ValueError, match="a rate of 2 rows needs a batch of whole groups of 2 entries, got 5"):
        apply_in_batch_slices(q, k, v, None, None, 16, torch.float32, weights, rate)


def test_gradient_of_the_state_alone():
    """Only the final state feeds the loss: the output's gradient is absent, not zero-filled."""
    q, k, v, g, s0 = make(1, 1, 20, 16, 16, torch.float32, seed=10, state=True)
    ins = [t.requires_grad_() for t in (q, k, v, g, s0)]
    _, state = mk.linear_attention(*ins[:3], decay=ins[3], initial_state=ins[4], return_state=True)
    got = torch.autograd.grad(state.sum(), ins)
    r = [t.detach().double().requires_grad_() for t in ins]
    _, ref_state = mk.reference.linear_attention(*r[:3], decay=r[3], initial_state=r[4], return_state=True)
    want = torch.autograd.grad(ref_state.sum(), r[1:])  # the state does not depend on q
    assert torch.count_nonzero(got[0]) == 0
    for a, b_ in zip(got[1:], want):
        assert_close(a, b_, torch.float32)


@settings(deadline=None)
@given(n=st.integers(1, 70), dk=st.sampled_from([8, 16, 20]), dv=st.sampled_from([8, 16, 33]),
       chunk=st.sampled_from([16, 32]), decay=st.booleans(), seed=st.integers(0, 99))
def test_property_random_shapes(n, dk, dv, chunk, decay, seed):
    check(*make(1, 2, n, dk, dv, torch.float32, seed=seed, decay=decay, state=seed % 2 == 0), chunk=chunk)


def test_bad_inputs():
    q, k, v, g, _ = make(1, 1, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        mk.linear_attention(q, k, v, chunk_size=48)
    with pytest.raises(ValueError, match="decay"):
        mk.linear_attention(q, k, v, decay=g[..., :3])
    with pytest.raises(ValueError, match="initial_state"):
        mk.linear_attention(q, k, v, initial_state=torch.zeros(1, 1, 8, 16, device=q.device))
    with pytest.raises(TypeError, match="share one dtype"):
        mk.linear_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="normalize"):
        mk.linear_attention(q, k, v, normalize=True, return_state=True)
    with pytest.raises(TypeError, match="dtype"):
        mk.linear_attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="feature_map must keep"):
        mk.linear_attention(q.half(), k.half(), v.half(), feature_map=lambda x: x.float())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [64, 128])
def test_gpu_gated_backward_at_model_size(dtype, chunk):
    """The gated (decaying) backward in 16-bit at a real head size, N = 2048 (fla refuses its own gated
    backward on triton 3.6 for a compiler bug; this checks ours on the GPU)."""
    q, k, v, g, s0 = make(1, 2, 2048, 128, 128, dtype, seed=11, strength=0.1, state=True)
    check(q, k, v, g, s0, chunk=chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [64, 128])
def test_gpu_float32_backward_at_model_size(chunk):
    """float32 with Dk = Dv = 128: _la_dqdk takes its Dv blocks in a loop (128 KB of shared memory at
    chunks of 64, 160 KB at 128 on the H200, Triton 3.6: no narrower Dk block needed)."""
    check(*make(1, 2, 1000, 128, 128, torch.float32, seed=22, strength=0.1, state=True), chunk=chunk)


@pytest.mark.gpu
def test_gpu_batch_beyond_the_grid_limit():
    """4100 x 16 (batch, head) pairs, more than the 65535 a grid axis holds: run in slices; the last
    entries (in the second slice) and the first equal the same entries run alone."""
    q, k, v, g, s0 = make(4100, 16, 40, 64, 64, torch.bfloat16, seed=32, strength=0.1, state=True)
    got = _outputs_and_grads(q, k, v, g, s0)
    for lo in (0, 4096):
        alone = _outputs_and_grads(*(t[lo:lo + 4] for t in (q, k, v, g, s0)))
        for name, a, b_ in zip(("out", "state", "dq", "dk", "dv", "ddecay", "ds0"), got, alone):
            assert_close(a[lo:lo + 4], b_, torch.bfloat16, name=f"{name}, entries {lo}..{lo + 3}")


@pytest.mark.gpu
def test_gpu_wide_values():
    """Dv = 512, 8 blocks of 64, which _la_dqdk takes in a loop."""
    check(*make(1, 2, 500, 64, 512, torch.bfloat16, seed=23, strength=0.1, state=True), chunk=64)


def test_normalize_in_float16_over_a_long_sequence():
    """The normalizer's numerator and denominator grow with N past float16's 65504; their ratio does
    not. The kernel's output stays float32 until the division."""
    q, k, v, _, _ = make(1, 1, 4096, 32, 16, torch.float16, seed=12, decay=False)
    out = mk.linear_attention(q, k, v, feature_map="elu1", normalize=True, chunk_size=128)
    ref = mk.reference.linear_attention(q.double(), k.double(), v.double(), feature_map="elu1", normalize=True)
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float16)


def test_minus_infinity_decay_resets_the_state():
    """A log-decay of -inf forgets everything before that step (a document boundary)."""
    q, k, v, g, _ = make(1, 2, 40, 16, 16, torch.float32, seed=13)
    g[:, :, 20] = float("-inf")
    out = mk.linear_attention(q, k, v, decay=g, chunk_size=16)
    assert torch.isfinite(out).all()
    assert_close(out, mk.reference.linear_attention(q.double(), k.double(), v.double(), decay=g.double()),
                 torch.float32)
    after = mk.linear_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], decay=g[:, :, 20:], chunk_size=16)
    assert_close(out[:, :, 20:], after.double(), torch.float32)  # as if the sequence started there


# --- bad and awkward inputs (issue 32) -----------------------------------------------------------

@pytest.mark.parametrize("loss", ["sum", "square"])
def test_double_backward_raises_instead_of_detaching(loss):
    """The Triton backward is not differentiable. Gradients taken with create_graph=True must not come
    back silently detached (a gradient penalty would then be dropped): differentiating them raises.
    After out.sum() no incoming gradient requires grad, the case torch's own once_differentiable misses."""
    q, k, v, g, s0 = make(1, 2, 20, 16, 16, torch.float32, seed=30, state=True)
    ins = [t.requires_grad_() for t in (q, k, v, g, s0)]
    out, state = mk.linear_attention(*ins[:3], decay=ins[3], initial_state=ins[4], return_final_state=True)
    total = out.sum() + state.sum() if loss == "sum" else (out**2).sum() + (state**2).sum()
    grads = torch.autograd.grad(total, ins, create_graph=True)
    plain = torch.autograd.grad(total, ins, retain_graph=True)
    for grad, want in zip(grads, plain):
        torch.testing.assert_close(grad.detach(), want)  # the same first-order gradients
        assert grad.requires_grad  # never a plain tensor cut from the graph
        with pytest.raises(RuntimeError, match="once_differentiable"):
            torch.autograd.grad(grad.pow(2).sum(), ins, allow_unused=True)


@pytest.mark.parametrize("b,h,n", [(1, 2, 0), (0, 2, 5), (2, 0, 5)])
@pytest.mark.parametrize("normalize", [False, True])
def test_empty_inputs_keep_the_graph(b, h, n, normalize):
    """N = 0 or B*H = 0: outputs of the right shapes (the final state: the initial one), still in the
    autograd graph, so that .backward() runs and gives zero gradients of the inputs' shapes."""
    gen = torch.Generator().manual_seed(31)
    q, k = (randn(b, h, n, 8, gen=gen, requires_grad=True) for _ in range(2))
    v = randn(b, h, n, 6, gen=gen, requires_grad=True)
    decay = (-torch.rand(b, h, n, generator=gen)).to(mk.device()).requires_grad_()
    s0 = None if normalize else randn(b, h, 8, 6, gen=gen, requires_grad=True)
    res = mk.linear_attention(q, k, v, decay=decay, feature_map="elu1", normalize=normalize, initial_state=s0,
                              return_final_state=not normalize)
    out, state = (res, None) if normalize else res
    assert out.shape == (b, h, n, 6) and out.dtype == v.dtype and out.requires_grad
    loss = out.sum()
    if state is not None:
        assert state.shape == (b, h, 8, 6) and state.dtype == torch.float32 and state.requires_grad
        torch.testing.assert_close(state, s0.detach())
        assert state.data_ptr() != s0.data_ptr() or s0.numel() == 0  # a copy, not the caller's tensor
        loss = loss + (2 * state).sum()
    loss.backward()
    for t in (q, k, v, decay):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()
    if s0 is not None:  # the final state is the initial one: its gradient passes through unchanged
        torch.testing.assert_close(s0.grad, torch.full_like(s0, 2.0))


@pytest.mark.parametrize("t", [0, 20, 70])
def test_nan_in_the_decay_reaches_every_later_output(t):
    """A NaN log-decay at step t is not a reset (the kernel's clamp of -inf at -80 used to map NaN to
    -80): the outputs of that head at steps >= t and its final state are NaN, those before t and the
    other head's stay finite, as in the recurrence. N = 100 in chunks of 16 also takes the segmented
    state pass (the interpreter cuts 7 chunks into 2 segments)."""
    q, k, v, g, _ = make(1, 2, 100, 16, 16, torch.float32, seed=32)
    g[0, 0, t] = float("nan")
    out, state = mk.linear_attention(q, k, v, decay=g, chunk_size=16, return_final_state=True)
    ref = mk.reference.linear_attention(q.double(), k.double(), v.double(), decay=g.double())
    for o in (out, ref):
        assert torch.isnan(o[0, 0, t:]).all()
        assert torch.isfinite(o[0, 0, :t]).all() and torch.isfinite(o[0, 1]).all()
    assert torch.isnan(state[0, 0]).all() and torch.isfinite(state[0, 1]).all()
    assert_close(out[0, :, :t], ref[0, :, :t], torch.float32)  # the finite part is unchanged


def test_minus_infinity_decay_still_resets_with_nan_propagation():
    """-inf (a reset) and NaN differ: after -inf the outputs are finite."""
    q, k, v, g, _ = make(1, 1, 40, 16, 16, torch.float32, seed=33)
    g[0, 0, 5] = float("-inf")
    assert torch.isfinite(mk.linear_attention(q, k, v, decay=g, chunk_size=16)).all()


@pytest.mark.parametrize("bad", [lambda x: [x], lambda x: x.tolist(), lambda x: None,
                                 lambda x: x.detach().cpu().numpy()])
def test_feature_map_that_returns_no_tensor(bad):
    q, k, v, _, _ = make(1, 1, 8, 16, 16, torch.float32)
    for op in (mk.linear_attention, mk.reference.linear_attention):
        with pytest.raises(TypeError, match="feature_map must return a torch.Tensor"):
            op(q, k, v, feature_map=bad)


def test_feature_map_of_the_wrong_type_or_name():
    q, k, v, _, _ = make(1, 1, 8, 16, 16, torch.float32)
    for op in (mk.linear_attention, mk.reference.linear_attention):
        with pytest.raises(TypeError, match="feature_map must be None, a callable or one of"):
            op(q, k, v, feature_map=3)
        with pytest.raises(ValueError, match="feature_map must be None, a callable or one of"):
            op(q, k, v, feature_map="softmax")


def test_feature_map_of_the_wrong_shape():
    q, k, v, _, _ = make(1, 1, 8, 16, 16, torch.float32)
    for op in (mk.linear_attention, mk.reference.linear_attention):
        with pytest.raises(ValueError, match="feature_map must keep"):
            op(q, k, v, feature_map=lambda x: x[:, :, :4])
        with pytest.raises(ValueError, match="feature_map must keep"):
            op(q, k, v, feature_map=lambda x: x.flatten(2))


@pytest.mark.parametrize("flag", ["normalize", "return_state", "return_final_state"])
@pytest.mark.parametrize("value", [1, 0, "yes", torch.tensor(True)])
def test_flags_must_be_bools(flag, value):
    q, k, v, _, _ = make(1, 1, 8, 16, 16, torch.float32)
    for op in (mk.linear_attention, mk.reference.linear_attention):
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            op(q, k, v, **{flag: value})


def test_return_final_state_and_its_alias_return_state():
    q, k, v, g, s0 = make(1, 2, 30, 16, 16, torch.float32, seed=34, state=True)
    kw = dict(decay=g, initial_state=s0, chunk_size=16)
    old, old_state = mk.linear_attention(q, k, v, return_state=True, **kw)
    new, new_state = mk.linear_attention(q, k, v, return_final_state=True, **kw)
    both, both_state = mk.linear_attention(q, k, v, return_state=True, return_final_state=True, **kw)
    for o, s in ((new, new_state), (both, both_state)):
        torch.testing.assert_close(o, old)
        torch.testing.assert_close(s, old_state)
    assert isinstance(mk.linear_attention(q, k, v, return_state=False, return_final_state=False, **kw), torch.Tensor)
    assert isinstance(mk.linear_attention(q, k, v, **kw), torch.Tensor)
    ref, ref_state = mk.reference.linear_attention(q.double(), k.double(), v.double(), decay=g.double(),
                                                   initial_state=s0.double(), return_final_state=True)
    assert_close(new, ref, torch.float32)
    assert_close(new_state, ref_state, torch.float32)
    for op in (mk.linear_attention, mk.reference.linear_attention):
        for old_value, new_value in ((True, False), (False, True)):
            with pytest.raises(ValueError, match="return_state is an alias of return_final_state"):
                op(q, k, v, return_state=old_value, return_final_state=new_value)
