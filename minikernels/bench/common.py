"""What every benchmark shares: the environment recorded with each run, the timers, the measured
ceilings (copy bandwidth, bf16 matmul, exponentials), the table printed at the end, and the rows of
the parameter sweeps under ``book/data/bench/runs/``."""

from __future__ import annotations

import datetime as _dt
import json
import time

import torch
import triton
import triton.language as tl


def environment() -> dict:
    """Date, GPU name and library versions, stored with every result."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


def do_bench(fn, ms_warmup: int = 25, ms_rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=ms_warmup, rep=ms_rep, return_mode="median"))


def do_bench_graph(fn, ms_rep: int = 100) -> float:
    # median of CUDA-graph replays: no launch gaps, no host time
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=ms_rep, return_mode="median"))


def measure_ceilings() -> dict:
    """Copy bandwidth (1 GiB, bytes read + written) and the bf16 matmul rate (8192^3) on this GPU."""
    n_bytes = 1 << 30
    x = torch.randn(n_bytes // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t_copy = do_bench(lambda: y.copy_(x))
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t_mm = do_bench(lambda: a @ b)
    return {
        "copy_GBps": 2 * n_bytes / (t_copy * 1e-3) / 1e9,
        "copy_ms_1GiB": t_copy,
        "matmul_bf16_TFLOPs": 2 * n**3 / (t_mm * 1e-3) / 1e12,
        "matmul_ms_8192": t_mm,
    }


def exponentials_ms(count: int, polynomial: bool = False) -> float:
    """Milliseconds this GPU takes to compute ``count`` values of 2^x and nothing else: 16 programs of
    4 warps an SM, each thread summing 8 independent chains so no latency shows, and no memory traffic
    but one store a thread. With ``tl.exp2`` (the special-function unit's instruction, as the scan's
    decays use it) this is a floor for any kernel that takes each of ``count`` exponentials with that
    instruction. ``polynomial=True`` times the alternative on the multiply-add units instead
    (`exp2_polynomial`, float32-accurate), the trick FlashAttention-4 uses for part of softmax's."""
    block, warps = 1024, 4
    programs = 16 * torch.cuda.get_device_properties(0).multi_processor_count
    steps = -(-count // (programs * block))
    out = torch.empty(programs * block, device="cuda")
    ms = do_bench(lambda: exp2_only[(programs,)](out, steps, BLOCK=block, POLYNOMIAL=polynomial,
                                                   num_warps=warps))
    return ms * count / (programs * block * steps)  # the few extra values the rounding added


@triton.jit
def exp2_polynomial(x):
    # 2^x = 2^j * 2^f with j = round(x), f in [-1/2, 1/2]: 2^f by a degree-5 polynomial (1 + least
    # squares in relative error, within 1.1e-7 of 2^f; exact at f = 0, so integers give exact powers
    # of two), 2^j by adding j to the float's exponent bits. Every instruction runs on the multiply-add
    # and integer units, none on the special-function unit. For x up to 127; below -126 it returns
    # 2^-126 where 2^x would be subnormal or 0 (as a decay, either wipes a state out).
    x = tl.maximum(x, -126.0)
    t = x + 12582912.0  # 1.5 * 2^23: the sum's low mantissa bits hold round(x)
    f = x - (t - 12582912.0)
    p = 1.0 + f * (0.6931468844413757 + f * (0.24022237956523895 + f * (
        0.05550893023610115 + f * (0.009671698324382305 + f * 0.0013218672247603536))))
    j = t.to(tl.int32, bitcast=True) - 0x4B400000  # the bits of 12582912.0: what is left is round(x)
    return (p.to(tl.int32, bitcast=True) + (j << 23)).to(tl.float32, bitcast=True)


@triton.jit
def exp2_only(OUT, steps, BLOCK: tl.constexpr, POLYNOMIAL: tl.constexpr = False):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = (offs % 1024).to(tl.float32) * -1e-3  # a different argument in every lane
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(steps):
        x = x - 1e-6  # a new argument every step, so nothing is hoisted out of the loop
        if POLYNOMIAL:
            acc += exp2_polynomial(x)
        else:
            acc += tl.exp2(x)
    tl.store(OUT + offs, acc)  # the sums are stored: the exponentials cannot be dropped


_L2_FLUSH_BYTES = 256 << 20  # rotate buffers until this much is touched: several times the H200's L2


def n_buffer_sets(bytes_per_set: int) -> int:
    return max(2, -(-_L2_FLUSH_BYTES // bytes_per_set))


def time_rotating(calls) -> tuple[float, str]:
    """Median milliseconds of one call, cycling through ``calls`` (one per buffer set, so no call finds
    its inputs in L2). The calls are captured in a CUDA graph and replayed, so Python launch overhead
    (~10-20 us, as long as a whole small kernel) is not what is measured; falls back to plain
    ``do_bench`` for code that cannot be captured. Returns (ms, method)."""
    import triton.testing

    def run_all():
        for c in calls:
            c()

    try:
        ms = triton.testing.do_bench_cudagraph(run_all, rep=100, return_mode="median")
        return float(ms) / len(calls), "cuda-graph"
    except Exception:
        torch.cuda.synchronize()
        return do_bench(run_all) / len(calls), "do_bench"


def progress(row: dict) -> None:
    """One line per measurement as it is taken (the table comes at the end of an op)."""
    print(f"  {row['impl']} {row['pass']} {row['shape']}: {row['ms']:.3f} ms", flush=True)


def print_table(op: str, rows: list[dict], ceilings: dict) -> None:
    """One line per (pass, dtype, shape): each implementation's rate, then ours relative to the copy
    ceiling (memory-bound ops) and the speedup of ours over each anchor (their time / our time)."""
    metric = next(m for m in ("GBps", "TFLOPs", "Mtokps", "ktokps") if m in rows[0])
    unit = {"GBps": "GB/s of bytes that must move", "TFLOPs": "TFLOP/s", "Mtokps": "million tokens/s",
            "ktokps": "thousand tokens/s"}[metric]
    print(f"\n== {op}: {unit}; copy ceiling {ceilings['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s ==")
    rows = [{"shape": f"{r.get('M')}x{r.get('N')}", **r} for r in rows]  # runs before 'shape' was recorded
    keys = list(dict.fromkeys((r["pass"], r["dtype"], r["shape"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = max(12, *(len(k[2]) for k in keys))
    head = f"{'pass':4} {'dtype':8} {'shape':>{width}} " + " ".join(f"{i:>14}" for i in impls)
    if metric == "GBps":
        head += "  ours/copy"
    head += " " + " ".join(f"{'vs ' + i:>18}" for i in impls[1:])
    print(head)
    for key in keys:
        by = {r["impl"]: r for r in rows if (r["pass"], r["dtype"], r["shape"]) == key}
        line = f"{key[0]:4} {key[1]:8} {key[2]:>{width}} "
        line += " ".join(f"{by[i][metric]:>14.0f}" if i in by else f"{'-':>14}" for i in impls)
        ours = by.get("minikernels")
        if metric == "GBps":
            line += f"  {ours['frac_of_copy']:>9.0%}" if ours else f"  {'-':>9}"
        for i in impls[1:]:
            line += f" {by[i]['ms'] / ours['ms']:>17.2f}x" if ours and i in by else f" {'-':>18}"
        print(line)


class Sweep:
    """The rows of a parameter sweep (the scripts under ``book/data/bench/runs/``): each call is checked
    against a reference output, then timed with ``time_rotating`` (on a GPU; 0 ms elsewhere, where a
    sweep only checks that its rows run). Rows stop being taken after ``budget_s`` seconds, so a sweep
    fits the time of one GPU call and records what it reached."""

    def __init__(self, budget_s: float, tolerance: float = 6e-2):
        self.rows: list[dict] = []
        self.budget_s, self.tolerance = budget_s, tolerance
        self.start = time.time()

    def over_budget(self) -> bool:
        return time.time() - self.start > self.budget_s

    def time(self, name: str, call, n_bytes: int, want: torch.Tensor, **meta) -> float | None:
        """Check ``call()`` against ``want`` (relative Frobenius error), time it, append and print a row
        ``{name, ms, GBps (n_bytes over the time), err, **meta}``; None when over budget or when the call
        fails or disagrees (printed, not raised: one failing configuration should not end a sweep)."""
        if self.over_budget():
            return None
        try:
            got = call().float()
            err = ((got - want).norm() / want.norm()).item()
            if not err < self.tolerance:
                raise AssertionError(f"relative error {err}")
            ms = time_rotating([call])[0] if torch.cuda.is_available() else 0.0
        except Exception as exc:
            print(f"{name} {meta}: failed {type(exc).__name__} {str(exc)[:200]}", flush=True)
            return None
        row = {"name": name, "ms": ms, "GBps": n_bytes / ms / 1e6 if ms else 0.0, "err": err, **meta}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return ms


def compiled_kernels(*kernels) -> list[dict]:
    """What the compiler made of each Triton kernel in ``kernels`` so far (every specialization on every
    device): its module, registers a thread, spilled bytes, shared memory, warps, stages and the key it
    was compiled for (its last 400 characters), as the sweeps record beside their rows. Empty under the
    interpreter, which compiles nothing."""
    rows = []
    for kernel in kernels:
        for _device, caches in getattr(kernel, "device_caches", {}).items():
            for key, compiled in caches[0].items():
                md = compiled.metadata
                rows.append({"module": kernel.__module__, "shared": getattr(md, "shared", None),
                             "regs": getattr(compiled, "n_regs", None), "spills": getattr(compiled, "n_spills", None),
                             "num_warps": getattr(md, "num_warps", None), "num_stages": getattr(md, "num_stages", None),
                             "key": str(key)[-400:]})
    return rows


def module_with_edits(module, edits: list[tuple[str, str]], name: str):
    """``module``'s source with each ``(old, new)`` of ``edits`` applied, loaded as module ``name`` from a
    file (Triton reads a kernel's source from its file): a variant of a kernel module for a sweep,
    without a copy of it. Raises RuntimeError when an ``old`` does not occur exactly once (the module
    changed since the edits were written)."""
    import importlib.util
    import os
    import sys
    import tempfile

    source = open(module.__file__).read()
    for old, new in edits:
        if source.count(old) != 1:
            raise RuntimeError(f"{module.__name__} does not fit the edit: {old!r} not found once")
        source = source.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(), name.rsplit(".", 1)[-1] + ".py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    variant = importlib.util.module_from_spec(spec)
    sys.modules[name] = variant
    spec.loader.exec_module(variant)
    return variant


def with_override(fn, key: str, value):
    """``fn`` run under ``planning.override({key: value})``; ``fn`` itself when ``value`` is None."""
    if value is None:
        return fn
    from .. import planning

    def call(*args, **kwargs):
        with planning.override({key: value}):
            return fn(*args, **kwargs)
    return call
