"""Helpers for verifying kernels, used by ``tests/``, the notebooks and the exercises.

* Inputs come from a seeded **CPU** ``torch.Generator`` and are then moved to the backend's device, so
  the same seed gives the same numbers on a laptop and on a GPU.
* Errors are relative: ``||out - ref|| / ||ref||`` in float64, with the bounds of DESIGN.md.
* ``poisoned()`` fills every kernel output with NaN before the kernel runs, so an element the kernel
  never writes makes the comparison fail.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ._alloc import poison_outputs
from ._backend import backend, device

# Relative-error bounds against a float64 reference (DESIGN.md, "Verification").
_FP32_INTERPRETER = 1e-5
_FP32_GPU = 5e-3  # allows single-pass tf32 in tl.dot; our kernels use tf32x3 for float32 (_backend.dot_options)
_HALF = 2e-2


def tolerance(dtype: torch.dtype) -> float:
    """The relative-error bound for outputs computed from inputs of ``dtype`` on the live backend."""
    if dtype in (torch.float16, torch.bfloat16):
        return _HALF
    if dtype == torch.float32:
        return _FP32_INTERPRETER if backend() == "interpreter" else _FP32_GPU
    if dtype == torch.float64:
        return 1e-10
    raise TypeError(f"no tolerance defined for dtype {dtype}")


def test_dtypes() -> list[torch.dtype]:
    """The dtypes to verify on this backend: bf16 only on the GPU (the interpreter's bf16 ``tl.dot`` is
    wrong, see DESIGN.md), float32 and float16 everywhere."""
    dtypes = [torch.float32, torch.float16]
    if backend() == "cuda":
        dtypes.append(torch.bfloat16)
    return dtypes


test_dtypes.__test__ = False  # not a pytest test, despite the name


def generator(seed: int = 0) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int | None = None,
          gen: torch.Generator | None = None, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    """Standard normal samples drawn on the CPU from a seeded generator, then moved to the backend's
    device and cast to ``dtype``. Pass either ``seed`` or a shared ``gen``."""
    if gen is None:
        gen = generator(0 if seed is None else seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
    x = x.to(device=device(), dtype=dtype)
    return x.requires_grad_(requires_grad)


def strided_like(x: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor equal to ``x``: every other element of a twice-as-wide buffer along the
    last dimension, so unit-stride assumptions in a kernel are caught."""
    wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), float("nan"), dtype=x.dtype, device=x.device)
    view = wide[..., ::2]
    view.copy_(x.detach())
    assert not view.is_contiguous() or x.shape[-1] <= 1
    return view.requires_grad_(x.requires_grad)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` if ``out`` holds a NaN or an inf the
    reference does not have (NaN never passes). When ``ref`` is all zeros (or empty), ``||out||``."""
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    o = out.detach().to(device="cpu", dtype=torch.float64)
    r = ref.detach().to(device="cpu", dtype=torch.float64)
    if torch.isnan(o).any() or (torch.isinf(o) & ~torch.isinf(r)).any():
        return math.inf
    diff = torch.linalg.vector_norm(o - r).item()
    norm = torch.linalg.vector_norm(r).item()
    if norm == 0.0:  # nothing to be relative to (an exactly-zero gradient): the absolute error
        return diff
    return diff / norm


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                 name: str = "output", tol: float | None = None) -> float:
    """Assert that ``out`` matches ``ref`` within the bound for ``dtype`` (default: ``out.dtype``).
    Returns the measured relative error."""
    bound = tol if tol is not None else tolerance(dtype or out.dtype)
    err = rel_error(out, ref)
    if not err <= bound:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {bound:.1e} "
                             f"(shape {tuple(out.shape)}, dtype {out.dtype}, backend {backend()})")
    return err


@contextlib.contextmanager
def poisoned():
    """Within this block, every minikernels output starts as NaN instead of uninitialised memory."""
    with poison_outputs(True):
        yield
