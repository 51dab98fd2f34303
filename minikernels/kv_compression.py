"""Chapter 5: three ways to keep fewer bytes of KV cache, as policies on the paged cache.

A decoding step reads the whole cache, so its time is about bytes / bandwidth; a policy that keeps fewer
bytes per token decodes faster and fits more sequences in the same memory. Each policy here is a
callable ``policy(q, k, v, layer) -> out``, the attention hook of ``tiny_lm`` (``model.set_attention``),
so its effect on a trained model's loss can be measured, and a ``bytes_kept(n)`` that counts the cache
it leaves (``bytes_full(n)``: the uncompressed cache).

* ``StreamingHeads`` (DuoAttention, Xiao et al. 2024): some key/value heads are *retrieval* heads and
  keep the whole cache; the others are *streaming* heads and keep only the first ``sink`` tokens (the
  attention sink of StreamingLLM) and the last ``window``. Which heads stream is chosen by a score:
  ``streaming_scores`` makes one head at a time streaming and measures how far the model's logits move
  on a calibration text, a proxy for the gates DuoAttention learns with a distillation loss.
  ``streaming_decode`` decodes from the paged cache with the pages each head keeps.
* ``KeyChannelPruning`` (ThinK, Xu et al. 2024): each key/value head keeps only the key channels that
  matter most to its queries, ranked by ``||Q[:, c]|| * ||K[:, c]||`` on a calibration text; ``q . k``
  is then summed over the kept channels only (with the full head's softmax scale), and V is intact.
* ``Int8KV``: keys and values stored as int8 codes with one float32 scale per token and head
  (``kv_cache.quantize_int8``); attention runs on the dequantized values, as the fused int8 decode
  kernel computes it.

Attention inside the policies is PyTorch (``scaled_dot_product_attention`` with a mask), since what is
measured is the model's loss, not speed; the kernels of the chapter are ``decode_attention`` with a
``block_table`` and its int8 cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kv_cache import dequantize, quantize_int8

SCALE_BYTES = 4  # an int8 cache's float32 scale, one per token and head


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, elem_bytes: float) -> float:
    """Bytes one token adds to the cache: K and V, in every layer and key/value head."""
    return 2 * n_layers * n_kv_heads * head_dim * elem_bytes


def _sdpa(q, k, v, mask=None, scale=None):
    """Attention of ``q [B, H, N, d]`` over ``k [B, Hkv, N, dk]``, ``v [B, Hkv, N, dv]`` (GQA by repeating
    k and v), causal, or under the boolean ``mask [H, N, N]`` (True: attend) when given."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=scale)


class FullCache:
    """No compression: causal attention over every cached token, in bf16 (2 bytes) by default."""

    name = "full cache"

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, elem_bytes: int = 2):
        self.n_layers, self.n_kv_heads, self.head_dim, self.elem_bytes = n_layers, n_kv_heads, head_dim, elem_bytes

    def __call__(self, q, k, v, layer):
        return _sdpa(q, k, v)

    def bytes_full(self, n: int) -> float:
        return kv_bytes_per_token(self.n_layers, self.n_kv_heads, self.head_dim, self.elem_bytes) * n

    def bytes_kept(self, n: int) -> float:
        return self.bytes_full(n)

    def fraction_kept(self, n: int) -> float:
        return self.bytes_kept(n) / self.bytes_full(n)


# --------------------------------------------------------------------------------------------------
# streaming heads (DuoAttention)
# --------------------------------------------------------------------------------------------------

def sink_pages(sink: int, page_size: int) -> int:
    """Pages that hold the first ``sink`` tokens (a streaming head keeps whole pages)."""
    return -(-sink // page_size)


def streaming_mask(n: int, sink: int, window: int, page_size: int = 1, device=None) -> torch.Tensor:
    """Which keys a streaming head's query attends to, ``[n, n]`` bool (query i, key j): causal, and
    key j lies in the sink pages (the first ``sink_pages * page_size`` tokens) or in a page at or after
    the one holding token ``i - window + 1``, the first of the recent window. ``page_size = 1``: exactly
    the first ``sink`` and the last ``window`` tokens; a larger page keeps whole pages, as the paged
    cache does (``streaming_block_table``)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    in_sink = j < sink_pages(sink, page_size) * page_size
    recent = j // page_size >= torch.div(i - window + 1, page_size, rounding_mode="floor")
    return (j <= i) & (in_sink | recent)


def kept_tokens(length: int, sink: int, window: int, page_size: int = 1) -> int:
    """How many of ``length`` cached tokens a streaming head keeps for its next query (position
    ``length - 1``): the sink pages and the pages from the one holding token ``length - window`` on."""
    first_recent = max((length - window) // page_size, 0)
    if first_recent <= sink_pages(sink, page_size):
        return length
    return sink_pages(sink, page_size) * page_size + length - first_recent * page_size


class StreamingHeads(FullCache):
    """DuoAttention's split: key/value head ``h`` of layer ``l`` is a streaming head where
    ``streaming[l, h]`` is True (it keeps ``sink`` + ``window`` tokens, in whole pages of ``page_size``),
    a retrieval head (the whole cache) where False."""

    def __init__(self, streaming: torch.Tensor, head_dim: int, sink: int = 16, window: int = 64,
                 page_size: int = 16, elem_bytes: int = 2):
        streaming = torch.as_tensor(streaming, dtype=torch.bool)
        if streaming.dim() != 2:
            raise ValueError(f"streaming must be a bool [n_layers, n_kv_heads] tensor, got shape "
                             f"{tuple(streaming.shape)}")
        super().__init__(streaming.shape[0], streaming.shape[1], head_dim, elem_bytes)
        self.streaming, self.sink, self.window, self.page_size = streaming, sink, window, page_size
        self.name = f"streaming heads ({int(streaming.sum())} of {streaming.numel()})"

    def __call__(self, q, k, v, layer):
        heads = self.streaming[layer]
        if not heads.any():
            return _sdpa(q, k, v)
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        stream = streaming_mask(n, self.sink, self.window, self.page_size, q.device)
        per_kv = torch.stack([stream if s else causal for s in heads.tolist()])
        return _sdpa(q, k, v, per_kv.repeat_interleave(q.shape[1] // k.shape[1], dim=0))

    def bytes_kept(self, n: int) -> float:
        per_head_token = 2 * self.head_dim * self.elem_bytes
        n_stream = int(self.streaming.sum())
        n_full = self.streaming.numel() - n_stream
        return per_head_token * (n_full * n + n_stream * kept_tokens(n, self.sink, self.window, self.page_size))


@torch.no_grad()
def streaming_scores(model, windows: torch.Tensor, sink: int = 16, window: int = 64,
                     page_size: int = 16) -> torch.Tensor:
    """``[n_layers, n_kv_heads]``: for each key/value head alone made streaming, the relative distance
    ``||logits' - logits|| / ||logits||`` between the model's logits and the full model's on the
    calibration ``windows`` (byte ids ``[B, N]``). DuoAttention learns a gate per head by distillation,
    the distance between the full and the mixed model's last hidden states; this measures the same
    distance one head at a time, with no training (heads interact, which it ignores). Low: the head
    can stream."""
    cfg = model.cfg
    saved = model.attention
    try:
        model.set_attention(FullCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim))
        full = model(windows).float()
        scores = torch.zeros(cfg.n_layers, cfg.n_kv_heads)
        for layer in range(cfg.n_layers):
            for head in range(cfg.n_kv_heads):
                streaming = torch.zeros(cfg.n_layers, cfg.n_kv_heads, dtype=torch.bool)
                streaming[layer, head] = True
                model.set_attention(StreamingHeads(streaming, cfg.head_dim, sink, window, page_size))
                scores[layer, head] = (model(windows).float() - full).norm() / full.norm()
    finally:
        model.set_attention(saved)
    return scores


def choose_streaming(scores: torch.Tensor, n_streaming: int) -> torch.Tensor:
    """Mark the ``n_streaming`` heads of lowest score as streaming: bool, the shape of ``scores``."""
    if not 0 <= n_streaming <= scores.numel():
        raise ValueError(f"n_streaming must lie in [0, {scores.numel()}], got {n_streaming}")
    streaming = torch.zeros(scores.numel(), dtype=torch.bool)
    streaming[scores.flatten().argsort()[:n_streaming]] = True
    return streaming.view(scores.shape)


def streaming_block_table(pages: list[int], length: int, sink: int, window: int,
                          page_size: int) -> tuple[list[int], int]:
    """What a streaming head reads of a sequence whose ``length`` tokens lie in ``pages`` (its row of
    the block table): the sink pages then the recent pages, and how many tokens they hold. Every page
    but the last is full, so the two lists, joined, are a block table the decode kernel reads as it is."""
    first_recent = max((length - window) // page_size, 0)
    n_sink = sink_pages(sink, page_size)
    used = -(-length // page_size)
    if first_recent <= n_sink:
        return list(pages[:used]), length
    return list(pages[:n_sink]) + list(pages[first_recent:used]), kept_tokens(length, sink, window, page_size)


@torch.no_grad()
def streaming_decode(q, k_pages, v_pages, block_table, cache_seqlens, streaming, sink: int, window: int):
    """Decode ``q [B, H, 1, D]`` from a paged cache (``decode_attention``'s layout) where the key/value
    heads marked in ``streaming [Hkv]`` see only their sink and recent pages: two calls of
    ``mk.decode_attention``, one over the retrieval heads with the full block table, one over the
    streaming heads with each sequence's reduced table. One new token a sequence (Nq = 1): the reduced
    table keeps the pages the last position sees. A run of adjacent heads is passed as a view of the
    pools; scattered heads are gathered (a copy of their share of the pools)."""
    from .decode import decode_attention

    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"streaming_decode takes one new token a sequence: q [B, H, 1, D], got {tuple(q.shape)}")
    streaming = torch.as_tensor(streaming, dtype=torch.bool).cpu()
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    group = q.shape[1] // hkv
    out = torch.empty_like(q)
    lengths = cache_seqlens.tolist()
    for stream in (False, True):
        kv_heads = [h for h in range(hkv) if bool(streaming[h]) == stream]
        if not kv_heads:
            continue
        q_heads = [h * group + g for h in kv_heads for g in range(group)]
        table, seqlens = block_table, cache_seqlens
        if stream:
            rows = [streaming_block_table(block_table[b].tolist(), n, sink, window, page_size)
                    for b, n in enumerate(lengths)]
            width = max(1, max(len(r) for r, _ in rows))
            table = torch.tensor([r + [0] * (width - len(r)) for r, _ in rows], dtype=torch.int32,
                                 device=q.device)
            seqlens = torch.tensor([n for _, n in rows], dtype=torch.int32, device=q.device)
        lo, hi = kv_heads[0], kv_heads[-1] + 1
        if hi - lo == len(kv_heads):  # adjacent heads: a view, no copy
            k_sel, v_sel = k_pages[:, :, lo:hi], v_pages[:, :, lo:hi]
        else:
            idx = torch.tensor(kv_heads, device=q.device)
            k_sel, v_sel = k_pages.index_select(2, idx), v_pages.index_select(2, idx)
        out[:, q_heads] = decode_attention(q[:, q_heads], k_sel, v_sel, seqlens, block_table=table)
    return out


# --------------------------------------------------------------------------------------------------
# key-channel pruning (ThinK)
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def channel_scores(model, windows: torch.Tensor) -> torch.Tensor:
    """``[n_layers, n_kv_heads, head_dim]``: ThinK's query-driven importance of key channel c of each
    key/value head, ``||Q[:, c]|| * ||K[:, c]||`` (the Frobenius norm of channel c's term
    ``Q[:, c] K[:, c]^T`` of the logits), with Q the rotated queries of the head's whole group and K its
    rotated keys, over every position of the calibration ``windows``."""
    from .tiny_lm import queries_keys

    cfg, saved = model.cfg, model.attention
    try:  # the q and k do not depend on the attention backend: take the fastest on any device
        captured = queries_keys(model.set_attention(FullCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)), windows)
    finally:
        model.set_attention(saved)
    scores = []
    for q, k in captured:  # q [B, H, N, d], k [B, Hkv, N, d]
        b, h, n, d = q.shape
        hkv = k.shape[1]
        q_norm = q.float().view(b, hkv, h // hkv, n, d).transpose(0, 1).reshape(hkv, -1, d).norm(dim=1)
        k_norm = k.float().transpose(0, 1).reshape(hkv, -1, d).norm(dim=1)
        scores.append(q_norm * k_norm)
    return torch.stack(scores)


def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` channels of highest score of each head, in increasing order: long ``[..., keep]``."""
    if not 1 <= keep <= scores.shape[-1]:
        raise ValueError(f"keep must lie in [1, {scores.shape[-1]}], got {keep}")
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


def gather_channels(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """``x [B, Hx, N, d]`` restricted to the channels ``[Hkv, keep]`` of each head's key/value head
    (head h uses row ``h // (Hx / Hkv)``): ``[B, Hx, N, keep]``."""
    idx = channels.to(x.device).repeat_interleave(x.shape[1] // channels.shape[0], dim=0)
    return x.gather(-1, idx[None, :, None, :].expand(x.shape[0], -1, x.shape[2], -1))


class KeyChannelPruning(FullCache):
    """ThinK: key/value head h of layer l keeps the key channels ``channels[l, h]`` (``[n_layers, n_kv_heads,
    keep]``); the logits are ``q . k`` over those channels, scaled by ``1/sqrt(head_dim)`` as before, and
    V is kept whole."""

    def __init__(self, channels: torch.Tensor, head_dim: int, elem_bytes: int = 2):
        super().__init__(channels.shape[0], channels.shape[1], head_dim, elem_bytes)
        self.channels, self.keep = channels, channels.shape[-1]
        self.name = f"key channels ({self.keep} of {head_dim})"

    def __call__(self, q, k, v, layer):
        channels = self.channels[layer]
        return _sdpa(gather_channels(q, channels), gather_channels(k, channels), v,
                     scale=1 / math.sqrt(self.head_dim))

    def bytes_kept(self, n: int) -> float:
        return self.n_layers * self.n_kv_heads * n * (self.keep + self.head_dim) * self.elem_bytes


def pruned_decode(q, k_kept, v_cache, channels, cache_seqlens=None, scale=None):
    """Reference decode over a pruned key cache, in float64: ``q [B, H, Nq, D]``, ``k_kept [B, Hkv, Nmax,
    keep]`` (the kept channels, ``channels [Hkv, keep]``), ``v_cache [B, Hkv, Nmax, Dv]``; the query's
    other channels are dropped, and key t of sequence b is used while ``t < cache_seqlens[b]``."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k_kept.shape[1]
    qk = gather_channels(q, channels).double()
    s = qk @ k_kept.double().repeat_interleave(group, 1).transpose(-1, -2) * scale
    if cache_seqlens is not None:
        dead = torch.arange(k_kept.shape[2], device=q.device)[None, :] >= cache_seqlens[:, None].to(q.device)
        s = s.masked_fill(dead[:, None, None, :], -math.inf)
    return s.softmax(-1) @ v_cache.double().repeat_interleave(group, 1)


# --------------------------------------------------------------------------------------------------
# int8 quantization
# --------------------------------------------------------------------------------------------------

def fake_quantize_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the int8 cache's values (codes times per-row scale), in ``x``'s dtype."""
    return dequantize(*quantize_int8(x), dtype=x.dtype)


class Int8KV(FullCache):
    """Keys and values stored as int8 with a float32 scale per token and head: attention sees
    ``dequantize(quantize_int8(k))`` and the same for v."""

    name = "int8 K and V"

    def __call__(self, q, k, v, layer):
        return _sdpa(q, fake_quantize_int8(k), fake_quantize_int8(v))

    def bytes_kept(self, n: int) -> float:
        return 2 * self.n_layers * self.n_kv_heads * n * (self.head_dim + SCALE_BYTES)


# --------------------------------------------------------------------------------------------------
# measuring a policy: loss and retrieval on a byte-level model
# --------------------------------------------------------------------------------------------------

def retrieval_positions(window: torch.Tensor, match: int = 8, min_distance: int = 64) -> torch.Tensor:
    """Bool ``[N - 1]`` over the targets of ``window`` (``N`` byte ids; target t is byte ``t + 1``,
    predicted from bytes ``0..t``): True where the ``match`` bytes ending at t occurred before, their
    latest earlier occurrence (ending at s < t) was followed by the same byte as the target, and lies
    more than ``min_distance`` bytes back (t - s > min_distance). The answer is a copy from far in the
    context: a model that predicts it reads an old part of its cache."""
    ids = window.tolist()
    out = torch.zeros(len(ids) - 1, dtype=torch.bool)
    last = {}
    for t in range(match - 1, len(ids) - 1):
        key = tuple(ids[t - match + 1:t + 1])
        s = last.get(key)
        if s is not None and ids[s + 1] == ids[t + 1] and t - s > min_distance:
            out[t] = True
        last[key] = t
    return out


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, policy=None, batch: int = 8, match: int = 8,
             min_distance: int = 64) -> dict:
    """The model under ``policy`` (its attention hook; None: the model's own backend) on ``windows``
    (``[W, N + 1]`` byte ids): ``bits_per_byte`` over every target, and ``retrieval_accuracy``, the
    share of ``retrieval_positions`` whose byte is the model's most likely next byte (and their count)."""
    saved = model.attention
    if policy is not None:
        model.set_attention(policy)
    nats, correct, total, n_targets = 0.0, 0, 0, 0
    try:
        for start in range(0, windows.shape[0], batch):
            w = windows[start:start + batch]
            logits = model(w[:, :-1]).float()
            nats += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
            n_targets += w[:, 1:].numel()
            where = torch.stack([retrieval_positions(x, match, min_distance) for x in w])
            hits = logits.argmax(-1) == w[:, 1:]
            correct += int(hits[where].sum())
            total += int(where.sum())
    finally:
        model.set_attention(saved)
    return {"bits_per_byte": nats / n_targets / math.log(2),
            "retrieval_accuracy": correct / total if total else float("nan"), "retrieval_positions": total}


def windows_of(data: bytes, context: int, count: int | None = None, start: int = 0) -> torch.Tensor:
    """Non-overlapping windows of ``context + 1`` bytes of ``data`` from window ``start`` on (each
    predicts its last ``context`` bytes), at most ``count``: long ``[W, context + 1]``."""
    flat = torch.tensor(list(data), dtype=torch.long)
    n = (len(flat) - 1) // context
    stop = n if count is None else min(n, start + count)
    return torch.stack([flat[w * context:w * context + context + 1] for w in range(start, stop)])
