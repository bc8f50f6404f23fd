"""Model Stock (Jang et al. 2024). Pure tensor function; see specs/merge-math.md.

With base ``w0`` and ``N >= 2`` fine-tuned ``w_i``: offsets ``o_i = w_i - w0``; ``cos`` is the mean over pairs
``i < j`` of ``<o_i, o_j> / max(|o_i| |o_j|, 1e-6)`` (each clamped to [-1, 1]); ``t = N cos / (1 + (N-1) cos)``
(``t = 0`` where ``|1 + (N-1) cos| < 1e-6``); ``out = t * mean_i(w_i) + (1 - t) * w0``. With ``filter_wise``
each last-dim vector (row) gets its own ``cos``/``t``; otherwise one ``t`` for the whole tensor.
Dot products and norms are float64 with a fixed reduction order (thread-count independent).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from adaptkit.merge._util import CHUNK, det_rowsum, det_sum, flat_chunks

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from adaptkit.merge.api import MergeInputs


def model_stock_t(base: "torch.Tensor", tensors, filter_wise: bool = False) -> "torch.Tensor":
    """The interpolation ratio ``t``: float64 tensor of shape ``(rows,)`` (``(1,)`` unless ``filter_wise``)."""
    import torch

    n = len(tensors)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if filter_wise and base.dim() >= 1:
        b = base.reshape(1, -1) if base.dim() == 1 else base.reshape(-1, base.shape[-1])
        ws = [w.reshape(b.shape) for w in tensors]
        per = max(1, CHUNK // max(1, b.shape[1]))
        norms = [[] for _ in range(n)]
        dots = [[] for _ in pairs]
        for s in range(0, b.shape[0], per):
            offs = [w[s : s + per] - b[s : s + per] for w in ws]
            for i in range(n):
                norms[i].append(det_rowsum(offs[i] * offs[i]).cpu())
            for k, (i, j) in enumerate(pairs):
                dots[k].append(det_rowsum(offs[i] * offs[j]).cpu())
        norm_t = [torch.cat(x).sqrt() for x in norms]
        dot_t = [torch.cat(x) for x in dots]
    else:
        bf = base.reshape(-1)
        ws = [w.reshape(-1) for w in tensors]
        sq = [0.0] * n
        dt = [0.0] * len(pairs)
        for s, e in flat_chunks(bf.numel()):
            offs = [w[s:e] - bf[s:e] for w in ws]
            for i in range(n):
                sq[i] += det_sum(offs[i] * offs[i])
            for k, (i, j) in enumerate(pairs):
                dt[k] += det_sum(offs[i] * offs[j])
        norm_t = [torch.tensor([v], dtype=torch.float64).sqrt() for v in sq]
        dot_t = [torch.tensor([v], dtype=torch.float64) for v in dt]
    cos_list = [
        (dot_t[k] / (norm_t[i] * norm_t[j]).clamp(min=1e-6)).clamp(-1, 1) for k, (i, j) in enumerate(pairs)
    ]
    cos = torch.stack(cos_list).mean(dim=0)
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, den))


def model_stock(inputs: "MergeInputs") -> "torch.Tensor":
    import torch

    base = inputs.base
    if base is None or len(inputs.tensors) < 2:
        raise ValueError(f"tensor {inputs.name!r}: model_stock needs a base model and at least two other models")
    filter_wise = bool(inputs.global_params.get("filter_wise", False))
    t = model_stock_t(base, inputs.tensors, filter_wise)
    n = len(inputs.tensors)
    avg = torch.zeros_like(base)
    for w in inputs.tensors:
        avg += w
    avg /= n
    if filter_wise and base.dim() >= 1:
        rows = avg.reshape(1, -1) if base.dim() == 1 else avg.reshape(-1, base.shape[-1])
        tt = t.to(device=base.device, dtype=base.dtype).unsqueeze(1)
        b = base.reshape(rows.shape)
        out = rows * tt
        out.addcmul_(b, 1 - tt)
        return out.reshape(base.shape)
    tv = float(t[0])
    tc = torch.tensor(tv, dtype=base.dtype).item()
    out = avg.mul_(tc)
    out.add_(base, alpha=1 - tc)
    return out
