"""The verification helpers themselves: if these were wrong, every kernel test would be hollow."""

import math

import torch

import minikernels as mk
from minikernels import testing


def test_same_seed_same_numbers_on_the_backend_device():
    a = testing.randn(3, 4, seed=5)
    b = testing.randn(3, 4, seed=5)
    assert a.device.type == mk.device().type
    assert torch.equal(a, b)
    assert not torch.equal(a, testing.randn(3, 4, seed=6))
    cpu = torch.randn(3, 4, generator=testing.generator(5))
    assert torch.equal(a.cpu(), cpu)  # drawn on the CPU, then moved: identical on every machine


def test_rel_error():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert testing.rel_error(ref.float(), ref) == 0.0
    assert math.isclose(testing.rel_error(torch.tensor([3.0, 4.5]), ref), 0.1)
    assert testing.rel_error(torch.tensor([float("nan"), 4.0]), ref) == math.inf
    assert testing.rel_error(torch.tensor([float("inf"), 4.0]), ref) == math.inf


def test_tolerances_follow_design():
    assert testing.tolerance(torch.float16) == 2e-2
    assert testing.tolerance(torch.bfloat16) == 2e-2
    expected_fp32 = 1e-5 if mk.backend() == "interpreter" else 5e-3
    assert testing.tolerance(torch.float32) == expected_fp32


def test_poisoned_outputs_start_as_nan():
    from minikernels._alloc import empty

    with testing.poisoned():
        t = empty((4,), dtype=torch.float32, device=mk.device())
    assert torch.isnan(t).all()


def test_strided_like():
    x = testing.randn(3, 5)
    s = testing.strided_like(x)
    assert not s.is_contiguous()
    assert torch.equal(s, x)


def test_rel_error_against_zero_reference_is_absolute():
    zero = torch.zeros(3, dtype=torch.float64)
    assert testing.rel_error(torch.zeros(3), zero) == 0.0
    assert math.isclose(testing.rel_error(torch.tensor([3e-8, 4e-8, 0.0]), zero), 5e-8, rel_tol=1e-6)
