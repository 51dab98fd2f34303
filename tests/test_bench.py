"""The benchmark's own kernels: the floors it reports must come from the work they claim to do."""

import pytest
import torch
import triton
import triton.language as tl

import minikernels as mk
from minikernels import bench


@pytest.mark.parametrize("polynomial", [False, True], ids=["exp2", "polynomial"])
def test_exp2_only_sums_the_exponentials_it_claims(polynomial):
    # each lane sums 2^(x0 - k 1e-6) for k = 1..steps, x0 = -(lane % 1024) 1e-3: checked against PyTorch
    programs, block, steps = 2, 1024, 5
    out = torch.full((programs * block,), float("nan"), device=mk.device())
    bench.exp2_only[(programs,)](out, steps, BLOCK=block, POLYNOMIAL=polynomial)
    x = (torch.arange(programs * block) % 1024).float() * -1e-3
    want = torch.zeros_like(x)
    for _ in range(steps):
        x = x - 1e-6
        want += torch.exp2(x)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=0)


@triton.jit
def _apply_polynomial(X, Y, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, bench.exp2_polynomial(tl.load(X + offs)))


def test_polynomial_exp2_is_float32_accurate():
    # the polynomial stands in for tl.exp2 in the timing, so it must be as good a 2^x: relative error
    # within a few float32 ulps over the whole range it claims, integers, halves and the ends included
    block = 1024
    x = torch.cat([torch.linspace(-126, 127, 64 * block - 512, dtype=torch.float64),
                   torch.arange(-126, 128, dtype=torch.float64),
                   torch.arange(-126, 128, dtype=torch.float64)[:-2] + 0.5])
    x = torch.cat([x, torch.zeros(64 * block - x.numel(), dtype=torch.float64)]).float()
    y = torch.empty_like(x, device=mk.device())
    _apply_polynomial[(x.numel() // block,)](x.to(mk.device()), y, BLOCK=block)
    want = torch.exp2(x.double())
    rel = ((y.cpu().double() - want) / want).abs()
    assert rel.max() < 5e-7, f"max relative error {rel.max():.2e} at x = {x[rel.argmax()]}"
    assert (y.cpu()[x.round() == x] == want[x.round() == x].float()).all()  # powers of two exactly


def test_recorded_runs_are_found_at_an_explicit_place(tmp_path, monkeypatch):
    from minikernels import results

    (tmp_path / "softmax.json").write_text('{"op": "softmax", "rows": []}')
    assert results.recorded("softmax", json_dir=tmp_path)["op"] == "softmax"
    monkeypatch.setenv(results.ENV_VAR, str(tmp_path))
    assert results.recorded_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="no recorded benchmark for 'flash'"):
        results.recorded("flash")
    monkeypatch.delenv(results.ENV_VAR)
    with pytest.raises(FileNotFoundError, match=results.ENV_VAR):  # as in an installed package
        results.recorded_dir(source_checkout=tmp_path / "absent")


def test_bench_patches_no_modules():
    import inspect

    from minikernels import bench

    assert "sys.modules" not in inspect.getsource(bench)


def test_sweep_keeps_checked_rows_and_reports_the_others(capsys):
    from minikernels import planning
    from minikernels.bench.common import Sweep, with_override

    want = torch.ones(4)
    sweep = Sweep(budget_s=600)
    assert sweep.time("right", lambda: torch.ones(4), 8, want, splits=2) is not None
    assert sweep.time("wrong", lambda: torch.zeros(4), 8, want) is None
    assert sweep.time("raises", lambda: 1 / 0, 8, want) is None
    assert [r["name"] for r in sweep.rows] == ["right"] and sweep.rows[0]["splits"] == 2
    printed = capsys.readouterr().out
    assert "wrong" in printed and "ZeroDivisionError" in printed
    late = Sweep(budget_s=-1)
    assert late.time("late", lambda: torch.ones(4), 8, want) is None and late.rows == []
    planned = with_override(lambda: planning.decide("decode.num_splits", lambda: 1), "decode.num_splits", 7)
    assert planned() == 7 and with_override(len, "decode.num_splits", None) is len


def test_compiled_kernels_lists_every_specialization():
    """The sweeps' kernel table: one row per compiled specialization of each kernel, on every device, from
    the compiled kernel's own figures; a kernel never compiled (or interpreted) adds nothing."""
    from types import SimpleNamespace

    from minikernels.bench.common import compiled_kernels

    def compiled(regs, warps):
        return SimpleNamespace(n_regs=regs, n_spills=0, metadata=SimpleNamespace(shared=1024, num_warps=warps,
                                                                                 num_stages=3))
    kernel = SimpleNamespace(__module__="some.module",
                             device_caches={0: ({"a": compiled(168, 4), "b": compiled(92, 8)}, None),
                                            1: ({"c": compiled(100, 4)}, None)})
    rows = compiled_kernels(kernel, SimpleNamespace(__module__="never.compiled"))
    assert [(r["key"], r["regs"], r["num_warps"]) for r in rows] == [("a", 168, 4), ("b", 92, 8), ("c", 100, 4)]
    assert all(r["module"] == "some.module" and r["shared"] == 1024 and r["spills"] == 0 for r in rows)


def test_decode_inputs_count_the_bytes_a_step_reads():
    from minikernels.bench.decoding import decode_inputs

    x = decode_inputs(hkv=2, length=32, device="cpu")
    k, ks = x["k"], x["ks"]
    assert k.shape == (8, 2, 32, 128) and x["kq"].dtype == torch.int8 and x["lens"].tolist() == [32] * 8
    assert x["kv_bytes"] == x["k"].nbytes + x["v"].nbytes
    assert x["int8_bytes"] == x["kq"].nbytes + x["vq"].nbytes + ks.nbytes + x["vs"].nbytes
    again = decode_inputs(hkv=2, length=32, device="cpu")  # the same inputs in every run
    assert all(torch.equal(x[n], again[n]) for n in ("q", "k", "v"))


def test_paged_pools_share_one_table_and_hold_every_key():
    """``paged_pools``: one block table for every tensor of a cache, each pool holding key t of sequence b
    at row t % page of page table[b, t // page] (scales too, stored head-major), the table the same as
    the per-tensor ``_pages`` of the recorded sweeps draws."""
    from minikernels.bench.decoding import _pages, paged_pools

    k = torch.randn(3, 2, 64, 8)
    scales = torch.rand(3, 2, 64)
    table, (kp, sp) = paged_pools(16, k, scales)
    assert table.dtype == torch.int32 and sorted(table.flatten().tolist()) == list(range(12))
    assert torch.equal(table, _pages(k, 16, seed=16)[1]) and torch.equal(kp, _pages(k, 16, seed=16)[0])
    t = torch.arange(64)
    for b in range(3):
        pages = table[b, t // 16].long()
        assert torch.equal(kp[pages, t % 16].transpose(0, 1), k[b])  # [Hkv, L, D]
        assert torch.equal(sp[pages, t % 16].transpose(0, 1), scales[b])
    assert sp.transpose(1, 2).is_contiguous()  # head-major within a page


def test_paired_cases_are_timed_in_turns_and_keep_their_rounds(capsys):
    """``_run`` with rounds: each case whose output matches the reference is timed once a round, in turn
    (A B A B A B), its ms the median of its rounds; a case whose output differs, or that raises, is reported
    and never timed. The rounds are a measurement, not part of the case: the results table still pairs the
    row with the rows of other implementations."""
    from minikernels.bench.decoding import _run
    from minikernels.results import _case

    want = torch.randn(4, 8)

    def a():
        return want.clone()

    def b():
        return want + 1e-6

    def wrong():
        return want * 2

    def broken():
        raise RuntimeError("not installed")

    order = []
    clock = iter([3.0, 5.0, 1.0, 4.0, 8.0, 6.0])  # A B A B A B

    def timer(calls):
        order.append(calls[0])
        return next(clock), "fake"

    cases = [("A", a, 1e9, 1e-3), ("wrong", wrong, 1e9, 1e-3), ("B", b, 1e9, 1e-3), ("broken", broken, 1e9, 1e-3)]
    rows = []
    _run(cases, want, "S", 2, 8, {"copy_GBps": 1000.0}, rows, rounds=3, timer=timer)
    assert order == [a, b, a, b, a, b]
    assert [(r["impl"], r["ms"], r["ms_rounds"]) for r in rows] == [("A", 3.0, [3.0, 1.0, 8.0]),
                                                                    ("B", 5.0, [5.0, 4.0, 6.0])]
    assert rows[0]["GBps"] == 1e9 / 3e-3 / 1e9 and rows[0]["frac_of_copy"] == rows[0]["GBps"] / 1000
    assert rows[0]["timing"] == "fake"
    out = capsys.readouterr().out
    assert "wrong S: failed (AssertionError" in out and "broken S: failed (RuntimeError" in out
    assert _case(rows[0]) == _case({k: v for k, v in rows[0].items() if k != "ms_rounds"})

    once = []
    _run([("A", a, 1e9, 1e-3)], want, "S", 2, 8, {"copy_GBps": 1000.0}, once, timer=lambda calls: (7.0, "fake"))
    assert once[0]["ms"] == 7.0 and "ms_rounds" not in once[0]

    methods = iter(["cuda-graph", "do_bench", "cuda-graph"])  # rounds timed differently: every method is named
    mixed = []
    _run([("A", a, 1e9, 1e-3)], want, "S", 2, 8, {"copy_GBps": 1000.0}, mixed, rounds=3,
         timer=lambda calls: (1.0, next(methods)))
    assert mixed[0]["timing"] == "cuda-graph+do_bench"

    tried = []

    def fails_for_b(calls):  # B cannot be timed at all: A keeps its three rounds
        tried.append(calls[0])
        if calls[0] is b:
            raise torch.OutOfMemoryError("captured")
        return 1.0, "fake"

    left = []
    _run([("A", a, 1e9, 1e-3), ("B", b, 1e9, 1e-3)], want, "S", 2, 8, {"copy_GBps": 1000.0}, left, rounds=3,
         timer=fails_for_b)
    assert tried == [a, b, a, a] and [(r["impl"], r["ms_rounds"]) for r in left] == [("A", [1.0, 1.0, 1.0])]
    assert "B S: failed while timed (OutOfMemoryError" in capsys.readouterr().out


def test_module_with_edits_loads_a_variant_and_refuses_a_misfit(tmp_path):
    """``module_with_edits``: the module's source edited and loaded under another name, the original
    untouched; an edit whose text is not there once raises instead of loading the unedited module."""
    import importlib.util

    from minikernels.bench.common import module_with_edits

    path = tmp_path / "some_kernels.py"
    path.write_text("SCALE = 2\n\n\ndef scaled(x):\n    return SCALE * x\n")
    spec = importlib.util.spec_from_file_location("some_kernels", path)
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)
    variant = module_with_edits(original, [("SCALE = 2\n", "SCALE = 3\n")], "some_kernels_variant")
    assert variant.scaled(5) == 15 and original.scaled(5) == 10
    with pytest.raises(RuntimeError, match="not found once"):
        module_with_edits(original, [("SCALE = 4\n", "SCALE = 5\n")], "some_kernels_misfit")
