"""Output allocation. Every kernel output is allocated here, so that tests can *poison* outputs
(fill them with NaN instead of leaving memory uninitialised): an element a kernel forgets to
write then fails the comparison instead of passing by luck. See ``minikernels.testing.poisoned``."""

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


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    if poisoning():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
