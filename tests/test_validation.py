"""The shared input checks (used by every op)."""

import pytest
import torch

import minikernels as mk
from minikernels import _validate as v


def test_mixed_devices_named():
    a = torch.zeros(2, device=mk.device())
    b = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match=r"inputs are on different devices \(q on .*, k on meta\)"):
        v.check_same_device(q=a, k=b, v=None)
    v.check_same_device(q=a, k=a.clone(), v=None)  # same device: no error


def test_rank_message_has_shape_hint():
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \[B, H, N, D\], got shape \(2, 3\)"):
        v.check_tensor("q", torch.zeros(2, 3, device=mk.device()), ndim=4, shape_hint="[B, H, N, D]")


def test_dtype_message():
    with pytest.raises(TypeError, match=r"k has dtype int32; supported dtypes are float32, float16, bfloat16"):
        v.check_tensor("k", torch.zeros(2, dtype=torch.int32, device=mk.device()))


def test_normalize_dim():
    assert v.normalize_dim(-1, 3) == 2
    assert v.normalize_dim(0, 1) == 0
    with pytest.raises(ValueError, match=r"dim=-4 is out of range"):
        v.normalize_dim(-4, 3)
