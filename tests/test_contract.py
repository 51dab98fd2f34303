"""Bad input is a contract, tested for every public op in one place (issue 32).

One table of the public ops, each with a factory of small valid inputs (float32, on ``mk.device()``),
and then, for every op and every argument the contract speaks of:

* a wrong type (a list, a NumPy array, a str for an int) raises ``TypeError`` naming the argument;
* a wrong rank, mismatched shapes or a bad value raise ``ValueError`` naming the argument; an
  unsupported dtype (int32, float64) raises ``TypeError`` naming it;
* a bool flag given a non-bool (``"no"``, ``1``) raises ``TypeError`` naming the flag;
* a NaN in any floating input reaches the output; an inf reaches the outputs it touches where that is
  well defined (and -inf logits, log-decays and rates keep their documented meaning);
* double backward (``create_graph=True``) either gives the reference's second derivatives or raises a
  ``RuntimeError``; never gradients silently detached from the graph;
* empty inputs (N = 0, B = 0) give correctly shaped outputs that stay connected to the graph;
* a hand-built ``BlockMask`` is validated before a kernel reads it (run in a forked child on the CPU,
  so an out-of-bounds read fails the test instead of killing the run);
* every mask estimator gives the same mask for bf16 inputs as for the same values in float32;
* the mask builders follow the same rules; the consistent names (``return_final_state`` on
  ``linear_attention`` and ``selective_scan``, ``scale`` on ``decode_attention``) work;
* ``decode_attention`` over a paged and over an int8 cache are ops of the table of their own;
  ``mk.distributed``'s two functions check their input on a process group of one (before any
  transfer), and ``mk.kv_cache.PagedKVCache`` checks its sizes and the tensors it is given.

Sizes are tiny: the whole file runs in about a minute under the interpreter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pickle
import re
import select
import signal
import socket
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import minikernels as mk
from minikernels import masks
from minikernels.testing import assert_close

DEV = mk.device()


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV)


# --------------------------------------------------------------------------------------------------
# the table of ops
# --------------------------------------------------------------------------------------------------

def make_softmax(b=3, n=8):
    return {"x": rand(b, n, seed=1, scale=2.0)}


def make_flash(b=1, n=8, nk=12):  # grouped-query heads (2 q heads, 1 k/v head), Nq != Nk
    return {"q": rand(b, 2, n, 16, seed=1), "k": rand(b, 1, nk, 16, seed=2), "v": rand(b, 1, nk, 16, seed=3)}


def make_decode(b=1, n=1, nk=12):
    return {"q": rand(b, 2, n, 16, seed=1), "k_cache": rand(b, 1, nk, 16, seed=2),
            "v_cache": rand(b, 1, nk, 16, seed=3),
            "cache_seqlens": torch.full((b,), max(nk - 2, 0), dtype=torch.int32, device=DEV)}


def make_block_sparse(b=1, n=32, nk=32):
    return {"q": rand(b, 2, n, 16, seed=1), "k": rand(b, 1, nk, 16, seed=2), "v": rand(b, 1, nk, 16, seed=3),
            "block_mask": masks.causal(n, nk, block_size=16, device=DEV)}


def make_linear(b=1, n=8):
    return {"q": rand(b, 2, n, 16, seed=1, scale=0.25), "k": rand(b, 2, n, 16, seed=2, scale=0.25),
            "v": rand(b, 2, n, 16, seed=3), "decay": -0.5 * rand(b, 2, n, seed=4).abs(),
            "initial_state": rand(b, 2, 16, 16, seed=5, scale=0.25), "chunk_size": 16}


def make_scan(b=1, n=8):
    return {"u": rand(b, 4, n, seed=1), "delta": rand(b, 4, n, seed=2, scale=0.5),
            "A": -(rand(4, 4, seed=3).abs() + 0.2), "B": rand(b, 4, n, seed=4), "C": rand(b, 4, n, seed=5),
            "D": rand(4, seed=6), "z": rand(b, 4, n, seed=7), "delta_bias": rand(4, seed=8, scale=0.1),
            "delta_softplus": True}


def make_ssd(b=1, n=8):
    return {"x": rand(b, 2, n, 16, seed=1), "dt": F.softplus(rand(b, 2, n, seed=2) - 1.0),
            "A": -(rand(2, seed=3).abs() + 0.5), "B": rand(b, 1, n, 16, seed=4, scale=0.25),
            "C": rand(b, 1, n, 16, seed=5, scale=0.25), "D": rand(2, seed=6),
            "initial_state": rand(b, 2, 16, 16, seed=7, scale=0.25), "chunk_size": 16}


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEV)


def make_varlen(lq=(3, 5), lk=(6, 4)):  # two packed sequences, Nq != Nk in each, grouped-query heads
    return {"q": rand(sum(lq), 2, 16, seed=1), "k": rand(sum(lk), 1, 16, seed=2), "v": rand(sum(lk), 1, 16, seed=3),
            "cu_seqlens_q": _offsets(lq), "cu_seqlens_k": _offsets(lk), "max_seqlen_q": max(lq, default=0),
            "max_seqlen_k": max(lk, default=0)}


def make_paged(b=1, n=1):  # a pool of 3 pages of 16 tokens; each sequence: 20 tokens on pages 2 then 0
    return {"q": rand(b, 2, n, 16, seed=1), "k_cache": rand(3, 16, 1, 16, seed=2),
            "v_cache": rand(3, 16, 1, 16, seed=3), "cache_seqlens": torch.full((b,), 20, dtype=torch.int32, device=DEV),
            "block_table": torch.tensor([[2, 0]] * b, dtype=torch.int32, device=DEV).reshape(b, 2)}


def make_int8(b=1, n=1, nk=12):
    k_cache, k_scale = mk.kv_cache.quantize_int8(rand(b, 1, nk, 16, seed=2))
    v_cache, v_scale = mk.kv_cache.quantize_int8(rand(b, 1, nk, 16, seed=3))
    return {"q": rand(b, 2, n, 16, seed=1), "k_cache": k_cache, "v_cache": v_cache,
            "cache_seqlens": torch.full((b,), max(nk - 2, 0), dtype=torch.int32, device=DEV),
            "k_scale": k_scale, "v_scale": v_scale}


@dataclasses.dataclass
class Op:
    fn: Callable
    ref: Callable | None
    make: Callable[..., dict]
    tensors: tuple[str, ...]  # the tensor arguments
    flags: tuple[str, ...]  # the bool flags
    empty: dict[str, dict]  # name -> arguments of make that give empty inputs
    out_like: str  # the output has this argument's shape
    differentiable: bool = True
    state_flag: str | None = None  # the flag that returns (out, final state)
    state_shape: Callable[[dict], tuple] | None = None
    nan_at: dict[str, tuple] = dataclasses.field(default_factory=dict)  # where a NaN goes (default: the middle)


OPS = {
    "softmax": Op(mk.softmax, mk.reference.softmax, make_softmax, ("x",), (),
                  {"B0": dict(b=0), "N0": dict(n=0)}, "x"),
    "flash_attention": Op(mk.flash_attention, mk.reference.flash_attention, make_flash, ("q", "k", "v"),
                          ("causal", "return_lse"),
                          {"B0": dict(b=0), "N0": dict(n=0, nk=0), "Nq0": dict(n=0), "Nk0": dict(nk=0)}, "q"),
    "decode_attention": Op(mk.decode_attention, mk.reference.decode_attention, make_decode,
                           ("q", "k_cache", "v_cache", "cache_seqlens"), ("causal",),
                           {"B0": dict(b=0), "Nq0": dict(n=0), "Nk0": dict(nk=0)}, "q", differentiable=False),
    "block_sparse_attention": Op(mk.block_sparse_attention, mk.reference.block_sparse_attention, make_block_sparse,
                                 ("q", "k", "v"), (),
                                 {"B0": dict(b=0), "N0": dict(n=0, nk=0), "Nq0": dict(n=0), "Nk0": dict(nk=0)},
                                 "q"),
    "linear_attention": Op(mk.linear_attention, mk.reference.linear_attention, make_linear,
                           ("q", "k", "v", "decay", "initial_state"),
                           ("normalize", "return_state", "return_final_state"),
                           {"B0": dict(b=0), "N0": dict(n=0)}, "v", state_flag="return_state",
                           state_shape=lambda kw: (*kw["q"].shape[:2], kw["q"].shape[-1], kw["v"].shape[-1]),
                           nan_at={"decay": (0, 0, 4)}),
    "selective_scan": Op(mk.selective_scan, mk.reference.selective_scan, make_scan,
                         ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
                         ("delta_softplus", "return_last_state", "return_final_state"),
                         {"B0": dict(b=0), "N0": dict(n=0)}, "u", state_flag="return_last_state",
                         state_shape=lambda kw: (kw["u"].shape[0], *kw["A"].shape),
                         nan_at={"delta": (0, 1, 4), "u": (0, 1, 4)}),
    "ssd": Op(mk.ssd, mk.reference.ssd, make_ssd, ("x", "dt", "A", "B", "C", "D", "initial_state"),
              ("return_final_state",), {"B0": dict(b=0), "N0": dict(n=0)}, "x", state_flag="return_final_state",
              state_shape=lambda kw: (*kw["x"].shape[:2], kw["B"].shape[-1], kw["x"].shape[-1]),
              nan_at={"dt": (0, 0, 4)}),
    "flash_attention_varlen": Op(mk.flash_attention_varlen, mk.reference.flash_attention_varlen, make_varlen,
                                 ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"), ("causal", "return_lse"),
                                 {"B0": dict(lq=(), lk=()), "N0": dict(lq=(0, 0), lk=(0, 0)), "Nq0": dict(lq=(0, 0)),
                                  "Nk0": dict(lk=(0, 0))}, "q"),
    # the paged and int8 caches of decode_attention: the same op, other arguments
    "decode_attention_paged": Op(mk.decode_attention, mk.reference.decode_attention, make_paged,
                                 ("q", "k_cache", "v_cache", "cache_seqlens", "block_table"), ("causal",),
                                 {"B0": dict(b=0), "Nq0": dict(n=0)}, "q", differentiable=False,
                                 nan_at={"k_cache": (2, 5, 0, 3), "v_cache": (0, 2, 0, 1)}),  # read positions
    "decode_attention_int8": Op(mk.decode_attention, mk.reference.decode_attention, make_int8,
                                ("q", "k_cache", "v_cache", "cache_seqlens", "k_scale", "v_scale"), ("causal",),
                                {"B0": dict(b=0), "Nq0": dict(n=0), "Nk0": dict(nk=0)}, "q", differentiable=False),
}
INTEGER_ARGS = {"cache_seqlens", "block_table", "cu_seqlens_q", "cu_seqlens_k"}  # index tensors, not data
DIFFERENTIABLE = [name for name, op in OPS.items() if op.differentiable]


def main_output(res):
    return res[0] if isinstance(res, tuple) else res


def float_args(op: Op, kw: dict) -> list[str]:
    return [n for n in op.tensors if kw.get(n) is not None and kw[n].is_floating_point()]


def _params(rows):
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


# --------------------------------------------------------------------------------------------------
# "raises X naming the argument"
# --------------------------------------------------------------------------------------------------

def names(message: str, *candidates: str) -> bool:
    """Whether ``message`` names one of ``candidates`` as a word (shape hints in brackets do not count:
    ``[B, N, L]`` does not name ``B``)."""
    text = re.sub(r"\[[^\]]*\]", " ", message)
    return any(re.search(rf"(?<!\w){re.escape(c)}(?!\w)", text) for c in candidates)


@contextlib.contextmanager
def raises_naming(exc, *candidates: str):
    with pytest.raises(exc) as info:
        yield info
    msg = str(info.value)
    assert "unexpected keyword argument" not in msg, f"the argument does not exist yet: {msg}"
    assert names(msg, *candidates), f"{type(info.value).__name__} does not name {' or '.join(candidates)}: {msg!r}"


# --------------------------------------------------------------------------------------------------
# wrong types, dtypes, ranks, shapes and values
# --------------------------------------------------------------------------------------------------

TYPE_CASES = [(f"{op}-{arg}-{kind}", op, arg, kind)
              for op, spec in OPS.items() for arg in spec.tensors for kind in ("list", "numpy")]


@pytest.mark.parametrize("op_name,arg,kind", _params(TYPE_CASES))
def test_wrong_type_of_a_tensor_argument(op_name, arg, kind):
    op = OPS[op_name]
    kw = op.make()
    t = kw[arg].detach().cpu()
    kw[arg] = t.tolist() if kind == "list" else t.numpy()
    with raises_naming(TypeError, arg):
        op.fn(**kw)


def _bad_dtypes(arg: str) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.int16) if arg in INTEGER_ARGS else (torch.int32, torch.float64)


DTYPE_CASES = [(f"{op}-{arg}-{str(dt).replace('torch.', '')}", op, arg, dt)
               for op, spec in OPS.items() for arg in spec.tensors for dt in _bad_dtypes(arg)]


@pytest.mark.parametrize("op_name,arg,dtype", _params(DTYPE_CASES))
def test_unsupported_dtype(op_name, arg, dtype):
    op = OPS[op_name]
    kw = op.make()
    kw[arg] = kw[arg].to(dtype)
    with raises_naming(TypeError, arg):
        op.fn(**kw)


def _rank_cases():
    rows = [("softmax-x-0d", "softmax", "x", "0d")]  # softmax takes any rank >= 1
    for op, spec in OPS.items():
        if op == "softmax":
            continue
        for arg in spec.tensors:
            rows += [(f"{op}-{arg}-one_more_dim", op, arg, "more"), (f"{op}-{arg}-one_fewer_dim", op, arg, "fewer")]
    return rows


@pytest.mark.parametrize("op_name,arg,how", _params(_rank_cases()))
def test_wrong_rank(op_name, arg, how):
    op = OPS[op_name]
    kw = op.make()
    t = kw[arg]
    kw[arg] = t[None] if how == "more" else t[0] if how == "fewer" else t.flatten()[0]
    with raises_naming(ValueError, arg):
        op.fn(**kw)


def _shape(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` with dimension ``dim`` resized to ``size`` (cut, or padded with fresh values)."""
    shape = list(t.shape)
    shape[dim] = size
    return rand(*shape, seed=99).to(t.dtype)


# (id, op, change to the valid arguments, exception, names any of which the message must contain)
VALUE_CASES = [
    ("softmax-dim_out_of_range", "softmax", lambda kw: {"dim": 2}, ValueError, ("dim",)),
    ("softmax-dim_str", "softmax", lambda kw: {"dim": "-1"}, TypeError, ("dim",)),
    ("softmax-dim_float", "softmax", lambda kw: {"dim": -1.0}, TypeError, ("dim",)),
    ("flash_attention-k_head_dim", "flash_attention",
     lambda kw: {"k": kw["k"][..., :8], "v": kw["v"][..., :8]}, ValueError, ("k",)),
    ("flash_attention-v_length", "flash_attention", lambda kw: {"v": kw["v"][:, :, :-1]}, ValueError, ("v",)),
    ("flash_attention-k_batch", "flash_attention",
     lambda kw: {"k": _shape(kw["k"], 0, 2), "v": _shape(kw["v"], 0, 2)}, ValueError, ("k",)),
    ("flash_attention-kv_heads_not_dividing", "flash_attention",
     lambda kw: {"q": _shape(kw["q"], 1, 3), "k": _shape(kw["k"], 1, 2), "v": _shape(kw["v"], 1, 2)},
     ValueError, ("k", "q")),
    ("flash_attention-head_dim_300", "flash_attention",
     lambda kw: {t: _shape(kw[t], 3, 300) for t in ("q", "k", "v")}, ValueError, ("D", "q")),
    ("flash_attention-scale_str", "flash_attention", lambda kw: {"scale": "0.5"}, TypeError, ("scale",)),
    ("decode_attention-cache_seqlens_shape", "decode_attention",
     lambda kw: {"cache_seqlens": torch.full((2,), 4, dtype=torch.int32, device=DEV)}, ValueError,
     ("cache_seqlens",)),
    ("decode_attention-cache_seqlens_past_the_cache", "decode_attention",
     lambda kw: {"cache_seqlens": torch.full((1,), 13, dtype=torch.int32, device=DEV)}, ValueError,
     ("cache_seqlens",)),
    ("decode_attention-num_splits_zero", "decode_attention", lambda kw: {"num_splits": 0}, ValueError,
     ("num_splits",)),
    ("decode_attention-num_splits_str", "decode_attention", lambda kw: {"num_splits": "2"}, TypeError,
     ("num_splits",)),
    ("decode_attention-scale_str", "decode_attention", lambda kw: {"scale": "0.5"}, TypeError, ("scale",)),
    ("decode_attention-v_cache_length", "decode_attention", lambda kw: {"v_cache": kw["v_cache"][:, :, :-1]},
     ValueError, ("v_cache",)),
    ("block_sparse_attention-mask_for_other_lengths", "block_sparse_attention",
     lambda kw: {"block_mask": masks.causal(48, block_size=16, device=DEV)}, ValueError, ("block_mask",)),
    ("block_sparse_attention-mask_block_256", "block_sparse_attention",
     lambda kw: {"block_mask": masks.causal(32, block_size=256, device=DEV)}, ValueError, ("block_mask",)),
    ("block_sparse_attention-mask_dense_tensor", "block_sparse_attention",
     lambda kw: {"block_mask": kw["block_mask"].to_dense()}, TypeError, ("block_mask",)),
    ("block_sparse_attention-mask_list", "block_sparse_attention",
     lambda kw: {"block_mask": kw["block_mask"].to_dense().tolist()}, TypeError, ("block_mask",)),
    ("block_sparse_attention-scale_str", "block_sparse_attention", lambda kw: {"scale": "0.5"}, TypeError,
     ("scale",)),
    ("linear_attention-k_dim", "linear_attention", lambda kw: {"k": kw["k"][..., :8]}, ValueError, ("k",)),
    ("linear_attention-v_length", "linear_attention", lambda kw: {"v": kw["v"][:, :, :-1]}, ValueError, ("v",)),
    ("linear_attention-decay_length", "linear_attention", lambda kw: {"decay": kw["decay"][..., :-1]},
     ValueError, ("decay",)),
    ("linear_attention-initial_state_shape", "linear_attention",
     lambda kw: {"initial_state": kw["initial_state"][..., :8]}, ValueError, ("initial_state",)),
    ("linear_attention-chunk_size_24", "linear_attention", lambda kw: {"chunk_size": 24}, ValueError,
     ("chunk_size",)),
    ("linear_attention-chunk_size_str", "linear_attention", lambda kw: {"chunk_size": "16"}, TypeError,
     ("chunk_size",)),
    ("linear_attention-feature_map_unknown", "linear_attention", lambda kw: {"feature_map": "bogus"}, ValueError,
     ("feature_map",)),
    ("linear_attention-feature_map_int", "linear_attention", lambda kw: {"feature_map": 3}, TypeError,
     ("feature_map",)),
    ("linear_attention-feature_map_returns_list", "linear_attention", lambda kw: {"feature_map": lambda x: [x]},
     TypeError, ("feature_map",)),
    ("selective_scan-delta_shape", "selective_scan", lambda kw: {"delta": kw["delta"][..., :-1]}, ValueError,
     ("delta",)),
    ("selective_scan-A_channels", "selective_scan", lambda kw: {"A": kw["A"][:2]}, ValueError, ("A",)),
    ("selective_scan-A_state_300", "selective_scan",
     lambda kw: {"A": -torch.ones(4, 300, device=DEV), "B": rand(1, 300, 8, seed=1), "C": rand(1, 300, 8, seed=2)},
     ValueError, ("A",)),
    ("selective_scan-B_length", "selective_scan", lambda kw: {"B": kw["B"][..., :-1], "C": kw["C"][..., :-1]},
     ValueError, ("B",)),
    ("selective_scan-C_states", "selective_scan", lambda kw: {"C": kw["C"][:, :2]}, ValueError, ("C", "B")),
    ("selective_scan-D_shape", "selective_scan", lambda kw: {"D": kw["D"][:2]}, ValueError, ("D",)),
    ("selective_scan-z_shape", "selective_scan", lambda kw: {"z": kw["z"][..., :-1]}, ValueError, ("z",)),
    ("selective_scan-delta_bias_shape", "selective_scan", lambda kw: {"delta_bias": kw["delta_bias"][:2]},
     ValueError, ("delta_bias",)),
    ("ssd-dt_shape", "ssd", lambda kw: {"dt": kw["dt"][..., :-1]}, ValueError, ("dt",)),
    ("ssd-A_shape", "ssd", lambda kw: {"A": kw["A"][:1]}, ValueError, ("A",)),
    ("ssd-groups_not_dividing_heads", "ssd", lambda kw: {"B": _shape(kw["B"], 1, 3), "C": _shape(kw["C"], 1, 3)},
     ValueError, ("G", "groups")),
    ("ssd-C_state_size", "ssd", lambda kw: {"C": kw["C"][..., :8]}, ValueError, ("C", "B")),
    ("ssd-D_shape", "ssd", lambda kw: {"D": kw["D"][:1]}, ValueError, ("D",)),
    ("ssd-initial_state_shape", "ssd", lambda kw: {"initial_state": kw["initial_state"][..., :8]}, ValueError,
     ("initial_state",)),
    ("ssd-chunk_size_24", "ssd", lambda kw: {"chunk_size": 24}, ValueError, ("chunk_size",)),
    ("ssd-chunk_size_float", "ssd", lambda kw: {"chunk_size": 16.0}, TypeError, ("chunk_size",)),
    ("decode_attention-cache_leftpad_float", "decode_attention",
     lambda kw: {"cache_leftpad": torch.zeros(1, device=DEV)}, TypeError, ("cache_leftpad",)),
    ("decode_attention-cache_leftpad_shape", "decode_attention",
     lambda kw: {"cache_leftpad": torch.zeros(2, dtype=torch.int32, device=DEV)}, ValueError, ("cache_leftpad",)),
    ("decode_attention-cache_leftpad_past_the_length", "decode_attention",
     lambda kw: {"cache_leftpad": torch.full((1,), 11, dtype=torch.int32, device=DEV)}, ValueError,
     ("cache_leftpad",)),
    ("decode_attention-scales_for_a_float_cache", "decode_attention",
     lambda kw: {"k_scale": torch.ones(1, 1, 12, device=DEV), "v_scale": torch.ones(1, 1, 12, device=DEV)},
     ValueError, ("k_scale", "v_scale")),
    ("flash_attention_varlen-cu_seqlens_q_not_from_0", "flash_attention_varlen",
     lambda kw: {"cu_seqlens_q": _offsets([1, 2, 5])[1:]}, ValueError, ("cu_seqlens_q",)),
    ("flash_attention_varlen-cu_seqlens_q_decreasing", "flash_attention_varlen",
     lambda kw: {"cu_seqlens_q": _offsets([9, -1]), "max_seqlen_q": 9}, ValueError, ("cu_seqlens_q",)),
    ("flash_attention_varlen-cu_seqlens_q_short_of_the_tokens", "flash_attention_varlen",
     lambda kw: {"cu_seqlens_q": _offsets([3, 4])}, ValueError, ("cu_seqlens_q",)),
    ("flash_attention_varlen-cu_seqlens_k_past_the_tokens", "flash_attention_varlen",
     lambda kw: {"k": rand(12, 1, 16, seed=2), "v": rand(12, 1, 16, seed=3)}, ValueError, ("cu_seqlens_k",)),
    ("flash_attention_varlen-cu_seqlens_k_other_batch", "flash_attention_varlen",
     lambda kw: {"cu_seqlens_k": _offsets([10])}, ValueError, ("cu_seqlens_k",)),
    ("flash_attention_varlen-cu_seqlens_k_on_meta", "flash_attention_varlen",
     lambda kw: {"cu_seqlens_k": kw["cu_seqlens_k"].to("meta")}, ValueError, ("cu_seqlens_k",)),
    ("flash_attention_varlen-max_seqlen_q_too_short", "flash_attention_varlen", lambda kw: {"max_seqlen_q": 4},
     ValueError, ("max_seqlen_q",)),
    ("flash_attention_varlen-max_seqlen_q_str", "flash_attention_varlen", lambda kw: {"max_seqlen_q": "5"},
     TypeError, ("max_seqlen_q",)),
    ("flash_attention_varlen-max_seqlen_k_bool", "flash_attention_varlen", lambda kw: {"max_seqlen_k": True},
     TypeError, ("max_seqlen_k",)),
    ("flash_attention_varlen-max_seqlen_k_tensor", "flash_attention_varlen",
     lambda kw: {"max_seqlen_k": torch.tensor(6)}, TypeError, ("max_seqlen_k",)),
    ("flash_attention_varlen-max_seqlen_k_negative", "flash_attention_varlen", lambda kw: {"max_seqlen_k": -1},
     ValueError, ("max_seqlen_k",)),
    ("flash_attention_varlen-k_head_dim", "flash_attention_varlen",
     lambda kw: {"k": kw["k"][..., :8], "v": kw["v"][..., :8]}, ValueError, ("k",)),
    ("flash_attention_varlen-v_rows", "flash_attention_varlen", lambda kw: {"v": kw["v"][:-1]}, ValueError, ("v",)),
    ("flash_attention_varlen-kv_heads_not_dividing", "flash_attention_varlen",
     lambda kw: {"q": _shape(kw["q"], 1, 3), "k": _shape(kw["k"], 1, 2), "v": _shape(kw["v"], 1, 2)},
     ValueError, ("k", "q")),
    ("flash_attention_varlen-head_dim_300", "flash_attention_varlen",
     lambda kw: {t: _shape(kw[t], 2, 300) for t in ("q", "k", "v")}, ValueError, ("D", "q")),
    ("flash_attention_varlen-scale_str", "flash_attention_varlen", lambda kw: {"scale": "0.5"}, TypeError,
     ("scale",)),
    ("decode_attention_paged-block_table_other_batch", "decode_attention_paged",
     lambda kw: {"block_table": kw["block_table"].repeat(2, 1)}, ValueError, ("block_table",)),
    ("decode_attention_paged-block_table_past_the_pool", "decode_attention_paged",
     lambda kw: {"block_table": torch.tensor([[2, 3]], dtype=torch.int32, device=DEV)}, ValueError,
     ("block_table",)),
    ("decode_attention_paged-block_table_negative", "decode_attention_paged",
     lambda kw: {"block_table": torch.tensor([[-1, 0]], dtype=torch.int32, device=DEV)}, ValueError,
     ("block_table",)),
    ("decode_attention_paged-block_table_on_meta", "decode_attention_paged",
     lambda kw: {"block_table": kw["block_table"].to("meta")}, ValueError, ("block_table",)),
    ("decode_attention_paged-cache_seqlens_past_the_table", "decode_attention_paged",
     lambda kw: {"cache_seqlens": torch.full((1,), 33, dtype=torch.int32, device=DEV)}, ValueError,
     ("cache_seqlens",)),
    ("decode_attention_paged-page_size_8", "decode_attention_paged",
     lambda kw: {"k_cache": kw["k_cache"][:, :8], "v_cache": kw["v_cache"][:, :8],
                 "cache_seqlens": torch.full((1,), 10, dtype=torch.int32, device=DEV)}, ValueError,
     ("page_size", "k_cache")),
    ("decode_attention_paged-v_cache_pages", "decode_attention_paged", lambda kw: {"v_cache": kw["v_cache"][:2]},
     ValueError, ("v_cache",)),
    ("decode_attention_paged-kv_heads_not_dividing", "decode_attention_paged",
     lambda kw: {"k_cache": _shape(kw["k_cache"], 2, 3), "v_cache": _shape(kw["v_cache"], 2, 3)}, ValueError,
     ("k_cache",)),
    ("decode_attention_int8-v_scale_missing", "decode_attention_int8", lambda kw: {"v_scale": None}, ValueError,
     ("v_scale",)),
    ("decode_attention_int8-k_scale_float16", "decode_attention_int8", lambda kw: {"k_scale": kw["k_scale"].half()},
     TypeError, ("k_scale",)),
    ("decode_attention_int8-v_scale_shape", "decode_attention_int8", lambda kw: {"v_scale": kw["v_scale"][..., :-1]},
     ValueError, ("v_scale",)),
    ("decode_attention_int8-v_cache_not_int8", "decode_attention_int8",
     lambda kw: {"v_cache": kw["v_cache"].float()}, TypeError, ("v_cache",)),
]


@pytest.mark.parametrize("op_name,change,exc,expected", _params(VALUE_CASES))
def test_mismatched_shapes_and_bad_values(op_name, change, exc, expected):
    op = OPS[op_name]
    kw = op.make()
    kw.update(change(kw))
    with raises_naming(exc, *expected):
        op.fn(**kw)


FLAG_CASES = [(f"{op}-{flag}-{value!r}", op, flag, value)
              for op, spec in OPS.items() for flag in spec.flags for value in ("no", 1)]


@pytest.mark.parametrize("op_name,flag,value", _params(FLAG_CASES))
def test_bool_flag_given_a_non_bool(op_name, flag, value):
    op = OPS[op_name]
    with raises_naming(TypeError, flag):
        op.fn(**op.make(), **{flag: value})


# --------------------------------------------------------------------------------------------------
# NaN and inf reach the outputs they touch
# --------------------------------------------------------------------------------------------------

NAN_CASES = [(f"{op}-{arg}", op, arg) for op, spec in OPS.items() for arg in spec.tensors
             if arg not in INTEGER_ARGS and spec.make()[arg].is_floating_point()]


@pytest.mark.parametrize("op_name,arg", _params(NAN_CASES))
def test_nan_reaches_the_output(op_name, arg):
    """One NaN in the middle of an input (in the middle of the sequence for step-wise inputs, where a
    silent state reset would hide it from every later output)."""
    op = OPS[op_name]
    kw = op.make()
    t = kw[arg].clone()
    at = op.nan_at.get(arg)
    if at is None:
        t.view(-1)[t.numel() // 2] = float("nan")
    else:
        t[at] = float("nan")
    kw[arg] = t
    out = main_output(op.fn(**kw))
    assert torch.isnan(out).any(), f"a NaN in {arg} vanished from {op_name}'s output"


def _finite_close(out, ref, name):
    assert torch.isfinite(out).all(), f"{name}: non-finite output where the result is finite"
    assert_close(out, ref, torch.float32, name=name)


def _inf_softmax_rows():
    x = make_softmax(b=5)["x"].clone()
    x[0] = float("-inf")  # a fully masked row: zeros
    x[1, :3] = float("-inf")  # masked entries: exactly zero probability
    x[2, 5] = float("inf")
    y = mk.softmax(x)
    assert torch.equal(y[0], torch.zeros_like(y[0]))
    assert torch.equal(y[1, :3], torch.zeros_like(y[1, :3])) and torch.isfinite(y[1]).all()
    assert_close(y[1], mk.reference.softmax(x[1].double()), torch.float32, name="partly masked row")
    one_hot = torch.zeros_like(y[2])
    one_hot[5] = 1.0
    assert torch.isnan(y[2]).any() or torch.equal(y[2], one_hot), f"+inf logit gave a finite, wrong row {y[2]}"
    _finite_close(y[3:], mk.reference.softmax(x[3:].double()), "rows without inf")


def _inf_in_values(op_name, arg, where):
    """An inf in one value: every output that reads it (column 0 of those rows) is not finite."""
    op = OPS[op_name]
    kw = op.make()
    v = kw[arg].clone()
    v[where] = float("inf")
    kw[arg] = v
    return main_output(op.fn(**kw))


def _inf_flash():
    out = _inf_in_values("flash_attention", "v", (0, 0, 3, 0))  # not causal: every query sees key 3
    assert not torch.isfinite(out[..., 0]).any(), "an inf value gave finite outputs"
    assert torch.isfinite(out[..., 1:]).all()


def _inf_decode():
    out = _inf_in_values("decode_attention", "v_cache", (0, 0, 3, 0))  # position 3 < cache_seqlens = 10
    assert not torch.isfinite(out[..., 0]).any(), "an inf value gave finite outputs"
    assert torch.isfinite(out[..., 1:]).all()


def _inf_decode_past_the_cache():
    """Positions at or past cache_seqlens are not part of the cache: NaN and inf there never leak."""
    kw = make_decode()
    want = mk.decode_attention(**kw)
    for name in ("k_cache", "v_cache"):
        t = kw[name].clone()
        t[:, :, 10:] = float("nan")
        t[:, :, 11:] = float("inf")
        kw[name] = t
    got = mk.decode_attention(**kw)
    assert torch.isfinite(got).all(), "garbage past cache_seqlens leaked into the output"
    assert_close(got, want.double(), torch.float32)


def _inf_block_sparse():
    out = _inf_in_values("block_sparse_attention", "v", (0, 0, 0, 0))  # causal: every query sees key 0
    assert not torch.isfinite(out[..., 0]).any(), "an inf value gave finite outputs"
    assert torch.isfinite(out[..., 1:]).all()


def _inf_linear():
    out = _inf_in_values("linear_attention", "v", (0, 0, 3, 0))
    assert not torch.isfinite(out[:, 0, 3:, 0]).any(), "an inf value gave finite outputs after it"


def _minus_inf_decay_resets():
    kw = make_linear()
    kw["decay"] = kw["decay"].clone()
    kw["decay"][:, :, 4] = float("-inf")  # documented: forgets everything before step 4
    ref = mk.reference.linear_attention(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    _finite_close(mk.linear_attention(**kw), ref, "out")


def _inf_scan():
    out = _inf_in_values("selective_scan", "u", (0, 1, 3))
    assert not torch.isfinite(out[0, 1, 3:]).any(), "an inf input gave finite outputs after it"


def _minus_inf_delta_with_softplus():
    kw = make_scan()
    kw["delta"] = kw["delta"].clone()
    kw["delta"][0, 1, 3] = float("-inf")  # softplus(-inf) = 0: a step that changes nothing
    kw["delta_bias"] = None
    ref = mk.reference.selective_scan(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    _finite_close(mk.selective_scan(**kw), ref, "out")


def _inf_ssd():
    out = _inf_in_values("ssd", "x", (0, 0, 3, 0))
    assert not torch.isfinite(out[0, 0, 3:, 0]).any(), "an inf input gave finite outputs after it"


def _minus_inf_rate_resets():
    kw = make_ssd()
    kw["A"] = kw["A"].clone()
    kw["A"][0] = float("-inf")  # exp(dt A) = 0: head 0 forgets its state at every step
    ref = mk.reference.ssd(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    _finite_close(mk.ssd(**kw), ref, "y")


def _inf_varlen_stays_in_its_sequence():
    out = _inf_in_values("flash_attention_varlen", "v", (2, 0, 0))  # key 2 of sequence 0 (queries 0-2)
    assert not torch.isfinite(out[:3, :, 0]).any(), "an inf value gave finite outputs"
    assert torch.isfinite(out[:3, :, 1:]).all() and torch.isfinite(out[3:]).all(), "the inf left its sequence"


def _nan_inf_in_pages_not_read():
    """An unused page, and the rows of a sequence's last page past its length, are not part of the cache."""
    kw = make_paged()
    want = mk.decode_attention(**kw)
    for name in ("k_cache", "v_cache"):
        t = kw[name].clone()
        t[1] = float("nan")  # page 1: no sequence's
        t[0, 4:] = float("inf")  # page 0 holds tokens 16-19 in rows 0-3
        kw[name] = t
    got = mk.decode_attention(**kw)
    assert torch.isfinite(got).all(), "garbage outside the sequence's pages leaked into the output"
    assert_close(got, want.double(), torch.float32)


def _inf_int8_scale():
    kw = make_int8()
    kw["v_scale"] = kw["v_scale"].clone()
    kw["v_scale"][0, 0, 3] = float("inf")  # key 3 < cache_seqlens = 10: every output reads it
    assert not torch.isfinite(mk.decode_attention(**kw)).any(), "an inf scale gave finite outputs"


INF_CASES = [
    ("softmax-minus_inf_rows_and_plus_inf", _inf_softmax_rows),
    ("flash_attention-inf_value", _inf_flash),
    ("decode_attention-inf_value", _inf_decode),
    ("decode_attention-nan_inf_past_cache_seqlens", _inf_decode_past_the_cache),
    ("block_sparse_attention-inf_value", _inf_block_sparse),
    ("linear_attention-inf_value", _inf_linear),
    ("linear_attention-minus_inf_decay_resets", _minus_inf_decay_resets),
    ("selective_scan-inf_input", _inf_scan),
    ("selective_scan-minus_inf_delta_softplus", _minus_inf_delta_with_softplus),
    ("ssd-inf_input", _inf_ssd),
    ("ssd-minus_inf_rate_resets", _minus_inf_rate_resets),
    ("flash_attention_varlen-inf_value_stays_in_its_sequence", _inf_varlen_stays_in_its_sequence),
    ("decode_attention_paged-nan_inf_in_pages_not_read", _nan_inf_in_pages_not_read),
    ("decode_attention_int8-inf_scale", _inf_int8_scale),
]


@pytest.mark.parametrize("check", _params(INF_CASES))
def test_inf_in_inputs(check):
    check()


# --------------------------------------------------------------------------------------------------
# double backward: works (and agrees with the reference) or raises; never detached
# --------------------------------------------------------------------------------------------------

def _reference_second_derivatives(op, kw, leaves, w, vs):
    r = {k: (v.detach().double().requires_grad_() if k in leaves else v) for k, v in kw.items()}
    ref_out = main_output(op.ref(**r))
    ref_grads = torch.autograd.grad((ref_out * w.double()).sum(), [r[n] for n in leaves], create_graph=True)
    second = torch.autograd.grad(sum((g * v.double()).sum() for g, v in zip(ref_grads, vs)), [r[n] for n in leaves],
                                 allow_unused=True)
    return [torch.zeros_like(r[n]) if s is None else s for n, s in zip(leaves, second)]


@pytest.mark.parametrize("op_name", DIFFERENTIABLE)
@pytest.mark.parametrize("how", ["backward", "autograd_grad"])
def test_double_backward_works_or_raises(op_name, how):
    """Gradients taken with create_graph=True (a gradient penalty) must keep the graph back to the inputs:
    differentiating them again either gives the reference's second derivatives or raises a RuntimeError.
    Both ways a penalty is differentiated: ``penalty.backward()`` (how="backward") and
    ``torch.autograd.grad(penalty, inputs, allow_unused=True)`` (how="autograd_grad"), where an error
    node that hangs off detached copies instead of the inputs is never reached, and the second
    derivatives come back None: silently zero."""
    op = OPS[op_name]
    kw = op.make()
    leaves = float_args(op, kw)
    for n in leaves:
        kw[n] = kw[n].detach().requires_grad_()
    inputs = [kw[n] for n in leaves]
    out = main_output(op.fn(**kw))
    w = rand(*out.shape, seed=11)
    grads = torch.autograd.grad((out * w).sum(), inputs, create_graph=True)
    detached = [n for n, g in zip(leaves, grads) if not g.requires_grad]
    assert not detached, (f"{op_name}: gradients of {detached} came back detached under create_graph=True "
                          "(a gradient penalty would be silently dropped); raise or keep the graph")
    vs = [rand(*g.shape, seed=20 + i) for i, g in enumerate(grads)]
    penalty = sum((g * v).sum() for g, v in zip(grads, vs))
    try:
        if how == "backward":
            penalty.backward()
            second = [t.grad for t in inputs]
        else:
            second = torch.autograd.grad(penalty, inputs, allow_unused=True)
    except RuntimeError as e:  # a clear refusal (once_differentiable, or an explicit message) is allowed
        assert str(e), "RuntimeError without a message"
        return
    # it did not raise: then the second derivatives must be right, all of them (no part silently dropped)
    want = _reference_second_derivatives(op, kw, leaves, w, vs)
    for n, a, b in zip(leaves, second, want):
        assert a is not None or not b.any(), (
            f"{op_name}: the second derivative through {n} came back None (the gradients' graph does not reach "
            f"{n}: silently zero) where it is not zero; raise instead, from a node tied to the inputs")
        assert_close(torch.zeros_like(kw[n]) if a is None else a, b, tol=1e-4, name=f"second derivative through {n}")


# --------------------------------------------------------------------------------------------------
# empty inputs keep the graph
# --------------------------------------------------------------------------------------------------

EMPTY_CASES = [(f"{op}-{case}", op, case) for op, spec in OPS.items() for case in spec.empty]


@pytest.mark.parametrize("op_name,case", _params(EMPTY_CASES))
def test_empty_inputs_keep_the_graph(op_name, case):
    op = OPS[op_name]
    kw = op.make(**op.empty[case])
    leaves = float_args(op, kw) if op.differentiable else []
    for n in leaves:
        kw[n] = kw[n].detach().requires_grad_()
    out = op.fn(**kw)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(kw[op.out_like].shape), case
    if not op.differentiable:
        return
    out.sum().backward()  # fails if the output is detached from the inputs
    for n in leaves:
        g = kw[n].grad
        assert g is not None, f"{n} got no gradient (not connected to the output)"
        assert g.shape == kw[n].shape and not g.any(), (n, tuple(g.shape))
    if op.state_flag is None:
        return
    # the final state of an empty sequence is the initial state (or zeros), and stays connected to it
    for n in leaves:
        kw[n].grad = None
    out, state = op.fn(**kw, **{op.state_flag: True})
    assert tuple(state.shape) == op.state_shape(kw) and state.dtype == torch.float32
    s0 = kw.get("initial_state")
    if s0 is None:
        assert not state.any()
        return
    assert torch.equal(state.detach(), s0.detach())
    state.sum().backward()
    assert s0.grad is not None and torch.equal(s0.grad, torch.ones_like(s0)), "final state not connected to s0"


# --------------------------------------------------------------------------------------------------
# a hand-built BlockMask is validated before a kernel reads it
# --------------------------------------------------------------------------------------------------

def in_child(thunk, timeout: float = 240.0) -> tuple[str, str, str]:
    """Run ``thunk`` and say how it ended: ("ok", "", ""), ("raised", type name, message) or ("died", how, "").
    Under the interpreter it runs in a forked child, so that an out-of-bounds read that kills the process
    fails the test instead of the test run. (On a GPU there is no fork after CUDA is initialised, and
    validation must raise before any launch.)"""
    if mk.backend() == "cuda":
        try:
            thunk()
            return ("ok", "", "")
        except Exception as e:  # noqa: BLE001
            return ("raised", type(e).__name__, str(e))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running anything of pytest's
        code = 0
        try:
            os.close(r)
            try:
                thunk()
                res = ("ok", "", "")
            except BaseException as e:  # noqa: BLE001
                res = ("raised", type(e).__name__, str(e)[:2000])
            os.write(w, pickle.dumps(res))
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data, deadline = b"", time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return ("died", f"timed out after {timeout:.0f} s", "")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ("died", f"killed by signal {os.WTERMSIG(status)} ({signal.Signals(os.WTERMSIG(status)).name})", "")
    return pickle.loads(data) if data else ("died", f"exit status {os.WEXITSTATUS(status)}", "")


def _edit(bm: masks.BlockMask, field: str, edit) -> masks.BlockMask:
    t = getattr(bm, field).clone()
    edit(t, bm)
    return dataclasses.replace(bm, **{field: t})


def _first_partial(bm):
    rows, slots = bm.partial.nonzero(as_tuple=True)
    return int(rows[-1]), int(slots[-1])


def _set(index_fn, value_fn):
    def edit(t, bm):
        t[index_fn(bm)] = value_fn(bm)
    return edit


BLOCK_MASK_CASES = [
    ("kv_indices_past_the_last_block", "kv_indices", _set(lambda bm: (1, 1), lambda bm: bm.n_kv_blocks)),
    ("kv_indices_far_out_of_range", "kv_indices", _set(lambda bm: (1, 0), lambda bm: 1000)),
    ("kv_indices_negative_inside_the_count", "kv_indices", _set(lambda bm: (1, 1), lambda bm: -1)),
    ("kv_counts_wider_than_kv_indices", "kv_counts", _set(lambda bm: 1, lambda bm: 5)),
    ("kv_counts_negative", "kv_counts", _set(lambda bm: 0, lambda bm: -3)),
    ("q_indices_past_the_last_block", "q_indices", _set(lambda bm: (0, 1), lambda bm: bm.n_q_blocks + 3)),
    ("q_counts_wider_than_q_indices", "q_counts", _set(lambda bm: 0, lambda bm: 7)),
    ("tile_index_out_of_range", "tile_index", _set(_first_partial, lambda bm: bm.tiles.shape[0] + 5)),
]


@pytest.mark.parametrize("field,edit", _params(BLOCK_MASK_CASES))
def test_hand_built_block_mask_is_validated(field, edit):
    kw = make_block_sparse()
    bad = _edit(kw["block_mask"], field, edit)

    def run():
        q, k, v = (kw[n].detach().requires_grad_() for n in ("q", "k", "v"))
        mk.block_sparse_attention(q, k, v, bad).sum().backward()

    how, kind, msg = in_child(run)
    assert how != "died", f"a BlockMask with bad {field} crashed the process ({kind}) instead of raising"
    assert how == "raised", f"a BlockMask with bad {field} was accepted (silently wrong or out-of-bounds reads)"
    assert kind == "ValueError", f"{kind}: {msg}"
    assert names(msg, field, "block_mask"), f"the error names neither {field} nor block_mask: {msg!r}"


def test_block_mask_with_mismatched_table_shapes_is_rejected():
    kw = make_block_sparse()
    bm = kw["block_mask"]
    cases = {
        "kv_indices": dataclasses.replace(bm, kv_indices=torch.zeros(bm.n_q_blocks + 1, 2, dtype=torch.int32,
                                                                     device=DEV)),
        "kv_counts": dataclasses.replace(bm, kv_counts=bm.kv_counts[:1].clone()),
        "tiles": dataclasses.replace(bm, tiles=bm.tiles[:, :8, :8].clone()),
    }
    for field, bad in cases.items():
        def run(bad=bad):
            mk.block_sparse_attention(kw["q"], kw["k"], kw["v"], bad)
        how, kind, msg = in_child(run)
        assert how == "raised" and kind == "ValueError", (field, how, kind, msg)
        assert names(msg, field, "block_mask"), (field, msg)


# --------------------------------------------------------------------------------------------------
# the mask builders and estimators
# --------------------------------------------------------------------------------------------------

def _qk(n=32, d=16, dtype=torch.float32):
    return rand(1, 2, n, d, seed=1).to(dtype), rand(1, 1, n, d, seed=2).to(dtype)


MASK_CASES = [
    ("causal-q_len_str", lambda: masks.causal("32", block_size=16), TypeError, ("q_len",)),
    ("causal-q_len_negative", lambda: masks.causal(-1, block_size=16), ValueError, ("q_len",)),
    ("causal-kv_len_float", lambda: masks.causal(32, 32.0, block_size=16), TypeError, ("kv_len",)),
    ("causal-block_size_str", lambda: masks.causal(32, block_size="16"), TypeError, ("block_size",)),
    ("causal-block_size_24", lambda: masks.causal(32, block_size=24), ValueError, ("block_size",)),
    ("sliding_window-causal_no", lambda: masks.sliding_window(32, 4, causal="no", block_size=16), TypeError,
     ("causal",)),
    ("sliding_window-causal_1", lambda: masks.sliding_window(32, 4, causal=1, block_size=16), TypeError,
     ("causal",)),
    ("sliding_window-window_0", lambda: masks.sliding_window(32, 0, block_size=16), ValueError, ("window",)),
    ("sliding_window-window_float", lambda: masks.sliding_window(32, 4.0, block_size=16), TypeError, ("window",)),
    ("dilated-causal_no", lambda: masks.dilated(32, 4, 2, causal="no", block_size=16), TypeError, ("causal",)),
    ("dilated-dilation_0", lambda: masks.dilated(32, 4, 0, block_size=16), ValueError, ("dilation",)),
    ("a_shape-sink_str", lambda: masks.a_shape(32, "2", 4, block_size=16), TypeError, ("sink",)),
    ("a_shape-sink_negative", lambda: masks.a_shape(32, -2, 4, block_size=16), ValueError, ("sink",)),
    ("from_dense-mask_list", lambda: masks.from_dense([[True, False], [True, True]], block_size=16), TypeError,
     ("mask",)),
    ("from_dense-mask_float", lambda: masks.from_dense(torch.ones(32, 32, device=DEV), block_size=16), TypeError,
     ("mask",)),
    ("from_dense-mask_3d", lambda: masks.from_dense(torch.ones(2, 32, 32, dtype=torch.bool, device=DEV),
                                                   block_size=16), ValueError, ("mask",)),
    ("from_mask_fn-not_callable", lambda: masks.from_mask_fn(3, 32, 32, block_size=16), TypeError, ("mask_fn",)),
    ("from_mask_fn-returns_ints", lambda: masks.from_mask_fn(lambda i, j: (j <= i).int(), 32, 32, block_size=16),
     TypeError, ("mask_fn",)),
    ("from_mask_fn-wrong_shape", lambda: masks.from_mask_fn(lambda i, j: torch.ones(3, 3, dtype=torch.bool),
                                                           32, 32, block_size=16), ValueError, ("mask_fn",)),
    ("vertical_slash-q_list", lambda: masks.vertical_slash(_qk()[0].tolist(), _qk()[1], block_size=16), TypeError,
     ("q",)),
    ("vertical_slash-q_int32", lambda: masks.vertical_slash(_qk()[0].int(), _qk()[1], block_size=16), TypeError,
     ("q",)),
    ("vertical_slash-q_3d", lambda: masks.vertical_slash(_qk()[0][0], _qk()[1], block_size=16), ValueError, ("q",)),
    ("vertical_slash-k_head_dim", lambda: masks.vertical_slash(_qk()[0], _qk()[1][..., :8], block_size=16),
     ValueError, ("k", "q")),
    ("vertical_slash-n_vertical_0", lambda: masks.vertical_slash(*_qk(), n_vertical=0, block_size=16), ValueError,
     ("n_vertical",)),
    ("xattention-causal_no", lambda: masks.xattention(*_qk(), stride=4, block_size=16, causal="no"), TypeError,
     ("causal",)),
    ("xattention-q_numpy", lambda: masks.xattention(_qk()[0].cpu().numpy(), _qk()[1], stride=4, block_size=16),
     TypeError, ("q",)),
    ("xattention-k_int32", lambda: masks.xattention(_qk()[0], _qk()[1].int(), stride=4, block_size=16), TypeError,
     ("k",)),
    ("xattention-stride_3", lambda: masks.xattention(*_qk(), stride=3, block_size=16), ValueError, ("stride",)),
    ("xattention-threshold_0", lambda: masks.xattention(*_qk(), threshold=0.0, stride=4, block_size=16),
     ValueError, ("threshold",)),
    ("xattention-threshold_str", lambda: masks.xattention(*_qk(), threshold="0.9", stride=4, block_size=16),
     TypeError, ("threshold",)),
    ("xattention_blocks-causal_1", lambda: masks.xattention_blocks(*_qk(), stride=4, block_size=16, causal=1),
     TypeError, ("causal",)),
    ("xattention_blocks-q_list", lambda: masks.xattention_blocks(_qk()[0].tolist(), _qk()[1], stride=4,
                                                                 block_size=16), TypeError, ("q",)),
]


@pytest.mark.parametrize("build,exc,expected", _params(MASK_CASES))
def test_mask_builders_reject_bad_input(build, exc, expected):
    with raises_naming(exc, *expected):
        build()


META_BUILDERS = [
    ("causal", lambda: masks.causal(32, block_size=16, device="meta")),
    ("sliding_window", lambda: masks.sliding_window(32, 4, block_size=16, device="meta")),
    ("dilated", lambda: masks.dilated(32, 4, 2, block_size=16, device="meta")),
    ("a_shape", lambda: masks.a_shape(32, 2, 4, block_size=16, device="meta")),
    ("from_mask_fn", lambda: masks.from_mask_fn(lambda i, j: j <= i, 32, 32, block_size=16, device="meta")),
    ("from_dense", lambda: masks.from_dense(torch.ones(32, 32, dtype=torch.bool, device="meta"), block_size=16)),
    ("vertical_slash", lambda: masks.vertical_slash(*(t.to("meta") for t in _qk()), block_size=16)),
    ("xattention", lambda: masks.xattention(*(t.to("meta") for t in _qk()), stride=4, block_size=16)),
]


@pytest.mark.parametrize("build", _params(META_BUILDERS))
def test_mask_builders_on_the_meta_device(build):
    """A BlockMask's sizes depend on the mask's values, which the meta device does not hold: a clear
    ValueError about the device (not torch internals), unless the builder manages without values."""
    try:
        bm = build()
    except ValueError as e:
        assert names(str(e), "device", "meta") or "'meta'" in str(e), f"unclear error: {e}"
    else:
        assert isinstance(bm, masks.BlockMask)


ESTIMATORS = {
    "vertical_slash": lambda q, k: masks.vertical_slash(q, k, n_vertical=4, n_slash=4, last_q=32, block_size=16),
    "xattention": lambda q, k: masks.xattention(q, k, stride=4, threshold=0.9, block_size=16),
    "xattention_not_causal": lambda q, k: masks.xattention(q, k, stride=4, threshold=0.9, block_size=16,
                                                            causal=False),
    "xattention_blocks": lambda q, k: masks.xattention_blocks(q, k, stride=4, threshold=0.9, block_size=16),
}


def _as_dense(res):
    return res.to_dense() if isinstance(res, masks.BlockMask) else res


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimators_give_the_same_mask_for_bf16_inputs(name):
    """The same values in bf16 and in float32 give the same mask (the interpreter's bf16 tl.dot is
    wrong, so an estimator must not feed it bf16). On a GPU, bf16 products may round differently: there
    at most one block in 16 may differ."""
    q32, k32 = rand(1, 2, 128, 32, seed=5, scale=1.5), rand(1, 1, 128, 32, seed=6, scale=1.5)
    qb, kb = q32.bfloat16(), k32.bfloat16()
    got = _as_dense(ESTIMATORS[name](qb, kb))
    want = _as_dense(ESTIMATORS[name](qb.float(), kb.float()))
    assert got.shape == want.shape and got.dtype == torch.bool
    differ = (got != want).sum().item()
    if mk.backend() == "interpreter":
        assert differ == 0, f"{name}: {differ} of {want.numel()} entries differ between bf16 and float32 inputs"
    else:
        assert differ <= want.numel() / 16, f"{name}: {differ} of {want.numel()} entries differ"


@pytest.mark.parametrize("name", ["vertical_slash", "xattention", "xattention_blocks"])
@pytest.mark.parametrize("nq,nk", [(0, 0), (0, 32), (32, 0)], ids=["N0", "Nq0", "Nk0"])
def test_estimators_on_empty_inputs(name, nq, nk):
    """No queries or no keys: an empty mask of the right size, or a ValueError that names q or k (never
    an internal assertion)."""
    q, k = rand(1, 2, nq, 16, seed=1), rand(1, 1, nk, 16, seed=2)
    try:
        res = ESTIMATORS[name](q, k)
    except ValueError as e:
        assert names(str(e), "q", "k"), f"unclear error: {e}"
        return
    if isinstance(res, masks.BlockMask):
        assert (res.q_len, res.kv_len) == (nq, nk) and res.visited_blocks() == 0
    else:
        assert tuple(res.shape) == (math.ceil(nq / 16), math.ceil(nk / 16))


# --------------------------------------------------------------------------------------------------
# attention across devices: the same checks on a process group of one (before any transfer)
# --------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def group_of_one():
    dist.init_process_group("nccl" if mk.backend() == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _shards():
    return {"q": rand(1, 2, 8, 16, seed=1), "k": rand(1, 1, 8, 16, seed=2), "v": rand(1, 1, 8, 16, seed=3)}


DISTRIBUTED_CASES = [
    ("q_list", lambda kw: {"q": kw["q"].tolist()}, TypeError, ("q",)),
    ("k_numpy", lambda kw: {"k": kw["k"].cpu().numpy()}, TypeError, ("k",)),
    ("k_int32", lambda kw: {"k": kw["k"].int()}, TypeError, ("k",)),
    ("v_float64", lambda kw: {"v": kw["v"].double()}, TypeError, ("v",)),
    ("q_3d", lambda kw: {"q": kw["q"][0]}, ValueError, ("q",)),
    ("v_5d", lambda kw: {"v": kw["v"][None]}, ValueError, ("v",)),
    ("k_head_dim", lambda kw: {"k": kw["k"][..., :8], "v": kw["v"][..., :8]}, ValueError, ("k",)),
    ("kv_heads_not_dividing", lambda kw: {"k": _shape(kw["k"], 1, 3), "v": _shape(kw["v"], 1, 3)}, ValueError,
     ("k", "q")),
    ("kv_shard_length", lambda kw: {"k": kw["k"][:, :, :6], "v": kw["v"][:, :, :6]}, ValueError, ("k", "q")),
    ("causal_1", lambda kw: {"causal": 1}, TypeError, ("causal",)),
    ("causal_no", lambda kw: {"causal": "no"}, TypeError, ("causal",)),
    ("scale_str", lambda kw: {"scale": "0.5"}, TypeError, ("scale",)),
]


@pytest.mark.parametrize("fn", [mk.distributed.ring_attention, mk.distributed.ulysses_attention],
                         ids=["ring_attention", "ulysses_attention"])
@pytest.mark.parametrize("change,exc,expected", _params(DISTRIBUTED_CASES))
def test_distributed_attention_rejects_bad_input(group_of_one, fn, change, exc, expected):
    kw = _shards()
    kw.update(change(kw))
    with raises_naming(exc, *expected):
        fn(**kw)


# --------------------------------------------------------------------------------------------------
# the paged KV cache
# --------------------------------------------------------------------------------------------------

def _cache(**kw):
    return mk.kv_cache.PagedKVCache(**{"num_pages": 4, "page_size": 16, "num_kv_heads": 1, "head_dim": 16,
                                       "dtype": torch.float32, **kw})


KV_CACHE_CASES = [
    ("num_pages_str", lambda: _cache(num_pages="4"), TypeError, ("num_pages",)),
    ("num_pages_0", lambda: _cache(num_pages=0), ValueError, ("num_pages",)),
    ("page_size_float", lambda: _cache(page_size=16.0), TypeError, ("page_size",)),
    ("page_size_24", lambda: _cache(page_size=24), ValueError, ("page_size",)),
    ("num_kv_heads_bool", lambda: _cache(num_kv_heads=True), TypeError, ("num_kv_heads",)),
    ("head_dim_negative", lambda: _cache(head_dim=-16), ValueError, ("head_dim",)),
    ("max_pages_per_seq_0", lambda: _cache(max_pages_per_seq=0), ValueError, ("max_pages_per_seq",)),
    ("quantize_fp8", lambda: _cache(quantize="fp8"), ValueError, ("quantize",)),
    ("dtype_int8", lambda: _cache(dtype=torch.int8), TypeError, ("dtype",)),
    ("dtype_str", lambda: _cache(dtype="float16"), TypeError, ("dtype",)),
    ("append_k_list", lambda: _append(k=[[0.0]]), TypeError, ("k",)),
    ("append_k_int32", lambda: _append(k=torch.zeros(1, 1, 3, 16, dtype=torch.int32, device=DEV)), TypeError,
     ("k",)),
    ("append_v_head_dim", lambda: _append(v=rand(1, 1, 3, 8, seed=3)), ValueError, ("v",)),
    ("append_k_3d", lambda: _append(k=rand(1, 3, 16, seed=2)), ValueError, ("k",)),
    ("append_k_on_meta", lambda: _append(k=torch.zeros(1, 1, 3, 16, device="meta")), ValueError, ("k",)),
    ("append_kv_lengths", lambda: _append(v=rand(1, 1, 2, 16, seed=3)), ValueError, ("k", "v")),
    ("append_seq_ids_repeated", lambda: _append(seq_ids=[0, 0], k=rand(2, 1, 3, 16, seed=2),
                                                v=rand(2, 1, 3, 16, seed=3)), ValueError, ("seq_ids",)),
    ("dequantize_scale_shape", lambda: mk.kv_cache.dequantize(*_codes_and_scale(cut=True)), ValueError, ("scale",)),
]


def _append(seq_ids=0, **tensors):
    cache = _cache()
    cache.add(0)
    kw = {"k": rand(1, 1, 3, 16, seed=2), "v": rand(1, 1, 3, 16, seed=3), **tensors}
    cache.append(seq_ids, kw["k"], kw["v"])


def _codes_and_scale(cut=False):
    codes, scale = mk.kv_cache.quantize_int8(rand(1, 1, 4, 16, seed=1))
    return codes, scale[..., :-1] if cut else scale


@pytest.mark.parametrize("build,exc,expected", _params(KV_CACHE_CASES))
def test_kv_cache_rejects_bad_input(build, exc, expected):
    with raises_naming(exc, *expected):
        build()


# --------------------------------------------------------------------------------------------------
# the consistent names
# --------------------------------------------------------------------------------------------------

def test_return_final_state_on_linear_attention():
    kw = make_linear()
    out, state = mk.linear_attention(**kw, return_state=True)
    out2, state2 = mk.linear_attention(**kw, return_final_state=True)
    assert torch.equal(out, out2) and torch.equal(state, state2)
    assert isinstance(mk.linear_attention(**kw, return_final_state=False), torch.Tensor)


def test_return_final_state_on_selective_scan():
    kw = make_scan()
    out, last = mk.selective_scan(**kw, return_last_state=True)
    out2, last2 = mk.selective_scan(**kw, return_final_state=True)
    assert torch.equal(out, out2) and torch.equal(last, last2)
    assert isinstance(mk.selective_scan(**kw, return_final_state=False), torch.Tensor)


@pytest.mark.parametrize("scale", [None, 0.5, 2])
def test_scale_on_decode_attention(scale):
    kw = make_decode()
    d = kw["q"].shape[-1]
    got = mk.decode_attention(**kw, scale=scale)
    # the reference's logits are scaled by 1/sqrt(D): fold the requested scale into q
    factor = 1.0 if scale is None else scale * math.sqrt(d)
    want = mk.reference.decode_attention((kw["q"] * factor).double(), kw["k_cache"].double(),
                                         kw["v_cache"].double(), cache_seqlens=kw["cache_seqlens"])
    assert_close(got, want, torch.float32)
    if scale is None:
        assert torch.equal(got, mk.decode_attention(**kw))
