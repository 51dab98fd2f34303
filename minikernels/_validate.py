"""Input checks shared by every op. Each raises before any kernel launches, with a message that names
the argument, what it got, and what it expected."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ._backend import device as _backend_device

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, x, *, dtypes=KERNEL_DTYPES, ndim: int | None = None, min_ndim: int | None = None,
                 shape_hint: str | None = None) -> None:
    """``x`` must be a tensor on the backend's device, of one of ``dtypes``, with the given rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {str(x.dtype).replace('torch.', '')}; "
                        f"supported dtypes are {_dtype_names(dtypes)}")
    hint = f" {shape_hint}" if shape_hint else ""
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{hint}, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s){hint}, got shape {tuple(x.shape)}")
    check_device(name, x)


def check_device(name: str, x: torch.Tensor) -> None:
    """``x`` must live where the kernels run: a CUDA tensor on a GPU, a CPU tensor under the interpreter."""
    expected = _backend_device()
    if x.device.type != expected.type:
        raise ValueError(f"{name} is on device '{x.device}', but minikernels runs on '{expected.type}' "
                         f"tensors with this backend; move it with .to('{expected.type}')")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors (``None`` entries are skipped) must be on one device."""
    given = {k: t for k, t in tensors.items() if t is not None}
    devices = {str(t.device) for t in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in given.items())
        raise ValueError(f"inputs are on different devices ({where}); put them on one device")


def normalize_dim(dim: int, ndim: int, name: str = "dim") -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a tensor with {ndim} dimension(s) "
                         f"(expected {-ndim} <= {name} < {ndim})")
    return dim % ndim


_INT32_MAX = 2**31 - 1


def int32_addressable(name: str, t: torch.Tensor, inner_dims: int = 2) -> torch.Tensor:
    """The kernels add 64-bit offsets for the leading (batch, head, row) indices but index *inside* a
    slice of the last ``inner_dims`` dimensions with 32-bit arithmetic. If a strided view spans more
    than 2^31 elements inside one slice, return a contiguous copy (which spans the least); if even
    that is too large, refuse."""
    def extent(x):
        return sum((size - 1) * abs(stride) for size, stride in zip(x.shape[-inner_dims:], x.stride()[-inner_dims:]))
    if extent(t) <= _INT32_MAX:
        return t
    compact = t.contiguous()
    if extent(compact) > _INT32_MAX:
        raise ValueError(f"{name} has {tuple(t.shape[-inner_dims:])} elements in one slice: more than 2^31, "
                         "which the kernels' 32-bit indexing cannot address")
    return compact
