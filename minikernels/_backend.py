"""Backend selection: run Triton kernels on a CUDA GPU, or on the CPU through Triton's interpreter.

This module must run before anything imports triton: the interpreter is chosen by the environment
variable ``TRITON_INTERPRET``, which triton reads when a kernel is decorated with ``@triton.jit``.
"""

from __future__ import annotations

import functools
import os

import torch

_INTERPRET_VAR = "TRITON_INTERPRET"


def _choose() -> None:
    # No GPU and no explicit choice by the user: fall back to the interpreter so that the same
    # notebooks and tests run unchanged on a laptop. A user who set the variable keeps their choice.
    if not torch.cuda.is_available() and _INTERPRET_VAR not in os.environ:
        os.environ[_INTERPRET_VAR] = "1"


_choose()


@functools.cache
def _detected() -> str | None:
    # Read once: triton read the variable when the kernels were decorated, at import, so a later change
    # could not move them anyway; and every launch asks (a decode step's host time counts). So a choice
    # of TRITON_INTERPRET (the advice of the error below included) takes effect in a new process.
    if os.environ.get(_INTERPRET_VAR, "0") not in ("", "0"):
        return "interpreter"
    if torch.cuda.is_available():
        return "cuda"
    return None


def backend() -> str:
    """Which machine the kernels run on: ``"cuda"`` (a GPU) or ``"interpreter"`` (CPU, via Triton's
    interpreter). Raises ``RuntimeError`` when neither is usable (no GPU and ``TRITON_INTERPRET=0``)."""
    found = _detected()
    if found is not None:
        return found
    raise RuntimeError(
        "minikernels has no backend: there is no CUDA GPU and TRITON_INTERPRET is set to 0. "
        "Unset TRITON_INTERPRET (or set it to 1) to run the kernels on the CPU through Triton's interpreter."
    )


def device() -> torch.device:
    """The torch device whose tensors the kernels take: ``cuda`` on a GPU, ``cpu`` under the interpreter."""
    return torch.device("cuda" if backend() == "cuda" else "cpu")


def is_interpreter() -> bool:
    return backend() == "interpreter"


def on_device_of(t: torch.Tensor):
    """Triton launches on the *current* CUDA device: make it the tensor's own (cuda:1 as well as cuda:0)."""
    import contextlib

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def dot_options(dtype: torch.dtype) -> dict:
    """The ``DOT_PREC`` constexpr for kernels whose ``tl.dot`` sees ``dtype`` operands (passed on to
    ``tl.dot(..., input_precision=DOT_PREC)``). Triton multiplies float32 matrices in tf32 by default
    (10-bit mantissa, relative error ~1e-3, amplified by large logits); "tf32x3" splits each operand
    into a high and a low tf32 part and adds three products: about three times the tensor-core work,
    close to float32 accuracy. float32 is the accuracy path here, not the fast one (16-bit inputs are,
    for which the setting is ignored)."""
    return {"DOT_PREC": "tf32x3" if dtype == torch.float32 else "tf32"}


@functools.cache
def capability(index: int | None) -> tuple[int, int]:
    """The compute capability of CUDA device ``index`` (None: the current one), looked up once per device:
    launches that may take tensor descriptors or programmatic dependent launch ask it on every call."""
    return torch.cuda.get_device_capability(index)


def tma_ready(*ts: torch.Tensor) -> bool:
    """Whether kernels may read every one of ``ts`` through tensor descriptors: under the interpreter
    (which emulates them) or on a GPU with a Tensor Memory Accelerator (compute capability 9.0 and up),
    and in a layout a descriptor can describe: unit stride along the last dimension, the base and the
    other strides 16-byte aligned, no zero strides (broadcast views)."""
    def has_tma(t):
        return t.device.type == "cuda" and capability(t.device.index)[0] >= 9

    if not is_interpreter() and not all(has_tma(t) for t in ts):
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(st > 0 and st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in ts)
