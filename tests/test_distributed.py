"""mk.distributed: ring and Ulysses attention across processes, against single-device mk.flash_attention on the
gathered sequence and the float64 reference, forward and every gradient.

One spawn of 4 gloo processes on localhost serves every multi-rank case (starting processes is most of the
cost on a CPU): cases on the whole group of 4, and cases on two groups of 2 ([0, 1] and [2, 3]) that run at
the same time, which also exercises the ``group`` argument. Each rank saves its output and gradient shards;
the checks run here, in the test process.
"""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import minikernels as mk
from minikernels.distributed import causal_pairs, contiguous_chunks, visible_block, zigzag_chunks
from minikernels.testing import assert_close, randn, strided_like, tolerance

WORLD = 4
GROUPS = {"all": [0, 1, 2, 3], "01": [0, 1], "23": [2, 3]}
# name: (group, op, causal, H, Hkv, shard length, D, dtype, strided inputs)
CASES = {
    "ring-4": ("all", "ring", False, 4, 4, 9, 16, torch.float32, False),
    "ring-4-causal-gqa": ("all", "ring", True, 4, 2, 12, 16, torch.float32, False),
    "ulysses-4-causal-gqa-repeat": ("all", "ulysses", True, 4, 2, 8, 16, torch.float32, False),
    "ulysses-4": ("all", "ulysses", False, 8, 8, 7, 32, torch.float32, False),
    "ring-2-causal": ("01", "ring", True, 2, 2, 16, 32, torch.float32, True),
    "ring-2-causal-fp16": ("01", "ring", True, 4, 1, 10, 16, torch.float16, False),
    "ring-2-gqa": ("23", "ring", False, 4, 2, 16, 16, torch.float32, False),
    "ulysses-2-causal-gqa": ("23", "ulysses", True, 4, 2, 16, 16, torch.float32, True),
}


def _inputs(case):
    """The whole sequence's q, k, v and output gradient, the same in every process."""
    _, _, _, H, Hkv, n, D, dtype, _ = CASES[case]
    P = len(GROUPS[CASES[case][0]])
    seed = sorted(CASES).index(case) * 10
    q = randn(1, H, P * n, D, dtype=dtype, seed=seed)
    k = randn(1, Hkv, P * n, D, dtype=dtype, seed=seed + 1)
    v = randn(1, Hkv, P * n, D, dtype=dtype, seed=seed + 2)
    do = randn(1, H, P * n, D, dtype=dtype, seed=seed + 3)
    return q, k, v, do


def _errors(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _worker(rank, out_dir):
    torch.set_num_threads(1)  # 4 processes share the CPU
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=WORLD)
    # every rank creates every group; the cases on all four ranks use the default group (group=None)
    groups = {name: dist.new_group(ranks) if name != "all" else None for name, ranks in GROUPS.items()}
    ops = {"ring": mk.distributed.ring_attention, "ulysses": mk.distributed.ulysses_attention}
    for case, (group_name, op, causal, _, _, n, _, _, strided) in CASES.items():
        ranks = GROUPS[group_name]
        if rank not in ranks:
            continue
        r = ranks.index(rank)
        q, k, v, do = (t[:, :, r * n:(r + 1) * n] for t in _inputs(case))
        q, k, v = (strided_like(t) if strided else t.clone() for t in (q, k, v))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        with mk.distributed.record_timeline() as events:
            out = ops[op](q, k, v, causal=causal, group=groups[group_name])
            out.backward(do)
        torch.save({"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "events": events},
                   f"{out_dir}/{case}.{r}.pt")
    # bad inputs, on the group of 4
    x = randn(1, 2, 6, 16)
    errors = {
        "odd causal shard": _errors(mk.distributed.ring_attention, randn(1, 2, 5, 16), randn(1, 2, 5, 16),
                                    randn(1, 2, 5, 16), causal=True),
        "heads not divisible": _errors(mk.distributed.ulysses_attention, x, x, x),
        "shard lengths differ": _errors(mk.distributed.ring_attention, x, randn(1, 2, 4, 16), randn(1, 2, 4, 16)),
    }
    if rank == 0:
        with open(f"{out_dir}/errors.json", "w") as f:
            json.dump(errors, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    if mk.backend() == "cuda":  # the kernels then take only GPU tensors, which gloo's point-to-point cannot send
        pytest.skip("gloo processes run CPU tensors (the interpreter); on GPUs, test_gpu_nccl_every_dtype runs "
                    "the ranks on NCCL")
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(out_dir),), nprocs=WORLD, join=True)
    return out_dir


@pytest.mark.parametrize("case", list(CASES))
def test_equals_single_device_flash(run_dir, case):
    """Output and dq, dk, dv of the shards, gathered, equal single-device flash attention on the whole sequence
    and the float64 reference."""
    group_name, _, causal, _, _, _, _, dtype, _ = CASES[case]
    shards = [torch.load(run_dir / f"{case}.{r}.pt") for r in range(len(GROUPS[group_name]))]
    got = {key: torch.cat([s[key] for s in shards], dim=2) for key in ("out", "dq", "dk", "dv")}
    q, k, v, do = (t.requires_grad_() for t in _inputs(case))
    flash = mk.flash_attention(q, k, v, causal=causal)
    want = {"out": flash, **dict(zip(("dq", "dk", "dv"), torch.autograd.grad(flash, (q, k, v), do)))}
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = mk.reference.flash_attention(*r, causal=causal)
    exact = {"out": ref, **dict(zip(("dq", "dk", "dv"), torch.autograd.grad(ref, r, do.double())))}
    for key in got:
        assert got[key].dtype == dtype and got[key].shape == want[key].shape, key
        assert_close(got[key], exact[key], dtype, name=f"{case} {key} vs float64")
        assert_close(got[key], want[key].to(torch.float64), dtype, name=f"{case} {key} vs single-device flash")


def test_ring_timeline_records_every_step(run_dir):
    """The recorder sees P compute steps forward and backward, P - 1 key/value transfers each way, and in the
    backward P hops of the gradient accumulators (the last one brings them home); every interval has a start
    before its end."""
    events = torch.load(run_dir / "ring-4.1.pt")["events"]

    def count(phase, kind):
        return sum(e["phase"] == phase and e["kind"] == kind for e in events)
    assert count("fwd", "compute") == WORLD and count("bwd", "compute") == WORLD
    assert count("fwd", "transfer") == WORLD - 1 and count("bwd", "transfer") == WORLD - 1
    assert count("bwd", "gradient transfer") == WORLD and count("fwd", "gradient transfer") == 0
    assert count("fwd", "wait") == WORLD - 1
    assert all(e["end"] >= e["start"] for e in events)
    fwd = [e for e in events if e["phase"] == "fwd" and e["kind"] == "compute"]
    assert [e["step"] for e in fwd] == list(range(WORLD))


def test_bad_inputs_raise_clearly(run_dir):
    errors = json.loads((run_dir / "errors.json").read_text())
    assert errors["odd causal shard"].startswith("ValueError") and "must be even, got 5" in errors["odd causal shard"]
    assert errors["heads not divisible"].startswith("ValueError") and "H=2 must be divisible by P" in \
        errors["heads not divisible"]
    assert errors["shard lengths differ"].startswith("ValueError") and "same length" in errors["shard lengths differ"]


# --------------------------------------------------------------------------------------------------
# in this process: no process group, then a group of one
# --------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_needs_an_initialized_process_group():
    assert not dist.is_initialized()  # importing minikernels started none
    x = randn(1, 2, 4, 16)
    for fn in (mk.distributed.ring_attention, mk.distributed.ulysses_attention):
        with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
            fn(x, x, x)


@pytest.fixture
def group_of_one(tmp_path):
    backend = "nccl" if mk.backend() == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_inputs_checked_before_any_transfer(group_of_one):
    x = randn(1, 2, 4, 16)
    for fn in (mk.distributed.ring_attention, mk.distributed.ulysses_attention):
        with pytest.raises(TypeError, match="k has dtype int32"):
            fn(x, x.to(torch.int32), x)
        with pytest.raises(ValueError, match=r"q must have 4 dimensions \[B, H, N, D\]"):
            fn(x[0], x, x)
        with pytest.raises(TypeError, match="causal must be a bool"):
            fn(x, x, x, causal=1)
        with pytest.raises(ValueError, match=r"heads \(3\) must divide q heads \(2\)"):
            fn(x, randn(1, 3, 4, 16), randn(1, 3, 4, 16))


@pytest.mark.parametrize("causal", [False, True])
def test_group_of_one_is_flash_attention(group_of_one, causal):
    """With one rank there is nothing to exchange: both functions are flash attention (odd lengths allowed)."""
    q, k, v = (randn(2, 4, 13, 16, seed=s).requires_grad_() for s in range(3))
    do = randn(2, 4, 13, 16, seed=3)
    want = mk.flash_attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(want, (q, k, v), do)
    for fn in (mk.distributed.ring_attention, mk.distributed.ulysses_attention):
        got = fn(q, k, v, causal=causal)
        assert_close(got, want, torch.float32, tol=tolerance(torch.float32) / 10)
        for g, w in zip(torch.autograd.grad(got, (q, k, v), do), grads):
            assert_close(g, w, torch.float32, tol=tolerance(torch.float32) / 10)


# --------------------------------------------------------------------------------------------------
# the partition, without processes
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_zigzag_balances_causal_work(world):
    """Every chunk is held exactly once in each layout; under a causal mask the zigzag layout gives every
    rank the same number of visible pairs, the contiguous one gives rank r a share growing with r; the
    total is the causal count N (N + 1) / 2 either way."""
    n = 8
    N = world * n
    for chunks in (zigzag_chunks, contiguous_chunks):
        assert sorted(c for r in range(world) for c in chunks(r, world)) == list(range(2 * world))
    zig, cont = causal_pairs(world, n, zigzag=True), causal_pairs(world, n, zigzag=False)
    assert zig.sum() == cont.sum() == N * (N + 1) // 2
    assert len(set(zig.sum(1).tolist())) == 1
    assert cont.sum(1).tolist() == sorted(cont.sum(1).tolist())


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_visible_block_matches_the_mask(world):
    """The block each rank computes at each ring step holds exactly the visible pairs of the causal mask:
    what it skips is masked, and its mask flag is set only where the block holds a masked pair."""
    n = 6
    half = n // 2

    def positions(rank):  # global positions of a rank's zigzag shard
        return torch.cat([torch.arange(c * half, (c + 1) * half) for c in zigzag_chunks(rank, world)])
    for rank in range(world):
        for source in range(world):
            rows, cols, masked = visible_block(rank, source, True, n)
            qp, kp = positions(rank), positions(source)
            visible = kp[None, :] <= qp[:, None]
            inside = torch.zeros_like(visible)
            inside[rows, cols] = True
            assert not (visible & ~inside).any(), (rank, source)  # nothing visible is skipped
            block = visible[rows, cols]
            assert masked == bool((~block).any()), (rank, source)
            if masked:  # the kernel's causal mask on the block is the true one
                assert torch.equal(block, torch.ones_like(block).tril())


def test_merge_is_chapter_one_merge():
    """Merging the results over two key halves gives the result over all keys; an empty side weighs nothing."""
    q, k, v = randn(1, 2, 5, 16, seed=0), randn(1, 2, 12, 16, seed=1), randn(1, 2, 12, 16, seed=2)
    whole, lse = mk.flash_attention(q, k, v, return_lse=True)
    o_a, lse_a = mk.flash_attention(q, k[:, :, :7], v[:, :, :7], return_lse=True)
    o_b, lse_b = mk.flash_attention(q, k[:, :, 7:], v[:, :, 7:], return_lse=True)
    out, merged = o_a.clone(), lse_a.clone()
    mk.distributed.merge(out, merged, o_b, lse_b)
    assert_close(out, whole, torch.float32)
    assert_close(merged, lse, torch.float32)
    empty = torch.full_like(lse_b, float("-inf"))
    mk.distributed.merge(out, merged, torch.full_like(o_b, 7.0), empty)
    assert_close(out, whole, torch.float32)
    none, none_lse = torch.zeros_like(o_a), torch.full_like(lse_a, float("-inf"))
    mk.distributed.merge(none, none_lse, torch.zeros_like(o_a), empty)
    assert not none.isnan().any() and torch.isneginf(none_lse).all()


# --------------------------------------------------------------------------------------------------
# GPU: several GPUs of one host (NCCL), when lent
# --------------------------------------------------------------------------------------------------

def _gpu_worker(rank, world, port, out_dir):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (64, 128):
            for causal in (False, True):
                for op, fn in (("ring", mk.distributed.ring_attention), ("ulysses", mk.distributed.ulysses_attention)):
                    n = 1024
                    H, Hkv = 8, 2
                    gen = torch.Generator().manual_seed(d + causal)
                    full = [torch.randn(1, h, world * n, d, generator=gen).to(dtype) for h in (H, Hkv, Hkv, H)]
                    q, k, v, do = (t[:, :, rank * n:(rank + 1) * n].cuda().requires_grad_(i < 3)
                                   for i, t in enumerate(full))
                    out = fn(q, k, v, causal=causal)
                    out.backward(do)
                    r = [t.double().cuda().requires_grad_() for t in full[:3]]  # every rank checks its shard
                    ref = mk.reference.flash_attention(*r, causal=causal)
                    ref.backward(full[3].double().cuda())
                    mine = slice(rank * n, (rank + 1) * n)
                    errs = [mk.testing.rel_error(out, ref[:, :, mine])]
                    errs += [mk.testing.rel_error(g.grad, w.grad[:, :, mine]) for g, w in zip((q, k, v), r)]
                    results[f"{op} {dtype} d{d} causal={causal} rank {rank}"] = (errs, tolerance(dtype))
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    results = {key: val for per_rank in everyone for key, val in per_rank.items()}
    if rank == 0:
        with open(os.path.join(out_dir, "gpu.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
def test_gpu_nccl_every_dtype(tmp_path):
    world = min(torch.cuda.device_count(), 4)
    mp.spawn(_gpu_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = json.loads((tmp_path / "gpu.json").read_text())
    for name, (errs, tol) in results.items():
        assert all(e <= tol for e in errs), (name, errs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", mk.testing.test_dtypes())
@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_gpu_group_of_one_dtypes_and_head_dims(group_of_one, dtype, d):
    """One GPU can hold one NCCL rank: the whole code path (stacking, merging, the backward's accumulators,
    the all-to-all of one) at every dtype and head dim, long sequences."""
    q, k, v = (randn(1, 8, 4096, d, dtype=dtype, seed=s).requires_grad_() for s in range(3))
    do = randn(1, 8, 4096, d, dtype=dtype, seed=3)
    for causal in (False, True):
        want = mk.flash_attention(q, k, v, causal=causal)
        grads = torch.autograd.grad(want, (q, k, v), do)
        for fn in (mk.distributed.ring_attention, mk.distributed.ulysses_attention):
            got = fn(q, k, v, causal=causal)
            assert_close(got, want.double(), dtype)
            for g, w in zip(torch.autograd.grad(got, (q, k, v), do), grads):
                assert_close(g, w.double(), dtype)
