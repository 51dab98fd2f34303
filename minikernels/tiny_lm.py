"""A tiny byte-level language model whose attention is minikernels' FlashAttention.

Read top to bottom, like nanoGPT: a decoder-only transformer over bytes (256 tokens, no tokenizer)

    x = embed(bytes)                                      [B, N, d_model]
    for each block:  x = x + Attention(RMSNorm(x))        causal, rotary positions, GQA
                     x = x + SwiGLU(RMSNorm(x))
    logits = RMSNorm(x) @ embed.weight^T                  tied output head, [B, N, 256]

The attention backend is chosen per model (``TinyLM.set_attention``):

- ``"minikernels"``: ``mk.flash_attention(q, k, v, causal=True)``, the book's Triton kernel, forward and
  backward; k and v keep their ``n_kv_heads`` heads (grouped-query attention is done inside the kernel);
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)``;
- ``"eager"``: ``softmax(q k^T / sqrt(d) + causal mask) v`` written out in PyTorch;
- any callable ``fn(q, k, v, layer) -> out`` with q ``[B, H, N, d]``, k and v ``[B, n_kv_heads, N, d]``
  (rotary already applied): the chapters swap in masks or linear attention this way.

``attention_probs`` and ``queries_keys`` give the model's own attention maps and its q and k per
layer and head. The corpus is the Python standard library's source of the interpreter that runs this
(``stdlib_corpus``), split into training and held-out data by file. Loading a saved model (``load``)
needs only torch, on a CPU; ``safetensors`` is used when it is installed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import safetensors.torch as _safetensors
except ImportError:  # torch.save is the fallback: loading then needs torch alone
    _safetensors = None

VOCAB = 256  # one token per byte value


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------

@dataclass
class Config:
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads // n_kv_heads query heads share one k/v head
    d_ff: int = 704  # SwiGLU hidden width: 8/3 * d_model rounded up to a multiple of 64 (as LLaMA)
    context: int = 512
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    attention: str = "minikernels"  # "minikernels", "sdpa" or "eager"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self):
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}) and "
                             f"n_kv_heads ({self.n_kv_heads}) must divide n_heads")
        if self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim, got {self.head_dim}")


# The book's model (about 4.5M parameters, 9 MB in bf16) and a tiny one for CPU tests and smoke runs.
CONFIGS = {
    "small": Config(),
    "tiny": Config(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, context=64),
}


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (Zhang and Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rotary_tables(context: int, head_dim: int, base: float):
    """cos and sin ``[context, head_dim // 2]`` of the rotary angles t * base^(-2i / head_dim) (Su et al.)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each pair (x_i, x_{i + d/2}) of ``x [B, H, N, d]`` by position N's angle, in float32."""
    n = x.shape[-2]
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:n], sin[:n]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).type_as(x)


def eager_attention(q, k, v, scale: float | None = None):
    """softmax(q k^T * scale + causal mask) v in plain PyTorch; k, v may have fewer heads (GQA)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ v.float()).type_as(q)


def attend(q, k, v, attention, layer: int):
    """Causal attention of ``q [B, H, N, d]`` over ``k, v [B, Hkv, N, d]`` with the chosen backend."""
    if callable(attention):
        return attention(q, k, v, layer)
    if attention == "minikernels":
        from .flash import flash_attention

        return flash_attention(q, k, v, causal=True)
    if attention == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    if attention == "eager":
        return eager_attention(q, k, v)
    raise ValueError(f"attention must be 'minikernels', 'sdpa', 'eager' or a callable, got {attention!r}")


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kv = cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv, bias=False)  # q, k, v in one matmul
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def qkv(self, x, cos, sin):
        """q ``[B, H, N, d]`` and k ``[B, Hkv, N, d]`` with rotary positions applied, and v ``[B, Hkv, N, d]``."""
        b, n, _ = x.shape
        kv = self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        q = q.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, attention, capture=None):
        q, k, v = self.qkv(x, cos, sin)
        if capture is not None:
            capture.append((q, k))
        y = attend(q, k, v, attention, self.layer)  # [B, H, N, d]
        return self.wo(y.transpose(1, 2).reshape(x.shape))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)  # gate and up projections, fused
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg, layer)
        self.norm2, self.mlp = RMSNorm(cfg.d_model, cfg.norm_eps), SwiGLU(cfg)

    def forward(self, x, cos, sin, attention, capture=None):
        x = x + self.attn(self.norm1(x), cos, sin, attention, capture)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.attention = cfg.attention
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        cos, sin = rotary_tables(cfg.context, cfg.head_dim, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)  # recomputed, never saved
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 n_layers)
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def set_attention(self, attention) -> TinyLM:
        """Switch the attention backend ("minikernels", "sdpa", "eager" or ``fn(q, k, v, layer)``)."""
        if not callable(attention) and attention not in ("minikernels", "sdpa", "eager"):
            raise ValueError(f"attention must be 'minikernels', 'sdpa', 'eager' or a callable, got {attention!r}")
        self.attention = attention
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, capture=None):
        """Logits ``[B, N, 256]`` for byte ids ``idx [B, N]`` (N <= context); with ``targets``, also the mean
        cross-entropy in nats. ``capture``, a list, receives each layer's (q, k)."""
        if idx.shape[-1] > self.cfg.context:
            raise ValueError(f"sequence length {idx.shape[-1]} exceeds the context ({self.cfg.context})")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.cos, self.sin, self.attention, capture)
        logits = F.linear(self.norm(x), self.embed.weight)  # tied head: the embedding matrix reads out
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))

    # ---- saving and loading -------------------------------------------------------------------------

    def save(self, path, dtype=torch.bfloat16) -> Path:
        """Write the weights (in ``dtype``) and the config to ``path``: ``*.safetensors`` (needs the
        safetensors package) or anything else through ``torch.save``. Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        config = json.dumps(asdict(self.cfg))
        if path.suffix == ".safetensors":
            if _safetensors is None:
                raise ImportError("saving to .safetensors needs the safetensors package; use a .pt path")
            _safetensors.save_file(state, str(path), metadata={"config": config})
        else:
            torch.save({"config": json.loads(config), "state_dict": state}, path)
        return path


def default_weights_name() -> str:
    """``torch.save``'s format: loading it needs torch alone, with or without safetensors installed."""
    return "model.pt"


def load(path, attention: str | None = None, device="cpu", dtype=torch.float32) -> TinyLM:
    """The model saved at ``path`` (a file, or a directory holding model.safetensors or model.pt), its
    weights cast to ``dtype`` on ``device``, in eval mode. ``attention`` overrides the saved backend."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "model.pt") if (path / n).exists()]
        if not found:
            raise FileNotFoundError(f"no model.safetensors or model.pt in {path}")
        path = found[0]
    if path.suffix == ".safetensors":
        if _safetensors is None:
            raise ImportError(f"{path} needs the safetensors package to load")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # the config sits in the header's metadata
            config = json.loads(f.metadata()["config"])
        state = _safetensors.load_file(str(path))
    else:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        config, state = blob["config"], blob["state_dict"]
    cfg = Config(**config)
    if attention is not None:
        cfg.attention = attention
    model = TinyLM(cfg)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    model = model.to(device=device, dtype=dtype)
    model.cos, model.sin = model.cos.float(), model.sin.float()  # rotary tables stay float32
    return model.eval()


# where the book keeps the model trained by tools/train_lm.py (weights, log, command), in a checkout
BOOK_MODEL_DIR = Path(__file__).resolve().parents[1] / "book" / "data" / "tiny_lm"


def load_book_model(attention: str | None = None, device="cpu", dtype=torch.float32) -> TinyLM:
    """The book's trained model (``BOOK_MODEL_DIR``), as ``load`` gives it."""
    return load(BOOK_MODEL_DIR, attention=attention, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# looking inside: q, k and attention maps
# --------------------------------------------------------------------------------------------------

def _as_batch(idx):
    if isinstance(idx, (bytes, bytearray)):
        idx = torch.tensor(list(idx), dtype=torch.long)
    return (idx[None], True) if idx.dim() == 1 else (idx, False)


@torch.no_grad()
def queries_keys(model: TinyLM, idx):
    """Each layer's q ``[H, N, d]`` and k ``[Hkv, N, d]`` (rotary applied: what the softmax sees) for a
    sequence ``idx`` (bytes, or ids ``[N]``; ``[B, N]`` gives ``[B, H, N, d]`` and ``[B, Hkv, N, d]``).
    Returns a list of (q, k), one per layer. Query head h reads k/v head h // (n_heads // n_kv_heads)."""
    idx, single = _as_batch(idx)
    capture = []
    model(idx.to(model.embed.weight.device), capture=capture)
    return [(q[0], k[0]) if single else (q, k) for q, k in capture]


@torch.no_grad()
def attention_probs(model: TinyLM, idx):
    """Causal attention probabilities ``[L, H, N, N]`` (row i: how query i spreads over keys j <= i) of
    every layer and head, in float32, computed from the model's own q and k as softmax(q k^T / sqrt(d)).
    ``idx`` is bytes or ids ``[N]``; ids ``[B, N]`` give ``[L, B, H, N, N]``."""
    idx, single = _as_batch(idx)
    maps = []
    for q, k in queries_keys(model, idx):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).float()
        scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        n = scores.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1))
    out = torch.stack(maps)
    return out[:, 0] if single else out


@torch.no_grad()
def generate(model: TinyLM, prompt: bytes, n: int, temperature: float = 1.0, seed: int = 0) -> bytes:
    """``prompt`` followed by ``n`` sampled bytes (no KV cache: the window is recomputed each step)."""
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    device = model.embed.weight.device
    for _ in range(n):
        window = torch.tensor(ids[-model.cfg.context:], device=device)[None]
        logits = model(window)[0, -1].float().cpu()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=g))
        ids.append(nxt)
    return bytes(ids)


@torch.no_grad()
def bits_per_byte(model: TinyLM, data, context: int | None = None, batch: int = 16, max_windows=None) -> float:
    """Mean cross-entropy in bits per byte over ``data`` (bytes or a uint8 tensor), cut into
    non-overlapping windows of ``context`` + 1 bytes (each predicts its last ``context`` bytes).
    ``max_windows`` caps the count: that many windows spread evenly over all of ``data`` (not its
    first ones, which would measure only the files that happen to come first)."""
    context = context or model.cfg.context
    data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if isinstance(data, (bytes, bytearray)) else data
    available = (len(data) - 1) // context
    n_windows = available if max_windows is None else min(available, max_windows)
    if n_windows < 1:
        raise ValueError(f"data of {len(data)} bytes holds no window of {context + 1}")
    chosen = torch.arange(n_windows) * available // n_windows  # every window when n_windows == available
    device = model.embed.weight.device
    offsets = torch.arange(context + 1)
    total, count = 0.0, 0
    for start in range(0, n_windows, batch):
        starts = chosen[start:start + batch] * context
        w = data[starts[:, None] + offsets].to(device=device, dtype=torch.long)
        with _autocast(device):
            _, loss = model(w[:, :-1], w[:, 1:])
        total += float(loss) * w[:, 1:].numel()
        count += w[:, 1:].numel()
    return total / count / math.log(2)


def _autocast(device):
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def flops_per_token(cfg: Config, params: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4; Kaplan et al. 2020) plus the
    attention scores and weighted sums, 2 matmuls of N/2 keys on average under the causal mask:
    3 * 2 * 2 * (context / 2) * d_model per layer."""
    return 6 * params + 6 * cfg.n_layers * cfg.context * cfg.d_model


# --------------------------------------------------------------------------------------------------
# the corpus: the Python standard library's source
# --------------------------------------------------------------------------------------------------

SEPARATOR = b"\x00"  # written before each file: a byte that Python source does not use
HELD_OUT_FRACTION = 0.05
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# generated data, not source: pydoc's topic texts (~0.75 MB of English prose in one dict literal).
# Held out by its name's hash, it would be half of the held-out bytes and the "held-out Python" loss
# would mostly measure prose.
_SKIP_FILES = {"pydoc_data/topics.py"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool = True, root=None) -> list[str]:
    """The ``.py`` files under the standard library, as sorted POSIX paths relative to it, without
    site-packages, build configuration (``config-*``, ``_sysconfigdata*``), generated data
    (``_SKIP_FILES``) and, unless ``include_tests``, the test suites."""
    root = Path(root) if root is not None else stdlib_root()
    skip = _SKIP_DIRS if include_tests else _SKIP_DIRS | _TEST_DIRS
    files = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked directories
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith("config-")]
        rel = Path(dirpath).relative_to(root)
        files += [(rel / f).as_posix() for f in filenames
                  if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return sorted(f for f in files if f not in _SKIP_FILES)


def is_held_out(path: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Whether file ``path`` is held out: decided by a hash of its name, so the split does not move when
    other files come or go."""
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) < fraction * 16**8


def stdlib_corpus(split: str = "all", include_tests: bool = True, root=None) -> tuple[bytes, list[str], str]:
    """(bytes, files, sha256) of the standard library's source: the files of ``split`` ("all", "train"
    or "held_out"), each preceded by ``SEPARATOR``, and the hex sha256 of those bytes."""
    if split not in ("all", "train", "held_out"):
        raise ValueError(f"split must be 'all', 'train' or 'held_out', got {split!r}")
    root = Path(root) if root is not None else stdlib_root()
    files = stdlib_files(include_tests, root)
    if split != "all":
        files = [f for f in files if is_held_out(f) == (split == "held_out")]
    data = b"".join(SEPARATOR + (root / f).read_bytes() for f in files)
    return data, files, hashlib.sha256(data).hexdigest()
