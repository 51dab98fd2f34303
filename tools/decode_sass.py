"""Compile the decode split kernel for an H100 (sm_90) on a machine without a GPU and count what its
key-block loop issues: `python tools/decode_sass.py [dense|paged16|paged128] [bf16|int8] [MAXNREG]`.

Triton compiles for a target it is told, GPU or not, and ships ptxas and cuobjdump, so the registers,
the shared memory and the SASS of a kernel can be read on a CPU. The loop is the code between a
backward branch and its target; its instruction count per thread is what one key block costs to
issue (on an H100 an SM issues four warp-instructions a cycle). The tool pins the shapes of the
decode benchmark (16 query rows, d = 128, 4 warps, 3 stages; 64-key blocks for bf16, 128 for int8)
and stands in the strides the benchmark's pools have (the last dimension contiguous). Its counts
are the compiler's, on this machine's Triton: run it with the GPU machine's Triton version to
compare with a GPU's timings (book/notes/kv_cache.md uses Triton 3.6).
"""

import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret (before minikernels imports triton)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minikernels.decode import _decode_split  # noqa: E402

POINTERS = {"Q": "bf16", "SEQLENS": "i32", "LEFTPAD": "i32", "O_PART": "fp32", "LSE_PART": "fp32",
            "BLOCK_TABLE": "i32"}
UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd"}  # Triton specializes an argument equal to 1


def compile_split(page_size: int, int8: bool, maxnreg: int | None = None):
    cache = "i8" if int8 else "bf16"
    pointers = {**POINTERS, "K": cache, "V": cache, "K_SCALE": "fp32" if int8 else "bf16",
                "V_SCALE": "fp32" if int8 else "bf16"}
    constants = dict(CAUSAL=False, ROWS=16, BLOCK_N=128 if int8 else 64, HEAD_DIM=128, DOT_PREC="tf32",
                     PAGE_SIZE=page_size, QUANTIZED=int8, HAS_LEFTPAD=False, HAS_LENGTHS=True,
                     POOL_I32=True,  # the pools fit 32-bit offsets, as the benchmark's do
                     PDL=False)  # launched plainly, as by default
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(_decode_split.arg_names):
        if name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in UNIT_STRIDES:
            signature[name], constexprs[name] = "constexpr", 1
        elif name in constants:
            signature[name], constexprs[name] = "constexpr", constants[name]
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:  # strides and sizes, multiples of 16 in the benchmark's shapes (as Triton specializes them)
            signature[name] = "i32"
            if name.startswith("stride") or name in ("D", "NMAX", "split_len"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": 4, "num_stages": 3, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(ASTSource(_decode_split, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loop_opcodes(cubin: bytes) -> tuple[str, collections.Counter]:
    """The register line of ``cuobjdump -res-usage`` and the opcodes of the longest loop's body."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    code = [(int(m[1], 16), m[2], m[3]) for m in
            re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", sass)]
    best = collections.Counter()
    for address, op, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if op.startswith("BRA") and target and int(target[1], 16) < address:
            body = collections.Counter(o.split(".")[0] for a, o, _ in code if int(target[1], 16) <= a <= address)
            best = max(best, body, key=lambda c: c.total())
    registers = next((line.strip() for line in usage.splitlines() if "REG:" in line), "")
    return registers, best


def main(argv: list[str]) -> None:
    layout = argv[0] if argv else "paged16"
    int8 = (argv[1] if len(argv) > 1 else "int8") == "int8"
    maxnreg = int(argv[2]) if len(argv) > 2 else None
    page_size = 0 if layout == "dense" else int(layout.removeprefix("paged"))
    kernel = compile_split(page_size, int8, maxnreg)
    registers, body = loop_opcodes(kernel.asm["cubin"])
    print(f"{layout} {'int8' if int8 else 'bf16'} (Triton {triton.__version__}, sm_90): shared memory "
          f"{kernel.metadata.shared} bytes; {registers}")
    print(f"loop: {body.total()} instructions a thread per key block")
    print("  " + "  ".join(f"{op} {n}" for op, n in body.most_common(16)))


if __name__ == "__main__":
    main(sys.argv[1:])
