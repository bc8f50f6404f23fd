"""SCE and RAM: task-vector methods with per-position rules (pure tensor functions; specs/merge-math.md).

* ``sce`` (FuseChat, arXiv:2408.07990, "Select, Calculate, Erase"): with task vectors ``d_i = x_i - base``,
  *select* keeps the ``int(select_topk * nnz(var))`` positions of largest variance across the models
  (population variance; ``select_topk = 1``: all), *calculate* weighs each model by
  ``w_i = mean(d_i^2) / sum_j mean(d_j^2)`` (equal weights when that sum is below ``sce_weight_guard``,
  mergekit's absolute guard of 1e-6), *erase* keeps the entries whose sign agrees with the sign of
  ``sum_i d_i`` (a zero sum elects +; zeros never agree); the merged task vector is
  ``sum_i w_i m_i d_i / max(sum_i w_i m_i, 1e-6)``.
* ``ram`` (Reinforced Agent Merging, arXiv:2601.13572): an entry of ``d_i`` *contributes* when
  ``|d_i| > epsilon``; a position with one contributor takes that model's delta, one with several their
  mean. ``ramplus_tl`` scales each model's unique contributions by
  ``lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)`` (counts of its contributing
  positions that are shared / unique, per tensor).

Reductions (means of squares, counts) are float64 sums in a fixed order (``adaptkit.merge._util``):
outputs do not depend on the thread count. Elementwise work runs in the compute dtype.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from adaptkit.merge._util import det_sum

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from adaptkit.merge.api import MergeInputs

SCE_DIVISOR_FLOOR = 1e-6  # sum of the agreeing weights is clamped to at least this (mergekit)


def _top_k_lowest_index(a: "torch.Tensor", k: int) -> "torch.Tensor":
    """Boolean mask of the ``k`` largest entries of ``a`` (flat); equal values: lower flat index first."""
    import torch

    flat = a.reshape(-1)
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=a.device)
    if k <= 0:
        return mask.view(a.shape)
    if k >= n:
        return mask.fill_(True).view(a.shape)
    t = torch.kthvalue(flat, n - k + 1).values
    torch.gt(flat, t, out=mask)
    need = k - int(mask.sum())
    if need > 0:
        eq = torch.nonzero(flat == t).reshape(-1)[:need]
        mask[eq] = True
    return mask.view(a.shape)


def _deltas(inputs: "MergeInputs") -> "list[torch.Tensor]":
    base = inputs.base
    if base is None:
        raise ValueError(f"tensor {inputs.name!r}: this method needs a base model")
    return [x - base for x in inputs.tensors]


def sce_select_mask(deltas: "list[torch.Tensor]", topk: float) -> "torch.Tensor | None":
    """Positions kept by SCE's variance selection (None: all). Population variance across the models; the
    ``int(topk * nnz)`` largest variances (nnz: positions of non-zero variance), ties by lower index."""
    import torch

    if topk >= 1:
        return None
    if topk <= 0:
        return torch.zeros(deltas[0].shape, dtype=torch.bool, device=deltas[0].device)
    # per position over the models: torch's reduction along dim 0 (one position per output, thread-independent)
    var = torch.var(torch.stack(deltas), dim=0, unbiased=False)
    nnz = int(torch.count_nonzero(var))
    return _top_k_lowest_index(var, int(nnz * topk))


def sce_weights(deltas: "list[torch.Tensor]", guard: float) -> list[float]:
    """``mean(d_i^2) / sum_j mean(d_j^2)``; equal weights when the sum is below ``guard``."""
    numel = max(1, deltas[0].numel())
    ms = [det_sum(d.square()) / numel for d in deltas]
    total = sum(ms)
    if abs(total) < guard or total == 0:
        return [1.0 / len(deltas)] * len(deltas)
    return [m / total for m in ms]


def sce(inputs: "MergeInputs") -> "torch.Tensor":
    import torch

    g = inputs.global_params
    base = inputs.base
    deltas = _deltas(inputs)
    if not deltas:
        return base.clone()
    sel = sce_select_mask(deltas, float(g.get("select_topk", 1.0)))
    if sel is not None:
        for d in deltas:
            d.mul_(sel)
    weights = sce_weights(deltas, float(g.get("sce_weight_guard", 1e-6)))
    score = torch.zeros_like(base)
    for d in deltas:
        score.add_(d)
    elected = torch.where(score >= 0, 1.0, -1.0).to(base.dtype)
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for d, w in zip(deltas, weights):
        agree = (d * elected > 0).to(base.dtype)
        wm = agree.mul_(w)
        num.add_(d * wm)
        den.add_(wm)
    num.div_(den.clamp_(min=SCE_DIVISOR_FLOOR))
    return num.add_(base)


def _ram(inputs: "MergeInputs", plus: bool) -> "torch.Tensor":
    import torch

    g = inputs.global_params
    eps = float(g.get("epsilon", 1e-5))
    base = inputs.base
    deltas = _deltas(inputs)
    if not deltas:
        return base.clone()
    contrib = [d.abs() > eps for d in deltas]
    count = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for c in contrib:
        count.add_(c.to(torch.int32))
    unique = count == 1
    shared = count > 1
    scales = [1.0] * len(deltas)
    if plus:
        r, alpha = float(g.get("r", 0.1)), float(g.get("alpha", 0.2))
        for i, c in enumerate(contrib):
            n_shared = int((c & shared).sum())
            n_unique = int((c & unique).sum())
            rho = n_shared / max(float(n_unique), eps)
            scales[i] = 1.0 + r * min(max(rho, 0.0), alpha)
    out = torch.zeros_like(base)
    n_contrib = count.clamp(min=1).to(base.dtype)
    for d, c, s in zip(deltas, contrib, scales):
        dz = d * c
        out.add_(torch.where(unique, dz * s if s != 1.0 else dz, dz / n_contrib))
    return out.add_(base)


def ram(inputs: "MergeInputs") -> "torch.Tensor":
    return _ram(inputs, plus=False)


def ramplus_tl(inputs: "MergeInputs") -> "torch.Tensor":
    return _ram(inputs, plus=True)
