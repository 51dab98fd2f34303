"""Linear attention's pure-PyTorch pieces: the feature maps, the normalizer's division and the checks
of the inputs and flags, with the small autograd helpers that the linear-attention and state-space
ops share (flags, empty inputs, the guard against double backward).

Torch only, no Triton: both ``minikernels.linear`` (the kernels, which re-exports these names) and
``minikernels.reference`` (the oracle, which must import no Triton) use them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

FEATURE_MAPS = ("elu1", "relu", "taylor")


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """BASED's second-order Taylor map: phi(q) . phi(k) = 1 + q.k/sqrt(d) + (q.k)^2 / (2d), the first
    three terms of exp(q.k / sqrt(d)). Feature size 1 + d + d^2."""
    d = x.shape[-1]
    ones = x.new_ones(*x.shape[:-1], 1)
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
    return torch.cat([ones, x / d**0.25, outer / (2**0.5 * d**0.5)], dim=-1)


def apply_feature_map(x: torch.Tensor, feature_map: str | Callable | None) -> torch.Tensor:
    """phi(x) for a named map ("elu1": elu(x) + 1, "relu", "taylor"), a callable, or None (identity).
    A callable must return a tensor (TypeError otherwise)."""
    if feature_map is None:
        return x
    if callable(feature_map):
        out = feature_map(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"feature_map must return a torch.Tensor, got {type(out).__name__}")
        return out
    if not isinstance(feature_map, str):
        raise TypeError(f"feature_map must be None, a callable or one of {FEATURE_MAPS}, "
                        f"got {type(feature_map).__name__}")
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "taylor":
        return taylor_features(x)
    raise ValueError(f"feature_map must be None, a callable or one of {FEATURE_MAPS}, got {feature_map!r}")


def mapped_features(q: torch.Tensor, k: torch.Tensor, feature_map) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi(q), phi(k)), checked: tensors that keep q's [B, H, N] and dtype and have one feature size."""
    qf, kf = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
    if qf.dim() != q.dim() or qf.shape[:-1] != q.shape[:-1] or qf.shape != kf.shape:
        raise ValueError(f"feature_map must keep [B, H, N] and map q and k alike, got {tuple(qf.shape)} "
                         f"and {tuple(kf.shape)} from {tuple(q.shape)}")
    if qf.dtype != q.dtype or kf.dtype != q.dtype:
        raise TypeError(f"feature_map must keep the inputs' dtype {q.dtype}, got {qf.dtype} and {kf.dtype}")
    return qf, kf


def _normalized(o: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    # a row whose normalizer is exactly 0 (no key with a positive feature product) gets 0, not NaN
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.where(denom == 0, torch.zeros_like(o), o / safe)


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
# autograd helpers
# --------------------------------------------------------------------------------------------------

def keep_in_graph(out: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """``out``, computed without reading ``inputs`` (an op's result for an empty sequence or batch),
    joined to the autograd graph of each input that requires grad, with a gradient of zeros of its
    shape: each adds t.flatten()[:0].sum(), an exact 0 whatever t holds (inf and NaN included)."""
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            out = out + t.flatten()[:0].sum().to(out.dtype)
    return out


class _DifferentiatedTwice(torch.autograd.Function):
    # The identity on the gradients a once-differentiable backward returned, as a node of the graph that
    # create_graph=True builds, joined to every tensor those gradients depend on; differentiating
    # through it raises.
    @staticmethod
    def forward(ctx, name, n_grads, *tensors):
        ctx.name = name
        return tuple(t.detach() for t in tensors[:n_grads])  # aliases, no copies

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"trying to differentiate twice a function that was marked with @once_differentiable "
                           f"({ctx.name}): its Triton backward is not differentiable, so the gradients it returned "
                           "under create_graph=True cannot be differentiated again")


def once_differentiable(backward):
    """For an ``autograd.Function``'s backward that is not itself differentiable: run it without
    recording a graph and, when a graph is being built (``create_graph=True``), return gradients that
    raise when differentiated, never gradients silently cut from the graph.

    ``torch.autograd.function.once_differentiable`` does not suffice: it attaches its error only when
    an incoming gradient requires grad (after ``out.sum()`` none does, and the gradients come back
    plain), and to fresh leaves, so that ``torch.autograd.grad(penalty, inputs)`` never reaches it
    (with ``allow_unused=True`` it returns None instead of raising). Here the error node is joined to
    every tensor the gradients depend on: the Function's inputs, which its forward must put in
    ``ctx.graph_inputs`` (a tuple; None entries allowed; only their place in the graph is used, not
    their data, so they are kept as attributes rather than saved: an input changed in place after
    the forward stays allowed where the backward does not read it), the tensors it saved, and the
    incoming gradients."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads_in):
        with torch.no_grad():
            grads = backward(ctx, *grads_in)
        if not torch.is_grad_enabled():
            return grads
        single = not isinstance(grads, tuple)
        grads = (grads,) if single else grads
        at = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
        deps = [t for t in (*getattr(ctx, "graph_inputs", ()), *ctx.saved_tensors, *grads_in)
                if isinstance(t, torch.Tensor) and t.requires_grad]
        if not at or not deps:
            return grads[0] if single else grads
        name = type(ctx).__name__.removesuffix("Backward").lstrip("_")
        guarded = _DifferentiatedTwice.apply(name, len(at), *(grads[i] for i in at), *deps)
        out = list(grads)
        for i, g in zip(at, guarded):
            out[i] = g
        return out[0] if single else tuple(out)

    return wrapper


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
