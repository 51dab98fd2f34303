"""Chapter 2: attention masks at element level and at block level.

An element mask says which keys j each query i may attend to. A block-sparse kernel works on
tiles of ``block_size x block_size`` (query block, key block) and needs, for every query block,
the key blocks to visit, and for each of those whether it is *full* (every element visible: no
mask to apply) or *partial* (some visible: apply the element mask inside the tile). A block that
no element of which is visible is never visited: that is where sparsity turns into speed.

``BlockMask`` is that data structure. Builders evaluate their element rule a few block rows at a
time (never the whole ``q_len x kv_len`` matrix at once) through ``from_mask_fn``; ``causal``,
``sliding_window`` and ``xattention`` know which of their blocks are empty or full, and evaluate only
the partial blocks along the diagonal.
One mask serves every batch and head.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import antidiagonal, planning
from ._backend import device as _backend_device
from ._validate import check_device, check_same_device
from .antidiagonal import expand_heads as _expand_heads

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BlockMask:
    """Which (query block, key block) tiles to visit, and the element mask of the partial ones.

    ``kv_indices[i, :kv_counts[i]]`` are the key blocks query block ``i`` visits, in increasing order
    (the rest of the row is padding, -1). ``partial[i, t]`` says whether visit ``t`` needs the element
    mask, which is ``tiles[tile_index[i, t]]`` (a ``block_size x block_size`` bool tile; -1 for full
    blocks). ``q_indices``, ``q_counts``, ``q_partial``, ``q_tile_index`` list the same visits by key
    block. All integer tensors are int32, on the device the mask was built for.
    """

    q_len: int
    kv_len: int
    block_size: int
    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    partial: torch.Tensor
    tile_index: torch.Tensor
    tiles: torch.Tensor
    # the same visits seen from the key side (for the dK/dV pass): query blocks per key block
    q_indices: torch.Tensor
    q_counts: torch.Tensor
    q_partial: torch.Tensor
    q_tile_index: torch.Tensor

    @property
    def n_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_size)

    @property
    def n_kv_blocks(self) -> int:
        return math.ceil(self.kv_len / self.block_size)

    def visited_blocks(self) -> int:
        return int(self.kv_counts.sum())

    def density(self) -> float:
        """The fraction of all (query block, key block) tiles that are visited."""
        total = self.n_q_blocks * self.n_kv_blocks
        return self.visited_blocks() / total if total else 0.0

    def to_dense(self) -> torch.Tensor:
        """The element mask, bool ``[q_len, kv_len]``."""
        bs = self.block_size
        dense = torch.zeros(self.n_q_blocks * bs, self.n_kv_blocks * bs, dtype=torch.bool,
                            device=self.kv_indices.device)
        counts = self.kv_counts.tolist()
        for qb in range(self.n_q_blocks):
            for t in range(counts[qb]):
                kb = int(self.kv_indices[qb, t])
                tile = self.tiles[int(self.tile_index[qb, t])] if bool(self.partial[qb, t]) else True
                dense[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs] = tile
        return dense[: self.q_len, : self.kv_len]

    @functools.cached_property
    def kernel_layout(self) -> dict[str, torch.Tensor]:
        """The visits as the kernels read them, computed once per mask. Each row lists its full blocks
        first, then its partial blocks whose tile is a diagonal band, then the other partial blocks,
        with where each group ends (``kv_full``, ``kv_band_end``): a kernel runs one loop without an
        element mask, one that draws the band from two numbers, and one that reads the tile (a branch
        inside a single loop would keep Triton from pipelining its loads). Also the order to take the
        rows (columns) in, longest first; the tiles as uint8; and each tile's band ``tile_lo``,
        ``tile_hi``: the tile is ``lo <= c - r <= hi`` at row r, column c (meaningful for band tiles)."""
        is_band, lo, hi = _band_tiles(self.tiles)
        kv_idx, kv_full, kv_band_end, kv_tile = _visit_order(self.kv_indices, self.kv_counts, self.partial,
                                                             self.tile_index, is_band)
        q_idx, q_full, q_band_end, q_tile = _visit_order(self.q_indices, self.q_counts, self.q_partial,
                                                         self.q_tile_index, is_band)
        return {"kv_indices": kv_idx, "kv_full": kv_full, "kv_band_end": kv_band_end, "tile_index": kv_tile,
                "q_order": _longest_first(self.kv_counts),
                "q_indices": q_idx, "q_full": q_full, "q_band_end": q_band_end, "q_tile_index": q_tile,
                "kv_order": _longest_first(self.q_counts), "tiles": self.tiles.to(torch.uint8),
                "tile_lo": lo, "tile_hi": hi}

    def to_block_dense(self) -> torch.Tensor:
        """int8 ``[n_q_blocks, n_kv_blocks]``: 0 skipped, 1 partial, 2 full. For drawing."""
        out = torch.zeros(self.n_q_blocks, self.n_kv_blocks, dtype=torch.int8, device=self.kv_indices.device)
        for qb, count in enumerate(self.kv_counts.tolist()):
            idx = self.kv_indices[qb, :count].long()
            out[qb, idx] = torch.where(self.partial[qb, :count], 1, 2).to(torch.int8)
        return out


def _longest_first(counts):
    """int32 row numbers, most visits first (ties in row order). The GPU starts programs in launch
    order, so a kernel that takes its rows in this order leaves the short ones for the last wave: the
    longest-processing-time-first rule, which flash.py's causal kernels follow by walking rows backwards."""
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


def _band_tiles(tiles: torch.Tensor, group: int = 1024):
    """For each [bs, bs] tile: whether it is exactly a diagonal band {(r, c): lo <= c - r <= hi}
    (causal diagonals, sliding-window edges), and lo, hi (int32; from its visible elements)."""
    n, bs = tiles.shape[0], tiles.shape[-1]
    dev = tiles.device
    is_band = torch.zeros(n, dtype=torch.bool, device=dev)
    lo, hi = (torch.zeros(n, dtype=torch.int32, device=dev) for _ in range(2))
    pos = torch.arange(bs, device=dev, dtype=torch.int32)
    d = pos[None, :] - pos[:, None]  # c - r
    for i in range(0, n, group):  # a group of tiles at a time: the temporaries are [group, bs, bs]
        t = tiles[i:i + group]
        lo_g = torch.where(t, d, bs).flatten(1).amin(1)
        hi_g = torch.where(t, d, -bs).flatten(1).amax(1)
        band = (d >= lo_g[:, None, None]) & (d <= hi_g[:, None, None])
        is_band[i:i + group] = (band == t).flatten(1).all(1) & t.flatten(1).any(1)
        lo[i:i + group], hi[i:i + group] = lo_g, hi_g
    return is_band, lo, hi


def _visit_order(indices, counts, partial, tile_index, is_band):
    """Reorder each row's visits (stably) full blocks first, then band tiles, then other partial
    blocks; return them with where the full ones and the band ones end."""
    slot = torch.arange(indices.shape[1], device=indices.device)[None, :]
    valid = slot < counts[:, None].long()
    band = partial & is_band[tile_index.clamp(min=0).long()] if is_band.numel() else torch.zeros_like(partial)
    kind = torch.where(partial, torch.where(band, 1, 2), 0)  # full 0, band 1, other partial 2
    order = torch.sort(torch.where(valid, kind, 3), dim=1, stable=True).indices  # padding last
    n_full = (valid & ~partial).sum(1).to(torch.int32)
    band_end = n_full + (valid & band).sum(1).to(torch.int32)
    return indices.gather(1, order).contiguous(), n_full, band_end, tile_index.gather(1, order).contiguous()


# --- argument checks: a wrong type raises TypeError, a wrong value ValueError, each naming the argument ---

def _check_bool(name: str, value) -> bool:
    """A flag must be a bool: ``causal="no"`` is truthy, and would silently mean True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_int(name: str, value, least: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a {what} int, got {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be a {what} int, got {value!r}")
    return value


def _check_len(name: str, value) -> int:
    return _check_int(name, value, 0, "non-negative")


def _check_positive(name: str, value) -> int:
    return _check_int(name, value, 1, "positive")


def _check_block_size(block_size) -> int:
    what = "power of two >= 16 (a tile of tl.dot)"
    if _check_int("block_size", block_size, 16, what) & (block_size - 1):
        raise ValueError(f"block_size must be a {what} int, got {block_size!r}")
    return block_size


_NO_META = ("the meta device holds no values, and a BlockMask's sizes (its index lists, its tiles) depend on "
            "which blocks the mask keeps; build it on a real device")


def _check_device_arg(device) -> torch.device:
    """The device a builder builds on: ``None`` (the backend's, ``mk.device()``), a ``torch.device``, a str
    or a CUDA index, as torch takes them; a device that exists and holds values (not ``meta``)."""
    if device is None:
        return _backend_device()
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"device must be a torch.device, a str, an int or None, got {type(device).__name__}")
    shown = repr(str(device) if isinstance(device, torch.device) else device)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device={shown} is not a usable device: {e}") from None
    if dev.type == "meta":
        raise ValueError(f"device={shown}: {_NO_META}")
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index is not None and dev.index >= torch.cuda.device_count())):
        raise ValueError(f"device={shown} is not available here (CUDA devices: {torch.cuda.device_count()}); "
                         f"None builds on minikernels' device ({_backend_device()})")
    return dev


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_not_meta(name: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: {_NO_META}")


def from_dense(mask: torch.Tensor, block_size: int = 64) -> BlockMask:
    """A ``BlockMask`` from a bool element mask ``[q_len, kv_len]``, built on the mask's device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor [q_len, kv_len], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor [q_len, kv_len], got dtype {_dtype_name(mask.dtype)}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be a bool tensor [q_len, kv_len] (2 dimensions), got shape {tuple(mask.shape)}")
    _check_not_meta("mask", mask)
    q_len, kv_len = mask.shape
    # indices past the end (the padding of the last blocks) are clamped here and masked off by from_mask_fn
    rule = lambda i, j: mask[i.clamp(max=max(q_len - 1, 0)), j.clamp(max=max(kv_len - 1, 0))]
    return from_mask_fn(rule, q_len, kv_len, block_size=block_size, device=mask.device)


RULE_ELEMENTS = 1 << 24  # how many (query, key) pairs from_mask_fn asks its rule about at once


def from_mask_fn(mask_fn: MaskFn, q_len: int, kv_len: int, block_size: int = 64,
                 device: torch.device | str | None = None) -> BlockMask:
    """Build a ``BlockMask`` from an element rule ``mask_fn(q_idx, kv_idx) -> bool``, which takes
    broadcastable int64 index tensors (``q_idx [rows, 1]`` and ``kv_idx [1, cols]``, on ``device``) and
    returns a bool tensor ``[rows, cols]`` on that device, or one that broadcasts to it from two
    dimensions (``[rows, 1]``, ``[1, cols]``) or from none (a constant). A one-dimensional result is
    refused: it would broadcast as a row of columns whatever it meant. ``device`` (default
    ``mk.device()``) must hold values: the ``meta`` device is refused, since a BlockMask's sizes depend
    on its values.

    The rule is evaluated a few rows of query blocks at a time (about RULE_ELEMENTS pairs each), so memory
    stays bounded and the device is synchronized once per group of rows, not once per block.
    """
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable, got {type(mask_fn).__name__}")
    q_len, kv_len = _check_len("q_len", q_len), _check_len("kv_len", kv_len)
    bs = _check_block_size(block_size)
    dev = _check_device_arg(device)
    nq, nk = math.ceil(q_len / bs), math.ceil(kv_len / bs)
    cols = torch.arange(nk * bs, device=dev)[None, :]
    visit = torch.zeros(nq, nk, dtype=torch.bool, device=dev)  # any element visible
    full = torch.zeros(nq, nk, dtype=torch.bool, device=dev)  # every existing element visible
    tiles = []  # the element masks of the partial blocks, in row-major block order
    per_call = planning.decide("masks.rule_elements", RULE_ELEMENTS)
    group = max(1, per_call // max(1, bs * nk * bs))  # query-block rows per evaluation of the rule
    for q0 in range(0, nq, group):
        g = min(group, nq - q0)
        rows = torch.arange(q0 * bs, (q0 + g) * bs, device=dev)[:, None]
        allowed = _check_rule_output(mask_fn(rows, cols), rows, cols)
        exists = (rows < q_len) & (cols < kv_len)  # padding past q_len / kv_len does not count
        allowed = allowed.broadcast_to(g * bs, nk * bs) & exists
        blocks = allowed.view(g, bs, nk, bs).permute(0, 2, 1, 3)  # [g, nk, bs, bs]
        seen = blocks.flatten(2).any(2)
        every = (blocks == exists.view(g, bs, nk, bs).permute(0, 2, 1, 3)).flatten(2).all(2) & seen
        visit[q0:q0 + g], full[q0:q0 + g] = seen, every
        tiles.append(blocks[seen & ~every])  # row-major over (row, key block), as tile_id numbers them
    tiles_t = torch.cat(tiles) if tiles else torch.zeros((0, bs, bs), dtype=torch.bool, device=dev)
    return _assemble(q_len, kv_len, bs, visit, full, tiles_t)


def _check_rule_output(allowed, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """What a rule returned for ``rows [R, 1]``, ``cols [1, C]``: a bool tensor on their device that
    broadcasts to ``[R, C]`` from two dimensions (or none)."""
    if not isinstance(allowed, torch.Tensor):
        raise TypeError(f"mask_fn must return a bool tensor, got {type(allowed).__name__}")
    if allowed.dtype != torch.bool:
        raise TypeError(f"mask_fn must return a bool tensor, got dtype {_dtype_name(allowed.dtype)}")
    want = (rows.shape[0], cols.shape[1])
    if allowed.dim() not in (0, 2) or any(got not in (1, w) for got, w in zip(allowed.shape, want)):
        raise ValueError(f"mask_fn returned shape {tuple(allowed.shape)} for q_idx of shape {tuple(rows.shape)} and "
                         f"kv_idx of shape {tuple(cols.shape)}: expected {list(want)} or a shape that broadcasts "
                         f"to it ([{want[0]}, 1], [1, {want[1]}], [])")
    if allowed.device != rows.device:
        raise ValueError(f"mask_fn returned a tensor on {allowed.device}; its indices are on {rows.device}")
    return allowed


def _assemble(q_len: int, kv_len: int, bs: int, visit: torch.Tensor, full: torch.Tensor,
              tiles: torch.Tensor) -> BlockMask:
    """A BlockMask from block-level [nq, nk] visit and full matrices and the tiles of the partial
    blocks (visit & ~full), in row-major block order."""
    partial = visit & ~full
    nq, nk = visit.shape
    # partial blocks are numbered in row-major order, as their tiles were gathered
    tile_id = torch.where(partial, partial.flatten().cumsum(0).view(nq, nk) - 1, -1).to(torch.int32)
    kv_indices, kv_counts, kv_partial, kv_tile = _visits(visit, partial, tile_id)
    q_indices, q_counts, q_partial, q_tile = _visits(visit.T, partial.T, tile_id.T)
    return BlockMask(q_len, kv_len, bs, kv_indices, kv_counts, kv_partial, kv_tile, tiles,
                     q_indices, q_counts, q_partial, q_tile)


def _band_blocks(q_len: int, kv_len: int, bs: int, device, lo: int, hi: int,
                 keep: torch.Tensor | None = None) -> BlockMask:
    """The rule lo <= j - i <= hi (query i, key j), optionally only inside the blocks ``keep`` [nq, nk]
    selects, without asking the rule about every pair. Over a block the differences j - i run without
    gaps from (first key - last query) to (last key - first query): the block is visited if that range
    meets [lo, hi], full if it lies inside, and only the partial blocks (bands along the diagonals)
    get their elements evaluated. Causal masks and sliding windows are such bands."""
    nq, nk = math.ceil(q_len / bs), math.ceil(kv_len / bs)
    qb = torch.arange(nq, device=device)[:, None]
    kb = torch.arange(nk, device=device)[None, :]
    last_q = torch.clamp((qb + 1) * bs, max=q_len) - 1
    last_k = torch.clamp((kb + 1) * bs, max=kv_len) - 1
    least, most = kb * bs - last_q, last_k - qb * bs  # the smallest and largest j - i in the block
    visit = (most >= lo) & (least <= hi)
    full = (least >= lo) & (most <= hi)
    if keep is not None:
        visit, full = visit & keep, full & keep
    part_q, part_k = (visit & ~full).nonzero(as_tuple=True)  # row-major, as _assemble numbers tiles
    offs = torch.arange(bs, device=device)
    i = part_q[:, None, None] * bs + offs[None, :, None]  # [n_partial, bs, 1]
    j = part_k[:, None, None] * bs + offs[None, None, :]  # [n_partial, 1, bs]
    tiles = (j - i >= lo) & (j - i <= hi) & (i < q_len) & (j < kv_len)
    return _assemble(q_len, kv_len, bs, visit, full, tiles)


def _causal_blocks(q_len: int, kv_len: int, bs: int, device, keep: torch.Tensor | None = None) -> BlockMask:
    """The causal rule (query i sees keys j <= i + kv_len - q_len) as a band: j - i from -q_len (below
    any pair) to kv_len - q_len."""
    return _band_blocks(q_len, kv_len, bs, device, -q_len, kv_len - q_len, keep)


def _visits(visit: torch.Tensor, partial: torch.Tensor, tile_id: torch.Tensor):
    """Per row of a [rows, cols] visit matrix: the visited columns in increasing order, padded with
    -1 to the widest row (at least 1 wide); their count; whether each is partial; its tile (or -1)."""
    n_rows, n_cols = visit.shape
    counts = visit.sum(1).to(torch.int32)
    if n_rows == 0 or n_cols == 0:  # nothing to visit: one padding slot per row
        empty_index = torch.full((n_rows, 1), -1, dtype=torch.int32, device=visit.device)
        return empty_index, counts, torch.zeros((n_rows, 1), dtype=torch.bool, device=visit.device), empty_index
    width = max(int(counts.max()), 1)  # at most n_cols
    col = torch.arange(n_cols, device=visit.device).expand(n_rows, n_cols)
    order = torch.where(visit, col, col + n_cols).sort(dim=1).values[:, :width]  # visited first, in order
    used = order < n_cols
    at = torch.where(used, order, 0)
    index = torch.where(used, order, -1).to(torch.int32)
    return index, counts, partial.gather(1, at) & used, torch.where(used, tile_id.gather(1, at), -1).to(torch.int32)


def causal(q_len: int, kv_len: int | None = None, block_size: int = 64, device=None) -> BlockMask:
    """Query i sees keys j <= i + kv_len - q_len (bottom-right aligned, as ``flash_attention``)."""
    q_len = _check_len("q_len", q_len)
    kv_len = q_len if kv_len is None else _check_len("kv_len", kv_len)
    bs = _check_block_size(block_size)
    return _causal_blocks(q_len, kv_len, bs, _check_device_arg(device))


def sliding_window(q_len: int, window: int, causal: bool = True, block_size: int = 64, device=None) -> BlockMask:
    """Query i sees keys j with i - window < j <= i (causal), or |i - j| < window (not causal)."""
    w = _check_positive("window", window)
    q_len = _check_len("q_len", q_len)
    causal = _check_bool("causal", causal)
    bs = _check_block_size(block_size)
    dev = _check_device_arg(device)
    # a band of j - i: [1 - w, 0] (causal) or [1 - w, w - 1]; built block by block (_band_blocks)
    return _band_blocks(q_len, q_len, bs, dev, 1 - w, 0 if causal else w - 1)


def dilated(q_len: int, window: int, dilation: int, causal: bool = True, block_size: int = 64,
            device=None) -> BlockMask:
    """A sliding window that keeps every ``dilation``-th key: j with (i - j) % dilation == 0 and
    i - window * dilation < j <= i (causal), or |i - j| < window * dilation (not causal)."""
    w, d = _check_positive("window", window), _check_positive("dilation", dilation)
    causal = _check_bool("causal", causal)

    def rule(i, j):
        near = ((j <= i) & (j > i - w * d)) if causal else ((j - i).abs() < w * d)
        return near & ((i - j) % d == 0)
    return from_mask_fn(rule, q_len, q_len, block_size, device)


def a_shape(q_len: int, sink: int, window: int, block_size: int = 64, device=None) -> BlockMask:
    """Attention sinks plus a local window ("A-shape", StreamingLLM): causal, and j < sink or
    i - window < j."""
    s, w = _check_len("sink", sink), _check_positive("window", window)
    return from_mask_fn(lambda i, j: (j <= i) & ((j < s) | (j > i - w)), q_len, q_len, block_size, device)


def _neighborhood_1d(q: torch.Tensor, k: torch.Tensor, length: int, kernel: int, dilation: int) -> torch.Tensor:
    """1-D neighborhood attention along one axis: the ``kernel`` positions of q's dilation group
    closest to it, the window shifted (not shrunk) at the borders."""
    group = q % dilation
    group_len = (length - group + dilation - 1) // dilation  # positions with this residue
    pos = q // dilation
    start = (pos - kernel // 2).clamp(min=0)
    start = torch.minimum(start, (group_len - kernel).clamp(min=0))
    kpos = k // dilation
    return (k % dilation == group) & (kpos >= start) & (kpos < start + kernel)


def neighborhood_2d(height: int, width: int, kernel: int, dilation: int = 1, block_size: int = 64,
                    device=None) -> BlockMask:
    """2-D neighborhood attention on a ``height x width`` grid of tokens in row-major order: each
    token sees the ``kernel x kernel`` tokens around it (window clamped at the borders), among the
    tokens whose row and column share its residue modulo ``dilation``."""
    h, w = _check_positive("height", height), _check_positive("width", width)
    k, d = _check_positive("kernel", kernel), _check_positive("dilation", dilation)
    if k * d > min(h, w):
        raise ValueError(f"kernel * dilation = {k * d} must fit the {h} x {w} grid")

    def rule(i, j):
        return (_neighborhood_1d(i // w, j // w, h, k, d) & _neighborhood_1d(i % w, j % w, w, k, d))
    return from_mask_fn(rule, h * w, h * w, block_size, device)


# --- estimated masks -----------------------------------------------------------------------------

_ESTIMATOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    """q [B, H, Nq, D] and k [B, Hkv, Nk, D] of a floating dtype (k is taken in q's), on one device.
    B = 0, H = 0 or N = 0 are allowed (an empty estimate); D = 0 is not."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a floating-point tensor [B, H, N, D], got {type(t).__name__}")
        if t.dtype not in _ESTIMATOR_DTYPES:
            names = ", ".join(_dtype_name(d) for d in _ESTIMATOR_DTYPES)
            raise TypeError(f"{name} must be a floating-point tensor [B, H, N, D] ({names}), "
                            f"got dtype {_dtype_name(t.dtype)}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a floating-point tensor [B, H, N, D], got shape {tuple(t.shape)}")
        if t.shape[-1] == 0:
            raise ValueError(f"{name} must have a head dimension D >= 1, got shape {tuple(t.shape)}")
    hq, hk = q.shape[1], k.shape[1]
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or (hq % hk if hk else hq):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit together: same B and D, "
                         "k heads dividing q heads")
    check_same_device(q=q, k=k)


def vertical_slash(q: torch.Tensor, k: torch.Tensor, n_vertical: int = 64, n_slash: int = 64,
                   last_q: int = 64, block_size: int = 64) -> BlockMask:
    """MInference's vertical-slash pattern, estimated from the last ``last_q`` queries (causal).

    Their attention weights (summed over batch, heads and those queries) score every key column
    ("vertical": a token everyone attends to) and every diagonal offset i - j ("slash": a fixed
    distance everyone attends across). The mask keeps the ``n_vertical`` best columns and the
    ``n_slash`` best diagonals, always including the first key and the main diagonal.
    The mask is built on q's device (any device but ``meta``); the scores are computed in float32.
    No queries or no keys give an empty mask.
    """
    _check_qk(q, k)
    _check_not_meta("q", q)
    n_q, n_k = q.shape[2], k.shape[2]
    n_vertical, n_slash = _check_positive("n_vertical", n_vertical), _check_positive("n_slash", n_slash)
    last_q = min(_check_positive("last_q", last_q), n_q)
    bs = _check_block_size(block_size)
    if n_q == 0 or n_k == 0:  # nothing to score, nothing visible
        return _causal_blocks(n_q, n_k, bs, q.device)
    offset = n_k - n_q
    qs = q[:, :, n_q - last_q:].float()
    ks = _expand_heads(k, q.shape[1]).float()
    s = qs @ ks.transpose(-1, -2) * q.shape[-1] ** -0.5  # [B, H, last_q, n_k]
    rows = torch.arange(n_q - last_q, n_q, device=q.device)[:, None]
    cols = torch.arange(n_k, device=q.device)[None, :]
    s = s.masked_fill(cols > rows + offset, float("-inf"))
    a = torch.softmax(s, dim=-1).sum(dim=(0, 1))  # [last_q, n_k]
    vertical_score = a.sum(0)
    diag = (rows + offset - cols).expand_as(a)  # i - j in the aligned frame, >= 0 where visible
    slash_score = torch.zeros(n_k + n_q, device=q.device).index_add_(
        0, diag.clamp(min=0).flatten(), torch.where(diag >= 0, a, 0.0).flatten())
    keep_col = torch.zeros(n_k, dtype=torch.bool, device=q.device)
    keep_col[vertical_score.topk(min(n_vertical, n_k)).indices] = True
    keep_col[0] = True
    keep_diag = torch.zeros(n_k + n_q, dtype=torch.bool, device=q.device)
    keep_diag[slash_score.topk(min(n_slash, n_k + n_q)).indices] = True
    keep_diag[0] = True

    def rule(i, j):
        d = i + offset - j
        visible = d >= 0
        return visible & (keep_col[j.clamp(max=n_k - 1)] | keep_diag[d.clamp(min=0, max=n_k + n_q - 1)])
    return from_mask_fn(rule, n_q, n_k, bs, q.device)


def _check_antidiagonal_args(q: torch.Tensor, k: torch.Tensor, stride, block_size, causal) -> None:
    _check_qk(q, k)
    _check_positive("stride", stride)
    _check_block_size(block_size)
    _check_bool("causal", causal)
    if block_size % stride:
        raise ValueError(f"stride={stride} must divide block_size={block_size}")


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, stride: int, block_size: int,
                              causal: bool = True) -> torch.Tensor:
    """XAttention's block importance, ``[B, H, n_q_blocks, n_k_blocks]``: within every ``stride x stride``
    patch of QK^T, the sum along its antidiagonal (one strided product per patch instead of
    ``stride^2``); a softmax over those patch scores along each row; then their sum per block.
    Each query block's row sums to its number of rows / stride (softmax rows). float32, on q's device
    (any device, ``meta`` included); k is taken in q's dtype, and bf16 is computed in float32 under the
    interpreter. The product runs in the inputs' dtype elsewhere."""
    _check_antidiagonal_args(q, k, stride, block_size, causal)
    return antidiagonal.reference_block_scores(q, k, stride, block_size, causal)


def xattention(q: torch.Tensor, k: torch.Tensor, stride: int = 8, threshold: float = 0.9,
               block_size: int = 64, causal: bool = True) -> BlockMask:
    """XAttention's estimated block mask: score blocks by their strided antidiagonal sums
    (``antidiagonal_block_scores``, averaged over batch and heads), then keep, for each query block,
    the highest-scoring key blocks until their share of the row's total reaches ``threshold``.
    The diagonal block is always kept when ``causal``; elements keep the causal rule. q and k must be
    on the backend's device (``mk.device()``): the scoring and the ranking run in Triton. No queries or
    no keys give an empty mask; no batch or heads (nothing to score) keep only the diagonal blocks
    (causal), or none."""
    keep = xattention_blocks(q, k, stride, threshold, block_size, causal)
    n_q, n_k = q.shape[2], k.shape[2]
    if causal:  # the kept blocks, with the causal rule's elements: only the diagonal band is evaluated
        return _causal_blocks(n_q, n_k, block_size, q.device, keep=keep)
    # every element of a kept block is visible: all of them are full, no tiles
    return _assemble(n_q, n_k, block_size, keep, keep, torch.zeros((0, block_size, block_size), dtype=torch.bool,
                                                                    device=q.device))


def xattention_blocks(q: torch.Tensor, k: torch.Tensor, stride: int = 8, threshold: float = 0.9,
                      block_size: int = 64, causal: bool = True) -> torch.Tensor:
    """The estimation step of ``xattention``, on the device: bool ``[n_q_blocks, n_k_blocks]``, the
    key blocks each query block keeps (before the element-level causal rule). Ties in score are
    ranked by block index."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a real number in (0, 1], got {type(threshold).__name__}")
    if not 0 < threshold <= 1:  # (NaN too)
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    _check_antidiagonal_args(q, k, stride, block_size, causal)  # (q and k on one device)
    check_device("q", q)  # Triton kernels: on the backend's device (antidiagonal_block_scores runs anywhere)
    # antidiagonal_block_scores and the ranking, in two Triton launches (minikernels/antidiagonal.py)
    return antidiagonal.estimate_blocks(q, k, stride, threshold, block_size, causal)
