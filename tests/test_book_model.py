"""The model the book trained (book/data/tiny_lm/, written by tools/train_lm.py on a GPU) loads on a CPU
with torch alone, predicts held-out Python source as well as its training log says, and computes the
same logits with minikernels' FlashAttention as with PyTorch's attention."""

import json
import math

import pytest
import torch

import minikernels as mk  # (selects the backend before anything imports triton)
from minikernels import tiny_lm

RUN = tiny_lm.BOOK_MODEL_DIR


def records(name="train_log.jsonl", run=RUN):
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def model():
    return tiny_lm.load_book_model(attention="sdpa")  # float32 on the CPU


def test_the_committed_run_is_complete():
    for name in ("model.pt", "train_log.jsonl", "config.json", "command.txt", "corpus.json", "heldout_sample.bin"):
        assert (RUN / name).is_file(), f"{name} missing from {RUN}"
    assert (RUN / "model.pt").stat().st_size <= 10 * 2**20  # at most about 10 MB (bf16 weights)
    start, end = records()[0], records()[-1]
    assert start["kind"] == "start" and end["kind"] == "end"
    assert start["config"]["attention"] == "minikernels" and start["backend"] == "cuda"
    assert start["config"]["n_kv_heads"] < start["config"]["n_heads"]  # grouped-query attention
    assert (RUN / "command.txt").read_text().split() == start["command"].split()
    corpus = json.loads((RUN / "corpus.json").read_text())
    assert corpus["train"]["sha256"] == start["corpus"]["train"]["sha256"]
    assert len(corpus["train_files"]) == corpus["train"]["files"] > 100


def test_held_out_bits_per_byte_match_the_log(model):
    """Bits per byte on the held-out sample (files the model never trained on) at the log's context.
    The GPU evaluated in bf16 autocast, this CPU in float32: the two agree to rounding."""
    end = records()[-1]
    sample = (RUN / end["sample_file"]).read_bytes()
    bpb = tiny_lm.bits_per_byte(model, sample, end["sample_context"], batch=64, max_windows=end["sample_windows"])
    untrained = records()[1]["held_out_bpb"]  # the evaluation before the first step
    assert untrained > 7.5  # a uniform guess over 256 bytes is 8 bits
    assert bpb < end["sample_bpb"] + 0.02, (bpb, end["sample_bpb"])
    assert abs(bpb - end["sample_bpb"]) < 0.02
    assert bpb < 0.5 * untrained  # and it learned: well below the untrained model


def test_logits_with_minikernels_equal_the_reference():
    """The same weights and bytes through mk.flash_attention (Triton's interpreter here) and through
    the eager PyTorch reference (softmax(q k^T / sqrt(d)) v in float32)."""
    text = (RUN / "heldout_sample.bin").read_bytes()[:96]
    idx = torch.tensor([list(text)], device=mk.device())
    on_device = tiny_lm.load_book_model(attention="eager").to(mk.device())  # float32, on the GPU if any
    with torch.no_grad():
        want = on_device(idx).double()
        got = on_device.set_attention("minikernels")(idx).double()
    err = ((got - want).norm() / want.norm()).item()
    assert math.isfinite(err) and err < 1e-5, err
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.99
