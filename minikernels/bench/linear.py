"""Benchmarks of linear attention, and of where it overtakes flash attention, against fla."""

from __future__ import annotations

import torch

from .attention import sdpa
from .common import progress, time_rotating


def fla_ops() -> dict:
    """fla-core's chunked kernels, if its wheel is installed (``fetch-wheels.sh anchors``)."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except Exception as exc:  # not installed, or failing to import: reported, not fatal
        print(f"  fla-core not available ({type(exc).__name__}: {str(exc)[:120]}): no fla rows")
        return {}
    # fla's own guard (fla/ops/common/chunk_o.py, its issue 640) refuses the gated backward on Hopper with
    # Triton >= 3.4 and < 3.7.1, but only after compiling and running most of it (over a minute of a
    # cold run): the same test up front, so that attempt is skipped and said so
    gated_bwd = not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)
    return {"linear": chunk_linear_attn, "simple_gla": chunk_simple_gla, "gated_bwd": gated_bwd}


def skip_fla_gated_bwd(fla: dict, impl: str, direction: str, shape: str) -> bool:
    if impl == "fla chunk_simple_gla" and direction == "fwd+bwd" and not fla["gated_bwd"]:
        print(f"  {impl} {direction} {shape}: skipped (fla refuses its gated backward on Hopper with this Triton)")
        return True
    return False


def bench_linear(ceilings: dict, quick: bool = False) -> list[dict]:
    """B4 H16 D128 bf16, T in {4k, 16k, 64k}: mk.linear_attention without and with a decay, against
    fla-core's chunk_linear_attn and chunk_simple_gla (inputs transposed to fla's [B, T, H, D] outside
    the timed region), forward and forward+backward, in tokens per second; at T = 4k also softmax
    attention (SDPA's cuDNN backend, causal) for the crossover."""
    import torch.nn.functional as F

    from ..linear import chunked_form, linear_attention

    fla = fla_ops()
    b, h, d = 4, 16, 128
    rows = []
    for t in ([4096] if quick else [4096, 16384, 65536]):
        q, k = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) * d**-0.5 for _ in range(2))
        v, do = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        g = F.logsigmoid(torch.randn(b, h, t, device="cuda") + 4.0)  # log-decays around -0.02
        q_t, k_t, v_t, do_t = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))  # fla's layout
        g_t = g.transpose(1, 2).contiguous()
        for gated in (False, True):
            dec, dec_t = (g, g_t) if gated else (None, None)
            # the benchmark checks what it times, on one head, against the PyTorch chunked form
            want = chunked_form(q[:1, :1].float(), k[:1, :1].float(), v[:1, :1].float(),
                                decay=dec[:1, :1] if gated else None)
            got = linear_attention(q[:1, :1], k[:1, :1], v[:1, :1], decay=dec[:1, :1] if gated else None)
            err = (got.float() - want).norm() / want.norm()
            assert err < 2e-2, f"linear attention check failed: relative error {err:.2e}"
            impls = {"minikernels": (lambda q, k, v, g, dec=dec: linear_attention(q, k, v, decay=dec), (q, k, v), do)}
            if fla and not gated:
                impls["fla chunk_linear_attn"] = (
                    lambda q, k, v, g: fla["linear"](q, k, v, scale=1.0, normalize=False)[0], (q_t, k_t, v_t), do_t)
            if fla and gated:
                impls["fla chunk_simple_gla"] = (
                    lambda q, k, v, g, dec_t=dec_t: fla["simple_gla"](q, k, v, g=dec_t, scale=1.0)[0],
                    (q_t, k_t, v_t), do_t)
            if t == 4096 and not gated:
                impls["sdpa-cudnn (softmax, causal)"] = (lambda q, k, v, g: sdpa("CUDNN_ATTENTION")(q, k, v, True),
                                                         (q, k, v), do)
            shape = f"B{b} H{h} T{t} D{d}" + (" decay" if gated else "")
            for impl, (fn, ins, grad_out) in impls.items():
                for direction in ("fwd", "fwd+bwd"):
                    if skip_fla_gated_bwd(fla, impl, direction, shape):
                        continue
                    try:
                        if direction == "fwd":
                            call = lambda fn=fn, ins=ins: fn(*ins, None)
                            call()
                            ms, method = time_rotating([call])
                        else:
                            leaves = [x.detach().requires_grad_() for x in ins]

                            def call(fn=fn, leaves=leaves, grad_out=grad_out):
                                out = fn(*leaves, None)
                                return torch.autograd.grad(out, leaves, grad_out)
                            call()
                            ms, method = time_rotating([call])
                    except Exception as exc:  # an anchor that fails (fla's gated backward, say) is reported
                        print(f"  {impl} {direction} {shape}: failed ({type(exc).__name__}: {str(exc)[:160]})")
                        continue
                    rows.append({"impl": impl, "pass": direction, "shape": shape, "B": b, "H": h, "T": t, "D": d,
                                 "decay": gated, "dtype": "bfloat16", "ms": ms, "Mtokps": b * t / (ms * 1e-3) / 1e6,
                                 "timing": method})
                    progress(rows[-1])
        del q, k, v, do, q_t, k_t, v_t, do_t
        torch.cuda.empty_cache()
    return rows


def bench_crossover(ceilings: dict, quick: bool = False) -> list[dict]:
    """Chapter 3's crossover: forward tokens per second of mk.linear_attention (no decay) and of
    softmax attention (SDPA's cuDNN backend, causal) against the sequence length, B4 H16 D128 bf16.
    Softmax's cost per token grows with T; linear attention's does not."""
    from ..linear import linear_attention

    b, h, d = 4, 16, 128
    cudnn = sdpa("CUDNN_ATTENTION")
    impls = {"minikernels": lambda q, k, v: linear_attention(q, k, v),
             "sdpa-cudnn (softmax, causal)": lambda q, k, v: cudnn(q, k, v, True)}
    rows = []
    for t in ([1024, 4096] if quick else [512, 1024, 2048, 4096, 8192, 16384, 32768]):
        q, k = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16) * d**-0.5 for _ in range(2))
        v = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
        for impl, fn in impls.items():
            call = lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)
            call()
            ms, method = time_rotating([call])
            rows.append({"impl": impl, "pass": "fwd", "shape": f"B{b} H{h} T{t} D{d}", "B": b, "H": h, "T": t, "D": d,
                         "decay": False, "dtype": "bfloat16", "ms": ms, "Mtokps": b * t / (ms * 1e-3) / 1e6,
                         "timing": method})
            progress(rows[-1])
        del q, k, v
        torch.cuda.empty_cache()
    return rows
