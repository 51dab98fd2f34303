"""Train the book's tiny byte-level language model (minikernels/tiny_lm.py) on the Python standard library.

    python tools/train_lm.py --attention minikernels --out DIR            # the book's model, on a GPU
    python tools/train_lm.py --attention sdpa --out DIR2                  # the same run on PyTorch's SDPA
    python tools/train_lm.py --config tiny --steps 5 --out DIR            # a smoke run, CPU included

AdamW (betas 0.9, 0.95; weight decay on matrices only), a linear warmup then a cosine decay of the
learning rate, gradient clipping, bf16 autocast on CUDA (float32 on a CPU). The corpus is the standard
library's ``.py`` source of the interpreter that runs this script, test suites included, split by file
into training (95%) and held-out (5%) bytes (``tiny_lm.stdlib_corpus``). The weights and the data order
come from ``--seed`` alone, so a run with ``--attention sdpa`` sees the same initialization and batches
as one with ``--attention minikernels``: their loss curves differ only by rounding.

Writes to DIR:
    train_log.jsonl       one JSON object a line: "start" (configuration, corpus file count and sha256,
                          device, versions), "train" (step, mean loss in nats over the last --log-every
                          steps, lr, tokens/s), "eval" (step, held-out bits per byte) and "end" (held-out
                          bits per byte over all held-out bytes, training and inference tokens/s)
    model.pt              bf16 weights and the config through torch.save; ``tiny_lm.load(DIR)`` reads it on
                          a CPU with torch alone
    config.json           the model's configuration
    command.txt           the exact command line
    corpus.json           the interpreter, the training and held-out file lists, their byte counts and sha256
    heldout_sample.bin    32 KiB of held-out bytes; the "end" record gives their bits per byte at context
                          128, so a CPU test can check the committed model without this interpreter's corpus

How long the default ("small") run takes, and why it stops where it does. The model has 4.49M
parameters (9.0 MB in bf16). Training costs about 6 FLOPs per parameter and token plus 6 * n_layers *
context * d_model for causal attention (``tiny_lm.flops_per_token``): 3.2e7 FLOPs a token. The corpus
is small: a Debian or Ubuntu Python ships its test suites in a separate package, leaving about 9 MB of
training bytes, and a model this size starts to memorize them after about ten passes (the held-out
loss turns up while the training loss keeps falling). So the default is 3000 steps of 64 x 512 bytes
(9.8e7 tokens, about 11 passes over 9 MB), with the learning rate's cosine ending there; on one H100
that takes about a minute (the "train" records give tokens/s).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import minikernels as mk  # before anything imports triton: on a CPU it selects the interpreter
from minikernels import tiny_lm

# training hyperparameters per model configuration; every one can be overridden on the command line
TRAIN_DEFAULTS = {
    "small": dict(steps=3_000, batch=64, lr=1.5e-3, min_lr=1.5e-4, warmup=500, weight_decay=0.1, grad_clip=1.0,
                  log_every=10, eval_every=1000, eval_windows=256, final_eval_windows=None),
    # CPU smoke runs: minikernels under Triton's interpreter takes seconds a step even at this size
    "tiny": dict(steps=200, batch=1, lr=3e-3, min_lr=3e-4, warmup=10, weight_decay=0.1, grad_clip=1.0,
                 log_every=1, eval_every=0, eval_windows=2, final_eval_windows=2),
}
ASSUMED_FLOPS = 0.3 * 200e12  # 30% of an H100's ~200 TFLOP/s of bf16: the basis of the default step count
SAMPLE_BYTES, SAMPLE_CHUNKS, SAMPLE_CONTEXT = 32 * 1024, 8, 128


def lr_at(step: int, steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine from ``lr`` down to ``min_lr`` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - 1 - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (embedding included), none on the norms' gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=torch.device(device).type == "cuda")


def random_windows(data: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    """``batch`` windows of ``context`` + 1 bytes at random offsets of ``data``: inputs and next-byte targets."""
    starts = torch.randint(0, len(data) - context - 1, (batch,), device=data.device, generator=generator)
    w = data[starts[:, None] + torch.arange(context + 1, device=data.device)].long()
    return w[:, :-1], w[:, 1:]


def held_out_sample(held_out: bytes) -> bytes:
    """``SAMPLE_CHUNKS`` evenly spaced chunks of the held-out bytes, ``SAMPLE_BYTES`` + 1 in all."""
    size = SAMPLE_BYTES // SAMPLE_CHUNKS
    stride = (len(held_out) - size - 1) // SAMPLE_CHUNKS
    return b"".join(held_out[i * stride:i * stride + size] for i in range(SAMPLE_CHUNKS)) + held_out[-1:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", choices=["minikernels", "sdpa"], default="minikernels")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--config", choices=sorted(tiny_lm.CONFIGS), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--note", default="", help="a line kept in the log's start record (e.g. how the GPU was shared)")
    p.add_argument("--exclude-tests", action="store_true", help="leave the stdlib's test suites out of the corpus")
    for name, value in TRAIN_DEFAULTS["small"].items():
        kind = float if isinstance(value, float) else int
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"default: {TRAIN_DEFAULTS['small'][name]} (small), {TRAIN_DEFAULTS['tiny'][name]} (tiny)")
    args = p.parse_args(argv)
    for name, value in TRAIN_DEFAULTS[args.config].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    command = shlex.join(["python", *(sys.argv if argv is None else [sys.argv[0], *argv])])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(command + "\n")
    torch.backends.cuda.matmul.allow_tf32 = True
    log_file = open(out / "train_log.jsonl", "w")

    def log(record):
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        print(json.dumps(record), flush=True)

    # ---- data ----
    include_tests = not args.exclude_tests
    train_bytes, train_files, train_sha = tiny_lm.stdlib_corpus("train", include_tests)
    held_bytes, held_files, held_sha = tiny_lm.stdlib_corpus("held_out", include_tests)
    corpus = {"python": sys.version, "implementation": sys.implementation.name, "stdlib": str(tiny_lm.stdlib_root()),
              "include_tests": include_tests, "separator": tiny_lm.SEPARATOR.hex(),
              "held_out_fraction": tiny_lm.HELD_OUT_FRACTION, "files": len(train_files) + len(held_files),
              "train": {"files": len(train_files), "bytes": len(train_bytes), "sha256": train_sha},
              "held_out": {"files": len(held_files), "bytes": len(held_bytes), "sha256": held_sha}}
    (out / "corpus.json").write_text(json.dumps(
        {**corpus, "train_files": train_files, "held_out_files": held_files}, indent=1) + "\n")
    sample = held_out_sample(held_bytes)
    (out / "heldout_sample.bin").write_bytes(sample)
    to_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).to(device)
    train_data, held_data = to_tensor(train_bytes), to_tensor(held_bytes)

    # ---- model: initialized on the CPU from the seed, so every backend and device starts alike ----
    torch.manual_seed(args.seed)
    cfg = tiny_lm.Config(**{**asdict(tiny_lm.CONFIGS[args.config]), "attention": args.attention})
    model = tiny_lm.TinyLM(cfg).to(device)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    params = model.num_params()
    flops = tiny_lm.flops_per_token(cfg, params)
    tokens_per_step = args.batch * cfg.context
    opt = make_optimizer(model, args.lr, args.weight_decay, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    log({"kind": "start", "command": command, "config": asdict(cfg), "train": {**vars(args), "out": str(out)},
         "params": params, "flops_per_token": flops, "tokens_per_step": tokens_per_step,
         "estimated_seconds": args.steps * tokens_per_step * flops / ASSUMED_FLOPS,
         "estimate_basis": f"{ASSUMED_FLOPS / 1e12:.0f} TFLOP/s (30% of an H100's ~200 bf16)",
         "corpus": corpus, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         "backend": mk.backend(), "torch": torch.__version__, "python": sys.version.split()[0]})

    def evaluate(step, windows, kind="eval"):
        model.eval()
        sync()
        t0 = time.perf_counter()
        bpb = tiny_lm.bits_per_byte(model, held_data, cfg.context, batch=args.batch, max_windows=windows)
        sync()
        seconds = time.perf_counter() - t0
        model.train()
        n = min(windows or 1 << 62, (len(held_data) - 1) // cfg.context)
        return {"kind": kind, "step": step, "held_out_bpb": bpb, "windows": n,
                "inference_tokens_per_s": n * cfg.context / seconds}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # ---- training ----
    log(evaluate(0, args.eval_windows))
    warmup = min(args.warmup, args.steps // 10)  # a short run gets a short warmup
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_sum, n_loss, train_seconds = torch.zeros((), device=device), 0, 0.0
    sync()
    t_start = t_last = time.perf_counter()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.min_lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = random_windows(train_data, args.batch, cfg.context, generator)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        n_loss += 1
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            mean_loss = float(loss_sum) / n_loss  # synchronizes
            now = time.perf_counter()
            train_seconds += now - t_last
            log({"kind": "train", "step": done, "loss": mean_loss, "lr": lr,
                 "tokens_per_s": n_loss * tokens_per_step / (now - t_last), "elapsed_s": now - t_start})
            if not math.isfinite(mean_loss):
                raise RuntimeError(f"the loss is {mean_loss} at step {done}")
            loss_sum.zero_()
            n_loss = 0
            t_last = time.perf_counter()
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            log(evaluate(done, args.eval_windows))
            t_last = time.perf_counter()  # evaluation time is not training time

    # ---- the end: save, then measure the held-out loss of the saved (bf16) weights ----
    weights = model.save(out / tiny_lm.default_weights_name())
    saved = tiny_lm.load(out, device=device)
    model.load_state_dict(saved.state_dict())  # evaluate what was written: bf16-rounded weights
    end = evaluate(args.steps, args.final_eval_windows, kind="end")
    sample_context = min(SAMPLE_CONTEXT, cfg.context)
    model.eval()
    sample_bpb = tiny_lm.bits_per_byte(model, sample, sample_context, batch=args.batch,
                                       max_windows=args.final_eval_windows)
    end.update({"sample_bpb": sample_bpb,
                "sample_context": sample_context, "sample_file": "heldout_sample.bin",
                "sample_windows": min(args.final_eval_windows or 1 << 62, (len(sample) - 1) // sample_context),
                "train_tokens_per_s": args.steps * tokens_per_step / max(train_seconds, 1e-9),
                "train_seconds": train_seconds, "elapsed_s": time.perf_counter() - t_start,
                "weights": weights.name, "weights_bytes": weights.stat().st_size})
    log(end)
    log_file.close()
    return end


if __name__ == "__main__":
    main()
