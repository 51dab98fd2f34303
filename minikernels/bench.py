"""Benchmarks: ``python -m minikernels.bench --op softmax`` (GPU only).

Times our kernels and the anchors side by side, in one process, with Triton's benchmarking helpers
(median of many repetitions; CUDA-graph replay over rotating buffer sets, so neither launch overhead
nor a warm L2 flatters anyone), prints a table and writes JSON (date, GPU, torch and triton versions,
the measured ceilings, one row per measurement) for the book's figures.

Memory-bound ops are reported in GB/s of bytes that must move (each input read once, each output
written once) and as a fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path

import torch

from . import _backend

OPS = ("softmax",)
RECORDED_DIR = Path(__file__).resolve().parents[1] / "book" / "data" / "bench"


def recorded(op: str) -> dict:
    """The results of an earlier ``python -m minikernels.bench --op <op>`` run, committed under
    ``book/data/bench/``: what the notebooks plot on a machine without a GPU."""
    path = RECORDED_DIR / f"{op}.json"
    if not path.exists():
        raise FileNotFoundError(f"no recorded benchmark for {op!r}: {path} is missing")
    return json.loads(path.read_text())


def environment() -> dict:
    """Date, GPU name and library versions, stored with every result."""
    import triton

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


# --- ceilings -------------------------------------------------------------------------------------

def _do_bench(fn, ms_warmup: int = 25, ms_rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=ms_warmup, rep=ms_rep, return_mode="median"))


def measure_ceilings() -> dict:
    """Copy bandwidth (1 GiB, bytes read + written) and the bf16 matmul rate (8192^3) on this GPU."""
    n_bytes = 1 << 30
    x = torch.randn(n_bytes // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t_copy = _do_bench(lambda: y.copy_(x))
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t_mm = _do_bench(lambda: a @ b)
    return {
        "copy_GBps": 2 * n_bytes / (t_copy * 1e-3) / 1e9,
        "copy_ms_1GiB": t_copy,
        "matmul_bf16_TFLOPs": 2 * n**3 / (t_mm * 1e-3) / 1e12,
        "matmul_ms_8192": t_mm,
    }


# --- timing -------------------------------------------------------------------------------------

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
        return _do_bench(run_all) / len(calls), "do_bench"


# --- softmax --------------------------------------------------------------------------------------

def bench_softmax(ceilings: dict, quick: bool = False) -> list[dict]:
    from . import row_softmax

    rows = []
    m = 4096
    columns = [4096, 32768] if quick else [1024, 4096, 8192, 16384, 32768]
    compiled = torch.compile(lambda t: torch.softmax(t, dim=-1))
    for dtype in (torch.bfloat16, torch.float32):
        for n in columns:
            elt = torch.finfo(dtype).bits // 8
            sets = n_buffer_sets(2 * m * n * elt)
            xs = [torch.randn(m, n, device="cuda", dtype=dtype) for _ in range(sets)]
            dys = [torch.randn(m, n, device="cuda", dtype=dtype) for _ in range(sets)]
            ys = [row_softmax._forward_2d(x) for x in xs]
            # the benchmark checks what it times
            torch.testing.assert_close(ys[0].float(), torch.softmax(xs[0].float(), -1), atol=2e-2, rtol=0)
            fwd_bytes = 2 * m * n * elt  # read x, write y
            bwd_bytes = 3 * m * n * elt  # read y and dy, write dx
            candidates = [
                ("minikernels", "fwd", fwd_bytes, [lambda x=x: row_softmax._forward_2d(x) for x in xs]),
                ("torch.softmax", "fwd", fwd_bytes, [lambda x=x: torch.softmax(x, dim=-1) for x in xs]),
                ("torch.compile", "fwd", fwd_bytes, [lambda x=x: compiled(x) for x in xs]),
                ("minikernels", "bwd", bwd_bytes,
                 [lambda y=y, dy=dy: row_softmax._backward_2d(y, dy) for y, dy in zip(ys, dys)]),
                ("torch.softmax", "bwd", bwd_bytes,
                 [lambda y=y, dy=dy, dt=dtype: torch._softmax_backward_data(dy, y, -1, dt) for y, dy in zip(ys, dys)]),
            ]
            for impl, direction, n_bytes, calls in candidates:
                try:
                    calls[0]()  # warm up (compilation) outside the timed region
                    ms, method = time_rotating(calls)
                except Exception as exc:  # an anchor that fails is reported, not fatal
                    print(f"  {impl} {direction} M={m} N={n}: failed ({type(exc).__name__}: {exc})")
                    continue
                gbps = n_bytes / (ms * 1e-3) / 1e9
                rows.append({"impl": impl, "pass": direction, "M": m, "N": n,
                             "dtype": str(dtype).replace("torch.", ""), "ms": ms, "GBps": gbps,
                             "frac_of_copy": gbps / ceilings["copy_GBps"], "timing": method})
            del xs, dys, ys
    return rows


def print_table(op: str, rows: list[dict], ceilings: dict) -> None:
    print(f"\n== {op}: GB/s of bytes that must move; copy ceiling {ceilings['copy_GBps']:.0f} GB/s ==")
    keys = sorted({(r["pass"], r["dtype"], r["M"], r["N"]) for r in rows},
                  key=lambda k: (k[0] != "fwd", k[1], k[2], k[3]))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    head = f"{'pass':4} {'dtype':8} {'M x N':>12} " + " ".join(f"{i:>15}" for i in impls)
    head += "   ours/copy " + " ".join(f"{'ours/' + i:>20}" for i in impls[1:])
    print(head)
    for key in keys:
        by = {r["impl"]: r for r in rows if (r["pass"], r["dtype"], r["M"], r["N"]) == key}
        line = f"{key[0]:4} {key[1]:8} {f'{key[2]}x{key[3]}':>12} "
        line += " ".join(f"{by[i]['GBps']:>15.0f}" if i in by else f"{'-':>15}" for i in impls)
        ours = by.get("minikernels")
        line += f"   {ours['frac_of_copy']:>9.0%} " if ours else f"   {'-':>9} "
        for i in impls[1:]:
            ok = ours and i in by
            line += f"{(by[i]['ms'] / ours['ms']) if ok else float('nan'):>19.2f}x"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minikernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--op", default="all", help=f"comma-separated ops among {', '.join(OPS)}, or 'all'")
    parser.add_argument("--json-dir", default=None,
                        help="where <op>.json is written (default: $OUT if set, else book/data/bench)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)

    ops = OPS if args.op == "all" else tuple(o.strip() for o in args.op.split(","))
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; available: {', '.join(OPS)}")
    if _backend.backend() != "cuda":
        print("minikernels.bench needs a CUDA GPU; this machine runs the kernels through Triton's "
              "interpreter, whose timings mean nothing. The recorded H200 results are in book/data/bench/.",
              file=sys.stderr)
        return 2

    json_dir = Path(args.json_dir or os.environ.get("OUT") or "book/data/bench")
    json_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    ceilings = measure_ceilings()
    print(f"copy {ceilings['copy_GBps']:.0f} GB/s (1 GiB, read + write), "
          f"bf16 matmul {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s (8192^3)")
    runners = {"softmax": bench_softmax}
    for op in ops:
        rows = runners[op](ceilings, quick=args.quick)
        path = json_dir / f"{op}.json"
        path.write_text(json.dumps({"op": op, **env, "ceilings": ceilings, "rows": rows}, indent=1) + "\n")
        print_table(op, rows, ceilings)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
