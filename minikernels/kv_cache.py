"""Chapter 5: a paged KV cache, the memory manager a serving engine keeps beside its attention kernel.

A dense cache reserves ``[Nmax, D]`` per sequence and head for the longest sequence it might see, so
most of it stays empty while requests of all lengths come and go. A paged cache (vLLM's
PagedAttention) holds one pool of fixed-size pages instead: a sequence takes a page when its last one
fills up and gives all of them back when it ends, and a block table maps its logical pages
(positions ``t // page_size``) to physical ones. At most one page per sequence is partly empty.

``PagedKVCache`` is that allocator, small and on the host: it hands out pages, writes the keys and
values of new tokens into them (quantized to int8 if asked) and builds the ``block_table`` and
``cache_seqlens`` that ``mk.decode_attention`` reads::

    cache = PagedKVCache(num_pages=64, page_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append([a, b], k, v)           # k, v [2, Hkv, T, D]: T new tokens of each sequence
    out = cache.attend(q, [a, b])        # = mk.decode_attention(q, cache.k_pages, cache.v_pages, ...)
    cache.free(a)                        # a's pages go back to the pool

``quantize_int8`` and ``dequantize`` are the int8 format the cache and the kernel share: one float32
scale per token and kv head, ``max |x| / 127`` over the head dim (symmetric absmax), and codes
``round(x / scale)`` in [-127, 127].
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from ._backend import device as _backend_device
from ._validate import KERNEL_DTYPES

INT8_MAX = 127  # symmetric codes: -128 is never used, so negating a code never overflows


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` with ``codes * scale[..., None] ~ x``: per row of the last dimension (a token's
    vector in one head), ``scale = max |x| / 127`` (float32, shape ``x.shape[:-1]``) and
    ``codes = round(x / scale)`` (int8 in [-127, 127]). The rounding error of an element is at most
    ``scale / 2``. A row of zeros gets scale 0 and codes 0."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = getattr(x, 'dtype', type(x).__name__)
        raise TypeError(f"x must be a floating-point tensor (quantize_int8), got {got}")
    if x.dim() == 0:
        raise ValueError("quantize_int8 needs at least one dimension (the vectors are rows of the last one)")
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / INT8_MAX if x.shape[-1] else xf.new_zeros(x.shape[:-1])
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # a zero row: codes 0 (not 0/0)
    codes = torch.round(xf / safe[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes * scale[..., None]`` in ``dtype``: the values an int8 cache stands for."""
    if codes.shape[:-1] != scale.shape:
        raise ValueError(f"scale must have shape codes.shape[:-1] = {tuple(codes.shape[:-1])}, "
                         f"got {tuple(scale.shape)}")
    return (codes.to(torch.float32) * scale.to(torch.float32)[..., None]).to(dtype)


class OutOfPagesError(RuntimeError):
    """The pool has fewer free pages than an ``append`` needs (nothing was written): a serving engine
    would now pause or evict a sequence and free its pages."""


class PagedKVCache:
    """A pool of ``num_pages`` pages of ``page_size`` tokens (a multiple of 16, as the kernel takes),
    each holding ``num_kv_heads`` heads of ``head_dim`` values for K and for V, and the sequences that
    own them.

    * ``dtype``: float16, bfloat16 or float32, the dtypes ``decode_attention`` reads; what the values
      stand for when they are stored as int8 codes.
    * ``k_pages``, ``v_pages``: ``[num_pages, page_size, num_kv_heads, head_dim]`` of ``dtype``, or of
      int8 with ``quantize="int8"``; then ``k_scale``, ``v_scale`` ``[num_pages, page_size, num_kv_heads]``
      float32 (else None). int8 codes and scales are stored head-major within a page (transposed views,
      for the kernel's reads); ``dtype`` pages are contiguous.
    * ``max_pages_per_seq``: the longest a sequence may grow (in pages), and the width of every
      ``block_table`` (a fixed shape, as a CUDA graph wants); None: no limit, and tables as wide as the
      longest sequence asked about.

    Sequences are identified by ints (``new_sequence`` picks one, ``add`` takes yours). Pages are taken
    from the free pool lowest index first and returned on ``free``; the pool is shared, so any page can
    serve any sequence. Host-side bookkeeping: the pages themselves live on ``device``.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None,
                 max_pages_per_seq: int | None = None, quantize: str | None = None):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if page_size % 16:
            raise ValueError(f"page_size must be a multiple of 16 (decode_attention's smallest key block), got "
                             f"{page_size}")
        if max_pages_per_seq is not None and (isinstance(max_pages_per_seq, bool)
                                              or not isinstance(max_pages_per_seq, int) or max_pages_per_seq < 1):
            raise ValueError(f"max_pages_per_seq must be a positive int or None, got {max_pages_per_seq!r}")
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if dtype not in KERNEL_DTYPES:  # the pages (or, quantized, their dequantized values) are what the kernel reads
            raise TypeError("dtype must be torch.float16, torch.bfloat16 or torch.float32 (the dtypes decode_attention "
                            f"reads), got {dtype!r}")
        self.num_pages, self.page_size, self.num_kv_heads, self.head_dim = num_pages, page_size, num_kv_heads, head_dim
        self.dtype, self.quantize, self.max_pages_per_seq = dtype, quantize, max_pages_per_seq
        self.device = torch.device(device) if device is not None else _backend_device()
        self.k_pages = self._pool()
        self.v_pages = self._pool()
        self.device = self.k_pages.device  # 'cuda' resolved to the card the pages are on ('cuda:0')
        self.k_scale = self._scales() if quantize else None
        self.v_scale = self._scales() if quantize else None
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out the lowest index first
        self._pages: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0

    # ---- sequences -------------------------------------------------------------------------------

    def _pool(self) -> torch.Tensor:
        """``[num_pages, page_size, num_kv_heads, head_dim]`` of the cache's dtype, contiguous (the layout of
        FlashAttention and vLLM); int8 codes are stored head-major within a page (a transposed view), so
        that one head's rows of a page are one run of ``page_size * head_dim`` bytes rather than runs of
        ``head_dim``: 128 bytes at d = 128, a single cache line each."""
        if not self.quantize:
            return torch.zeros(self.num_pages, self.page_size, self.num_kv_heads, self.head_dim, dtype=self.dtype,
                               device=self.device)
        stored = torch.zeros(self.num_pages, self.num_kv_heads, self.page_size, self.head_dim, dtype=torch.int8,
                             device=self.device)
        return stored.transpose(1, 2)

    def _scales(self) -> torch.Tensor:
        """float32 ``[num_pages, page_size, num_kv_heads]``, stored head-major within a page: the decode
        kernel reads one head's scales of a block of keys, contiguous here (token-major storage would
        put them ``num_kv_heads`` floats apart, a 32-byte sector fetched for each 4-byte scale)."""
        stored = torch.zeros(self.num_pages, self.num_kv_heads, self.page_size, dtype=torch.float32,
                             device=self.device)
        return stored.transpose(1, 2)

    def new_sequence(self) -> int:
        """Register an empty sequence under a fresh id and return the id (no page is taken yet)."""
        while self._next_id in self._pages:
            self._next_id += 1
        return self.add(self._next_id)

    def add(self, seq_id: int) -> int:
        """Register an empty sequence under the id ``seq_id`` (an int not in use) and return it."""
        if isinstance(seq_id, bool) or not isinstance(seq_id, int):
            raise TypeError(f"seq_id must be an int, got {type(seq_id).__name__}")
        if seq_id in self._pages:
            raise ValueError(f"sequence {seq_id} already exists")
        self._pages[seq_id], self._lengths[seq_id] = [], 0
        return seq_id

    def free(self, seq_id: int) -> None:
        """End sequence ``seq_id``: its pages go back to the pool (their contents are left as they are,
        and overwritten by whoever takes them next)."""
        self._check_known([seq_id])
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._lengths[seq_id]

    @property
    def sequences(self) -> list[int]:
        """The ids of the live sequences, in the order they were added."""
        return list(self._pages)

    @property
    def pages_free(self) -> int:
        """Pages in the pool that no sequence holds."""
        return len(self._free)

    def length(self, seq_id: int) -> int:
        """Tokens stored for sequence ``seq_id``."""
        self._check_known([seq_id])
        return self._lengths[seq_id]

    def pages(self, seq_id: int) -> list[int]:
        """The physical pages of sequence ``seq_id``, in logical order (a copy)."""
        self._check_known([seq_id])
        return list(self._pages[seq_id])

    @property
    def nbytes(self) -> int:
        """Bytes of the pool: pages, and scales when quantized."""
        tensors = [self.k_pages, self.v_pages] + ([self.k_scale, self.v_scale] if self.quantize else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- writing ---------------------------------------------------------------------------------

    def append(self, seq_ids: int | Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``T`` new tokens at the end of each sequence in ``seq_ids`` (distinct ids; an int is one
        sequence): ``k``, ``v`` ``[len(seq_ids), num_kv_heads, T, head_dim]`` (the layout of
        ``decode_attention``'s dense cache), cast to the cache's dtype or quantized to int8. Takes the
        pages it needs from the pool first; if there are too few (``OutOfPagesError``) or a sequence
        would pass ``max_pages_per_seq`` (``ValueError``), nothing is written."""
        ids = self._ids(seq_ids)
        self._check_known(ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must be distinct, got {ids}")
        want = (len(ids), self.num_kv_heads, None, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor [B, Hkv, T, D], got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if t.dim() != 4 or any(w is not None and s != w for s, w in zip(t.shape, want)):
                raise ValueError(f"{name} must have shape [B, Hkv, T, D] = [{len(ids)}, {self.num_kv_heads}, T, "
                                 f"{self.head_dim}], got {tuple(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, the cache on {self.device}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        steps = k.shape[2]
        if steps == 0 or not ids:
            return
        new_pages = {}
        for s in ids:
            need = -(-(self._lengths[s] + steps) // self.page_size)
            if self.max_pages_per_seq is not None and need > self.max_pages_per_seq:
                raise ValueError(f"sequence {s} would grow to {self._lengths[s] + steps} tokens, {need} pages: more "
                                 f"than max_pages_per_seq={self.max_pages_per_seq}")
            new_pages[s] = need - len(self._pages[s])
        if sum(new_pages.values()) > len(self._free):
            raise OutOfPagesError(f"append needs {sum(new_pages.values())} new pages, the pool has "
                                  f"{len(self._free)} free of {self.num_pages}: free a sequence, or make a larger "
                                  "cache")
        for s in ids:
            self._pages[s].extend(self._free.pop() for _ in range(new_pages[s]))
        # where each new token goes: logical position t -> (page of t // page_size, row t % page_size)
        start = torch.tensor([self._lengths[s] for s in ids])
        pos = start[:, None] + torch.arange(steps)[None, :]  # [B, T]
        table = self._table(ids, max(len(self._pages[s]) for s in ids))
        page = table.gather(1, pos // self.page_size).flatten().to(self.device)
        row = (pos % self.page_size).flatten().to(self.device)
        for t, pages, scales in ((k, self.k_pages, self.k_scale), (v, self.v_pages, self.v_scale)):
            # the pools are buffers: a k or v that requires grad (a model's projection) is stored detached,
            # or the pools would join its graph and keep every step's graph alive
            tokens = t.detach().transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)  # [B*T, Hkv, D]
            if self.quantize:
                codes, scale = quantize_int8(tokens)
                pages[page, row], scales[page, row] = codes, scale
            else:
                pages[page, row] = tokens.to(self.dtype)
        for s in ids:
            self._lengths[s] += steps

    # ---- what the kernel reads -------------------------------------------------------------------

    def block_table(self, seq_ids: int | Sequence[int]) -> torch.Tensor:
        """int32 ``[B, max_pages]`` on the cache's device: row b lists the pages of ``seq_ids[b]`` in
        order, then 0 (entries past a sequence's pages are never read). ``max_pages``:
        ``max_pages_per_seq`` if set, else the most pages any of these sequences holds (at least 1)."""
        ids = self._ids(seq_ids)
        self._check_known(ids)
        width = self.max_pages_per_seq or max([1] + [len(self._pages[s]) for s in ids])
        return self._table(ids, width).to(device=self.device, dtype=torch.int32)

    def seqlens(self, seq_ids: int | Sequence[int]) -> torch.Tensor:
        """int32 ``[B]`` on the cache's device: the tokens stored for each of ``seq_ids``."""
        ids = self._ids(seq_ids)
        self._check_known(ids)
        return torch.tensor([self._lengths[s] for s in ids], dtype=torch.int32, device=self.device)

    def attend(self, q: torch.Tensor, seq_ids: int | Sequence[int], causal: bool = False, *,
               scale: float | None = None, num_splits: int | None = None) -> torch.Tensor:
        """``mk.decode_attention`` of ``q`` ``[B, H, Nq, D]`` over the cached tokens of ``seq_ids``:
        the pages, this block table and these lengths (and the scales, when quantized)."""
        from .decode import decode_attention

        ids = self._ids(seq_ids)
        if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[0] != len(ids):
            raise ValueError(f"q has a batch of {q.shape[0]} but {len(ids)} sequence id(s) were given: q needs one "
                             "entry per sequence, in the order of seq_ids")
        return decode_attention(q, self.k_pages, self.v_pages, self.seqlens(ids), num_splits, causal,
                                scale=scale, block_table=self.block_table(ids), k_scale=self.k_scale,
                                v_scale=self.v_scale)

    def gather(self, seq_ids: int | Sequence[int], dtype: torch.dtype | None = None):
        """The cached keys and values of ``seq_ids`` as dense ``[B, Hkv, Lmax, D]`` tensors (dequantized;
        zeros past each sequence's length) in ``dtype`` (default: the cache's): the dense cache the
        pages stand for."""
        ids = self._ids(seq_ids)
        self._check_known(ids)
        dtype = dtype or self.dtype
        longest = max([0] + [self._lengths[s] for s in ids])
        out = []
        for pages, scales in ((self.k_pages, self.k_scale), (self.v_pages, self.v_scale)):
            dense = torch.zeros(len(ids), self.num_kv_heads, longest, self.head_dim, dtype=dtype, device=self.device)
            for b, s in enumerate(ids):
                n, idx = self._lengths[s], torch.tensor(self._pages[s], dtype=torch.long, device=self.device)
                rows = pages[idx].flatten(0, 1)[:n]  # [n, Hkv, D]
                if self.quantize:
                    rows = dequantize(rows, scales[idx].flatten(0, 1)[:n], dtype)
                dense[b, :, :n] = rows.transpose(0, 1).to(dtype)
            out.append(dense)
        return tuple(out)

    # ---- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _ids(seq_ids) -> list[int]:
        """One id or several (ints, numpy or 0-d torch integers, or an integer tensor or array) as ints."""
        if hasattr(seq_ids, "tolist"):  # a tensor, or a numpy scalar or array: Python numbers (bools stay bools)
            seq_ids = seq_ids.tolist()
        ids = [seq_ids] if isinstance(seq_ids, numbers.Integral) else seq_ids
        try:
            ids = list(ids)
        except TypeError:
            raise TypeError(f"seq_ids must be a sequence id (an int) or several, got "
                            f"{type(seq_ids).__name__}") from None
        out = []
        for s in ids:
            s = s.tolist() if hasattr(s, "tolist") else s  # a 0-d tensor or numpy integer: a Python number
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise TypeError(f"seq_ids must be ints, got {type(s).__name__} {s!r}")
            out.append(int(s))
        return out

    def _check_known(self, ids: list[int]) -> None:
        unknown = [s for s in ids if s not in self._pages]
        if unknown:
            raise KeyError(f"unknown sequence(s) {unknown}: add them with new_sequence() or add(seq_id) first "
                           f"(live: {self.sequences})")

    def _table(self, ids: list[int], width: int) -> torch.Tensor:
        """int64 [len(ids), width] on the host: each sequence's pages, then zeros."""
        table = torch.zeros(len(ids), width, dtype=torch.long)
        for b, s in enumerate(ids):
            table[b, :len(self._pages[s])] = torch.tensor(self._pages[s], dtype=torch.long)
        return table
