"""A Hugging Face Llama with ``attn_implementation="minikernels"`` against "sdpa" and "flash_attention_2":
tokens per second of a training step (forward and backward) and of greedy generation, at 4k context,
in bfloat16. Random weights: speed does not depend on them.

The model is about the size of GPT-2 small with grouped-query attention (12 layers, hidden 768, 12
query heads and 4 key/value heads of dimension 64, vocabulary 32000). Each backend runs the same
weights on the same batch; "flash_attention_2" only where the flash_attn package imports.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from .common import do_bench

CONTEXT = 4096
TRAIN_BATCH = 8      # 8 x 4096 = 32768 tokens a step
GEN_BATCH = 8
NEW_TOKENS = 128     # generated after a prompt of CONTEXT - NEW_TOKENS tokens, so the cache ends at CONTEXT
LLAMA = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=CONTEXT, attention_dropout=0.0)


def backends() -> list[str]:
    names = ["minikernels", "sdpa"]
    try:
        import flash_attn  # noqa: F401
        names.append("flash_attention_2")
    except ImportError:
        print("  flash_attn does not import here: flash_attention_2 is left out")
    return names


def lengths(batch: int, context: int, seed: int) -> torch.Tensor:
    """Real lengths of a padded batch: one full row, the others uniform in [context / 4, context]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(context // 4, context + 1, (batch,), generator=g)
    lens[0] = context
    return lens


def padding_mask(lens: torch.Tensor, context: int, left: bool) -> torch.Tensor:
    positions = torch.arange(context)[None, :]
    real = positions >= context - lens[:, None] if left else positions < lens[:, None]
    return real.long().cuda()


def time_training(model, ids, mask) -> float:
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)

    def step():
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    return do_bench(step)


def time_generation(model, ids, mask, reps: int = 3) -> float:
    """Median wall-clock milliseconds of ``generate`` (prefill and NEW_TOKENS decode steps)."""
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kwargs)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    assert out.shape[1] == ids.shape[1] + NEW_TOKENS
    return statistics.median(times)


def bench_hf(ceilings: dict, quick: bool = False) -> list[dict]:
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ..integrations import transformers as mk_hf

    mk_hf.register()
    config = LlamaConfig(**LLAMA)
    torch.manual_seed(0)
    weights = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    weights.to("cuda", torch.bfloat16)
    params = sum(p.numel() for p in weights.parameters())
    state = weights.state_dict()
    del weights

    g = torch.Generator().manual_seed(0)
    train_ids = torch.randint(3, LLAMA["vocab_size"], (TRAIN_BATCH, CONTEXT), generator=g).cuda()
    prompt = CONTEXT - NEW_TOKENS
    gen_ids = torch.randint(3, LLAMA["vocab_size"], (GEN_BATCH, prompt), generator=g).cuda()
    train_lens, gen_lens = lengths(TRAIN_BATCH, CONTEXT, seed=1), lengths(GEN_BATCH, prompt, seed=2)
    cases = [  # pass, timer, ids, mask, tokens counted
        ("train", time_training, train_ids, None, TRAIN_BATCH * CONTEXT),
        ("train-padded", time_training, train_ids, padding_mask(train_lens, CONTEXT, left=False),
         int(train_lens.sum())),
        ("generate", time_generation, gen_ids, None, GEN_BATCH * NEW_TOKENS),
        ("generate-padded", time_generation, gen_ids, padding_mask(gen_lens, prompt, left=True),
         GEN_BATCH * NEW_TOKENS),
    ]
    if quick:
        cases = [cases[0], cases[2]]
    shape = (f"L{LLAMA['num_hidden_layers']} d{LLAMA['hidden_size']} H{LLAMA['num_attention_heads']} "
             f"Hkv{LLAMA['num_key_value_heads']} N{CONTEXT}")

    rows = []
    for impl in backends():
        # a config of its own: from_config writes the implementation into the config it is given
        try:
            with torch.device("cuda"):
                model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl)
        except Exception as exc:  # e.g. a flash_attn build this transformers refuses
            print(f"  hf {impl}: cannot build the model ({type(exc).__name__}: {str(exc)[:300]})")
            continue
        model.to(torch.bfloat16).load_state_dict(state)
        for name, timer, ids, mask, tokens in cases:
            model.train(name.startswith("train"))
            batch = ids.shape[0]
            print(f"  hf {impl} {name}", flush=True)
            try:
                ms = timer(model, ids, mask)
            except Exception as exc:  # a backend that cannot run a case is reported, not fatal
                print(f"    failed ({type(exc).__name__}: {str(exc)[:300]})")
                continue
            rows.append({"impl": impl, "pass": name, "shape": f"B{batch} {shape}", "B": batch, "N": CONTEXT,
                         "dtype": "bfloat16", "params": params, "tokens": tokens, "ms": ms,
                         "ktokps": tokens / (ms * 1e-3) / 1e3,
                         "timing": "do_bench" if name.startswith("train") else "wall clock, median of 3",
                         "transformers": transformers.__version__})
            print(f"    {ms:.1f} ms, {rows[-1]['ktokps']:.1f} k tokens/s", flush=True)
        del model
        torch.cuda.empty_cache()
    return rows
