"""mk.softmax against the float64 reference: forward and gradient, awkward shapes, strides, both the
one-pass and the two-pass (online) paths, and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels import planning
from minikernels.testing import assert_close, poisoned, randn, rel_error, strided_like

# Softmax has no tl.dot, so the interpreter computes bf16 correctly: all three dtypes run everywhere.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_softmax(x: torch.Tensor, dim: int = -1, seed: int = 1) -> None:
    """Forward and input gradient of mk.softmax against the float64 reference, outputs poisoned."""
    x = x.detach().requires_grad_(True)
    with poisoned():
        y = mk.softmax(x, dim=dim)
    assert y.dtype == x.dtype and y.shape == x.shape
    x64 = x.detach().double().requires_grad_(True)
    y64 = mk.reference.softmax(x64, dim=dim)
    assert_close(y, y64, x.dtype, name="softmax")
    dy = randn(*x.shape, dtype=x.dtype, seed=seed + 100)
    with poisoned():
        (dx,) = torch.autograd.grad(y, x, dy)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert_close(dx, dx64, x.dtype, name="softmax grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 17, 64, 100, 256, 1000])
@pytest.mark.parametrize("m", [1, 3, 65])
def test_matches_reference(m, n, dtype):
    check_softmax(randn(m, n, dtype=dtype, seed=m * 1000 + n))


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_any_dim(dim):
    check_softmax(randn(4, 7, 33, seed=dim + 10), dim=dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(dtype):
    x = randn(5, 6, 40, dtype=dtype, seed=3)
    check_softmax(strided_like(x))  # unit stride broken along the row
    check_softmax(x.transpose(0, 2))  # rows are along a strided axis
    check_softmax(x.permute(1, 0, 2)[:, 1:4])  # leading dims not collapsible: copied once


# rows longer than 16 take the two-pass (online) kernels, with 16-wide blocks
ONLINE_16 = {"softmax.max_fused_cols": 16, "softmax.max_fused_cols_bwd": 16, "softmax.online_block": 16}


@pytest.fixture
def online_path():
    """Make rows longer than 64 take the two-pass (online) kernels, with 32-wide blocks."""
    with planning.override({"softmax.max_fused_cols": 64, "softmax.max_fused_cols_bwd": 64,
                            "softmax.online_block": 32}):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [65, 100, 257])
def test_online_path_matches_reference(online_path, n, dtype):
    check_softmax(randn(6, n, dtype=dtype, seed=n))
    check_softmax(strided_like(randn(3, n, dtype=dtype, seed=n + 1)))


@pytest.mark.parametrize("path", ["fused", "online"])
def test_masked_rows(path):
    with planning.override(ONLINE_16 if path == "online" else {}):
        masked_rows()


def masked_rows():
    x = randn(4, 50, seed=7)
    x[1] = float("-inf")  # a fully masked row: zeros, never NaN
    x[2, ::3] = float("-inf")  # partly masked: those entries get exactly 0
    with poisoned():
        y = mk.softmax(x)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert torch.equal(y[2, ::3], torch.zeros_like(y[2, ::3]))
    assert_close(y, mk.reference.softmax(x.double()), name="masked softmax")
    assert torch.allclose(y[[0, 2, 3]].sum(-1).double().cpu(), torch.ones(3, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "online"])
def test_large_logits_do_not_overflow(path):
    with planning.override(ONLINE_16 if path == "online" else {}):
        large_logits()


def large_logits():
    x = randn(8, 100, seed=8, scale=1000.0)  # exp(1000) overflows float32 without the max shift
    with poisoned():
        y = mk.softmax(x)
    assert torch.isfinite(y).all()
    assert_close(y, mk.reference.softmax(x.double()), name="softmax of large logits")


def test_rows_past_32_bit_offsets_are_compacted():
    """Positions inside a row use 32-bit offsets: a row spread wider than that is copied compact
    first, and a row too long even then is refused (limit lowered so small tensors reach both)."""
    with planning.override({"int32_limit": 100}):
        check_softmax(randn(8, 300, seed=20).t())  # rows along dim 0: 300 apart, 8 elements each
        with pytest.raises(ValueError, match="more than 2\\^31"):
            mk.softmax(randn(2, 300, seed=21))


def test_empty_inputs():
    for shape in [(0, 5), (3, 0), (0,)]:
        x = randn(*shape)
        y = mk.softmax(x)
        assert y.shape == x.shape


@pytest.mark.parametrize("shape,dim", [((0, 5), -1), ((3, 0), -1), ((0,), 0), ((2, 0, 4), 1), ((2, 0, 4), -1)])
def test_empty_inputs_stay_in_the_graph(shape, dim):
    """An empty input gives an empty output that is still part of the autograd graph: backward runs and
    gives a gradient of the input's shape."""
    x = randn(*shape, requires_grad=True)
    with poisoned():
        y = mk.softmax(x, dim=dim)
    assert y.shape == x.shape and y.grad_fn is not None
    with poisoned():
        y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_double_backward_raises():
    """The backward is a kernel: a gradient taken with create_graph=True cannot be differentiated
    again, and saying so beats returning a gradient silently detached from the graph."""
    x = randn(3, 20, seed=30, requires_grad=True)
    w = randn(3, 20, seed=31)
    (g,) = torch.autograd.grad((mk.softmax(x) * w).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    dim_seed=st.integers(0, 10),
    seed=st.integers(0, 2**16),
    transposed=st.booleans(),
)
def test_property_random_shapes(shape, dim_seed, seed, transposed):
    x = randn(*shape, seed=seed)
    if transposed and x.dim() > 1:
        x = x.transpose(0, -1)
    check_softmax(x, dim=dim_seed % x.dim() - x.dim(), seed=seed)


def test_the_check_can_fail():
    """The verification itself: a wrong answer and an unwritten (NaN) element are both caught."""
    x = randn(4, 32, seed=9)
    ref = mk.reference.softmax(x.double())
    assert rel_error(torch.softmax(x * 1.1, -1), ref) > 1e-3
    poisoned_out = mk.softmax(x).clone()
    poisoned_out[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert_close(poisoned_out, ref, name="poisoned")


# --- bad input: a clear error naming the argument, before any kernel launches -------------------

def test_rejects_integer_dtype():
    with pytest.raises(TypeError, match=r"x has dtype int64; supported dtypes are float32, float16, bfloat16"):
        mk.softmax(torch.arange(6, device=mk.device()).reshape(2, 3))


def test_rejects_float64():
    with pytest.raises(TypeError, match="x has dtype float64"):
        mk.softmax(randn(2, 3, dtype=torch.float64))


def test_rejects_scalar():
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
        mk.softmax(torch.tensor(1.0, device=mk.device()))


def test_rejects_bad_dim():
    with pytest.raises(ValueError, match=r"dim=2 is out of range"):
        mk.softmax(randn(2, 3), dim=2)
    with pytest.raises(TypeError, match="dim must be an int"):
        mk.softmax(randn(2, 3), dim=1.0)


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        mk.softmax([[1.0, 2.0]])


def test_rejects_wrong_device():
    with pytest.raises(ValueError, match=r"x is on device 'meta'"):
        mk.softmax(torch.empty(2, 3, device="meta"))


# --- GPU only: large rows, the sizes the benchmark uses ---------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [4096, 8192, 16384, 16385, 32768, 32769, 100_000])
def test_gpu_large_rows(n, dtype):
    check_softmax(randn(64, n, dtype=dtype, seed=n))
