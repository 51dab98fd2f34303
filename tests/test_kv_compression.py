"""The KV-compression policies of chapter 5 (minikernels.kv_compression): each policy's attention equals
its definition written out in float64, the paged streaming decode equals the streaming mask, the bytes
each policy reports match a count, and the measures (retrieval positions, evaluate) do what they say."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minikernels as mk
from minikernels import kv_compression as kc
from minikernels import tiny_lm
from minikernels.kv_cache import PagedKVCache
from minikernels.testing import assert_close, poisoned, test_dtypes
from minikernels.testing import randn as device_randn

DEVICE = mk.device()


def randn(*shape, **kwargs):
    """Seeded normal samples on the CPU: the policies run in PyTorch wherever the data is, and the
    decode tests move their inputs to the kernel's device themselves."""
    return device_randn(*shape, **kwargs).cpu()


def masked_reference(q, k, v, mask, scale=None):
    """softmax(q k^T * scale, masked) v in float64; mask [H or 1, Nq, Nk] (True: attend), GQA by repeat."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q.double() @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return s.masked_fill(~mask, -math.inf).softmax(-1) @ v


def brute_streaming_mask(n, sink, window, page_size):
    """Key j is kept for query i if j <= i and (j's page is a sink page or j's page >= the page of the
    window's first token i - window + 1), written as loops."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    n_sink = -(-sink // page_size)
    for i in range(n):
        first = math.floor((i - window + 1) / page_size)
        for j in range(i + 1):
            mask[i, j] = j // page_size < n_sink or j // page_size >= first
    return mask


@pytest.mark.parametrize("sink, window, page_size", [(4, 8, 1), (1, 3, 1), (16, 32, 16), (5, 20, 16), (0, 16, 16)])
def test_streaming_mask_keeps_sink_and_recent_pages(sink, window, page_size):
    n = 70
    assert torch.equal(kc.streaming_mask(n, sink, window, page_size), brute_streaming_mask(n, sink, window, page_size))
    exact = kc.streaming_mask(n, sink, window)  # page_size 1: exactly sink + window tokens per query
    want = [min(i + 1, window) + min(sink, max(0, i + 1 - window)) for i in range(n)]
    assert exact.sum(1).tolist() == want
    for length in range(1, n + 1):  # what decode keeps for the query at length - 1 is that row of the mask
        assert kc.kept_tokens(length, sink, window, page_size) == int(
            kc.streaming_mask(length, sink, window, page_size)[-1].sum())


def test_streaming_heads_policy_is_the_masked_attention():
    q, k, v = randn(2, 4, 40, 16, seed=1), randn(2, 2, 40, 16, seed=2), randn(2, 2, 40, 16, seed=3)
    streaming = torch.tensor([[False, True], [True, True]])
    policy = kc.StreamingHeads(streaming, 16, sink=3, window=8, page_size=1)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    stream = brute_streaming_mask(40, 3, 8, 1)
    for layer in range(2):
        per_q_head = torch.stack([stream if streaming[layer, h // 2] else causal for h in range(4)])
        assert_close(policy(q, k, v, layer), masked_reference(q, k, v, per_q_head), torch.float32)
    full = kc.StreamingHeads(torch.zeros(1, 2, dtype=torch.bool), 16)
    assert_close(full(q, k, v, 0), masked_reference(q, k, v, causal[None]), torch.float32)


def test_streaming_bytes_count_kept_tokens():
    streaming = torch.tensor([[True, False], [True, True], [False, False]])
    policy = kc.StreamingHeads(streaming, 64, sink=16, window=64, page_size=16)
    n = 1000
    kept = 16 + (n - (n - 64) // 16 * 16)  # one sink page, then the pages from the window's first on
    want = 2 * 64 * 2 * (3 * n + 3 * kept)
    assert policy.bytes_kept(n) == want and policy.bytes_full(n) == 2 * 64 * 2 * 6 * n
    assert policy.bytes_kept(40) == policy.bytes_full(40)  # short: nothing dropped


def test_choose_streaming_marks_the_lowest_scores():
    scores = torch.tensor([[0.5, 0.1], [0.3, 0.9]])
    assert torch.equal(kc.choose_streaming(scores, 2), torch.tensor([[False, True], [True, False]]))
    assert not kc.choose_streaming(scores, 0).any() and kc.choose_streaming(scores, 4).all()
    with pytest.raises(ValueError, match="n_streaming"):
        kc.choose_streaming(scores, 5)


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 140), min_size=1, max_size=3), page_size=st.sampled_from([16, 32]),
       sink=st.integers(0, 20), window=st.integers(1, 70), seed=st.integers(0, 1000))
def test_streaming_decode_from_pages_equals_the_mask(lengths, page_size, sink, window, seed):
    """Pages drawn at random (a shuffled pool): the retrieval heads see the whole cache, the streaming
    heads only their sink and recent pages, and both equal attention under the streaming mask."""
    hkv, h, d = 2, 4, 16
    b, longest = len(lengths), max(lengths)
    k, v = randn(b, hkv, longest, d, seed=seed), randn(b, hkv, longest, d, seed=seed + 1)
    q = randn(b, h, 1, d, seed=seed + 2)
    per_seq = -(-longest // page_size)
    perm = torch.randperm(b * per_seq + 3, generator=torch.Generator().manual_seed(seed))
    table = perm[:b * per_seq].view(b, per_seq).to(torch.int32)
    k_pages = torch.zeros(b * per_seq + 3, page_size, hkv, d)
    v_pages = torch.zeros_like(k_pages)
    for i in range(b):
        for t in range(lengths[i]):
            k_pages[table[i, t // page_size], t % page_size] = k[i, :, t]
            v_pages[table[i, t // page_size], t % page_size] = v[i, :, t]
    streaming = torch.tensor([True, False])
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    with poisoned():
        out = kc.streaming_decode(q.to(DEVICE), k_pages.to(DEVICE), v_pages.to(DEVICE), table.to(DEVICE),
                                  seqlens.to(DEVICE), streaming, sink, window)
    for i, n in enumerate(lengths):
        stream_row = kc.streaming_mask(n, sink, window, page_size)[-1:]
        full_row = torch.ones(1, n, dtype=torch.bool)
        mask = torch.stack([stream_row, stream_row, full_row, full_row])  # query heads 0, 1 read kv head 0
        want = masked_reference(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], mask)
        assert_close(out[i:i + 1], want, torch.float32, name=f"sequence {i}")


@pytest.mark.parametrize("dtype", test_dtypes())
def test_streaming_decode_reads_a_paged_kv_cache(dtype):
    cache = PagedKVCache(num_pages=20, page_size=16, num_kv_heads=2, head_dim=16, dtype=dtype)
    a, b = cache.new_sequence(), cache.new_sequence()
    k, v = randn(2, 2, 100, 16, seed=5, dtype=dtype), randn(2, 2, 100, 16, seed=6, dtype=dtype)
    cache.append([a, b], k[:, :, :37].to(DEVICE), v[:, :, :37].to(DEVICE))
    cache.append([b], k[1:, :, 37:].to(DEVICE), v[1:, :, 37:].to(DEVICE))
    q = randn(2, 4, 1, 16, seed=7, dtype=dtype).to(DEVICE)
    out = kc.streaming_decode(q, cache.k_pages, cache.v_pages, cache.block_table([a, b]), cache.seqlens([a, b]),
                              torch.tensor([False, True]), sink=4, window=20)
    for i, n in enumerate((37, 100)):
        row = kc.streaming_mask(n, 4, 20, 16)[-1:]
        mask = torch.stack([torch.ones_like(row), torch.ones_like(row), row, row])
        want = masked_reference(q[i:i + 1].cpu(), k[i:i + 1, :, :n].cpu(), v[i:i + 1, :, :n].cpu(), mask)
        assert out.dtype == dtype
        assert_close(out[i:i + 1], want, dtype)


def test_streaming_block_table():
    pages = [7, 3, 9, 1, 4, 8]
    assert kc.streaming_block_table(pages, 20, 16, 64, 16) == ([7, 3], 20)  # short: all of it
    # 90 tokens, window 30: the window starts at token 60, in page 3; one sink page
    assert kc.streaming_block_table(pages, 90, 5, 30, 16) == ([7, 1, 4, 8], 16 + 90 - 48)


def test_channel_pruning_is_the_pruned_dot_product():
    q, k, v = randn(1, 4, 30, 16, seed=11), randn(1, 2, 30, 16, seed=12), randn(1, 2, 30, 16, seed=13)
    channels = torch.stack([kc.top_channels(randn(2, 16, seed=s), 6) for s in (1, 2)])  # [L=2, Hkv, 6]
    policy = kc.KeyChannelPruning(channels, 16)
    causal = torch.ones(30, 30, dtype=torch.bool).tril()[None]
    for layer in range(2):
        keep = torch.zeros(4, 16)
        for h in range(4):
            keep[h, channels[layer, h // 2]] = 1
        want = masked_reference(q * keep[None, :, None, :], k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                causal, scale=16 ** -0.5)
        assert_close(policy(q, k, v, layer), want, torch.float32)
    assert policy.bytes_kept(100) == 2 * 2 * 100 * (6 + 16) * 2
    all_channels = kc.KeyChannelPruning(torch.arange(16).expand(2, 2, 16), 16)
    assert_close(all_channels(q, k, v, 0), masked_reference(q, k, v, causal), torch.float32)


def test_pruned_decode_reference():
    q, k, v = randn(2, 4, 1, 16, seed=21), randn(2, 2, 50, 16, seed=22), randn(2, 2, 50, 16, seed=23)
    channels = kc.top_channels(randn(2, 16, seed=3), 5)
    lengths = torch.tensor([50, 17])
    out = kc.pruned_decode(q, kc.gather_channels(k, channels), v, channels, lengths)
    keep = torch.zeros(4, 16)
    for h in range(4):
        keep[h, channels[h // 2]] = 1
    for i, n in enumerate((50, 17)):
        want = masked_reference(q[i:i + 1] * keep[None, :, None], k[i:i + 1, :, :n], v[i:i + 1, :, :n],
                                torch.ones(1, 1, n, dtype=torch.bool), scale=16 ** -0.5)
        assert_close(out[i:i + 1], want, torch.float32)


def test_channel_scores_are_query_and_key_norms():
    model = tiny_lm.TinyLM(tiny_lm.CONFIGS["tiny"]).eval().to(DEVICE)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    scores = kc.channel_scores(model, ids)
    cfg = model.cfg
    assert scores.shape == (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    q, k = tiny_lm.queries_keys(model, ids)[1]
    head, channel = 1, 5
    group = cfg.n_heads // cfg.n_kv_heads
    q_col = q[:, head * group:(head + 1) * group, :, channel].double()
    want = q_col.norm() * k[:, head, :, channel].double().norm()
    assert torch.isclose(scores[1, head, channel].double(), want, rtol=1e-5)
    assert torch.equal(kc.top_channels(torch.tensor([3.0, 9.0, 1.0, 5.0]), 2), torch.tensor([1, 3]))


def test_int8_policy_attends_to_the_dequantized_cache():
    q, k, v = randn(1, 4, 24, 32, seed=31), randn(1, 2, 24, 32, seed=32), randn(1, 2, 24, 32, seed=33)
    policy = kc.Int8KV(3, 2, 32)
    kq = k.abs().amax(-1, keepdim=True) / 127
    vq = v.abs().amax(-1, keepdim=True) / 127
    want = masked_reference(q, torch.round(k / kq) * kq, torch.round(v / vq) * vq,
                            torch.ones(24, 24, dtype=torch.bool).tril()[None])
    assert_close(policy(q, k, v, 0), want, torch.float32)
    err = (kc.fake_quantize_int8(k) - k).abs()
    assert bool((err <= kq / 2 + 1e-7).all()), "rounding error at most half a step"
    assert policy.bytes_kept(10) == 2 * 3 * 2 * 10 * (32 + 4) and policy.bytes_full(10) == 2 * 3 * 2 * 10 * 32 * 2


def test_kv_bytes_per_token():
    assert kc.kv_bytes_per_token(32, 8, 128, 2) == 131072  # Llama-3-8B in bf16: 128 KiB a token
    assert kc.kv_bytes_per_token(6, 2, 64, 2) == 3072


def test_retrieval_positions():
    text = b"abcdefghXY" + b"-" * 70 + b"abcdefghXZ"
    ids = torch.tensor(list(text))
    where = kc.retrieval_positions(ids, match=8, min_distance=64)
    t = len(text) - 3  # target 'X' after the second "abcdefgh": its first copy ends 80 bytes back
    assert where.nonzero().flatten().tolist() == [t]
    assert not kc.retrieval_positions(ids, match=8, min_distance=80)[t]  # not far enough
    # the dashes repeat, but always from close by
    assert not where[15:75].any()


def test_evaluate_measures_loss_and_retrieval():
    torch.manual_seed(0)
    model = tiny_lm.TinyLM(tiny_lm.CONFIGS["tiny"]).eval()
    text = (b"def f(x):\n    return x\n" * 8)[:129]
    windows = kc.windows_of(text, 64)
    assert windows.shape == (2, 65)
    got = kc.evaluate(model, windows, kc.FullCache(2, 2, 16), min_distance=8)
    with torch.no_grad():
        logits = model.set_attention("eager")(windows[:, :-1])
    model.set_attention("minikernels")
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert math.isclose(got["bits_per_byte"], float(nats) / math.log(2), rel_tol=1e-5)
    where = torch.stack([kc.retrieval_positions(w, min_distance=8) for w in windows])
    assert got["retrieval_positions"] == int(where.sum()) > 0
    hits = (logits.argmax(-1) == windows[:, 1:])[where]
    assert math.isclose(got["retrieval_accuracy"], float(hits.double().mean()), rel_tol=1e-9)
    assert model.attention == "minikernels", "evaluate puts the model's attention back"
