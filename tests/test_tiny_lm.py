"""The book's tiny byte-level language model (minikernels/tiny_lm.py) and its training script (tools/train_lm.py),
on the CPU at the tiny configuration: minikernels' attention gives the model the logits and gradients of
PyTorch's SDPA, training lowers the loss, weights round-trip through a file, the corpus is reproducible,
and the attention maps are the softmax of the model's own q and k."""

import hashlib
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import minikernels as mk  # noqa: F401  (selects the backend before anything imports triton)
from minikernels import tiny_lm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import train_lm  # noqa: E402

TINY = tiny_lm.CONFIGS["tiny"]
TEXT = b'def greet(name):\n    return f"hello, {name}!"\n\ngreet("world")\n'


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return tiny_lm.TinyLM(tiny_lm.Config(**{**asdict(TINY), **overrides}))


def fixed_batch(batch, n, seed=1):
    ids = torch.randint(0, 256, (batch, n + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def logits_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    logits, loss = model(x, y)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_default_config_fits_the_weight_budget():
    model = tiny_lm.TinyLM(tiny_lm.CONFIGS["small"])
    assert model.cfg.n_kv_heads < model.cfg.n_heads  # grouped-query attention
    assert 2 * model.num_params() <= 10_000_000  # bf16 weights of at most about 10 MB


def test_minikernels_matches_sdpa_logits_and_gradients():
    model = tiny_model().to(mk.device())  # float32, on the GPU where there is one
    assert model.cfg.n_kv_heads < model.cfg.n_heads
    x, y = (t.to(mk.device()) for t in fixed_batch(1, TINY.context))  # 2 blocks of 32 rows interpreted
    ref_logits, ref_grads = logits_and_grads(model.set_attention("sdpa"), x, y)
    logits, grads = logits_and_grads(model.set_attention("minikernels"), x, y)
    assert rel(logits, ref_logits) < 1e-4
    for name, g in ref_grads.items():
        assert rel(grads[name], g) < 1e-4, name


def test_eager_matches_sdpa():
    model = tiny_model()
    x, y = fixed_batch(2, 40)
    ref_logits, ref_grads = logits_and_grads(model.set_attention("sdpa"), x, y)
    logits, grads = logits_and_grads(model.set_attention("eager"), x, y)
    assert rel(logits, ref_logits) < 1e-5
    assert all(rel(grads[n], g) < 1e-4 for n, g in ref_grads.items())


def train_steps(steps=6, lr=3e-3):
    model = tiny_model(attention="sdpa")
    opt = train_lm.make_optimizer(model, lr, 0.1, "cpu")
    x, y = fixed_batch(2, TINY.context)
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_training_lowers_the_loss_reproducibly():
    losses = train_steps()
    assert math.isclose(losses[0], math.log(256), rel_tol=0.02)  # a fresh model guesses uniformly
    assert losses[-1] < losses[0] - 0.5
    assert train_steps() == losses  # the same seed gives the same run


def test_learning_rate_schedule():
    lrs = [train_lm.lr_at(s, 100, 1e-3, 1e-4, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model = tiny_model(attention="sdpa")
    path = model.save(tmp_path / f"model{suffix}")
    assert path.stat().st_size < 2 * model.num_params() + 100_000  # bf16
    loaded = tiny_lm.load(tmp_path)  # a directory finds model.safetensors or model.pt
    assert loaded.cfg == model.cfg and not loaded.training
    rounded = {n: p.detach().to(torch.bfloat16).float() for n, p in model.named_parameters()}
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, rounded[name]), name
    x, _ = fixed_batch(2, 32)
    with torch.no_grad():
        model.load_state_dict(rounded)
        assert torch.equal(loaded(x), model(x))
    assert tiny_lm.load(path, attention="eager").attention == "eager"
    out = tiny_lm.generate(loaded, b"import ", 5, seed=0)
    assert out.startswith(b"import ") and len(out) == 12 and out == tiny_lm.generate(loaded, b"import ", 5, seed=0)


def test_corpus_is_reproducible_and_split_by_file():
    data, files, sha = tiny_lm.stdlib_corpus("held_out")
    assert (data, files, sha) == tiny_lm.stdlib_corpus("held_out")
    assert sha == hashlib.sha256(data).hexdigest()
    assert files and all(tiny_lm.is_held_out(f) for f in files)
    assert data.startswith(tiny_lm.SEPARATOR) and data.count(tiny_lm.SEPARATOR) >= len(files)
    every = tiny_lm.stdlib_files()
    assert every == sorted(every) and len(every) > 500
    assert all(f.endswith(".py") and "site-packages" not in f for f in every)
    assert set(files) < set(every) and 0.02 < len(files) / len(every) < 0.1
    assert "os.py" in every and any(f.startswith("test/") for f in every)
    assert "pydoc_data/topics.py" not in every  # generated prose, not source
    no_tests = tiny_lm.stdlib_files(include_tests=False)
    assert not any({"test", "tests", "idle_test"} & set(f.split("/")[:-1]) for f in no_tests)


def test_attention_probs_are_the_softmax_of_the_models_q_and_k():
    model = tiny_model(attention="sdpa")
    seen = []

    def recording(q, k, v, layer):  # records what the model attends with; computes it with SDPA
        seen.append((q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    probs = tiny_lm.attention_probs(model, TEXT)
    n, cfg = len(TEXT), model.cfg
    assert probs.shape == (cfg.n_layers, cfg.n_heads, n, n)
    torch.testing.assert_close(probs.sum(-1), torch.ones(cfg.n_layers, cfg.n_heads, n))
    assert (probs.triu(1) == 0).all()  # causal: no weight on later bytes
    group = cfg.n_heads // cfg.n_kv_heads
    qk = tiny_lm.queries_keys(model, TEXT)
    with torch.no_grad():
        model.set_attention(recording)(torch.tensor([list(TEXT)]))
    for layer, (q, k) in enumerate(qk):
        assert q.shape == (cfg.n_heads, n, cfg.head_dim) and k.shape == (cfg.n_kv_heads, n, cfg.head_dim)
        _, _, v = seen[layer]
        out = torch.nn.functional.scaled_dot_product_attention(*seen[layer], is_causal=True, enable_gqa=True)[0]
        for h in range(cfg.n_heads):
            scores = q[h] @ k[h // group].T / math.sqrt(cfg.head_dim)
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).tril().logical_not(), -math.inf)
            torch.testing.assert_close(probs[layer, h], scores.softmax(-1))
            torch.testing.assert_close(probs[layer, h] @ v[0, h // group], out[h])  # what the model computes


def test_train_script_writes_a_loadable_run(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tools" / "train_lm.py"), "--config", "tiny", "--steps", "3",
           "--attention", "sdpa", "--out", str(out), "--batch", "2", "--exclude-tests"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=120)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    start, end = records[0], records[-1]
    assert [r["kind"] for r in records] == ["start", "eval", "train", "train", "train", "end"]
    assert not start["corpus"]["include_tests"]
    assert start["corpus"]["files"] > 300 and len(start["corpus"]["train"]["sha256"]) == 64
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")
    assert (out / "command.txt").read_text().startswith("python ")
    corpus = json.loads((out / "corpus.json").read_text())
    assert len(corpus["train_files"]) + len(corpus["held_out_files"]) == start["corpus"]["files"]
    model = tiny_lm.load(out)
    assert asdict(model.cfg) == json.loads((out / "config.json").read_text())
    sample = (out / end["sample_file"]).read_bytes()
    bpb = tiny_lm.bits_per_byte(model, sample, end["sample_context"], batch=2, max_windows=end["sample_windows"])
    assert bpb == pytest.approx(end["sample_bpb"], rel=1e-4)


def test_bits_per_byte_caps_windows_spread_over_the_data():
    """``max_windows`` takes windows spread over all the data: on bytes whose second half is a
    different text, a cap of 2 windows sees both halves, unlike the first 2 windows."""
    model = tiny_model(attention="sdpa")
    context = 8
    data = bytes(range(65, 65 + 4 * context)) + bytes(4 * context + 1)  # 8 windows: 4 of letters, then zeros
    whole = [tiny_lm.bits_per_byte(model, data[i * context:(i + 1) * context + 1], context) for i in range(8)]
    capped = tiny_lm.bits_per_byte(model, data, context, max_windows=2)
    assert math.isclose(capped, (whole[0] + whole[4]) / 2, rel_tol=1e-5)
    assert math.isclose(tiny_lm.bits_per_byte(model, data, context), sum(whole) / 8, rel_tol=1e-5)
