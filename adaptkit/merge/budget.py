"""The engine's memory budget: how much is loaded ahead, when a tensor is fed in row blocks, and the peak
working memory a plan is estimated to need (``--dry-run`` reports it). Imports no torch.

The engine reads these constants through this module at run time (tests patch them here).
"""
from __future__ import annotations

from typing import Any, Iterable

PREFETCH_MAX_BYTES = 64 * 2**20
"""Groups whose upcast inputs are at most this large are loaded ahead by the reader thread."""

ROW_CHUNK_NUMEL = 4 * 2**20
"""Row-separable methods see large tensors in row blocks of at most this many elements per input."""

TRIM_HEAP_BYTES = 32 * 2**20
"""Before a group whose upcast tensors are larger than this is loaded, free heap memory is returned."""


def prefetchable(task: Any) -> bool:
    """Whether the reader thread loads ``task``'s upcast inputs ahead (small groups only)."""
    return len(task.all_inputs()) * task.numel * task.compute_itemsize <= PREFETCH_MAX_BYTES


def peak_memory_estimate(tasks: Iterable[Any]) -> int:
    """Working memory of the largest tensor group: its inputs upcast to the compute dtype, the method's
    scratch (about two more copies), the rounded output, plus the prefetch window (small groups only)."""
    peak = 0
    for t in tasks:
        n = len(t.all_inputs())
        if t.kind == "merge":
            w = (n + 3) * t.numel * t.compute_itemsize + t.out_bytes
        else:
            w = t.out_bytes * 2
        peak = max(peak, w)
    return peak + PREFETCH_MAX_BYTES
