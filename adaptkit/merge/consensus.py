"""TIES sign election (pure tensor functions on one chunk).

``elect_sign(values, method)`` returns +1/-1 per element:

* ``"sum"`` (TIES paper, mergekit's default): the sign of ``sum_i values[i]``; a zero sum elects +1.
* ``"count"``: the sign of ``sum_i sign(values[i])`` (a majority vote); a tie elects +1.

``values`` are the (trimmed, rescaled) task vectors, either multiplied by their model weights
(``sign_election: weighted``, mergekit) or not (``unweighted``, the TIES paper, where weights scale the
merged vector after the election). Model ``i`` *agrees* with the elected sign where
``sign(values[i]) == elected``; a zero entry never agrees.

These functions work in the dtype of ``values`` (the ``"compute"`` election precision and the ``"count"``
method, whose sums of signs are exact). The default ``"float64"`` precision of the ``"sum"`` score is
implemented inline in ``task_arithmetic.combine_task_vectors`` (float64 accumulation of ``w_i * d_i``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch


def elect_sign(
    values: Sequence["torch.Tensor"], method: str = "sum", out: "torch.Tensor | None" = None
) -> "torch.Tensor":
    """+1.0/-1.0 per element (in ``values[0].dtype``, written into ``out`` if given); see the module
    docstring. The sum runs in model order."""
    import torch

    if out is None:
        out = torch.empty_like(values[0])
    if method == "sum":
        out.copy_(values[0])
        for v in values[1:]:
            out.add_(v)
    elif method == "count":
        torch.sign(values[0], out=out)
        for v in values[1:]:
            out.add_(torch.sign(v))
    else:  # pragma: no cover - validated by the Param choices
        raise ValueError(f"unknown consensus method {method!r}")
    torch.ge(out, 0, out=out)
    return out.mul_(2).sub_(1)


def agreement(value: "torch.Tensor", elected: "torch.Tensor", out: "torch.Tensor | None" = None) -> "torch.Tensor":
    """1.0 where ``sign(value) == elected`` else 0.0 (zeros never agree), written into ``out`` if given."""
    import torch

    if out is None:
        out = torch.empty_like(value)
    torch.mul(value, elected, out=out)
    return torch.gt(out, 0, out=out)
