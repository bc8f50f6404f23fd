"""Multi-model spherical averages: ``multislerp`` and ``karcher`` (pure tensor functions; specs/merge-math.md).

Each tensor is one vector (flattened). Norms and dot products are float64 sums in a fixed order
(``adaptkit.merge._util.det_sum``), so the scalar coefficients -- hence the outputs -- do not depend on the
thread count; the elementwise combinations run in the compute dtype with each coefficient rounded once.

* ``multislerp`` (barycentric interpolation on the hypersphere, Goddard's "multislerp" note): with
  ``v_i = x_i - base`` (or ``x_i``), weights ``w`` (normalized to sum 1 with ``normalize_weights``),
  ``u_i = v_i / (|v_i| + eps)``, ``M = sum w_i u_i`` and ``m = M / |M|``, the recipe maps the weighted sum
  of the tangent vectors ``u_i - <u_i, m> m`` back with the exponential map at ``m``. That weighted sum is
  ``M - <M, m> m = 0`` *exactly*, so the result is ``m * sum_i w_i |v_i|`` (+ base): the normalized weighted
  mean direction at the weighted mean norm. ``|M| < eps``: two models fall back to ``sum w_i v_i``; more is
  an error (antipodal inputs with balancing weights).
* ``karcher`` (the Karcher / Frechet mean on the unit sphere, equal weights ``1/n`` over every input,
  a base model included): start at the normalized mean of the unit vectors, then up to ``max_iter`` times
  ``T = sum a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m)`` (``theta_i = acos <m, u_i>``; terms with
  ``theta_i < tol`` skipped), stop when ``|T| < tol``, else ``m <- cos|T| m + sin|T| T/|T|`` renormalized.
  The result is ``m * sum_i |x_i| / n``. Inputs with norm ``<= tol`` do not steer the direction (their
  norm still counts in the scale).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from adaptkit.errors import CheckpointError
from adaptkit.merge._util import det_sum

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from adaptkit.merge.api import MergeInputs


def _dot(a: "torch.Tensor", b: "torch.Tensor") -> float:
    return det_sum(a.reshape(-1) * b.reshape(-1))


def _norm(a: "torch.Tensor") -> float:
    return math.sqrt(max(0.0, det_sum(a.reshape(-1).square())))


def _combine(coefs: list[float], vs: "list[torch.Tensor]") -> "torch.Tensor":
    import torch

    out = torch.zeros_like(vs[0])
    for c, v in zip(coefs, vs):
        out.add_(v, alpha=c)
    return out


def multislerp(inputs: "MergeInputs") -> "torch.Tensor":
    g = inputs.global_params
    eps = float(g.get("eps", 1e-8))
    base = inputs.base
    if len(inputs.tensors) == 1:  # nothing to interpolate: the model itself (mergekit)
        return inputs.tensors[0].clone()
    vs = [x - base for x in inputs.tensors] if base is not None else list(inputs.tensors)
    w = [float(p["weight"]) for p in inputs.params]
    if g.get("normalize_weights", True):
        s = sum(w)
        if s == 0:
            raise CheckpointError(f"tensor {inputs.name!r}: multislerp weights sum to zero; cannot normalize them")
        w = [x / s for x in w]
    norms = [_norm(v) for v in vs]
    coefs = [wi / (ni + eps) for wi, ni in zip(w, norms)]
    # |M|^2 = sum_ij c_i c_j <v_i, v_j>, from float64 dot products (no extra full-size pass)
    gram = [[_dot(vs[i], vs[j]) if j >= i else 0.0 for j in range(len(vs))] for i in range(len(vs))]
    m2 = sum(coefs[i] * coefs[j] * (gram[i][j] if j >= i else gram[j][i]) for i in range(len(vs)) for j in range(len(vs)))
    m_norm = math.sqrt(max(0.0, m2))
    if m_norm < eps:
        if len(vs) == 2:
            inputs.count("multislerp_linear_fallback")
            out = _combine(w, vs)
            return out.add_(base) if base is not None else out
        raise CheckpointError(
            f"tensor {inputs.name!r}: multislerp: the weighted sum of the unit vectors is zero "
            "(antipodal inputs with balancing weights); use other weights"
        )
    scale = sum(wi * ni for wi, ni in zip(w, norms)) / m_norm
    out = _combine([c * scale for c in coefs], vs)
    return out.add_(base) if base is not None else out


def karcher(inputs: "MergeInputs") -> "torch.Tensor":
    g = inputs.global_params
    max_iter, tol = int(g.get("max_iter", 10)), float(g.get("tol", 1e-5))
    xs = ([inputs.base] if inputs.base is not None else []) + list(inputs.tensors)
    if len(xs) == 1:
        return xs[0].clone()
    n = len(xs)
    norms = [_norm(x) for x in xs]
    valid = [i for i in range(n) if norms[i] > tol]
    scale = sum(norms) / n
    if not valid:
        return xs[0].new_zeros(xs[0].shape)
    a = 1.0 / len(valid)
    us = [xs[i] for i in valid]  # unit vectors u_i = x_i / |x_i|, never materialized
    un = [norms[i] for i in valid]
    # m is kept as m = sum_k b_k u_k-coefficients on the x_i plus one running vector; simpler: a tensor
    m = _combine([a / nk for nk in un], us)
    mn = _norm(m)
    if mn < tol:
        m = us[0] / un[0]
        inputs.count("karcher_degenerate_start")
    else:
        m.mul_(1.0 / mn)
    for _ in range(max_iter):
        coefs, mcoef = [], 0.0
        for x, nx in zip(us, un):
            cos = max(-1.0, min(1.0, _dot(m, x) / nx))
            theta = math.acos(cos)
            if theta < tol:
                coefs.append(0.0)
                continue
            f = a * theta / math.sin(theta)
            coefs.append(f / nx)
            mcoef -= f * cos
        tangent = _combine(coefs, us)
        tangent.add_(m, alpha=mcoef)
        tn = _norm(tangent)
        if tn < tol:
            break
        m.mul_(math.cos(tn)).add_(tangent, alpha=math.sin(tn) / tn)
        un_m = _norm(m)
        if un_m > tol:
            m.mul_(1.0 / un_m)
    return m.mul_(scale)
