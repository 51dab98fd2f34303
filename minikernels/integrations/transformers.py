"""minikernels as an attention backend of Hugging Face transformers: ``attn_implementation="minikernels"``.

    import minikernels.integrations.transformers as mk_hf
    mk_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="minikernels")

transformers calls one attention function per layer with ``query [B, H, Nq, D]`` and ``key``, ``value``
``[B, Hkv, Nk, D]``. With a KV cache, ``key`` and ``value`` hold the whole cache and the queries are its
last Nq positions (a static cache hands over all its slots, the empty ones after them too). The mask it
passes is made by the mask function registered under the same name: ours hands over the 2-D padding
mask ``[B, Nk]`` (True = a real token), as flash_attention_2's does, so the kernels know which keys are
real without a ``[B, Nq, Nk]`` mask being built; without padding it is None, or, for a static cache,
all True over the filled slots. In cross-attention the mask is the encoder's: it masks keys only.

Where each call goes:

- no padding: ``flash_attention`` (prefill and training; causal, grouped-query heads, the model's scale);
- a padded batch: the real tokens are gathered into packed sequences, run through
  ``flash_attention_varlen`` and scattered back (under causal attention padded query positions get
  zeros, as with flash_attention_2; without it, in an encoder or cross-attention, every query is
  kept and attends to the real keys, as with sdpa);
- one query row with no gradient wanted (a decode step of ``generate``): ``decode_attention``; in a
  padded batch, one call with each sequence's span of real keys (``cache_leftpad`` to ``cache_seqlens``),
  or per sequence where a sequence's real keys are not one span.

Anything else raises ``NotImplementedError`` naming the feature (a custom 4-D mask, a sliding window
narrower than the keys, attention dropout, soft-capping, sinks, position biases, packed sequences,
``output_attentions``), so that no part of a model's attention is silently dropped.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

from ..decode import decode_attention
from ..flash import flash_attention
from ..varlen import flash_attention_varlen

NAME = "minikernels"
MIN_TRANSFORMERS = "4.56"  # tested from here; per-implementation mask functions (AttentionMaskInterface)

try:
    from transformers import AttentionInterface, masking_utils
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
except ImportError as error:  # older releases build one 4-D mask for every implementation
    raise ImportError(f"minikernels' attention backend needs transformers>={MIN_TRANSFORMERS}, "
                      f"found {transformers.__version__}") from error
# full attention (encoders, cross-attention, or config.is_causal=False), named in later releases
_BIDIRECTIONAL_MASK = getattr(masking_utils, "bidirectional_mask_function", None)
_PLAIN_MASKS = {causal_mask_function, _BIDIRECTIONAL_MASK} - {None}

__all__ = ["NAME", "Kernels", "attention_forward", "attention_function", "padding_mask", "register"]


@dataclass(frozen=True)
class Kernels:
    """The kernels an attention function calls, with minikernels' signatures: ``flash`` for prefill and
    training, ``decode`` for single-token steps, ``varlen`` for padded batches (None: one ``flash``
    call per sequence instead, equally exact)."""
    flash: Callable = flash_attention
    decode: Callable = decode_attention
    varlen: Callable | None = flash_attention_varlen


_MINIKERNELS = Kernels()


def register(name: str = NAME, kernels: Kernels | None = None) -> str:
    """Register an attention function and its mask function under ``name`` (idempotent); returns
    ``name``. Afterwards ``from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` runs every attention layer on minikernels. ``kernels``
    swaps what is called (e.g. wrappers that count calls); the default is minikernels' own."""
    AttentionInterface.register(name, attention_forward if kernels is None else attention_function(kernels))
    AttentionMaskInterface.register(name, padding_mask)
    return name


# --------------------------------------------------------------------------------------------------
# the mask: the 2-D padding mask, after checking that the model asks for nothing more
# --------------------------------------------------------------------------------------------------

def _unsupported(feature: str) -> NotImplementedError:
    return NotImplementedError(f"attn_implementation='{NAME}' does not support {feature}; "
                               "use attn_implementation='sdpa' or 'eager' for this model or input")


def padding_mask(batch_size: int, q_length: int | None = None, kv_length: int | None = None, q_offset=0,
                 kv_offset=0, mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                 cache_position: torch.Tensor | None = None, **kwargs):
    """transformers' mask hook for this backend: returns the padding mask ``[B, kv_length]`` (bool,
    True = real token), a shorter one where the last keys are a static cache's empty slots, or None
    where every key is real. The kernels apply causality themselves, so a pattern beyond causal (or
    full) attention raises instead of being dropped. (Releases before 5 give the queries' positions
    as ``cache_position`` rather than ``q_length`` and ``q_offset``.)"""
    # on the device of the tensors a composed mask function indexes (packing, chunk offsets)
    device = cache_position.device if cache_position is not None else kwargs.get("device", "cpu")
    if mask_function not in _PLAIN_MASKS:
        if cache_position is not None:
            q_positions = cache_position
        else:
            q_positions = torch.arange(q_length, device=device) + torch.as_tensor(q_offset, device=device)
        _check_pattern(batch_size, q_positions, kv_length, kv_offset, mask_function, kwargs.get("config"))
    if attention_mask is None:
        if mask_function is _BIDIRECTIONAL_MASK:
            return None  # an encoder's or cross-attention's keys: every one is an input, no cache slot
        filled = _filled_slots(q_length, q_offset, kv_offset, cache_position)
        # a static cache hands over kv_length slots, of which only the first `filled` hold a token;
        # every sequence has filled the same ones, so a mask of that length tells the kernels where to stop
        return None if filled >= kv_length else torch.ones(batch_size, filled, dtype=torch.bool, device=device)
    attention_mask = attention_mask[:, -kv_length:]
    # a mask shorter than the keys comes with a static cache: its slots past the mask hold no token yet
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _filled_slots(q_length, q_offset, kv_offset, cache_position) -> int:
    """How many of the keys hold a token: those up to the last query's position (one host read)."""
    if cache_position is not None:
        end = int(cache_position[-1]) + 1
    elif q_length is not None:
        end = int(q_offset) + q_length
    else:
        raise _unsupported("this version of transformers' mask call (neither cache_position nor q_length given, "
                           "so the filled cache slots are unknown)")
    return end - int(kv_offset)


def _check_pattern(batch_size, q_positions, kv_length, kv_offset, mask_function, config) -> None:
    """Evaluate a mask function the model composed (sliding window, packing, a user's overlay) on the
    whole grid, once per forward: accepted only where it comes out causal or full."""
    device = q_positions.device
    batch = torch.arange(batch_size, device=device)[:, None, None]
    q_length = q_positions.shape[0]
    q_idx = q_positions[None, :, None]
    kv_idx = torch.arange(kv_length, device=device)[None, None, :] + torch.as_tensor(kv_offset, device=device)
    try:
        pattern = mask_function(batch, torch.zeros((), dtype=torch.long, device=device), q_idx, kv_idx)
        pattern = torch.as_tensor(pattern, dtype=torch.bool, device=device).expand(batch_size, q_length, kv_length)
    except Exception as error:  # a function that cannot take index tensors is a custom one
        raise _unsupported("a custom mask function") from error
    causal = (kv_idx <= q_idx).expand_as(pattern)
    if torch.equal(pattern, causal) or bool(pattern.all()):
        return
    window = getattr(config, "sliding_window", None)
    if window is not None and torch.equal(pattern, causal & (q_idx - kv_idx < window)):
        raise _unsupported(f"sliding-window attention narrower than the sequence "
                           f"(sliding_window={window}, {kv_length} keys)")
    raise _unsupported("this attention pattern (packed sequences found in position_ids, block or chunked "
                       "attention, or a custom mask function); only causal or full attention over a padded "
                       "batch is supported")


# --------------------------------------------------------------------------------------------------
# where the real tokens are
# --------------------------------------------------------------------------------------------------

@dataclass
class _Padding:
    """Where the real tokens of a padded batch lie. Read once per mask (it is shared by every layer of
    one forward), at the cost of one host synchronisation."""
    key_rows: torch.Tensor      # batch index of each real key, [total_k], batch-major
    key_cols: torch.Tensor      # its position among the keys
    query_rows: torch.Tensor    # the same for real queries (positions among the Nq queries)
    query_cols: torch.Tensor
    cu_seqlens_k: torch.Tensor  # int32 [B + 1], cumulative real lengths
    cu_seqlens_q: torch.Tensor
    key_cu: list[int]           # the same on the host
    query_cu: list[int]
    key_spans: list[tuple[int, int] | None]  # (start, end) where sequence b's real keys are contiguous
    query_spans: list[tuple[int, int] | None]
    all_real: bool
    # where every sequence's real keys are one span and every query is real (a decode step of a left- or
    # right-padded batch): int32 [B] starts and ends of the spans, for one batched decode_attention call
    key_starts: torch.Tensor | None
    key_ends: torch.Tensor | None


# a few entries (an encoder-decoder's layers alternate between their self- and cross-attention masks):
# (id of the mask, Nq, causal) -> (the mask, weakly; its version; the _Padding)
_padding_cache: dict = {}
_PADDING_CACHE_SIZE = 4


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _spans(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: first real position, one past the last, and the count."""
    n = mask.shape[1]
    as_int = mask.to(torch.int32)
    first = as_int.argmax(1)
    end = n - as_int.flip(1).argmax(1)
    return first, end, as_int.sum(1)


def _read_padding(mask: torch.Tensor, nq: int, causal: bool = True) -> _Padding:
    """``causal``: the queries are the last Nq keys (self-attention over a cache), padded where those
    are. Otherwise (an encoder, or cross-attention, where the mask is the encoder's) the mask says
    nothing about the queries: every query is real, only keys are dropped."""
    entry = (id(mask), nq, causal)
    cached = _padding_cache.get(entry)
    if cached is not None and cached[0]() is mask and cached[1] == mask._version:
        return cached[2]
    queries = mask[:, mask.shape[1] - nq:] if causal else mask.new_ones(mask.shape[0], nq)
    key_rows, key_cols = mask.nonzero(as_tuple=True)
    query_rows, query_cols = queries.nonzero(as_tuple=True)
    key_first, key_end, key_len = _spans(mask)
    query_first, query_end, query_len = _spans(queries)
    host = torch.stack([key_first, key_end, key_len, query_first, query_end, query_len]).tolist()

    def spans(first, end, length):
        # a row is one contiguous span when its count fills first..end (an empty row is the empty span)
        return [(f, e) if e - f == n else None if n else (0, 0) for f, e, n in zip(first, end, length)]

    key_cu = [0, *torch.tensor(host[2]).cumsum(0).tolist()]
    query_cu = [0, *torch.tensor(host[5]).cumsum(0).tolist()]
    key_spans = spans(*host[:3])
    one_span_each = all(span is not None for span in key_spans) and query_cu[-1] == queries.numel()
    starts = torch.tensor([span[0] for span in key_spans], dtype=torch.int32, device=mask.device) \
        if one_span_each else None
    ends = torch.tensor([span[1] for span in key_spans], dtype=torch.int32, device=mask.device) \
        if one_span_each else None
    padding = _Padding(key_rows, key_cols, query_rows, query_cols, _cumulative(key_len), _cumulative(query_len),
                       key_cu, query_cu, key_spans, spans(*host[3:]),
                       all_real=key_cu[-1] == mask.numel(), key_starts=starts, key_ends=ends)
    if len(_padding_cache) >= _PADDING_CACHE_SIZE:
        del _padding_cache[next(iter(_padding_cache))]  # the oldest
    _padding_cache[entry] = (weakref.ref(mask), mask._version, padding)
    return padding


# --------------------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------------------

def _refuse_unsupported(attention_mask, dropout, softcap, kwargs) -> None:
    if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
                                           and attention_mask.dtype == torch.bool):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise _unsupported(f"a custom attention mask (got {shape}; only the 2-D padding mask [batch, keys] of "
                           "a padded batch is taken, as attention_mask=[batch, tokens] of 0/1)")
    if dropout:
        raise _unsupported(f"attention dropout (dropout={dropout} in training): set config.attention_dropout=0.0 "
                           "or call model.eval()")
    if softcap is not None:
        raise _unsupported(f"logit soft-capping (softcap={softcap})")
    for name, feature in [("s_aux", "attention sinks"), ("sinks", "attention sinks"),
                          ("position_bias", "an additive position bias"), ("head_mask", "a head mask"),
                          ("cu_seq_lens_q", "packed sequences (cu_seq_lens_q/cu_seq_lens_k): pad the batch and "
                                            "pass attention_mask instead"),
                          ("cu_seq_lens_k", "packed sequences (cu_seq_lens_q/cu_seq_lens_k): pad the batch and "
                                            "pass attention_mask instead")]:
        if kwargs.get(name) is not None:
            raise _unsupported(feature)
    if kwargs.get("output_attentions"):
        raise _unsupported("output_attentions=True (the attention weights are never formed)")


def _refuse_unsupported_keys(query, key, padded: bool, sliding_window, kwargs) -> None:
    """Checks on the keys that are tokens (a static cache's empty slots cut off)."""
    if sliding_window is not None and key.shape[2] > sliding_window:
        raise _unsupported(f"sliding-window attention narrower than the keys (sliding_window={sliding_window}, "
                           f"{key.shape[2]} keys)")
    # (under padding, generate's position_ids repeat at the pads: no sign of packing there)
    if not padded and query.shape[2] > 1 and _restarts(kwargs.get("position_ids")):
        # transformers reads packing from position_ids only without a cache (a model called with
        # use_cache=True would attend across the packed sequences under sdpa): refuse it either way
        raise _unsupported("packed sequences (position_ids that restart within a row): pad the batch and "
                           "pass attention_mask instead")


_last_position_ids: dict = {}


def _restarts(position_ids: torch.Tensor | None) -> bool:
    """Whether the positions fall back somewhere in a row (sequences packed one after another). Read
    once per forward: every layer gets the same tensor."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return False
    cached = _last_position_ids.get("entry")
    if cached is not None and cached[0]() is position_ids and cached[1] == position_ids._version:
        return cached[2]
    restarts = bool((position_ids[:, 1:] < position_ids[:, :-1]).any())
    _last_position_ids["entry"] = (weakref.ref(position_ids), position_ids._version, restarts)
    return restarts


def attention_function(kernels: Kernels = _MINIKERNELS) -> Callable:
    """transformers' attention hook calling ``kernels``."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                softcap=None, is_causal=None, **kwargs):
        return _attend(kernels, module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                       softcap, is_causal, kwargs)

    forward.__doc__ = attention_forward.__doc__
    return forward


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention hook: ``query [B, H, Nq, D]``, ``key``/``value`` ``[B, Hkv, Nk, D]``;
    returns ``([B, Nq, H, D], None)`` (no attention weights)."""
    return _attend(_MINIKERNELS, module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                   softcap, is_causal, kwargs)


def _attend(kernels: Kernels, module, query, key, value, attention_mask, dropout, scaling, sliding_window,
            softcap, is_causal, kwargs) -> tuple[torch.Tensor, None]:
    _refuse_unsupported(attention_mask, dropout, softcap, kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    # one query row and no gradient: a decode step, where splitting the cache beats tiling queries
    decoding = query.shape[2] == 1 and not (torch.is_grad_enabled() and
                                            any(t.requires_grad for t in (query, key, value)))

    padding = None
    if attention_mask is not None:
        n_mask = attention_mask.shape[1]
        if n_mask > key.shape[2]:
            raise ValueError(f"attention_mask covers {n_mask} keys but there are {key.shape[2]}")
        # a static cache is longer than the mask: the slots past it hold no token yet
        key, value = key[:, :, :n_mask], value[:, :, :n_mask]
        padding = _read_padding(attention_mask, query.shape[2], causal)
        if padding.all_real:
            padding = None
    _refuse_unsupported_keys(query, key, padding is not None, sliding_window, kwargs)

    if padding is None:
        if decoding:
            out = kernels.decode(query, key, value, scale=scaling)
        else:
            out = kernels.flash(query, key, value, causal=causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    # Causality after unpadding: the queries are the last Nq positions, so every real key after the
    # first real query is itself a real query, and the real queries are the last real keys. Packed,
    # query i of a sequence with Nq_b real queries and Nk_b real keys then sees keys j <= i + Nk_b - Nq_b:
    # the kernels' bottom-right causal alignment, exactly the model's causal mask over real tokens.
    # (Without causality every query is kept and sees all its sequence's real keys.)
    if decoding and padding.key_starts is not None:  # the batch at once: each row reads its span of keys
        out = kernels.decode(query, key, value, padding.key_ends, scale=scaling, cache_leftpad=padding.key_starts)
        return out.transpose(1, 2).contiguous(), None
    if decoding:  # a sequence whose real keys have holes: each alone
        return _per_sequence(query, key, value, padding,
                             lambda q, k, v: kernels.decode(q, k, v, scale=scaling)), None
    if kernels.varlen is None:
        return _per_sequence(query, key, value, padding,
                             lambda q, k, v: kernels.flash(q, k, v, causal=causal, scale=scaling)), None
    return _packed(kernels.varlen, query, key, value, padding, causal, scaling), None


def _packed(varlen, query, key, value, padding: _Padding, causal: bool, scale) -> torch.Tensor:
    """Unpad, run the variable-length kernel, re-pad with zeros: ``[B, Nq, H, D]``."""
    batch, heads, nq, d = query.shape
    q = query[padding.query_rows, :, padding.query_cols]  # [total_q, H, D]
    k = key[padding.key_rows, :, padding.key_cols]        # [total_k, Hkv, D]
    v = value[padding.key_rows, :, padding.key_cols]
    lengths_q = [b - a for a, b in zip(padding.query_cu, padding.query_cu[1:])]
    lengths_k = [b - a for a, b in zip(padding.key_cu, padding.key_cu[1:])]
    out = varlen(q, k, v, padding.cu_seqlens_q, padding.cu_seqlens_k, max(lengths_q), max(lengths_k),
                 causal=causal, scale=scale)
    full = query.new_zeros(batch, nq, heads, value.shape[-1])
    return full.index_put((padding.query_rows, padding.query_cols), out)


def _take(x: torch.Tensor, b: int, span, cols: torch.Tensor) -> torch.Tensor:
    """Sequence b's real rows of x ``[B, h, N, D]`` as ``[1, h, n, D]``: a view where they are contiguous."""
    if span is not None:
        return x[b:b + 1, :, span[0]:span[1]]
    return x[b:b + 1].index_select(2, cols)


def _per_sequence(query, key, value, padding: _Padding, attend) -> torch.Tensor:
    """Run ``attend`` on each sequence's real tokens alone, re-padded with zeros: ``[B, Nq, H, D]``."""
    batch, heads, nq, _ = query.shape
    out = query.new_zeros(batch, nq, heads, value.shape[-1])
    for b in range(batch):
        q0, q1 = padding.query_cu[b], padding.query_cu[b + 1]
        k0, k1 = padding.key_cu[b], padding.key_cu[b + 1]
        if q1 == q0:
            continue  # no real query: the whole row stays zero
        q = _take(query, b, padding.query_spans[b], padding.query_cols[q0:q1])
        k = _take(key, b, padding.key_spans[b], padding.key_cols[k0:k1])
        v = _take(value, b, padding.key_spans[b], padding.key_cols[k0:k1])
        piece = attend(q, k, v)[0].transpose(0, 1)  # [n, H, D]
        if padding.query_spans[b] is not None:
            s, e = padding.query_spans[b]
            out[b, s:e] = piece
        else:
            out[b, padding.query_cols[q0:q1]] = piece
    return out
