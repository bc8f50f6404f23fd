"""Shared helpers of the merge math: bounded chunking and thread-count-independent reductions.

Reductions in torch are parallelised by splitting the reduced dimension when there is a single output
(``x.sum()``), so the rounding of a full sum depends on ``torch.get_num_threads()``. A reduction over the
inner dimension of a 2-D view with at least two rows is split over *rows* only, and a reduction of fewer than
``at::internal::GRAIN_SIZE`` (32768) elements always runs serially. ``det_sum`` uses exactly these two facts:
fixed-size rows of ``_ROW`` elements summed in the input dtype, then the row sums in float64 the same way.
The order of every addition is therefore a function of the tensor's length only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: elements per chunk for elementwise passes (bounded temporaries: a few chunk-sized buffers per model)
CHUNK = 1 << 20
#: row length for deterministic reductions; must stay below torch's GRAIN_SIZE (32768)
_ROW = 16384


def det_sum(x: "torch.Tensor") -> float:
    """Sum of all elements of ``x`` (as a Python float), bit-identical for any thread count.

    Rows of ``_ROW`` elements are summed in ``x``'s dtype (torch's cascade summation, one thread per row),
    the row sums are then added in float64 the same way until one value is left.
    """
    import torch

    flat = x.reshape(-1)
    n = flat.numel()
    if n <= _ROW:
        return float(flat.sum(dtype=torch.float64)) if n <= 64 else float(flat.sum().double())
    rows = n // _ROW
    parts = flat[: rows * _ROW].view(rows, _ROW).sum(dim=1).double()
    if rows * _ROW < n:
        parts = torch.cat([parts, flat[rows * _ROW :].sum().double().reshape(1)])
    while parts.numel() > _ROW:
        m = parts.numel()
        r = m // _ROW
        head = parts[: r * _ROW].view(r, _ROW).sum(dim=1)
        parts = torch.cat([head, parts[r * _ROW :].sum().reshape(1)]) if r * _ROW < m else head
    return float(parts.sum())


def det_rowsum(x: "torch.Tensor") -> "torch.Tensor":
    """Sums over the last dim of a 2-D tensor (float64 result; each row summed in ``x``'s dtype by one
    thread), bit-identical for any thread count."""
    import torch

    rows = x.shape[0]
    if rows == 1 or x.shape[1] > (1 << 22):
        return torch.tensor([det_sum(r) for r in x], dtype=torch.float64, device=x.device)
    return x.sum(dim=1).to(torch.float64)


def flat_chunks(n: int, chunk: int = CHUNK):
    """``(start, stop)`` pairs covering ``range(n)`` in fixed-size chunks."""
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)
