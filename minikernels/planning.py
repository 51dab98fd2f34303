"""The planning seam: every choice an op makes about *how* to run (tiles, warps, pipeline stages,
variants of a kernel, how far to cut a sequence), named in one place and overridable from outside.

An op never changes *what* it computes with these choices, only how: so a test can force each
variant at sizes where it would not be chosen (the segmented state pass at N = 64, 16-column tiles in
the softmax, the batch cut into grid slices of one), and a tuning tool can try configurations,
without either patching a private name of a kernel module.

Each op asks ``decide(name, default, *args)``: the override set for ``name`` if there is one, else
``default(*args)`` (or ``default`` itself when it is not callable). An override is a value, or a
function that takes the same arguments as the default. ``CHOICES`` lists every name with what it
decides and what a function override receives. Set overrides for a block of code::

    from minikernels import planning
    with planning.override({"linear.segments": lambda programs, n_chunks, sms: 2}):
        out = mk.linear_attention(q, k, v)   # the state pass now walks in 2 segments

Overrides are process-wide (not thread-local): meant for tests and tuning, not for concurrent use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

CHOICES: dict[str, str] = {
    # row softmax
    "softmax.max_fused_cols": "dtype -> the longest row the forward holds on chip whole (else the online pass)",
    "softmax.max_fused_cols_bwd": "the longest row the backward holds on chip whole",
    "softmax.online_block": "the block of columns the online (long-row) kernels stream",
    # flash attention
    "flash.fwd": "(head_dim, elem_bytes) -> the forward's launch configuration: BLOCK_M, BLOCK_N, num_warps, "
                 "num_stages (and DOT_PREC for float32 when its 3xtf32 tiles do not fit)",
    "flash.dkdv": "(head_dim, elem_bytes) -> the dK/dV kernel's configuration (BLOCK_N keys resident)",
    "flash.dq": "(head_dim, elem_bytes) -> the dQ kernel's configuration (BLOCK_M query rows resident)",
    "flash.max_grid_y": "the most (batch, head) pairs one launch takes (CUDA's limit on a grid's second axis)",
    # variable-length (packed) attention: flash attention's tiles unless overridden
    "varlen.fwd": "(head_dim, elem_bytes) -> the varlen forward's configuration (as flash.fwd)",
    "varlen.dkdv": "(head_dim, elem_bytes) -> the varlen dK/dV kernel's configuration (as flash.dkdv)",
    "varlen.dq": "(head_dim, elem_bytes) -> the varlen dQ kernel's configuration (as flash.dq)",
    "varlen.max_grid_z": "the most sequences one launch takes (CUDA's limit on a grid's third axis)",
    # block-sparse attention
    "block_sparse.fwd": "(block, head_dim, elem_bytes) -> the forward's configuration: SUB rows resident, "
                        "STREAM keys a step, num_warps, num_stages, TMA",
    "block_sparse.dq": "(block, head_dim, elem_bytes) -> the dQ kernel's configuration",
    "block_sparse.dkdv": "(block, head_dim, elem_bytes) -> the dK/dV kernel's configuration",
    "block_sparse.max_grid_y": "the most (batch, head) pairs one launch takes (CUDA's limit on a grid's second "
                               "axis)",
    # decoding
    "decode.split": "(rows, head_dim, elem_bytes) -> the split kernel's configuration: BLOCK_N, num_warps, "
                    "num_stages",
    "decode.num_splits": "(batch_kv_heads, max_len, block_n, device, paged, int8) -> how many pieces the keys "
                         "are split into when the caller does not say",
    "decode.split_int8": "(rows, head_dim, elem_bytes) -> the split kernel's configuration on an int8 cache "
                         "(elem_bytes: the query's): BLOCK_N, num_warps, num_stages",
    "decode.max_grid_y": "the most (sequence, kv head) pairs one launch of the split kernel takes (CUDA's limit "
                         "on a grid's second axis)",
    "decode.pdl": "(device, int8) -> whether the split and merge kernels launch with programmatic dependent "
                  "launch where the GPU has it (Hopper and later; by default for 16-bit caches, not int8)",
    # masks and estimators
    "masks.rule_elements": "how many (query, key) pairs from_mask_fn asks its rule about at once",
    "antidiagonal.tiles": "(head_dim, elem_bytes) -> the scoring kernel's tiles: BLOCK_A, BLOCK_B, D_CHUNK, "
                          "num_warps, num_stages, TMA",
    "antidiagonal.max_grid_y": "the most (batch, head) pairs one launch of the scoring kernel takes (CUDA's "
                               "limit on a grid's second axis)",
    # linear attention (and mk.ssd, which runs on its kernels)
    "linear.max_grid_y": "the most (batch, head) pairs one call of the kernels takes (CUDA's limit on a grid's "
                         "second and third axes)",
    "linear.segments": "(programs, n_chunks, sms) -> how many segments the state pass cuts the sequence into",
    "linear.fused_segments": "(programs, n_chunks, sms) -> how many segments the one-walk passes cut it into",
    "linear.state_grad_segments": "(q, dv, chunk) -> how many segments the reverse state pass cuts it into",
    "linear.fused_max_dk": "the widest Dk that the one-walk passes (state in registers) take",
    "linear.fused_fits": "(q, v, chunk, cfg, value_tiles) -> whether a one-walk pass's tiles fit in shared memory",
    "linear.dqdk_heads": "(heads_per_group, most) -> how many heads one dQ/dK program takes when Q and K are shared",
    "linear.dqdk_unroll_v": "up to how many Dv blocks the dQ/dK kernel unrolls its loop over them (16-bit)",
    # selective scan
    "scan.max_grid_y": "the most batch entries one launch takes (CUDA's limit on a grid's second axis)",
    "scan.fwd_variant": "(n_pad, packed) -> (paired, prep_late): the forward kernel's variant",
    "scan.pack_bf16": "whether bfloat16 B and C reach the forward packed, two steps a 32-bit word",
    "scan.bwd_blocks": "(n_pad, per_group) -> (BD channels, T steps, num_warps) of the backward",
    "scan.bwd_shift": "(n_pad) -> whether the backward shifts the previous step's delta in registers",
    "scan.save_every": "how many steps apart the forward saves the state for the backward",
    "scan.wide_offsets": "(length, bc_len, *tensors) -> whether offsets need 64 bits",
    # every op
    "int32_limit": "the largest element offset a kernel may address with 32-bit offsets (2^31 - 1); an input "
                   "past it is made compact, or refused (a paged decode's page pool past it: 64-bit offsets)",
}

_OVERRIDES: dict[str, Any] = {}


def overridden() -> bool:
    """Whether any choice is overridden now (plans remembered across calls are then not used)."""
    return bool(_OVERRIDES)


def decide(name: str, default: Any, *args: Any) -> Any:
    """The choice ``name``: its override if one is set (a value, or a function called with ``args``),
    else ``default(*args)``, or ``default`` itself if it is not callable."""
    if name in _OVERRIDES:
        chosen = _OVERRIDES[name]
        return chosen(*args) if callable(chosen) else chosen
    return default(*args) if callable(default) else default


@contextlib.contextmanager
def override(choices: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, ``decide(name, ...)`` returns ``choices[name]`` (or calls it, if it is a
    function) for each name given; the previous overrides come back afterwards. Unknown names raise
    KeyError (a typo would otherwise override nothing)."""
    unknown = sorted(set(choices) - set(CHOICES))
    if unknown:
        raise KeyError(f"unknown planning choices {unknown}; the choices are {sorted(CHOICES)}")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(choices)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)

