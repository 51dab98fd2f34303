"""mk.ssd (Mamba-2's SSD, run on the chunked linear-attention kernels) against the float64
recurrence in mk.reference.ssd and against its quadratic (attention) form: outputs, final states
and the gradients of x, dt, A, B, C, D and the initial state."""

import pytest
import torch
import torch.nn.functional as F

import minikernels as mk
from minikernels import planning
from minikernels.duality import quadratic_form
from minikernels.testing import assert_close, poisoned, randn, test_dtypes


def make(b=2, h=4, g=2, n=50, p=16, s=16, dtype=torch.float32, seed=0, state=True):
    gen = torch.Generator().manual_seed(seed)
    x = randn(b, h, n, p, dtype=dtype, gen=gen)
    dt = F.softplus(torch.randn(b, h, n, generator=gen) - 1.0).to(mk.device())  # positive, ~0.3
    A = -torch.rand(h, generator=gen).add(0.5).to(mk.device())  # negative: a decaying state
    B, C = (randn(b, g, n, s, dtype=dtype, gen=gen, scale=s**-0.5) for _ in range(2))
    D = randn(h, gen=gen)
    s0 = randn(b, h, s, p, gen=gen) if state else None
    return x, dt, A, B, C, D, s0


def check(x, dt, A, B, C, D, s0, chunk=16):
    dtype = x.dtype
    ins = [t.detach().requires_grad_() if t is not None else None for t in (x, dt, A, B, C, D, s0)]
    with poisoned():
        y, state = mk.ssd(*ins[:5], chunk_size=chunk, D=ins[5], initial_state=ins[6], return_final_state=True)
    r = [t.detach().double().requires_grad_() if t is not None else None for t in (x, dt, A, B, C, D, s0)]
    y_ref, state_ref = mk.reference.ssd(*r[:5], D=r[5], initial_state=r[6], return_final_state=True)
    assert y.dtype == dtype and state.dtype == torch.float32
    assert_close(y, y_ref, dtype, name="y")
    assert_close(state, state_ref, dtype, name="final state")
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)
    ds = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(y.device)
    leaves = [t for t in ins if t is not None]
    got = torch.autograd.grad((y.double() * dy).sum() + (state.double() * ds).sum(), leaves)
    want = torch.autograd.grad((y_ref * dy).sum() + (state_ref * ds).sum(), [t for t in r if t is not None])
    names = [n for n, t in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dinitial_state"), ins) if t is not None]
    for name, a, b in zip(names, got, want):
        assert_close(a, b, dtype, name=name)


@pytest.mark.parametrize("dtype", test_dtypes())
def test_matches_the_recurrence(dtype):
    check(*make(dtype=dtype))


@pytest.mark.parametrize("n", [1, 17, 64])
def test_lengths_and_no_initial_state(n):
    check(*make(n=n, seed=n, state=False), chunk=32)


def test_groups_equal_heads_and_a_single_group():
    check(*make(g=4, seed=1))
    check(*make(g=1, seed=2))


@pytest.mark.parametrize("most", [6, 8])
def test_batches_larger_than_one_grid_launch_in_slices(most):
    """The kernels put (batch entry, group) pairs times the group's heads on a grid axis of at most
    65535 programs; a larger batch runs in slices of whole batch entries (each slice keeps every group
    of an entry, whose heads read rows of A). With the limit lowered to 6 (one entry of 2 groups x 2
    heads a call) and to 8 (two, an uneven last slice): bit-equal to one call, but for dA, a sum over
    the batch that autograd adds up slice by slice (another order of float32 additions)."""
    x, dt, A, B, C, D, s0 = make(b=3, h=4, g=2, n=40, seed=33)

    def run():
        ins = [t.detach().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
        with poisoned():
            y, state = mk.ssd(*ins[:5], D=ins[5], initial_state=ins[6], return_final_state=True)
            return (y, state, *torch.autograd.grad(y.sum() + state.sum(), ins))

    whole = run()
    with planning.override({"linear.max_grid_y": most}):
        sliced = run()
    for name, a, b in zip(("y", "state", "dx", "ddt", "dA", "dB", "dC", "dD", "ds0"), sliced, whole):
        if name == "dA":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("most", [1, 2, 4, 8])
def test_backward_sums_a_groups_heads_in_pieces(most):
    # _la_dqdk sums the gradients of B and C over the heads of a group that share them: all 6 heads
    # in one program (most = 8), or pieces of 1, 2 or 3 heads, whose sums the backward adds afterwards
    taken = []

    def heads(per, _most):  # the default rule, with `most` heads at most, recorded
        taken.append(max(d for d in range(1, min(per, most) + 1) if per % d == 0))
        return taken[-1]

    with planning.override({"linear.dqdk_heads": heads}):
        check(*make(h=6, g=1, seed=7 + most))
        assert taken == [{1: 1, 2: 2, 4: 3, 8: 6}[most]]
        check(*make(h=6, g=2, seed=17 + most), chunk=32)  # 3 heads a group: pieces of 1 or 3
        assert taken[1] == (1 if most < 3 else 3)


def test_quadratic_form_is_the_same_model():
    x, dt, A, B, C, D, _ = (t.double() if t is not None else None for t in make(seed=3, state=False))
    assert_close(quadratic_form(x, dt, A, B, C, D), mk.reference.ssd(x, dt, A, B, C, D=D), torch.float64)


def test_dt_one_and_a_zero_equals_linear_attention():
    """With dt = 1 and A = 0 nothing decays and dt B = B: SSD is linear attention with q = C, k = B."""
    x, dt, A, B, C, _, _ = make(h=2, g=2, seed=4, state=False)
    y = mk.ssd(x, torch.ones_like(dt), torch.zeros_like(A), B, C)
    assert_close(y, mk.linear_attention(C, B, x), torch.float32)


def test_continuing_from_the_returned_state_equals_one_pass():
    x, dt, A, B, C, D, s0 = make(n=60, seed=6)
    whole, s_whole = mk.ssd(x, dt, A, B, C, D=D, initial_state=s0, return_final_state=True)
    cut = 27
    a, s = mk.ssd(x[:, :, :cut], dt[:, :, :cut], A, B[:, :, :cut], C[:, :, :cut], D=D, initial_state=s0,
                  return_final_state=True)
    b, s2 = mk.ssd(x[:, :, cut:], dt[:, :, cut:], A, B[:, :, cut:], C[:, :, cut:], D=D, initial_state=s,
                   return_final_state=True)
    assert_close(torch.cat([a, b], dim=2), whole, torch.float32)
    assert_close(s2, s_whole, torch.float32)


@pytest.mark.parametrize("n_seg", [1, 2, 3, 8])
@pytest.mark.parametrize("state", [True, False])
def test_one_walk_forward_cut_into_segments(n_seg, state):
    """The forward walks the chunks once with the state in registers (_la_fused), in segments that
    start from the states _segment_starts chains: any number of segments, a last one shorter than
    the rest, with or without an initial state, and Dv = 80 (two value blocks of 64, the second
    three-quarters empty) give the outputs and final state of the two-pass forward (chunk states
    through memory), and match the recurrence."""
    x, dt, A, B, C, D, s0 = make(b=1, h=2, g=1, n=7 * 16 + 5, p=80, s=24, seed=8, state=state)
    with planning.override({"linear.fused_max_dk": 0}):  # every Dk too wide: the two passes
        want_y, want_s = mk.ssd(x, dt, A, B, C, chunk_size=16, D=D, initial_state=s0, return_final_state=True)
    walks = []
    with poisoned(), planning.override({"linear.fused_segments": lambda programs, n_chunks, sms:
                                        walks.append(n_chunks) or n_seg}):
        y, state_out = mk.ssd(x, dt, A, B, C, chunk_size=16, D=D, initial_state=s0, return_final_state=True)
    assert walks == [8]  # the one walk ran, over 8 chunks
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_out, want_s, rtol=1e-5, atol=1e-5)
    with planning.override({"linear.fused_segments": n_seg}):  # the gradients too, against the recurrence
        check(x, dt, A, B, C, D, s0)


@pytest.mark.parametrize("n_seg", [1, 2, 3, 8])
@pytest.mark.parametrize("state", [True, False])
def test_one_walk_backward_cut_into_segments(n_seg, state):
    """The backward walks the chunks once in reverse with the state's gradient in registers
    (_la_dfused: the state gradients and dx in one pass), in segments that start from the gradients
    _reverse_segment_starts chains: any number of segments, a short one, with or without an initial
    state, Dv = 80 (two value blocks), a gradient flowing into the final state: every gradient equals
    that of the separate passes (_la_dstates, then _la_dv) and matches the recurrence."""
    x, dt, A, B, C, D, s0 = make(b=1, h=2, g=1, n=7 * 16 + 5, p=80, s=24, seed=12, state=state)
    ins = [t.detach().requires_grad_() if t is not None else None for t in (x, dt, A, B, C, D, s0)]
    leaves = [t for t in ins if t is not None]
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(x.shape, generator=gen).to(x.device)
    ds = torch.randn(1, 2, 24, 80, generator=gen).to(x.device)

    def grads():
        y, state_out = mk.ssd(*ins[:5], chunk_size=16, D=ins[5], initial_state=ins[6], return_final_state=True)
        return torch.autograd.grad((y * dy).sum() + (state_out * ds).sum(), leaves)

    with planning.override({"linear.fused_max_dk": 0}):  # every Dk too wide: the separate passes
        want = grads()
    walks = []
    # the backward takes the one walk only where the separate reverse pass would be cut into segments
    # (few programs: on a GPU, not at this size); taken here whatever the machine
    with poisoned(), planning.override({
            "linear.fused_segments": lambda programs, n_chunks, sms: walks.append(n_chunks) or n_seg,
            "linear.state_grad_segments": 2}):
        got = grads()
    assert walks == [8, 8]  # the forward's walk and the backward's, over 8 chunks each
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with planning.override({"linear.fused_segments": n_seg, "linear.state_grad_segments": 2}):
        check(x, dt, A, B, C, D, s0)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_one_walk_only_where_its_tiles_fit(direction):
    """On a GPU the one walk (forward: _la_fused; backward: _la_dfused) is taken only when its shared
    memory fits a program (227 KB on the H200): float32 tiles of 128 steps by S = 128 (about 296 KB
    in Triton 3.6, either way) take the separate passes."""
    from minikernels.linear import plan

    cfg, value_tiles = ((plan.FWD_TILES["fused"], 1) if direction == "forward" else (plan.BWD_TILES["dfused"], 2))

    def fits(dtype, chunk, s, p=64):  # against an H200's (and H100's) 232448 bytes a program
        elem = torch.empty((), dtype=dtype).element_size()
        return plan.fused_smem(s, p, elem, chunk, cfg, value_tiles) <= 232448

    assert fits(torch.bfloat16, 64, 128) and fits(torch.bfloat16, 128, 128) and fits(torch.float32, 64, 128)
    assert not fits(torch.float32, 128, 128)


def test_state_wider_than_one_tile():
    """S = 160 > 128: the forward takes the two passes (the one walk holds all of S in one tile)."""
    walks = []
    with planning.override({"linear.fused_segments": lambda programs, n_chunks, sms: walks.append(n_chunks) or 1}):
        check(*make(b=1, h=2, g=1, n=40, p=16, s=160, seed=10))
    assert walks == []


def test_values_wider_than_one_tile():
    """P = 160: the values' gradient comes in two Dv blocks, and so does the part of dt's that they
    give, summed before A's rate of decay is folded into dt's and A's gradients."""
    check(*make(b=3, h=2, g=1, n=40, p=160, s=16, seed=13))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_long_sequence(dtype):
    """L = 4096: the cumulative dt A falls below -1000, yet chunk-local log-decays keep
    every exponent <= 0, so nothing overflows or underflows into NaN."""
    x, dt, A, B, C, D, s0 = make(b=1, h=4, g=1, n=4096, p=64, s=64, dtype=dtype, seed=7)
    check(x, dt, A, B, C, D, s0, chunk=64)


@pytest.mark.gpu
def test_gpu_float32_chunks_of_128():
    """float32 tiles of 128 steps x S = 128 do not fit the one walk's shared memory (about 296 KB
    against 227 KB on the H200): the forward must take the two passes instead of failing to launch.
    The backward's _la_dqdk, looping over the 2 heads that read one B and C, would need 296 KB too:
    it must run with a narrower Dk block."""
    from minikernels import _common

    check(*make(b=1, h=2, g=1, n=300, p=64, s=128, seed=11), chunk=128)
    halved = [fitted["BK"] for (key, start), fitted in _common.fitted_launches().items()
              if key[0] == "dqdk" and key[2] == torch.float32 and key[3] == 128 and not key[7]]
    assert halved and max(halved) < 128


@pytest.mark.gpu
def test_gpu_batch_beyond_the_grid_limit():
    """4100 entries x 16 heads, more than the 65535 (entry, head) pairs a grid axis holds: run in
    slices; the first and last entries (in different slices) equal the same entries run alone."""
    x, dt, A, B, C, D, s0 = make(b=4100, h=16, g=1, n=40, p=64, s=64, dtype=torch.bfloat16, seed=34)

    def run(lo, hi):
        ins = [t[lo:hi].detach().requires_grad_() for t in (x, dt, B, C, s0)]
        with poisoned():
            y, state = mk.ssd(ins[0], ins[1], A, ins[2], ins[3], initial_state=ins[4], return_final_state=True)
            return (y, state, *torch.autograd.grad(y.float().sum() + state.sum(), ins))

    got = run(0, 4100)
    for lo in (0, 4096):
        alone = run(lo, lo + 4)
        for name, a, b in zip(("y", "state", "dx", "ddt", "dB", "dC", "ds0"), got, alone):
            assert_close(a[lo:lo + 4], b, torch.bfloat16, name=f"{name}, entries {lo}..{lo + 3}")


@pytest.mark.gpu
@pytest.mark.parametrize("p", [16, 32])
def test_gpu_narrow_values(p):
    """bf16 with value blocks of 16 and 32 columns (Triton 3.6 miscompiled the one walk at 32 columns
    with a single pipeline stage; the kernel uses 2)."""
    check(*make(b=1, h=4, g=1, n=1000, p=p, s=128, dtype=torch.bfloat16, seed=12), chunk=64)


def test_bad_inputs():
    x, dt, A, B, C, D, s0 = make(n=8)
    with pytest.raises(ValueError, match="dt must be"):
        mk.ssd(x, dt[:, :, :4], A, B, C)
    with pytest.raises(ValueError, match="groups"):
        mk.ssd(x, dt, A, B[:, :1].expand(-1, 3, -1, -1), C[:, :1].expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="A must be"):
        mk.ssd(x, dt, A[:2], B, C)
    with pytest.raises(ValueError, match="initial_state"):
        mk.ssd(x, dt, A, B, C, initial_state=s0[..., :3])
    with pytest.raises(ValueError, match="chunk_size"):
        mk.ssd(x, dt, A, B, C, chunk_size=24)


# --- bad and awkward inputs (issue 32) -----------------------------------------------------------

@pytest.mark.parametrize("loss", ["sum", "square"])
def test_double_backward_raises_instead_of_detaching(loss):
    """ssd runs the linear-attention kernels, whose backward is not differentiable: gradients taken
    with create_graph=True are the usual ones, and differentiating them again raises (D's gradient,
    computed in PyTorch, is not one of them: differentiating it runs the kernels' backward only once)."""
    ins = [t.detach().requires_grad_() for t in make(n=20, seed=20)]
    y, state = mk.ssd(*ins[:5], chunk_size=16, D=ins[5], initial_state=ins[6], return_final_state=True)
    total = y.sum() + state.sum() if loss == "sum" else (y**2).sum() + (state**2).sum()
    grads = torch.autograd.grad(total, ins, create_graph=True)
    plain = torch.autograd.grad(total, ins, retain_graph=True)
    for name, grad, want in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), grads, plain):
        torch.testing.assert_close(grad.detach(), want)
        if name == "D":  # dD = sum(dy * x), in PyTorch: differentiating it needs the kernels' backward once
            continue
        with pytest.raises(RuntimeError, match="once_differentiable"):
            torch.autograd.grad(grad.pow(2).sum(), ins, allow_unused=True)


@pytest.mark.parametrize("b,n", [(2, 0), (0, 20)])
@pytest.mark.parametrize("state", [True, False])
def test_empty_inputs_keep_the_graph(b, n, state):
    """N = 0 or B = 0: y of x's shape and the final state (the initial one, or zeros), still in the
    autograd graph: .backward() runs and every input gets a gradient of its shape (zeros, but the
    initial state's, which the final state passes through)."""
    ins = [t.detach().requires_grad_() if t is not None else None for t in make(b=b, n=n, seed=21, state=state)]
    for op in (mk.ssd, mk.reference.ssd):
        y, final = op(*ins[:5], D=ins[5], initial_state=ins[6], return_final_state=True)
        assert y.shape == ins[0].shape and y.requires_grad and final.requires_grad
        assert final.shape == (b, 4, 16, 16)
        (y.sum() + 3 * final.sum()).backward()
        for name, t in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), ins):
            if t is None:
                continue
            assert t.grad is not None and t.grad.shape == t.shape, name
            if name == "initial_state":
                torch.testing.assert_close(t.grad, torch.full_like(t, 3.0))
            elif name != "D" or n == 0 or b == 0:  # D's gradient is sum(dy * x): empty sums, zeros
                assert not t.grad.any(), name
            t.grad = None


@pytest.mark.parametrize("n", [30, 70])
def test_nan_in_a_reaches_every_output_of_its_head(n):
    """A NaN in A[h] (the rate of head h's log-decay dt * A) must not vanish: the kernel's clamp of
    -inf log-decays used to map NaN to a reset. Every output of head h, and its final state, is NaN;
    the other heads (the same group's included) are unchanged. N = 70 in chunks of 16 also takes the
    segmented one-walk forward."""
    x, dt, A, B, C, D, s0 = make(b=1, h=4, g=2, n=n, seed=22)
    want = mk.ssd(x, dt, A, B, C, chunk_size=16, D=D, initial_state=s0)
    A[1] = float("nan")
    y, state = mk.ssd(x, dt, A, B, C, chunk_size=16, D=D, initial_state=s0, return_final_state=True)
    ref = mk.reference.ssd(*(t.double() for t in (x, dt, A, B, C)), D=D.double(), initial_state=s0.double())
    for out in (y, ref):
        assert torch.isnan(out[:, 1]).all()
    assert torch.isnan(state[:, 1]).all()
    others = [0, 2, 3]
    assert torch.isfinite(y[:, others]).all() and torch.isfinite(state[:, others]).all()
    torch.testing.assert_close(y[:, others], want[:, others])


def test_return_final_state_must_be_a_bool():
    x, dt, A, B, C, _, _ = make(n=8)
    for op in (mk.ssd, mk.reference.ssd):
        for value in (1, "yes", None):
            with pytest.raises(TypeError, match="return_final_state must be a bool"):
                op(x, dt, A, B, C, return_final_state=value)


def test_error_messages_use_the_books_symbols():
    """x [B, H, N, d_v], B and C [B, G, N, n], states [B, H, n, d_v]: the book's symbols."""
    x, dt, A, B, C, _, s0 = make(n=8)
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, n, d_v\]"):
        mk.ssd(x, dt, A, B, C, initial_state=s0[..., :3])
    with pytest.raises(ValueError, match=r"B and C must have the same shape \[B, G, N, n\]"):
        mk.ssd(x, dt, A, B, C[..., :3])
    with pytest.raises(ValueError, match=r"x must have 4 dimensions \[B, H, N, d_v\]"):
        mk.ssd(x[0], dt, A, B, C)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        mk.ssd(x, dt, A, B, C, chunk_size=16.0)
