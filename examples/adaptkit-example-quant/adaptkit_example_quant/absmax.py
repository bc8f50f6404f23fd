"""The math: one pass over the target linears, no calibration data.

For ``W [out, in]`` and each output channel ``o``: ``absmax[o] = max_i |W[o, i]|``,
``q[o, i] = round(W[o, i] / absmax[o] * 127)`` in ``-127 .. 127`` and ``W_hat = q * absmax / 127``.
In adaptkit's grid convention (``W_hat = (codes - zero) * scale``) that is one group spanning the row
(``group_size=-1``), ``codes = q + 128``, ``zero = 128`` and ``scale = absmax / 127``.
"""
from __future__ import annotations

import dataclasses

from adaptkit.quantize.api import QuantizedLinear

ZERO = 128  # symmetric 8-bit grid: codes 1..255 around 128


def quantize_weight(w, spec):
    """``W [out, in]`` -> QuantizedLinear (computed in float64 so the codes do not depend on fp32 rounding)."""
    import torch

    w64 = w.detach().to("cpu", torch.float64)
    absmax = w64.abs().amax(dim=1)  # [out]
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero row gets q = 0, scale 0
    q = torch.round(w64 / safe[:, None] * 127).clamp_(-127, 127)
    out_features, in_features = w64.shape
    return QuantizedLinear(
        codes=(q + ZERO).to(torch.uint8),
        scales=(absmax / 127).to(torch.float32)[None, :],  # [1 group, out]
        zeros=torch.full((1, out_features), ZERO, dtype=torch.int32),
        g_idx=torch.zeros(in_features, dtype=torch.int32),
        spec=spec,
    )


def quantize(request):
    """The entry point adaptkit calls: yield ``(module, QuantizedLinear)`` for every target, one at a time."""
    spec = dataclasses.replace(request.spec, bits=8, group_size=-1, sym=True)
    for module in request.targets:
        request.report(module)  # status text of adaptkit's progress bar, which advances on every yield
        yield module, quantize_weight(request.weight(module), spec)
