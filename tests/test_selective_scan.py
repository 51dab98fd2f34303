"""mk.selective_scan (Triton scan, forward and backward) against mk.reference.selective_scan (the
sequential loop of mamba_ssm's selective_scan_ref, in float64): outputs, last states and the
gradients of every input."""

import functools

import pytest
import torch
import torch.nn.functional as F

import minikernels as mk
from minikernels import planning
from minikernels.testing import assert_close, poisoned, randn, strided_like, test_dtypes


def make(b=2, d=8, l=37, n=4, groups=None, dtype=torch.float32, seed=0, extras=True):
    gen = torch.Generator().manual_seed(seed)
    u = randn(b, d, l, dtype=dtype, gen=gen)
    delta = randn(b, d, l, dtype=dtype, gen=gen, scale=0.5)
    A = -torch.rand(d, n, generator=gen).add(0.2).to(mk.device())
    shape = (b, n, l) if groups is None else (b, groups, n, l)
    B, C = (randn(*shape, dtype=dtype, gen=gen) for _ in range(2))
    D = randn(d, gen=gen) if extras else None
    z = randn(b, d, l, dtype=dtype, gen=gen) if extras else None
    bias = randn(d, gen=gen, scale=0.1) if extras else None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)


def check(args, softplus=True, dtype=None):
    dtype = dtype or args["u"].dtype
    names = [k for k, v in args.items() if v is not None]
    ins = {k: (v.detach().requires_grad_() if v is not None else None) for k, v in args.items()}
    with poisoned():
        out, last = mk.selective_scan(**ins, delta_softplus=softplus, return_last_state=True)
    ref_ins = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in args.items()}
    ref, ref_last = mk.reference.selective_scan(**ref_ins, delta_softplus=softplus, return_last_state=True)
    assert out.dtype == dtype and out.shape == args["u"].shape and last.dtype == torch.float32
    assert_close(out, ref, dtype, name="out")
    assert_close(last, ref_last, dtype, name="last state")
    gen = torch.Generator().manual_seed(9)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    dlast = torch.randn(last.shape, generator=gen, dtype=torch.float64).to(out.device)
    got = torch.autograd.grad((out.double() * dout).sum() + (last.double() * dlast).sum(), [ins[k] for k in names])
    want = torch.autograd.grad((ref * dout).sum() + (ref_last * dlast).sum(), [ref_ins[k] for k in names])
    for name, a, b in zip(names, got, want):
        assert a.dtype == args[name].dtype, name
        assert_close(a, b, dtype, name=f"d{name}")


@pytest.mark.parametrize("dtype", test_dtypes())
def test_matches_the_reference(dtype):
    check(make(dtype=dtype))


@pytest.mark.parametrize("softplus", [False, True])
def test_plain_scan_without_extras(softplus):
    args = make(seed=1, extras=False)
    args["delta"] = F.softplus(args["delta"]) if not softplus else args["delta"]  # keep delta positive
    check(args, softplus=softplus)


@pytest.mark.parametrize("groups,d", [(1, 8), (2, 8), (2, 6), (4, 12)])
def test_grouped_b_and_c(groups, d):
    """Channel d reads group d // (D/G); with D/G = 3 the backward's channel blocks shrink so that none
    straddles two groups (the forward looks up each channel's group)."""
    check(make(d=d, groups=groups, seed=2))


@pytest.mark.parametrize("l", [1, 16, 17, 50])
def test_lengths(l):
    check(make(l=l, seed=l))


@pytest.mark.parametrize("n", [1, 3, 16, 64, 100, 256])
def test_state_sizes(n):
    check(make(b=1, d=4, l=20, n=n, seed=n))


def test_non_contiguous_inputs():
    args = make(seed=3)
    for k in ("u", "delta", "B", "C", "z"):
        args[k] = strided_like(args[k])
    check(args)


def test_wide_offsets():
    """Offsets along L are 64-bit when a stride times L reaches 2^31 (a sequence-first layout, say): the
    predicate, and the forward's 64-bit path giving the same results."""
    from minikernels.scan import wide_offsets

    seq_first = torch.empty(20, 2, 3).permute(1, 2, 0)  # [B, D, L] view of [L, B, D] memory: stride 6 along L
    assert not wide_offsets(20, 1000, seq_first, None)
    assert wide_offsets(2**30, 1000, seq_first, None)  # 6 * 2^30 >= 2^31
    assert wide_offsets(20, 2**31, seq_first)  # B and C's own offsets
    with planning.override({"scan.wide_offsets": True}):
        check(make(seed=11))


@pytest.mark.parametrize("packed", [True, False])
def test_bf16_b_and_c(packed):
    """bf16 B and C reach the forward as they are, two steps per 32-bit word unpacked by a shift or a
    mask ("pack_bf16"), or converted to float32 first: each against the reference (bf16 inputs run on
    the CPU too: the scan has no tl.dot), and the two against each other."""
    args = make(l=45, seed=13, dtype=torch.bfloat16)
    with planning.override({"scan.pack_bf16": packed}):
        check(args)
        out, last = mk.selective_scan(**args, delta_softplus=True, return_last_state=True)
    with planning.override({"scan.pack_bf16": not packed}):
        other, other_last = mk.selective_scan(**args, delta_softplus=True, return_last_state=True)
    assert_close(out, other, torch.float32, name="out")
    assert_close(last, other_last, torch.float32, name="last state")


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("prep_late", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("l", [5, 45])
def test_forward_loop_variants(paired, prep_late, dtype, l):
    """Each of the forward loop's orders (one chunk an iteration or two; delta, u, z prepared an
    iteration ahead or in their own), whichever the GPU picks for a state size, at lengths shorter
    than one iteration and ending in a partial one; bf16 with B and C packed."""
    with planning.override({"scan.fwd_variant": (paired, prep_late)}):
        check(make(l=l, seed=14, dtype=dtype))


def test_batches_beyond_one_launch():
    """The batch is both kernels' grid's second axis, which CUDA caps at 65535: larger batches go in
    slices, one launch each (here a slice of one)."""
    with planning.override({"scan.max_grid_y": 1}):
        check(make(b=3, seed=12))


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("bd,steps,every,groups,d", [(8, 4, 32, None, 8), (8, 4, 32, 2, 16), (2, 2, 16, None, 8),
                                                    (1, 8, 16, 2, 8)])
def test_backward_tiles(bd, steps, every, groups, d, shift):
    """The backward with other tiles than the interpreter's own (4 channels, chunks of 8 steps, segments
    of 16): the GPU's (8 channels, chunks of 4, segments of 32: 8 chunks a segment), with one group and
    with two groups of 8 channels (two channel blocks), and chunks of 2 and 8, each with its own
    in-register time reversal and shift; the decays one step later shifted in registers or taken again
    (the GPU picks by state size). L = 45 ends inside a chunk."""
    with planning.override({"scan.bwd_shift": shift, "scan.save_every": every,
                            "scan.bwd_blocks": lambda n_pad, per_group: (min(bd, per_group), steps, 1)}):
        check(make(d=d, l=45, groups=groups, seed=14))


def test_gradients_without_the_last_state():
    """Only the output is used: the backward starts from a zero state gradient (no dh_last)."""
    args = make(seed=15)
    ins = {k: v.detach().requires_grad_() for k, v in args.items()}
    out = mk.selective_scan(**ins, delta_softplus=True)
    ref_ins = {k: v.detach().double().requires_grad_() for k, v in args.items()}
    ref = mk.reference.selective_scan(**ref_ins, delta_softplus=True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.device)
    got = torch.autograd.grad((out.double() * dout).sum(), list(ins.values()))
    want = torch.autograd.grad((ref * dout).sum(), list(ref_ins.values()))
    for name, a, b in zip(ins, got, want):
        assert_close(a, b, torch.float32, name=f"d{name}")


def test_last_state_alone_gets_gradients():
    args = make(seed=4, extras=False)
    ins = {k: (v.detach().requires_grad_() if v is not None else None) for k, v in args.items()}
    _, last = mk.selective_scan(**ins, delta_softplus=True, return_last_state=True)
    got = torch.autograd.grad(last.sum(), [ins[k] for k in ("u", "delta", "A", "B")])
    r = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in args.items()}
    _, ref_last = mk.reference.selective_scan(**r, delta_softplus=True, return_last_state=True)
    want = torch.autograd.grad(ref_last.sum(), [r[k] for k in ("u", "delta", "A", "B")])
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32)


def test_bad_inputs():
    args = make(extras=False)
    with pytest.raises(ValueError, match="delta must"):
        mk.selective_scan(**{**args, "delta": args["delta"][..., :5]})
    with pytest.raises(ValueError, match="A must be"):
        mk.selective_scan(**{**args, "A": args["A"][:3]})
    with pytest.raises(ValueError, match="B must"):
        mk.selective_scan(**{**args, "B": args["B"][:, :2]})
    with pytest.raises(ValueError, match="G dividing"):
        b = args["B"][:, None].expand(-1, 3, -1, -1)
        mk.selective_scan(**{**args, "B": b, "C": b})
    with pytest.raises(ValueError, match="constant"):
        mk.selective_scan(**{**args, "B": args["A"].clone(), "C": args["A"].clone()})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_model_size(dtype):
    """Mamba-1's layer at a real size: D = 256 channels, N = 16, L = 2048, grouped B and C."""
    check(make(b=1, d=256, l=2048, n=16, groups=2, dtype=dtype, seed=5))


@pytest.mark.gpu
@pytest.mark.parametrize("warps", [1, 4])
def test_gpu_backward_programs(warps):
    """Many backward programs at once on the GPU, where the interpreter's one-at-a-time programs and
    no-op barriers cannot tell: 3 sequences in launches of 2 (each program's scratch rows are its own),
    16 channel blocks in 2 groups, and 4 warps a program (the scratch rows read by other threads than
    those that wrote them, across the barrier)."""
    from minikernels.scan import plan

    blocks = functools.partial(plan.bwd_blocks, warps=warps)  # the GPU's rule, with `warps` warps
    with planning.override({"scan.max_grid_y": 2, "scan.bwd_blocks": blocks}):
        check(make(b=3, d=128, l=300, n=16, groups=2, seed=16))


@pytest.mark.gpu
def test_gpu_against_mamba_ssm_reference():
    """Against mamba_ssm's own selective_scan_ref, where its wheel is installed (fetch-wheels.sh anchors)."""
    import sys
    import types

    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))  # the wheel has no CUDA ext
    ref_mod = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    args = make(b=2, d=16, l=300, n=16, groups=2, seed=6)
    out, last = mk.selective_scan(**args, delta_softplus=True, return_last_state=True)
    want, want_last = ref_mod.selective_scan_ref(**args, delta_softplus=True, return_last_state=True)
    assert_close(out, want.double(), torch.float32, name="out")
    assert_close(last, want_last.double(), torch.float32, name="last state")


@pytest.mark.parametrize("keep", [("D",), ("z",), ("delta_bias",), ("D", "z")])
def test_each_fused_epilogue_alone(keep):
    """The kernels fuse delta_bias + softplus on the way in and D, the z gate on the way out: each
    on its own, so one cannot hide another's mistake."""
    args = make(seed=7)
    for name in ("D", "z", "delta_bias"):
        if name not in keep:
            args[name] = None
    check(args, softplus="delta_bias" in keep)


# --- bad and awkward inputs (issue 32) -----------------------------------------------------------

@pytest.mark.parametrize("loss", ["sum", "square"])
def test_double_backward_raises_instead_of_detaching(loss):
    """The Triton backward is not differentiable: gradients taken with create_graph=True are the usual
    ones, but differentiating them again raises (never a silently detached gradient penalty)."""
    args = make(seed=20)
    ins = {k: v.detach().requires_grad_() for k, v in args.items()}
    out, last = mk.selective_scan(**ins, delta_softplus=True, return_final_state=True)
    total = out.sum() + last.sum() if loss == "sum" else (out**2).sum() + (last**2).sum()
    leaves = list(ins.values())
    grads = torch.autograd.grad(total, leaves, create_graph=True)
    plain = torch.autograd.grad(total, leaves, retain_graph=True)
    for name, grad, want in zip(ins, grads, plain):
        torch.testing.assert_close(grad.detach(), want)
        assert grad.requires_grad, name
        with pytest.raises(RuntimeError, match="once_differentiable"):
            torch.autograd.grad(grad.pow(2).sum(), leaves, allow_unused=True)


@pytest.mark.parametrize("b,d,l", [(2, 8, 0), (0, 8, 5), (2, 0, 5)])
@pytest.mark.parametrize("groups", [None, 2])
def test_empty_inputs_keep_the_graph(b, d, l, groups):
    """N = 0 (length), B = 0 or D = 0: zeros of the right shapes, the last state included, still in the
    autograd graph: .backward() runs and every input gets a zero gradient of its own shape."""
    if d == 0 and groups:
        groups = None  # no channels to group
    args = make(b=b, d=d, l=l, groups=groups, seed=21)
    ins = {k: v.detach().requires_grad_() for k, v in args.items()}
    for op in (mk.selective_scan, mk.reference.selective_scan):
        out, last = op(**ins, delta_softplus=True, return_final_state=True)
        assert out.shape == (b, d, l) and out.dtype == args["u"].dtype and out.requires_grad
        assert last.shape == (b, d, 4) and not last.any() and last.requires_grad
        (out.sum() + last.sum()).backward()
        for name, t in ins.items():
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), name
            t.grad = None


@pytest.mark.parametrize("flag", ["delta_softplus", "return_last_state", "return_final_state"])
@pytest.mark.parametrize("value", [1, "yes", torch.tensor(False)])
def test_flags_must_be_bools(flag, value):
    args = make(l=8, extras=False)
    for op in (mk.selective_scan, mk.reference.selective_scan):
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            op(**args, **{flag: value})


def test_return_final_state_and_its_alias_return_last_state():
    args = make(seed=22)
    old, old_last = mk.selective_scan(**args, delta_softplus=True, return_last_state=True)
    new, new_last = mk.selective_scan(**args, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(new, old)
    torch.testing.assert_close(new_last, old_last)
    both = mk.selective_scan(**args, delta_softplus=True, return_last_state=True, return_final_state=True)
    assert isinstance(both, tuple)
    assert isinstance(mk.selective_scan(**args, return_last_state=False, return_final_state=False), torch.Tensor)
    ref, ref_last = mk.reference.selective_scan(**{k: v.double() for k, v in args.items()}, delta_softplus=True,
                                                return_final_state=True)
    assert_close(new, ref, torch.float32)
    assert_close(new_last, ref_last, torch.float32)
    for op in (mk.selective_scan, mk.reference.selective_scan):
        for old_value, new_value in ((True, False), (False, True)):
            with pytest.raises(ValueError, match="return_last_state is an alias of return_final_state"):
                op(**args, return_last_state=old_value, return_final_state=new_value)


def test_error_messages_use_the_books_symbols():
    """Length N and state size n, as the book writes them (mamba_ssm's L and N stay the code's names)."""
    args = make(extras=False)
    with pytest.raises(ValueError, match=r"A must be \[D, n\]"):
        mk.selective_scan(**{**args, "A": args["A"][:3]})
    with pytest.raises(ValueError, match=r"delta must have u's shape \[B, D, N\]"):
        mk.selective_scan(**{**args, "delta": args["delta"][..., :5]})
