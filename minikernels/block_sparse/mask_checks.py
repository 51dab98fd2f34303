"""Checking a ``BlockMask`` before a kernel reads it: the kernels follow its indices without bounds
checks, so a mask built by hand is checked first (an index past the end would be an out-of-bounds read)."""

from __future__ import annotations

import dataclasses
import weakref

import torch

from ..masks import BlockMask

MAX_BLOCK_SIZE = 128


# (name, dtype) of a BlockMask's tensors. The kernels follow its indices without bounds checks, so a
# mask built by hand is checked here first: an index past the end would be an out-of-bounds read.
_MASK_TENSORS = (("kv_indices", torch.int32), ("kv_counts", torch.int32), ("partial", torch.bool),
                 ("tile_index", torch.int32), ("tiles", torch.bool), ("q_indices", torch.int32),
                 ("q_counts", torch.int32), ("q_partial", torch.bool), ("q_tile_index", torch.int32))


# id(mask) -> the signature of its tensors when their values were last checked (see _mask_signature)
_CHECKED: dict[int, tuple] = {}


def _check_mask_structure(bm: BlockMask, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
    """Types, shapes, dtypes and devices of ``bm``'s fields against q and k: no host sync. Returns the
    mask, or a copy whose tensors the kernels address as dense arrays made contiguous."""
    if not isinstance(bm, BlockMask):
        raise TypeError(f"block_mask must be a minikernels.masks.BlockMask, got {type(bm).__name__}")
    for name in ("q_len", "kv_len", "block_size"):
        value = getattr(bm, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"block_mask.{name} must be an int, got {type(value).__name__}")
    nq, nk = q.shape[2], k.shape[2]
    if (bm.q_len, bm.kv_len) != (nq, nk):
        raise ValueError(f"block_mask was built for q_len={bm.q_len}, kv_len={bm.kv_len}, "
                         f"but q has Nq={nq} and k has Nk={nk}")
    bs = bm.block_size
    if bs > MAX_BLOCK_SIZE:
        raise ValueError(f"block_mask.block_size={bs} is larger than the kernel's largest "
                         f"tile ({MAX_BLOCK_SIZE}); rebuild the mask with block_size 16, 32, 64 or 128")
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"block_mask.block_size must be a power of two from 16 to {MAX_BLOCK_SIZE}, got {bs}")
    for name, _ in _MASK_TENSORS:
        t = getattr(bm, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"block_mask.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"block_mask is on {t.device} (its {name}), q on {q.device}: build the mask with "
                             f"device={q.device.type!r}")
    for name, dtype in _MASK_TENSORS:
        t = getattr(bm, name)
        if t.dtype != dtype:
            raise TypeError(f"block_mask.{name} must have dtype {str(dtype).replace('torch.', '')}, "
                            f"got {str(t.dtype).replace('torch.', '')}")
    n_tiles = bm.tiles.shape[0] if bm.tiles.dim() == 3 else 0
    expected = {"tiles": (n_tiles, bs, bs)}
    for side, rows in (("kv_", bm.n_q_blocks), ("q_", bm.n_kv_blocks)):
        idx = getattr(bm, f"{side}indices")
        width = idx.shape[1] if idx.dim() == 2 else 1
        if idx.dim() != 2 or width < 1:
            raise ValueError(f"block_mask.{side}indices must be [{rows}, width >= 1], got shape {tuple(idx.shape)}")
        partial, tile = ("partial", "tile_index") if side == "kv_" else ("q_partial", "q_tile_index")
        expected.update({f"{side}indices": (rows, width), f"{side}counts": (rows,), partial: (rows, width),
                         tile: (rows, width)})
    for name, shape in expected.items():
        if tuple(getattr(bm, name).shape) != shape:
            raise ValueError(f"block_mask.{name} must have shape {shape} for q_len={bm.q_len}, kv_len={bm.kv_len} "
                             f"and block_size={bs}, got {tuple(getattr(bm, name).shape)}")
    # the kernels read the counts and the tiles as dense arrays: give them dense ones
    loose = {n: getattr(bm, n).contiguous() for n in ("kv_counts", "q_counts", "tiles")
             if not getattr(bm, n).is_contiguous()}
    return dataclasses.replace(bm, **loose) if loose else bm


def _mask_signature(bm: BlockMask) -> tuple:
    # Which tensors, and how often each was modified in place (torch's version counter): a mask whose
    # values were checked stays checked until one of its tensors changes. Inference tensors keep no
    # version counter: such a mask is checked once (a BlockMask is not meant to change in place).
    return tuple((t.data_ptr(), None if t.is_inference() else t._version)
                 for t in (getattr(bm, name) for name, _ in _MASK_TENSORS))


def _visit_errors(bm: BlockMask, side: str) -> list[str]:
    """What is wrong with one side's visit lists (host sync): counts outside [0, width], counted indices
    outside [0, n_other_blocks) or not increasing, tile numbers outside [0, n_tiles)."""
    idx, counts = getattr(bm, f"{side}indices"), getattr(bm, f"{side}counts")
    partial, tile = (bm.partial, bm.tile_index) if side == "kv_" else (bm.q_partial, bm.q_tile_index)
    n_other = bm.n_kv_blocks if side == "kv_" else bm.n_q_blocks
    other = "n_kv_blocks" if side == "kv_" else "n_q_blocks"
    n_tiles, width = bm.tiles.shape[0], idx.shape[1]
    c = counts.long()
    i = idx.long()
    counted = torch.arange(width, device=idx.device)[None, :] < c[:, None]
    zero = torch.zeros(1, dtype=torch.long, device=idx.device)
    bad = torch.stack([
        torch.cat([zero, c]).min(), torch.cat([zero, c]).max(),
        (counted & ((i < 0) | (i >= n_other))).sum(),
        (counted[:, 1:] & (i[:, 1:] <= i[:, :-1])).sum(),
        (counted & partial & ((tile < 0) | (tile >= n_tiles))).sum(),
        # the layout looks up every tile number (padding too) when there are tiles: none may be past the end
        (tile >= n_tiles).sum() if n_tiles else zero[0],
    ]).tolist()  # one host sync
    lo, hi, out_of_range, unordered, bad_tile, bad_any_tile = bad
    errors = []
    if lo < 0 or hi > width:
        errors.append(f"block_mask.{side}counts must lie in [0, {width}] (the width of {side}indices), "
                      f"got values in [{int(c.min())}, {int(c.max())}]")
    elif out_of_range:
        row = int((counted & ((i < 0) | (i >= n_other))).any(1).nonzero()[0])
        errors.append(f"block_mask.{side}indices must lie in [0, {other}={n_other}) where counted; row {row} "
                      f"lists {idx[row, :c[row]].tolist()}")
    elif unordered:
        row = int((counted[:, 1:] & (i[:, 1:] <= i[:, :-1])).any(1).nonzero()[0])
        errors.append(f"block_mask.{side}indices must increase along each row (each block once); row {row} "
                      f"lists {idx[row, :c[row]].tolist()}")
    name = "tile_index" if side == "kv_" else "q_tile_index"
    if bad_tile or bad_any_tile:
        errors.append(f"block_mask.{name} must lie in [0, {n_tiles}) (the number of tiles) for partial visits, "
                      f"and below {n_tiles} everywhere")
    return errors


def _check_mask_values(bm: BlockMask) -> None:
    """The values the kernels follow: both visit lists in bounds, and the key-side lists (read by the
    backward's dK/dV kernel) the same visits as the query-side ones (read by the forward and dQ)."""
    errors = _visit_errors(bm, "kv_") + _visit_errors(bm, "q_")
    if errors:
        raise ValueError("; ".join(errors))
    nkb, dev = bm.n_kv_blocks, bm.kv_indices.device

    def visits(idx, counts, partial, tile, by_query):
        counted = torch.arange(idx.shape[1], device=dev)[None, :] < counts.long()[:, None]
        rows = torch.arange(idx.shape[0], device=dev)[:, None].expand_as(idx)[counted]
        cols = idx.long()[counted]
        key = rows * nkb + cols if by_query else cols * nkb + rows  # (query block, key block), row-major
        key, order = key.sort()
        part = partial[counted][order]
        return key, part, torch.where(part, tile[counted][order], -1)

    kv = visits(bm.kv_indices, bm.kv_counts, bm.partial, bm.tile_index, True)
    qs = visits(bm.q_indices, bm.q_counts, bm.q_partial, bm.q_tile_index, False)
    if kv[0].shape != qs[0].shape or not all(bool(torch.equal(a, b)) for a, b in zip(kv, qs)):
        raise ValueError("block_mask's key-side lists (q_indices, q_counts, q_partial, q_tile_index; read by the "
                         "backward) must list the same visits, partial flags and tiles as its query-side lists "
                         "(kv_indices, kv_counts, partial, tile_index); build masks with minikernels.masks")


def check_block_mask(bm: BlockMask, q: torch.Tensor, k: torch.Tensor) -> BlockMask:
    """Check ``bm`` against q and k before any kernel follows its indices. The structure is checked on
    every call; the values once per mask (they need a host sync), and again if a tensor of the mask is
    changed in place. Returns the mask the kernels should read."""
    checked = _CHECKED.get(id(bm))
    if checked is not None and (bm.q_len, bm.kv_len) == (q.shape[2], k.shape[2]) \
            and bm.kv_indices.device == q.device and _mask_signature(bm) == checked:
        return bm  # checked before, and unchanged since: the common case costs a few attribute reads
    bm = _check_mask_structure(bm, q, k)
    sig = _mask_signature(bm)
    if _CHECKED.get(id(bm)) == sig:
        return bm
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("block_sparse_attention checks a new BlockMask's indices on the host, which cannot "
                           "happen while a CUDA graph is captured: call it once with this mask before capturing")
    _check_mask_values(bm)
    vars(bm).pop("kernel_layout", None)  # a layout cached before these values were checked is rebuilt from them
    if id(bm) not in _CHECKED:
        weakref.finalize(bm, _CHECKED.pop, id(bm), None)
    _CHECKED[id(bm)] = sig
    return bm
