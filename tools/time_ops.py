"""Time minikernels' ops alone (no anchors), for a before/after check of a change that must not slow them:
`PYTHONPATH=<a checkout> python tools/time_ops.py OUT.json` on the GPU, once per version to compare.

Each case (the bench's shapes, bf16 unless said) is replayed from a CUDA graph and timed with
`triton.testing.do_bench` (median), so the GPU's time is measured rather than the host's launches.
Writes {case: ms} as JSON. The engineering notes' index has the table this made for the refactor."""
import json
import sys

import torch
import torch.nn.functional as F
import triton

import minikernels as mk
from minikernels import masks

# ruff: noqa: B023  (each lambda is timed in the loop iteration that defines it, never later)

torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16
res = {}


def t(name, fn):
    # replayed from a CUDA graph, as minikernels.bench times these: GPU time, not the host's launches
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        res[name] = triton.testing.do_bench(g.replay, warmup=25, rep=200)
    except Exception as exc:  # not capturable: plain timing
        print("no graph for", name, type(exc).__name__, exc)
        torch.cuda.synchronize()
        res[name + " (no graph)"] = triton.testing.do_bench(fn, warmup=25, rep=200)


def fwd_bwd(f, leaves):
    def run():
        for leaf in leaves:
            leaf.grad = None
        out = f()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


x = torch.randn(4096, 32768, device=dev, dtype=bf)
t("softmax fwd bf16 4096x32768", lambda: mk.softmax(x))
xr = x.clone().requires_grad_()
t("softmax fwd+bwd bf16 4096x32768", fwd_bwd(lambda: mk.softmax(xr), [xr]))
for d in (64, 128):
    for causal in (False, True):
        q, k, v = (torch.randn(4, 16, 4096, d, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
        t(f"flash fwd bf16 B4 H16 N4096 D{d} causal={causal}", lambda: mk.flash_attention(q, k, v, causal=causal))
        t(f"flash fwd+bwd bf16 B4 H16 N4096 D{d} causal={causal}",
          fwd_bwd(lambda: mk.flash_attention(q, k, v, causal=causal), [q, k, v]))
q, k, v = (torch.randn(2, 8, 2048, 128, device=dev, dtype=torch.float32) for _ in range(3))
t("flash fwd fp32 B2 H8 N2048 D128", lambda: mk.flash_attention(q, k, v))
q, k, v = (torch.randn(2, 8, 2048, 256, device=dev, dtype=bf) for _ in range(3))
t("flash fwd bf16 B2 H8 N2048 D256", lambda: mk.flash_attention(q, k, v))
with torch.no_grad():
    for length in (8192, 65536):
        q = torch.randn(8, 32, 1, 128, device=dev, dtype=bf)
        kc, vc = (torch.randn(8, 8, length, 128, device=dev, dtype=bf) for _ in range(2))
        t(f"decode bf16 B8 H32 Hkv8 L{length} D128", lambda: mk.decode_attention(q, kc, vc))
q, k, v = (torch.randn(2, 16, 8192, 128, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
for name, bm in (("causal", masks.causal(8192, block_size=128, device=dev)),
                 ("sliding 1024", masks.sliding_window(8192, 1024, block_size=128, device=dev))):
    t(f"block_sparse fwd bf16 B2 H16 N8192 D128 {name}", lambda: mk.block_sparse_attention(q, k, v, bm))
    t(f"block_sparse fwd+bwd bf16 B2 H16 N8192 D128 {name}",
      fwd_bwd(lambda: mk.block_sparse_attention(q, k, v, bm), [q, k, v]))
for decay in (False, True):
    q, k, v = (torch.randn(4, 16, 4096, 128, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
    g = (-torch.rand(4, 16, 4096, device=dev) * 0.1).requires_grad_() if decay else None
    t(f"linear fwd bf16 B4 H16 N4096 D128 decay={decay}", lambda: mk.linear_attention(q * 0.1, k * 0.1, v, decay=g))
    t(f"linear fwd+bwd bf16 B4 H16 N4096 D128 decay={decay}",
      fwd_bwd(lambda: mk.linear_attention(q * 0.1, k * 0.1, v, decay=g), [q, k, v] + ([g] if decay else [])))
b, h, length, p, s, groups = 4, 32, 4096, 64, 128, 1
xs = torch.randn(b, h, length, p, device=dev, dtype=bf, requires_grad=True)
dt = F.softplus(torch.randn(b, h, length, device=dev) - 3.0).requires_grad_()
A = (-torch.rand(h, device=dev)).requires_grad_()
B, C = (torch.randn(b, groups, length, s, device=dev, dtype=bf) * s**-0.5 for _ in range(2))
B.requires_grad_()
C.requires_grad_()
t("ssd fwd bf16 B4 H32 N4096 d_v64 n128", lambda: mk.ssd(xs, dt, A, B, C, chunk_size=64))
t("ssd fwd+bwd bf16 B4 H32 N4096 d_v64 n128",
  fwd_bwd(lambda: mk.ssd(xs, dt, A, B, C, chunk_size=64), [xs, dt, A, B, C]))
bsz, dch, length, n = 2, 2048, 4096, 16
u = torch.randn(bsz, dch, length, device=dev, dtype=bf, requires_grad=True)
delta = (torch.randn(bsz, dch, length, device=dev, dtype=bf) * 0.5).requires_grad_()
Am = (-torch.rand(dch, n, device=dev)).requires_grad_()
Bs, Cs = (torch.randn(bsz, 1, n, length, device=dev, dtype=bf, requires_grad=True) for _ in range(2))
t("selective_scan fwd bf16 B2 D2048 N4096 n16", lambda: mk.selective_scan(u, delta, Am, Bs, Cs, delta_softplus=True))
t("selective_scan fwd+bwd bf16 B2 D2048 N4096 n16",
  fwd_bwd(lambda: mk.selective_scan(u, delta, Am, Bs, Cs, delta_softplus=True), [u, delta, Am, Bs, Cs]))
json.dump(res, open(sys.argv[1], "w"), indent=1)
print(f"{len(res)} cases timed")
