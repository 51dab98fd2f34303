"""mk.masks: every builder's block structure reproduces its element rule exactly; full blocks are
really full, skipped blocks really empty; density counts visited tiles."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import minikernels as mk
from minikernels import masks, planning
from minikernels.testing import test_dtypes


def element(rule, q_len, kv_len):
    i = torch.arange(q_len, device=mk.device())[:, None]
    j = torch.arange(kv_len, device=mk.device())[None, :]
    return rule(i, j).broadcast_to(q_len, kv_len)


def check_structure(bm: masks.BlockMask, dense: torch.Tensor):
    """to_dense reproduces the rule; visited blocks are exactly the non-empty ones; 'full' ones full."""
    assert torch.equal(bm.to_dense(), dense)
    bs = bm.block_size
    padded = torch.zeros(bm.n_q_blocks * bs, bm.n_kv_blocks * bs, dtype=torch.bool, device=dense.device)
    padded[: bm.q_len, : bm.kv_len] = dense
    valid = torch.zeros_like(padded)
    valid[: bm.q_len, : bm.kv_len] = True
    blocks = padded.view(bm.n_q_blocks, bs, bm.n_kv_blocks, bs).permute(0, 2, 1, 3).flatten(2)
    valid_b = valid.view(bm.n_q_blocks, bs, bm.n_kv_blocks, bs).permute(0, 2, 1, 3).flatten(2)
    kinds = bm.to_block_dense()
    assert torch.equal(kinds > 0, blocks.any(-1)), "visit exactly the blocks with a visible element"
    assert torch.equal(kinds == 2, blocks.any(-1) & (blocks == valid_b).all(-1)), "full means no mask needed"
    for qb, count in enumerate(bm.kv_counts.tolist()):
        row = bm.kv_indices[qb, :count]
        assert torch.all(row[1:] > row[:-1]), "key blocks in increasing order"
        assert torch.all(bm.kv_indices[qb, count:] == -1)
    assert bm.density() == pytest.approx(int(blocks.any(-1).sum()) / (bm.n_q_blocks * bm.n_kv_blocks))
    check_key_side(bm)


def check_key_side(bm: masks.BlockMask):
    """The key-side lists (for dK/dV) hold the same visits as the query-side ones, with the same
    partial flags and tiles, query blocks in increasing order, padded with -1; all int32."""
    by_query = {(qb, int(bm.kv_indices[qb, t]), bool(bm.partial[qb, t]), int(bm.tile_index[qb, t]))
                for qb in range(bm.n_q_blocks) for t in range(int(bm.kv_counts[qb]))}
    by_key = {(int(bm.q_indices[kb, t]), kb, bool(bm.q_partial[kb, t]), int(bm.q_tile_index[kb, t]))
              for kb in range(bm.n_kv_blocks) for t in range(int(bm.q_counts[kb]))}
    assert by_query == by_key and len(by_query) == bm.visited_blocks()
    assert all(tile == -1 for *_, partial, tile in by_query if not partial)
    assert sorted(tile for *_, partial, tile in by_query if partial) == list(range(bm.tiles.shape[0])), \
        "every tile belongs to exactly one partial visit"
    for kb, count in enumerate(bm.q_counts.tolist()):
        col = bm.q_indices[kb, :count]
        assert torch.all(col[1:] > col[:-1]), "query blocks in increasing order"
        assert torch.all(bm.q_indices[kb, count:] == -1)
    for t in (bm.kv_indices, bm.kv_counts, bm.tile_index, bm.q_indices, bm.q_counts, bm.q_tile_index):
        assert t.dtype == torch.int32


def test_empty_sequences():
    """No queries or no keys: nothing to visit, one padding slot per row."""
    for q_len, kv_len in ((0, 40), (40, 0), (0, 0)):
        bm = masks.from_mask_fn(lambda i, j: j <= i, q_len, kv_len, block_size=16)
        assert bm.visited_blocks() == 0 and bm.tiles.shape[0] == 0
        assert bm.kv_indices.shape == (bm.n_q_blocks, 1) and bm.q_indices.shape == (bm.n_kv_blocks, 1)
        assert torch.all(bm.kv_indices == -1) and torch.all(bm.q_indices == -1)


@pytest.mark.parametrize("rows_at_once", [1, 2, 3])
def test_rule_evaluated_a_few_query_block_rows_at_a_time(rows_at_once):
    """from_mask_fn asks its rule about groups of query-block rows (RULE_ELEMENTS pairs at a time):
    every grouping, a ragged last group included, gives the mask and lists of one evaluation."""
    q_len, kv_len, bs = 150, 90, 16  # 10 query-block rows of 6 key blocks
    gen = torch.Generator().manual_seed(3)
    dense = (torch.rand(q_len, kv_len, generator=gen) < 0.2).to(mk.device())
    dense[:, :20] |= torch.ones(q_len, 20, dtype=torch.bool, device=dense.device).tril()[:, :20]  # full blocks too
    whole = masks.from_dense(dense, block_size=bs)
    with planning.override({"masks.rule_elements": rows_at_once * bs * 6 * bs}):
        grouped = masks.from_dense(dense, block_size=bs)
    check_structure(grouped, dense)
    for name in FIELDS:
        assert torch.equal(getattr(grouped, name), getattr(whole, name)), name


FIELDS = ("kv_indices", "kv_counts", "partial", "tile_index", "tiles", "q_indices", "q_counts", "q_partial",
          "q_tile_index")


@pytest.mark.parametrize("q_len,kv_len,bs", [(100, 100, 16), (64, 200, 16), (200, 64, 32), (1, 1, 16),
                                             (17, 33, 16), (0, 40, 16), (130, 130, 64)])
def test_causal_block_structure_without_evaluating_every_pair(q_len, kv_len, bs):
    """causal (and xattention) classify blocks as empty, full or partial by their corners and
    evaluate only the partial ones: the same BlockMask, field by field, as asking the rule about
    every pair through from_mask_fn; likewise inside a random selection of blocks (xattention)."""
    offset = kv_len - q_len
    generic = masks.from_mask_fn(lambda i, j: j <= i + offset, q_len, kv_len, block_size=bs)
    fast = masks.causal(q_len, kv_len, block_size=bs)
    for name in FIELDS:
        assert torch.equal(getattr(fast, name), getattr(generic, name)), name
    gen = torch.Generator().manual_seed(q_len + kv_len)
    keep = (torch.rand(generic.n_q_blocks, generic.n_kv_blocks, generator=gen) < 0.5).to(mk.device())
    rule = lambda i, j: (keep[(i // bs).clamp(max=max(keep.shape[0] - 1, 0)), (j // bs).clamp(max=keep.shape[1] - 1)]
                         & (j <= i + offset))
    generic = masks.from_mask_fn(rule, q_len, kv_len, block_size=bs)
    fast = masks._causal_blocks(q_len, kv_len, bs, mk.device(), keep=keep)
    if q_len:  # (check_structure's density needs a block; the field comparison covers q_len = 0)
        check_structure(fast, element(rule, q_len, kv_len))
    for name in FIELDS:
        assert torch.equal(getattr(fast, name), getattr(generic, name)), name


@pytest.mark.parametrize("q_len", [0, 1, 15, 16, 17, 100, 150])
@pytest.mark.parametrize("window", [1, 15, 16, 17, 40, 500])
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_block_structure_without_evaluating_every_pair(q_len, window, causal):
    """sliding_window classifies blocks by the range of j - i they hold, as causal does: the same
    BlockMask, field by field, as asking its rule about every pair."""
    rule = (lambda i, j: (j <= i) & (j > i - window)) if causal else (lambda i, j: (j - i).abs() < window)
    generic = masks.from_mask_fn(rule, q_len, q_len, block_size=16)
    fast = masks.sliding_window(q_len, window, causal=causal, block_size=16)
    for name in FIELDS:
        assert torch.equal(getattr(fast, name), getattr(generic, name)), name


@pytest.mark.parametrize("q_len,kv_len", [(100, 100), (64, 200), (200, 64), (1, 1), (17, 33)])
def test_causal(q_len, kv_len):
    bm = masks.causal(q_len, kv_len, block_size=16)
    check_structure(bm, element(lambda i, j: j <= i + kv_len - q_len, q_len, kv_len))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 16, 37])
def test_sliding_window(window, causal):
    bm = masks.sliding_window(150, window, causal=causal, block_size=16)
    rule = (lambda i, j: (j <= i) & (j > i - window)) if causal else (lambda i, j: (j - i).abs() < window)
    check_structure(bm, element(rule, 150, 150))


def test_sliding_window_matches_the_issue_definition():
    dense = masks.sliding_window(64, 5, block_size=16).to_dense()
    i, j = 40, torch.arange(64)
    assert torch.equal(dense[i].cpu(), (i - 5 < j) & (j <= i))


@pytest.mark.parametrize("causal", [True, False])
def test_dilated(causal):
    bm = masks.dilated(130, window=8, dilation=3, causal=causal, block_size=16)

    def rule(i, j):
        near = ((j <= i) & (j > i - 24)) if causal else ((j - i).abs() < 24)
        return near & ((i - j) % 3 == 0)
    check_structure(bm, element(rule, 130, 130))


def test_a_shape():
    bm = masks.a_shape(200, sink=4, window=32, block_size=16)
    check_structure(bm, element(lambda i, j: (j <= i) & ((j < 4) | (j > i - 32)), 200, 200))


def neighborhood_brute_force(h, w, kernel, dilation):
    """Directly from the definition: for each token, the kernel x kernel window of its dilation
    group, centred on it and shifted inside the grid at the borders."""
    def window_1d(length, p):
        group = [x for x in range(length) if x % dilation == p % dilation]
        pos = group.index(p)
        start = min(max(pos - kernel // 2, 0), max(len(group) - kernel, 0))
        return set(group[start:start + kernel])

    dense = torch.zeros(h * w, h * w, dtype=torch.bool)
    for qy in range(h):
        for qx in range(w):
            for ky in window_1d(h, qy):
                for kx in window_1d(w, qx):
                    dense[qy * w + qx, ky * w + kx] = True
    return dense.to(mk.device())


@pytest.mark.parametrize("h,w,kernel,dilation", [(8, 8, 3, 1), (10, 7, 5, 1), (12, 9, 3, 2), (9, 9, 3, 3)])
def test_neighborhood_2d(h, w, kernel, dilation):
    bm = masks.neighborhood_2d(h, w, kernel, dilation, block_size=16)
    dense = neighborhood_brute_force(h, w, kernel, dilation)
    check_structure(bm, dense)
    assert torch.all(dense.sum(1) == kernel * kernel), "every token sees exactly kernel^2 tokens"


@given(q_len=st.integers(1, 90), kv_len=st.integers(1, 90), density=st.floats(0, 1), seed=st.integers(0, 999),
       block_size=st.sampled_from([16, 32]))
def test_from_dense_random(q_len, kv_len, density, seed, block_size):
    g = torch.Generator().manual_seed(seed)
    dense = (torch.rand(q_len, kv_len, generator=g) < density).to(mk.device())
    check_structure(masks.from_dense(dense, block_size=block_size), dense)


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size must be a power of two >= 16"):
        masks.causal(64, block_size=24)
    with pytest.raises(ValueError, match="window must be a positive int"):
        masks.sliding_window(64, 0)
    with pytest.raises(TypeError, match="mask_fn must return a bool tensor"):
        masks.from_mask_fn(lambda i, j: i - j, 32, 32, block_size=16)
    with pytest.raises(ValueError, match="q_len must be a non-negative int"):
        masks.from_mask_fn(lambda i, j: i >= j, -1, 32)
    with pytest.raises(ValueError, match="must fit the 4 x 4 grid"):
        masks.neighborhood_2d(4, 4, kernel=3, dilation=2)


def test_key_side_lists_are_the_transpose():
    check_key_side(masks.a_shape(150, sink=8, window=40, block_size=16))


# --- estimated masks ------------------------------------------------------------------------------

def test_antidiagonal_scores_match_brute_force():
    from minikernels.testing import randn

    q, k = randn(1, 2, 48, 8, seed=1).double(), randn(1, 2, 48, 8, seed=2).double()
    stride, bs = 4, 16
    got = masks.antidiagonal_block_scores(q, k, stride, bs, causal=True)
    s = (q @ k.transpose(-1, -2))[0, 0].cpu() / (8 ** 0.5 * stride)
    n = 48 // stride
    patch = torch.full((n, n), float("-inf"), dtype=torch.float64)
    for a in range(n):
        for b in range(n):
            if b * stride <= a * stride + stride - 1:  # causal at patch level
                patch[a, b] = sum(s[a * stride + stride - 1 - r, b * stride + r] for r in range(stride))
    p = torch.softmax(patch, dim=-1)
    want = p.view(3, bs // stride, 3, bs // stride).sum(dim=(1, 3))
    assert torch.allclose(got[0, 0].cpu().double(), want, atol=1e-5)


@pytest.mark.parametrize("dtype", test_dtypes())
@pytest.mark.parametrize("shape", [
    # B, H, Hkv, Nq, Nk, D, stride, block_size, causal
    (1, 2, 2, 48, 48, 8, 4, 16, True),
    (2, 4, 2, 100, 130, 24, 4, 32, True),  # grouped heads, ragged ends, more keys than queries
    (1, 2, 1, 64, 64, 16, 8, 64, False),
    (1, 1, 1, 37, 90, 16, 16, 16, True),  # one patch per block; the first query rows see no patch
    (1, 1, 1, 256, 256, 32, 1, 32, True),  # stride 1: the plain softmax, summed per block
])
def test_antidiagonal_kernel_matches_reference(shape, dtype):
    """The one-pass Triton scoring behind xattention equals the readable PyTorch version."""
    from minikernels import antidiagonal
    from minikernels.testing import assert_close, poisoned, randn

    b, h, hkv, nq, nk, d, stride, bs, causal = shape
    q, k = randn(b, h, nq, d, seed=1, dtype=dtype), randn(b, hkv, nk, d, seed=2, dtype=dtype)
    with poisoned():  # the partial sums start as NaN: reading one the first pass did not write shows up
        got = antidiagonal.block_scores(q, k, stride, bs, causal)
    want = masks.antidiagonal_block_scores(q.double(), k.double(), stride, bs, causal).mean(dim=(0, 1))
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close(got, want, dtype, name="antidiagonal block scores")


def test_antidiagonal_descriptor_and_pointer_loads_agree():
    """Contiguous patches are read through tensor descriptors (the interpreter, a Hopper GPU); a
    [B, N, H, D] layout seen as [B, H, N, D] is not (its patch rows are not contiguous) and takes the
    pointer loads: both give the same scores, grouped heads and a partial last tile included."""
    from minikernels import antidiagonal
    from minikernels._backend import tma_ready
    from minikernels.testing import randn

    q, k = randn(1, 4, 96, 16, seed=5), randn(1, 2, 96, 16, seed=6)
    if not tma_ready(q, k):
        pytest.skip("no tensor descriptors on this device: both runs would take the pointer loads")
    q_strided, k_strided = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    assert q_strided.stride(2) != q.shape[-1]  # rows of a patch H*D apart: no descriptor
    got_tma = antidiagonal.block_scores(q, k, 4, 32)
    got_ptr = antidiagonal.block_scores(q_strided, k_strided, 4, 32)
    assert torch.allclose(got_tma, got_ptr, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strided", [False, True])
def test_antidiagonal_batches_beyond_one_grid_launch_in_slices(strided):
    """The scoring grid's second axis holds at most 65535 (batch, head) pairs; a larger batch is scored
    in slices of whole batch entries. With the limit lowered to 5 pairs (one entry of 4 heads a launch):
    bit-equal to one launch, through tensor descriptors and through pointer loads."""
    from minikernels import antidiagonal
    from minikernels.testing import randn

    q, k = randn(3, 4, 96, 16, seed=7), randn(3, 2, 100, 16, seed=8)
    if strided:  # patch rows H*D apart: pointer loads
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    whole = antidiagonal.block_scores(q, k, 4, 32)
    with planning.override({"antidiagonal.max_grid_y": 5}):
        sliced = antidiagonal.block_scores(q, k, 4, 32)
        with planning.override({"antidiagonal.max_grid_y": 3}), pytest.raises(ValueError, match="4 heads are"):
            antidiagonal.block_scores(q, k, 4, 32)
    assert torch.equal(sliced, whole)
    want = masks.antidiagonal_block_scores(q.double(), k.double(), 4, 32).mean(dim=(0, 1))
    assert torch.allclose(sliced, want.float(), rtol=1e-4, atol=1e-6)


def keep_until_threshold(scores, threshold):
    """The selection of XAttention by sorting: rank each row's blocks by score, keep them in order
    while the blocks ranked above hold less than ``threshold`` of the row's total."""
    share = scores / scores.sum(-1, keepdim=True).clamp(min=1e-30)
    order = share.argsort(dim=-1, descending=True, stable=True)
    sorted_share = share.gather(-1, order)
    keep_sorted = (sorted_share.cumsum(-1) - sorted_share < threshold) & (sorted_share > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@pytest.mark.parametrize("threshold", [0.3, 0.9, 1.0])
@pytest.mark.parametrize("nq, nk, causal", [(256, 256, True), (200, 330, True), (96, 160, False)])
def test_xattention_selection_matches_sorting(nq, nk, causal, threshold):
    from minikernels import antidiagonal
    from minikernels.testing import randn

    q, k = randn(2, 2, nq, 16, seed=nq), randn(2, 1, nk, 16, seed=nk) * 3.0  # peaked scores
    got = masks.xattention_blocks(q, k, stride=4, threshold=threshold, block_size=16, causal=causal)
    want = keep_until_threshold(antidiagonal.block_scores(q, k, 4, 16, causal), threshold)
    if causal:
        rows = torch.arange(want.shape[0], device=want.device)
        want[rows, ((rows * 16 + 15).clamp(max=nq - 1) + nk - nq) // 16] = True
    assert got.dtype == torch.bool and torch.equal(got, want)


def test_xattention_without_the_scoring_kernel():
    """float64 inputs (no float64 tensor cores) and blocks wider than a tile (block_size / stride > 128)
    score with the PyTorch version, then rank with the same kernel."""
    from minikernels.testing import randn

    q, k = randn(1, 2, 512, 16, seed=7), randn(1, 2, 512, 16, seed=8) * 3.0
    for args in ((q.double(), k.double(), 4, 32), (q, k, 1, 256)):
        qq, kk, stride, bs = args
        got = masks.xattention_blocks(qq, kk, stride=stride, threshold=0.8, block_size=bs)
        scores = masks.antidiagonal_block_scores(qq, kk, stride, bs).float().mean(dim=(0, 1))
        want = keep_until_threshold(scores, 0.8)
        rows = torch.arange(want.shape[0], device=want.device)
        want[rows, rows] = True  # the diagonal block (square, causal)
        assert torch.equal(got, want)


def test_antidiagonal_tiles_fit_for_every_dtype_and_head_dim():
    """The GPU tiles were tuned for 16-bit D = 128; a pipeline step never holds more bytes than there
    (float32 takes a narrower slice of the head dimension), and the slice tiles the head dimension
    in pieces a descriptor can load (at least 16 bytes wide)."""
    from minikernels import antidiagonal

    def footprint(t, elem_bytes):
        return (t["BLOCK_A"] + t["BLOCK_B"]) * t["D_CHUNK"] * elem_bytes * t["num_stages"]

    tuned = footprint(antidiagonal.TILES, 2)
    assert antidiagonal.tile_config(128, 2) == antidiagonal.TILES
    for head_dim in (16, 32, 64, 128, 256):
        for elem_bytes in (2, 4):
            t = antidiagonal.tile_config(head_dim, elem_bytes)
            assert footprint(t, elem_bytes) <= tuned, (head_dim, elem_bytes, t)
            assert head_dim % t["D_CHUNK"] == 0 and t["D_CHUNK"] * elem_bytes >= 16, (head_dim, elem_bytes, t)


def test_xattention_selection_breaks_ties_by_index():
    from minikernels import antidiagonal

    scores = torch.tensor([[1.0, 2.0, 1.0, 1.0, 0.0]], device=mk.device())  # total 5
    keep = torch.empty(1, 5, dtype=torch.int8, device=mk.device())
    antidiagonal._select_blocks[(1, 1)](scores[None], keep, 1, 5, 5, 5, 0.7, 16, 80, 16, CAUSAL=False, BJ=32, BI=32)
    # ranked 1, 0, 2, 3 (ties by index), 4: before = 0, 2, 3, 4 (of 5): keep while below 3.5
    assert keep.tolist() == [[1, 1, 1, 0, 0]]


@pytest.mark.gpu
def test_gpu_antidiagonal_kernel_long_bf16():
    from minikernels import antidiagonal
    from minikernels.testing import assert_close, randn

    q, k = randn(1, 4, 4096, 128, seed=3, dtype=torch.bfloat16), randn(1, 4, 4096, 128, seed=4, dtype=torch.bfloat16)
    got = antidiagonal.block_scores(q, k, 8, 128)
    want = masks.antidiagonal_block_scores(q.double(), k.double(), 8, 128).mean(dim=(0, 1))
    assert_close(got, want, torch.bfloat16, name="antidiagonal block scores, N = 4096")


@pytest.mark.gpu
def test_gpu_antidiagonal_batch_beyond_the_grid_limit():
    """4100 x 16 (batch, head) pairs, more than the 65535 a grid's second axis holds: scored in slices
    (entries 0-4094, then 4095-4099). Head by head, the first entries and the last (in different
    launches) score exactly as they do alone, and the last equal the float64 reference."""
    from minikernels import antidiagonal
    from minikernels.testing import assert_close, randn

    q, k = randn(4100, 16, 64, 64, seed=9, dtype=torch.bfloat16), randn(4100, 16, 64, 64, seed=10, dtype=torch.bfloat16)
    per_head = antidiagonal._scores_per_head(q, k, 8, 32, True)  # [B*H, blocks, blocks], head by head
    for lo in (0, 4096):
        alone = antidiagonal._scores_per_head(q[lo:lo + 4], k[lo:lo + 4], 8, 32, True)
        assert torch.equal(per_head[lo * 16:(lo + 4) * 16], alone), lo
    want = masks.antidiagonal_block_scores(q[4096:].double(), k[4096:].double(), 8, 32).flatten(0, 1)
    assert_close(per_head[4096 * 16:, :2, :2], want, torch.bfloat16, name="scores of the last launch's heads")


def planted(n=256, d=32, needle=37, seed=0):
    """Queries and keys with structure: key `needle` matches every query (a vertical line), and each
    key j also resembles query j + 16 (a slash at distance 16)."""
    from minikernels.testing import randn

    q, k = randn(1, 2, n, d, seed=seed), randn(1, 2, n, d, seed=seed + 1) * 0.1
    shared = randn(d, seed=seed + 2)
    q = q + shared  # every query shares one direction ...
    k[:, :, : n - 16] += q[:, :, 16:] * 1.5  # key j resembles query j + 16
    k[:, :, needle] = shared * 3  # ... and the needle key points along it
    return q, k


def test_vertical_slash_finds_planted_structure():
    q, k = planted()
    bm = masks.vertical_slash(q, k, n_vertical=4, n_slash=4, last_q=32, block_size=16)
    dense = bm.to_dense().cpu()
    i = torch.arange(256)
    assert dense[37:, 37].all(), "the planted vertical line is kept"
    assert dense[i[16:], i[16:] - 16].all(), "the planted slash is kept"
    assert not (dense & ~torch.ones(256, 256, dtype=torch.bool).tril()).any(), "causal"
    assert bm.density() < 0.75


def test_xattention_keeps_the_mass_it_promises():
    q, k = planted()
    bm = masks.xattention(q, k, stride=4, threshold=0.9, block_size=16)
    dense = bm.to_dense()
    s = (q @ k.transpose(-1, -2)) / 32 ** 0.5
    causal_mask = torch.ones(256, 256, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(s.masked_fill(~causal_mask, float("-inf")), dim=-1)
    kept = (p * dense).sum(-1).mean()
    assert kept > 0.85, f"kept {kept:.3f} of the attention mass"
    assert dense[torch.arange(256), torch.arange(256)].all(), "the diagonal is always kept"
    assert bm.density() < masks.causal(256, block_size=16).density()
    everything = masks.xattention(q, k, stride=4, threshold=1.0, block_size=16)
    assert torch.equal(everything.to_dense(), causal_mask), "threshold 1 keeps every causal block"


def test_estimator_arguments():
    from minikernels.testing import randn

    q, k = randn(1, 2, 64, 16), randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="threshold must be in"):
        masks.xattention(q, k, threshold=0.0, block_size=16)
    with pytest.raises(ValueError, match="stride=5 must divide block_size=16"):
        masks.xattention(q, k, stride=5, block_size=16)
    with pytest.raises(ValueError, match="must be a floating-point tensor"):
        masks.vertical_slash(q[0], k)
    with pytest.raises(ValueError, match="different devices"):
        masks.xattention(q, k.to("meta"), stride=4, block_size=16)


def test_kernel_layout_lists_full_blocks_first():
    """The kernels run one unmasked loop over visits [0, n_full), then the masked loops after it."""
    bm = masks.sliding_window(200, 40, block_size=16)
    lay = bm.kernel_layout
    for qb, count in enumerate(bm.kv_counts.tolist()):
        n_full = int(lay["kv_full"][qb])
        assert n_full == int((~bm.partial[qb, :count]).sum())
        got = lay["kv_indices"][qb, :count].tolist()
        assert sorted(got) == bm.kv_indices[qb, :count].tolist()  # the same visits, reordered
        for t, kb in enumerate(got):  # full ones first, each with its own tile when partial
            t0 = bm.kv_indices[qb, :count].tolist().index(kb)
            assert bool(bm.partial[qb, t0]) == (t >= n_full)
            if t >= n_full:
                assert int(lay["tile_index"][qb, t]) == int(bm.tile_index[qb, t0])
    assert int(lay["q_full"].sum()) == int(lay["kv_full"].sum())  # the same full visits, by key block


@pytest.mark.parametrize("build", [lambda: masks.causal(100, 200, block_size=16),
                                   lambda: masks.sliding_window(200, 40, block_size=16),
                                   lambda: masks.from_dense(torch.rand(130, 90, generator=torch.Generator()
                                                                       .manual_seed(3)) < 0.2, block_size=16)])
def test_kernel_layout_orders_rows_longest_first(build):
    """Each kernel takes its blocks in this order: a permutation, most visits first, ties by number."""
    bm = build()
    lay = bm.kernel_layout
    for order, counts in ((lay["q_order"], bm.kv_counts), (lay["kv_order"], bm.q_counts)):
        assert order.dtype == torch.int32
        assert sorted(order.tolist()) == list(range(len(counts)))
        pairs = [(-int(counts[i]), int(i)) for i in order]
        assert pairs == sorted(pairs)


def test_band_tiles_are_recognized_exactly():
    """A partial tile the kernels draw from (lo, hi) must equal lo <= c - r <= hi everywhere; any
    other tile (a column range, a row range, a random pattern, an empty one, a band with a hole) must
    be read instead. (An all-true tile would count as the band -(bs-1)..bs-1, which draws it right;
    the builders never list one as partial.)"""
    bs = 16
    r = torch.arange(bs)[:, None]
    c = torch.arange(bs)[None, :]
    bands = [(c - r >= lo) & (c - r <= hi) for lo, hi in [(0, 0), (-15, 0), (-3, 5), (1, 15), (-15, -4), (-8, 8)]]
    others = [(c < 5).expand(bs, bs), (r < 3).expand(bs, bs),
              torch.rand(bs, bs, generator=torch.Generator().manual_seed(0)) < 0.5,
              torch.zeros(bs, bs, dtype=torch.bool), ((c - r).abs() <= 1) & (c != 7)]
    is_band, lo, hi = masks._band_tiles(torch.stack(bands + others), group=4)  # several groups
    assert is_band.tolist() == [True] * len(bands) + [False] * len(others)
    for t, tile in enumerate(bands):
        assert torch.equal((c - r >= lo[t]) & (c - r <= hi[t]), tile)


@pytest.mark.parametrize("build", [lambda: masks.sliding_window(200, 40, block_size=16),  # ragged: a non-band end
                                   lambda: masks.a_shape(200, sink=5, window=40, block_size=16),  # sink columns
                                   lambda: masks.causal(100, 70, block_size=16)])
def test_kernel_layout_groups_band_tiles(build):
    """Each row's visits: full blocks, then the partial ones whose tile is a band, then the rest."""
    bm = build()
    lay = bm.kernel_layout
    assert (lay["kv_band_end"] > lay["kv_full"]).any() and (bm.kv_counts > lay["kv_band_end"]).any()  # both kinds
    for side in ("kv", "q"):
        counts = bm.kv_counts if side == "kv" else bm.q_counts
        full = lay["kv_full" if side == "kv" else "q_full"]
        band_end = lay["kv_band_end" if side == "kv" else "q_band_end"]
        tile_index = lay["tile_index" if side == "kv" else "q_tile_index"]
        for i, count in enumerate(counts.tolist()):
            for t in range(int(full[i]), count):
                tile = bm.tiles[int(tile_index[i, t])]
                pos = torch.arange(bm.block_size, device=tile.device)
                c_r = pos[None, :] - pos[:, None]
                band = (c_r >= lay["tile_lo"][tile_index[i, t]]) & (c_r <= lay["tile_hi"][tile_index[i, t]])
                assert torch.equal(band, tile) == (t < int(band_end[i]))


# --- bad and awkward input ------------------------------------------------------------------------

def peaked(b=1, h=2, hkv=1, nq=192, nk=192, d=32, seed=11):
    """Inputs with large logits, so that many blocks sit near the threshold: the bf16 rounding of the
    scores (which the interpreter's bf16 tl.dot gets wrong) would move them across."""
    from minikernels.testing import randn

    return randn(b, h, nq, d, seed=seed) * 3.0, randn(b, hkv, nk, d, seed=seed + 1) * 3.0


@pytest.mark.skipif(mk.backend() != "interpreter", reason="on a GPU bf16 runs on bf16 tensor cores (an estimate)")
@pytest.mark.parametrize("estimator", ["xattention_blocks", "xattention", "xattention_wide_blocks",
                                       "antidiagonal_block_scores", "vertical_slash"])
@pytest.mark.parametrize("causal", [True, False])
def test_estimators_take_bf16_as_float32_in_the_interpreter(estimator, causal):
    """Under the interpreter bf16 inputs are computed in float32 (DESIGN.md): every estimator keeps
    the same blocks for bf16 inputs as for the same values (bf16-rounded) in float32."""
    q, k = peaked(nk=160 if causal else 192)  # grouped heads; more queries than keys when causal
    qb, kb = q.bfloat16(), k.bfloat16()
    qf, kf = qb.float(), kb.float()
    if estimator == "xattention_blocks":
        got, want = (masks.xattention_blocks(a, b, stride=4, threshold=0.9, block_size=16, causal=causal)
                     for a, b in ((qb, kb), (qf, kf)))
        assert 0 < int(want.sum()) < want.numel(), "a selection, not all or nothing"
    elif estimator == "xattention":
        got, want = (masks.xattention(a, b, stride=4, threshold=0.9, block_size=16, causal=causal).to_dense()
                     for a, b in ((qb, kb), (qf, kf)))
    elif estimator == "xattention_wide_blocks":  # block_size / stride > 128: the PyTorch scores
        got, want = (masks.xattention_blocks(a, b, stride=1, threshold=0.9, block_size=256, causal=causal)
                     for a, b in ((qb, kb), (qf, kf)))
    elif estimator == "antidiagonal_block_scores":
        got, want = (masks.antidiagonal_block_scores(a, b, 4, 16, causal=causal) for a, b in ((qb, kb), (qf, kf)))
        assert got.dtype == torch.float32
    else:
        if not causal:
            pytest.skip("vertical_slash is causal")
        got, want = (masks.vertical_slash(a, b, n_vertical=4, n_slash=4, last_q=32, block_size=16).to_dense()
                     for a, b in ((qb, kb), (qf, kf)))
    assert torch.equal(got, want)


@pytest.mark.parametrize("build", [
    lambda flag: masks.sliding_window(64, 5, causal=flag, block_size=16),
    lambda flag: masks.dilated(64, 4, 2, causal=flag, block_size=16),
    lambda flag: masks.xattention(*peaked(nq=64, nk=64), stride=4, block_size=16, causal=flag),
    lambda flag: masks.xattention_blocks(*peaked(nq=64, nk=64), stride=4, block_size=16, causal=flag),
    lambda flag: masks.antidiagonal_block_scores(*peaked(nq=64, nk=64), 4, 16, causal=flag),
])
@pytest.mark.parametrize("flag", ["no", 0, 1, None, torch.tensor(True)])
def test_bool_flags_must_be_bools(build, flag):
    """causal="no" is truthy: a flag that is not a bool raises instead of silently meaning True."""
    with pytest.raises(TypeError, match="causal must be a bool"):
        build(flag)


def test_mask_fn_result_is_checked():
    """A rule's result must be a bool tensor that broadcasts to [rows, cols] from two dimensions (or
    none); anything else names mask_fn and the shape expected, instead of a broadcasting error or, for
    a one-dimensional result, a silent reading of it as a row of columns."""
    for rule in (lambda i, j: (i >= 0)[:, 0],  # [rows]: would broadcast along the columns
                 lambda i, j: (j >= 0)[0],  # [cols]: ambiguous too
                 lambda i, j: (i >= j)[None],  # [1, rows, cols]
                 lambda i, j: (i >= j)[:, :-1],  # [rows, cols - 1]
                 lambda i, j: torch.ones(3, 5, dtype=torch.bool, device=i.device)):
        with pytest.raises(ValueError, match=r"mask_fn returned shape .* expected \[64, 64\]"):
            masks.from_mask_fn(rule, 64, 64, block_size=16)
    with pytest.raises(TypeError, match="mask_fn must return a bool tensor, got dtype int64"):
        masks.from_mask_fn(lambda i, j: i - j, 32, 32, block_size=16)
    with pytest.raises(TypeError, match="mask_fn must return a bool tensor, got list"):
        masks.from_mask_fn(lambda i, j: [True], 32, 32, block_size=16)
    with pytest.raises(ValueError, match="mask_fn returned a tensor on meta"):
        masks.from_mask_fn(lambda i, j: (i >= j).to("meta"), 32, 32, block_size=16)
    # what broadcasts from two dimensions, or from none, is the rule it says
    everything = masks.from_mask_fn(lambda i, j: torch.tensor(True, device=i.device), 40, 50, block_size=16)
    assert torch.equal(everything.to_dense(), torch.ones(40, 50, dtype=torch.bool, device=mk.device()))
    check_structure(masks.from_mask_fn(lambda i, j: i < 20, 40, 50, block_size=16),
                    element(lambda i, j: (i < 20) & (j >= 0), 40, 50))
    check_structure(masks.from_mask_fn(lambda i, j: j < 20, 40, 50, block_size=16),
                    element(lambda i, j: (j < 20) & (i >= 0), 40, 50))


@pytest.mark.parametrize("build", [
    lambda dev: masks.causal(64, block_size=16, device=dev),
    lambda dev: masks.sliding_window(64, 5, block_size=16, device=dev),
    lambda dev: masks.dilated(64, 4, 2, block_size=16, device=dev),
    lambda dev: masks.a_shape(64, 2, 8, block_size=16, device=dev),
    lambda dev: masks.neighborhood_2d(8, 8, 3, block_size=16, device=dev),
    lambda dev: masks.from_mask_fn(lambda i, j: j <= i, 64, 64, block_size=16, device=dev),
])
def test_builders_refuse_the_meta_device(build):
    """A BlockMask's sizes depend on which blocks it keeps, which the meta device cannot compute: every
    builder refuses it up front, naming the argument, instead of failing inside torch."""
    with pytest.raises(ValueError, match="device='meta': the meta device holds no values"):
        build("meta")
    with pytest.raises(ValueError, match="device='meta'"):
        build(torch.device("meta"))
    with pytest.raises(TypeError, match="device must be a torch.device, a str, an int or None, got float"):
        build(1.5)
    with pytest.raises(ValueError, match="device='nonsense' is not a usable device"):
        build("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is not available here"):
            build("cuda")
    assert build(mk.device()).q_len == 64 and build(str(mk.device())).q_len == 64


def test_meta_tensors():
    """The estimators that build a BlockMask refuse meta inputs, naming them; the block scores, whose
    shape does not depend on values, are computed on the meta device."""
    meta = torch.empty(1, 2, 64, 16, device="meta")
    with pytest.raises(ValueError, match="mask is on the meta device"):
        masks.from_dense(torch.ones(32, 32, dtype=torch.bool, device="meta"), block_size=16)
    with pytest.raises(ValueError, match="q is on the meta device"):
        masks.vertical_slash(meta, meta, block_size=16)
    with pytest.raises(ValueError, match="q is on device 'meta'"):
        masks.xattention(meta, meta, stride=4, block_size=16)
    scores = masks.antidiagonal_block_scores(meta, meta, 4, 16)
    assert scores.device.type == "meta" and scores.shape == (1, 2, 4, 4) and scores.dtype == torch.float32


@pytest.mark.parametrize("nq,nk", [(0, 0), (0, 40), (40, 0)])
@pytest.mark.parametrize("estimator", ["xattention", "xattention_noncausal", "vertical_slash"])
def test_estimators_without_queries_or_keys_give_an_empty_mask(estimator, nq, nk):
    """N = 0 on either side: an empty BlockMask, the same one as causal(nq, nk), no kernel launched."""
    from minikernels.testing import randn

    q, k = randn(1, 2, nq, 16), randn(1, 1, nk, 16)
    if estimator == "vertical_slash":
        bm = masks.vertical_slash(q, k, block_size=16)
    else:
        bm = masks.xattention(q, k, stride=4, block_size=16, causal=estimator == "xattention")
        keep = masks.xattention_blocks(q, k, stride=4, block_size=16)
        assert keep.dtype == torch.bool and keep.shape == (bm.n_q_blocks, bm.n_kv_blocks)
    want = masks.causal(nq, nk, block_size=16)
    assert (bm.q_len, bm.kv_len, bm.visited_blocks()) == (nq, nk, 0)
    for name in FIELDS:
        assert torch.equal(getattr(bm, name), getattr(want, name)), name
    scores = masks.antidiagonal_block_scores(q, k, 4, 16)
    assert scores.shape == (1, 2, bm.n_q_blocks, bm.n_kv_blocks)


def test_estimators_without_batch_or_heads():
    """B = 0 (or no heads): nothing to score, so xattention keeps only the diagonal blocks (causal) or
    nothing; vertical_slash keeps its fixed first key and main diagonal."""
    from minikernels.testing import randn

    for shape in ((0, 2, 64, 16), (1, 0, 64, 16)):
        q = randn(*shape)
        kinds = masks.xattention(q, q, stride=4, block_size=16).to_block_dense()
        assert torch.equal(kinds > 0, torch.eye(4, dtype=torch.bool, device=q.device))
        assert masks.xattention(q, q, stride=4, block_size=16, causal=False).visited_blocks() == 0
        dense = masks.vertical_slash(q, q, n_vertical=1, n_slash=1, block_size=16).to_dense()
        assert dense[:, 0].all() and dense.diagonal().all()
        assert masks.antidiagonal_block_scores(q, q, 4, 16).shape == (*shape[:2], 4, 4)


def test_antidiagonal_does_not_import_masks():
    """masks imports antidiagonal (the scoring kernels); antidiagonal never imports masks, not even
    inside a function: no import cycle."""
    import ast
    import inspect

    from minikernels import antidiagonal

    for node in ast.walk(ast.parse(inspect.getsource(antidiagonal))):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        assert not any(n == "masks" or n.endswith(".masks") for n in names), ast.dump(node)


def _qk(nq=64, nk=64, h=2, hkv=2, d=16, dtype=torch.float32):
    from minikernels.testing import randn

    return randn(1, h, nq, d, dtype=dtype), randn(1, hkv, nk, d, dtype=dtype)


BAD_ARGUMENTS = [
    # (call, exception, message): wrong types raise TypeError, wrong values ValueError, naming the argument
    (lambda: masks.from_dense([[True]]), TypeError, "mask must be a bool tensor .*got list"),
    (lambda: masks.from_dense(torch.ones(4, 4)), TypeError, "mask must be a bool tensor .*got dtype float32"),
    (lambda: masks.from_dense(torch.ones(4, dtype=torch.bool)), ValueError, r"mask must be .*got shape \(4,\)"),
    (lambda: masks.from_dense(torch.ones(4, 4, dtype=torch.bool), block_size="16"), TypeError, "block_size"),
    (lambda: masks.from_dense(torch.ones(4, 4, dtype=torch.bool), block_size=24), ValueError, "block_size"),
    (lambda: masks.from_mask_fn(3, 32, 32), TypeError, "mask_fn must be callable"),
    (lambda: masks.from_mask_fn(lambda i, j: i >= j, 1.5, 32), TypeError, "q_len must be a non-negative int"),
    (lambda: masks.from_mask_fn(lambda i, j: i >= j, -1, 32), ValueError, "q_len must be a non-negative int"),
    (lambda: masks.from_mask_fn(lambda i, j: i >= j, 32, "32"), TypeError, "kv_len must be a non-negative int"),
    (lambda: masks.from_mask_fn(lambda i, j: i >= j, 32, -2), ValueError, "kv_len must be a non-negative int"),
    (lambda: masks.from_mask_fn(lambda i, j: i >= j, 32, 32, True), TypeError, "block_size must be a power of two"),
    (lambda: masks.from_mask_fn(lambda i, j: i >= j, 32, 32, 8), ValueError, "block_size must be a power of two"),
    (lambda: masks.causal(None), TypeError, "q_len"),
    (lambda: masks.causal(32, -1), ValueError, "kv_len"),
    (lambda: masks.causal(32, 32.0), TypeError, "kv_len"),
    (lambda: masks.causal(32, block_size=48), ValueError, "block_size"),
    (lambda: masks.causal(32, block_size=64.0), TypeError, "block_size"),
    (lambda: masks.sliding_window(-1, 4), ValueError, "q_len"),
    (lambda: masks.sliding_window(64, 0), ValueError, "window must be a positive int"),
    (lambda: masks.sliding_window(64, 2.0), TypeError, "window must be a positive int"),
    (lambda: masks.sliding_window(64, 4, block_size=0), ValueError, "block_size"),
    (lambda: masks.dilated(64, 4, 0), ValueError, "dilation must be a positive int"),
    (lambda: masks.dilated(64, 4, "2"), TypeError, "dilation must be a positive int"),
    (lambda: masks.dilated(64, -4, 2), ValueError, "window must be a positive int"),
    (lambda: masks.dilated("64", 4, 2), TypeError, "q_len"),
    (lambda: masks.a_shape(64, -1, 8), ValueError, "sink must be a non-negative int"),
    (lambda: masks.a_shape(64, 1.0, 8), TypeError, "sink must be a non-negative int"),
    (lambda: masks.a_shape(64, 2, 0), ValueError, "window must be a positive int"),
    (lambda: masks.a_shape(-64, 2, 8), ValueError, "q_len"),
    (lambda: masks.neighborhood_2d(0, 8, 3), ValueError, "height must be a positive int"),
    (lambda: masks.neighborhood_2d(8, "8", 3), TypeError, "width must be a positive int"),
    (lambda: masks.neighborhood_2d(8, 8, 0), ValueError, "kernel must be a positive int"),
    (lambda: masks.neighborhood_2d(8, 8, 3, 1.5), TypeError, "dilation must be a positive int"),
    (lambda: masks.neighborhood_2d(4, 4, 3, 2), ValueError, "kernel \\* dilation = 6 must fit"),
    (lambda: masks.neighborhood_2d(8, 8, 3, block_size=20), ValueError, "block_size"),
    (lambda: masks.vertical_slash([1.0], _qk()[1]), TypeError, "q must be a floating-point tensor .*got list"),
    (lambda: masks.vertical_slash(_qk()[0].long(), _qk()[1]), TypeError, "q must be .*got dtype int64"),
    (lambda: masks.vertical_slash(_qk()[0], _qk()[1].to(torch.complex64)), TypeError, "k must be .*complex64"),
    (lambda: masks.vertical_slash(_qk()[0][0], _qk()[1]), ValueError, "q must be .*got shape"),
    (lambda: masks.vertical_slash(*_qk(d=0)), ValueError, "q must have a head dimension D >= 1"),
    (lambda: masks.vertical_slash(*_qk(h=2, hkv=3)), ValueError, "k heads dividing q heads"),
    (lambda: masks.vertical_slash(*_qk(h=2, hkv=0)), ValueError, "k heads dividing q heads"),
    (lambda: masks.vertical_slash(*_qk(), n_vertical=0), ValueError, "n_vertical must be a positive int"),
    (lambda: masks.vertical_slash(*_qk(), n_slash="4"), TypeError, "n_slash must be a positive int"),
    (lambda: masks.vertical_slash(*_qk(), last_q=0), ValueError, "last_q must be a positive int"),
    (lambda: masks.vertical_slash(*_qk(), last_q=8.0), TypeError, "last_q must be a positive int"),
    (lambda: masks.vertical_slash(*_qk(), block_size=24), ValueError, "block_size"),
    (lambda: masks.vertical_slash(_qk()[0], _qk()[1].to("meta")), ValueError, "different devices"),
    (lambda: masks.antidiagonal_block_scores(*_qk(), 0, 16), ValueError, "stride must be a positive int"),
    (lambda: masks.antidiagonal_block_scores(*_qk(), 2.0, 16), TypeError, "stride must be a positive int"),
    (lambda: masks.antidiagonal_block_scores(*_qk(), 5, 16), ValueError, "stride=5 must divide block_size=16"),
    (lambda: masks.antidiagonal_block_scores(*_qk(), 4, "16"), TypeError, "block_size"),
    (lambda: masks.antidiagonal_block_scores(_qk()[0], None, 4, 16), TypeError, "k must be a floating-point"),
    (lambda: masks.antidiagonal_block_scores(*_qk(nq=64), 4, 16, causal="yes"), TypeError, "causal must be a bool"),
    (lambda: masks.xattention(*_qk(), threshold="0.9", block_size=16), TypeError, "threshold must be a real number"),
    (lambda: masks.xattention(*_qk(), threshold=True, block_size=16), TypeError, "threshold must be a real number"),
    (lambda: masks.xattention(*_qk(), threshold=1.5, block_size=16), ValueError, "threshold must be in"),
    (lambda: masks.xattention(*_qk(), threshold=float("nan"), block_size=16), ValueError, "threshold must be in"),
    (lambda: masks.xattention(*_qk(), stride=None, block_size=16), TypeError, "stride must be a positive int"),
    (lambda: masks.xattention(*_qk(), block_size=12), ValueError, "block_size"),
    (lambda: masks.xattention(*_qk(d=0), block_size=16), ValueError, "q must have a head dimension"),
    (lambda: masks.xattention_blocks(_qk()[0], _qk(nq=64)[0][:, :1].expand(2, 1, 64, 16)), ValueError,
     "same B and D"),
    (lambda: masks.xattention_blocks(*_qk(), threshold=0, block_size=16), ValueError, "threshold must be in"),
    (lambda: masks.xattention_blocks(*_qk(dtype=torch.float16), stride=3, block_size=16), ValueError,
     "stride=3 must divide"),
]


@pytest.mark.parametrize("call,error,message", BAD_ARGUMENTS, ids=range(len(BAD_ARGUMENTS)))
def test_bad_arguments_name_themselves(call, error, message):
    """Every public builder: a wrong type raises TypeError, a wrong value ValueError, and the message
    names the argument (and what it expected)."""
    with pytest.raises(error, match=message):
        call()
