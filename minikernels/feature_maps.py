"""Linear attention's feature maps and the normalizer's division, in PyTorch.

Torch only, no Triton: both ``minikernels.linear`` (the kernels, which re-exports these names) and
``minikernels.reference`` (the oracle, which must import no Triton) use them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FEATURE_MAPS = ("elu1", "relu", "taylor")


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """BASED's second-order Taylor map: phi(q) . phi(k) = 1 + q.k/sqrt(d) + (q.k)^2 / (2d), the first
    three terms of exp(q.k / sqrt(d)). Feature size 1 + d + d^2."""
    d = x.shape[-1]
    ones = x.new_ones(*x.shape[:-1], 1)
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
    return torch.cat([ones, x / d**0.25, outer / (2**0.5 * d**0.5)], dim=-1)


def apply_feature_map(x: torch.Tensor, feature_map: str | Callable | None) -> torch.Tensor:
    """phi(x) for a named map ("elu1": elu(x) + 1, "relu", "taylor"), a callable, or None (identity).
    A callable must return a tensor (TypeError otherwise)."""
    if feature_map is None:
        return x
    if callable(feature_map):
        out = feature_map(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"feature_map must return a torch.Tensor, got {type(out).__name__}")
        return out
    if not isinstance(feature_map, str):
        raise TypeError(f"feature_map must be None, a callable or one of {FEATURE_MAPS}, "
                        f"got {type(feature_map).__name__}")
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "taylor":
        return taylor_features(x)
    raise ValueError(f"feature_map must be None, a callable or one of {FEATURE_MAPS}, got {feature_map!r}")


def mapped_features(q: torch.Tensor, k: torch.Tensor, feature_map) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi(q), phi(k)), checked: tensors that keep q's [B, H, N] and dtype and have one feature size."""
    qf, kf = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
    if qf.dim() != q.dim() or qf.shape[:-1] != q.shape[:-1] or qf.shape != kf.shape:
        raise ValueError(f"feature_map must keep [B, H, N] and map q and k alike, got {tuple(qf.shape)} "
                         f"and {tuple(kf.shape)} from {tuple(q.shape)}")
    if qf.dtype != q.dtype or kf.dtype != q.dtype:
        raise TypeError(f"feature_map must keep the inputs' dtype {q.dtype}, got {qf.dtype} and {kf.dtype}")
    return qf, kf


def normalized(o: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    # a row whose normalizer is exactly 0 (no key with a positive feature product) gets 0, not NaN
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.where(denom == 0, torch.zeros_like(o), o / safe)
