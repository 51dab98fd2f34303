"""An opt-in recorder of when each ring step computes and when it waits for a transfer.

Off by default (no cost); inside ``record_timeline()`` the ring appends one event per interval:
``{"phase": "fwd" | "bwd", "step": s, "kind": "compute" | "transfer" | "gradient transfer" | "wait",
"start": t0, "end": t1}`` in seconds of ``time.perf_counter`` (one clock for every process of a host). A
``transfer`` (of a key/value shard; ``gradient transfer``: of a dk, dv accumulator) runs from when it was
posted to when the rank had waited for its receive, an upper bound on when it arrived; the ``wait``
inside it is the part no computation hid (exposed communication). On a GPU
the host clock only sees the device's work after a synchronization, so while recording, every
interval boundary waits for the compute stream (not for NCCL's stream: that would serialize the very
overlap being measured). Recording therefore adds a little time, and is for measuring only.
"""

from __future__ import annotations

import contextlib
import time

import torch

_events: list | None = None


@contextlib.contextmanager
def record_timeline():
    """``with record_timeline() as events:`` collects the events of the ring calls made inside."""
    global _events
    outer, _events = _events, []
    try:
        yield _events
    finally:
        _events = outer


def recording() -> bool:
    return _events is not None


def stamp(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return time.perf_counter()


def add(phase: str, step: int, kind: str, start: float, end: float) -> None:
    if _events is not None:
        _events.append({"phase": phase, "step": step, "kind": kind, "start": start, "end": end})


@contextlib.contextmanager
def interval(phase: str, step: int, kind: str, device: torch.device):
    """Record the enclosed work as one interval (nothing when not recording)."""
    if _events is None:
        yield
        return
    start = stamp(device)
    yield
    add(phase, step, kind, start, stamp(device))
