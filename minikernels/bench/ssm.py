"""Benchmarks of the state-space kernels: SSD against mamba_ssm's chunked scan, and the selective scan
against mamba_ssm's and a PyTorch loop."""

from __future__ import annotations

import torch

from .common import do_bench, exponentials_ms, progress, time_rotating
from .linear import fla_ops, skip_fla_gated_bwd


def _mamba_chunk_scan():
    """mamba_ssm's mamba_chunk_scan_combined (Triton), if mamba_ssm imports. Its package imports its
    CUDA extension (``selective_scan_cuda``) first; a build without the extension fails here and
    gets no rows. CONTRIBUTING.md says how to run the benchmark with such a build."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as exc:
        print(f"  mamba_ssm not available ({type(exc).__name__}: {str(exc)[:120]}): no mamba rows")
        return None
    return mamba_chunk_scan_combined


def _time_fwd_bwd(fn, leaves, grad_out, direction):
    """(ms, method) of a forward, or of a forward + backward through autograd."""
    if direction == "fwd":
        call = lambda: fn(*leaves)
        call()
        return time_rotating([call])
    leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in leaves]

    def call():
        out = fn(*leaves)
        return torch.autograd.grad(out, [x for x in leaves if x.requires_grad], grad_out)
    call()
    return time_rotating([call])  # a graph of the whole step: the host's launch time is not timed


def bench_ssd(ceilings: dict, quick: bool = False) -> list[dict]:
    """mk.ssd, bf16 x, B, C (fp32 dt, A), H32 P64 S128, one group: b4 L4096 and b1 L16k; against
    mamba_ssm's mamba_chunk_scan_combined (at our chunk size, 64, and at its default, 256) and
    fla-core's chunk_simple_gla (layouts transposed outside
    the timed region), forward and forward+backward. fla gets its queries, keys and log-decays built
    outside the timed region and computes no dt or A gradient: its rows time less work than ours."""
    import torch.nn.functional as F

    from ..duality import as_linear_attention, quadratic_form, ssd

    mamba, fla = _mamba_chunk_scan(), fla_ops()
    h, p, s, g = 32, 64, 128, 1
    rows = []
    for b, length in ([(4, 4096)] if quick else [(4, 4096), (1, 16384)]):
        x = torch.randn(b, h, length, p, device="cuda", dtype=torch.bfloat16)
        dt = F.softplus(torch.randn(b, h, length, device="cuda") - 3.0)
        A = -torch.rand(h, device="cuda") - 0.5
        B, C = (torch.randn(b, g, length, s, device="cuda", dtype=torch.bfloat16) * s**-0.5 for _ in range(2))
        dy = torch.randn_like(x)
        x_t, B_t, C_t, dy_t = (t.transpose(1, 2).contiguous() for t in (x, B, C, dy))  # [b, l, h|g, *]
        dt_t = dt.transpose(1, 2).contiguous()
        # the check, on one head: the kernel against SSD's quadratic (attention) form, an independent route
        want = quadratic_form(x[:1, :1].float(), dt[:1, :1], A[:1], B[:1].float(), C[:1].float())
        got = ssd(x[:1, :1], dt[:1, :1], A[:1], B[:1], C[:1])
        err = (got.float() - want).norm() / want.norm()
        assert err < 2e-2, f"ssd check failed: relative error {err:.2e}"
        impls = {"minikernels": (lambda x, dt, A, B, C: ssd(x, dt, A, B, C), [x, dt, A, B, C], dy)}
        if mamba is not None:  # at our chunk size, and at its own default (Mamba-2's, and the anchors')
            impls["mamba_chunk_scan_combined"] = (
                lambda x, dt, A, B, C: mamba(x, dt, A, B, C, chunk_size=64), [x_t, dt_t, A, B_t, C_t], dy_t)
            impls["mamba_chunk_scan_combined (chunk 256)"] = (
                lambda x, dt, A, B, C: mamba(x, dt, A, B, C, chunk_size=256), [x_t, dt_t, A, B_t, C_t], dy_t)
        if fla:
            q, k, v, gl = as_linear_attention(x, dt, A, B, C)
            q, k, v, gl = (t.transpose(1, 2).contiguous() for t in (q, k, v, gl))
            impls["fla chunk_simple_gla"] = (
                lambda q, k, v, gl: fla["simple_gla"](q, k, v, g=gl, scale=1.0)[0], [q, k, v, gl], dy_t)
        shape = f"b{b} L{length} h{h} p{p} n{s}"
        for impl, (fn, leaves, grad_out) in impls.items():
            for direction in ("fwd", "fwd+bwd"):
                if skip_fla_gated_bwd(fla, impl, direction, shape):
                    continue
                try:
                    ms, method = _time_fwd_bwd(fn, leaves, grad_out, direction)
                except Exception as exc:
                    print(f"  {impl} {direction} {shape}: failed ({type(exc).__name__}: {str(exc)[:160]})")
                    continue
                rows.append({"impl": impl, "pass": direction, "shape": shape, "dtype": "bfloat16", "ms": ms,
                             "Mtokps": b * length / (ms * 1e-3) / 1e6, "timing": method})
                progress(rows[-1])
        torch.cuda.empty_cache()
    return rows


def bench_selective_scan(ceilings: dict, quick: bool = False) -> list[dict]:
    """mk.selective_scan forward, B8 D2048 L4096 N16, bf16 u, delta, z, B, C (fp32 A, D, delta_bias),
    against its bandwidth roofline (the bytes of u, delta, B, C, z and y at the measured copy speed),
    the PyTorch reference loop, and the time its B*D*L*N exponentials alone take on this GPU
    (exponentials_ms: with the special-function unit, and as a polynomial); and our forward+backward
    (autograd, every gradient), in GB/s of the bytes both passes must move (the forward's, then u,
    delta, z, B, C and dy read and du, ddelta, dz, dB, dC written). The reference loop's backward is
    not timed: an autograd graph of L steps."""
    from .. import reference
    from ..scan import selective_scan

    b, d, length, n = (2, 2048, 4096, 16) if quick else (8, 2048, 4096, 16)
    u, delta, z = (torch.randn(b, d, length, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    A = -torch.rand(d, n, device="cuda") - 0.5
    B, C = (torch.randn(b, n, length, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    D, bias = torch.randn(d, device="cuda"), torch.randn(d, device="cuda") * 0.1
    args = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    got = selective_scan(u[:1, :64], delta[:1, :64], A[:64], B[:1], C[:1], D=D[:64], z=z[:1, :64],
                         delta_bias=bias[:64], delta_softplus=True)
    want = reference.selective_scan(u[:1, :64], delta[:1, :64], A[:64], B[:1], C[:1], D=D[:64], z=z[:1, :64],
                                    delta_bias=bias[:64], delta_softplus=True)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 2e-2, f"selective_scan check failed: relative error {err:.2e}"
    n_bytes = 2 * (4 * b * d * length + 2 * b * n * length)  # read u, delta, z, B, C; write y (bf16)
    rows = []
    impls = {"minikernels": lambda: selective_scan(u, delta, A, B, C, **args),
             "reference (PyTorch loop)": lambda: reference.selective_scan(u, delta, A, B, C, **args)}
    for impl, call in impls.items():
        try:
            call()
            ms = do_bench(call, ms_warmup=5, ms_rep=20) if impl.startswith("reference") else do_bench(call)
        except Exception as exc:
            print(f"  {impl}: failed ({type(exc).__name__}: {str(exc)[:160]})")
            continue
        gbps = n_bytes / (ms * 1e-3) / 1e9
        rows.append({"impl": impl, "pass": "fwd", "shape": f"B{b} D{d} L{length} N{n}", "dtype": "bfloat16",
                     "ms": ms, "GBps": gbps, "frac_of_copy": gbps / ceilings["copy_GBps"], "timing": "do_bench"})
        progress(rows[-1])
    # a floor under any forward that takes each decay exp(delta_t A) with the special-function unit:
    # one 2^x per (channel, state, step) triple and nothing else, timed on this GPU; and the same
    # count as a float32-accurate polynomial on the multiply-add units, the alternative
    for impl, polynomial in (("exponentials alone", False), ("exponentials alone, polynomial", True)):
        ms = exponentials_ms(b * d * length * n, polynomial=polynomial)
        rows.append({"impl": impl, "pass": "fwd", "shape": f"B{b} D{d} L{length} N{n}",
                     "dtype": "bfloat16", "ms": ms, "GBps": n_bytes / (ms * 1e-3) / 1e9,
                     "frac_of_copy": n_bytes / (ms * 1e-3) / 1e9 / ceilings["copy_GBps"], "timing": "do_bench"})
        progress(rows[-1])
    train_bytes = 2 * (11 * b * d * length + 6 * b * n * length)
    try:
        ms, method = _time_fwd_bwd(lambda *t: selective_scan(*t[:5], D=t[5], z=t[6], delta_bias=t[7],
                                                             delta_softplus=True),
                                   [u, delta, A, B, C, D, z, bias], torch.randn_like(u), "fwd+bwd")
    except Exception as exc:
        print(f"  minikernels fwd+bwd: failed ({type(exc).__name__}: {str(exc)[:160]})")
    else:
        gbps = train_bytes / (ms * 1e-3) / 1e9
        rows.append({"impl": "minikernels", "pass": "fwd+bwd", "shape": f"B{b} D{d} L{length} N{n}",
                     "dtype": "bfloat16", "ms": ms, "GBps": gbps, "frac_of_copy": gbps / ceilings["copy_GBps"],
                     "timing": method})
        progress(rows[-1])
    return rows
