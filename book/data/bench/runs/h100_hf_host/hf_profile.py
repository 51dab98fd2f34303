"""Where generate's time goes (the log beside this file: one H100 80GB HBM3, torch 2.11, Triton 3.6,
transformers 5.17): host time per decode call, ours against SDPA, at the 125M Llama's decode shape,
with the GPU time of each from a CUDA graph replay; then a profile of generate for both backends.
Run from the repository's root on a GPU: ``python book/data/bench/runs/h100_hf_host/hf_profile.py``.
The run predates decode_attention's remembered launch plans."""

import copy
import cProfile
import functools
import io
import pstats
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import minikernels as mk
import minikernels.integrations.transformers as mk_hf
from minikernels.bench.hf import LLAMA


def per_call(fn, n=500):
    """Host microseconds a call (no synchronisation inside), and the GPU's, replayed from a graph."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / n * 1e6
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        graph.replay()
    torch.cuda.synchronize()
    return host, wall, (time.perf_counter() - start) / n * 1e6


def profile(fn, lines):
    prof = cProfile.Profile()
    prof.enable()
    fn()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(lines)
    print(out.getvalue()[-7000:])


q = torch.randn(8, 12, 1, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(8, 4, 4000, 64, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
with torch.no_grad():
    for name, fn in [("mk.decode", lambda: mk.decode_attention(q, k, v)),
                     ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))]:
        host, wall, graph = per_call(fn)
        print(f"{name}: host {host:.1f} us/call, wall {wall:.1f} us/call, graph replay {graph:.1f} us/call")
    profile(lambda: [mk.decode_attention(q, k, v) for _ in range(200)], 18)

mk_hf.register()
config = LlamaConfig(**LLAMA)
ids = torch.randint(3, 32000, (8, 3968), device="cuda")
kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
for impl in ["minikernels", "sdpa"]:
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        model.generate(ids, **kwargs)
        for label, new in (("generate 32 tokens", 32), ("prefill (1 token)", 1)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(ids, **dict(kwargs, max_new_tokens=new, min_new_tokens=new))
            torch.cuda.synchronize()
            print(impl, f"{label}:", round((time.perf_counter() - start) * 1e3, 1), "ms", flush=True)
        profile(functools.partial(model.generate, ids, **kwargs), 22)
    model = None  # free it before the next backend
    torch.cuda.empty_cache()
