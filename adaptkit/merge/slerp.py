"""SLERP and NuSLERP (spherical linear interpolation). Pure tensor functions; see specs/merge-math.md.

Dot products and norms are float64 sums with a fixed reduction order (``adaptkit.merge._util``), so the
interpolation coefficients, hence the outputs, are bit-identical for any thread count. The elementwise
combination ``c0 * v0 + c1 * v1`` runs in the compute dtype with the coefficients rounded to it once.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from adaptkit.merge._util import CHUNK, det_rowsum, det_sum, flat_chunks

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from adaptkit.merge.api import MergeInputs

DOT_THRESHOLD = 0.9995  # slerp: |cos| above this -> lerp (mergekit)
NORM_EPS = 1e-8  # slerp: a norm <= this is replaced by 1 (mergekit)
NUSLERP_NORM_EPS = 1e-7  # nuslerp: norms clamped to at least this (mergekit)
NUSLERP_COLINEAR_EPS = 1e-8  # nuslerp: 1 - cos^2 <= eps^2 -> lerp (mergekit)


def _norms_dot(a: "torch.Tensor", b: "torch.Tensor") -> tuple[float, float, float]:
    """``(sum a*a, sum b*b, sum a*b)`` of flat tensors: fixed chunks, thread-count independent sums."""
    import torch

    n = a.numel()
    buf = torch.empty(min(CHUNK, max(1, n)), dtype=a.dtype, device=a.device)
    s0 = s1 = s01 = 0.0
    for s, e in flat_chunks(n):
        x, y, p = a[s:e], b[s:e], buf[: e - s]
        s0 += det_sum(torch.mul(x, x, out=p))
        s1 += det_sum(torch.mul(y, y, out=p))
        s01 += det_sum(torch.mul(x, y, out=p))
    return s0, s1, s01


def slerp_coefficients(t: float, v0: "torch.Tensor", v1: "torch.Tensor") -> tuple[float, float, bool]:
    """``(c0, c1, fell_back)`` with ``slerp(t, v0, v1) = c0 * v0 + c1 * v1`` over the flattened tensors.

    ``cos = <v0, v1> / (|v0| |v1|)`` (a norm ``<= 1e-8`` counts as 1), clamped to [-1, 1]; if
    ``|cos| > 0.9995`` the result is the lerp ``(1 - t, t)``, else ``theta = acos(cos)``,
    ``c0 = sin((1 - t) theta) / sin(theta)``, ``c1 = sin(t theta) / sin(theta)``.
    """
    n0, n1, dot = _norms_dot(v0.reshape(-1), v1.reshape(-1))
    n0 = math.sqrt(n0)
    n1 = math.sqrt(n1)
    n0 = n0 if n0 > NORM_EPS else 1.0
    n1 = n1 if n1 > NORM_EPS else 1.0
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t, True
    theta = math.acos(cos)
    st = math.sin(theta)
    return math.sin((1.0 - t) * theta) / st, math.sin(t * theta) / st, False


def slerp_tensors(t: float, v0: "torch.Tensor", v1: "torch.Tensor") -> "tuple[torch.Tensor, bool]":
    """``(slerp(t, v0, v1), fell_back_to_lerp)``."""
    import torch

    if v0.numel() == 0:
        return v0.clone(), False
    c0, c1, fell_back = slerp_coefficients(t, v0, v1)
    out = torch.mul(v0, c0)
    out.add_(v1, alpha=c1)
    return out, fell_back


def slerp(inputs: "MergeInputs") -> "torch.Tensor":
    """mergekit's slerp: from the base model (t = 0) to the single other model (t = 1)."""
    if inputs.base is None or len(inputs.tensors) != 1:
        raise ValueError(
            f"tensor {inputs.name!r}: slerp takes a base model and exactly one other model "
            f"(got base={'yes' if inputs.base is not None else 'no'}, {len(inputs.tensors)} other)"
        )
    out, fell_back = slerp_tensors(float(inputs.global_params["t"]), inputs.base, inputs.tensors[0])
    if fell_back:
        inputs.count("slerp_lerp_fallback")
    return out


def _rows(x: "torch.Tensor", flatten: bool, row_wise: bool) -> "torch.Tensor":
    if flatten or x.dim() <= 1:
        return x.reshape(1, -1)
    if row_wise:
        x = x.transpose(0, -1)
    return x.reshape(-1, x.shape[-1])


def nuslerp_tensors(
    t: float, v0: "torch.Tensor", v1: "torch.Tensor", *, flatten: bool = True, row_wise: bool = False
) -> "tuple[torch.Tensor, int]":
    """``(nuslerp(t, v0, v1), number of vectors that fell back to lerp)``.

    Vectors: the whole flattened tensor (``flatten``), else the last-dim vectors (rows of a matrix), or the
    dim-0 vectors (columns) with ``row_wise`` (mergekit's naming). Per vector: norms clamped to >= 1e-7,
    ``cos`` clamped to [-1, 1]; where ``1 - cos^2 <= 1e-16`` the result is ``(1 - t) v0 + t v1``, else
    ``(sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)``.
    """
    import torch

    shape = v0.shape
    if v0.numel() == 0:
        return v0.clone(), 0
    a = _rows(v0, flatten, row_wise)
    b = _rows(v1, flatten, row_wise)
    if a.shape[0] == 1:
        n0, n1, dot = _norms_dot(a[0], b[0])
        n0t = torch.tensor([n0], dtype=torch.float64)
        n1t = torch.tensor([n1], dtype=torch.float64)
        dott = torch.tensor([dot], dtype=torch.float64)
    else:
        per = max(1, CHUNK // max(1, a.shape[1]))
        parts = ([], [], [])
        for s in range(0, a.shape[0], per):
            x = a[s : s + per]
            y = b[s : s + per]
            parts[0].append(det_rowsum(x * x).cpu())
            parts[1].append(det_rowsum(y * y).cpu())
            parts[2].append(det_rowsum(x * y).cpu())
        n0t, n1t, dott = (torch.cat(p) for p in parts)
    n0t = n0t.sqrt().clamp(min=NUSLERP_NORM_EPS)
    n1t = n1t.sqrt().clamp(min=NUSLERP_NORM_EPS)
    cos = (dott / (n0t * n1t)).clamp(-1, 1)
    colinear = (1 - cos * cos) <= NUSLERP_COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    st = torch.where(colinear, 1.0, torch.sin(theta))
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / st)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / st)
    c0 = c0.to(device=a.device, dtype=a.dtype).unsqueeze(1)
    c1 = c1.to(device=a.device, dtype=a.dtype).unsqueeze(1)
    out = a * c0
    out.addcmul_(b, c1)
    if not flatten and row_wise and v0.dim() > 1:
        tshape = list(shape)
        tshape[0], tshape[-1] = tshape[-1], tshape[0]
        out = out.reshape(tshape).transpose(0, -1).contiguous()
    return out.reshape(shape), int(colinear.sum())


def nuslerp(inputs: "MergeInputs") -> "torch.Tensor":
    """mergekit's nuslerp: two models with weights w0, w1 -> t = w1 / (w0 + w1) (0.5 if |w0 + w1| < 1e-6);
    with a base model the task vectors are interpolated and added to the base."""
    if len(inputs.tensors) != 2:
        raise ValueError(f"tensor {inputs.name!r}: nuslerp takes exactly two models, got {len(inputs.tensors)}")
    w0, w1 = (float(p["weight"]) for p in inputs.params)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    g = inputs.global_params
    flatten = bool(g.get("nuslerp_flatten", True))
    row_wise = bool(g.get("nuslerp_row_wise", False))
    x0, x1 = inputs.tensors
    base = inputs.base
    if base is not None:
        x0 = x0 - base
        x1 = x1 - base
    out, fallbacks = nuslerp_tensors(t, x0, x1, flatten=flatten, row_wise=row_wise)
    if fallbacks:
        inputs.count("nuslerp_lerp_fallback", fallbacks)
    if base is not None:
        out.add_(base)
    return out
