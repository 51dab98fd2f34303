"""The book's tiny language model (``minikernels.tiny_lm``) end to end: tokens per second of a training
step (forward, backward, AdamW) and of inference (a forward over whole windows), for each attention
the book builds, in one model. The weights are random: speed does not depend on them."""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F

from .common import do_bench

TOKENS_PER_STEP = 64 * 512  # the training run's batch: 64 windows of 512 bytes


def attention_fns(context: int) -> dict:
    """Causal attention backends ``fn(q, k, v, layer)`` with q ``[B, H, N, d]``, k and v ``[B, Hkv, N, d]``."""
    from .. import masks
    from ..block_sparse import block_sparse_attention
    from ..flash import flash_attention
    from ..linear import linear_attention

    window = max(128, context // 4)
    # an A-shaped mask (one block of sink tokens plus a causal band of a quarter of the context):
    # the static mask chapter 2 evaluates on this model
    a_shape = masks.a_shape(context, sink=64, window=window, block_size=64, device="cuda")

    def repeat_kv(q, t):
        return t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)

    return {
        "minikernels": lambda q, k, v, layer: flash_attention(q, k, v, causal=True),
        "sdpa": lambda q, k, v, layer: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "block-sparse": lambda q, k, v, layer: block_sparse_attention(q, k, v, a_shape),
        # chapter 3's normalized linear attention with the elu+1 feature map (k, v shared by each group)
        "linear": lambda q, k, v, layer: linear_attention(q, repeat_kv(q, k), repeat_kv(q, v), feature_map="elu1",
                                                          normalize=True),
    }


def time_steps(model, opt, x, y) -> dict:
    """Milliseconds of one training step and of one inference forward over the batch ``x``."""

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def inference():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    times = {}
    for name, call in (("train", train_step), ("infer", inference)):
        try:
            call()
            times[name] = do_bench(call)
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            print(f"  {name}: failed ({type(exc).__name__}: {str(exc)[:200]})")
    return times


def bench_lm(ceilings: dict, quick: bool = False) -> list[dict]:
    """The "small" model (4.5M parameters, GQA) at the training context (512) and at 4096, bf16 autocast,
    64 x 512 = 32768 tokens a step either way."""
    from .. import tiny_lm

    rows = []
    for context in ([512] if quick else [512, 4096]):
        batch = TOKENS_PER_STEP // context
        torch.manual_seed(0)
        cfg = tiny_lm.Config(**{**asdict(tiny_lm.CONFIGS["small"]), "context": context})
        model = tiny_lm.TinyLM(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randint(0, tiny_lm.VOCAB, (batch, context), device="cuda")
        y = torch.randint(0, tiny_lm.VOCAB, (batch, context), device="cuda")
        shape = f"B{batch} N{context} H{cfg.n_heads} Hkv{cfg.n_kv_heads} d{cfg.head_dim} L{cfg.n_layers}"
        for impl, fn in attention_fns(context).items():
            print(f"  lm {impl} N={context}")
            model.set_attention(fn)
            for name, ms in time_steps(model, opt, x, y).items():
                rows.append({"impl": impl, "pass": name, "shape": shape, "N": context, "dtype": "bfloat16",
                             "params": model.num_params(), "ms": ms,
                             "ktokps": batch * context / (ms * 1e-3) / 1e3, "timing": "do_bench"})
        torch.cuda.empty_cache()
    return rows
