"""Chapter 3's three forms of causal linear attention agree (in float64): the recurrence
(mk.reference.linear_attention), the parallel masked form and the chunked form, outputs, final states
and every gradient: what the Triton kernel (tests/test_linear_attention.py) must compute."""

import pytest
import torch

import minikernels as mk
from minikernels.linear import chunked_form, parallel_form, taylor_features
from minikernels.testing import assert_close, randn


def inputs(b=2, h=2, n=37, dk=8, dv=5, seed=0, decay=True, strength=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (randn(b, h, n, d, dtype=torch.float64, gen=g, requires_grad=True) for d in (dk, dk, dv))
    dec = None
    if decay:
        dec = (-strength * torch.rand(b, h, n, generator=g, dtype=torch.float64)).to(mk.device()).requires_grad_()
    return q, k, v, dec


@pytest.mark.parametrize("feature_map", [None, "elu1", "relu", "taylor"])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
def test_three_forms_agree(feature_map, decay, chunk):
    q, k, v, g = inputs(decay=decay, dk=4 if feature_map == "taylor" else 8)
    s0 = randn(2, 2, 21 if feature_map == "taylor" else 8, 5, dtype=torch.float64, seed=7, requires_grad=True)
    kw = dict(decay=g, feature_map=feature_map, initial_state=s0, return_state=True)
    ref, ref_state = mk.reference.linear_attention(q, k, v, **kw)
    for form in (parallel_form, lambda *a, **k_: chunked_form(*a, chunk_size=chunk, **k_)):
        out, state = form(q, k, v, **kw)
        assert_close(out, ref, torch.float64, name="out")
        assert_close(state, ref_state, torch.float64, name="state")
        weights = torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype, device=ref.device).view_as(ref)
        loss_ref = (ref * weights).sum() + ref_state.sum()
        loss = (out * weights).sum() + state.sum()
        ts = [q, k, v, g, s0]
        want = torch.autograd.grad(loss_ref, [t for t in ts if t is not None], retain_graph=True)
        got = torch.autograd.grad(loss, [t for t in ts if t is not None], retain_graph=True)
        for name, a, b in zip(("dq", "dk", "dv", "ddecay", "ds0") if decay else ("dq", "dk", "dv", "ds0"), got, want):
            assert_close(a, b, torch.float64, name=name)


@pytest.mark.parametrize("chunk", [4, 64])
def test_normalized_forms_agree(chunk):
    q, k, v, g = inputs(seed=3)
    ref = mk.reference.linear_attention(q, k, v, decay=g, feature_map="elu1", normalize=True)
    assert_close(parallel_form(q, k, v, decay=g, feature_map="elu1", normalize=True), ref, torch.float64)
    assert_close(chunked_form(q, k, v, decay=g, feature_map="elu1", normalize=True, chunk_size=chunk), ref,
                 torch.float64)


def test_two_halves_with_the_carried_state_equal_one_pass():
    q, k, v, g = inputs(n=50, seed=4)
    whole, whole_state = chunked_form(q, k, v, decay=g, chunk_size=16, return_state=True)
    a, s = chunked_form(q[:, :, :23], k[:, :, :23], v[:, :, :23], decay=g[:, :, :23], chunk_size=16,
                        return_state=True)
    b, s2 = chunked_form(q[:, :, 23:], k[:, :, 23:], v[:, :, 23:], decay=g[:, :, 23:], chunk_size=16,
                         initial_state=s, return_state=True)
    assert_close(torch.cat([a, b], dim=2), whole, torch.float64)
    assert_close(s2, whole_state, torch.float64)


@pytest.mark.parametrize("log_decay", [-30.0, 0.0])
def test_strong_and_no_decay_are_stable(log_decay):
    """A log-decay of -30 per step (exp = 1e-13) forgets almost at once; 0 never forgets. The chunked
    form sums log-decays inside a chunk only, so exp sees at most 64 * 30 = 1920 (exp(-1920) = 0, fine)
    and never exp(+large)."""
    q, k, v, _ = inputs(n=130, seed=5, decay=False)
    g = torch.full(q.shape[:3], log_decay, dtype=torch.float64, device=q.device)
    ref = mk.reference.linear_attention(q, k, v, decay=g)
    out = chunked_form(q, k, v, decay=g, chunk_size=64)
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float64)
    if log_decay == -30.0:  # only the current step survives: o_t ~ (q_t . k_t) v_t
        local = (q * k).sum(-1, keepdim=True) * v
        assert_close(out, local, torch.float64, tol=1e-10)


def test_single_step_and_ragged_chunks():
    for n in (1, 17, 65):
        q, k, v, g = inputs(n=n, seed=6)
        ref = mk.reference.linear_attention(q, k, v, decay=g)
        assert_close(chunked_form(q, k, v, decay=g, chunk_size=16), ref, torch.float64)


def test_taylor_map_is_the_exponentials_second_order_expansion():
    q, k = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    x = (q * k).sum(-1) / 6**0.5
    got = (taylor_features(q) * taylor_features(k)).sum(-1)
    assert torch.allclose(got, 1 + x + x**2 / 2)


def test_bad_inputs_are_refused():
    q, k, v, g = inputs(n=8)
    with pytest.raises(ValueError, match="decay must be"):
        chunked_form(q, k, v, decay=g[:, :, :4])
    with pytest.raises(ValueError, match="q and k"):
        chunked_form(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="normalize"):
        chunked_form(q, k, v, normalize=True, return_state=True)
    with pytest.raises(ValueError, match="feature_map"):
        chunked_form(q, k, v, feature_map="softplus")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_form(q, k, v, chunk_size=0)


def test_forms_take_return_final_state_and_its_alias():
    q, k, v, g = inputs(n=20, seed=8)
    for form in (parallel_form, chunked_form):
        old, old_state = form(q, k, v, decay=g, return_state=True)
        new, new_state = form(q, k, v, decay=g, return_final_state=True)
        assert_close(new, old, torch.float64)
        assert_close(new_state, old_state, torch.float64)
        with pytest.raises(ValueError, match="return_state is an alias of return_final_state"):
            form(q, k, v, return_state=True, return_final_state=False)
        with pytest.raises(TypeError, match="return_final_state must be a bool"):
            form(q, k, v, return_final_state="yes")
        with pytest.raises(TypeError, match="normalize must be a bool"):
            form(q, k, v, normalize=1)


def test_forms_refuse_a_feature_map_that_returns_no_tensor():
    q, k, v, _ = inputs(n=8)
    for form in (parallel_form, chunked_form, mk.reference.linear_attention):
        with pytest.raises(TypeError, match="feature_map must return a torch.Tensor, got list"):
            form(q, k, v, feature_map=lambda x: [x])


def test_linear_keeps_exporting_the_feature_maps():
    """The feature maps live in minikernels.feature_maps (torch only); minikernels.linear exports them
    too, the same objects (notebooks use linear.<name>)."""
    from minikernels import feature_maps, linear

    for name in ("FEATURE_MAPS", "taylor_features", "apply_feature_map", "mapped_features"):
        assert getattr(linear, name) is getattr(feature_maps, name), name


def test_the_reference_imports_no_triton():
    """mk.reference, the oracle, must not share the kernels' stack. The package's __init__ imports the
    kernels (and so Triton), so reference.py is loaded here under a bare stand-in for the package (its
    directory, without running __init__), in a fresh interpreter where importing triton fails: the
    oracle must import, compute, and load no module of the package but itself, feature_maps and the
    torch-only helpers (checks, autograd guards, the planning seam the checks consult)."""
    import pathlib
    import subprocess
    import sys
    import textwrap

    package_dir = str(pathlib.Path(mk.__file__).parent)
    code = textwrap.dedent(f"""
        import importlib, sys, types
        sys.modules["triton"] = None  # `import triton` (or of any triton.x) now raises ImportError
        package = types.ModuleType("minikernels")
        package.__path__ = [{package_dir!r}]
        sys.modules["minikernels"] = package
        reference = importlib.import_module("minikernels.reference")
        import torch
        x = torch.randn(1, 2, 5, 4, dtype=torch.float64)
        out, state = reference.linear_attention(x, x, x, decay=-torch.rand(1, 2, 5, dtype=torch.float64),
                                                feature_map="elu1", return_final_state=True)
        y = reference.ssd(x, torch.rand(1, 2, 5, dtype=torch.float64), -torch.rand(2, dtype=torch.float64),
                          x[:, :1], x[:, :1])
        u, bc = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
        s = reference.selective_scan(u, u.abs(), -torch.rand(3, 4, dtype=torch.float64), bc, bc)
        assert out.shape == (1, 2, 5, 4) and y.shape == (1, 2, 5, 4) and s.shape == (2, 3, 6)
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("minikernels", "triton")
                        and sys.modules[name] is not None)
        assert loaded == ["minikernels", "minikernels._autograd", "minikernels._backend", "minikernels._validate",
                          "minikernels.feature_maps", "minikernels.planning", "minikernels.reference"], loaded
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr
