"""B and C laid out chunk-major for the kernels, and the strides they take."""

from __future__ import annotations

import torch


def chunk_major(t4: torch.Tensor, n_pad: int, l_pad: int, steps: int, dtype: torch.dtype) -> torch.Tensor:
    # B or C [batch, G, n, N] as contiguous [batch, G, l_pad / steps, n_pad, steps] in dtype, zeros past n
    # and N: a few megabytes, laid out once here instead of gathered by every channel inside the kernel
    bsz, groups, n, length = t4.shape
    out = torch.zeros((bsz, groups, l_pad // steps, n_pad, steps), dtype=dtype, device=t4.device)
    full = length // steps * steps
    out[:, :, :full // steps, :n] = t4[..., :full].unflatten(-1, (-1, steps)).transpose(2, 3)
    if full < length:
        out[:, :, full // steps, :n, :length - full] = t4[..., full:]
    return out


def bc_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int], int]:
    # [B, n, N] is one group: view as [B, 1, n, N]
    t4 = t[:, None] if t.dim() == 3 else t
    return t4, t4.stride(), t4.shape[1]


def strides3(t):
    # strides of an optional [B, D, N] tensor (zeros when absent: never read)
    return t.stride() if t is not None else (0, 0, 0)
