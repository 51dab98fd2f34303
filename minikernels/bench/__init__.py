"""Benchmarks: ``python -m minikernels.bench --op softmax`` (GPU only).

Times our kernels and the anchors side by side, in one process, with Triton's benchmarking helpers
(median of many repetitions), prints a table and writes JSON (date, GPU, torch and triton versions,
the measured ceilings, one row per measurement) for the book's figures. Short, memory-bound calls
(softmax, decode) are replayed from a CUDA graph, cycling through enough buffer sets that no call
finds its inputs in L2, so launch overhead and a warm cache flatter no one. Attention forwards are
replayed too, from one buffer set (some 200 MB of inputs at the shapes timed: more than the L2). The
linear-attention and SSD forward+backward passes (autograd included) are captured too: they are
strings of short kernels, and timed with plain ``do_bench`` they would measure the host that issues
them more than the GPU (the book's engineering notes give the numbers). These pass one buffer set:
their inputs (67 MB of values alone at the shapes timed) do not fit the L2 anyway. The attention
backward passes (long kernels) are timed with plain ``do_bench``, as is anything that fails to be
captured. Each row's ``timing`` field says which was used.

Memory-bound ops are reported in GB/s of bytes that must move (each input read once, each output
written once) and as a fraction of the copy bandwidth measured in the same run.
"""

from .. import _backend  # noqa: F401  (the package's __init__ chose the backend before anything imported triton)
from ..results import recorded, recorded_dir
from .attention import attention_flops, bench_decode, bench_flash, bench_softmax, bench_sparse, one_in_eight_blocks
from .cli import OPS, main
from .common import (
    environment,
    exp2_only,
    exp2_polynomial,
    exponentials_ms,
    measure_ceilings,
    n_buffer_sets,
    print_table,
    time_rotating,
)
from .linear import bench_crossover, bench_linear
from .ssm import bench_selective_scan, bench_ssd

__all__ = ["OPS", "attention_flops", "bench_crossover", "bench_decode", "bench_flash", "bench_linear",
           "bench_selective_scan", "bench_softmax", "bench_sparse", "bench_ssd", "environment", "exp2_only",
           "exp2_polynomial", "exponentials_ms", "main", "measure_ceilings", "n_buffer_sets", "one_in_eight_blocks",
           "print_table", "recorded", "recorded_dir", "time_rotating"]
