"""Output allocation. Every kernel output is allocated here, so that tests can *poison* outputs
(fill them with NaN, or an integer output with its dtype's most negative value, instead of leaving
memory uninitialised): an element a kernel forgets to write then fails the comparison instead of
passing by luck. See ``minikernels.testing.poisoned``."""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


def poisoning() -> bool:
    return getattr(_state, "poison", False)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    previous = poisoning()
    _state.poison = enabled
    try:
        yield
    finally:
        _state.poison = previous


def poison_value(dtype: torch.dtype):
    """NaN for floating outputs; for integer outputs (indices, flags), the most negative value, which
    no kernel writes as a result and which fails any comparison with a right answer."""
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        raise TypeError("a bool output cannot be poisoned; allocate it as int8")
    return torch.iinfo(dtype).min


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    if poisoning():
        return torch.full(shape, poison_value(dtype), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
