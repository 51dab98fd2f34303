"""What the kernel modules share: constants, the online-softmax step, head-dim padding, the dtype a
kernel computes in, and the planning of tiles against the device's shared memory.

Every kernel module imports these from here, so that no module reaches into another's private
names. Triton code reads only ``tl.constexpr`` globals, so each constant a kernel uses exists twice:
as a Python float for the host side (``LOG2E``) and as a constexpr for ``@triton.jit`` code
(``TL_LOG2E``).
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from ._backend import is_interpreter

# exp(x) = 2^(x log2 e): the kernels exponentiate in base 2, which the GPU's special-function unit
# computes in one instruction (ex2), and scale the logits by log2(e) once instead
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453  # 1 / log2(e): back from base 2 to the natural log-sum-exp
TL_LOG2E = tl.constexpr(LOG2E)
TL_LN2 = tl.constexpr(LN2)


# --------------------------------------------------------------------------------------------------
# the online softmax (chapter 0), as flash, block-sparse and decode attention fold a block of logits in
# --------------------------------------------------------------------------------------------------

@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, MAY_BE_EMPTY: tl.constexpr, DOT_PREC: tl.constexpr):
    """Fold a block of base-2 logits ``s`` [ROWS, COLS] (masked entries -inf) and its values ``v``
    [COLS, D] into the running maximum ``m_i``, sum ``l_i`` and output ``acc`` of each row:

        m' = max(m, rowmax(s)),  alpha = 2^(m - m'),  p = 2^(s - m'),
        l' = alpha l + rowsum(p),  acc' = alpha acc + p v.

    ``MAY_BE_EMPTY``: a row may have seen no visible key yet (m' = -inf); it is shifted by 0 instead,
    so that 2^(-inf) gives 0 and not NaN. Blocks known to show every row a key skip that select."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MAY_BE_EMPTY:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    alpha = tl.exp2(m_i - m_shift)  # rescales what was accumulated under the old maximum
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def natural_lse(m_i, l_i):
    """The log-sum-exp (natural log) of rows whose running base-2 maximum and sum are ``m_i``, ``l_i``;
    -inf for a row that saw no key (l = 0)."""
    empty_row = l_i == 0.0
    return tl.where(empty_row, float("-inf"), (m_i + tl.log2(tl.where(empty_row, 1.0, l_i))) * TL_LN2)


@triton.jit
def base2_lse_for_backward(lse):
    """A saved log-sum-exp in base 2, for a backward that recomputes P = 2^(s - lse): a row that saw no
    key (lse = -inf) gets +inf, so that its P is 0 rather than NaN."""
    return tl.where(lse == float("-inf"), float("inf"), lse) * TL_LOG2E


# --------------------------------------------------------------------------------------------------
# shapes and dtypes
# --------------------------------------------------------------------------------------------------

def head_dim_pad(d: int) -> int:
    """The head-dim tile of a kernel for head dim ``d``: the next power of two, at least 16 (tl.dot's
    smallest); lanes past ``d`` are masked."""
    return max(16, triton.next_power_of_2(d))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel computes ``dtype`` inputs in: the same, except bfloat16 under the
    interpreter, whose bfloat16 tl.dot is wrong (DESIGN.md): float32 there, cast back after."""
    return torch.float32 if (dtype == torch.bfloat16 and is_interpreter()) else dtype


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the interpreter: 1)."""
    if is_interpreter() or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------------------------------
# shared memory: tiles fitted to what the device reports
# --------------------------------------------------------------------------------------------------

# Shared memory left free below the device's limit: the estimate counts the tiles, not the scalars,
# barriers and layout-conversion scratch the compiler adds (at most 8 KiB beyond the estimate in every
# configuration checked, on sm_90 and sm_80).
SMEM_MARGIN = 16 * 1024

# float32's fallback when the 3xtf32 operands do not fit at any tile size: single-pass tf32, within the
# package's float32 tolerance on a GPU (testing.tolerance)
TF32_FALLBACK = {"DOT_PREC": "tf32"}

# CUDA's limit on a grid's second and third axes (the first takes 2^31 - 1): a launch whose batch, heads
# or sequences lie on them takes at most this many, and larger ones are launched in slices
MAX_GRID_YZ = 65535


def batch_slices(batch: int, heads: int, most: int, op: str) -> list[tuple[int, int]]:
    """[lo, hi) ranges of whole batch entries, one a launch, for a grid whose second (or third) axis
    holds one program per (batch entry, head) and takes at most ``most`` (MAX_GRID_YZ, or a planning
    override): a larger batch is launched in slices. Kernels that address their tensors through batch
    strides, with logsumexp-like rows contiguous in (batch, head), run a slice on views of the tensors."""
    per_launch = most // heads
    if per_launch < 1:
        raise ValueError(f"{op} launches one program per (batch, head): {heads} heads are more than one "
                         f"axis of a CUDA grid holds ({most})")
    return [(lo, min(batch, lo + per_launch)) for lo in range(0, batch, per_launch)]


@functools.cache
def _device_shared_memory(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def shared_memory_limit(device: torch.device | None = None) -> int | None:
    """Bytes of shared memory one program may use on ``device`` (default: the current CUDA device), as
    the driver reports it (the opt-in limit per block: 232448 on an H100 or H200, 166912 on an A100,
    101376 on most consumer GPUs); None under the interpreter, which has no such limit."""
    if is_interpreter():
        return None
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _device_shared_memory(index)


def smem_estimate(resident: int, streamed: tuple[int, ...], elem_bytes: int, num_stages: int, extra: int = 0, *,
                  buffers: int | None = None, split: bool | None = None, split_streamed: bool = True) -> int:
    """Shared memory (bytes) of a kernel whose loop feeds ``tl.dot`` from tiles in shared memory:
    ``resident`` elements of operands loaded once (the program's own rows), ``streamed`` tiles (elements
    each) loaded every step, ``extra`` bytes of other loads every step (mask tiles, row statistics).

    * ``split`` (default: float32 inputs, which run as 3xtf32, ``dot_options``): each operand is split
      into a high and a low part held side by side, so the resident operands count twice and the split
      of the largest streamed tile (one at a time) adds two copies of it (unless ``split_streamed`` is
      False: a kernel whose products run on the older MMA, fewer than 64 rows, splits them in registers).
    * ``buffers``: the copies of each streamed tile that the software pipeliner keeps in flight. By
      default what Triton 3.9 allocates for pointer loads in these kernels: ``num_stages - 1`` for split
      float32 operands (their loads land in registers to be split), ``num_stages`` for unsplit float32
      ones, ``num_stages - 1`` but at least one otherwise (16-bit loops, which it often does not
      pipeline at all: one copy). Loads through tensor descriptors (TMA) take more: the caller says.

    Checked against Triton 3.9's own figure on sm_90 (every configuration the planners pick for an
    H100 or H200, compiled offline): exact for most, above it for the rest. Where it is below, the
    launch steps down at run time (``launch_fitting``)."""
    split = elem_bytes == 4 if split is None else split
    if buffers is None:
        if split and split_streamed:  # the loads land in registers, to be split into shared memory
            buffers = num_stages - 1
        else:  # the MMA reads the loaded tiles from shared memory: at least one copy
            buffers = num_stages if elem_bytes == 4 and not split else max(1, num_stages - 1)
    elements = (2 if split else 1) * resident + buffers * sum(streamed)
    if split and split_streamed:
        elements += 2 * max(streamed)
    return elements * elem_bytes + max(1, buffers) * extra


def split_operands(cfg: dict, elem_bytes: int) -> bool:
    """Whether a kernel at ``cfg`` splits its float32 operands (3xtf32): float32 unless ``cfg`` overrides
    the precision."""
    return elem_bytes == 4 and cfg.get("DOT_PREC", "tf32x3") == "tf32x3"


def step_down(cfg: dict, tiles: tuple[str, ...], least: int = 16, resident: str | None = None,
              relaxed: dict | None = None):
    """The configurations to try from ``cfg``, largest first: at each tile size, ``cfg``'s number of
    pipeline stages down to one; then the largest of the ``tiles`` keys (the first of them on a tie)
    halved, down to ``least``. When the ``resident`` tile drops below 128 rows, 8 warps become 4 (a
    64-row tile is one warp group's). Then the same again with ``relaxed`` merged in (float32:
    single-pass tf32 products, whose operands are not split)."""
    for variant in ({}, relaxed) if relaxed else ({},):
        tile = {**cfg, **variant}
        while True:
            for stages in range(cfg["num_stages"], 0, -1):
                yield {**tile, "num_stages": stages}
            shrinkable = [key for key in tiles if tile[key] > least]
            if not shrinkable:
                break
            key = max(shrinkable, key=lambda k: tile[k])  # max keeps the first on a tie
            tile = {**tile, key: tile[key] // 2}
            if resident is not None and tile[resident] < 128:
                tile["num_warps"] = min(tile["num_warps"], 4)


def fit_shared_memory(cfg: dict, need, limit: int | None, tiles: tuple[str, ...], least: int = 16,
                      resident: str | None = None, relaxed: dict | None = None) -> dict:
    """``cfg`` stepped down (``step_down``) until ``need(cfg)`` (bytes) fits ``limit - SMEM_MARGIN``.
    ``limit=None`` (no limit: the interpreter) keeps ``cfg``. If even the smallest tiles do not fit,
    the smallest are returned and the compiler has the last word (``launch_fitting``)."""
    if limit is None:
        return dict(cfg)
    budget = limit - SMEM_MARGIN
    trial = cfg
    for trial in step_down(cfg, tiles, least, resident, relaxed):
        if need(trial) <= budget:
            return trial
    return trial


# The configurations launch_fitting had to step down to, by launch key and first configuration.
_FITTED: dict = {}


def launch_fitting(key, cfg: dict, launch, tiles: tuple[str, ...], least: int = 16, resident: str | None = None,
                   relaxed: dict | None = None):
    """``launch(cfg)``, stepped down (``step_down``) while the compiled kernel asks for more shared
    memory than one program may have on this GPU: Triton raises OutOfResources when it loads the
    compiled kernel, before it runs, so the failed launch wrote nothing (a launch in batch slices may
    have written earlier slices; those launches only overwrite their outputs, so the retry is safe).
    The planners estimate shared memory ahead (``smem_estimate``) and are right for the configurations
    they were checked on; this is the net under the rest (other GPUs, other Triton versions). A
    configuration that had to step down is remembered under (key, cfg), so later calls start from it."""
    start = tuple(sorted(cfg.items()))
    first = _FITTED.get((key, start))
    candidates = step_down(cfg, tiles, least, resident, relaxed)
    if first is not None:  # skip what failed before
        candidates = itertools.dropwhile(lambda c: c != first, candidates)
    last_error = None
    for trial in candidates:
        try:
            out = launch(trial)
        except triton.runtime.errors.OutOfResources as error:
            last_error = error
            continue
        if trial != cfg:
            _FITTED[(key, start)] = trial
        return out
    if last_error is None:  # (a remembered fit is always among the candidates)
        raise RuntimeError(f"no configuration to launch {key!r} with")
    raise last_error


def fitted_launches() -> dict:
    """What ``launch_fitting`` had to step down to so far: {(key, first configuration): the configuration
    that launched} (a copy)."""
    return dict(_FITTED)
