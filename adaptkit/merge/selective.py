"""Two-model methods that take the other model's value only where it is close or important:
``nearswap`` and ``arcee_fusion`` (pure tensor functions; specs/merge-math.md).

* ``nearswap`` (alchemonaut's QuartetAnemoi recipe): ``w = clamp(t / max(|base - x|, 1e-6), 0, 1)`` per
  element, result ``w * x + (1 - w) * base``: equal or near-equal entries are swapped in, distant ones kept.
* ``arcee_fusion`` (mergekit v0.1 release note): importance ``s = |x - base| * KL(p || q)`` with
  ``p = softmax(x) + 1e-8``, ``q = softmax(base) + 1e-8`` over the last dimension (one KL per row, the whole
  vector for 1-D tensors); threshold ``median(s) + 1.5 * (Q3(s) - Q1(s))`` with the quantiles taken as
  ``sorted(s)[floor(q * (n - 1))]`` over *all* entries (mergekit samples 10^6 entries with replacement above
  10^6, which makes its output random; adaptkit is exact); entries with ``s >= threshold`` take ``x``, the
  rest keep ``base``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from adaptkit.merge.api import MergeInputs

NEARSWAP_DIFF_FLOOR = 1e-6
FUSION_PROB_EPS = 1e-8


def _pair(inputs: "MergeInputs", method: str) -> "tuple[torch.Tensor, torch.Tensor]":
    if inputs.base is None or len(inputs.tensors) != 1:
        raise ValueError(f"tensor {inputs.name!r}: {method} takes a base model and exactly one other model")
    return inputs.base, inputs.tensors[0]


def nearswap(inputs: "MergeInputs") -> "torch.Tensor":
    a, b = _pair(inputs, "nearswap")
    t = float(inputs.global_params["t"])
    d = (a - b).abs_().clamp_(min=NEARSWAP_DIFF_FLOOR)
    w = t / d  # t / max(|base - x|, 1e-6), one rounding
    w.clamp_(min=0.0, max=1.0)
    out = w * b
    out.add_((1.0 - w).mul_(a))
    return out


def fusion_importance(x: "torch.Tensor", base: "torch.Tensor") -> "torch.Tensor":
    """``|x - base| * KL(softmax(x) + eps || softmax(base) + eps)`` (KL over the last dimension, kept as a
    broadcast column)."""
    import torch

    from adaptkit.merge._util import det_rowsum

    p = torch.softmax(x, dim=-1).add_(FUSION_PROB_EPS)
    q = torch.softmax(base, dim=-1).add_(FUSION_PROB_EPS)
    terms = p * torch.log(p / q)
    cols = terms.shape[-1] if terms.dim() else 1
    kl = det_rowsum(terms.reshape(-1, cols)).to(x.dtype).reshape(*terms.shape[:-1], 1)
    return (x - base).abs_().mul_(kl)


def fusion_threshold(s: "torch.Tensor") -> "torch.Tensor":
    """``median + 1.5 * IQR`` with lower-index quantiles of all entries (no interpolation, no sampling)."""
    import torch

    flat = s.reshape(-1)
    n = flat.numel()
    vals = []
    for q in (0.25, 0.5, 0.75):
        k = int(q * (n - 1))  # 0-based rank in ascending order
        vals.append(torch.kthvalue(flat, k + 1).values)
    q1, med, q3 = vals
    return med + 1.5 * (q3 - q1)


def arcee_fusion(inputs: "MergeInputs") -> "torch.Tensor":
    import torch

    a, b = _pair(inputs, "arcee_fusion")
    if a.numel() == 0:
        return a.clone()
    s = fusion_importance(b, a)
    mask = s >= fusion_threshold(s)
    inputs.count("arcee_fusion_entries_taken", int(mask.sum()))
    return torch.where(mask, b, a)
