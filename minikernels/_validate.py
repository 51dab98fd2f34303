"""Input checks shared by every op. Each raises before any kernel launches, with a message that names
the argument, what it got, and what it expected."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from . import planning
from ._backend import device as _backend_device

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # the attention kernels' largest head dim (one tile of it stays on chip)


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


INT32_MAX = 2**31 - 1


def element_span(t: torch.Tensor, dims: int | None = None) -> int:
    """The largest element offset inside ``t``'s last ``dims`` dimensions (all of them by default) from
    their first element: sum of (size - 1) * |stride|. -1 or less for an empty tensor."""
    sizes, strides = t.shape[-dims:] if dims else t.shape, t.stride()[-dims:] if dims else t.stride()
    return sum((size - 1) * abs(stride) for size, stride in zip(sizes, strides))


def int32_limit() -> int:
    """The largest element offset a kernel addresses with 32-bit arithmetic (the ``int32_limit`` planning
    choice, 2^31 - 1 unless overridden)."""
    return planning.decide("int32_limit", INT32_MAX)


def int32_addressable(name: str, t: torch.Tensor, inner_dims: int = 2, extent=None, what: str | None = None
                      ) -> torch.Tensor:
    """The kernels add 64-bit offsets for the leading (batch, head, row) indices but index *inside* a
    slice of the last ``inner_dims`` dimensions with 32-bit arithmetic. If a strided view spans more
    than 2^31 elements inside one slice, return a contiguous copy (which spans the least); if even
    that is too large, refuse. ``extent(tensor)`` replaces the span of one slice for kernels that index
    another way (varlen: the rows of one sequence); ``what`` then names that span in the error."""
    extent = extent or (lambda x: element_span(x, inner_dims))
    limit = int32_limit()
    if extent(t) <= limit:
        return t
    compact = t.contiguous()
    if extent(compact) > limit:
        what = what or f"one slice of {tuple(t.shape[-inner_dims:])} elements"
        raise ValueError(f"{name}: {what} spans more than 2^31 elements, which the kernels' 32-bit indexing "
                         "cannot address")
    return compact


# --------------------------------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------------------------------

def check_flag(name: str, value) -> None:
    """A bool flag must be a bool (not 0/1, not a string, not a tensor): TypeError naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def final_state_flag(alias: str, alias_value: bool | None, return_final_state: bool | None) -> bool:
    """Whether to return the final state, from ``return_final_state`` (the name every op shares) and
    the op's older name for it, ``alias`` (``return_state``, ``return_last_state``); either may be
    given, None meaning not given (False). Both given with different values: ValueError."""
    if alias_value is not None:
        check_flag(alias, alias_value)
    if return_final_state is not None:
        check_flag("return_final_state", return_final_state)
    if alias_value is not None and return_final_state is not None and alias_value != return_final_state:
        raise ValueError(f"{alias} is an alias of return_final_state, and they disagree: {alias}={alias_value}, "
                         f"return_final_state={return_final_state}; pass one of them")
    return bool(return_final_state if return_final_state is not None else alias_value)


# --------------------------------------------------------------------------------------------------
# linear attention's input checks
# --------------------------------------------------------------------------------------------------

def check_linear_attention_inputs(q, k, v, decay, initial_state, normalize, return_state) -> None:
    """Shapes and flags of linear attention; raises before any work is done. ``return_state``: whether
    the final state is returned (under either of its names)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, H, N, D], got {tuple(t.shape)}")
    check_flag("normalize", normalize)
    check_flag("return_state", return_state)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, H, N, Dk], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, N, Dv] with q's B, H, N {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if decay is not None and not isinstance(decay, torch.Tensor):
        raise TypeError(f"decay must be None or a log-decay tensor [B, H, N], got {type(decay).__name__}")
    if decay is not None and decay.shape != q.shape[:3]:
        raise ValueError(f"decay must be a log-decay tensor [B, H, N] = {tuple(q.shape[:3])}, got "
                         f"{tuple(decay.shape)}")
    if initial_state is not None and not isinstance(initial_state, torch.Tensor):
        raise TypeError(f"initial_state must be None or a tensor [B, H, Dk', Dv], got {type(initial_state).__name__}")
    if normalize and (initial_state is not None or return_state):
        raise ValueError("normalize=True carries a normalizer state z that initial_state and the returned final "
                         "state (return_final_state, or its alias return_state) do not hold: process the "
                         "sequence in one call, or normalize outside")


# --------------------------------------------------------------------------------------------------
# attention's input checks (flash, block-sparse and decode attention)
# --------------------------------------------------------------------------------------------------

def check_attention_inputs(q, k, v, *, k_name: str = "k", v_name: str = "v") -> None:
    """Shapes, dtypes and devices for [B, H, N, D] attention with grouped-query heads."""
    hint = "[B, H, N, D]"
    check_tensor("q", q, ndim=4, shape_hint=hint)
    check_tensor(k_name, k, ndim=4, shape_hint=hint)
    check_tensor(v_name, v, ndim=4, shape_hint=hint)
    check_same_device(q=q, **{k_name: k, v_name: v})
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, {k_name}, {v_name} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{k_name} and {v_name} must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: q has {q.shape[0]}, {k_name} has {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head dims differ: q has D={q.shape[-1]}, {k_name} has D={k.shape[-1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{k_name}/{v_name} heads ({k.shape[1]}) must divide q heads ({q.shape[1]}) "
                         "for grouped-query attention")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} is not supported: D must be between 1 and {MAX_HEAD_DIM} "
                         "(16, 32, 64 and 128 are the fast sizes; others are padded to the next power of two)")


def check_scale(scale, d: int) -> float:
    """The softmax scale: 1/sqrt(d) for None, else a finite number (TypeError naming it otherwise)."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)
