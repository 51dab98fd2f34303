"""Autograd helpers every op shares: empty inputs kept in the graph, and the guard that makes a
double backward through a Triton backward raise instead of returning detached gradients.

Torch only, no Triton (the oracle in ``minikernels.reference`` may use them too).
"""

from __future__ import annotations

import functools

import torch


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
