"""``python -m minikernels.bench``: the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .. import _backend
from ..results import recorded_dir
from .attention import bench_decode, bench_flash, bench_softmax, bench_sparse, bench_varlen
from .common import environment, measure_ceilings, print_table
from .decoding import bench_paged_decode
from .distributed import bench_distributed
from .hf import bench_hf
from .linear import bench_crossover, bench_linear
from .lm import bench_lm
from .ssm import bench_selective_scan, bench_ssd

OPS = ("softmax", "flash", "decode", "sparse", "linear", "crossover", "ssd", "selective_scan", "lm",
       "paged_decode", "distributed", "varlen", "hf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minikernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--op", default="all", help=f"comma-separated ops among {', '.join(OPS)}, or 'all'")
    parser.add_argument("--json-dir", default=None,
                        help="where <op>.json is written (default: $OUT if set, else the folder "
                             "minikernels.results.recorded_dir() finds)")
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

    json_dir = Path(args.json_dir or os.environ.get("OUT") or recorded_dir())
    json_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    ceilings = measure_ceilings()
    print(f"copy {ceilings['copy_GBps']:.0f} GB/s (1 GiB, read + write), "
          f"bf16 matmul {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s (8192^3)")
    runners = {"softmax": bench_softmax, "flash": bench_flash, "decode": bench_decode, "sparse": bench_sparse,
               "linear": bench_linear, "crossover": bench_crossover, "ssd": bench_ssd,
               "selective_scan": bench_selective_scan, "lm": bench_lm,
               "paged_decode": bench_paged_decode, "distributed": bench_distributed,
               "varlen": bench_varlen, "hf": bench_hf}
    for op in ops:
        rows = runners[op](ceilings, quick=args.quick)
        path = json_dir / f"{op}.json"
        path.write_text(json.dumps({"op": op, **env, "ceilings": ceilings, "rows": rows}, indent=1) + "\n")
        print_table(op, rows, ceilings)
        print(f"wrote {path}")
    return 0
